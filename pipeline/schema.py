"""The data contract: column names, dtypes and pyarrow schemas of every table.

One place for what downstream consumers rely on. Round-trip tests in
``tests/test_schema.py`` check that what the sinks write reads back with these schemas.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow as pa

#: Columns the objects CSV must have (the write-up's names). Extra columns are carried.
REQUIRED_INPUT_COLUMNS: tuple[str, ...] = (
    "batch_folder",
    "username",
    "res_name",
    "bbox",
    "tag",
    "score",
    "idx",
    "image_name",
)

#: The write-up's output sample fields, in its order: exactly the CSV's columns.
OUTPUT_CSV_FIELDS: tuple[str, ...] = REQUIRED_INPUT_COLUMNS + ("cluster", "dist", "sim")

#: Identifies an object across all tables: its position in the ingested store.
OBJECT_ID = "object_id"
#: The 0-based data row of the object in the input CSV (header not counted).
SOURCE_ROW = "source_row"
#: Where post-processing left a row: ``kept`` or the step that removed it.
STATUS = "status"

STATUS_KEPT = "kept"
STATUS_DUPLICATE = "removed:duplicate_image"
STATUS_LOW_SIMILARITY = "removed:low_similarity"
STATUS_SMALL_CLUSTER = "removed:small_cluster"
STATUS_ORDER: tuple[str, ...] = (
    STATUS_DUPLICATE,
    STATUS_LOW_SIMILARITY,
    STATUS_SMALL_CLUSTER,
    STATUS_KEPT,
)

_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_BOX_TEXT = re.compile(
    rf"^\s*(?P<open>[\[(]?)\s*({_NUMBER})(?:\s*,\s*|\s+)({_NUMBER})(?:\s*,\s*|\s+)({_NUMBER})"
    rf"(?:\s*,\s*|\s+)({_NUMBER})\s*(?P<close>[\])]?)\s*$"
)
_PAIRS = {("", ""), ("[", "]"), ("(", ")")}


def parse_bbox(text: str) -> tuple[float, float, float, float] | None:
    """``(x1, y1, x2, y2)`` from the common ways a box is written, or ``None``.

    The write-up's JSON list, and the forms exporters also write: ``x1,y1,x2,y2``,
    ``[x1 y1 x2 y2]``, ``(x1, y1, x2, y2)``. Coordinates must be finite with
    ``x1 <= x2`` and ``y1 <= y2``.

    >>> parse_bbox("[1, 2, 3.5, 4e1]"), parse_bbox("(1, 2, 3, 4)"), parse_bbox("1 2 3 4")
    ((1.0, 2.0, 3.5, 40.0), (1.0, 2.0, 3.0, 4.0), (1.0, 2.0, 3.0, 4.0))
    >>> parse_bbox("[3, 0, 1, 1]"), parse_bbox("[1, 2, 3)"), parse_bbox("[1, 2, 3, 4)")
    (None, None, None)
    """
    match = _BOX_TEXT.match(text)
    if match is not None:
        if (match["open"], match["close"]) not in _PAIRS:
            return None
        values = [float(match.group(i)) for i in range(2, 6)]
    else:
        try:
            box = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(box, list) or len(box) != 4:
            return None
        if any(isinstance(v, bool) or not isinstance(v, (int, float, str)) for v in box):
            return None
        try:
            values = [float(v) for v in box]
        except (ValueError, OverflowError):
            return None
    x1, y1, x2, y2 = values
    if not all(math.isfinite(v) for v in values) or x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


OBJECTS_SCHEMA = pa.schema(
    [
        pa.field(OBJECT_ID, pa.int64(), nullable=False),
        pa.field(SOURCE_ROW, pa.int64(), nullable=False),
        pa.field("batch_folder", pa.string()),
        pa.field("username", pa.string()),
        pa.field("res_name", pa.string()),
        pa.field("bbox", pa.string()),
        pa.field("tag", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("idx", pa.int64()),
        pa.field("image_name", pa.string()),
        # False when bbox could not be read (kept with ingest.on_bad_bbox: keep).
        pa.field("bbox_ok", pa.bool_(), nullable=False),
    ]
)

#: ``cluster`` is the centre's id; ``sim`` the cosine similarity of the row to its centre
#: (whatever the metric); ``dist`` the distance the model assigns by: with
#: ``train.metric: euclidean`` the Euclidean distance between the row and its centre, with
#: ``cosine`` the Euclidean distance between the L2-normalised row and the unit centre,
#: ``sqrt(2 - 2 sim)`` (0 = same direction, sqrt(2) = orthogonal, 2 = opposite).
ASSIGNMENT_FIELDS = [
    pa.field("cluster", pa.int32(), nullable=False),
    pa.field("dist", pa.float32(), nullable=False),
    pa.field("sim", pa.float32(), nullable=False),
]

#: A block of predictions as returned by :func:`pipeline.kernels.assign_block`.
ASSIGNMENT_DTYPE = np.dtype([("cluster", "<i4"), ("dist", "<f4"), ("sim", "<f4")])

ASSIGNMENTS_SCHEMA = (
    OBJECTS_SCHEMA.append(ASSIGNMENT_FIELDS[0])
    .append(ASSIGNMENT_FIELDS[1])
    .append(ASSIGNMENT_FIELDS[2])
    .append(pa.field(STATUS, pa.string(), nullable=False))
)


def with_extra_fields(base: pa.Schema, source: pa.Schema) -> pa.Schema:
    """``base`` followed by the fields of ``source`` it lacks: the input CSV's extra
    columns, carried through every table after the objects table.

    >>> with_extra_fields(pa.schema([("a", pa.int64())]),
    ...                   pa.schema([("a", pa.int64()), ("raw_tag", pa.string())])).names
    ['a', 'raw_tag']
    """
    for f in source:
        if f.name not in base.names:
            base = base.append(f)
    return base


CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("batch_folder", pa.string()),
        pa.field("username", pa.string()),
        pa.field("res_name", pa.string()),
        pa.field("bbox", pa.string()),
        pa.field("tag", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("idx", pa.int64()),
        pa.field("image_name", pa.string()),
        *ASSIGNMENT_FIELDS,
    ]
)

CLUSTER_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("cluster", pa.int32(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("size_after_dedupe", pa.int64(), nullable=False),
        pa.field("size_after_similarity", pa.int64(), nullable=False),
        pa.field("size_final", pa.int64(), nullable=False),
        pa.field("mean_sim", pa.float64()),
        pa.field("mean_dist", pa.float64()),
        pa.field("mean_sim_final", pa.float64()),
        pa.field("dominant_tags", pa.string()),
        pa.field("kept", pa.bool_(), nullable=False),
        # Health (pipeline.summarize.cluster_health), over every member assigned:
        pa.field("n_users", pa.int64(), nullable=False),
        pa.field("top_user", pa.string()),
        pa.field("top_user_share", pa.float64()),
        pa.field("sim_min", pa.float64()),
        pa.field("sim_median", pa.float64()),
        pa.field("sim_std", pa.float64()),
        pa.field("nearest_cluster", pa.int32()),
        pa.field("nearest_cos", pa.float64()),
        pa.field("single_user", pa.bool_(), nullable=False),
        pa.field("sink", pa.bool_(), nullable=False),
        pa.field("near_duplicate_of", pa.int32()),
    ]
)

#: The reviewer's group of a selected object (``ins_posts_groups``, see :mod:`pipeline.groups`).
GROUP = "group"
#: ``ins_posts_groups.csv``: the write-up's fields, then the group.
GROUPS_CSV_FIELDS: tuple[str, ...] = OUTPUT_CSV_FIELDS + (GROUP,)
GROUPS_SCHEMA = CLUSTERS_SCHEMA.append(pa.field(GROUP, pa.string(), nullable=False))

FUNNEL_SCHEMA = pa.schema(
    [
        pa.field("step", pa.string(), nullable=False),
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("clusters", pa.int64()),
        pa.field("removed", pa.int64(), nullable=False),
    ]
)

#: Why an input row is not clustered, in the order the checks run, each with its kind:
#: ``csv`` (the row itself is malformed), ``selection`` (valid, but left out by
#: ``select.*``) or ``embedding`` (its vector is missing or unusable). The funnel groups
#: rejects by kind, so a reason missing here is an error, never a miscount.
REJECT_REASONS: dict[str, str] = {
    "missing_key": "csv",
    "bad_score": "csv",
    "bad_idx": "csv",
    "bad_bbox": "csv",
    "duplicate_object": "csv",
    "not_selected:tag": "selection",
    "not_selected:score": "selection",
    "path_outside_root": "embedding",
    "not_a_regular_file": "embedding",
    "missing_user_folder": "embedding",
    "missing_embedding_file": "embedding",
    "corrupt_embedding_file": "embedding",
    "wrong_dimension": "embedding",
    "wrong_dtype": "embedding",
    "idx_out_of_range": "embedding",
    "non_finite_vector": "embedding",
    "zero_vector": "embedding",
}
REJECT_KINDS: tuple[str, ...] = ("csv", "selection", "embedding")


def reject_kind(reason: str) -> str:
    """The kind of a reject reason.

    >>> reject_kind("bad_bbox"), reject_kind("not_selected:tag")
    ('csv', 'selection')
    """
    try:
        return REJECT_REASONS[reason]
    except KeyError:
        raise ValueError(
            f"Reject reason {reason!r} has no kind in schema.REJECT_REASONS; add it there."
        ) from None


REJECTS_SCHEMA = pa.schema(
    [
        pa.field(SOURCE_ROW, pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("username", pa.string()),
        pa.field("image_name", pa.string()),
        pa.field("idx", pa.string()),
        pa.field("detail", pa.string()),
    ]
)
