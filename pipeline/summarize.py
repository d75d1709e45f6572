"""Pure pandas: the write-up's tables from the labelled assignments (no I/O).

``labelled`` is the post-processed assignment table (at least ``cluster``, ``status``,
``sim``, ``dist``, ``tag``); every function here is a plain frame-in, frame-out function,
so the report and the tests use the same numbers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import schema

#: Columns of the post-processed table the summary tables need.
SUMMARY_COLUMNS = ("object_id", "cluster", "sim", "dist", "tag", "username", "status")

#: Health flag thresholds (documented in the README): a cluster is ``single_user`` when
#: one user holds more than this share of its members; ``near_duplicate_of`` another when
#: their centres' cosine is at least this; a ``sink`` when it has at least ``SINK_SIZE``
#: times the median members with a mean cosine under ``SINK_SIM`` times the median one
#: (the same rule the cosine fit uses to split sinks while it streams).
SINGLE_USER_SHARE = 0.5
NEAR_DUPLICATE_COS = 0.95
SINK_SIZE, SINK_SIM = 2.0, 0.5


def dominant_tags(tags: pd.Series, top: int = 3) -> str:
    """The most common tags of a cluster with their shares, e.g. ``"shoe 80%, bag 20%"``.

    >>> dominant_tags(pd.Series(["shoe", "shoe", "shoe", "bag"]))
    'shoe 75%, bag 25%'
    """
    counts = tags.value_counts()
    counts = counts.iloc[np.lexsort((counts.index.to_numpy(dtype=str), -counts.to_numpy()))]
    shares = counts.head(top) / counts.sum()
    return ", ".join(f"{tag} {share:.0%}" for tag, share in shares.items())


def dominant_tags_by_cluster(clusters: pd.Series, tags: pd.Series, top: int = 3) -> pd.Series:
    """:func:`dominant_tags` of every cluster at once, indexed by cluster: one grouped
    count over (cluster, tag) instead of a Python call per cluster (which made this the
    slowest, single-threaded step of post-processing).

    >>> dominant_tags_by_cluster(pd.Series([0, 0, 0, 0, 1]), pd.Series(["shoe"] * 3 + ["bag", "cap"])).tolist()
    ['shoe 75%, bag 25%', 'cap 100%']
    """
    counts = (
        pd.DataFrame({"cluster": clusters.to_numpy(), "tag": tags.to_numpy(dtype=object)})
        .groupby(["cluster", "tag"], sort=False, dropna=True)
        .size()
        .reset_index(name="n")
    )
    cluster = counts["cluster"].to_numpy()
    tag = counts["tag"].to_numpy(dtype=str)
    n = counts["n"].to_numpy()
    order = np.lexsort((tag, -n, cluster))
    cluster, tag, n = cluster[order], tag[order], n[order]
    totals = pd.Series(n).groupby(cluster).transform("sum").to_numpy()
    rank = pd.Series(cluster).groupby(cluster).cumcount().to_numpy()
    head = rank < top
    pieces = pd.Series(
        [f"{t} {share:.0%}" for t, share in zip(tag[head], n[head] / totals[head], strict=True)],
        dtype=object,
    )
    return pieces.groupby(cluster[head]).agg(", ".join)


def centre_neighbours(centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each centre, the other centre of largest cosine and that cosine (ties: lowest id).

    >>> c = np.array([[1, 0], [1, 0.1], [0, 1]], dtype=np.float32)
    >>> nearest, cos = centre_neighbours(c)
    >>> nearest.tolist(), np.round(cos, 3).tolist()
    ([1, 0, 1], [0.995, 0.995, 0.1])
    """
    unit = np.asarray(centres, dtype=np.float64)
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    unit = np.divide(unit, norms, out=np.zeros_like(unit), where=norms > 0)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    if len(cos) < 2:
        return np.full(len(cos), -1, np.int32), np.full(len(cos), np.nan)
    nearest = np.argmax(cos, axis=1)
    return nearest.astype(np.int32), cos[np.arange(len(cos)), nearest]


