"""Run the stage table in order, skipping stages whose outputs are up to date.

Each stage's marker records what its outputs were made from: the config values it depends
on, fingerprints of its input files, the derived plan values, and its upstream marker's
key; its key is a hash of all that. ``run`` redoes a stage (and every stage after it) when
any of it changed or an output is missing; a single-stage command instead refuses an
upstream that no longer matches the config, naming what changed. Before a stage starts,
its marker and those after it are cleared, so a killed run leaves nothing marked complete.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import store
from .catalog import Catalog, run_metadata
from .config import Config
from .context import StageContext
from .errors import (
    InputError,
    InterruptedRunError,
    MissingInputError,
    OutputError,
    PipelineError,
    StageOrderError,
)
from .executor import open_executor, timed
from .lock import output_lock
from .plan import RunPlan, effective_n_clusters, estimate_resources, plan_run, plan_training
from .stages import BY_NAME, STAGE_NAMES, STAGES, Stage, downstream_of

log = logging.getLogger("pipeline")

#: Input files up to this size are fingerprinted by their contents; larger ones (the
#: objects CSV, an embeddings matrix) by size and modification time.
_CONTENT_HASH_BYTES = 16 << 20


@dataclass
class RunResult:
    """What a run did: stage timings, skipped stages, output locations and the funnel."""

    catalog: Catalog
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    funnel: pd.DataFrame | None = None
    #: Where the dask work ran: the executor kind and, on a distributed cluster, the
    #: task transitions each worker processed.
    executor_kind: str = ""
    worker_transitions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StageStatus:
    """Whether a stage's outputs match the current config and inputs, and why not."""

    stage: str
    key: str
    up_to_date: bool
    reasons: tuple[str, ...]

    def describe(self) -> str:
        if self.up_to_date:
            return "up to date"
        return "would run: " + "; ".join(self.reasons)


# --------------------------------------------------------------------------- fingerprints


def file_fingerprint(path: str | None) -> Any:
    """What identifies an input file's contents: a content hash for small files, size and
    mtime for large ones, ``None`` when absent."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return None
    st = p.stat()
    if st.st_size <= _CONTENT_HASH_BYTES:
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return [st.st_size, st.st_mtime_ns]


#: Files per task of the fingerprint's thread pool (stat and read release the GIL, so
#: a network or cold disk is waited on by many threads at once).
_FINGERPRINT_CHUNK = 4096


def _stat_chunk(paths: list[str]) -> np.ndarray:
    """Size and mtime (ns) of each file; ``-1, -1`` for one that cannot be read."""
    out = np.full((len(paths), 2), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        out[i] = st.st_size, st.st_mtime_ns
    return out


def _content_chunk(paths: list[str]) -> bytes:
    """A 16-byte digest of each file's bytes (of ``b"missing"`` for one that cannot be read)."""
    digests = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            data = b"missing"
        digests.append(hashlib.blake2b(data, digest_size=16).digest())
    return b"".join(digests)


def named_files_fingerprint(list_url: str, mode: str) -> str | None:
    """Fingerprint of the embedding files the ingest read (listed in ``list_url``): their
    size and mtime (``stat``) or their bytes (``content``); ``None`` without a list.

    Only the files the CSV names count, so unrelated files under the root change nothing.
    The files are visited by a thread pool in chunks (467,000 files: one ``stat`` each on
    every start of a run), and the digest covers the paths in the list's order.
    """
    if not Path(list_url).is_file():
        return None
    paths = pq.read_table(list_url, columns=["path"]).column("path").to_pylist()
    chunks = [paths[i : i + _FINGERPRINT_CHUNK] for i in range(0, len(paths), _FINGERPRINT_CHUNK)]
    visit = _content_chunk if mode == "content" else _stat_chunk
    digest = hashlib.blake2b(digest_size=16)
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        for part in pool.map(visit, chunks):
            digest.update(part if isinstance(part, bytes) else part.tobytes())
    digest.update("\n".join(paths).encode())
    return f"{mode}:{digest.hexdigest()}"


def _config_value(dumped: dict, key: str) -> Any:
    section, _, name = key.partition(".")
    return dumped[section][name] if name else dumped[section]


