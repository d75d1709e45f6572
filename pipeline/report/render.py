"""Lay the view-models out as HTML: Jinja2 templates shipped with the package
(``templates/*.html``, autoescape on, so every value from the data is escaped by default),
and the page contexts built from :mod:`pipeline.report.views`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
import pyarrow as pa
from markupsafe import Markup

from .. import schema, summarize
from ..config import PostprocessConfig
from . import views
from .thumbnails import Thumb, crop_box, thumbnail_size

#: No right or bottom edge: a box clipped at 0 only (the page clips it to the image).
_NO_EDGE = 2**31


@lru_cache(maxsize=1)
def environment():
    """The package's template environment (autoescape on for every template)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("pipeline.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # The member cards' JSON (|tojson, still HTML-safe): compact, in the records' order.
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "separators": (",", ":")}
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


@dataclass
class Site:
    """What every page shows in its frame: the run and the storage key of the picks."""

    root: str
    model: str
    report_id: str
    px: int = 96


#: The members' columns a card shows, as :func:`member_records` takes them.
CARD_COLUMNS = (schema.OBJECT_ID, "cluster", schema.STATUS, "tag", "username", "image_name",
                "idx", "bbox", "sim", "dist", "score")  # fmt: skip


def card_columns(ordered: pd.DataFrame) -> list[np.ndarray | pa.Array]:
    """:data:`CARD_COLUMNS` of ``ordered``: the numbers as arrays, rounded as cards show
    them (cosine and distance to 3 places, score to 2), the text as Arrow arrays (no Python
    string per row until a card is made)."""
    out: list[np.ndarray | pa.Array] = []
    for c in CARD_COLUMNS[:-3]:
        column = ordered[c]
        numeric = pd.api.types.is_numeric_dtype(column.dtype)
        out.append(column.to_numpy() if numeric else pa.array(column))
    for c, digits in (("sim", 3), ("dist", 3), ("score", 2)):
        out.append(np.round(ordered[c].to_numpy(dtype=np.float64), digits))
    return out


def _values(column: np.ndarray | pa.Array, rows: slice) -> list:
    if isinstance(column, np.ndarray):
        return column[rows].tolist()
    return column.slice(rows.start, rows.stop - rows.start).to_pylist()


def member_records(
    columns: list[list],
    thumbs: dict[int, Thumb],
    urls: dict[int, str],
    removed_clusters: set[int],
) -> list[dict]:
    """The card of every member (the values of :data:`CARD_COLUMNS`, a list each, rows of
    ``postprocessed.parquet`` in order), as the JSON the page's script lays out: ``id``,
    ``c`` cluster, ``k`` kept, ``s`` status, ``sim``, ``d`` distance, ``tag``, ``sc``
    score, ``u`` user, ``im`` image, ``ix`` idx, ``b`` bbox, ``x`` excludable, and ``t``
    its thumbnail ``[name, width, height]`` or ``src`` its source image (relative to
    ``clusters/``; ``urls`` are relative to the report's folder).

    Kept members can be excluded from a group; so can the members of a removed cluster
    that passed the dedupe step (the rows ``include_removed`` brings in).
    """
    out: list[dict] = []
    rows = zip(*columns, strict=True)
    for object_id, cluster, status, tag, user, image, idx, bbox, sim, dist, score in rows:
        kept = status == schema.STATUS_KEPT
        record = {
            "id": object_id, "c": cluster, "k": kept, "s": status, "sim": sim, "d": dist,
            "tag": tag, "sc": score, "u": user, "im": image, "ix": idx, "b": bbox,
            "x": kept or (cluster in removed_clusters and status != schema.STATUS_DUPLICATE),
        }  # fmt: skip
        thumb = thumbs.get(object_id)
        if thumb is not None:
            record["t"] = [thumb.name, thumb.width, thumb.height]
        elif object_id in urls:
            record["src"] = "../" + urls[object_id]
        out.append(record)
    return out


#: Cards kept by :class:`MemberCards` (~150 MiB).
CACHED_ROWS = 100_000


