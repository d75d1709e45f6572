"""Embedding files: read each once, check it, and write its rows into the staging memmap.

Per-image ``.npy`` files (the path template in ``input.embeddings_template``) or one
CSV-aligned matrix. Every problem with an object's vector becomes a reject reason and a
one-line detail for that object; nothing here raises for a single bad file.
"""

from __future__ import annotations

import io
import os
import re
import string
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from ..config import InputConfig
from ..errors import InputError, MissingInputError, clip, must_be
from ..store import NotRegularFile, PathOutsideRoot, read_inside

FILES_PER_TASK = 64
_DIM_SAMPLE_FILES = 200  # files whose width votes for the dimension
_COPY_BYTES = 32 << 20  # rows copied per step from a single matrix file


@dataclass(frozen=True)
class _FileJob:
    path: str
    user_dir: str  # the folder the template names after the user ('' if none)
    positions: np.ndarray  # candidate positions (= object ids) of this file's objects
    idx: np.ndarray  # row of each object inside the file
    root: str  # the embeddings root, symlinks resolved: the file must lie inside it


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return clip(f"{type(exc).__name__}: {lines[0] if lines else ''}", 200)


_NPY_V1_HEADER = re.compile(
    rb"\{'descr': '([<>|]?[fiu][0-9]+)', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \}"
)


def read_npy(path: str, root: str) -> np.ndarray:
    """Read a small 2-D ``.npy`` file inside ``root``, ~6x faster than ``np.load`` for the
    common case.

    Ingest reads one file per image, so ``np.load``'s per-file cost (a Python-level
    header parse) dominates. Files whose header ``np.save`` writes for a C-ordered 2-D
    array are parsed with one regular expression and checked for a truncated body; any
    other file goes to ``np.load`` (on the bytes read), which raises on anything corrupt.
    """
    data = read_inside(path, root)
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
    return np.load(io.BytesIO(data), allow_pickle=False)


