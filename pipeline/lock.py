"""One run per output folder: a lock held for the whole run.

Local folders use an OS file lock (``fcntl.flock`` on ``<output>/.pipeline.lock``), which
the kernel releases when the process dies, so a killed run never leaves the folder locked.
Object stores have no such primitive: there the lock is an object (``_lock.json``) naming
its owner, refreshed by a heartbeat; a lock whose heartbeat is older than
``STALE_AFTER_S`` belongs to a dead run and is taken over. (Two runs starting within the
same second on an object store can both see no lock; the read-back after writing narrows
that window but cannot close it: do not start two runs at once on one prefix.)

Either way the lock records the holder (host, pid, start time, run id), and a second run
gets a one-line :class:`~pipeline.errors.OutputBusyError` naming it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from . import store
from .errors import OutputBusyError

LOCAL_LOCK_NAME = ".pipeline.lock"
REMOTE_LOCK_NAME = "_lock.json"
HEARTBEAT_S = 20.0
STALE_AFTER_S = 90.0

_held: dict[str, int] = {}  # lock path -> depth: the lock is re-entrant within a process
_held_guard = threading.Lock()


def holder_record(run_id: str) -> dict:
    """Who holds the lock: written into it, and named to anyone refused."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "run_id": run_id,
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
        "heartbeat": time.time(),
    }


def _busy(root: str, holder: dict) -> OutputBusyError:
    who = (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
        f"started {holder.get('started_at', '?')}, run {holder.get('run_id', '?')}"
    )
    return OutputBusyError(
        f"Output folder {root} is in use by another run ({who}). Wait for it to finish, "
        "or choose another output.dir."
    )


@contextmanager
def output_lock(root: str, run_id: str) -> Iterator[None]:
    """Hold the output folder ``root`` for the duration of the block (re-entrant)."""
    key = store.join(root, LOCAL_LOCK_NAME if store.is_local(root) else REMOTE_LOCK_NAME)
    with _held_guard:
        if _held.get(key):
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    holder = (
        _local_lock(root, key, run_id) if store.is_local(root) else _remote_lock(root, key, run_id)
    )
    with _held_guard:
        _held[key] = 1
    try:
        with holder:
            yield
    finally:
        with _held_guard:
            _held.pop(key, None)


@contextmanager
def _local_lock(root: str, path: str, run_id: str) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            raise _busy(root, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record(run_id)).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _remote_lock(root: str, url: str, run_id: str) -> Iterator[None]:
    fs, path = store.filesystem(url)

    def read() -> dict | None:
        try:
            with fs.open(path, "r") as handle:
                return json.load(handle)
        except (FileNotFoundError, ValueError):
            return None

    def write(record: dict) -> None:
        with fs.open(path, "w") as handle:
            json.dump(record, handle)

    current = read()
    if current and time.time() - float(current.get("heartbeat", 0)) < STALE_AFTER_S:
        raise _busy(root, current)
    mine = holder_record(run_id)
    write(mine)
    time.sleep(0.2)  # let a competing writer's object land, then check who won
    current = read()
    if not current or current.get("run_id") != run_id:
        raise _busy(root, current or {})
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            write({**mine, "heartbeat": time.time()})

    thread = threading.Thread(target=beat, name="pipeline-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        fs.rm(path)