def _cluster_index(n_clusters: int, cluster_ids: np.ndarray | None) -> pd.Index:
    """The summary's rows: the model's cluster ids (``0..k-1`` when not given)."""
    if cluster_ids is None:
        return pd.RangeIndex(n_clusters, name="cluster")
    if len(cluster_ids) != n_clusters:
        raise ValueError(f"cluster_ids must hold {n_clusters} ids. Got {len(cluster_ids)}.")
    return pd.Index(np.asarray(cluster_ids, np.int64), name="cluster")


def _cluster_health_stats(labelled: pd.DataFrame) -> pd.DataFrame:
    """The per-cluster part of :func:`cluster_health`, indexed by the clusters present."""
    by = labelled.groupby("cluster")
    users = labelled.groupby(["cluster", "username"]).size().rename("n").reset_index()
    users = users.sort_values(["cluster", "n", "username"], ascending=[True, False, True])
    top = users.drop_duplicates("cluster").set_index("cluster")
    sizes = by.size()
    sim = by["sim"]
    return pd.DataFrame(
        {
            "n_users": users.groupby("cluster").size(),
            "top_user": top["username"],
            "top_user_share": top["n"] / sizes.reindex(top.index),
            "sim_min": sim.min(),
            "sim_median": sim.median(),
            "sim_std": sim.std(ddof=0),
        },
        index=sizes.index,
    )


def _health_from_stats(
    stats: pd.DataFrame, centres: np.ndarray, cluster_ids: np.ndarray | None
) -> pd.DataFrame:
    """:func:`cluster_health` from :func:`cluster_stats` (whose ``size`` and ``mean_sim``
    give the sink rule)."""
    ids = _cluster_index(len(centres), cluster_ids)
    sizes = stats["size"].reindex(ids, fill_value=0).astype("int64")
    health = pd.DataFrame(
        {
            "n_users": stats["n_users"].reindex(ids, fill_value=0),
            "top_user": stats["top_user"].reindex(ids),
            "top_user_share": stats["top_user_share"].reindex(ids),
            "sim_min": stats["sim_min"].reindex(ids),
            "sim_median": stats["sim_median"].reindex(ids),
            "sim_std": stats["sim_std"].reindex(ids),
        }
    )
    nearest, nearest_cos = centre_neighbours(centres)
    if cluster_ids is not None and len(nearest):
        nearest = np.where(nearest >= 0, ids.to_numpy()[nearest], -1).astype(np.int32)
    health["nearest_cluster"] = nearest
    health["nearest_cos"] = nearest_cos
    health["single_user"] = (health["top_user_share"] > SINGLE_USER_SHARE).to_numpy()
    mean_sim = stats["mean_sim"].reindex(ids)
    alive = sizes > 0
    health["sink"] = (
        (
            alive
            & (sizes >= SINK_SIZE * sizes[alive].median())
            & (mean_sim < SINK_SIM * mean_sim[alive].median())
        ).to_numpy()
        if alive.any()
        else False
    )
    duplicate = nearest_cos >= NEAR_DUPLICATE_COS
    health["near_duplicate_of"] = pd.array(np.where(duplicate, nearest, 0), dtype="Int32")
    health.loc[~duplicate, "near_duplicate_of"] = pd.NA
    health["n_users"] = health["n_users"].fillna(0).astype("int64")
    health["top_user"] = health["top_user"].fillna("").astype(str)
    for column in ("top_user_share", "sim_min", "sim_median", "sim_std", "nearest_cos"):
        health[column] = health[column].astype("float64")
    return health.reset_index(drop=True)


def cluster_health(
    labelled: pd.DataFrame, centres: np.ndarray, cluster_ids: np.ndarray | None = None
) -> pd.DataFrame:
    """Per cluster: its users, the spread of its cosines, its nearest cluster, and flags.

    Over all members the cluster was assigned (before post-processing): distinct users,
    the top user (ties: alphabetical) and its share, min / median / mean / standard
    deviation (ddof 0) of ``sim``; the nearest other centre by cosine; flags
    ``single_user``, ``sink`` and ``near_duplicate_of`` (see the thresholds above).
    Row ``i`` of ``centres`` is the cluster ``cluster_ids[i]`` (default ``i``).
    """
    return _health_from_stats(cluster_stats(labelled), centres, cluster_ids)