class MemberCards:
    """Members' cards (see :func:`member_records`) made on demand from the members table
    ordered by cluster, one cluster at a time: a dict per member held for the whole
    build took ~1.6 KB a row (1.6 GiB at 1M rows). Callers ask for the members of one
    cluster at a time (its picks, its pages, in cluster order), so the cards of the last
    clusters asked for are kept."""

    def __init__(
        self, ordered: pd.DataFrame, thumbs: dict[int, Thumb], urls: dict[int, str],
        removed_clusters: set[int], cached_rows: int = CACHED_ROWS,
    ) -> None:  # fmt: skip
        self.columns = card_columns(ordered)
        self.thumbs, self.urls, self.removed = thumbs, urls, removed_clusters
        self.cached_rows = cached_rows
        ids = np.asarray(self.columns[0], dtype=np.int64)
        self._by_id = np.argsort(ids, kind="stable")  # positions, by ascending id
        self._sorted_ids = ids[self._by_id]
        clusters = np.asarray(self.columns[1])
        self.starts = np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1]])[: len(clusters)]
        self.ends = np.r_[self.starts[1:], len(clusters)]
        self._span_of = {int(c): i for i, c in enumerate(clusters[self.starts].tolist())}
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()
        self._cached_rows = 0

    def _span_cards(self, span: int) -> list[dict]:
        """The cards of one cluster's rows; the most recently used are kept, up to
        ``cached_rows`` cards (~1.5 KB each) or the last cluster's."""
        if span in self._cache:
            self._cache.move_to_end(span)
            return self._cache[span]
        rows = slice(self.starts[span], self.ends[span])
        cards = member_records(
            [_values(column, rows) for column in self.columns], self.thumbs, self.urls,
            self.removed,
        )  # fmt: skip
        self._cache[span] = cards
        self._cached_rows += len(cards)
        while self._cached_rows > self.cached_rows and len(self._cache) > 1:
            self._cached_rows -= len(self._cache.popitem(last=False)[1])
        return cards

    def cluster(self, cluster: int) -> list[dict]:
        """The cards of every member of ``cluster``, in the table's order."""
        span = self._span_of.get(int(cluster))
        return [] if span is None else self._span_cards(span)

    def of(self, ids) -> list[dict]:
        """The cards of ``ids`` (in that order), skipping ids that are not members."""
        ids = np.asarray(list(ids), dtype=np.int64)
        at = np.searchsorted(self._sorted_ids, ids)
        found = at < len(self._sorted_ids)
        found[found] = self._sorted_ids[at[found]] == ids[found]
        positions = self._by_id[at[found]]
        spans = np.searchsorted(self.starts, positions, side="right") - 1
        return [
            self._span_cards(int(span))[int(p - self.starts[span])]
            for span, p in zip(spans.tolist(), positions.tolist(), strict=True)
        ]


@dataclass
class Catalogue:
    """The members' cards (see :class:`MemberCards`) and each cluster's picks."""

    members: MemberCards
    picks: dict[int, views.Picks] = field(default_factory=dict)
    _strips: dict[tuple, Markup] = field(default_factory=dict, repr=False)

    def of(self, ids) -> list[dict]:
        return self.members.of(ids)

    def crops(self, ids, size: int, prefix: str = "") -> list[dict]:
        """Small crops of ``ids`` for a strip or a tile: ``src``, ``w``, ``h``, ``alt``
        (scaled so the longer side is ``size``) of the thumbnail, or of the source image
        with ``box`` (``"x1 y1 x2 y2"``, the page scales and clips it to the box), or
        ``tag`` alone without either. ``prefix`` leads from the page to the report's folder.
        """
        out = []
        for m in self.of(ids):
            alt = f"{m['tag']}, object {m['id']}"
            box = crop_box(m["b"], _NO_EDGE, _NO_EDGE) if "src" in m else None
            if "t" in m:
                name, w, h = m["t"]
                scale = size / max(w, h)
                out.append({"src": f"{prefix}thumbs/{name}", "w": round(w * scale),
                            "h": round(h * scale), "alt": alt, "box": None})  # fmt: skip
            elif box is not None:
                w, h = thumbnail_size(box, size)
                src = prefix + m["src"].removeprefix("../")  # relative to clusters/
                out.append({"src": src, "w": w, "h": h, "alt": alt,
                            "box": " ".join(map(str, box))})  # fmt: skip
            else:
                out.append({"src": None, "tag": m["tag"], "alt": alt, "box": None})
        return out

    def strip(self, cluster: int, n: int, size: int, prefix: str = "") -> Markup:
        """The crops of a cluster's ``n`` most similar members, laid out once by the
        ``crop_strip`` macro (autoescaped) and reused wherever the cluster is listed (each
        cluster is among the nearest of several others)."""
        key = (cluster, n, size, prefix)
        if key not in self._strips:
            top = self.picks.get(cluster, views.Picks()).top[:n]
            macros = environment().get_template("_macros.html").module
            self._strips[key] = macros.crop_strip(self.crops(top, size, prefix))
        return self._strips[key]


