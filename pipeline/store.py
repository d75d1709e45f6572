"""The Zarr layout of the embeddings store, and path helpers shared by every writer.

The store is one Zarr v3 group (a local path or an fsspec URL)::

    embeddings.zarr/
      vectors     (n_rows, dim) float32, chunks (chunk_rows, dim): whole rows per chunk,
                  rows in a seeded random order, so every chunk is a uniform sample
      object_ids  (n_rows,) int64, same row chunks: the object each row belongs to

Because rows are stored shuffled, a contiguous read is a random sample of the dataset:
mini-batches need no random access, and predict streams the store sequentially.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import re
import stat
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import dask.array as da
import fsspec
import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer.cpu import NDBuffer

from .errors import MissingInputError, OutputError, must_be

VECTORS = "vectors"
OBJECT_IDS = "object_ids"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem and the path inside it for a path or URL."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    fs, _ = filesystem(url)
    return "file" in fs.protocol or "local" in fs.protocol


def parse_location(url: str) -> str:
    """A plain path for local locations (``file:///x`` -> ``/x``); other URLs unchanged.

    Local outputs then use the operating system's atomic rename and plain file APIs.
    """
    return filesystem(url)[1] if is_local(url) else url


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with ``/``."""
    return "/".join([url.rstrip("/"), *parts])


#: The run writing through :func:`atomic_path` (set by the runner): temporaries carry it.
_RUN_ID: ContextVar[str | None] = ContextVar("run_id", default=None)
#: A run id as :func:`pipeline.plan.new_run_id` makes them.
RUN_ID_PATTERN = r"[0-9T]{15}-[0-9a-f]{6}"


@contextmanager
def run_scope(run_id: str) -> Iterator[None]:
    """Temporaries made inside the block carry ``run_id``."""
    token = _RUN_ID.set(run_id)
    try:
        yield
    finally:
        _RUN_ID.reset(token)


@contextmanager
def atomic_path(url: str) -> Iterator[str]:
    """Yield a temporary sibling of ``url``; move it into place only if the block succeeds.

    A crash inside the block leaves only a ``<name>.tmp-<run id>-<id>`` sibling, never
    something at ``url`` that looks complete. Works for files and folders, local or fsspec.
    """
    fs, path = filesystem(url)
    run_id = _RUN_ID.get()
    tag = f"{run_id}-" if run_id else ""
    tmp_url = f"{url.rstrip('/')}.tmp-{tag}{uuid.uuid4().hex[:8]}"
    _, tmp_path = filesystem(tmp_url)
    try:
        fs.makedirs(fs._parent(path), exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"Output folder {fs._parent(path)} cannot be created ({exc.strerror or exc}). "
            "Choose a writable output.dir."
        ) from None
    try:
        yield tmp_url
    except BaseException:
        if fs.exists(tmp_path):
            fs.rm(tmp_path, recursive=True)
        raise
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if fs.isdir(tmp_path) and not is_local(url):
        # Object stores have no rename: copy the prefix, then delete the temporary one.
        fs.copy(tmp_path.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
        fs.rm(tmp_path, recursive=True)
    else:
        fs.mv(tmp_path, path, recursive=fs.isdir(tmp_path))


def remove_stale_temporaries(url: str, owned: tuple[str, ...], suffix: str = "") -> None:
    """Delete leftovers of killed runs in ``url``: only names this package makes, i.e. an
    ``owned`` name followed by ``.tmp-<id>`` (or ``-<run id><suffix>`` for staging files).
    Anything else in the folder is the user's and stays. Call it holding the output lock.
    """
    fs, path = filesystem(url)
    if not fs.exists(path):
        return
    names = "|".join(re.escape(name) for name in owned)
    run_file = f"-{RUN_ID_PATTERN}" + re.escape(suffix)
    temporary = rf"\.tmp-(?:{RUN_ID_PATTERN}-)?[0-9a-f]{{8}}"
    pattern = re.compile(rf"^(?:{names})(?:{temporary}|{run_file})$|^\.tmp-probe-[0-9a-f]{{8}}$")
    for entry in fs.ls(path, detail=False):
        if pattern.match(entry.rstrip("/").rsplit("/", 1)[-1]):
            fs.rm(entry, recursive=True)


def check_writable(url: str, key: str) -> None:
    """Create the folder ``url`` and write a probe file in it, or raise :class:`OutputError`
    naming the config ``key``, before any stage spends time on work it cannot save."""
    fs, path = filesystem(url)
    probe = f"{path}/.tmp-probe-{uuid.uuid4().hex[:8]}"  # removed as stale if we are killed
    try:
        fs.makedirs(path, exist_ok=True)
        fs.touch(probe)
        fs.rm(probe)
    except OSError as exc:
        fix = f"Creating or writing it fails ({exc.strerror or exc}). Choose another {key}."
        raise OutputError(must_be(key, "a writable folder", url, fix)) from None


def _compressors(compression: str) -> Any:
    if compression == "none":
        return None
    if compression == "lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    return ZstdCodec(level=3)


def create_store(
    url: str,
    n_rows: int,
    dim: int,
    chunk_rows: int,
    compression: str = "none",
    attrs: dict | None = None,
) -> zarr.Group:
    """Create an empty embeddings group at ``url`` (overwriting)."""
    group = zarr.open_group(url, mode="w", zarr_format=3, attributes=attrs or {})
    chunk_rows = max(1, min(chunk_rows, n_rows))
    group.create_array(
        VECTORS,
        shape=(n_rows, dim),
        chunks=(chunk_rows, dim),
        dtype="float32",
        compressors=_compressors(compression),
        fill_value=0.0,
        dimension_names=("row", "feature"),
    )
    group.create_array(
        OBJECT_IDS,
        shape=(n_rows,),
        chunks=(chunk_rows,),
        dtype="int64",
        compressors=None,
        fill_value=-1,
        dimension_names=("row",),
    )
    return group


def open_store(url: str) -> zarr.Group:
    """Open an existing embeddings group read-only, with a clear error if it is missing."""
    try:
        return zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise MissingInputError(
            f"Embeddings store {url} does not exist. Run the 'ingest' stage first."
        ) from None


def vectors_array(url: str) -> da.Array:
    """The store's vectors as a dask array, one block per Zarr chunk (lazy)."""
    return da.from_zarr(url, component=VECTORS)


def read_rows(url: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Read rows ``[start, stop)`` of the vectors, one chunk at a time into ``out``.

    Going chunk by chunk keeps only one chunk's encoded bytes in memory besides the result
    (zarr would otherwise fetch every chunk of a multi-chunk read at once).
    """
    array = zarr.open_array(url, path=VECTORS, mode="r")
    if out is None:
        out = np.empty((stop - start, array.shape[1]), dtype=array.dtype)
    chunk_rows = array.chunks[0]
    first = start
    while first < stop:
        last = min(stop, (first // chunk_rows + 1) * chunk_rows)
        target = NDBuffer.from_numpy_array(out[first - start : last - start])
        array.get_basic_selection((slice(first, last), slice(None)), out=target)
        first = last
    return out


_thread_local = threading.local()


def thread_buffer(name: str, rows: int, dim: int) -> np.ndarray:
    """A float32 ``(rows, dim)`` array owned by the calling thread, reused across calls.

    Freshly allocated block-sized arrays cost page faults on first touch (about as much as
    reading the block); reusing one buffer per thread and purpose avoids them.
    """
    buffer = getattr(_thread_local, name, None)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != dim:
        buffer = np.empty((rows, dim), dtype=np.float32)
        setattr(_thread_local, name, buffer)
    return buffer[:rows]


def read_rows_reusing_buffer(url: str, start: int, stop: int) -> np.ndarray:
    """Like :func:`read_rows`, but into this thread's reused read buffer.

    The result is only valid until this thread's next call: use it inside one task, never
    return it.
    """
    dim = zarr.open_array(url, path=VECTORS, mode="r").shape[1]
    return read_rows(url, start, stop, out=thread_buffer("read", stop - start, dim))


# --------------------------------------------------------------------------- writes


def run_chunks(fn, n_chunks: int, desc: str, progress: bool) -> None:
    """Call ``fn(chunk)`` for every chunk on two threads, with a progress bar."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in tqdm(pool.map(fn, range(n_chunks)), total=n_chunks, desc=desc, unit="chunk",
                      disable=not progress):  # fmt: skip
            pass


def mirror_to_store(
    memmap: np.ndarray,
    store_ids: np.ndarray,
    url: str,
    chunk_rows: int,
    compression: str,
    attrs: dict,
    progress: bool,
) -> None:
    """Copy memmap rows into the Zarr store in ``store_ids`` order, one chunk per task.

    Each chunk's rows are gathered into a reused buffer and written as one whole chunk (no
    read-modify-write).
    """
    n_rows, dim = len(store_ids), memmap.shape[1]
    with atomic_path(url) as tmp:
        group = create_store(tmp, n_rows, dim, chunk_rows, compression, attrs)
        vectors, ids_array = group[VECTORS], group[OBJECT_IDS]

        def write_chunk(c: int) -> None:
            start, stop = c * chunk_rows, min((c + 1) * chunk_rows, n_rows)
            ids = store_ids[start:stop]
            # One block-sized buffer per thread, reused (fresh ones cost page faults). The
            # rows are gathered in shuffled order straight into it: each is a contiguous
            # 7 KB read of the memmap, so the order costs nothing while it is cached.
            block = thread_buffer("gather", len(ids), dim)
            np.take(memmap, ids, axis=0, out=block)
            vectors[start:stop] = block
            ids_array[start:stop] = ids

        run_chunks(write_chunk, math.ceil(n_rows / chunk_rows), "ingest: write zarr", progress)


# --------------------------------------------------------------------------- input files


class PathOutsideRoot(ValueError):
    """An embedding path that resolves (after ``..`` and symlinks) outside the root."""


class NotRegularFile(ValueError):
    """A FIFO, device, socket or folder where an embedding file should be."""


@functools.lru_cache(maxsize=65536)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolves_inside(path: str, root: str) -> bool:
    """Whether local ``path`` resolves (``..`` and links) inside the resolved ``root``,
    with one ``realpath`` per folder (cached) and one only for a path that is a link."""
    if not _inside(_real_folder(os.path.dirname(os.path.abspath(path))), root):
        return False
    return not os.path.islink(path) or _inside(os.path.realpath(path), root)


def read_inside(path: str, root: str) -> bytes:
    """The bytes of the regular file ``path``, which must resolve inside ``root``.

    Checked without a ``realpath`` per file (ingest opens one file per image): the folder
    is resolved once per folder (cached), the file is opened with ``O_NOFOLLOW`` (a link
    is resolved and checked only when there is one) and ``O_NONBLOCK`` (a FIFO never
    blocks), and ``fstat`` says whether it is a regular file.

    Raises :class:`PathOutsideRoot`, :class:`NotRegularFile` or ``OSError``.
    """
    if not _inside(_real_folder(os.path.dirname(path)), root):
        raise PathOutsideRoot(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        target = os.path.realpath(path)  # the last component is a link
        if not _inside(target, root):
            raise PathOutsideRoot(path) from None
        fd = os.open(target, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path)
        data = os.read(fd, st.st_size)  # raw reads: no buffered file object per file
        while more := os.read(fd, 1 << 16):  # a file that grew since fstat
            data += more
        return data
    finally:
        os.close(fd)
