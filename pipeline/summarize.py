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
SUMMARY_COLUMNS = ("object_id", "cluster", "sim", "dist", "tag", "status")


def dominant_tags(tags: pd.Series, top: int = 3) -> str:
    """The most common tags of a cluster with their shares, e.g. ``"shoe 80%, bag 20%"``.

    >>> dominant_tags(pd.Series(["shoe", "shoe", "shoe", "bag"]))
    'shoe 75%, bag 25%'
    """
    counts = tags.value_counts()
    counts = counts.iloc[np.lexsort((counts.index.to_numpy(dtype=str), -counts.to_numpy()))]
    shares = counts.head(top) / counts.sum()
    return ", ".join(f"{tag} {share:.0%}" for tag, share in shares.items())


def cluster_summary(labelled: pd.DataFrame, n_clusters: int) -> pd.DataFrame:
    """One row per cluster id ``0..n_clusters-1``: sizes after each step, means, tags."""
    status = labelled[schema.STATUS]
    clusters = labelled["cluster"]
    ids = pd.RangeIndex(n_clusters, name="cluster")

    def count(mask: pd.Series) -> pd.Series:
        return mask.groupby(clusters).sum().reindex(ids, fill_value=0).astype("int64")

    kept = status == schema.STATUS_KEPT
    summary = pd.DataFrame(
        {
            "size": count(pd.Series(True, index=labelled.index)),
            "size_after_dedupe": count(status != schema.STATUS_DUPLICATE),
            "size_after_similarity": count(kept | (status == schema.STATUS_SMALL_CLUSTER)),
            "size_final": count(kept),
            "mean_sim": labelled.groupby("cluster")["sim"].mean().reindex(ids),
            "mean_dist": labelled.groupby("cluster")["dist"].mean().reindex(ids),
            "mean_sim_final": labelled[kept].groupby("cluster")["sim"].mean().reindex(ids),
            "dominant_tags": labelled.groupby("cluster")["tag"].agg(dominant_tags).reindex(ids),
        }
    ).reset_index()
    summary["cluster"] = summary["cluster"].astype("int32")
    summary["dominant_tags"] = summary["dominant_tags"].fillna("").astype(str)
    for col in ("mean_sim", "mean_dist", "mean_sim_final"):
        summary[col] = summary[col].astype("float64")
    summary["kept"] = summary["size_final"] > 0
    return summary


def funnel(n_input_rows: int, rejected: dict[str, int], labelled: pd.DataFrame) -> pd.DataFrame:
    """Rows (and clusters) left after each step, and rows removed by it.

    The ``removed`` column plus the last ``rows`` always adds up to ``n_input_rows``:
    every input row is in the output, removed by a named step, or rejected.
    """
    by_kind = dict.fromkeys(schema.REJECT_KINDS, 0)
    for reason, count in rejected.items():
        by_kind[schema.reject_kind(reason)] += count
    csv_rejects, not_selected = by_kind["csv"], by_kind["selection"]
    embedding_rejects = by_kind["embedding"]
    status = labelled[schema.STATUS]

    def clusters_where(mask: pd.Series) -> int:
        return int(labelled.loc[mask, "cluster"].nunique())

    after_dedupe = status != schema.STATUS_DUPLICATE
    after_sim = status.isin([schema.STATUS_KEPT, schema.STATUS_SMALL_CLUSTER])
    kept = status == schema.STATUS_KEPT
    steps = [
        ("objects in CSV", n_input_rows, None, 0),
        ("valid rows", n_input_rows - csv_rejects, None, csv_rejects),
        ("selected (select.*)", n_input_rows - csv_rejects - not_selected, None, not_selected),
        ("with a usable embedding (clustered)", len(labelled), clusters_where(status.notna()),
         embedding_rejects),
        ("one row per image per cluster", int(after_dedupe.sum()), clusters_where(after_dedupe),
         int((status == schema.STATUS_DUPLICATE).sum())),
        ("similarity above threshold", int(after_sim.sum()), clusters_where(after_sim),
         int((status == schema.STATUS_LOW_SIMILARITY).sum())),
        ("clusters of at least min size", int(kept.sum()), clusters_where(kept),
         int((status == schema.STATUS_SMALL_CLUSTER).sum())),
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