# --------------------------------------------------------------------------- index


def _table(frame: pd.DataFrame, headers: dict[str, str], table_id: str, links=()) -> Markup:
    numeric = {c for c in headers if pd.api.types.is_numeric_dtype(frame[c])}
    rows = []
    for record in frame[list(headers)].to_dict("records"):
        cells = []
        for col, value in record.items():
            if isinstance(value, (float, np.floating)) and not float(value).is_integer():
                shown = views.fmt_float(value)
            elif isinstance(value, str):
                shown = value
            else:
                shown = views.fmt_int(value)
            cells.append(
                {"col": col, "raw": views.raw(value), "shown": shown,
                 "num": not isinstance(value, str),
                 "link": col in links and not views.is_missing(value)}
            )  # fmt: skip
        rows.append(cells)
    columns = [(c, h, c in numeric) for c, h in headers.items()]
    return Markup(render("_table.html", table_id=table_id, columns=columns, rows=rows))


K_SWEEP_HEADERS = {
    "k": "k",
    "rows_kept_est": "Est. rows kept",
    "kept_clusters_est": "Est. kept clusters",
    "small_clusters": "Clusters of <= 2",
    "mean_sim": "Mean cosine",
    "score": "Score",
    "chosen_mark": "Chosen",
}

TOP_TAIL_HEADERS = {
    "top_cluster": "Top clusters",
    "top_size": "Num samples",
    "tail_cluster": "Tail clusters",
    "tail_size": "Num samples",
}
COMPARISON_HEADERS = {
    "original_top_cluster": "Original top clusters",
    "original_size": "Original num samples",
    "original_after": "After post-processing",
    "new_top_cluster": "New top clusters",
    "new_original_size": "Original num samples",
    "new_after": "After post-processing",
}


def tag_options(summary: pd.DataFrame) -> list[tuple[str, int]]:
    """Dominant tags of the non-empty clusters with their cluster counts, most first."""
    tags = summary.loc[summary["size"] > 0, "dominant_tags"].map(views.dominant_tag)
    counts = tags[tags != ""].value_counts()
    counts = counts.iloc[np.lexsort((counts.index.to_numpy(dtype=str), -counts.to_numpy()))]
    return [(str(t), int(n)) for t, n in counts.items()]


def state_options(states: list[str]) -> list[tuple[str, int]]:
    counts = {s: states.count(s) for s in views.STATES}
    kept = counts["whole"] + counts["shrunk"]
    return [("kept", kept)] + [(s, counts[s]) for s in views.STATES]


