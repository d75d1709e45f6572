"""The stability diagnostic: hand-computed comparisons, the file-order copy, a clean
dataset told apart from a noisy one, and the CLI's cost line."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import config_for, ingest_only
from typer.testing import CliRunner

from pipeline import sinks, store
from pipeline.cli import app
from pipeline.stability import (
    FOUND_JACCARD,
    best_match_jaccard,
    cluster_stability,
    file_order_store,
    pairwise_ari,
    run_stability,
)
from pipeline.synthetic import make_demo_dataset


def test_best_match_jaccard_by_hand():
    ref = np.array([3, 3, 3, 3, 9, 9])
    other = np.array([0, 0, 0, 1, 1, 1])
    # Cluster 3 = rows 0-3: with other 0 (rows 0-2) 3/4, with other 1 (rows 3-5) 1/6.
    # Cluster 9 = rows 4-5: with other 1 (rows 3-5), 2/3.
    best = best_match_jaccard(ref, other)
    assert best.index.tolist() == [3, 9]
    assert best.tolist() == [0.75, 2 / 3]


def test_cluster_stability_by_hand():
    ref = np.array([0, 0, 1, 1, 2, 2])
    same = ref.copy()
    merged = np.array([0, 0, 0, 0, 2, 2])  # clusters 0 and 1 merged: Jaccard 0.5 each
    split = np.array([0, 5, 1, 1, 2, 2])  # cluster 0 split in two: Jaccard 0.5
    table = cluster_stability(ref, [same, merged, split], "shuffled")
    assert table["cluster"].tolist() == [0, 1, 2]
    assert table["size"].tolist() == [2, 2, 2]
    assert FOUND_JACCARD == 0.5
    assert table["found_again"].tolist() == [1.0, 1.0, 1.0]
    assert table["jaccard_min"].tolist() == [0.5, 0.5, 1.0]
    assert table["jaccard_mean"].round(6).tolist() == [round(2 / 3, 6), round(2.5 / 3, 6), 1.0]
    assert pairwise_ari([ref, same]) == [1.0]


def test_file_order_store_is_csv_order(small_config, tmp_path):
    _, catalog = ingest_only(small_config)
    rows = 700
    url = str(tmp_path / "file.zarr")
    positions = file_order_store(catalog.store, rows, url, str(tmp_path / "m.f32"))
    source = store.open_store(catalog.store)
    ids = np.asarray(source[store.OBJECT_IDS][:rows])
    assert (np.diff(ids[positions]) > 0).all()  # CSV order
    copied = store.read_rows(url, 0, rows)
    assert np.array_equal(copied, store.read_rows(catalog.store, 0, rows)[positions])


def _dataset(tmp_path_factory, name, **knobs):
    root = tmp_path_factory.mktemp(name)
    return make_demo_dataset(root, n_objects=2000, dim=64, n_true_clusters=12, seed=4, **knobs)


def test_separates_clean_from_noisy(tmp_path_factory, tmp_path):
    clean = _dataset(tmp_path_factory, "clean", outlier_fraction=0.0, noise_spread=0.05,
                     style_scale=0.0)  # fmt: skip
    noisy = _dataset(tmp_path_factory, "noisy", outlier_fraction=0.2, noise_spread=0.8,
                     style_scale=1.0, rows_per_user=400)  # fmt: skip
    results = {}
    for name, ds in (("clean", clean), ("noisy", noisy)):
        train = {"metric": "cosine", "n_clusters": 12, "refine_iterations": 0, "epochs": 1}
        cfg = config_for(ds, tmp_path / name, train=train)
        _, catalog = ingest_only(cfg)
        lines: list[str] = []
        run_stability(cfg, 3, None, ("shuffled",), echo=lines.append)
        assert lines[0].startswith("stability: 3 fits x 1 order(s)")
        table = sinks.read_parquet(catalog.stability)
        summary = sinks.read_json(catalog.stability_summary)
        results[name] = (table, summary["summary"][0], summary["details"]["shuffled"])
    (ct, cs, cd), (nt, ns, _) = results["clean"], results["noisy"]
    assert len(cd["ari_pairs"]) == 3  # every pair of the 3 fits
    assert cs["ari_between_fits_mean"] > 0.85 > 0.6 > ns["ari_between_fits_mean"]
    assert cs["clusters_found_again_always"] > ns["clusters_found_again_always"] + 0.3
    assert ct["jaccard_mean"].mean() > nt["jaccard_mean"].mean() + 0.2
    assert set(ct["order"]) == {"shuffled"} and ct["size"].sum() == 2000


def test_file_order_and_model_reference(small_dataset, tmp_path):
    from pipeline.runner import run

    cfg = config_for(small_dataset, tmp_path / "out",
                     train={"metric": "cosine", "n_clusters": 20, "refine_iterations": 0})  # fmt: skip
    result = run(cfg, stages=("ingest", "train"))
    text = run_stability(cfg, 2, 1500, ("shuffled", "file"), echo=lambda s: None)
    assert "stability (shuffled order)" in text and "stability (file order)" in text
    table = sinks.read_parquet(result.catalog.stability)
    # The reference is the saved model: its ids, sizes over the 1,500-row sample.
    assert set(table["cluster"]) <= set(result.catalog.read_cluster_ids().tolist())
    for order in ("shuffled", "file"):
        assert table.loc[table["order"] == order, "size"].sum() == 1500
    assert not any(p.name.startswith("stability-") for p in (tmp_path / "out").rglob("*"))


def test_cli_dry_run_prints_cost(small_config, tmp_path):
    ingest_only(small_config)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(small_config.model_dump(mode="json")))
    result = CliRunner().invoke(
        app, ["stability", "-c", str(config), "--dry-run", "--order", "both"]
    )
    assert result.exit_code == 0, result.output
    assert "GFLOP per fit, estimated" in result.output
    assert not (tmp_path / "out" / "stability.parquet").exists()
    bad = CliRunner().invoke(app, ["stability", "-c", str(config), "--order", "sideways"])
    assert bad.exit_code == 1 and bad.output.count("error:") == 1


def test_rejects_too_few_seeds(small_config):
    with pytest.raises(ValueError, match="seeds must be >= 2"):
        run_stability(small_config, 1)
