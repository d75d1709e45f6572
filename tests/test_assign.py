"""``pipeline assign``: new objects to a saved model, without refitting.

The oracles: predict's own outputs (assigning the training objects must give the same
bytes), a float64 numpy nearest-centre reference for new objects, and the ingest's rejects
for the same bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import config_for, ingest_only, load_vectors, lock_held_by_another_process
from typer.testing import CliRunner

from pipeline import ids, sinks
from pipeline.assign import assign_objects
from pipeline.cli import app
from pipeline.errors import ConfigError, InputError
from pipeline.runner import run

STAGES = ("ingest", "train", "predict", "postprocess")


def _split_csv(dataset, tmp_path, n_train: int):
    """The dataset's CSV cut in two: the objects a model is fitted on, and later ones
    (new users, the same kinds of objects)."""
    frame = pd.read_csv(dataset.objects_csv, dtype=str, keep_default_na=False)
    train, new = tmp_path / "train.csv", tmp_path / "new.csv"
    frame.iloc[:n_train].to_csv(train, index=False)
    frame.iloc[n_train:].to_csv(new, index=False)
    return train, new


def _with_csv(cfg, csv):
    return cfg.model_copy(update={"input": cfg.input.model_copy(update={"objects_csv": str(csv)})})


def _by_object(url: str) -> pd.DataFrame:
    return sinks.read_parquet(url).sort_values("object_id", ignore_index=True)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_training_objects_reproduce_predict_byte_for_byte(small_dataset, tmp_path, metric):
    cfg = config_for(small_dataset, tmp_path / "run", train={"metric": metric})
    # A re-fit first, so the model's ids are not 0..k-1 and the mapping is exercised.
    run(cfg, stages=STAGES)
    cfg = config_for(small_dataset, tmp_path / "run", train={"metric": metric, "seed": 5})
    catalog = run(cfg, stages=STAGES).catalog
    result = assign_objects(cfg, out=str(tmp_path / "assigned"))
    predicted = _by_object(catalog.postprocessed)
    assigned = _by_object(result.assignments)
    assert len(assigned) == len(predicted) == result.n_assigned
    for column in ("object_id", "source_row", "cluster", "dist", "sim"):
        assert assigned[column].to_numpy().tobytes() == predicted[column].to_numpy().tobytes()
    assert (assigned["status"] == predicted["status"]).all()
    # The selected rows too, in the same order as the run's CSV.
    assert (tmp_path / "assigned" / "ins_posts_clusters.csv").read_bytes() == (
        tmp_path / "run" / "ins_posts_clusters.csv"
    ).read_bytes()
    meta = sinks.read_run_metadata(result.assignments)
    assert meta["model_fingerprint"] == catalog.model_fingerprint()
    summary = json.loads((tmp_path / "assigned" / "assign.json").read_text())
    assert summary["n_assigned"] == len(assigned) and summary["metric"] == metric


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_new_objects_match_numpy_reference(small_dataset, tmp_path, metric):
    train_csv, new_csv = _split_csv(small_dataset, tmp_path, 1600)
    cfg = _with_csv(
        config_for(small_dataset, tmp_path / "run", train={"metric": metric}), train_csv
    )
    catalog = run(cfg, stages=STAGES).catalog
    result = assign_objects(_with_csv(cfg, new_csv), out=str(tmp_path / "new"))
    table = _by_object(result.assignments)
    assert result.n_assigned == len(table) == 400
    vectors = load_vectors(small_dataset, table).astype(np.float64)
    centres = catalog.read_centres().astype(np.float64)
    cluster_ids = catalog.read_cluster_ids()
    if metric == "cosine":
        score = ids.unit_rows(vectors) @ ids.unit_rows(centres).T
        best = np.argmax(score, axis=1)
        sim = score[np.arange(len(best)), best]
        dist = np.sqrt(np.maximum(2 - 2 * sim, 0))
        second = np.sort(score, axis=1)[:, -2]
        clear = score[np.arange(len(best)), best] - second > 1e-5
    else:
        d2 = ((vectors[:, None, :] - centres[None]) ** 2).sum(-1)
        best = np.argmin(d2, axis=1)
        dist = np.sqrt(d2[np.arange(len(best)), best])
        sim = (vectors * centres[best]).sum(1) / (
            np.linalg.norm(vectors, axis=1) * np.linalg.norm(centres[best], axis=1)
        )
        second = np.sort(d2, axis=1)[:, 1]
        clear = second - d2[np.arange(len(best)), best] > 1e-4
    assert clear.mean() > 0.99
    got = table["cluster"].to_numpy()
    assert (got[clear] == cluster_ids[best][clear]).all()
    assert np.allclose(table["sim"].to_numpy()[clear], sim[clear], atol=2e-5)
    assert np.allclose(table["dist"].to_numpy()[clear], dist[clear], atol=1e-4, rtol=1e-5)
    # Post-processing within the model's clusters: one row per image per cluster, sim
    # above the threshold; a cluster the run kept stays kept with fewer than 10 new rows.
    kept = table[table["status"] == "kept"]
    assert not kept.duplicated(["cluster", "image_name"]).any()
    assert (kept["sim"] > 0.7).all()
    run_kept = set(
        sinks.read_parquet(catalog.cluster_summary).query("size_final > 0")["cluster"].tolist()
    )
    assert set(kept["cluster"]) <= run_kept
    small = kept.groupby("cluster").size()
    assert len(kept) > 50 and (small < 10).any()  # 400 new rows: some clusters get few
    selected = pd.read_csv(tmp_path / "new" / "ins_posts_clusters.csv")
    assert list(selected.columns) == ["batch_folder", "username", "res_name", "bbox", "tag",
                                      "score", "idx", "image_name", "cluster", "dist", "sim"]  # fmt: skip
    assert len(selected) == result.n_kept == len(kept)


def test_same_rejects_as_ingest(small_dataset, tmp_path):
    cfg = config_for(small_dataset, tmp_path / "run", train={"metric": "cosine"})
    run(cfg, stages=STAGES)
    # A new CSV: the training CSV with a bad bbox, a bad score and a missing file.
    frame = pd.read_csv(small_dataset.objects_csv, dtype=str, keep_default_na=False)
    frame.loc[3, "bbox"] = "[1, 2"
    frame.loc[5, "score"] = "high"
    frame.loc[7, "image_name"] = "no_such_image"
    csv = tmp_path / "new.csv"
    frame.to_csv(csv, index=False)
    new_cfg = cfg.model_copy(
        update={"input": cfg.input.model_copy(update={"objects_csv": str(csv)})}
    )
    result = assign_objects(new_cfg, out=str(tmp_path / "assigned"))
    rejects = sinks.read_parquet(str(tmp_path / "assigned" / "rejects.parquet"))
    ingest_cfg = _with_csv(config_for(small_dataset, tmp_path / "ingest-only"), csv)
    _, ingest_catalog = ingest_only(ingest_cfg)
    expected = sinks.read_parquet(ingest_catalog.rejects)
    pd.testing.assert_frame_equal(rejects, expected)
    assert "bad_score" in set(rejects["reason"]) and len(rejects) >= 2
    assert result.n_assigned == len(frame) - len(rejects)


def _config_file(cfg, path):
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_cli_errors_are_one_line(small_dataset, matrix_dataset, tmp_path):
    cfg = config_for(small_dataset, tmp_path / "run", train={"metric": "cosine"})
    run(cfg, stages=STAGES)
    config = _config_file(cfg, tmp_path / "c.yaml")
    runner = CliRunner()
    ok = runner.invoke(app, ["assign", "-c", str(config), "--out", str(tmp_path / "a"), "-q"])
    assert ok.exit_code == 0, ok.output
    assert "assign: 2,000 of 2,000 objects assigned" in ok.output
    # Embeddings of another dimension (24, the model has 32): exit 1, one line.
    other = runner.invoke(app, ["assign", "-c", str(config), "--csv", str(matrix_dataset.objects_csv),
                                "--embeddings-matrix", str(matrix_dataset.embeddings_matrix),
                                "--out", str(tmp_path / "b"), "-q"])  # fmt: skip
    assert other.exit_code == 1
    assert other.output.count("error:") == 1 and "model's dimension (32" in other.output
    assert "Traceback" not in other.output
    # Another metric than the model's: a config error, exit 2.
    metric = runner.invoke(app, ["assign", "-c", str(config), "--set", "train.metric=euclidean",
                                 "--out", str(tmp_path / "c"), "-q"])  # fmt: skip
    assert metric.exit_code == 2 and metric.output.count("error:") == 1
    assert "train.metric must be the model's metric ('cosine'" in metric.output
    # Never over the run's own outputs.
    same = runner.invoke(app, ["assign", "-c", str(config), "--out", str(tmp_path / "run"), "-q"])
    assert same.exit_code == 1 and "folder of its own" in same.output


def test_api_errors(small_dataset, tmp_path):
    cfg = config_for(small_dataset, tmp_path / "run", train={"metric": "cosine"})
    with pytest.raises(FileNotFoundError, match="No model at"):
        assign_objects(cfg, out=str(tmp_path / "x"))
    run(cfg, stages=("ingest", "train"))
    with pytest.raises(ConfigError):
        assign_objects(cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"metric": "euclidean"})}), out=str(tmp_path / "x"))  # fmt: skip
    assert issubclass(InputError, ValueError)


def test_assign_takes_the_output_lock(small_dataset, tmp_path):
    """A second writer on the assign folder gets the run's one-line busy error (exit 1)
    and writes nothing; once the holder is gone, assign goes ahead."""
    cfg = config_for(small_dataset, tmp_path / "run", train={"metric": "cosine"})
    run(cfg, stages=("ingest", "train"))
    config = _config_file(cfg, tmp_path / "c.yaml")
    out = tmp_path / "assigned"
    out.mkdir()
    runner = CliRunner()
    with lock_held_by_another_process(out):
        busy = runner.invoke(app, ["assign", "-c", str(config), "--out", str(out), "-q"])
        assert busy.exit_code == 1 and busy.output.count("error:") == 1, busy.output
        assert "is in use by another run" in busy.output and "run holder-run" in busy.output
        assert "Traceback" not in busy.output
        assert not (out / "assignments.parquet").exists()
    ok = runner.invoke(app, ["assign", "-c", str(config), "--out", str(out), "-q"])
    assert ok.exit_code == 0, ok.output
    assert (out / "assignments.parquet").exists()
