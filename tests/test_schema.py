"""``pipeline/schema.py``: the data contract.

* Every reject reason the ingest code can emit has a kind (an AST scan of
  ``pipeline/ingest/*.py``, so a new reason string without a kind fails here, not as a
  miscounted funnel at the end of a long run).
* Field names and order of every schema, written out (the write-up's CSV fields first).
* What the sinks write reads back with these schemas.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema, sinks, summarize
from pipeline.ingest.objects import rejects_frame

INGEST = Path(__file__).resolve().parents[1] / "pipeline" / "ingest"

# How the ingest code hands out a reason: the argument position of each helper, and the
# arrays that hold one reason per row.
REASON_ARGUMENT = {"mark": 1, "reject_all": 0}
REASON_ARRAYS = {"reasons", "reason"}


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def scan_reasons(source: str, filename: str = "<src>") -> tuple[set[str], list[str]]:
    """Reason literals in ``source``, and the places that pass a reason the scan cannot
    read (a variable given to ``mark``/``reject_all``), which would hide a reason."""
    found: set[str] = set()
    opaque: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call) and _name(node.func) in REASON_ARGUMENT:
            position = REASON_ARGUMENT[_name(node.func)]
            args = list(node.args) + [k.value for k in node.keywords if k.arg == "why"]
            arg = args[position] if position < len(args) else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
            else:
                opaque.append(f"{filename}:{node.lineno}")
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if (
                    isinstance(target, ast.Subscript)
                    and _name(target.value) in REASON_ARRAYS
                    and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)
                    and node.value.value  # '' means "no reason"
                ):
                    found.add(node.value.value)
    return found, opaque


def ingest_reasons() -> tuple[set[str], list[str]]:
    found: set[str] = set()
    opaque: list[str] = []
    files = sorted(INGEST.glob("*.py"))
    assert files, INGEST
    for path in files:
        f, o = scan_reasons(path.read_text(encoding="utf-8"), path.name)
        found |= f
        opaque += o
    return found, opaque


def test_every_reason_has_a_known_kind():
    assert set(schema.REJECT_KINDS) == {"csv", "selection", "embedding"}
    for reason, kind in schema.REJECT_REASONS.items():
        assert kind in schema.REJECT_KINDS, reason
        assert schema.reject_kind(reason) == kind
    with pytest.raises(ValueError, match="has no kind"):
        schema.reject_kind("brand_new")


def test_every_reason_the_ingest_emits_has_a_kind():
    found, opaque = ingest_reasons()
    assert not opaque, f"reason passed as a variable (the scan cannot check it): {opaque}"
    unknown = found - set(schema.REJECT_REASONS)
    assert not unknown, f"add these reasons to schema.REJECT_REASONS: {sorted(unknown)}"
    # The scan sees every documented reason, so it is not silently missing a pattern.
    assert found == set(schema.REJECT_REASONS)


def test_the_scan_catches_a_new_reason_and_a_hidden_one():
    source = (
        "def f(mask, job, reasons, i):\n"
        "    mark(mask, 'bad_bbox')\n"
        "    mark(mask, 'brand_new_reason')\n"
        "    reject_all('another_new', 'detail')\n"
        "    reasons[i] = 'third_new'\n"
        "    reasons[:] = ''\n"
        "    mark(mask, why_variable)\n"
    )
    found, opaque = scan_reasons(source)
    assert found == {"bad_bbox", "brand_new_reason", "another_new", "third_new"}
    assert opaque == ["<src>:7"]


# ----------------------------------------------------------------------------- field lists


def test_output_csv_fields_are_the_write_ups():
    assert schema.OUTPUT_CSV_FIELDS == (
        "batch_folder", "username", "res_name", "bbox", "tag", "score", "idx", "image_name",
        "cluster", "dist", "sim",
    )  # fmt: skip
    assert schema.REQUIRED_INPUT_COLUMNS == schema.OUTPUT_CSV_FIELDS[:8]
    assert tuple(schema.CLUSTERS_SCHEMA.names) == schema.OUTPUT_CSV_FIELDS
    assert schema.GROUPS_CSV_FIELDS == (*schema.OUTPUT_CSV_FIELDS, "group")
    assert tuple(schema.GROUPS_SCHEMA.names) == schema.GROUPS_CSV_FIELDS


def test_table_schemas_field_order_and_types():
    assert schema.OBJECTS_SCHEMA.names == [
        "object_id", "source_row", "batch_folder", "username", "res_name", "bbox", "tag",
        "score", "idx", "image_name", "bbox_ok",
    ]  # fmt: skip
    assert schema.ASSIGNMENTS_SCHEMA.names == [
        *schema.OBJECTS_SCHEMA.names, "cluster", "dist", "sim", "status"
    ]  # fmt: skip
    types = {f.name: f.type for f in schema.ASSIGNMENTS_SCHEMA}
    assert (types["cluster"], types["dist"], types["sim"]) == (pa.int32(), pa.float32(),
                                                              pa.float32())  # fmt: skip
    assert (types["score"], types["idx"], types["object_id"]) == (pa.float64(), pa.int64(),
                                                                  pa.int64())  # fmt: skip
    assert schema.ASSIGNMENT_DTYPE.names == ("cluster", "dist", "sim")
    assert [str(schema.ASSIGNMENT_DTYPE[n]) for n in ("cluster", "dist", "sim")] == [
        "int32", "float32", "float32"
    ]  # fmt: skip
    assert schema.REJECTS_SCHEMA.names == [
        "source_row", "reason", "username", "image_name", "idx", "detail"
    ]  # fmt: skip
    assert schema.FUNNEL_SCHEMA.names == ["step", "rows", "clusters", "removed"]
    assert schema.CLUSTER_SUMMARY_SCHEMA.names == [
        "cluster", "size", "size_after_dedupe", "size_after_similarity", "size_final",
        "mean_sim", "mean_dist", "mean_sim_final", "dominant_tags", "kept",
        "n_users", "top_user", "top_user_share", "sim_min", "sim_median", "sim_std",
        "nearest_cluster", "nearest_cos", "single_user", "sink", "near_duplicate_of",
    ]  # fmt: skip
    assert schema.STATUS_ORDER == (
        "removed:duplicate_image", "removed:low_similarity", "removed:small_cluster", "kept"
    )  # fmt: skip


# ----------------------------------------------------------------------------- round trips


def _objects(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "object_id": np.arange(n, dtype=np.int64),
            "source_row": np.arange(n, dtype=np.int64) + 1,
            "batch_folder": ["b"] * n,
            "username": ["u"] * n,
            "res_name": ["r"] * n,
            "bbox": ["[0, 0, 1, 1]"] * n,
            "tag": ["shoe"] * n,
            "score": np.linspace(0, 1, n),
            "idx": np.arange(n, dtype=np.int64),
            "image_name": [f"i{i}" for i in range(n)],
            "bbox_ok": [True] * n,
        }
    )


def _assigned(n: int = 3) -> pd.DataFrame:
    return _objects(n).assign(
        cluster=np.arange(n, dtype=np.int32),
        dist=np.ones(n, np.float32),
        sim=np.full(n, 0.5, np.float32),
        status=schema.STATUS_KEPT,
    )


def _written_schema(tmp_path: Path, frame: pd.DataFrame, target: pa.Schema) -> pa.Schema:
    url = str(tmp_path / "t.parquet")
    sinks.write_parquet(frame, url, target, {"seed": 0})
    return pq.read_schema(url).remove_metadata()


def test_sinks_write_every_table_with_its_schema(tmp_path):
    labelled = _assigned(4).assign(tag=["a", "a", "b", "c"], username=["u", "u", "v", "w"])
    cases = [
        (_objects(), schema.OBJECTS_SCHEMA),
        (_assigned(), schema.ASSIGNMENTS_SCHEMA),
        (_assigned()[list(schema.CLUSTERS_SCHEMA.names)], schema.CLUSTERS_SCHEMA),
        (_assigned().assign(group="g")[list(schema.GROUPS_SCHEMA.names)], schema.GROUPS_SCHEMA),
        (summarize.cluster_summary(labelled, np.eye(6, dtype=np.float32)),
         schema.CLUSTER_SUMMARY_SCHEMA),
        (summarize.funnel(4, {}, labelled), schema.FUNNEL_SCHEMA),
        (
            rejects_frame(
                pd.Series([4, 7]), _objects(2), np.array(["bad_bbox", "zero_vector"], object),
                np.array(["d1", "d2"], object),
            ),
            schema.REJECTS_SCHEMA,
        ),
    ]  # fmt: skip
    for frame, target in cases:
        assert list(frame.columns) == target.names
        assert _written_schema(tmp_path, frame, target).equals(target), target.names
