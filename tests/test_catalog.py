"""``pipeline/catalog.py``: the output layout and the small readers/writers, on real
files. The saved estimator is checked against numpy's nearest centre."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

from pipeline import store
from pipeline.catalog import Catalog, run_metadata
from pipeline.config import Config, OutputConfig
from pipeline.errors import MissingInputError, StageOrderError

EXPECTED_NAMES = {
    "store": "embeddings.zarr",
    "objects": "objects.parquet",
    "embedding_files": "embedding_files.parquet",
    "rejects": "rejects.parquet",
    "ingest_summary": "ingest.json",
    "model": "model",
    "assignments": "assignments.parquet",
    "postprocessed": "postprocessed.parquet",
    "clusters_parquet": "ins_posts_clusters.parquet",
    "clusters_csv": "ins_posts_clusters.csv",
    "cluster_summary": "cluster_summary.parquet",
    "funnel": "funnel.parquet",
    "summary_markdown": "summary.md",
    "report": "report",
    "markers": "_markers",
    "manifest": "_manifest.json",
    "groups_csv": "ins_posts_groups.csv",
    "groups_parquet": "ins_posts_groups.parquet",
}


def test_layout_every_output_under_output_dir(tmp_path):
    root = str(tmp_path / "out")
    c = Catalog.from_config(OutputConfig(dir=root + "/"))  # trailing slash dropped
    assert c.root == root
    fields = {f.name for f in dataclasses.fields(c)}
    assert fields == {"root", "staging", *EXPECTED_NAMES}
    for name, leaf in EXPECTED_NAMES.items():
        assert getattr(c, name) == f"{root}/{leaf}", name
    # The staging memmap defaults to a folder inside the output dir, one per output folder
    # and one file per run.
    assert c.staging.startswith(f"{root}/_staging/") and len(c.staging.rsplit("/", 1)[1]) == 12
    assert c.memmap("r1") == f"{c.staging}/embeddings-r1.f32"
    assert c.report_index == f"{root}/report/index.html"
    assert c.marker_url("train") == f"{root}/_markers/train.json"


def test_layout_options(tmp_path):
    cfg = Config.model_validate(
        {"output": {"dir": f"file://{tmp_path}/o", "staging_dir": str(tmp_path / "fast"),
                    "csv_name": "mine.csv"}}
    )  # fmt: skip
    c = Catalog.from_config(cfg)  # the whole config works too
    assert c == Catalog.from_config(cfg.output)
    assert c.root == f"{tmp_path}/o"  # file:// URLs become plain paths
    assert c.staging.startswith(f"{tmp_path}/fast/")
    other = Catalog.from_config(OutputConfig(dir=f"{tmp_path}/p", staging_dir=f"{tmp_path}/fast"))
    assert other.staging != c.staging  # two outputs sharing staging_dir never share files
    assert c.clusters_csv == f"{tmp_path}/o/mine.csv"
    assert c.clusters_parquet == f"{tmp_path}/o/mine.parquet"


def test_layout_on_an_object_store_stages_locally():
    c = Catalog.from_config(OutputConfig(dir="memory://bucket/run"))
    assert c.store == "memory://bucket/run/embeddings.zarr"
    assert c.model == "memory://bucket/run/model"
    # The memmap is a numpy.memmap: it must be a local file, never on the object store.
    assert "://" not in c.staging and store.is_local(c.memmap("r1"))


# ----------------------------------------------------------------------------- model


def test_write_model_and_read_centres_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    estimator = MiniBatchKMeans(n_clusters=4, n_init=1, random_state=0, batch_size=64).fit(x)
    c = Catalog.from_config(OutputConfig(dir=str(tmp_path / "out")))
    centres64 = estimator.cluster_centers_.astype(np.float64)
    c.write_model(centres64, estimator, {"plan": "TrainPlan(...)", "path": Path("/x")})

    files = sorted(p.name for p in Path(c.model).iterdir())
    assert files == ["centers.npy", "kmeans.joblib", "model.json"]
    centres = c.read_centres()
    assert centres.dtype == np.float32 and centres.shape == (4, 6)
    np.testing.assert_array_equal(centres, centres64.astype(np.float32))
    assert json.loads((Path(c.model) / "model.json").read_text()) == {
        "plan": "TrainPlan(...)", "path": "/x"
    }  # fmt: skip

    loaded = joblib.load(Path(c.model) / "kmeans.joblib")
    new = rng.standard_normal((500, 6)).astype(np.float32)
    d = ((new[:, None, :].astype(np.float64) - loaded.cluster_centers_[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(loaded.predict(new), d.argmin(axis=1))
    np.testing.assert_array_equal(loaded.cluster_centers_, estimator.cluster_centers_)
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["model"]  # no temporaries


def test_write_model_replaces_the_previous_one(tmp_path):
    c = Catalog.from_config(OutputConfig(dir=str(tmp_path)))
    c.write_model(np.zeros((2, 3)), None, {})
    (Path(c.model) / "stale.txt").write_text("old")
    c.write_model(np.ones((5, 3)), None, {})
    assert c.read_centres().shape == (5, 3)
    assert not (Path(c.model) / "stale.txt").exists()


def test_read_centres_before_train(tmp_path):
    c = Catalog.from_config(OutputConfig(dir=str(tmp_path)))
    with pytest.raises(StageOrderError, match="Run the 'train' stage first"):
        c.read_centres()


# ----------------------------------------------------------------------------- markers


def test_markers_write_read_clear(tmp_path):
    c = Catalog.from_config(OutputConfig(dir=str(tmp_path)))
    assert c.read_marker("train") is None
    marker = {"key": "abc123", "finished": "2024-01-01", "counts": [1, 2]}
    c.write_marker("train", marker)
    assert c.read_marker("train") == marker
    assert json.loads(Path(c.marker_url("train")).read_text()) == marker
    assert c.read_marker("ingest") is None  # markers are per stage
    c.clear_marker("train")
    assert c.read_marker("train") is None and not Path(c.marker_url("train")).exists()
    c.clear_marker("train")  # clearing twice is fine


@pytest.mark.parametrize(
    "content",
    ['{"key": "abc", "fin', "", "not json", "[1, 2]", '"key"', '{"no_key": 1}', "\x00\x01"],
)
def test_corrupt_marker_reads_as_none(tmp_path, content):
    c = Catalog.from_config(OutputConfig(dir=str(tmp_path)))
    Path(c.markers).mkdir(parents=True)
    Path(c.marker_url("predict")).write_text(content)
    assert c.read_marker("predict") is None


def test_marker_that_is_not_utf8_reads_as_none(tmp_path):
    c = Catalog.from_config(OutputConfig(dir=str(tmp_path)))
    Path(c.markers).mkdir(parents=True)
    Path(c.marker_url("predict")).write_bytes(b'{"key": "\xff\xfe"}')
    assert c.read_marker("predict") is None


# ----------------------------------------------------------------------------- the rest


def test_store_shape_from_store_attributes(tmp_path):
    c = Catalog.from_config(OutputConfig(dir=str(tmp_path)))
    with pytest.raises(MissingInputError):
        c.store_shape()
    store.create_store(c.store, 10, 4, 3, attrs={"n_rows": 10, "dim": 4, "chunk_rows": 3})
    assert c.store_shape() == (10, 4, 3)


def test_ingest_summary_round_trip_and_exists(tmp_path):
    c = Catalog.from_config(OutputConfig(dir=str(tmp_path)))
    assert not Catalog.exists(c.ingest_summary)
    c.write_ingest_summary({"n_rows": 3, "rejected": {"bad_bbox": 1}})
    assert Catalog.exists(c.ingest_summary)
    assert c.read_ingest_summary() == {"n_rows": 3, "rejected": {"bad_bbox": 1}}


def test_run_metadata():
    cfg = Config.model_validate({"train": {"seed": 42}})
    meta = run_metadata(cfg, {"n_clusters": 7})
    assert meta["seed"] == 42 and meta["n_clusters"] == 7
    assert meta["config"]["train"]["seed"] == 42
    assert Config.model_validate(meta["config"]) == cfg  # the config is complete
    assert "scikit-learn" in meta["versions"]
    json.dumps(meta)  # JSON-ready


@pytest.mark.parametrize(
    ("csv_name", "message"),
    [
        ("../../x.csv", "plain file name"),
        ("sub/x.csv", "plain file name"),
        ("embeddings.zarr", "plain file name"),  # not .csv
        ("cluster_summary.csv", "'cluster_summary' and 'clusters_parquet' the same file"),
        ("funnel.csv", "the same file"),
    ],
)
def test_csv_name_must_be_a_plain_unreserved_name(tmp_path, csv_name, message):
    from pydantic import ValidationError

    from pipeline.errors import ConfigError
    from pipeline.plan import plan_run

    with pytest.raises((ConfigError, ValidationError), match=message):
        cfg = Config.model_validate({"output": {"dir": str(tmp_path), "csv_name": csv_name}})
        plan_run(cfg)


def test_no_output_may_overwrite_an_input(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.plan import plan_run

    cfg = Config.model_validate(
        {"input": {"objects_csv": str(tmp_path / "input.csv")},
         "output": {"dir": str(tmp_path), "csv_name": "input.csv"}}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="would overwrite its own input"):
        plan_run(cfg)
