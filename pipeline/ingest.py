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
import hashlib
import json
import math
import os
import re
import string
import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
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
_DIM_SAMPLE_FILES = 200  # files whose width votes for the dimension
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

#: Columns the pipeline adds to its tables: an input column of that name would clash.
RESERVED_COLUMNS = (
    schema.OBJECT_ID,
    schema.SOURCE_ROW,
    schema.STATUS,
    *(f.name for f in schema.ASSIGNMENT_FIELDS),
)
_OBJECT_KEY = ["username", "image_name", "idx"]
_MAX_IDX = 2**53  # larger values do not survive the float parse exactly
_BBOX_RULE = "a JSON list [x1, y1, x2, y2] of finite numbers with x1 <= x2 and y1 <= y2"


def clip(text: str, limit: int = 60) -> str:
    """Shorten a bad value for a one-line message.

    >>> clip("x" * 100, 10)
    'xxxxxxx...'
    """
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_problem(path: Path, exc: pa.ArrowException) -> str:
    """What breaks the file, naming its first bad line where possible; called only once
    pyarrow failed, so the extra passes over the file cost nothing on good input."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                got = line[max(0, bad.start - 20) : bad.end + 20]
                return f"line {number} must be UTF-8 text. Got {got!r} instead. Save it as UTF-8."
    found: list[pacsv.InvalidRow] = []

    def keep(row: pacsv.InvalidRow) -> str:
        found.append(row)
        return "error"

    try:  # single-threaded: only then does pyarrow know the line number of a bad row
        pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=False, invalid_row_handler=keep),
        )
    except pa.ArrowException:
        pass
    if found:
        row = found[0]
        return (
            f"line {row.number} must have {row.expected_columns} fields like the header. "
            f"Got {row.actual_columns} ({clip(row.text)!r}) instead. Fix or remove that line."
        )
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"cannot be parsed: {clip(first, 200)}"


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
        with p.open(newline="", encoding="utf-8-sig") as handle:
            lines = csv.reader(handle)
            header, first_row = next(lines, []), next(lines, None)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"Objects CSV {path}: its first lines cannot be read ({exc}).") from None
    if first_row is None:
        raise InputError(f"Objects CSV {path} has a header but no rows.")
    missing = [c for c in schema.REQUIRED_INPUT_COLUMNS if c not in header]
    if missing:
        raise InputError(
            f"Objects CSV {path} is missing required column(s) {missing}. "
            f"Required: {list(schema.REQUIRED_INPUT_COLUMNS)}; "
            f"found: {[clip(c) for c in header[:20]]}."
        )
    if len(set(header)) != len(header):
        dupes = sorted({c for c in header if header.count(c) > 1})
        raise InputError(f"Objects CSV {path} has duplicate column name(s) {dupes}. Rename them.")
    reserved = [c for c in header if c in RESERVED_COLUMNS]
    if reserved:
        raise InputError(
            f"Objects CSV {path} has column(s) {reserved}, which the pipeline adds to its "
            "outputs. Rename or drop them."
        )
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
    except pa.ArrowException as exc:
        raise InputError(f"Objects CSV {path} {_parse_problem(p, exc)}") from None
    if table.column_names != header:
        raise InputError(
            f"Objects CSV {path}: the header cannot be read consistently "
            f"(found {[clip(c) for c in table.column_names[:20]]}). Check its quoting."
        )
    if table.num_rows == 0:
        raise InputError(f"Objects CSV {path} has a header but no rows.")
    return table.to_pandas()


def _is_bbox(text: str) -> bool:
    try:
        box = json.loads(text)
        if not isinstance(box, list) or len(box) != 4 or any(isinstance(v, bool) for v in box):
            return False
        x1, y1, x2, y2 = (float(v) for v in box)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return False
    return all(math.isfinite(v) for v in (x1, y1, x2, y2)) and x2 >= x1 and y2 >= y1


_JSON_NUMBER = r"\s*(?P<{}>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*"
_BBOX_PATTERN = r"^\s*\[{}\]\s*$".format(
    ",".join(_JSON_NUMBER.format(n) for n in ("x1", "y1", "x2", "y2"))
)


def valid_bboxes(texts: pd.Series) -> np.ndarray:
    """:func:`_is_bbox` for a whole column: one vectorised regular expression (pyarrow)
    for the usual ``[x1, y1, x2, y2]`` text, the JSON parser only for the rest.

    >>> valid_bboxes(pd.Series(["[1, 2, 3.5, 4e1]", "[3, 0, 1, 1]", "[1, 2, 3]", " [0,0,0,0] "])).tolist()
    [True, False, False, True]
    """
    parts = pc.extract_regex(pa.array(texts, type=pa.string()), _BBOX_PATTERN)
    matched = parts.is_valid().to_numpy(zero_copy_only=False)
    boxes = np.full((len(texts), 4), np.nan)
    for i, name in enumerate(parts.type.names):
        field = pc.struct_field(parts, name)
        boxes[:, i] = pc.cast(pc.if_else(parts.is_valid(), field, "nan"), pa.float64()).to_numpy(
            zero_copy_only=False
        )
    with np.errstate(invalid="ignore"):
        ok = (
            np.isfinite(boxes).all(axis=1)
            & (boxes[:, 2] >= boxes[:, 0])
            & (boxes[:, 3] >= boxes[:, 1])
        )
    rest = np.flatnonzero(~matched)
    ok[rest] = [_is_bbox(text) for text in texts.to_numpy(dtype=object)[rest]]
    return ok


def first_of_each_key(frame: pd.DataFrame) -> np.ndarray:
    """Position of the first row with the same (username, image_name, idx) as each row.

    Arrow's dictionary encoding of the joined key: a few bytes a row, where a pandas
    groupby over the text columns costs ~200 MB per million rows.

    >>> t = pd.DataFrame({"username": ["a", "a", "b", "a"], "image_name": ["x", "x", "x", "x"],
    ...                   "idx": [0, 0, 0, 1]})
    >>> first_of_each_key(t).tolist()
    [0, 0, 2, 3]
    """
    columns = [pa.array(frame["username"], type=pa.string()),
               pa.array(frame["image_name"], type=pa.string()),
               pc.cast(pa.array(frame["idx"].to_numpy()), pa.string())]  # fmt: skip
    key = pc.binary_join_element_wise(*columns, "\x1f")
    if isinstance(key, pa.ChunkedArray):
        key = key.combine_chunks()
    codes = key.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    return first[codes]


def validate_rows(raw: pd.DataFrame, cfg: Config) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """Type the columns and give each row a reject reason (empty string = fine).

    Returns the typed frame (``score`` float, ``idx`` int, extra columns as text), the
    reasons, and a one-line detail per rejected row naming its bad value, all aligned
    with ``raw``.
    """
    reason = pd.Series("", index=raw.index, dtype=object)
    detail = pd.Series("", index=raw.index, dtype=object)

    def mark(mask: pd.Series | np.ndarray, why: str) -> pd.Series:
        new = (reason == "") & mask
        reason[new] = why
        return new

    def explain(new: pd.Series, column: str, expected: str) -> None:
        detail[new] = [must_be(column, expected, clip(v)) for v in raw.loc[new, column]]

    for column in ("username", "image_name"):
        explain(mark(raw[column].str.strip() == "", "missing_key"), column, "non-empty")
    score = pd.to_numeric(raw["score"], errors="coerce").astype("float64")
    explain(mark(~np.isfinite(score), "bad_score"), "score", "a finite number")
    idx_vals = (
        pd.to_numeric(raw["idx"], errors="coerce").astype("float64").to_numpy(na_value=np.nan)
    )
    with np.errstate(invalid="ignore"):
        idx_ok = (idx_vals >= 0) & (idx_vals < _MAX_IDX) & (idx_vals == np.floor(idx_vals))
    explain(mark(~idx_ok, "bad_idx"), "idx", "an integer >= 0")
    bbox_ok = valid_bboxes(raw["bbox"])
    explain(mark(~bbox_ok, "bad_bbox"), "bbox", _BBOX_RULE)

    # Copy-on-write: the new frame shares every unchanged column with ``raw``.
    typed = raw.assign(score=score, idx=np.where(idx_ok, idx_vals, -1).astype("int64"))
    clean = typed[reason == ""]
    first_row = pd.Series(clean.index.to_numpy()[first_of_each_key(clean)], index=clean.index)
    dup = mark((first_row != clean.index).reindex(raw.index, fill_value=False), "duplicate_object")
    detail[dup] = [
        f"(username, image_name, idx) = {(u, i, int(x))!r} repeats data row {first_row[r]}; "
        "each object must appear once."
        for r, u, i, x in typed.loc[dup, _OBJECT_KEY].itertuples()
    ]

    sel = cfg.select
    unselected_tag = typed["tag"].isin(sel.exclude_tags)
    if sel.tags is not None:
        unselected_tag |= ~typed["tag"].isin(sel.tags)
    new = mark(unselected_tag, "not_selected:tag")
    detail[new] = "tag not in select.tags or in select.exclude_tags"
    new = mark(typed["score"] < sel.min_score, "not_selected:score")
    detail[new] = f"score below select.min_score ({sel.min_score})"
    return typed, reason, detail


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class _FileJob:
    path: str
    user_dir: str  # the folder the template names after the user ('' if none)
    positions: np.ndarray  # candidate positions (= object ids) of this file's objects
    idx: np.ndarray  # row of each object inside the file


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return clip(f"{type(exc).__name__}: {lines[0] if lines else ''}", 200)


_NPY_V1_HEADER = re.compile(
    rb"\{'descr': '([<>|]?[fiu][0-9]+)', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \}"
)


def read_npy(path: str) -> np.ndarray:
    """Read a small 2-D ``.npy`` file, ~6x faster than ``np.load`` for the common case.

    Ingest reads one file per image, so ``np.load``'s per-file cost (a Python-level
    header parse) dominates. Files whose header ``np.save`` writes for a C-ordered 2-D
    array are parsed with one regular expression and checked for a truncated body; any
    other file goes to ``np.load``, which raises on anything corrupt.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        header_end = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_V1_HEADER.match(data, 10, header_end)
        if match:
            dtype = np.dtype(match.group(1).decode())
            shape = (int(match.group(2)), int(match.group(3)))
            if len(data) - header_end != shape[0] * shape[1] * dtype.itemsize:
                raise ValueError(
                    f"the data holds {len(data) - header_end} bytes; its header "
                    f"{shape} {dtype} needs {shape[0] * shape[1] * dtype.itemsize}"
                )
            return np.frombuffer(data, dtype, shape[0] * shape[1], header_end).reshape(shape)
    return np.load(path, allow_pickle=False)