#: The per-cluster columns of :func:`cluster_stats`, in order.
STATS_COLUMNS = (
    "size", "size_after_dedupe", "size_after_similarity", "size_final", "mean_sim",
    "mean_dist", "mean_sim_final", "dominant_tags", "n_users", "top_user", "top_user_share",
    "sim_min", "sim_median", "sim_std",
)  # fmt: skip


def _group_mean(values: pd.Series, clusters: pd.Series, unsorted: bool) -> pd.Series:
    """``values.groupby(clusters).mean()``; with ``unsorted``, as pandas computes it when
    the clusters are not in ascending order even if these are. (pandas takes a fast path
    for ascending group keys, summing in float64 where its kernel sums float32 in float32,
    so a mean can differ in the last bit with the order of the *other* groups' rows.)"""
    keys = clusters.to_numpy()
    if not (unsorted and len(keys) and is_ascending(keys)):
        return values.groupby(clusters).mean()
    sentinel = keys.min() - 1  # one row of a group of its own, last: keys not ascending
    padded = pd.Series(np.append(values.to_numpy(), values.to_numpy()[:1]))
    means = padded.groupby(np.append(keys, sentinel)).mean()
    return means.drop(sentinel).rename_axis(clusters.name).rename(values.name)


def is_ascending(clusters: np.ndarray) -> bool:
    """Whether ``clusters`` never decreases (then pandas groups by its fast path)."""
    return bool(len(clusters) < 2 or (np.diff(clusters) >= 0).all())


def cluster_stats(
    labelled: pd.DataFrame, unsorted: bool = False, kept_unsorted: bool = False
) -> pd.DataFrame:
    """Everything :func:`cluster_summary` needs from the rows, one row per cluster present
    (indexed by cluster): each value depends only on that cluster's rows (in table order),
    so the stats of tables that hold disjoint sets of whole clusters concatenate into the
    stats of their union, and :func:`summary_from_stats` gives the same summary as
    :func:`cluster_summary` on the whole table. This is how post-processing summarises a
    table it never holds at once.

    For that, pass ``unsorted`` when the whole table's clusters are not in ascending order
    and ``kept_unsorted`` when its kept rows' clusters are not (see :func:`_group_mean`):
    the means are then the whole table's to the last bit, whatever the part's order."""
    stats = step_sizes(labelled)
    stats["dominant_tags"] = dominant_tags_by_cluster(labelled["cluster"], labelled["tag"])
    stats = pd.concat([stats, cluster_means(labelled, unsorted, kept_unsorted)], axis=1)
    health = _cluster_health_stats(labelled)
    return pd.concat([stats, health.reindex(stats.index)], axis=1)[list(STATS_COLUMNS)]


def step_sizes(labelled: pd.DataFrame) -> pd.DataFrame:
    """Rows per cluster left after each post-processing step (``size``,
    ``size_after_dedupe``, ``size_after_similarity``, ``size_final``), indexed by cluster:
    what the summary and the funnel count."""
    status = labelled[schema.STATUS]
    clusters = labelled["cluster"]

    def count(mask: pd.Series) -> pd.Series:
        return mask.groupby(clusters).sum().astype("int64")

    kept = status == schema.STATUS_KEPT
    return pd.DataFrame(
        {
            "size": count(pd.Series(True, index=labelled.index)),
            "size_after_dedupe": count(status != schema.STATUS_DUPLICATE),
            "size_after_similarity": count(kept | (status == schema.STATUS_SMALL_CLUSTER)),
            "size_final": count(kept),
        }
    )


def cluster_means(
    labelled: pd.DataFrame, unsorted: bool = False, kept_unsorted: bool = False
) -> pd.DataFrame:
    """The mean columns of :func:`cluster_stats` (``mean_sim``, ``mean_dist``,
    ``mean_sim_final``), indexed by cluster."""
    clusters = labelled["cluster"]
    kept = labelled[schema.STATUS] == schema.STATUS_KEPT
    return pd.DataFrame(
        {
            "mean_sim": _group_mean(labelled["sim"], clusters, unsorted),
            "mean_dist": _group_mean(labelled["dist"], clusters, unsorted),
            "mean_sim_final": _group_mean(labelled.loc[kept, "sim"], clusters[kept], kept_unsorted),
        }
    )


