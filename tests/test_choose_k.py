"""``n_clusters: auto``: the k sweep on the store's sample (pipeline/choose_k.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import config_for

from pipeline import choose_k, run
from pipeline.synthetic import make_demo_dataset


@pytest.fixture(scope="module")
def forty_groups(tmp_path_factory):
    """40 well-separated true groups, 3,000 rows: the sweep's centre (rows / 100 = 30) is
    not the answer, so a k found from the data must move away from it."""
    root = tmp_path_factory.mktemp("forty")
    return make_demo_dataset(root, n_objects=3000, dim=32, n_true_clusters=40, seed=5,
                             outlier_fraction=0.0)  # fmt: skip


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_auto_finds_the_true_number_of_groups(forty_groups, tmp_path, metric):
    cfg = config_for(forty_groups, tmp_path / metric, ingest={"chunk_rows": 512},
                     train={"n_clusters": "auto", "target_cluster_size": 100,
                            "batch_size": 512, "metric": metric})  # fmt: skip
    result = run(cfg, ("ingest", "train"))
    curve = result.catalog.read_model_table(choose_k.TABLE_NAME)
    assert curve["k"].tolist() == [8, 15, 22, 30, 45, 60, 90]
    description = json.loads((tmp_path / metric / "model" / "model.json").read_text())
    chosen = description["k_sweep"]["chosen"]
    assert chosen == 45  # the candidate nearest the 40 true groups
    assert curve.loc[curve["chosen"], "k"].tolist() == [chosen]
    assert len(result.catalog.read_centres()) == chosen
    # The score is what the rule maximises, and more centres never keep fewer rows by much.
    np.testing.assert_array_equal(curve["score"], curve["rows_kept_est"] - 10 * curve["k"])
    assert curve["rows_kept_est"].is_monotonic_increasing or (
        curve["rows_kept_est"].diff().min() > -0.02 * 3000
    )


def test_the_sweep_reruns_when_the_rules_it_scores_by_change(small_dataset, tmp_path):
    auto = config_for(small_dataset, tmp_path / "auto", train={"n_clusters": "auto"})
    run(auto, ("ingest", "train"))
    stricter = auto.model_copy(
        update={"postprocess": auto.postprocess.model_copy(update={"min_similarity": 0.9})}
    )
    assert run(stricter, ("ingest", "train")).skipped == ["ingest"]
    fixed = config_for(small_dataset, tmp_path / "fixed")
    run(fixed, ("ingest", "train"))
    stricter = fixed.model_copy(
        update={"postprocess": fixed.postprocess.model_copy(update={"min_similarity": 0.9})}
    )
    assert run(stricter, ("ingest", "train")).skipped == ["ingest", "train"]


def test_estimate_on_a_half_sample_scales_sizes_and_counts():
    # Hand-built: cluster 0 has 3 rows above 0.7 (6 in the whole data), cluster 1 has
    # one above (2 in the whole data), and image "a" appears twice in cluster 0.
    labels = np.array([0, 0, 0, 0, 1, 1])
    sim = np.array([0.9, 0.8, 0.95, 0.75, 0.9, 0.1])
    keys = np.array(["a", "b", "a", "c", "d", "e"])
    # Dedupe leaves 0.95(a), 0.8(b), 0.75(c) in cluster 0 and 0.9(d) in cluster 1.
    assert choose_k.estimate_kept(labels, sim, keys, 0.5, 0.7, 6) == (6, 1)
    assert choose_k.estimate_kept(labels, sim, keys, 0.5, 0.7, 2) == (8, 2)
    assert choose_k.estimate_kept(labels, sim, None, 1.0, 0.7, 1) == (5, 2)


def test_full_dim_similarity_is_the_cosine_to_the_normalised_member_mean():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    labels = rng.integers(0, 4, 50)
    sim = choose_k.full_dim_similarity(rows, labels, 4)
    for c in range(4):
        centre = rows[labels == c].mean(axis=0)
        expected = rows[labels == c] @ (centre / np.linalg.norm(centre))
        np.testing.assert_allclose(sim[labels == c], expected, rtol=1e-5, atol=1e-6)


def test_choose_prefers_the_smaller_k_on_a_tie():
    table = pd.DataFrame({"k": [10, 20], "rows_kept_est": [100, 200]})
    assert choose_k.choose(table, 10) == 10


def test_the_curve_is_in_the_summary_and_the_report(small_dataset, tmp_path):
    cfg = config_for(small_dataset, tmp_path / "auto", train={"n_clusters": "auto"})
    result = run(cfg)
    curve = result.catalog.read_model_table(choose_k.TABLE_NAME)
    chosen = int(curve.loc[curve["chosen"], "k"].iloc[0])
    summary = (tmp_path / "auto" / "summary.md").read_text()
    assert f"## Choosing k (n_clusters: auto): k = {chosen}" in summary
    for k, kept in zip(curve["k"], curve["rows_kept_est"], strict=True):
        assert f"| {k} | {kept} |" in summary
    index = (tmp_path / "auto" / "report" / "index.html").read_text()
    table = index[index.index('id="k-sweep"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr") == len(curve) + 1  # header + one row per candidate
    assert table.count(">chosen<") == 1