def _load_file(
    job: _FileJob, dim: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Vectors of one file's objects, plus a reason and a detail per object ('' = fine);
    the reasons and details are ``None`` when every object is fine (the common case, kept
    cheap because ingest reads one small file per image)."""
    try:
        array = read_npy(job.path)
        if array.ndim == 2 and array.shape[1] == dim and array.dtype.kind == "f":
            vectors = np.asarray(array[job.idx], dtype=np.float32)  # IndexError: idx too big
            if np.isfinite(vectors).all() and (vectors != 0).any(axis=1).all():
                return vectors, None, None
    except Exception:  # the slow path below says what is wrong
        pass
    n = len(job.idx)
    reasons = np.full(n, "", dtype=object)
    details = np.full(n, "", dtype=object)

    def reject_all(why: str, detail: str) -> tuple[None, np.ndarray, np.ndarray]:
        reasons[:], details[:] = why, detail
        return None, reasons, details

    if not os.path.exists(job.path):
        if job.user_dir and not os.path.isdir(job.user_dir):
            return reject_all(
                "missing_user_folder", f"The user folder {job.user_dir} does not exist."
            )
        return reject_all(
            "missing_embedding_file", f"The embedding file {job.path} does not exist."
        )
    try:
        array = read_npy(job.path)
    except Exception as exc:  # truncated header, bad magic, short data: all "corrupt"
        return reject_all(
            "corrupt_embedding_file", f"{job.path} cannot be read as .npy ({_first_line(exc)})."
        )
    if array.ndim != 2 or array.shape[1] != dim:
        return reject_all(
            "wrong_dimension", must_be(job.path, f"a 2-D array of shape (n, {dim})", array.shape)
        )
    if array.dtype.kind != "f":
        return reject_all("wrong_dtype", must_be(job.path, "an array of floats", str(array.dtype)))
    beyond = job.idx >= array.shape[0]
    reasons[beyond] = "idx_out_of_range"
    details[beyond] = [
        must_be("idx", f"< {array.shape[0]}, the rows of {job.path}", int(i))
        for i in job.idx[beyond]
    ]
    vectors = np.zeros((n, dim), dtype=np.float32)
    vectors[~beyond] = array[job.idx[~beyond]]
    _check_vectors(vectors, reasons, details, lambda i: f"Row {job.idx[i]} of {job.path}")
    return vectors, reasons, details


def _check_vectors(vectors: np.ndarray, reasons: np.ndarray, details: np.ndarray, where) -> None:
    """Reject rows with NaN or infinite values, and all-zero rows (cosine undefined).

    ``where(i)`` names row ``i`` in a message, e.g. "Row 3 of a.npy".
    """
    finite = np.isfinite(vectors)
    for i in np.flatnonzero((reasons == "") & ~finite.all(axis=1)):
        reasons[i] = "non_finite_vector"
        n_bad = int((~finite[i]).sum())
        details[i] = f"{where(i)} must be finite. Got {n_bad} NaN or infinite value(s) instead."
    for i in np.flatnonzero((reasons == "") & ~(vectors != 0).any(axis=1)):
        reasons[i] = "zero_vector"
        details[i] = f"{where(i)} is all zeros, so its cosine similarity is undefined."


def _user_folder_template(template: str) -> str | None:
    """The leading part of the path template that names the user's folder.

    >>> _user_folder_template("{username}/embeddings/{image_name}.npy")
    '{username}'
    """
    parts = template.split("/")
    for i, part in enumerate(parts[:-1]):
        if "{username}" in part:
            return "/".join(parts[: i + 1])
    return None


class FileGroups:
    """The embedding files of the objects, grouped without one Python object per file.

    Files are numbered in order of first appearance in the CSV (the order they were
    written); :meth:`jobs` builds the read jobs of a range of files only when needed, so
    memory stays a few arrays of one entry per object, even for millions of files.
    """

    def __init__(self, objects: pd.DataFrame, cfg: Config):
        self.root = Path(cfg.input.embeddings_root)
        self.template = cfg.input.embeddings_template
        self.user_template = _user_folder_template(self.template)
        fields = [name for _, name, _, _ in string.Formatter().parse(self.template) if name]
        self.keys = list(dict.fromkeys(["username", *fields]))
        codes = objects.groupby(self.keys, sort=False).ngroup().to_numpy()
        self.order = np.argsort(codes, kind="stable")
        self.starts = np.searchsorted(codes[self.order], np.arange(codes.max() + 2))
        self.objects = objects[[*self.keys, "object_id", "idx"]]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def jobs(self, first: int, last: int) -> list[_FileJob]:
        """Read jobs of files ``first`` to ``last - 1``."""
        rows = self.order[self.starts[first] : self.starts[last]]
        part = self.objects.take(rows)
        positions, idx = part["object_id"].to_numpy(), part["idx"].to_numpy()
        heads = (self.starts[first:last] - self.starts[first]).tolist()
        columns = [part[key].to_numpy(dtype=object)[heads] for key in self.keys]
        bounds = [*heads, len(rows)]
        root = f"{self.root}/"
        jobs = []
        for g, values in enumerate(zip(*columns, strict=True)):
            fields = dict(zip(self.keys, values, strict=True))
            user = self.user_template.format_map(fields) if self.user_template else ""
            jobs.append(
                _FileJob(
                    path=root + self.template.format_map(fields),
                    user_dir=root + user if user else "",
                    positions=positions[bounds[g] : bounds[g + 1]],
                    idx=idx[bounds[g] : bounds[g + 1]],
                )
            )
        return jobs

    def batches(self, files_per_batch: int) -> Iterator[list[_FileJob]]:
        for first in range(0, len(self), files_per_batch):
            yield self.jobs(first, min(first + files_per_batch, len(self)))


def _infer_dim(files: FileGroups) -> int:
    """The most common width among a sample of files spread over the whole input, so that
    a few files in another dimension (a model change) are the ones rejected."""
    widths: Counter[int] = Counter()
    step = max(1, len(files) // _DIM_SAMPLE_FILES)
    sample = [job for f in range(0, len(files), step) for job in files.jobs(f, f + 1)]
    for job in sample:
        try:
            array = np.load(job.path, mmap_mode="r", allow_pickle=False)
        except Exception:
            continue
        if array.ndim == 2 and array.dtype.kind == "f":
            widths[int(array.shape[1])] += 1
    if not widths:
        raise InputError(
            "Cannot infer the embedding dimension: none of the sampled embedding files is a 2-D "
            f"float .npy (e.g. {sample[0].path}). Check input.embeddings_root and "
            "input.embeddings_template, or set ingest.dim."
        )
    return widths.most_common(1)[0][0]


def _load_batch(jobs: list[_FileJob], dim: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Load a batch of files: positions and vectors of the good objects, stacked, and
    ``(positions, reasons, details)`` of each file that has rejected objects."""
    positions, blocks, problems = [], [], []
    for job in jobs:
        vectors, reasons, details = _load_file(job, dim)
        if reasons is None:
            positions.append(job.positions)
            blocks.append(vectors)
            continue
        bad = reasons != ""
        if bad.any():
            problems.append((job.positions[bad], reasons[bad], details[bad]))
        if vectors is not None and not bad.all():
            positions.append(job.positions[~bad])
            blocks.append(vectors[~bad])
    if not blocks:
        return np.empty(0, np.int64), np.empty((0, dim), np.float32), problems
    return np.concatenate(positions), np.concatenate(blocks), problems


def bounded_map(pool: ThreadPoolExecutor, fn, items: Iterator, ahead: int) -> Iterator:
    """``pool.map`` in order, but with at most ``ahead`` items in flight: the stock ``map``
    submits every item at once, so loaded results could pile up without bound.

    >>> with ThreadPoolExecutor(2) as pool:
    ...     list(bounded_map(pool, lambda x: x * x, iter(range(5)), ahead=2))
    [0, 1, 4, 9, 16]
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def fill_memmap_from_files(
    batches: Iterator[list[_FileJob]], n_files: int, n_rows: int, memmap: np.memmap, dim: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Read every embedding file once (threads) and write its rows at their object ids.

    ``batches`` yields lists of file jobs; each batch is stacked and written to the memmap at
    once. Returns the reason per object ('' = ingested) and a detail string per object.
    """
    reasons = np.full(n_rows, "", dtype=object)
    details = np.full(n_rows, "", dtype=object)
    bar = tqdm(total=n_files, desc="ingest: read embeddings", unit="file", disable=not progress)
    with ThreadPoolExecutor(max_workers=2) as pool:
        loaded = bounded_map(
            pool, lambda batch: (len(batch), *_load_batch(batch, dim)), batches, ahead=4
        )
        for n_batch_files, positions, vectors, problems in loaded:
            memmap[positions] = vectors
            for bad_positions, bad_reasons, bad_details in problems:
                reasons[bad_positions] = bad_reasons
                details[bad_positions] = bad_details
            bar.update(n_batch_files)
    bar.close()
    return reasons, details


def open_matrix(path: str, n_csv_rows: int) -> np.ndarray:
    """Open a CSV-aligned ``.npy`` matrix read-only (memory-mapped) and check its shape."""
    if not Path(path).is_file():
        raise MissingInputError(
            f"Embeddings matrix {path} does not exist. Set input.embeddings_matrix."
        )
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise InputError(
            f"Embeddings matrix {path} cannot be read as .npy ({_first_line(exc)})."
        ) from None
    if matrix.ndim != 2 or matrix.dtype.kind != "f":
        raise InputError(
            must_be(
                f"Embeddings matrix {path}", "a 2-D float array", f"{matrix.dtype} {matrix.shape}"
            )
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
    details = np.full(n, "", dtype=object)
    source = objects["source_row"].to_numpy()
    step = max(1, _COPY_BYTES // (4 * memmap.shape[1]))
    for start in tqdm(range(0, n, step), desc="ingest: copy matrix", disable=not progress):
        rows = source[start : start + step]
        block = np.asarray(matrix[rows], dtype=np.float32)
        _check_vectors(block, reasons[start : start + step], details[start : start + step],
                       lambda i, rows=rows: f"Row {rows[i]} of {matrix.filename}")  # fmt: skip
        memmap[start : start + step] = block
    return reasons, details


def _raise_on_bad_object(cfg: Config, rejects: pd.DataFrame) -> None:
    """With ``ingest.on_bad_object: fail``, turn the first bad row into a one-line error."""
    bad = rejects[~rejects["reason"].str.startswith("not_selected")]
    if cfg.ingest.on_bad_object == "fail" and len(bad):
        first = bad.loc[bad[schema.SOURCE_ROW].idxmin()]
        row = first[schema.SOURCE_ROW]
        raise InputError(
            f"{cfg.input.objects_csv} data row {row} (line {row + 2}), {first['reason']}: "
            f"{first['detail']} "
            "Fix the input, or set ingest.on_bad_object to 'reject' to skip such objects."
        )


def tree_fingerprint(root: str) -> str:
    """Hash of the path, size and mtime of every file under ``root``.

    It changes when any embedding file is added, removed or rewritten, so a rerun redoes
    the ingest then; the cost is one ``stat`` per file, small next to reading them.
    """
    digest = hashlib.sha256()
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            st = os.stat(os.path.join(folder, name))
            digest.update(f"{folder}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- store


def _open_memmap(path: str, n_rows: int, dim: int) -> np.memmap:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return np.memmap(path, dtype=np.float32, mode="w+", shape=(max(n_rows, 1), dim))


_buffers = threading.local()


def _thread_buffers(count: int, shape: tuple[int, int]) -> list[np.ndarray]:
    """``count`` float32 arrays of ``shape`` owned by the calling thread and reused."""
    held = getattr(_buffers, "arrays", [])
    if len(held) != count or held[0].shape[0] < shape[0] or held[0].shape[1] != shape[1]:
        held = _buffers.arrays = [np.empty(shape, dtype=np.float32) for _ in range(count)]
    return [a[: shape[0]] for a in held]


def _run_chunks(fn, n_chunks: int, desc: str, progress: bool) -> None:
    """Call ``fn(chunk)`` for every chunk on two threads, with a progress bar."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in tqdm(pool.map(fn, range(n_chunks)), total=n_chunks, desc=desc, unit="chunk",
                      disable=not progress):  # fmt: skip
            pass


def write_object_parts(
    objects: pd.DataFrame, store_ids: np.ndarray, url: str, chunk_rows: int, progress: bool
) -> None:
    """The objects table in store order, one ``part-<chunk>.parquet`` per store chunk, so it
    is row-aligned with the store and its partitions match the store's blocks."""
    object_ids = objects["object_id"].to_numpy()  # increasing: rows are in CSV order
    with store.atomic_path(url) as tmp:
        fs, tmp_path = store.filesystem(tmp)
        fs.makedirs(tmp_path, exist_ok=True)

        def write_part(c: int) -> None:
            ids = store_ids[c * chunk_rows : (c + 1) * chunk_rows]
            sinks.write_parquet(
                objects.take(np.searchsorted(object_ids, ids)),
                store.join(tmp, f"part-{c:05d}.parquet"),
                schema.OBJECTS_SCHEMA,
            )

        _run_chunks(write_part, math.ceil(len(store_ids) / chunk_rows), "ingest: objects", progress)


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
    with store.atomic_path(url) as tmp:
        group = store.create_store(tmp, n_rows, dim, chunk_rows, compression, attrs)
        vectors, ids_array = group[store.VECTORS], group[store.OBJECT_IDS]

        def write_chunk(c: int) -> None:
            start, stop = c * chunk_rows, min((c + 1) * chunk_rows, n_rows)
            ids = store_ids[start:stop]
            # One block-sized buffer per thread, reused (fresh ones cost page faults). The
            # rows are gathered in shuffled order straight into it: each is a contiguous
            # 7 KB read of the memmap, so the order costs nothing while it is cached.
            (block,) = _thread_buffers(1, (len(ids), dim))
            np.take(memmap, ids, axis=0, out=block)
            vectors[start:stop] = block
            ids_array[start:stop] = ids

        _run_chunks(write_chunk, math.ceil(n_rows / chunk_rows), "ingest: write zarr", progress)


def ingest(cfg: Config, paths: OutputPaths, progress: bool = True) -> IngestResult:
    """Run the ingest stage and return its counts (outputs are written under ``paths``)."""
    raw = read_objects_csv(cfg.input.objects_csv)
    n_input_rows = len(raw)
    typed, reasons, details = validate_rows(raw, cfg)
    typed.insert(0, schema.SOURCE_ROW, np.arange(len(typed), dtype=np.int64))
    rejects = _rejects_frame(typed[schema.SOURCE_ROW], raw, reasons.to_numpy(), details.to_numpy())
    _raise_on_bad_object(cfg, rejects)
    clean = reasons.to_numpy() == ""
    candidates = typed if clean.all() else typed[clean]  # no copy of a clean table
    candidates.insert(0, schema.OBJECT_ID, np.arange(len(candidates), dtype=np.int64))
    del raw, typed, reasons, details, clean  # the table is held once from here on
    if len(candidates) == 0:
        _fail_with_no_objects(cfg, rejects, paths)

    if cfg.input.embeddings_matrix:
        matrix = open_matrix(cfg.input.embeddings_matrix, n_input_rows)
        dim = int(matrix.shape[1])
        if cfg.ingest.dim not in (None, dim):
            raise InputError(
                must_be(
                    f"The dimension of {cfg.input.embeddings_matrix}",
                    f"ingest.dim ({cfg.ingest.dim})",
                    dim,
                )
            )
    else:
        root = Path(cfg.input.embeddings_root)
        if not root.is_dir():
            raise MissingInputError(
                f"Embeddings root {root} does not exist. Set input.embeddings_root."
            )
        files = FileGroups(candidates, cfg)
        dim = cfg.ingest.dim or _infer_dim(files)

    memmap = _open_memmap(paths.memmap, len(candidates), dim)
    if cfg.input.embeddings_matrix:
        emb_reasons, emb_details = fill_memmap_from_matrix(candidates, matrix, memmap, progress)
    else:
        emb_reasons, emb_details = fill_memmap_from_files(
            files.batches(_FILES_PER_TASK), len(files), len(candidates), memmap, dim, progress
        )
        del files  # it shares columns with the table
    memmap.flush()

    late = _rejects_frame(candidates[schema.SOURCE_ROW], candidates, emb_reasons, emb_details)
    rejects = pd.concat([rejects, late], ignore_index=True)
    rejects = rejects.sort_values(schema.SOURCE_ROW, kind="stable", ignore_index=True)
    _raise_on_bad_object(cfg, rejects)
    good = emb_reasons == ""
    objects = candidates if good.all() else candidates[good]
    del candidates
    n_rows = len(objects)
    if n_rows == 0:
        _fail_with_no_objects(cfg, rejects, paths)
    shuffle_seed = (
        cfg.ingest.shuffle_seed if cfg.ingest.shuffle_seed is not None else cfg.train.seed
    )
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
    write_object_parts(objects, store_ids, paths.objects, chunk_rows, progress)
    del objects  # the table is written: free it before the vectors' buffers are taken
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed memory
    mirror_to_store(
        memmap, store_ids, paths.store, chunk_rows, cfg.ingest.compression, attrs, progress
    )
    del memmap
    if not cfg.ingest.keep_memmap:
        Path(paths.memmap).unlink(missing_ok=True)
    sinks.write_parquet(rejects, paths.rejects, schema.REJECTS_SCHEMA)
    result = IngestResult(
        n_input_rows=n_input_rows,
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


def _rejects_frame(
    source_row: pd.Series, rows: pd.DataFrame, reasons: np.ndarray, details: np.ndarray
) -> pd.DataFrame:
    """The rows of ``rows`` that have a reason, as a rejects table (``REJECTS_SCHEMA``)."""
    bad = reasons != ""
    picked = rows[bad]
    return pd.DataFrame(
        {
            schema.SOURCE_ROW: source_row[bad].to_numpy(dtype=np.int64),
            "reason": reasons[bad].astype(str),
            "username": picked["username"].to_numpy(dtype=str),
            "image_name": picked["image_name"].to_numpy(dtype=str),
            "idx": picked["idx"].astype(str).to_numpy(dtype=str),
            "detail": details[bad].astype(str),
        }
    )


def _fail_with_no_objects(cfg: Config, rejects: pd.DataFrame, paths: OutputPaths) -> NoReturn:
    """Every row was rejected: keep the rejects for inspection and say why, with an example."""
    sinks.write_parquet(rejects, paths.rejects, schema.REJECTS_SCHEMA)
    reason = rejects["reason"].value_counts().index[0]
    example = rejects[rejects["reason"] == reason].iloc[0]
    raise InputError(
        f"No object of {cfg.input.objects_csv} is left to cluster: all {len(rejects):,} rows were "
        f"rejected, most often as {reason!r} (data row {example[schema.SOURCE_ROW]}: "
        f"{example['detail']}) Fix the input or select.*; every row is listed in {paths.rejects}."
    )
