"""``pipeline/summarize.py`` against hand-built tables whose answers are written out here.

The labelled table (10 rows, clusters 0..4 of k = 5):

=====  =======  =====  ====  ====  =======================
 obj   cluster   sim   dist  tag   status
=====  =======  =====  ====  ====  =======================
  0       0     0.90   1.0   shoe  kept
  1       0     0.80   2.0   shoe  kept
  2       0     0.80   3.0   bag   removed:duplicate_image
  3       0     0.60   4.0   shoe  removed:low_similarity
  4       1     0.95   0.5   bag   kept
  5       1     0.75   1.5   bag   kept
  6       2     0.90   1.0   face  removed:small_cluster
  7       2     0.50   2.0   face  removed:low_similarity
  8       4     0.70   1.0   hat   removed:duplicate_image
  9       4     0.72   3.0   shoe  removed:small_cluster
=====  =======  =====  ====  ====  =======================

Cluster 3 has no row (empty); cluster 4 loses every row; 0 and 1 tie on the final size
and 1, 2 and 4 on the size before post-processing. Users: cluster 0 u1, u1, u2, u1;
cluster 1 u4, u3; cluster 2 u5, u5; cluster 4 u7, u6. Centres (2-d): c0 (1, 0),
c1 (1, 0.05), c2 (0, 1), c3 (-1, 0), c4 (0, -1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import schema, summarize

KEPT, DUP, LOW, SMALL = (
    schema.STATUS_KEPT,
    schema.STATUS_DUPLICATE,
    schema.STATUS_LOW_SIMILARITY,
    schema.STATUS_SMALL_CLUSTER,
)


@pytest.fixture
def labelled() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "object_id": np.arange(10, dtype=np.int64),
            "cluster": np.array([0, 0, 0, 0, 1, 1, 2, 2, 4, 4], dtype=np.int32),
            "sim": np.array([0.9, 0.8, 0.8, 0.6, 0.95, 0.75, 0.9, 0.5, 0.7, 0.72]),
            "dist": np.array([1.0, 2.0, 3.0, 4.0, 0.5, 1.5, 1.0, 2.0, 1.0, 3.0]),
            "tag": ["shoe", "shoe", "bag", "shoe", "bag", "bag", "face", "face", "hat", "shoe"],
            "status": [KEPT, KEPT, DUP, LOW, KEPT, KEPT, SMALL, LOW, DUP, SMALL],
            "username": ["u1", "u1", "u2", "u1", "u4", "u3", "u5", "u5", "u7", "u6"],
        }
    )


CENTRES = np.array([[1, 0], [1, 0.05], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)


@pytest.fixture
def summary(labelled) -> pd.DataFrame:
    return summarize.cluster_summary(labelled, CENTRES)


# ----------------------------------------------------------------------------- dominant tags


@pytest.mark.parametrize(
    ("tags", "top", "expected"),
    [
        (["shoe", "shoe", "shoe", "bag"], 3, "shoe 75%, bag 25%"),
        (["bag"], 3, "bag 100%"),
        (["hat", "shoe"], 3, "hat 50%, shoe 50%"),  # tie: alphabetical
        (["shoe", "hat"], 3, "hat 50%, shoe 50%"),  # whatever the input order
        (["b", "a", "c", "d", "a", "b"], 3, "a 33%, b 33%, c 17%"),  # 4th (d) cut, c wins tie
        (["b", "a", "c", "d", "a", "b"], 1, "a 33%"),
        (["x", "y", "y", "z", "z", "z"], 2, "z 50%, y 33%"),
        ([], 3, ""),
    ],
)
def test_dominant_tags(tags, top, expected):
    assert summarize.dominant_tags(pd.Series(tags, dtype=object), top=top) == expected


@pytest.mark.parametrize("top", [1, 3])
def test_dominant_tags_by_cluster_equals_one_call_per_cluster(top):
    """The grouped version (what the summary uses) against :func:`dominant_tags` called
    once per cluster, on many clusters with ties and a cluster of one tag."""
    rng = np.random.default_rng(4)
    clusters = pd.Series(rng.integers(0, 50, 3000))
    tags = pd.Series(rng.choice(["shoe", "bag", "hat", "a b", "z"], 3000), dtype=object)
    expected = tags.groupby(clusters).agg(summarize.dominant_tags, top=top)
    got = summarize.dominant_tags_by_cluster(clusters, tags, top=top)
    pd.testing.assert_series_equal(got, expected, check_names=False, check_index_type=False)
    pairs = summarize.dominant_tags_by_cluster(pd.Series([7, 7]), pd.Series(["hat", "bag"]), top)
    assert pairs.to_dict() == {7: "bag 50%, hat 50%" if top == 3 else "bag 50%"}


# ----------------------------------------------------------------------------- cluster summary


def test_cluster_summary_hand_computed(summary):
    nan = np.nan
    expected = pd.DataFrame(
        {
            "cluster": np.array([0, 1, 2, 3, 4], dtype=np.int32),
            "size": [4, 2, 2, 0, 2],
            "size_after_dedupe": [3, 2, 2, 0, 1],
            "size_after_similarity": [2, 2, 1, 0, 1],
            "size_final": [2, 2, 0, 0, 0],
            "mean_sim": [0.775, 0.85, 0.7, nan, 0.71],
            "mean_dist": [2.5, 1.0, 1.5, nan, 2.0],
            "mean_sim_final": [0.85, 0.85, nan, nan, nan],
            "dominant_tags": [
                "shoe 75%, bag 25%",
                "bag 100%",
                "face 100%",
                "",
                "hat 50%, shoe 50%",
            ],  # fmt: skip
            "kept": [True, True, False, False, False],
        }
    )
    for col in ("size", "size_after_dedupe", "size_after_similarity", "size_final"):
        expected[col] = expected[col].astype("int64")
    assert list(summary.columns) == schema.CLUSTER_SUMMARY_SCHEMA.names
    got = summary[list(expected.columns)]
    pd.testing.assert_frame_equal(got.drop(columns="dominant_tags"),
                                  expected.drop(columns="dominant_tags"), atol=1e-12)  # fmt: skip
    assert summary["dominant_tags"].tolist() == expected["dominant_tags"].tolist()


def test_cluster_health_hand_computed(summary):
    nan = np.nan
    c01 = 1 / np.sqrt(1 + 0.05**2)  # cosine of c0 and c1
    c12 = 0.05 / np.sqrt(1 + 0.05**2)  # cosine of c1 and c2
    assert summary["n_users"].tolist() == [2, 2, 1, 0, 2]
    assert summary["top_user"].tolist() == ["u1", "u3", "u5", "", "u6"]  # ties: alphabetical
    np.testing.assert_allclose(summary["top_user_share"], [0.75, 0.5, 1.0, nan, 0.5])
    np.testing.assert_allclose(summary["sim_min"], [0.6, 0.75, 0.5, nan, 0.7])
    np.testing.assert_allclose(summary["sim_median"], [0.8, 0.85, 0.7, nan, 0.71])
    # population standard deviation: c0 sqrt(((.125)^2 + 2 (.025)^2 + (.175)^2) / 4)
    np.testing.assert_allclose(summary["sim_std"], [np.sqrt(0.011875), 0.1, 0.2, nan, 0.01])
    # nearest centres; c3 ties c2 and c4 at cosine 0 (lowest id), c4 ties c0 and c3
    assert summary["nearest_cluster"].tolist() == [1, 0, 1, 2, 0]
    np.testing.assert_allclose(summary["nearest_cos"], [c01, c01, c12, 0.0, 0.0], atol=1e-7)
    assert summary["single_user"].tolist() == [True, False, True, False, False]
    assert summary["near_duplicate_of"].tolist() == [1, 0, pd.NA, pd.NA, pd.NA]
    assert not summary["sink"].any()


def test_a_sink_is_large_with_a_low_mean_cosine():
    # Four clusters of 2 rows around cosine 0.9 and one of 8 rows around 0.3: the sink.
    sims = [0.9, 0.92] * 4 + [0.3] * 8
    clusters = [0, 0, 1, 1, 2, 2, 3, 3] + [4] * 8
    table = pd.DataFrame({"object_id": np.arange(16), "cluster": np.array(clusters, np.int32),
                          "sim": sims, "dist": 0.0, "tag": "t", "status": KEPT,
                          "username": [f"u{i}" for i in range(16)]})  # fmt: skip
    centres = np.eye(5, dtype=np.float32)
    out = summarize.cluster_summary(table, centres)
    assert out["sink"].tolist() == [False, False, False, False, True]
    # Large alone is not a sink, nor is a low cosine alone.
    table.loc[table["cluster"] == 4, "sim"] = 0.9
    assert not summarize.cluster_summary(table, centres)["sink"].any()


def test_cluster_summary_of_nothing():
    empty = pd.DataFrame(
        {"object_id": [], "cluster": np.array([], np.int32), "sim": [], "dist": [],
         "tag": pd.Series([], dtype=object), "status": pd.Series([], dtype=object),
         "username": pd.Series([], dtype=object)}
    )  # fmt: skip
    out = summarize.cluster_summary(empty, np.eye(3, dtype=np.float32))
    assert out["cluster"].tolist() == [0, 1, 2]
    assert out["size"].tolist() == [0, 0, 0] and not out["kept"].any()
    assert out["mean_sim"].isna().all() and out["dominant_tags"].tolist() == ["", "", ""]


# ----------------------------------------------------------------------------- funnel

#: One count per reason, by hand: csv 1+1+1+1+1 = 5, selection 2+1 = 3, embedding 8 x 1.
REJECTS = {
    "missing_key": 1, "bad_score": 1, "bad_idx": 1, "bad_bbox": 1, "duplicate_object": 1,
    "not_selected:tag": 2, "not_selected:score": 1,
    "missing_user_folder": 1, "missing_embedding_file": 1, "corrupt_embedding_file": 1,
    "wrong_dimension": 1, "wrong_dtype": 1, "idx_out_of_range": 1, "non_finite_vector": 1,
    "zero_vector": 1,
}  # fmt: skip


def test_funnel_hand_computed(labelled):
    assert {schema.reject_kind(r) for r in REJECTS} == set(schema.REJECT_KINDS)
    out = summarize.funnel(26, REJECTS, labelled)  # 10 clustered + 16 rejected
    expected = pd.DataFrame(
        {
            "step": [
                "objects in CSV",
                "valid rows",
                "selected (select.*)",
                "with a usable embedding (clustered)",
                "one row per image per cluster",
                "similarity above threshold",
                "clusters of at least min size",
            ],
            "rows": [26, 21, 18, 10, 8, 6, 4],
            "clusters": pd.array([pd.NA, pd.NA, pd.NA, 4, 4, 4, 2], dtype="Int64"),
            "removed": [0, 5, 3, 8, 2, 2, 2],
        }
    )
    pd.testing.assert_frame_equal(out, expected)
    assert list(out.columns) == schema.FUNNEL_SCHEMA.names
    assert summarize.is_accounted(out)


def test_funnel_without_rejects(labelled):
    out = summarize.funnel(10, {}, labelled)
    assert out["rows"].tolist() == [10, 10, 10, 10, 8, 6, 4]
    assert out["removed"].tolist() == [0, 0, 0, 0, 2, 2, 2]
    assert summarize.is_accounted(out)


def test_funnel_that_does_not_add_up_is_flagged(labelled):
    # 27 input rows but only 26 accounted for (a lost row).
    assert not summarize.is_accounted(summarize.funnel(27, REJECTS, labelled))


def test_funnel_unknown_reason_raises(labelled):
    with pytest.raises(ValueError, match=r"'brand_new' has no kind in schema.REJECT_REASONS"):
        summarize.funnel(11, {"brand_new": 1}, labelled)


# ----------------------------------------------------------------------------- top tables


def test_top_tail_before(summary):
    out = summarize.top_tail(summary, "size", n=2)
    assert out["top_cluster"].tolist() == [0, 1]  # 1, 2 and 4 tie at 2: lowest id first
    assert out["top_size"].tolist() == [4, 2]
    assert out["tail_cluster"].tolist() == [1, 2]  # the empty cluster 3 is left out
    assert out["tail_size"].tolist() == [2, 2]
    full = summarize.top_tail(summary, "size", n=10)
    assert full["top_cluster"].tolist() == [0, 1, 2, 4]
    assert full["top_size"].tolist() == [4, 2, 2, 2]
    assert full["tail_cluster"].tolist() == [1, 2, 4, 0]
    assert full["tail_size"].tolist() == [2, 2, 2, 4]


def test_top_tail_after(summary):
    out = summarize.top_tail(summary, "size_final", n=10)
    assert out["top_cluster"].tolist() == [0, 1] and out["top_size"].tolist() == [2, 2]
    assert out["tail_cluster"].tolist() == [0, 1] and out["tail_size"].tolist() == [2, 2]


def test_top_tail_nothing_left(summary):
    assert len(summarize.top_tail(summary.assign(size_final=0), "size_final")) == 0


def test_top_comparison(summary):
    out = summarize.top_comparison(summary, n=3)
    NA = pd.NA
    expected = pd.DataFrame(
        {
            "original_top_cluster": [0, 1, 2],
            "original_size": [4, 2, 2],
            "original_after": [2, 2, 0],
            "new_top_cluster": [0, 1, NA],  # only two clusters survive: padded
            "new_original_size": [4, 2, NA],
            "new_after": [2, 2, NA],
        }
    ).astype("Int64")
    pd.testing.assert_frame_equal(out, expected)


# ----------------------------------------------------------------------------- samples


def test_cluster_samples_ties_broken_by_object_id(labelled):
    top, tail = summarize.cluster_samples(labelled, 0, n=2)
    assert top["object_id"].tolist() == [0, 1]  # 1 and 2 tie at 0.8: lower id first
    assert tail["object_id"].tolist() == [3, 2]  # least similar first
    top, tail = summarize.cluster_samples(labelled, 0, n=3)
    assert top["object_id"].tolist() == [0, 1, 2] and tail["object_id"].tolist() == [3, 2, 1]
    top, tail = summarize.cluster_samples(labelled, 1, n=8)  # fewer members than n
    assert top["object_id"].tolist() == [4, 5] and tail["object_id"].tolist() == [5, 4]


def test_cluster_samples_of_an_empty_cluster(labelled):
    top, tail = summarize.cluster_samples(labelled, 3)
    assert len(top) == 0 and len(tail) == 0
    assert list(top.columns) == list(labelled.columns)


# ----------------------------------------------------------------------------- markdown


def test_markdown_table_hand_written():
    frame = pd.DataFrame(
        {
            "cluster": [3, 10],
            "sim": [0.5, np.nan],
            "tags": ["shoe 75%, bag 25%", None],
            "after": pd.array([7, pd.NA], dtype="Int64"),
            "ok": [True, False],
        }
    )
    assert summarize.markdown_table(frame) == (
        "| cluster | sim | tags | after | ok |\n"
        "|---|---|---|---|---|\n"
        "| 3 | 0.5000 | shoe 75%, bag 25% | 7 | True |\n"
        "| 10 |  |  |  | False |"
    )


def test_markdown_table_of_no_rows():
    assert summarize.markdown_table(pd.DataFrame({"a": [], "b": []})) == "| a | b |\n|---|---|"


def test_summary_markdown_sections(summary, labelled):
    text = summarize.summary_markdown(summary, summarize.funnel(26, REJECTS, labelled), top_n=2)
    assert text.startswith("# Clustering summary\n")
    assert "**yes**" in text
    for title in ("## Funnel", "## Top 2 and tail 2 clusters before post-processing",
                  "## Top 2 and tail 2 clusters after post-processing",
                  "## Original top clusters and new top clusters"):  # fmt: skip
        assert title in text
    assert "| 0 | 4 | 1 | 2 |" in text  # before: top 0 (4 rows), tail 1 (2 rows)


def test_cluster_summary_in_model_ids(labelled, summary):
    """A re-fit's ids have gaps (pipeline.ids): row i of the centres is cluster ids[i].
    The summary is the same table with every id (rows, nearest, near-duplicate) mapped."""
    ids = np.array([10, 11, 20, 35, 40])
    relabelled = labelled.assign(cluster=ids[labelled["cluster"].to_numpy()].astype(np.int32))
    out = summarize.cluster_summary(relabelled, CENTRES, ids)
    assert out["cluster"].tolist() == ids.tolist()
    assert out["nearest_cluster"].tolist() == ids[[1, 0, 1, 2, 0]].tolist()
    assert out["near_duplicate_of"].tolist() == [11, 10, pd.NA, pd.NA, pd.NA]
    same = [
        c for c in summary.columns if c not in ("cluster", "nearest_cluster", "near_duplicate_of")
    ]
    pd.testing.assert_frame_equal(out[same], summary[same])
    with pytest.raises(ValueError, match="5 ids"):
        summarize.cluster_summary(relabelled, CENTRES, ids[:3])


def test_defaults_three_tags_eight_samples_top_ten(labelled, summary):
    """The defaults the report relies on: three tags, eight sample members, top 10."""
    assert summarize.dominant_tags(pd.Series(list("aabbccd"))) == "a 29%, b 29%, c 29%"
    many = pd.DataFrame({"object_id": np.arange(12), "cluster": 0, "sim": np.linspace(0, 1, 12)})
    top, tail = summarize.cluster_samples(many, 0)
    assert top["object_id"].tolist() == list(range(11, 3, -1))
    assert tail["object_id"].tolist() == list(range(8))
    text = summarize.summary_markdown(summary, summarize.funnel(26, REJECTS, labelled))
    assert text.startswith("# Clustering summary\n\n## Funnel\n\n")  # no extra text
    assert "## Top 10 and tail 10 clusters before post-processing" in text


def test_summary_markdown_flags_a_funnel_that_does_not_add_up(summary, labelled):
    text = summarize.summary_markdown(summary, summarize.funnel(27, REJECTS, labelled))
    assert "output + removed = input): **NO**" in text