def _input_paths(cfg: Config, stage: Stage) -> dict[str, str | None]:
    dumped = cfg.model_dump(mode="json")
    paths = {key: _config_value(dumped, key) for key in stage.input_files}
    if cfg.input.embeddings_matrix:  # the matrix replaces the per-image files
        paths.pop("input.embeddings_root", None)
    return paths


def _input_fingerprint(cfg: Config, catalog: Catalog, key: str, path: str | None) -> Any:
    if key == "input.embeddings_root":  # per-image files: the ones the CSV names
        return named_files_fingerprint(catalog.embedding_files, cfg.ingest.fingerprint)
    return file_fingerprint(path)


def stage_record(cfg: Config, plan: RunPlan, stage: Stage, upstream_key: str | None) -> dict:
    """What the stage's outputs are made from, as stored in its marker."""
    dumped = cfg.model_dump(mode="json")
    return {
        "config": {key: _config_value(dumped, key) for key in stage.depends_on},
        "inputs": {
            key: _input_fingerprint(cfg, plan.catalog, key, path)
            for key, path in _input_paths(cfg, stage).items()
        },
        "derived": {name: getattr(plan, name) for name in stage.derived},
        "upstream": upstream_key or "",
    }


def record_key(stage: str, record: dict) -> str:
    payload = json.dumps({"stage": stage, **record}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def record_changes(old: dict, new: dict, upstream: str | None) -> list[str]:
    """What differs between a marker's record and the current one, one phrase each.

    >>> record_changes({"config": {"train": {"seed": 0}}, "inputs": {}, "derived": {},
    ...                 "upstream": "a"}, {"config": {"train": {"seed": 1}}, "inputs": {},
    ...                 "derived": {}, "upstream": "a"}, "ingest")
    ['train.seed changed (0 -> 1)']
    """
    changes = []
    for part in ("config", "derived"):
        before = {}
        after = {}
        for key, value in (old.get(part) or {}).items():
            before.update(_flatten(value, key))
        for key, value in (new.get(part) or {}).items():
            after.update(_flatten(value, key))
        for key in sorted(before.keys() | after.keys()):
            if before.get(key, "<unset>") != after.get(key, "<unset>"):
                label = key if part == "config" else f"{key} (derived)"
                was, now = before.get(key, "<unset>"), after.get(key, "<unset>")
                changes.append(f"{label} changed ({_short(was)} -> {_short(now)})")
    old_inputs, new_inputs = old.get("inputs") or {}, new.get("inputs") or {}
    for key in sorted(old_inputs.keys() | new_inputs.keys()):
        if old_inputs.get(key) != new_inputs.get(key):
            changes.append(f"the contents of {key} changed")
    if not changes and old.get("upstream") != new.get("upstream") and upstream:
        changes.append(f"its upstream '{upstream}' was redone")
    return changes


# --------------------------------------------------------------------------- status


def _missing_outputs(catalog: Catalog, stage: Stage) -> list[str]:
    return [name for name in stage.outputs if not catalog.exists(getattr(catalog, name))]


def stage_entries(catalog: Catalog, stage: Stage) -> tuple[str, ...]:
    """The top-level entries of the output folder that ``stage`` writes."""
    return tuple(dict.fromkeys(catalog.entry_name(output) for output in stage.outputs))


def owned_entries(catalog: Catalog) -> dict[str, dict]:
    """The manifest of what the pipeline wrote here. A folder written before manifests
    existed adopts the entries of every stage that has a marker (their files unknown)."""
    manifest = catalog.read_manifest()
    if manifest or catalog.exists(catalog.manifest):
        return manifest
    for stage in STAGES:
        if catalog.read_marker(stage.name) is not None:
            for name in stage_entries(catalog, stage):
                manifest[name] = {"stage": stage.name, "run_id": None, "files": None}
    return manifest


def _changed_outputs(catalog: Catalog, stage: Stage, manifest: dict[str, dict]) -> list[str]:
    """Entries whose files differ from what the stage left (sizes, added, removed)."""
    changed = []
    for name in stage_entries(catalog, stage):
        recorded = (manifest.get(name) or {}).get("files")
        if recorded is not None and catalog.entry_files(name) != recorded:
            changed.append(name)
    return changed


def check_owned(catalog: Catalog, stage: Stage, manifest: dict[str, dict]) -> None:
    """Refuse to replace an entry (or a file inside one) that the pipeline did not write.

    Raises :class:`OutputError` in one line naming the foreign entry.
    """
    for name in stage_entries(catalog, stage):
        files = catalog.entry_files(name)
        if files is None:
            continue
        where = store.join(catalog.root, name)
        entry = manifest.get(name)
        if entry is None:
            raise OutputError(
                f"{where} exists but was not written by this pipeline (it is not in "
                f"{catalog.manifest}), and stage '{stage.name}' writes there. Move it "
                "away or choose another output.dir."
            )
        recorded = entry.get("files")
        foreign = sorted(set(files) - set(recorded)) if recorded and "" not in files else []
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise OutputError(
                f"{store.join(where, foreign[0])}{more} was not written by this pipeline, "
                f"and stage '{stage.name}' replaces {where} whole. Move it out, then rerun."
            )


def stage_statuses(cfg: Config, plan: RunPlan) -> dict[str, StageStatus]:
    """Every stage's status against the current config and inputs, in pipeline order.

    A stage is up to date when its marker's key equals the key it would get now (which
    chains in its upstream's current key) and its outputs exist.
    """
    catalog = plan.catalog
    manifest = owned_entries(catalog)
    statuses: dict[str, StageStatus] = {}
    upstream_key = None
    for stage in STAGES:
        record = stage_record(cfg, plan, stage, upstream_key)
        key = record_key(stage.name, record)
        marker = catalog.read_marker(stage.name)
        reasons: list[str] = []
        if marker is not None and marker["key"] != key:
            reasons += record_changes(marker.get("record") or {}, record, stage.upstream) or [
                "its marker was written by another version"
            ]
        if stage.upstream and not statuses[stage.upstream].up_to_date:
            reasons = [r for r in reasons if not r.startswith("its upstream")]
            reasons.append(f"its upstream '{stage.upstream}' would run")
        elif marker is None:
            reasons.append("no completed run in the output folder")
        if not reasons:
            missing = _missing_outputs(catalog, stage)
            if missing:
                reasons.append(f"output(s) missing: {', '.join(missing)}")
            elif changed := _changed_outputs(catalog, stage, manifest):
                reasons.append(f"output(s) changed since it ran: {', '.join(changed)}")
        statuses[stage.name] = StageStatus(stage.name, key, not reasons, tuple(reasons))
        upstream_key = key
    return statuses


def check_upstream(statuses: dict[str, StageStatus], requested: tuple[str, ...]) -> None:
    """Refuse to run ``requested`` stages over an upstream that does not match the config.

    Raises :class:`StageOrderError` naming the first stale stage, what changed, and the
    command that fixes it.
    """
    first = STAGE_NAMES.index(requested[0])
    for name in STAGE_NAMES[:first]:
        status = statuses[name]
        if status.up_to_date:
            continue
        needed = ", ".join(f"'{s}'" for s in requested)
        fix = f"Run 'pipeline {name}' (or 'pipeline run') first"
        if "changed" in status.reasons[0]:
            fix += ", or use the values it ran with"
        raise StageOrderError(
            f"Stage {needed} needs '{name}' up to date, but {status.reasons[0]}. {fix}."
        )


def check_inputs(cfg: Config) -> None:
    """The inputs must exist before anything is created in the output folder."""
    inputs = cfg.input
    if not Path(inputs.objects_csv).is_file():
        raise MissingInputError(
            f"Objects CSV {Path(inputs.objects_csv).absolute()} does not exist. "
            "Set input.objects_csv."
        )
    if inputs.embeddings_matrix:
        if not Path(inputs.embeddings_matrix).is_file():
            raise MissingInputError(
                f"Embeddings matrix {Path(inputs.embeddings_matrix).absolute()} does not exist. "
                "Set input.embeddings_matrix."
            )
    elif not Path(inputs.embeddings_root).is_dir():
        raise MissingInputError(
            f"Embeddings root {Path(inputs.embeddings_root).absolute()} does not exist. "
            "Set input.embeddings_root."
        )


# --------------------------------------------------------------------------- run


def run(
    cfg: Config,
    stages: tuple[str, ...] = STAGE_NAMES,
    force: bool = False,
    plan: RunPlan | None = None,
    verbose: bool = False,
) -> RunResult:
    """Run ``stages`` (in pipeline order) and return what happened.

    With all stages (``pipeline run``) every stage whose outputs do not match the config
    and inputs is redone, with everything after it; up-to-date stages are skipped unless
    ``force``. With a subset (a single-stage command), the stages before it must be up to
    date, else :class:`StageOrderError` says what changed. ``verbose`` prints progress
    bars and the summary (the CLI sets it; the API is silent by default).
    """
    plan = plan or plan_run(cfg, stages)
    catalog = plan.catalog
    for warning in plan.warnings:
        log.warning("%s", warning)
    if "ingest" in plan.stages:
        check_inputs(cfg)
    store.check_writable(catalog.root, "output.dir")
    with output_lock(catalog.root, plan.run_id):
        return _run_locked(cfg, plan, force, verbose)


#: Errors of a full disk or a file-size limit: reported in one line, not as a traceback.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextmanager
def _one_line_faults(stage: str) -> Iterator[None]:
    """Turn Ctrl-C and a full disk inside a stage into one-line errors naming the stage.

    Nothing is lost either way: the stage's outputs were being written to temporaries and
    its marker was cleared, so a rerun redoes it and keeps what completed before.
    """
    try:
        yield
    except KeyboardInterrupt:
        raise InterruptedRunError(
            f"Interrupted during {stage}; completed stages are kept. Rerun to continue."
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise OutputError(
            f"No space left while running {stage}{where}: {exc.strerror}. Free space on the "
            "output (or staging) disk, or choose another output.dir / output.staging_dir, "
            "then rerun to continue."
        ) from None


def _run_locked(cfg: Config, plan: RunPlan, force: bool, verbose: bool) -> RunResult:
    """The body of :func:`run`, with the output folder held by this run."""
    catalog = plan.catalog
    result = RunResult(catalog=catalog)
    statuses = stage_statuses(cfg, plan)
    if plan.stages != STAGE_NAMES:
        check_upstream(statuses, plan.stages)
    if "ingest" in plan.stages:
        store.check_writable(catalog.staging, "output.staging_dir")
        if force or not statuses["ingest"].up_to_date:
            check_free_space(cfg, plan)
        # Staging files of this output folder left by killed runs (we hold its lock).
        store.remove_stale_temporaries(catalog.staging, ("embeddings",), suffix=".f32")
        store.remove_stale_temporaries(catalog.staging, ("objects",), suffix=".arrow")
        store.remove_stale_temporaries(catalog.staging, ("parts",))
    if "postprocess" in plan.stages:
        store.remove_stale_temporaries(catalog.staging, ("postprocess",))
    if "report" in plan.stages:
        store.remove_stale_temporaries(catalog.staging, ("report",))
    store.remove_stale_temporaries(catalog.root, catalog.owned_names())
    store.remove_stale_temporaries(catalog.markers, tuple(f"{name}.json" for name in STAGE_NAMES))
    metadata = run_metadata(cfg)
    manifest = owned_entries(catalog)
    upstream_key = None
    with store.run_scope(plan.run_id), open_executor(cfg.executor, plan.workers, verbose) as ex:
        context = StageContext(plan=plan, executor=ex, metadata=metadata, verbose=verbose)
        for name in STAGE_NAMES:
            stage = BY_NAME[name]
            status = statuses[name]
            if name not in plan.stages:
                upstream_key = status.key
                continue
            record = stage_record(cfg, plan, stage, upstream_key)
            key = record_key(name, record)
            upstream_key = key
            if not force and status.up_to_date and status.key == key:
                log.info("%s: up to date (marker %s), skipped", name, key)
                result.skipped.append(name)
                continue
            if not force:
                log.info("%s: runs because %s", name, "; ".join(status.reasons))
            check_owned(catalog, stage, manifest)
            # Its outputs are about to change: neither it nor any stage after it is complete.
            for later in downstream_of(name):
                catalog.clear_marker(later)
            entries = stage_entries(catalog, stage)
            for entry in entries:  # ours from now on, files unknown until it finishes
                manifest[entry] = {"stage": name, "run_id": plan.run_id, "files": None}
            catalog.write_manifest(manifest)
            sections = {section: getattr(cfg, section) for section in stage.reads}
            function = stage.load()  # imports its module: not part of the stage's time
            with timed(name, result.timings), _one_line_faults(name):
                out = function(context, **sections)
            release_memory()
            # The inputs as the stage leaves them: an input file that changed while the
            # stage read it must not be marked as read. (The embedding files are known
            # only from the list the ingest itself just wrote: recorded as they are now.)
            after = stage_record(cfg, plan, stage, record["upstream"])
            for input_key, before in record["inputs"].items():
                if input_key == "input.embeddings_root":
                    continue
                if before is not None and after["inputs"][input_key] != before:
                    raise InputError(
                        f"{input_key} changed while {name} was reading it; rerun to read "
                        "the new contents."
                    )
            record, key = after, record_key(name, after)
            upstream_key = key
            if name == "postprocess":
                result.funnel = out
            for entry in entries:
                manifest[entry]["files"] = catalog.entry_files(entry)
            catalog.write_manifest(manifest)
            catalog.write_marker(
                name,
                {
                    "stage": name,
                    "key": key,
                    "record": record,
                    "run_id": plan.run_id,
                    "finished_at": time.time(),
                    "seconds": result.timings[name],
                },
            )
    result.executor_kind, result.worker_transitions = ex.kind, ex.worker_transitions
    return result


def release_memory() -> None:
    """Give the memory a stage freed back to the system before the next stage starts:
    Python's cycles, Arrow's pool and glibc's free lists. Without it a whole run's peak
    was what the earlier stages left cached in the allocators plus the next stage's own
    (729 MiB at 1M rows, against 439 MiB for the largest stage alone)."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def input_shape(cfg: Config, catalog: Catalog) -> tuple[int, int, str]:
    """``(rows, dim, source)`` of the data: from the store once ingested, else counted
    from the inputs (CSV lines, the dimension from ``ingest.dim`` or the first file)."""
    if catalog.exists(catalog.store):
        n_rows, dim, _ = catalog.store_shape()
        return n_rows, dim, "the ingested store"
    check_inputs(cfg)
    with open(cfg.input.objects_csv, "rb") as handle:
        n_rows = max(
            0, sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b"")) - 1
        )
    dim = cfg.ingest.dim
    if dim is None:
        first = cfg.input.embeddings_matrix or next(
            (str(p) for p in Path(cfg.input.embeddings_root).rglob("*.npy")), None
        )
        try:
            dim = int(np.load(first, mmap_mode="r", allow_pickle=False).shape[1]) if first else 0
        except Exception:  # any unreadable file: the estimate says so instead of failing
            dim = 0
    return n_rows, dim, "the input CSV (rows before rejects)"


def check_free_space(cfg: Config, plan: RunPlan) -> None:
    """Before ingest, the staging memmap and the store must fit on their disks (estimated
    from the CSV's rows and the dimension), so a full disk is found before the work."""
    n_rows, dim, _ = input_shape(cfg, plan.catalog)
    vectors = n_rows * dim * 4
    need: dict[int, int] = {}  # bytes per device: staging and output may share one
    for key, folder in (("output.staging_dir", plan.catalog.staging),
                        ("output.dir", plan.catalog.root)):  # fmt: skip
        if not store.is_local(folder):
            continue
        device = os.stat(folder).st_dev
        need[device] = need.get(device, 0) + vectors
        free = shutil.disk_usage(folder).free
        if free < need[device]:
            raise OutputError(
                f"{key} {folder} has {_mib(free)} free; the ingest of {n_rows:,} x {dim} "
                f"vectors needs about {_mib(need[device])} there (staging memmap and store). "
                f"Free space or choose another {key}."
            )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:,.1f} GiB"


def describe_plan(cfg: Config, plan: RunPlan, force: bool = False) -> str:
    """What ``--dry-run`` prints: the plan, then one line per stage saying whether it
    would run and why, with its estimated peak memory and disk."""
    statuses = stage_statuses(cfg, plan)
    n_rows, dim, source = input_shape(cfg, plan.catalog)
    k = effective_n_clusters(cfg.train, max(n_rows, 1))
    estimates = estimate_resources(max(n_rows, 1), max(dim, 1), plan.chunk_rows, k,
                                   plan.workers.n_workers)  # fmt: skip
    lines = [repr(plan), f"  shape: {n_rows:,} rows x {dim} dims (from {source}), k = {k}"]
    for name in STAGE_NAMES:
        status = statuses[name]
        if name not in plan.stages:
            state = "not requested" + ("" if status.up_to_date else f" ({status.describe()})")
        elif force:
            state = "would run: --force"
        else:
            state = status.describe()
        e = estimates[name]
        lines.append(
            f"  {name:<12} peak ~{_mib(e.peak_bytes)}, disk ~{_mib(e.disk_bytes)}: {state}"
        )
    if plan.catalog.exists(plan.catalog.store):
        shape = plan.catalog.store_shape()
        try:
            lines.append(repr(plan_training(cfg.train, *shape, plan.blas_threads)))
        except PipelineError as exc:
            lines.append(f"TrainPlan: {exc}")
    else:
        lines.append("TrainPlan: known after ingest (the store does not exist yet)")
    return "\n".join(lines)


def measure_gflops_per_core(dim: int, k: int) -> float:
    """This machine's float32 GEMM rate per core for the ``(8192, dim) @ (dim, k)``
    products that predict and the fit make (a few tenths of a second)."""
    from .plan import local_cores

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8192, min(dim, 4096)), dtype=np.float32)
    b = rng.standard_normal((min(dim, 4096), min(k, 4096)), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(7):  # the best run: other load on the machine only slows some down
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9 / local_cores()


def describe_scale(
    cfg: Config, n_rows: int, dim: int, n_clusters: int, n_workers: int, threads: int,
    gflops_per_core: float | None = None,
) -> str:  # fmt: skip
    """What ``--dry-run --rows N --dims D`` prints: each stage's estimated time, peak
    memory and disk at that scale, from rates measured on this machine (no data read)."""
    from .plan import estimate_at_scale, refine_iterations, sampled_blocks

    rate = gflops_per_core or measure_gflops_per_core(dim, n_clusters)
    source = "given" if gflops_per_core else "measured here"
    on_workers = cfg.ingest.on_workers is True or (
        cfg.ingest.on_workers == "auto"
        and (n_workers > 1 or cfg.executor.scheduler not in ("threads", "processes", "synchronous"))
    )
    estimates = estimate_at_scale(cfg.train, n_rows, dim, n_clusters, n_workers, threads,
                                  cfg.ingest.chunk_rows, rate, on_workers)  # fmt: skip
    chunk_rows = max(1, min(cfg.ingest.chunk_rows, n_rows))
    n_blocks = math.ceil(n_rows / chunk_rows)
    refine = refine_iterations(cfg.train, n_rows, min(cfg.train.batch_size, chunk_rows))
    lines = [
        f"scale: {n_rows:,} rows x {dim} dims ({_mib(n_rows * dim * 4)} of vectors), "
        f"k = {n_clusters}, {n_workers} worker(s) x {threads} core(s); train.strategy "
        f"{cfg.train.strategy} (chain over {sampled_blocks(cfg.train, n_blocks):,} of "
        f"{n_blocks:,} blocks x {cfg.train.epochs} epoch(s), {refine} "
        f"refinement pass(es)); ingest {'on the workers' if on_workers else 'on the client'}; "
        f"GEMM {source}: {rate:.0f} GFLOP/s per core",
        f"  {'stage':<12} {'time':>10} {'peak memory':>12} {'disk':>10}  bound by",
    ]
    for name, e in estimates.items():
        lines.append(f"  {name:<12} {_duration(e.seconds):>10} {_mib(e.peak_bytes):>12} "
                     f"{_mib(e.disk_bytes):>10}  {e.bound}")  # fmt: skip
    total = sum(e.seconds for e in estimates.values())
    slowest = max(estimates, key=lambda name: estimates[name].seconds)
    lines.append(f"  {'whole run':<12} {_duration(total):>10}  (the largest: {slowest})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
