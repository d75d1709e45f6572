"""The objects table: read the CSV and give every row a reject reason (pure checks).

Only the readers touch the file (:func:`stream_objects_csv` and its helpers, and
:func:`csv_partitions`, which cuts it into byte ranges for the workers); everything else
takes a table and returns reasons, so the checks are testable without files.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .. import schema
from ..config import SelectConfig
from ..errors import InputError, MissingInputError, clip, must_be

#: Columns the pipeline adds to its tables: an input column of that name would clash.
RESERVED_COLUMNS = (
    schema.OBJECT_ID,
    schema.SOURCE_ROW,
    schema.STATUS,
    "bbox_ok",
    *(f.name for f in schema.ASSIGNMENT_FIELDS),
)
_OBJECT_KEY = ["username", "image_name", "idx"]
_MAX_IDX = 2**53  # larger values do not survive the float parse exactly
_BBOX_RULE = (
    "[x1, y1, x2, y2] (or x1,y1,x2,y2 / (x1, y1, x2, y2) / [x1 y1 x2 y2]) of finite "
    "numbers, x1 <= x2, y1 <= y2"
)


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


def _checked_header(path: str) -> list[str]:
    """The CSV's header, after the checks that need no parse: the file exists, is not
    empty, has a data row, the required columns and no duplicate or reserved names."""
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
    return header


#: Bytes of CSV per record batch of the streamed read: validation holds one batch and its
#: temporaries at a time, so its memory follows this, not the file's size.
CSV_BLOCK_BYTES = 8 << 20


def _line_blocks(
    path: Path, block_bytes: int, start: int = 0, end: int | None = None
) -> Iterator[bytes]:
    """Bytes ``start:end`` of the file (``end`` None: to its end) in blocks of about
    ``block_bytes`` that end at a line break (only valid where no value holds a line
    break: the fast parse's assumption)."""
    with path.open("rb") as handle:
        handle.seek(start)
        left = -1 if end is None else end - start
        rest = b""
        while True:
            data = handle.read(block_bytes if left < 0 else min(block_bytes, left))
            if left > 0:
                left -= len(data)
            if not data:
                if rest:
                    yield rest
                return
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                rest = data
                continue
            rest = data[cut:]
            yield data[:cut]


#: Bytes of CSV per partition of the read on workers (one task each); tests set it
#: small to cut a small file into several partitions.
CSV_PARTITION_BYTES = CSV_BLOCK_BYTES


def csv_partitions(path: str | Path, size: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` that cover the file in order, each starting at the
    start of a line: the first line start at or after each multiple of ``size`` (a line
    longer than ``size`` stays whole). The first range starts with the header.

    >>> import os, tempfile
    >>> with tempfile.NamedTemporaryFile(delete=False) as f:
    ...     _ = f.write(b"h\\n1111\\n22\\n3")
    >>> csv_partitions(f.name, 3), csv_partitions(f.name, 2), csv_partitions(f.name, 100)
    ([(0, 7), (7, 10), (10, 11)], [(0, 2), (2, 7), (7, 10), (10, 11)], [(0, 11)])
    >>> os.remove(f.name)
    """
    total = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as handle:
        at = size
        while at < total:
            handle.seek(at - 1)  # a line starts at ``at`` if the byte before is a break
            found = -1
            while found < 0 and (piece := handle.read(1 << 16)):
                found = piece.find(b"\n")
                at += len(piece) if found < 0 else found
            if found < 0 or at >= total:
                break  # no line starts past here: the last range runs to the end
            cuts.append(at)
            at = (at // size + 1) * size
    return list(zip(cuts, [*cuts[1:], total], strict=True))


def _record_batches(
    path: Path,
    header: list[str],
    fast: bool,
    block_bytes: int = CSV_BLOCK_BYTES,
    start: int = 0,
    end: int | None = None,
) -> Iterator[pa.Table]:
    """The file's data rows as tables of text columns; with ``fast``, only bytes
    ``start:end`` (a range from :func:`csv_partitions`: from 0, the header is read and
    checked; past it, the rows are named after ``header``)."""
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in header},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    if not fast:
        # Legal CSV the fast parse refuses: quoted line breaks, or a field larger than a
        # parse block. Read again with both allowed (one block: single-threaded and held
        # whole, so only files that need it pay); what still fails is a malformed file.
        read = pacsv.ReadOptions(
            block_size=max(1 << 20, min(path.stat().st_size + 1, (1 << 31) - 1))
        )
        table = pacsv.read_csv(
            path,
            read_options=read,
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=convert,
        )
        _check_parsed_header(path, table.column_names, header)
        yield table
        return
    # Fields without line breaks: the file is cut at line breaks into blocks, each parsed
    # on its own (in parallel inside the block). Blocks are read one at a time, so memory
    # holds one block, where pyarrow's streaming reader reads ahead without bound.
    parse = pacsv.ParseOptions(newlines_in_values=False)
    names: list[str] | None = None if start == 0 else header
    for block in _line_blocks(path, block_bytes, start, end):
        read = pacsv.ReadOptions(
            block_size=len(block) + 1, **({"column_names": names} if names else {})
        )
        table = pacsv.read_csv(
            pa.BufferReader(block), read_options=read, parse_options=parse,
            convert_options=convert,
        )  # fmt: skip
        if names is None:
            _check_parsed_header(path, table.column_names, header)
            names = header
        yield table


def _check_parsed_header(path: Path, parsed: list[str], header: list[str]) -> None:
    if parsed != header:
        raise InputError(
            f"Objects CSV {path}: the header cannot be read consistently "
            f"(found {[clip(c) for c in parsed[:20]]}). Check its quoting."
        )


class _CutAtLineBreaks(Exception):
    """A value of the fast parse holds a line break: the file's cut at line breaks may
    have split a quoted value (parsed without error into one row too many)."""


def holds_line_break(table: pa.Table) -> bool:
    """Whether any value holds a line break (only a quoted value can): a cut at line
    breaks may have split it, so only the whole file's parse can be trusted."""
    return any(pc.any(pc.match_substring(column, "\n")).as_py() for column in table.columns)


def stream_objects_csv(
    path: str,
    visit: Callable[[pd.DataFrame], None],
    restart: Callable[[], None],
    block_bytes: int = CSV_BLOCK_BYTES,
) -> int:
    """Read the objects CSV in record batches, every column as text, calling ``visit`` on
    each batch (a frame of consecutive data rows, in file order); returns the row count.

    A file the fast streamed parse refuses is read again the slow way: ``restart`` is
    called first, so the caller drops what it kept from the first attempt. Raises a
    one-line :class:`InputError` for an empty, unparsable or incomplete file.
    """
    header = _checked_header(path)
    p = Path(path)
    for fast in (True, False):
        n_rows = 0
        try:
            for batch in _record_batches(p, header, fast, block_bytes):
                if fast and holds_line_break(batch):
                    raise _CutAtLineBreaks
                if batch.num_rows:
                    visit(batch.to_pandas())
                    n_rows += batch.num_rows
        except (pa.ArrowException, _CutAtLineBreaks) as exc:
            if fast:
                restart()
                continue
            raise InputError(f"Objects CSV {path} {_parse_problem(p, exc)}") from None
        break
    if n_rows == 0:
        raise InputError(f"Objects CSV {path} has a header but no rows.")
    return n_rows


def read_objects_csv(path: str) -> pd.DataFrame:
    """Read the whole objects CSV with every column as text (values are checked
    afterwards); the ingest streams it instead (:func:`stream_objects_csv`).

    Raises a one-line :class:`InputError` for an empty, unparsable or incomplete file.
    """
    parts: list[pd.DataFrame] = []
    stream_objects_csv(path, parts.append, parts.clear)
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def _is_bbox(text: str) -> bool:
    return schema.parse_bbox(text) is not None


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


def check_rows(
    raw: pd.DataFrame, on_bad_bbox: str = "reject"
) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """The checks of each row on its own: type the columns and give each row a reject
    reason (empty string = fine) and a one-line detail naming its bad value.

    Returns the typed frame (``score`` float, ``idx`` int, ``bbox_ok``, extra columns as
    text), the reasons and the details, all aligned with ``raw``.
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
    if on_bad_bbox == "reject":  # else kept: clustering never uses the box; flagged
        explain(mark(~bbox_ok, "bad_bbox"), "bbox", _BBOX_RULE)
    # Copy-on-write: the new frame shares every unchanged column with ``raw``.
    typed = raw.assign(
        score=score, idx=np.where(idx_ok, idx_vals, -1).astype("int64"), bbox_ok=bbox_ok
    )
    return typed, reason, detail


#: Codes of :func:`selection_codes`, and each one's reject reason (code 0: selected).
SELECTION_REASONS = ("", "not_selected:tag", "not_selected:score")


def selection_codes(typed: pd.DataFrame, select: SelectConfig) -> np.ndarray:
    """Per row, 0 when ``select.*`` keeps it, else the index of its reason in
    :data:`SELECTION_REASONS` (the tag test first)."""
    unselected_tag = typed["tag"].isin(select.exclude_tags).to_numpy()
    if select.tags is not None:
        unselected_tag = unselected_tag | ~typed["tag"].isin(select.tags).to_numpy()
    low_score = (typed["score"] < select.min_score).to_numpy()
    return np.where(unselected_tag, 1, np.where(low_score, 2, 0)).astype(np.int8)


def selection_detail(code: int, select: SelectConfig) -> str:
    """The one-line detail of a selection reject."""
    if code == 1:
        return "tag not in select.tags or in select.exclude_tags"
    return f"score below select.min_score ({select.min_score})"


def duplicate_detail(key: tuple, first_row: int) -> str:
    username, image_name, idx = key
    return (
        f"(username, image_name, idx) = {(username, image_name, int(idx))!r} repeats data "
        f"row {first_row}; each object must appear once."
    )


def validate_rows(
    raw: pd.DataFrame, select: SelectConfig, on_bad_bbox: str = "reject"
) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """Type the columns and give each row a reject reason (empty string = fine), for a
    whole table at once: :func:`check_rows`, then repeated objects among the rows that
    pass them, then :func:`selection_codes`.

    Returns the typed frame (``score`` float, ``idx`` int, extra columns as text), the
    reasons, and a one-line detail per rejected row naming its bad value, all aligned
    with ``raw``.
    """
    typed, reason, detail = check_rows(raw, on_bad_bbox)
    clean = typed[reason == ""]
    first_row = pd.Series(clean.index.to_numpy()[first_of_each_key(clean)], index=clean.index)
    dup = ((first_row != clean.index).reindex(raw.index, fill_value=False)) & (reason == "")
    reason[dup] = "duplicate_object"
    detail[dup] = [
        duplicate_detail((u, i, x), first_row[r])
        for r, u, i, x in typed.loc[dup, _OBJECT_KEY].itertuples()
    ]
    codes = selection_codes(typed, select)
    new = (reason == "") & (codes == 1)
    reason[new] = "not_selected:tag"  # SELECTION_REASONS[1]
    detail[new] = selection_detail(1, select)
    new = (reason == "") & (codes == 2)
    reason[new] = "not_selected:score"  # SELECTION_REASONS[2]
    detail[new] = selection_detail(2, select)
    return typed, reason, detail


def key_hashes(frame: pd.DataFrame) -> np.ndarray:
    """A 64-bit hash of each row's (username, image_name, idx): equal keys, equal hashes
    (rows with equal hashes are then compared exactly)."""
    return pd.util.hash_pandas_object(frame[_OBJECT_KEY], index=False).to_numpy()


def rejects_frame(
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