def render_index(
    site: Site,
    summary: pd.DataFrame,
    funnel_table: pd.DataFrame,
    sim_counts: dict[str, np.ndarray],
    centres_xy: np.ndarray,
    catalogue: Catalogue,
    groups: dict,
    postprocess: PostprocessConfig,
    top_n: int,
    k_sweep: pd.DataFrame | None = None,
) -> str:
    """The overview: the cluster index with pick boxes and crop strips, the map, groups,
    funnel, top/tail tables, distributions and (``n_clusters: auto``) the k sweep."""
    group_of = groups.get("group_of", {})
    ordered = summary.sort_values(["size", "cluster"], ascending=[False, True])
    index = []
    for rec in ordered.to_dict("records"):
        c = int(rec["cluster"])
        state = views.cluster_state(rec)
        picks = catalogue.picks.get(c, views.Picks())
        strip = picks.strip(7)
        weak = [i for i in strip if i in picks.weakest_kept and i not in picks.top[:6]]
        head = [i for i in strip if i not in weak]
        index.append(
            {
                "cluster": c, "state": state.state, "explanation": state.explanation,
                "tag": views.dominant_tag(rec["dominant_tags"]),
                "strip": catalogue.crops(head, 36), "weak": catalogue.crops(weak, 36),
                "size": int(rec["size"]), "size_final": int(rec["size_final"]),
                "mean_sim": views.fmt_float(rec["mean_sim"]),
                "mean_sim_raw": views.raw(rec["mean_sim"]),
                "mean_sim_final": views.fmt_float(rec["mean_sim_final"]),
                "mean_sim_final_raw": views.raw(rec["mean_sim_final"]),
                "removed_by": state.short, "dominant_tags": rec["dominant_tags"],
                "group": group_of.get(c, ""),
            }
        )  # fmt: skip
    pp = postprocess
    dedupe = f"one row per {pp.dedupe_key} per cluster, " if pp.dedupe_key else ""
    head = {
        "clustered": f"{int(summary['size'].sum()):,}",
        "clusters": f"{len(summary):,}",
        "selected": f"{int(summary['size_final'].sum()):,}",
        "kept_clusters": f"{int((summary['size_final'] > 0).sum()):,}",
        "rule": f"{dedupe}cosine similarity > {pp.min_similarity}, clusters of at least "
        f"{pp.min_cluster_size}",
    }
    accounted = summarize.is_accounted(funnel_table)
    funnel = {
        "rows": [
            {"step": r["step"], "rows": int(r["rows"]), "removed": int(r["removed"]),
             "clusters": views.fmt_int(r["clusters"]), "clusters_raw": views.raw(r["clusters"])}
            for r in funnel_table.to_dict("records")
        ],
        "bars": views.funnel_bars(funnel_table, 280),
        "height": 26 * len(funnel_table) + 12,
        "note": "Every input row is accounted for: rows left + removed by each step = input rows."
        if accounted else "WARNING: the funnel does not add up to the input rows.",
    }  # fmt: skip
    size_tables = [
        ("Before post-processing", _table(summarize.top_tail(summary, "size", top_n),
         TOP_TAIL_HEADERS, "top-tail-before", ("top_cluster", "tail_cluster"))),
        ("After post-processing", _table(summarize.top_tail(summary, "size_final", top_n),
         TOP_TAIL_HEADERS, "top-tail-after", ("top_cluster", "tail_cluster"))),
        ("Original top clusters and new top clusters", _table(
            summarize.top_comparison(summary, top_n), COMPARISON_HEADERS, "top-comparison",
            ("original_top_cluster", "new_top_cluster"))),
    ]  # fmt: skip
    group_rows = []
    for name, n_objects, clusters in groups.get("rows", []):
        crops = [
            (c, catalogue.crops(catalogue.picks.get(c, views.Picks()).top[:2], 32))
            for c in clusters
        ]
        group_rows.append({"name": name, "objects": n_objects, "clusters": crops})
    return render(
        "index.html",
        title="Cluster review",
        prefix="",
        site=site,
        head=head,
        index=index,
        tags=tag_options(summary),
        state_counts=state_options([r["state"] for r in index]),
        map_plot=views.map_plot(summary, centres_xy),
        scatter=views.scatter_plot(summary),
        groups={"source": groups.get("source"), "error": groups.get("error"), "rows": group_rows},
        funnel=funnel,
        top_n=top_n,
        size_tables=size_tables,
        k_sweep=None if k_sweep is None else _table(k_sweep, K_SWEEP_HEADERS, "k-sweep"),
        size_chart=views.size_chart(summary),
        sim_chart=views.similarity_chart(
            sim_counts, pp.min_similarity, "Cosine similarity to the cluster centre"
        ),
    )


def render_gallery(site: Site, summary: pd.DataFrame, catalogue: Catalogue, n_crops: int) -> str:
    """One tile per non-empty cluster: its ``n_crops`` most similar members."""
    live = summary[summary["size"] > 0].sort_values(
        ["size_final", "size", "cluster"], ascending=[False, False, True]
    )
    tiles = []
    for rec in live.to_dict("records"):
        c = int(rec["cluster"])
        picks = catalogue.picks.get(c, views.Picks())
        tiles.append(
            {
                "cluster": c, "state": views.cluster_state(rec).state,
                "tag": views.dominant_tag(rec["dominant_tags"]),
                "members": catalogue.crops(picks.top[:n_crops], 52),
                "size": int(rec["size"]), "size_final": int(rec["size_final"]),
                "mean_sim": views.fmt_float(rec["mean_sim"]),
            }
        )  # fmt: skip
    return render(
        "gallery.html",
        title="Gallery",
        prefix="",
        site=site,
        tiles=tiles,
        n_crops=n_crops,
        tags=tag_options(summary),
        state_counts=state_options([t["state"] for t in tiles]),
    )


# --------------------------------------------------------------------------- cluster pages


def verdict(rec: dict, state: str, pp: PostprocessConfig) -> str:
    if state == "removed":
        if rec["size_after_similarity"] > 0:
            left = int(rec["size_after_similarity"])
            return (
                f"Removed: {left} member{'s' if left != 1 else ''} passed the similarity "
                f"filter, fewer than the minimum cluster size {pp.min_cluster_size}."
            )
        return f"Removed: no member has cosine similarity above {pp.min_similarity}."
    if state == "shrunk":
        return f"Shrunk from {int(rec['size']):,} to {int(rec['size_final']):,} members."
    if state == "whole":
        return "Every member kept."
    return "No object was assigned to this centre."


