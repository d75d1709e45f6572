"""Stage 1: objects CSV + embedding files -> memmap (CSV order) -> shuffled Zarr store.

The one stage that streams its input instead of returning lazy dask objects: it reads each
embedding file once, writes the vectors into a ``numpy.memmap`` in CSV order (the
write-up's method), then mirrors the memmap into the Zarr store in a seeded random row
order, one whole chunk at a time, with the row-aligned objects table beside it. Peak
memory is a few chunks, whatever the number of rows.

Per-object problems (bad bbox, missing file, wrong dimension, NaN, ...) send the object to
``rejects.parquet`` with a reason, or stop the run when ``ingest.on_bad_object: fail``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from . import schema, sinks, store
from .config import Config
from .errors import InputError, MissingInputError, must_be
from .plan import OutputPaths

#: Reasons an input row is not clustered, in the order they are checked.
REJECT_REASONS = (
    "missing_key",
    "bad_score",
    "bad_idx",
    "bad_bbox",
    "duplicate_object",
    "not_selected:tag",
    "not_selected:score",
    "missing_user_folder",
    "missing_embedding_file",
    "corrupt_embedding_file",
    "wrong_dimension",
    "wrong_dtype",
    "idx_out_of_range",
    "non_finite_vector",
    "zero_vector",
)
_FILES_PER_TASK = 64
_COPY_BYTES = 32 << 20  # rows copied per step from a single matrix file


@dataclass(frozen=True)
class IngestResult:
    """Counts of one ingest; every input row is either ingested or rejected."""

    n_input_rows: int
    n_rows: int
    dim: int
    chunk_rows: int
    rejected: dict[str, int]

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


# --------------------------------------------------------------------------- CSV


def read_objects_csv(path: str) -> pd.DataFrame:
    """Read the objects CSV with every column as text (values are checked afterwards).

    Raises a one-line :class:`InputError` for an empty, unparsable or incomplete file.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"Objects CSV {path} does not exist. Set input.objects_csv.")
    if p.stat().st_size == 0:
        raise InputError(f"Objects CSV {path} is empty. It needs a header and one row per object.")
    try:
        with p.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"Objects CSV {path}: the header cannot be read ({exc}).") from None
    missing = [c for c in schema.REQUIRED_INPUT_COLUMNS if c not in header]
    if missing:
        raise InputError(
            f"Objects CSV {path} is missing required column(s) {missing}. "
            f"Required: {list(schema.REQUIRED_INPUT_COLUMNS)}; found: {header}."
        )
    if len(set(header)) != len(header):
        dupes = sorted({c for c in header if header.count(c) > 1})
        raise InputError(f"Objects CSV {path} has duplicate column name(s) {dupes}.")
    try:
        table = pacsv.read_csv(
            p,
            parse_options=pacsv.ParseOptions(newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"Objects CSV {path} cannot be parsed: {first}") from None
    if table.num_rows == 0:
        raise InputError(f"Objects CSV {path} has a header but no rows.")
    return table.to_pandas()


def _parse_bbox(text: str) -> bool:
    try:
        box = json.loads(text)
    except (ValueError, TypeError):
        return False
    if not isinstance(box, list) or len(box) != 4:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return False
    x1, y1, x2, y2 = box
    return all(math.isfinite(v) for v in box) and x2 >= x1 and y2 >= y1


def validate_rows(raw: pd.DataFrame, cfg: Config) -> tuple[pd.DataFrame, pd.Series]:
    """Type the columns and give each row a reject reason (empty string = fine).

    Returns the typed frame (``score`` float, ``idx`` int, extra columns as text) and the
    reasons, aligned with ``raw``.
    """
    n = len(raw)
    reason = pd.Series("", index=raw.index, dtype=object)

    def mark(mask: pd.Series | np.ndarray, why: str) -> None:
        reason[(reason == "") & mask] = why

    mark((raw["username"].str.strip() == "") | (raw["image_name"].str.strip() == ""), "missing_key")
    score = pd.to_numeric(raw["score"], errors="coerce")
    mark(~np.isfinite(score.to_numpy(dtype=float, na_value=np.nan)), "bad_score")
    idx_num = pd.to_numeric(raw["idx"], errors="coerce")
    idx_ok = np.isfinite(idx_num.to_numpy(dtype=float, na_value=np.nan))
    idx_vals = idx_num.to_numpy(dtype=float, na_value=-1.0)
    idx_ok &= (idx_vals >= 0) & (idx_vals == np.floor(idx_vals))
    mark(~idx_ok, "bad_idx")
    bbox_ok = np.fromiter((_parse_bbox(s) for s in raw["bbox"]), dtype=bool, count=n)
    mark(~bbox_ok, "bad_bbox")

    typed = raw.copy()
    typed["score"] = score.astype("float64")
    typed["idx"] = np.where(idx_ok, idx_vals, -1).astype("int64")
    clean = reason == ""
    dup = typed[clean].duplicated(subset=["username", "image_name", "idx"], keep="first")
    mark(dup.reindex(raw.index, fill_value=False), "duplicate_object")

    sel = cfg.select
    if sel.tags is not None:
        mark(~typed["tag"].isin(sel.tags), "not_selected:tag")
    if sel.exclude_tags:
        mark(typed["tag"].isin(sel.exclude_tags), "not_selected:tag")
    mark(typed["score"].fillna(-1.0) < sel.min_score, "not_selected:score")
    return typed, reason


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class _FileJob:
    path: str
    user_dir: str
    positions: np.ndarray  # candidate positions (= object ids) of this file's objects
    idx: np.ndarray  # row of each object inside the file


def _load_file(job: _FileJob, dim: int) -> tuple[np.ndarray | None, np.ndarray, str]:
    """Vectors of one file's objects plus a reason per object ('' = fine) and a detail."""
    n = len(job.idx)
    reasons = np.full(n, "", dtype=object)
    if not os.path.exists(job.path):
        why = "missing_user_folder" if not os.path.isdir(job.user_dir) else "missing_embedding_file"
        reasons[:] = why
        return None, reasons, job.path
    try:
        array = np.load(job.path, allow_pickle=False)
    except Exception as exc:  # truncated header, bad magic, short data: all "corrupt"
        reasons[:] = "corrupt_embedding_file"
        return None, reasons, f"{job.path}: {type(exc).__name__}: {exc}"[:300]
    if array.ndim != 2 or array.shape[1] != dim:
        reasons[:] = "wrong_dimension"
        return None, reasons, f"{job.path}: shape {array.shape}, expected (n, {dim})"
    if array.dtype.kind != "f":
        reasons[:] = "wrong_dtype"
        return None, reasons, f"{job.path}: dtype {array.dtype}, expected a float type"
    in_range = job.idx < array.shape[0]
    reasons[~in_range] = "idx_out_of_range"
    vectors = np.zeros((n, dim), dtype=np.float32)
    vectors[in_range] = array[job.idx[in_range]]
    return vectors, reasons, f"{job.path}: {array.shape[0]} rows"


def _check_vectors(vectors: np.ndarray, reasons: np.ndarray) -> None:
    finite = np.isfinite(vectors).all(axis=1)
    reasons[(reasons == "") & ~finite] = "non_finite_vector"
    nonzero = (vectors != 0).any(axis=1)
    reasons[(reasons == "") & ~nonzero] = "zero_vector"


def _file_jobs(objects: pd.DataFrame, cfg: Config) -> list[_FileJob]:
    root = Path(cfg.input.embeddings_root)
    template = cfg.input.embeddings_template
    keys = ["username", "image_name", "batch_folder", "res_name"]
    jobs = []
    positions = objects["object_id"].to_numpy()
    idx = objects["idx"].to_numpy()
    # ``sort=False`` keeps CSV order, so files are read in the order they were written.
    for key, rows in objects.groupby(keys, sort=False).indices.items():
        fields = dict(zip(keys, key, strict=True))
        path = root / template.format(**fields)
        jobs.append(
            _FileJob(
                path=str(path),
                user_dir=str(root / fields["username"]),
                positions=positions[rows],
                idx=idx[rows],
            )
        )
    return jobs


def _infer_dim(jobs: list[_FileJob]) -> int:
    for job in jobs[:1000]:
        try:
            array = np.load(job.path, mmap_mode="r", allow_pickle=False)
        except Exception:
            continue
        if array.ndim == 2 and array.dtype.kind == "f":
            return int(array.shape[1])
    raise InputError(
        "Cannot infer the embedding dimension: none of the first embedding files is a 2-D "
        "float .npy. Check input.embeddings_root and input.embeddings_template, or set ingest.dim."
    )


def _batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _load_many(jobs: list[_FileJob], dim: int) -> list[tuple[_FileJob, np.ndarray | None, np.ndarray, str]]:
    out = []
    for job in jobs:
        vectors, reasons, detail = _load_file(job, dim)
        if vectors is not None:
            _check_vectors(vectors, reasons)
        out.append((job, vectors, reasons, detail))
    return out


def fill_memmap_from_files(
    objects: pd.DataFrame, cfg: Config, memmap: np.memmap, dim: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Read every embedding file once (threads) and write its rows at their object ids.

    Returns the reason per object ('' = ingested) and a detail string per object.
    """
    n = len(objects)
    reasons = np.full(n, "", dtype=object)
    details = np.full(n, "", dtype=object)
    jobs = _file_jobs(objects, cfg)
    bar = tqdm(total=len(jobs), desc="ingest: read embeddings", unit="file", disable=not progress)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for results in pool.map(lambda b: _load_many(b, dim), _batched(jobs, _FILES_PER_TASK)):
            for job, vectors, file_reasons, detail in results:
                if vectors is not None:
                    memmap[job.positions] = vectors
                reasons[job.positions] = file_reasons
                details[job.positions] = detail
            bar.update(len(results))
    bar.close()
    return reasons, details


def open_matrix(path: str, n_csv_rows: int) -> np.ndarray:
    """Open a CSV-aligned ``.npy`` matrix read-only (memory-mapped) and check its shape."""
    if not Path(path).is_file():
        raise MissingInputError(f"Embeddings matrix {path} does not exist. Set input.embeddings_matrix.")
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise InputError(f"Embeddings matrix {path} cannot be read as .npy ({exc}).") from None
    if matrix.ndim != 2 or matrix.dtype.kind != "f":
        raise InputError(
            must_be(f"Embeddings matrix {path}", "a 2-D float array", f"{matrix.dtype} {matrix.shape}")
        )
    if matrix.shape[0] != n_csv_rows:
        raise InputError(
            must_be(
                f"The row count of embeddings matrix {path}",
                f"the CSV's data row count ({n_csv_rows:,}), one vector per CSV row",
                matrix.shape[0],
            )
        )
    return matrix


def fill_memmap_from_matrix(
    objects: pd.DataFrame, matrix: np.ndarray, memmap: np.memmap, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Copy the selected rows of a CSV-aligned matrix into the memmap, block by block."""
    n = len(objects)
    reasons = np.full(n, "", dtype=object)
    source = objects["source_row"].to_numpy()
    step = max(1, _COPY_BYTES // (4 * memmap.shape[1]))
    for start in tqdm(range(0, n, step), desc="ingest: copy matrix", disable=not progress):
        block = np.asarray(matrix[source[start : start + step]], dtype=np.float32)
        _check_vectors(block, reasons[start : start + step])
        memmap[start : start + step] = block
    return reasons, np.full(n, "", dtype=object)


def _fail_on_first_bad(
    cfg: Config,
    reasons: pd.Series,
    candidates: pd.DataFrame,
    emb_reasons: np.ndarray,
    details: np.ndarray,
) -> None:
    """With ``ingest.on_bad_object: fail``, turn the first bad row into an error."""
    rows = [
        (int(row), why, "")
        for row, why in reasons.items()
        if why and not why.startswith("not_selected")
    ][:1]
    bad = np.flatnonzero(emb_reasons != "")[:1]
    rows += [(int(candidates["source_row"].iloc[i]), emb_reasons[i], details[i]) for i in bad]
    if rows:
        row, why, detail = min(rows)
        detail = f" ({detail})" if detail else ""
        raise InputError(
            f"{cfg.input.objects_csv} data row {row}: {why}{detail}. "
            "Fix the input or set ingest.on_bad_object to 'reject' to skip such rows."
        )


# --------------------------------------------------------------------------- store


def _open_memmap(path: str, n_rows: int, dim: int) -> np.memmap:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return np.memmap(path, dtype=np.float32, mode="w+", shape=(max(n_rows, 1), dim))


def mirror_to_store(
    memmap: np.ndarray,
    objects: pd.DataFrame,
    store_ids: np.ndarray,
    store_url: str,
    objects_url: str,
    chunk_rows: int,
    compression: str,
    attrs: dict,
    progress: bool,
) -> None:
    """Copy memmap rows into the Zarr store in ``store_ids`` order, one chunk per task.

    Each chunk's rows are gathered in sorted file order (sequential reads) and put back in
    shuffled order in memory, then written as one whole chunk (no read-modify-write). The
    objects of each chunk go to ``part-<chunk>.parquet`` beside it, so the objects table
    is row-aligned with the store and its partitions match the store's blocks.
    """
    n_rows, dim = len(store_ids), memmap.shape[1]
    by_id = objects.set_index("object_id", drop=False)
    with store.atomic_path(store_url) as tmp_store, store.atomic_path(objects_url) as tmp_objects:
        group = store.create_store(tmp_store, n_rows, dim, chunk_rows, compression, attrs)
        vectors, ids_array = group[store.VECTORS], group[store.OBJECT_IDS]
        fs, tmp_objects_path = store.filesystem(tmp_objects)
        fs.makedirs(tmp_objects_path, exist_ok=True)
        n_chunks = math.ceil(n_rows / chunk_rows)

        def write_chunk(c: int) -> None:
            start, stop = c * chunk_rows, min((c + 1) * chunk_rows, n_rows)
            ids = store_ids[start:stop]
            order = np.argsort(ids, kind="stable")
            block = np.empty((len(ids), dim), dtype=np.float32)
            block[order] = memmap[ids[order]]
            vectors[start:stop] = block
            ids_array[start:stop] = ids
            sinks.write_parquet(
                by_id.loc[ids].reset_index(drop=True),
                store.join(tmp_objects, f"part-{c:05d}.parquet"),
                schema.OBJECTS_SCHEMA,
            )

        with ThreadPoolExecutor(max_workers=2) as pool:
            for _ in tqdm(
                pool.map(write_chunk, range(n_chunks)),
                total=n_chunks,
                desc="ingest: write zarr",
                unit="chunk",
                disable=not progress,
            ):
                pass


def ingest(cfg: Config, paths: OutputPaths, progress: bool = True) -> IngestResult:
    """Run the ingest stage and return its counts (outputs are written under ``paths``)."""
    raw = read_objects_csv(cfg.input.objects_csv)
    typed, reasons = validate_rows(raw, cfg)
    typed.insert(0, schema.SOURCE_ROW, np.arange(len(typed), dtype=np.int64))
    candidates = typed[reasons.to_numpy() == ""].copy()
    candidates.insert(0, schema.OBJECT_ID, np.arange(len(candidates), dtype=np.int64))
    if len(candidates) == 0:
        raise InputError(
            f"No object of {cfg.input.objects_csv} passed validation and selection "
            f"({len(raw):,} rows). Check select.* and the rejects reasons."
        )

    if cfg.input.embeddings_matrix:
        matrix = open_matrix(cfg.input.embeddings_matrix, len(raw))
        dim = int(matrix.shape[1])
    else:
        root = Path(cfg.input.embeddings_root)
        if not root.is_dir():
            raise MissingInputError(
                f"Embeddings root {root} does not exist. Set input.embeddings_root."
            )
        dim = _infer_dim(_file_jobs(candidates.head(5000), cfg))
    if cfg.ingest.dim is not None and cfg.ingest.dim != dim and cfg.input.embeddings_matrix:
        raise InputError(must_be(f"The dimension of {cfg.input.embeddings_matrix}", f"ingest.dim ({cfg.ingest.dim})", dim))
    dim = cfg.ingest.dim or dim

    memmap = _open_memmap(paths.memmap, len(candidates), dim)
    if cfg.input.embeddings_matrix:
        emb_reasons, details = fill_memmap_from_matrix(candidates, matrix, memmap, progress)
    else:
        emb_reasons, details = fill_memmap_from_files(candidates, cfg, memmap, dim, progress)
    memmap.flush()

    bad = emb_reasons != ""
    if cfg.ingest.on_bad_object == "fail":
        _fail_on_first_bad(cfg, reasons, candidates, emb_reasons, details)

    rejects = _rejects_table(raw, reasons, candidates, emb_reasons, details)
    objects = candidates[~bad]
    n_rows = len(objects)
    if n_rows == 0:
        raise InputError(
            f"No object of {cfg.input.objects_csv} has a usable embedding "
            f"({len(rejects):,} rejected; most common reason "
            f"{rejects['reason'].value_counts().index[0]!r}). See {paths.rejects}."
        )
    shuffle_seed = cfg.ingest.shuffle_seed if cfg.ingest.shuffle_seed is not None else cfg.train.seed
    permutation = np.random.default_rng(shuffle_seed).permutation(n_rows)
    store_ids = objects["object_id"].to_numpy()[permutation]
    chunk_rows = min(cfg.ingest.chunk_rows, n_rows)
    attrs = {
        "n_rows": n_rows,
        "dim": dim,
        "chunk_rows": chunk_rows,
        "shuffle_seed": shuffle_seed,
        "objects_csv": cfg.input.objects_csv,
        "config": cfg.model_dump(mode="json"),
        "versions": sinks.package_versions(),
    }
    mirror_to_store(
        memmap, objects, store_ids, paths.store, paths.objects, chunk_rows,
        cfg.ingest.compression, attrs, progress,
    )  # fmt: skip
    del memmap
    if not cfg.ingest.keep_memmap:
        Path(paths.memmap).unlink(missing_ok=True)
    sinks.write_parquet(rejects, paths.rejects, schema.REJECTS_SCHEMA)
    result = IngestResult(
        n_input_rows=len(raw),
        n_rows=n_rows,
        dim=dim,
        chunk_rows=chunk_rows,
        rejected={k: int(v) for k, v in rejects["reason"].value_counts().sort_index().items()},
    )
    sinks.write_json(
        {**result.__dict__, "n_rejected": result.n_rejected, "memmap": paths.memmap},
        paths.ingest_summary,
    )
    return result


def _rejects_table(
    raw: pd.DataFrame,
    reasons: pd.Series,
    candidates: pd.DataFrame,
    emb_reasons: np.ndarray,
    details: np.ndarray,
) -> pd.DataFrame:
    early = raw[reasons.to_numpy() != ""]
    bad = emb_reasons != ""
    late = candidates[bad]
    frames = [
        pd.DataFrame(
            {
                "source_row": early.index.to_numpy(dtype=np.int64),
                "reason": reasons[reasons != ""].to_numpy(),
                "detail": [""] * len(early),
                "username": early["username"].to_numpy(),
                "image_name": early["image_name"].to_numpy(),
                "idx": early["idx"].to_numpy(),
            }
        ),
        pd.DataFrame(
            {
                "source_row": late["source_row"].to_numpy(),
                "reason": emb_reasons[bad],
                "detail": details[bad],
                "username": late["username"].to_numpy(),
                "image_name": late["image_name"].to_numpy(),
                "idx": late["idx"].astype(str).to_numpy(),
            }
        ),
    ]
    out = pd.concat(frames, ignore_index=True).sort_values("source_row", kind="stable")
    return out.reset_index(drop=True).astype(
        {"reason": str, "detail": str, "username": str, "image_name": str, "idx": str}
    )