def _load_file(
    job: _FileJob, dim: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Vectors of one file's objects, plus a reason and a detail per object ('' = fine);
    the reasons and details are ``None`` when every object is fine (the common case, kept
    cheap because ingest reads one small file per image)."""
    try:
        array = read_npy(job.path, job.root)
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

    try:
        read_inside(job.path, job.root)
    except PathOutsideRoot:
        return reject_all(
            "path_outside_root",
            f"The embedding path {clip(job.path, 200)} resolves outside input.embeddings_root "
            f"({job.root}); only files inside it are read.",
        )
    except NotRegularFile:
        return reject_all(
            "not_a_regular_file", f"{clip(job.path, 200)} is not a regular file (a FIFO, "
            "device or folder); only regular .npy files are read.",
        )  # fmt: skip
    except OSError:
        pass  # missing or unreadable: told apart below
    if not os.path.exists(job.path):
        if os.path.islink(job.path):
            return reject_all(
                "missing_embedding_file", f"The embedding file {job.path} is a dangling link."
            )
        if job.user_dir and not os.path.isdir(job.user_dir):
            return reject_all(
                "missing_user_folder", f"The user folder {job.user_dir} does not exist."
            )
        return reject_all(
            "missing_embedding_file", f"The embedding file {job.path} does not exist."
        )
    try:
        array = read_npy(job.path, job.root)
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
    check_vectors(vectors, reasons, details, lambda i: f"Row {job.idx[i]} of {job.path}")
    return vectors, reasons, details


def check_vectors(vectors: np.ndarray, reasons: np.ndarray, details: np.ndarray, where) -> None:
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


@dataclass(frozen=True)
class FileBatch:
    """The read jobs of a run of files, as a few arrays (one path per file, one position
    and row per object) instead of one object per file."""

    paths: list[str]
    user_dirs: list[str]
    positions: np.ndarray
    idx: np.ndarray
    bounds: np.ndarray  # file f's objects are [bounds[f], bounds[f + 1])
    root: str

    def jobs(self) -> list[_FileJob]:
        b = self.bounds.tolist()
        return [
            _FileJob(path, user_dir, self.positions[b[f] : b[f + 1]], self.idx[b[f] : b[f + 1]],
                     self.root)
            for f, (path, user_dir) in enumerate(zip(self.paths, self.user_dirs, strict=True))
        ]  # fmt: skip


def _arrow_column(series: pd.Series) -> pa.ChunkedArray:
    """``series`` as Arrow (zero-copy for Arrow-backed strings)."""
    column = pa.array(series)
    return column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])


def group_codes(frame: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """The group number of each row by the ``keys`` columns, groups numbered in order of
    first appearance: ``frame.groupby(keys, sort=False).ngroup()``, in a few integer
    arrays (each column dictionary-encoded by Arrow, the codes combined pairwise) instead of
    pandas' hash tables of Python strings (~120 bytes a row at 1M rows).

    >>> t = pd.DataFrame({"u": ["b", "a", "b", "a"], "f": ["x", "y", "x", "x"]})
    >>> group_codes(t, ["u", "f"]).tolist()
    [0, 1, 0, 2]
    """
    combined = np.zeros(len(frame), dtype=np.int64)
    for key in keys:
        column = _arrow_column(frame[key]).combine_chunks()  # one dictionary, not per chunk
        encoded = column.dictionary_encode()
        del column
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        width = len(encoded.dictionary)
        del encoded
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed blocks
        _, combined = np.unique(combined * width + codes, return_inverse=True)
    _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse]


class FileGroups:
    """The embedding files of the objects, grouped without one Python object per file.

    Files are numbered in order of first appearance in the CSV (the order they were
    written); :meth:`jobs` builds the read jobs of a range of files only when needed, so
    memory stays a few arrays of one entry per object, even for millions of files.
    """

    def __init__(self, objects: pd.DataFrame, inputs: InputConfig):
        self.root = Path(inputs.embeddings_root)
        self.real_root = os.path.realpath(self.root)
        self.template = inputs.embeddings_template
        self.user_template = _user_folder_template(self.template)
        fields = [name for _, name, _, _ in string.Formatter().parse(self.template) if name]
        self.keys = list(dict.fromkeys(["username", *fields]))
        codes = group_codes(objects, self.keys)
        self.order = np.argsort(codes, kind="stable")
        self.starts = np.searchsorted(codes[self.order], np.arange(codes.max() + 2))
        # Arrow columns as they are (zero-copy): a pandas take from a many-chunk Arrow
        # column concatenates the whole column first (~35 ms a call at 1M rows).
        self.columns = {key: _arrow_column(objects[key]) for key in self.keys}
        self.object_ids = objects["object_id"].to_numpy()
        self.idx = objects["idx"].to_numpy()

    def __len__(self) -> int:
        return len(self.starts) - 1

    def batch(self, first: int, last: int) -> FileBatch:
        """Files ``first`` to ``last - 1``, compactly (what a read task is sent)."""
        rows = self.order[self.starts[first] : self.starts[last]]
        heads = (self.starts[first:last] - self.starts[first]).tolist()
        # Each file's first row; files are numbered by first appearance, so these increase
        # and one short slice of each column holds them.
        head_rows = rows[heads]
        low, span = int(head_rows[0]), int(head_rows[-1] - head_rows[0]) + 1
        at = pa.array(head_rows - low)
        columns = [self.columns[key].slice(low, span).take(at).to_pylist() for key in self.keys]
        root = f"{self.root}/"
        paths, user_dirs = [], []
        for values in zip(*columns, strict=True):
            fields = dict(zip(self.keys, values, strict=True))
            user = self.user_template.format_map(fields) if self.user_template else ""
            paths.append(root + self.template.format_map(fields))
            user_dirs.append(root + user if user else "")
        return FileBatch(
            paths=paths,
            user_dirs=user_dirs,
            positions=self.object_ids[rows],
            idx=self.idx[rows],
            bounds=np.array([*heads, len(rows)], dtype=np.int64),
            root=self.real_root,
        )

    def jobs(self, first: int, last: int) -> list[_FileJob]:
        """Read jobs of files ``first`` to ``last - 1``."""
        return self.batch(first, last).jobs()

    def batches(self, files_per_batch: int) -> Iterator[list[_FileJob]]:
        for first in range(0, len(self), files_per_batch):
            yield self.jobs(first, min(first + files_per_batch, len(self)))


def infer_dim(files: FileGroups) -> int:
    """The most common width among a sample of files spread over the whole input, so that
    a few files in another dimension (a model change) are the ones rejected."""
    widths: Counter[int] = Counter()
    step = max(1, len(files) // _DIM_SAMPLE_FILES)
    sample = [job for f in range(0, len(files), step) for job in files.jobs(f, f + 1)]
    for job in sample:
        try:
            array = read_npy(job.path, job.root)
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


def load_batch(jobs: list[_FileJob], dim: int) -> tuple[np.ndarray, np.ndarray, list]:
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


def recording_paths(batches: Iterator[list[_FileJob]], paths) -> Iterator[list[_FileJob]]:
    """Pass ``batches`` through, handing each file's path to ``paths.extend``."""
    for batch in batches:
        paths.extend(job.path for job in batch)
        yield batch


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
            pool, lambda batch: (len(batch), *load_batch(batch, dim)), batches, ahead=4
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
        check_vectors(block, reasons[start : start + step], details[start : start + step],
                       lambda i, rows=rows: f"Row {rows[i]} of {matrix.filename}")  # fmt: skip
        memmap[start : start + step] = block
    return reasons, details


def open_memmap(path: str, n_rows: int, dim: int) -> np.memmap:
    """A new ``(n_rows, dim)`` float32 memmap whose disk blocks are allocated up front.

    A sparse file would be backed only as pages are written, and a full disk would then
    kill the process with SIGBUS mid-write; allocating first turns that into an ``OSError``
    (ENOSPC) before any work, which the runner reports in one line.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    shape = (max(n_rows, 1), dim)
    with open(path, "wb") as handle:
        nbytes = shape[0] * shape[1] * 4
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(handle.fileno(), 0, nbytes)
        else:  # pragma: no cover - macOS/Windows: extend only (sparse where supported)
            handle.truncate(nbytes)
    return np.memmap(path, dtype=np.float32, mode="r+", shape=shape)