def health(rec: dict, mix: list, histogram: views.BarChart) -> dict | None:
    """The health block of a cluster page (``cluster_summary``'s health columns)."""
    if int(rec.get("size", 0) or 0) == 0 or "n_users" not in rec:
        return None
    flags: list[tuple[str, int | None]] = []
    if rec.get("single_user"):
        flags.append(("single user: one user holds more than half of the members", None))
    if rec.get("sink"):
        flags.append(("sink: large, with a mean cosine under half the typical one", None))
    if not views.is_missing(rec.get("near_duplicate_of")):
        flags.append(("near duplicate of", int(rec["near_duplicate_of"])))
    nearest = rec.get("nearest_cluster")
    has_nearest = not views.is_missing(nearest) and int(nearest) >= 0
    return {
        "n_users": int(rec["n_users"]),
        "top_user": rec["top_user"],
        "top_share": views.fmt_float(100 * rec["top_user_share"], 0),
        "sim_min": views.fmt_float(rec["sim_min"]),
        "sim_median": views.fmt_float(rec["sim_median"]),
        "sim_std": views.fmt_float(rec["sim_std"]),
        "nearest": int(nearest) if has_nearest else None,
        "nearest_cos": views.fmt_float(rec.get("nearest_cos")),
        "mix": mix,
        "flags": flags,
        "histogram": histogram,
    }


def render_cluster_page(
    site: Site,
    rec: dict,
    catalogue: Catalogue,
    pp: PostprocessConfig,
    neighbours: tuple[int | None, int | None],
    nearest: list[dict],
    mix: list,
    histogram: views.BarChart,
    rescue: list[str],
    member_pages: list[tuple[str, int, list[dict]]],
    group: str | None,
    members: dict[str, list[dict]] | None = None,
    per_page: int = 100,
) -> str:
    """One cluster's page: verdict and rescue, sizes after each step, health, nearest
    clusters, the most similar, weakest kept and least similar removed members, and every
    member (``members``: the cards of the kept and of the removed ones, by cosine), which
    the page's script shows ``per_page`` at a time (``member_pages``: the pager's links)."""
    c = int(rec["cluster"])
    state = views.cluster_state(rec)
    picks = catalogue.picks.get(c, views.Picks())
    steps = [
        ("assigned by k-means", int(rec["size"]), "", 0),
        (f"one row per {pp.dedupe_key}" if pp.dedupe_key else "no dedupe",
         int(rec["size_after_dedupe"]), schema.STATUS_DUPLICATE,
         state.removed_by[schema.STATUS_DUPLICATE]),
        (f"cosine similarity > {pp.min_similarity}", int(rec["size_after_similarity"]),
         schema.STATUS_LOW_SIMILARITY, state.removed_by[schema.STATUS_LOW_SIMILARITY]),
        (f"cluster of at least {pp.min_cluster_size}", int(rec["size_final"]),
         schema.STATUS_SMALL_CLUSTER, state.removed_by[schema.STATUS_SMALL_CLUSTER]),
    ]  # fmt: skip
    context = {
        "cluster": c,
        "state": state.state,
        "dominant_tags": rec["dominant_tags"],
        "mean_sim": views.fmt_float(rec["mean_sim"]),
        "mean_sim_final": views.fmt_float(rec["mean_sim_final"]),
        "mean_dist": views.fmt_float(rec["mean_dist"]),
        "verdict": verdict(rec, state.state, pp),
        "rescue": rescue,
        "group": group,
        "steps": [{"name": n, "rows": r, "status": s, "removed": k} for n, r, s, k in steps],
        "health": health(rec, mix, histogram),
        "nearest": nearest,
        "grids": {
            "samples-top": catalogue.of(picks.top),
            "samples-weakest": catalogue.of(picks.weakest_kept),
            "samples-removed": catalogue.of(picks.removed_tail),
        },
        "member_pages": member_pages,
        "members": members or {"kept": [], "removed": []},
        "per_page": per_page,
    }
    return render(
        "cluster.html", title=f"Cluster {c}", prefix="../", site=site, c=context,
        prev=neighbours[0], next=neighbours[1],
    )  # fmt: skip
