"""``n_clusters: auto``: the k sweep on the store's sample (pipeline/choose_k.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import config_for

from pipeline import choose_k, run
from pipeline.config import PostprocessConfig
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


# ----------------------------------------------------------------------------- mutation survivors
# Each test below killed a hand mutant that the tests above let through.


def test_candidates_are_capped_at_max_k_and_at_least_two():
    # rows / target = 100: 25, 50, 75, 100, 150, 200 -> 150, 300 -> 150 (deduplicated)
    assert choose_k.candidate_ks(10_000, 100, 150) == [25, 50, 75, 100, 150]
    assert choose_k.candidate_ks(7, 100, 8_192) == [2]


def test_estimated_sizes_round_up_and_tolerate_float_error():
    # A sample cluster of n rows stands for n / share rows; it is kept when that is at
    # least min_cluster_size. 7 rows at a share of 7 / 25 stand for exactly 25 (though
    # 25 * (7 / 25) is 7.000000000000001 in floats); at a share of 0.5, 2 rows stand for
    # 4 < 5 and 3 rows for 6 >= 5.
    labels = np.zeros(7, np.int64)
    sim = np.full(7, 0.9)
    assert 25 * (7 / 25) > 7
    assert choose_k.estimate_kept(labels, sim, None, 7 / 25, 0.7, 25) == (25, 1)
    labels = np.array([0, 0, 1, 1, 1])
    sim = np.full(5, 0.9)
    assert choose_k.estimate_kept(labels, sim, None, 0.5, 0.7, 5) == (6, 1)


def test_quick_labels_are_lloyd_iterations_from_the_seeds():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    seeds = np.array([0, 1, 2, 3, 4])
    # float64 numpy Lloyd: `iterations` centre updates, then the final assignment.
    for iterations in (0, 1, 6):
        c = x[seeds].astype(np.float64)
        for _ in range(iterations):
            labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
            for j in range(len(c)):
                if (labels == j).any():
                    c[j] = x[labels == j].mean(0)
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        expected = d.argmin(1)
        got = choose_k.quick_labels(x, seeds, iterations)
        part = np.sort(d, axis=1)
        clear = part[:, 1] - part[:, 0] > 1e-4  # rows not on a boundary
        np.testing.assert_array_equal(got[clear], expected[clear])
        assert clear.mean() > 0.95


def half_circle(n: int, seed: int) -> np.ndarray:
    """``n`` 2-d rows at evenly spaced angles over a half circle, at random radii."""
    angles = np.linspace(0, np.pi, n)
    radii = np.random.default_rng(seed).uniform(0.2, 5.0, n)
    return (np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]).astype(np.float32)


def best_two_way_mean_cosine(n: int) -> float:
    """The best mean cosine of a half circle's rows to their half's mean direction, over
    every cut into two arcs (brute force, float64)."""
    angles = np.linspace(0, np.pi, n)
    unit = np.stack([np.cos(angles), np.sin(angles)], 1)
    best = -1.0
    for cut in range(1, n):
        total = 0.0
        for part in (unit[:cut], unit[cut:]):
            total += np.linalg.norm(part.sum(0))  # sum of cosines to the mean direction
        best = max(best, total / n)
    return best


@pytest.mark.parametrize("seed", [1, 5])
def test_cosine_sweep_reaches_the_best_split_of_a_half_circle(seed):
    # Directions matter, not radii (the rows are normalised first); the quick fit's Lloyd
    # iterations carry a poor seeding to the best cut; the sample stands for 4x the rows.
    sample = half_circle(400, 0)
    sweep = choose_k.sweep_k(
        sample, None, [2], n_rows=1600, metric="cosine", min_similarity=-1.0,
        min_cluster_size=1, seed=seed, projection_dim=None,
    )  # fmt: skip
    row = sweep.table.iloc[0]
    assert row["mean_sim"] == pytest.approx(best_two_way_mean_cosine(400), abs=1e-4)
    assert (row["rows_kept_est"], row["kept_share"], row["kept_clusters_est"]) == (1600, 1.0, 2)
    assert row["small_clusters"] == 0 and sweep.sample_rows == 400 and sweep.n_rows == 1600


def test_euclidean_sweep_clusters_the_raw_rows():
    # Two groups with the same directions at radii 1 and 5: the Euclidean quick fit splits
    # them by radius (their unit rows would be one group); each row's sim is its cosine to
    # the normalised mean of its group's unit rows.
    rng = np.random.default_rng(0)
    direction = np.eye(16)[0]
    unit = direction + 0.05 * rng.standard_normal((200, 16))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    far = np.arange(200) % 2 == 1
    sample = (unit * np.where(far, 5.0, 1.0)[:, None]).astype(np.float32)
    expected = np.empty(200)
    for members in (far, ~far):
        centre = unit[members].sum(0)
        expected[members] = unit[members] @ (centre / np.linalg.norm(centre))
    sweep = choose_k.sweep_k(
        sample, None, [2], n_rows=200, metric="euclidean", min_similarity=-1.0,
        min_cluster_size=1, seed=0, projection_dim=None,
    )  # fmt: skip
    assert sweep.table["mean_sim"].iloc[0] == pytest.approx(expected.mean(), abs=1e-5)


def test_small_clusters_counts_clusters_of_at_most_two_rows():
    # Three groups of 50 rows and two far pairs: k = 5 finds each; the pairs are small.
    rng = np.random.default_rng(0)
    groups = [rng.standard_normal(8) * 10 + 0.1 * rng.standard_normal((50, 8)) for _ in range(3)]
    pairs = [np.full(8, 100.0 * s) + 0.1 * rng.standard_normal((2, 8)) for s in (1, -1)]
    sample = np.concatenate(groups + pairs).astype(np.float32)
    sweep = choose_k.sweep_k(
        sample, None, [5], n_rows=len(sample), metric="euclidean", min_similarity=-1.0,
        min_cluster_size=3, seed=0, projection_dim=None,
    )  # fmt: skip
    row = sweep.table.iloc[0]
    assert row["small_clusters"] == 2
    assert (row["rows_kept_est"], row["kept_clusters_est"]) == (150, 3)  # pairs < 3 rows


def test_projected_sweep_leaves_the_sample_normalised_and_finds_the_groups():
    # 64 dims projected to 8: the sample is centred for the projection and restored, so
    # afterwards it holds exactly the normalised input rows (as documented).
    rng = np.random.default_rng(2)
    means = rng.standard_normal((6, 64)) * 3 + 5  # far from the origin: centring matters
    rows = np.repeat(means, 40, axis=0) + 0.2 * rng.standard_normal((240, 64))
    sample = rows.astype(np.float32)
    sweep = choose_k.sweep_k(
        sample, None, [3, 6, 12], n_rows=240, metric="euclidean", min_similarity=0.99,
        min_cluster_size=10, seed=0, projection_dim=8,
    )  # fmt: skip
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(sample, unit, rtol=0, atol=1e-5)
    assert sweep.chosen == 6
    assert sweep.table.set_index("k").loc[6, "kept_clusters_est"] == 6


def test_the_seed_changes_the_seeding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)

    def curve(seed):
        return choose_k.sweep_k(
            x.copy(), None, [5, 10, 20], n_rows=300, metric="euclidean", min_similarity=0.5,
            min_cluster_size=1, seed=seed, projection_dim=None,
        ).table["mean_sim"].tolist()  # fmt: skip

    assert curve(0) == curve(0)
    assert curve(0) != curve(1)


@pytest.fixture(scope="module")
def forty_rows(tmp_path_factory):
    """An ingested store of 40 rows (4 groups), for :func:`choose_k.sweep_store`."""
    from tests.conftest import ingest_only

    root = tmp_path_factory.mktemp("forty-rows")
    data = make_demo_dataset(root / "data", n_objects=40, dim=8, n_true_clusters=4, seed=1)
    cfg = config_for(data, root / "out", train={"n_clusters": "auto", "target_cluster_size": 1})
    _, catalog = ingest_only(cfg)
    return cfg, catalog


def test_sweep_store_caps_k_at_half_the_sample(forty_rows):
    # 40 rows / target 1 = 40; candidates 10, 20, 30, 40, ... are capped at 40 // 2 = 20
    # (a chunk and a batch could hold all 40).
    cfg, catalog = forty_rows
    sweep = choose_k.sweep_store(catalog, cfg.train, cfg.postprocess, 1)
    assert sweep.table["k"].tolist() == [10, 20]
    assert sweep.sample_rows == sweep.n_rows == 40


def test_sweep_store_scores_by_the_postprocess_settings(forty_rows):
    cfg, catalog = forty_rows
    rules = PostprocessConfig(dedupe_key=None, min_cluster_size=1, min_similarity=-1.0)

    def kept(**changes):
        post = rules.model_copy(update=changes)
        return choose_k.sweep_store(catalog, cfg.train, post, 1).table["rows_kept_est"].tolist()

    assert kept() == [40, 40]  # every row: no rule removes any
    # No cluster of 40 rows can hold 41; a similarity threshold of 0.999 keeps fewer rows.
    assert kept(min_cluster_size=41) == [0, 0]
    assert all(a < b for a, b in zip(kept(min_similarity=0.999), kept(), strict=True))