def summary_from_stats(
    stats: pd.DataFrame, centres: np.ndarray, cluster_ids: np.ndarray | None = None
) -> pd.DataFrame:
    """:func:`cluster_summary` from :func:`cluster_stats` (of the whole table, or
    concatenated from tables of disjoint whole clusters)."""
    ids = _cluster_index(len(centres), cluster_ids)

    def count(column: str) -> pd.Series:
        return stats[column].reindex(ids, fill_value=0).astype("int64")

    summary = pd.DataFrame(
        {
            "size": count("size"),
            "size_after_dedupe": count("size_after_dedupe"),
            "size_after_similarity": count("size_after_similarity"),
            "size_final": count("size_final"),
            "mean_sim": stats["mean_sim"].reindex(ids),
            "mean_dist": stats["mean_dist"].reindex(ids),
            "mean_sim_final": stats["mean_sim_final"].reindex(ids),
            "dominant_tags": stats["dominant_tags"].reindex(ids),
        }
    ).reset_index()
    summary["cluster"] = summary["cluster"].astype("int32")
    summary["dominant_tags"] = summary["dominant_tags"].fillna("").astype(str)
    for col in ("mean_sim", "mean_dist", "mean_sim_final"):
        summary[col] = summary[col].astype("float64")
    summary["kept"] = summary["size_final"] > 0
    return pd.concat([summary, _health_from_stats(stats, centres, cluster_ids)], axis=1)


def cluster_summary(
    labelled: pd.DataFrame, centres: np.ndarray, cluster_ids: np.ndarray | None = None
) -> pd.DataFrame:
    """One row per cluster id (``centres`` is ``(k, n_features)``, row ``i`` the cluster
    ``cluster_ids[i]``, default ``0..k-1``): sizes after each step, means, tags, and the
    :func:`cluster_health` columns."""
    return summary_from_stats(cluster_stats(labelled), centres, cluster_ids)


def funnel(n_input_rows: int, rejected: dict[str, int], labelled: pd.DataFrame) -> pd.DataFrame:
    """Rows (and clusters) left after each step, and rows removed by it.

    The ``removed`` column plus the last ``rows`` always adds up to ``n_input_rows``:
    every input row is in the output, removed by a named step, or rejected.
    """
    return funnel_from_stats(n_input_rows, rejected, step_sizes(labelled))


def funnel_from_stats(
    n_input_rows: int, rejected: dict[str, int], stats: pd.DataFrame
) -> pd.DataFrame:
    """:func:`funnel` from the per-cluster sizes of :func:`cluster_stats` (each status is
    one of :data:`schema.STATUS_ORDER`, so each step's removals are differences of sizes)."""
    by_kind = dict.fromkeys(schema.REJECT_KINDS, 0)
    for reason, count in rejected.items():
        by_kind[schema.reject_kind(reason)] += count
    csv_rejects, not_selected = by_kind["csv"], by_kind["selection"]
    embedding_rejects = by_kind["embedding"]
    size, dedupe, similar, final = (
        stats[c].to_numpy(np.int64)
        for c in ("size", "size_after_dedupe", "size_after_similarity", "size_final")
    )

    def clusters_with(rows: np.ndarray) -> int:
        return int((rows > 0).sum())

    steps = [
        ("objects in CSV", n_input_rows, None, 0),
        ("valid rows", n_input_rows - csv_rejects, None, csv_rejects),
        ("selected (select.*)", n_input_rows - csv_rejects - not_selected, None, not_selected),
        ("with a usable embedding (clustered)", int(size.sum()), clusters_with(size),
         embedding_rejects),
        ("one row per image per cluster", int(dedupe.sum()), clusters_with(dedupe),
         int((size - dedupe).sum())),
        ("similarity above threshold", int(similar.sum()), clusters_with(similar),
         int((dedupe - similar).sum())),
        ("clusters of at least min size", int(final.sum()), clusters_with(final),
         int((similar - final).sum())),
    ]  # fmt: skip
    out = pd.DataFrame(steps, columns=["step", "rows", "clusters", "removed"])
    out["clusters"] = out["clusters"].astype("Int64")
    return out


