"""Cluster ids that last: the matching against hand-built centres, and re-fits end to end
(ids kept, the model's ids used by predict and the summary, a groups file surviving)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import yaml
from conftest import config_for

from pipeline import ids, sinks
from pipeline.catalog import Catalog
from pipeline.groups import apply_groups
from pipeline.runner import run


def _rotated(c: np.ndarray, angle_cos: float, rng) -> np.ndarray:
    """Each row moved to cosine ``angle_cos`` with itself, in a random direction."""
    out = []
    for row in ids.unit_rows(c):
        noise = rng.standard_normal(len(row))
        noise -= (noise @ row) * row
        noise /= np.linalg.norm(noise)
        out.append(angle_cos * row + np.sqrt(1 - angle_cos**2) * noise)
    return np.array(out)


def test_permuted_centres_keep_their_ids():
    rng = np.random.default_rng(0)
    old = rng.standard_normal((50, 16))
    perm = rng.permutation(50)
    new = _rotated(old[perm], 0.97, rng) * 3.0  # the scale does not matter (cosine)
    m = ids.match_ids(old, new)
    assert m.ids.tolist() == perm.tolist()
    assert len(m.matched) == 50 and m.new.size == 0 and m.gone.size == 0
    assert np.allclose(np.sort(m.matched_cos), np.sort(np.full(50, 0.97)), atol=1e-9)


def test_below_threshold_is_new_and_old_is_gone():
    old = np.eye(4)  # ids 10, 11, 12, 13
    new = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0.8, 0.6], [0, 0, -1, 0]], float)
    m = ids.match_ids(old, new, old_ids=np.array([10, 11, 12, 13]), retired=np.array([20]))
    # Row 2 has cosine 0.8 with id 12 (< 0.9): new; rows get ids above the retired 20.
    assert m.ids.tolist() == [11, 10, 21, 22]
    assert m.matched.tolist() == [10, 11]
    assert m.new.tolist() == [21, 22]
    assert m.gone.tolist() == [12, 13]
    assert m.retired.tolist() == [12, 13, 20]
    assert "2 of 4 clusters kept their id" in m.summary_line()


def test_threshold_is_inclusive_and_configurable():
    old = np.array([[1.0, 0.0]])
    new = np.array([[0.9, np.sqrt(1 - 0.81)]])  # cosine exactly 0.9 (to rounding)
    assert ids.match_ids(old, new, min_cos=0.9 - 1e-12).ids.tolist() == [0]
    assert ids.match_ids(old, new, min_cos=0.95).ids.tolist() == [1]


def test_matching_is_one_to_one_and_maximises_pairs():
    # X is closest to A, but matching X-A leaves Y without a partner; X-B and Y-A are
    # both above the threshold, so the optimal matching takes those two pairs.
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.93, 0.3676, 0.0])
    x = np.array([0.995, 0.0998, 0.0])
    y = np.array([0.93, -0.3676, 0.0])
    cos = ids.unit_rows(np.array([x, y])) @ ids.unit_rows(np.array([a, b])).T
    assert cos[0, 0] > cos[0, 1] >= 0.9 and cos[1, 0] >= 0.9 and cos[1, 1] < 0.9
    m = ids.match_ids(np.array([a, b]), np.array([x, y]))
    assert m.ids.tolist() == [1, 0]
    assert sorted(m.ids.tolist()) == sorted(set(m.ids.tolist()))


def test_more_new_centres_than_old():
    old = np.eye(3)[:2]
    new = np.eye(3)
    m = ids.match_ids(old, new)
    assert m.ids.tolist() == [0, 1, 2] and m.new.tolist() == [2] and m.gone.size == 0


def test_member_jaccard_counts_shared_members():
    new = np.array([0, 0, 1, 1, 1, 2])
    old = np.array([5, 5, 5, 6, 6, 6]) - 5
    jac = ids.member_jaccard(new, old, 3, 2)
    # new 0 = {0,1}, new 1 = {2,3,4}, new 2 = {5}; old 0 = {0,1,2}, old 1 = {3,4,5}.
    assert np.allclose(jac, [[2 / 3, 0], [1 / 5, 2 / 4], [0, 1 / 3]])
    with pytest.raises(ValueError, match="same rows"):
        ids.member_jaccard(new, old[:-1], 3, 2)


def test_same_members_keep_the_id_when_centres_drift():
    # Two loose clusters whose centres moved to cosine 0.8 between the fits while their
    # members stayed: centre cosine alone calls both new (the old behaviour); the member
    # Jaccard keeps their ids. A third new centre is close to old 2 but holds none of its
    # members (they went elsewhere): it still matches by centre cosine.
    rng = np.random.default_rng(1)
    old = ids.unit_rows(rng.standard_normal((3, 32)))
    new = np.vstack([_rotated(old[1:2], 0.8, rng), _rotated(old[0:1], 0.8, rng),
                     _rotated(old[2:3], 0.95, rng)])  # fmt: skip
    old_labels = np.repeat([0, 1, 2], [40, 30, 10])
    new_labels = np.repeat([1, 0, 0], [40, 30, 10])  # old 2's members joined new 0
    new_labels[:3] = 2  # and new 2 took three rows of old 0
    jac = ids.member_jaccard(new_labels, old_labels, 3, 3)
    assert ids.match_ids(old, new).ids.tolist() == [3, 4, 2]  # centres alone
    m = ids.match_ids(old, new, jaccard=jac, member_rows=len(new_labels))
    assert m.ids.tolist() == [1, 0, 2]
    assert m.new.size == 0 and m.gone.size == 0 and m.matched_by_members == 2
    assert m.matched_jaccard.tolist() == pytest.approx([37 / 40, 30 / 40, 0.0])
    described = m.describe()
    assert described["min_jaccard"] == ids.SAME_CLUSTER_JACCARD
    assert described["matched_by_members"] == 2 and described["member_rows"] == 80
    assert "member Jaccard >= 0.5 on 80 rows" in m.summary_line()
    # Below the Jaccard threshold and the cosine threshold: a new cluster.
    low = ids.match_ids(old, new, jaccard=np.minimum(jac, 0.49))
    assert low.ids.tolist() == [3, 4, 2]


def test_member_rule_never_pairs_one_cluster_twice():
    # Old 0 shares 0.6 of its members with new 0 (centres orthogonal) and is at centre
    # cosine 0.95 from new 1: both pairs qualify, but the matching is one-to-one, so the
    # pair of larger cosine + Jaccard (new 1: 0.95 + 0.1 > 0 + 0.6) keeps id 0.
    old = np.eye(3)[:2]
    new = np.array([[0.0, 0.0, 1.0], [0.95, 0.0, np.sqrt(1 - 0.95**2)]])
    jac = np.array([[0.6, 0.0], [0.1, 0.0]])
    m = ids.match_ids(old, new, jaccard=jac)
    assert m.ids.tolist() == [2, 0] and m.gone.tolist() == [1] and m.matched_by_members == 0


def test_sort_by_id_orders_rows():
    centres, cluster_ids, order = ids.sort_by_id(np.arange(6.0).reshape(3, 2), np.array([7, 2, 5]))
    assert cluster_ids.tolist() == [2, 5, 7]
    assert centres.tolist() == [[2, 3], [4, 5], [0, 1]]
    assert order.tolist() == [1, 2, 0]


def test_mismatched_widths_raise():
    with pytest.raises(ValueError, match="one width"):
        ids.match_ids(np.eye(2), np.eye(3))


# --------------------------------------------------------------------------- end to end


def _nearest_reference(vectors: np.ndarray, centres: np.ndarray, cluster_ids, metric: str):
    if metric == "cosine":
        scores = ids.unit_rows(vectors) @ ids.unit_rows(centres).T
        return cluster_ids[np.argmax(scores, axis=1)]
    d = ((vectors[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(-1)
    return cluster_ids[np.argmin(d, axis=1)]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_refit_with_another_seed_keeps_ids_and_groups(small_dataset, tmp_path, caplog, metric):
    out = tmp_path / "out"
    train = {"metric": metric, "n_clusters": 20}
    first = run(config_for(small_dataset, out, train=train))
    catalog = first.catalog
    old_ids = catalog.read_cluster_ids()
    assert old_ids.tolist() == list(range(20))
    summary = sinks.read_parquet(catalog.cluster_summary)
    kept = summary[summary["size_final"] > 0].sort_values("size_final", ascending=False)
    picked = kept["cluster"].head(4).tolist()
    groups_file = tmp_path / "groups.yaml"
    groups_file.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {"name": "a", "clusters": picked[:2]},
                    {"name": "b", "clusters": picked[2:]},
                ]
            }
        )  # fmt: skip
    )
    cfg = config_for(small_dataset, out, train=train)
    before = apply_groups(cfg, groups_file).table

    cfg2 = config_for(small_dataset, out, train={**train, "seed": 7})
    with caplog.at_level(logging.INFO, logger="pipeline"):
        second = run(cfg2)
    assert "train" not in second.skipped
    assert any("kept their id" in r.getMessage() for r in caplog.records)
    info = catalog.read_model_description()["ids"]
    new_ids = catalog.read_cluster_ids()
    assert info["previous_model"] == catalog.model
    assert info["matched"] + len(info["new"]) == 20
    assert set(info["gone"]) == set(old_ids) - set(new_ids)
    assert all(i >= 20 for i in info["new"])
    # 20 true groups, another seed: most are found again (the Euclidean fit wastes more
    # centres on a dataset this small, so fewer of its clusters are stable).
    assert info["matched"] >= (14 if metric == "cosine" else 10)
    if metric == "cosine":  # the clusters a reviewer could pick: >= 90 % keep their id
        assert info["previous_kept_matched"] >= 0.9 * info["previous_kept"]

    # Predict and the summary speak in the model's ids.
    centres = catalog.read_centres()
    assignments = sinks.read_parquet(catalog.assignments).sort_values("object_id")
    summary2 = sinks.read_parquet(catalog.cluster_summary)
    assert summary2["cluster"].tolist() == new_ids.tolist()
    vectors = _vectors(catalog, assignments["object_id"].to_numpy())
    reference = _nearest_reference(vectors, centres, new_ids, metric)
    agree = (reference == assignments["cluster"].to_numpy()).mean()
    assert agree > 0.999  # float32 vs float64 ties aside
    assert set(summary2["nearest_cluster"]) <= set(new_ids.tolist())

    # Matched clusters are the same objects: the groups file applies to the new run, each
    # surviving cluster with (nearly) the members it had.
    survivors = [c for c in picked if c in set(new_ids.tolist())]
    after = apply_groups(cfg2, groups_file).table
    assert set(after["cluster"]) <= set(survivors) and len(after["cluster"].unique()) >= 2
    jaccards = []
    for cluster in set(after["cluster"]):
        old_members = set(before.loc[before["cluster"] == cluster, "object_id"])
        new_members = set(after.loc[after["cluster"] == cluster, "object_id"])
        jaccards.append(len(old_members & new_members) / len(old_members | new_members))
    print("member Jaccard of surviving clusters:", np.round(jaccards, 3))
    assert min(jaccards) > 0.5 and np.mean(jaccards) > 0.8
    meta = sinks.read_run_metadata(catalog.groups_parquet)
    assert meta["model_fingerprint"] == catalog.model_fingerprint()

    # Exclusions written against the first run (valid there: selected objects of the
    # group's clusters): an object the re-fit moved out of its group's clusters is skipped
    # with one warning line; one still there is excluded.
    selected_now = sinks.read_parquet(catalog.clusters_parquet, columns=["object_id", "cluster"])
    spec = yaml.safe_load(groups_file.read_text())
    left, stayed = [], []
    for group in spec["groups"]:
        now = set(selected_now.loc[selected_now["cluster"].isin(group["clusters"]), "object_id"])
        members = before.loc[before["group"] == group["name"], "object_id"].tolist()
        gone_objects = [o for o in members if o not in now][:2]
        still = [o for o in members if o in now][:1]
        group["exclude_objects"] = gone_objects + still
        left, stayed = left + gone_objects, stayed + still
    assert left  # another seed moves some objects
    groups_file.write_text(yaml.safe_dump(spec))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        excluded = apply_groups(cfg2, groups_file).table
    lines = [r.getMessage() for r in caplog.records if "excluded by group" in r.getMessage()]
    assert sorted(int(line.split("object ")[1].split()[0]) for line in lines) == sorted(left)
    assert set(excluded["object_id"]) == set(after["object_id"]) - set(stayed)
    # The 'groups' command applies the file, then rebuilds the report with it: still one
    # line per object skipped and per cluster gone.
    from typer.testing import CliRunner

    from pipeline.cli import app

    config = tmp_path / "c2.yaml"
    config.write_text(yaml.safe_dump(cfg2.model_dump(mode="json")))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        done = CliRunner().invoke(app, ["groups", "-c", str(config), "-f", str(groups_file)])
    assert done.exit_code == 0, done.output
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("excluded by group" in line for line in warned) == len(left)
    assert sum("is gone" in line for line in warned) == len(set(picked) & set(info["gone"]))


def _vectors(catalog: Catalog, object_ids: np.ndarray) -> np.ndarray:
    from pipeline import store

    group = store.open_store(catalog.store)
    stored_ids = np.asarray(group["object_ids"][:])
    vectors = np.asarray(group["vectors"][:])
    pos = np.empty(stored_ids.max() + 1, np.int64)
    pos[stored_ids] = np.arange(len(stored_ids))
    return vectors[pos[object_ids]]


def test_gone_cluster_is_one_warning_line_and_dropped(small_dataset, tmp_path, caplog):
    out = tmp_path / "out"
    cfg = config_for(small_dataset, out, train={"metric": "cosine", "n_clusters": 20})
    run(cfg)
    catalog = Catalog.from_config(cfg)
    summary = sinks.read_parquet(catalog.cluster_summary)
    kept = summary.loc[summary["size_final"] > 0, "cluster"].tolist()
    removed = summary.loc[summary["size_final"] == 0, "cluster"].tolist()
    assert removed  # 20 centres on this data: some clusters end below 10 rows
    # As if a re-fit had lost one kept cluster (retired) and the previous run had kept a
    # cluster that this run's post-processing removes.
    description = catalog.read_model_description()
    description["ids"]["retired"] = [kept[0]]
    description["ids"]["previous_kept_ids"] = [*kept, removed[0]]
    (out / "model" / "model.json").write_text(json.dumps(description))
    groups_file = tmp_path / "groups.yaml"
    groups = [{"name": "g", "clusters": kept[:2]}, {"name": "h", "clusters": [removed[0]]}]
    groups_file.write_text(yaml.safe_dump({"groups": groups}))
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        result = apply_groups(cfg, groups_file)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("is gone" in line for line in lines) == 1
    assert any(f"cluster {kept[0]} of group 'g' (groups.0) is gone" in line for line in lines)
    assert any(f"cluster {removed[0]} of group 'h' (groups.1) is no longer kept" in line
               for line in lines)  # fmt: skip
    assert any("group 'h' (groups.1) has no cluster left; dropped" in line for line in lines)
    assert set(result.table["cluster"]) == {kept[1]}
    # A cluster the previous run did not keep either is still a mistake in the file.
    if len(removed) > 1:
        groups_file.write_text(
            yaml.safe_dump({"groups": [{"name": "x", "clusters": [removed[1]]}]})
        )
        with pytest.raises(ValueError, match="removed by post-processing"):
            apply_groups(cfg, groups_file)


def test_previous_model_key_and_keep_ids_off(small_dataset, tmp_path):
    train = {"metric": "cosine", "n_clusters": 20}
    first = run(config_for(small_dataset, tmp_path / "a", train=train))
    # Another folder, another seed, numbered after the first folder's model.
    cfg = config_for(small_dataset, tmp_path / "b",
                     train={**train, "seed": 3, "previous_model": first.catalog.model})  # fmt: skip
    second = run(cfg, stages=("ingest", "train"))
    info = second.catalog.read_model_description()["ids"]
    assert info["previous_model"] == first.catalog.model and info["matched"] >= 14
    off = run(config_for(small_dataset, tmp_path / "b", train={**train, "seed": 4,
              "keep_ids": False}), stages=("ingest", "train"))  # fmt: skip
    assert off.catalog.read_cluster_ids().tolist() == list(range(20))
    assert off.catalog.read_model_description()["ids"]["previous_model"] is None


def test_refit_keeps_every_cluster_that_shares_most_of_its_members(small_dataset, tmp_path):
    """The "same cluster" rule checked against both runs' own assignments (an oracle
    independent of the matching code): every kept id is a pair of centre cosine >= 0.9 or
    member Jaccard >= 0.5, and no new cluster and gone id could have been paired by either
    rule (the matching is maximal). Centre cosine alone leaves such pairs unmatched."""
    import pandas as pd

    train = {"metric": "cosine", "n_clusters": 20, "epochs": 1, "refine_iterations": 0}
    stages = ("ingest", "train", "predict")
    first = run(config_for(small_dataset, tmp_path / "a", train=train), stages=stages).catalog
    cfg = config_for(small_dataset, tmp_path / "b",
                     train={**train, "seed": 7, "previous_model": first.model})  # fmt: skip
    second = run(cfg, stages=stages).catalog
    info = second.read_model_description()["ids"]
    assert info["min_jaccard"] == ids.SAME_CLUSTER_JACCARD
    assert info["member_rows"] == 2000  # 200 x k rows, capped at the store's

    old = sinks.read_parquet(first.assignments, columns=["object_id", "cluster"])
    new = sinks.read_parquet(second.assignments, columns=["object_id", "cluster"])
    both = old.merge(new, on="object_id", suffixes=("_old", "_new"))
    common = pd.crosstab(both["cluster_new"], both["cluster_old"])
    sizes_new, sizes_old = common.sum(axis=1), common.sum(axis=0)
    jaccard = common / (sizes_new.to_numpy()[:, None] + sizes_old.to_numpy()[None, :] - common)
    old_ids, new_ids = first.read_cluster_ids(), second.read_cluster_ids()
    cos = pd.DataFrame(
        ids.unit_rows(second.read_centres()) @ ids.unit_rows(first.read_centres()).T,
        index=new_ids,
        columns=old_ids,
    )

    def jac(n: int, o: int) -> float:
        return float(jaccard.at[n, o]) if n in jaccard.index and o in jaccard.columns else 0.0

    def same(n: int, o: int) -> bool:
        return cos.at[n, o] >= ids.SAME_CLUSTER_COS or jac(n, o) >= ids.SAME_CLUSTER_JACCARD

    kept = sorted(set(new_ids) & set(old_ids))
    assert len(kept) == info["matched"]
    assert all(same(c, c) for c in kept)
    by_members = [c for c in kept if cos.at[c, c] < ids.SAME_CLUSTER_COS]
    assert len(by_members) == info["matched_by_members"] >= 1  # what cosine alone misses
    assert all(jac(c, c) >= ids.SAME_CLUSTER_JACCARD for c in by_members)
    assert not [(n, o) for n in info["new"] for o in info["gone"] if same(n, o)]
