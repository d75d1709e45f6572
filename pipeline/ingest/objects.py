"""The objects table: read the CSV and give every row a reject reason (pure checks).

:func:`read_objects_csv` is the only function here that touches a file; everything else
takes a table and returns reasons, so the checks are testable without files.
"""

from __future__ import annotations

import csv
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
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in header},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    try:  # the fast, parallel parse: fields without line breaks, each under a block
        table = pacsv.read_csv(
            p, parse_options=pacsv.ParseOptions(newlines_in_values=False), convert_options=convert
        )
    except pa.ArrowException:
        # Legal CSV the fast parse refuses: quoted line breaks, or a field larger than a
        # parse block. Read again with both allowed (one block: single-threaded, so only
        # files that need it pay); what still fails is a malformed file.
        try:
            table = pacsv.read_csv(
                p,
                read_options=pacsv.ReadOptions(
                    block_size=max(1 << 20, min(p.stat().st_size + 1, (1 << 31) - 1))
                ),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=convert,
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


def validate_rows(
    raw: pd.DataFrame, select: SelectConfig, on_bad_bbox: str = "reject"
) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
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
    if on_bad_bbox == "reject":  # else kept: clustering never uses the box; flagged
        explain(mark(~bbox_ok, "bad_bbox"), "bbox", _BBOX_RULE)

    # Copy-on-write: the new frame shares every unchanged column with ``raw``.
    typed = raw.assign(
        score=score, idx=np.where(idx_ok, idx_vals, -1).astype("int64"), bbox_ok=bbox_ok
    )
    clean = typed[reason == ""]
    first_row = pd.Series(clean.index.to_numpy()[first_of_each_key(clean)], index=clean.index)
    dup = mark((first_row != clean.index).reindex(raw.index, fill_value=False), "duplicate_object")
    detail[dup] = [
        f"(username, image_name, idx) = {(u, i, int(x))!r} repeats data row {first_row[r]}; "
        "each object must appear once."
        for r, u, i, x in typed.loc[dup, _OBJECT_KEY].itertuples()
    ]

    sel = select
    unselected_tag = typed["tag"].isin(sel.exclude_tags)
    if sel.tags is not None:
        unselected_tag |= ~typed["tag"].isin(sel.tags)
    new = mark(unselected_tag, "not_selected:tag")
    detail[new] = "tag not in select.tags or in select.exclude_tags"
    new = mark(typed["score"] < sel.min_score, "not_selected:score")
    detail[new] = f"score below select.min_score ({sel.min_score})"
    return typed, reason, detail


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