def is_accounted(funnel_table: pd.DataFrame) -> bool:
    """True when final rows plus every step's removals equal the input rows."""
    return int(funnel_table["rows"].iloc[-1] + funnel_table["removed"].sum()) == int(
        funnel_table["rows"].iloc[0]
    )


def top_tail(summary: pd.DataFrame, size_column: str = "size", n: int = 10) -> pd.DataFrame:
    """The write-up's table: top ``n`` and tail ``n`` non-empty clusters by size.

    Ties are broken by cluster id so the table is deterministic.
    """
    live = summary[summary[size_column] > 0]
    top = live.sort_values([size_column, "cluster"], ascending=[False, True]).head(n)
    tail = live.sort_values([size_column, "cluster"], ascending=[True, True]).head(n)
    return pd.DataFrame(
        {
            "top_cluster": top["cluster"].to_numpy(),
            "top_size": top[size_column].to_numpy(),
            "tail_cluster": _pad(tail["cluster"].to_numpy(), len(top)),
            "tail_size": _pad(tail[size_column].to_numpy(), len(top)),
        }
    )


def _pad(values: np.ndarray, n: int) -> pd.array:
    return pd.array(list(values) + [pd.NA] * (n - len(values)), dtype="Int64")


def top_comparison(summary: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """Original top clusters next to the new top clusters, with sizes before and after."""
    before = summary.sort_values(["size", "cluster"], ascending=[False, True]).head(n)
    after = (
        summary[summary["size_final"] > 0]
        .sort_values(["size_final", "cluster"], ascending=[False, True])
        .head(n)
    )
    m = max(len(before), len(after))
    return pd.DataFrame(
        {
            "original_top_cluster": _pad(before["cluster"].to_numpy(), m),
            "original_size": _pad(before["size"].to_numpy(), m),
            "original_after": _pad(before["size_final"].to_numpy(), m),
            "new_top_cluster": _pad(after["cluster"].to_numpy(), m),
            "new_original_size": _pad(after["size"].to_numpy(), m),
            "new_after": _pad(after["size_final"].to_numpy(), m),
        }
    )


def cluster_samples(
    labelled: pd.DataFrame, cluster: int, n: int = 8
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Top and tail ``n`` members of one cluster by cosine similarity (ties: object id)."""
    members = labelled[labelled["cluster"] == cluster]
    ordered = members.sort_values(["sim", schema.OBJECT_ID], ascending=[False, True])
    return ordered.head(n), ordered.tail(n).iloc[::-1]


def markdown_table(frame: pd.DataFrame) -> str:
    """Render a small frame as a GitHub markdown table."""

    def fmt(v: object) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            return ""
        if isinstance(v, (float, np.floating)):
            return f"{v:.4f}"
        return str(v)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def k_sweep_markdown(table: pd.DataFrame) -> str:
    """The ``n_clusters: auto`` curve as a markdown section."""
    chosen = int(table.loc[table["chosen"].astype(bool), "k"].iloc[0])
    columns = ["k", "rows_kept_est", "kept_clusters_est", "small_clusters", "score"]
    return (
        f"## Choosing k (n_clusters: auto): k = {chosen}\n\nHighest score = estimated rows "
        f"kept - min_cluster_size x k, from quick fits on the store's sample.\n\n"
        + markdown_table(table[columns])
    )


def summary_markdown(
    summary: pd.DataFrame, funnel_table: pd.DataFrame, top_n: int = 10, extra: str = ""
) -> str:
    """The printed summary: funnel, top/tail before and after, top comparison."""
    accounted = "yes" if is_accounted(funnel_table) else "NO"
    parts = [
        "# Clustering summary",
        extra,
        "## Funnel",
        markdown_table(funnel_table),
        f"\nEvery input row accounted for (output + removed = input): **{accounted}**",
        f"## Top {top_n} and tail {top_n} clusters before post-processing",
        markdown_table(top_tail(summary, "size", top_n)),
        f"## Top {top_n} and tail {top_n} clusters after post-processing",
        markdown_table(top_tail(summary, "size_final", top_n)),
        "## Original top clusters and new top clusters",
        markdown_table(top_comparison(summary, top_n)),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"
