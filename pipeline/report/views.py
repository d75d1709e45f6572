"""View-models of the review report: pure functions from the run's tables to the plain
values the templates show (numbers, ids, geometry of the charts). No HTML here, so each
piece is tested with hand-built frames, and the templates only lay the values out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import schema

#: Edges of the similarity histograms: 0.02 wide over the whole cosine range.
SIM_BIN_EDGES = np.linspace(-1.0, 1.0, 101)

STATUS_LABELS = {
    schema.STATUS_KEPT: "kept",
    schema.STATUS_DUPLICATE: "duplicate image",
    schema.STATUS_LOW_SIMILARITY: "low similarity",
    schema.STATUS_SMALL_CLUSTER: "small cluster",
}

#: Column-sized names of the removing steps, as the cluster index shows them.
SHORT_LABELS = {
    schema.STATUS_DUPLICATE: "dup",
    schema.STATUS_LOW_SIMILARITY: "sim",
    schema.STATUS_SMALL_CLUSTER: "size",
}

#: Colours of the most common dominant tags on the map (the rest are grey).
TAG_PALETTE = (
    "#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d",
    "#4b5563", "#ea580c",
)  # fmt: skip
OTHER_COLOUR = "#b8c2cc"

#: The states the index can filter by; "kept" is whole or shrunk.
STATES = ("whole", "shrunk", "removed", "empty")


def is_missing(value: object) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def fmt_int(value: object) -> str:
    """``1,234``; empty when missing."""
    return "" if is_missing(value) else f"{int(value):,}"


def fmt_float(value: object, digits: int = 3) -> str:
    """``0.812``; a dash when missing.

    >>> fmt_float(0.81234), fmt_float(float("nan"))
    ('0.812', '–')
    """
    return "–" if is_missing(value) else f"{float(value):.{digits}f}"


def raw(value: object) -> str:
    """The exact value behind a cell, for sorting and for tests (``data-value``); empty
    when missing (sorted last)."""
    if is_missing(value):
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True)
class ClusterState:
    """How post-processing left a cluster: ``whole``, ``shrunk``, ``removed`` or ``empty``."""

    state: str
    removed_by: dict[str, int]

    @property
    def explanation(self) -> str:
        parts = [f"{n:,} {STATUS_LABELS[s]} ({s})" for s, n in self.removed_by.items() if n]
        return "; ".join(parts)

    @property
    def short(self) -> str:
        """E.g. ``"dup 3 · sim 40"``: the rows each step removed (see :data:`SHORT_LABELS`)."""
        return " · ".join(f"{SHORT_LABELS[s]} {n:,}" for s, n in self.removed_by.items() if n)

    @property
    def kept(self) -> bool:
        return self.state in ("whole", "shrunk")


def cluster_state(row: pd.Series | dict) -> ClusterState:
    """Classify one ``cluster_summary`` row and count the members each step removed.

    >>> state = cluster_state({"size": 12, "size_after_dedupe": 10,
    ...                        "size_after_similarity": 4, "size_final": 0})
    >>> state.state, state.short
    ('removed', 'dup 2 · sim 6 · size 4')
    """
    size, dedupe = int(row["size"]), int(row["size_after_dedupe"])
    similar, final = int(row["size_after_similarity"]), int(row["size_final"])
    removed_by = {
        schema.STATUS_DUPLICATE: size - dedupe,
        schema.STATUS_LOW_SIMILARITY: dedupe - similar,
        schema.STATUS_SMALL_CLUSTER: similar - final,
    }
    if size == 0:
        state = "empty"
    elif final == 0:
        state = "removed"
    elif final < size:
        state = "shrunk"
    else:
        state = "whole"
    return ClusterState(state, removed_by)


def dominant_tag(tags: object) -> str:
    """The first tag of ``dominant_tags`` (``"shoe 80%, bag 20%"`` -> ``"shoe"``).

    >>> dominant_tag("shoe 80%, bag 20%"), dominant_tag("")
    ('shoe', '')
    """
    if is_missing(tags) or not str(tags).strip():
        return ""
    first = str(tags).split(", ")[0]
    return first.rsplit(" ", 1)[0] if first.endswith("%") else first


def order_members(labelled: pd.DataFrame) -> pd.DataFrame:
    """Every member by cluster, then descending ``sim`` (ties by ascending ``object_id``),
    with ``rank`` (1 = the most similar of its cluster): the order of every member list.

    >>> t = pd.DataFrame({"object_id": [0, 1, 2], "cluster": [5, 5, 5], "sim": [.5, .9, .7]})
    >>> order_members(t)[["object_id", "rank"]].values.tolist()
    [[1, 1], [2, 2], [0, 3]]
    """
    ordered = labelled.sort_values(
        ["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True], kind="stable"
    ).reset_index(drop=True)
    ordered["rank"] = ordered.groupby("cluster", sort=False).cumcount() + 1
    return ordered


@dataclass
class Picks:
    """The members a cluster shows at a glance (object ids, each list in display order).

    ``top``: the most similar members (any status); ``weakest_kept``: the least similar
    kept members, weakest last (the edge of what goes into a group); ``removed_tail``: the
    least similar removed members, least similar first.
    """

    top: list[int] = field(default_factory=list)
    weakest_kept: list[int] = field(default_factory=list)
    removed_tail: list[int] = field(default_factory=list)

    def strip(self, n: int = 8) -> list[int]:
        """The index row's strip: top members, then the weakest kept ones, at most ``n``.

        >>> Picks(top=[1, 2, 3, 4, 5, 6, 7], weakest_kept=[6, 8, 9]).strip(6)
        [1, 2, 3, 4, 8, 9]
        """
        weak = [i for i in self.weakest_kept if i not in self.top[: n - 2]][-2:]
        head = [i for i in self.top if i not in weak][: n - len(weak)]
        return head + weak

    def ids(self) -> set[int]:
        return set(self.top) | set(self.weakest_kept) | set(self.removed_tail)


def cluster_picks(ordered: pd.DataFrame, n_top: int, n_weak: int, n_tail: int) -> dict[int, Picks]:
    """:class:`Picks` of every cluster of :func:`order_members`' table.

    >>> t = order_members(pd.DataFrame({"object_id": range(5), "cluster": 0,
    ...     "sim": [.9, .8, .7, .6, .5], "status": ["kept"] * 3 + ["removed:x"] * 2}))
    >>> p = cluster_picks(t, 2, 2, 1)[0]
    >>> p.top, p.weakest_kept, p.removed_tail
    ([0, 1], [1, 2], [4])
    """
    picks: dict[int, Picks] = {}
    for c, ids in (
        ordered.groupby("cluster", sort=False).head(n_top).groupby("cluster")[schema.OBJECT_ID]
    ):
        picks.setdefault(int(c), Picks()).top = ids.astype(int).tolist()
    kept = ordered[ordered[schema.STATUS] == schema.STATUS_KEPT]
    for c, ids in (
        kept.groupby("cluster", sort=False).tail(n_weak).groupby("cluster")[schema.OBJECT_ID]
    ):
        picks.setdefault(int(c), Picks()).weakest_kept = ids.astype(int).tolist()
    removed = ordered[ordered[schema.STATUS] != schema.STATUS_KEPT]
    for c, ids in (
        removed.groupby("cluster", sort=False).tail(n_tail).groupby("cluster")[schema.OBJECT_ID]
    ):
        picks.setdefault(int(c), Picks()).removed_tail = ids.astype(int).tolist()[::-1]
    return picks


def page_count(n: int, per_page: int) -> int:
    """Pages of ``per_page`` members needed for ``n`` (none for none).

    >>> page_count(0, 100), page_count(100, 100), page_count(101, 100)
    (0, 1, 2)
    """
    return -(-n // per_page)


def member_page_anchor(kind: str, page: int) -> str:
    """The anchor (on the cluster's page, whose script lays the page out from the page's
    data) of page ``page`` (1-based) of a cluster's ``kind`` (``kept`` or ``removed``)
    members.

    >>> member_page_anchor("kept", 2)
    'kept-2'
    """
    return f"{kind}-{page}"


def rescue_settings(
    deduped_sims: np.ndarray, min_similarity: float, min_cluster_size: int
) -> list[str]:
    """The settings that would have kept a removed cluster, given the cosines of its
    members after the dedupe step (the rows the similarity filter judged).

    >>> rescue_settings(np.array([.9, .8, .75, .6, .5]), 0.7, 4)
    ['postprocess.min_cluster_size: 3 (3 members pass the similarity filter)', \
'postprocess.min_similarity: 0.59 (4 members would pass it)']
    >>> rescue_settings(np.array([.5]), 0.7, 4)
    ['postprocess.min_cluster_size: 1 and postprocess.min_similarity: 0.49']
    """
    sims = np.sort(np.asarray(deduped_sims, dtype=np.float64))[::-1]
    passing = int((sims > min_similarity).sum())
    out = []
    if len(sims) >= min_cluster_size:
        if passing:
            out.append(
                f"postprocess.min_cluster_size: {passing} ({passing} member"
                f"{'s' if passing != 1 else ''} pass the similarity filter)"
            )
        edge = math.floor(float(sims[min_cluster_size - 1]) * 100 - 1e-9) / 100
        out.append(
            f"postprocess.min_similarity: {edge:.2f} ({min_cluster_size} members would pass it)"
        )
    elif len(sims):
        edge = math.floor(float(sims[-1]) * 100 - 1e-9) / 100
        if passing:
            out.append(
                f"postprocess.min_cluster_size: {passing} ({passing} member"
                f"{'s' if passing != 1 else ''} pass the similarity filter)"
            )
        else:
            out.append(
                f"postprocess.min_cluster_size: {len(sims)} and postprocess.min_similarity: "
                f"{edge:.2f}"
            )
    return out


def user_mix(counts: pd.Series, n: int = 4) -> list[tuple[str, int, float]]:
    """The ``n`` users with most members and the rest, as ``(user, count, share)``, from
    the members per user (a series indexed by user).

    >>> user_mix(pd.Series({"a": 4, "b": 2, "c": 1, "d": 1, "e": 0}), 2)
    [('a', 4, 0.5), ('b', 2, 0.25), ('2 others', 2, 0.25)]
    """
    counts = counts[counts > 0]
    counts = counts.iloc[np.lexsort((counts.index.to_numpy(dtype=str), -counts.to_numpy()))]
    total = int(counts.sum())
    if not total:
        return []
    out = [(str(u), int(k), k / total) for u, k in counts.head(n).items()]
    rest = counts.iloc[n:]
    if len(rest):
        out.append(
            (
                f"{len(rest)} other{'s' if len(rest) != 1 else ''}",
                int(rest.sum()),
                int(rest.sum()) / total,
            )
        )
    return out


def user_mixes(clusters: np.ndarray, users: np.ndarray, n: int = 4) -> dict[int, list]:
    """:func:`user_mix` of every cluster at once, from each member's cluster and user (one
    grouped count and sort, Python only for the ``n + 1`` entries a cluster shows; missing
    users are not counted).

    >>> user_mixes(np.array([1, 1, 1, 2]), np.array(["a", "b", "a", None], dtype=object), 1)
    {1: [('a', 2, 0.6666666666666666), ('1 other', 1, 0.3333333333333333)]}
    """
    frame = pd.DataFrame({"c": np.asarray(clusters), "u": pd.Series(users, dtype="str")})
    counts = frame.groupby(["c", "u"], sort=False).size().reset_index(name="k")
    if counts.empty:
        return {}
    counts = counts.sort_values(["c", "k", "u"], ascending=[True, False, True], kind="stable")
    rank = counts.groupby("c", sort=False).cumcount().to_numpy()
    totals = counts.groupby("c", sort=False)["k"].sum()
    out: dict[int, list] = {int(c): [] for c in totals.index}
    total_of = dict(zip(totals.index.tolist(), totals.tolist(), strict=True))
    top = counts[rank < n]
    for c, u, k in zip(top["c"].tolist(), top["u"].tolist(), top["k"].tolist(), strict=True):
        out[int(c)].append((str(u), int(k), k / total_of[c]))
    rest = counts[rank >= n].groupby("c", sort=False)["k"].agg(["size", "sum"])
    for c, others, left in zip(rest.index.tolist(), rest["size"].tolist(), rest["sum"].tolist(),
                               strict=True):  # fmt: skip
        name = f"{others} other{'s' if others != 1 else ''}"
        out[int(c)].append((name, int(left), left / total_of[c]))
    return out


# --------------------------------------------------------------------------- centres


def nearest_clusters(
    centres: np.ndarray, k: int = 6, block: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other centres of each centre by cosine, most similar first:
    ``(ids, cosines)``, each ``(n_clusters, k)`` (computed in row blocks).

    >>> ids, cos = nearest_clusters(np.array([[1., 0], [1, .1], [0, 1]]), k=2)
    >>> ids.tolist(), np.round(cos, 3).tolist()
    ([[1, 2], [0, 2], [1, 0]], [[0.995, 0.0], [0.995, 0.1], [0.1, 0.0]])
    """
    norms = np.linalg.norm(centres, axis=1, keepdims=True)
    unit = (centres / np.where(norms == 0, 1, norms)).astype(np.float32)
    n = len(unit)
    k = max(0, min(k, n - 1))
    ids = np.zeros((n, k), dtype=np.int64)
    cos = np.zeros((n, k), dtype=np.float64)
    for start in range(0, n, block):
        sims = unit[start : start + block] @ unit.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf
        part = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        ids[start : start + block] = part
        cos[start : start + block] = np.take_along_axis(sims, part, axis=1)
    return ids, cos


def centre_map(centres: np.ndarray) -> np.ndarray:
    """A 2-D projection of the unit centres (their first two principal axes), scaled to
    ``[0, 1]`` on each axis (outliers clipped to the edge): ``(n_clusters, 2)``; the sign of each axis is fixed so the
    largest loading is positive (the same centres always give the same picture).

    >>> xy = centre_map(np.array([[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]))
    >>> xy.shape, float(xy.min()), float(xy.max())
    ((4, 2), 0.0, 1.0)
    """
    norms = np.linalg.norm(centres, axis=1, keepdims=True)
    unit = centres / np.where(norms == 0, 1, norms)
    centred = (unit - unit.mean(axis=0)).astype(np.float64)
    if len(centred) < 2:
        return np.full((len(centred), 2), 0.5)
    # The principal axes from the smaller Gram matrix (k x k for k centres of dim > k);
    # one BLAS thread: a small matrix, and the stage's other threads are busy.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        gram = centred @ centred.T if len(centred) <= centred.shape[1] else centred.T @ centred
        values, vectors = np.linalg.eigh(gram)
    if len(centred) <= centred.shape[1]:
        order = np.argsort(values)[::-1][:2]
        axes = (centred.T @ vectors[:, order]).T
        axes /= np.where(np.linalg.norm(axes, axis=1, keepdims=True) == 0, 1,
                         np.linalg.norm(axes, axis=1, keepdims=True))  # fmt: skip
    else:
        axes = vectors[:, np.argsort(values)[::-1][:2]].T
    if len(axes) < 2:
        axes = np.vstack([axes, np.zeros((2 - len(axes), centred.shape[1]))])
    signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])
    xy = centred @ (axes * np.where(signs == 0, 1, signs)[:, None]).T
    # Scaled by the 1st-99th percentiles (a few far-off centres would squash the rest
    # into a corner), clipped to the frame.
    lo, hi = np.percentile(xy, 1, axis=0), np.percentile(xy, 99, axis=0)
    return np.clip((xy - lo) / np.where(hi > lo, hi - lo, 1), 0.0, 1.0)


def tag_colours(tags: pd.Series) -> dict[str, str]:
    """A colour for each of the most common tags (``TAG_PALETTE``, by count then name).

    >>> tag_colours(pd.Series(["b", "a", "b", ""]))
    {'b': '#2563eb', 'a': '#dc2626'}
    """
    counts = tags[tags != ""].value_counts()
    counts = counts.iloc[np.lexsort((counts.index.to_numpy(dtype=str), -counts.to_numpy()))]
    return dict(zip(counts.index[: len(TAG_PALETTE)], TAG_PALETTE, strict=False))


@dataclass(frozen=True)
class Dot:
    """One cluster on a chart: its position in pixels, radius, colour and label."""

    cluster: int
    x: float
    y: float
    r: float
    colour: str
    title: str
    state: str


@dataclass(frozen=True)
class Plot:
    """A dot chart: size, dots and axis ticks ``(position, label)``."""

    width: int
    height: int
    dots: list[Dot]
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    x_label: str = ""
    y_label: str = ""
    legend: list[tuple[str, str]] = field(default_factory=list)
    margin: tuple[int, int, int, int] = (10, 10, 10, 10)  # left, right, top, bottom


def _radius(size: float, largest: float) -> float:
    return 2.5 + 9.0 * math.sqrt(max(size, 0) / max(largest, 1))


def map_plot(summary: pd.DataFrame, xy: np.ndarray, width: int = 760, height: int = 520) -> Plot:
    """The centres map: one dot per non-empty cluster at its :func:`centre_map` place,
    the area by members, the colour by dominant tag; removed clusters drawn hollow."""
    tags = summary["dominant_tags"].map(dominant_tag)
    colours = tag_colours(tags[summary["size"] > 0])
    left, right, top, bottom = 12, 12, 12, 12
    largest = float(summary["size"].max() or 1)
    dots = []
    for i, rec in enumerate(summary.to_dict("records")):
        if int(rec["size"]) == 0:
            continue
        state = cluster_state(rec).state
        tag = tags.iloc[i]
        dots.append(
            Dot(
                cluster=int(rec["cluster"]),
                x=round(left + xy[i, 0] * (width - left - right), 1),
                y=round(top + (1 - xy[i, 1]) * (height - top - bottom), 1),
                r=round(_radius(rec["size"], largest), 1),
                colour=colours.get(tag, OTHER_COLOUR),
                title=f"cluster {int(rec['cluster'])}: {int(rec['size']):,} members, "
                f"{int(rec['size_final']):,} kept, {tag or 'no tag'} ({state})",
                state=state,
            )
        )
    dots.sort(key=lambda d: -d.r)  # small dots on top
    legend = [(tag, colour) for tag, colour in colours.items()] + [("other", OTHER_COLOUR)]
    return Plot(width, height, dots, legend=legend, margin=(left, right, top, bottom))


def nice_ticks(top: float, n: int = 4) -> list[float]:
    """Axis ticks from 0 to at least ``top`` in about ``n`` round steps (1, 2 or 5 x 10^k).

    >>> nice_ticks(250)
    [0, 100, 200, 300]
    >>> nice_ticks(3)
    [0, 1, 2, 3]
    """
    if top <= 0:
        return [0, 1]
    rough = top / n
    magnitude = 10 ** math.floor(math.log10(rough))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
    step = max(step, 1) if top >= 1 else step
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) if step < 1 else int(i * step) for i in range(count + 1)]


def scatter_plot(summary: pd.DataFrame, width: int = 760, height: int = 360) -> Plot:
    """Size (log scale) against mean cosine, one dot per non-empty cluster, coloured by
    state: large loose clusters (sinks) sit bottom right, small tight ones top left."""
    left, right, top, bottom = 56, 14, 14, 40
    live = summary[summary["size"] > 0]
    colours = {"whole": "#0f7b3f", "shrunk": "#b7791f", "removed": "#c53030"}
    if live.empty:
        return Plot(width, height, [], margin=(left, right, top, bottom))
    log_max = math.log10(max(10.0, float(live["size"].max())))
    sims = live["mean_sim"].astype(float)
    y_lo = math.floor(min(sims.min(), 0.5) * 10) / 10
    y_hi = min(1.0, math.ceil(sims.max() * 10) / 10) if sims.max() > y_lo else y_lo + 0.1
    pw, ph = width - left - right, height - top - bottom

    def px(size: float) -> float:
        return left + pw * math.log10(max(size, 1)) / log_max

    def py(sim: float) -> float:
        return top + ph * (1 - (sim - y_lo) / (y_hi - y_lo))

    dots = []
    for rec in live.to_dict("records"):
        state = cluster_state(rec).state
        sim = float(rec["mean_sim"])
        dots.append(
            Dot(
                cluster=int(rec["cluster"]),
                x=round(px(rec["size"]), 1),
                y=round(py(sim), 1),
                r=3.5,
                colour=colours[state],
                title=f"cluster {int(rec['cluster'])}: {int(rec['size']):,} members, mean "
                f"cosine {sim:.3f} ({state})",
                state=state,
            )
        )
    x_ticks = [(round(px(10**e), 1), f"{10**e:,}") for e in range(int(log_max) + 1)]
    steps = int(round((y_hi - y_lo) / 0.1))
    y_ticks = [(round(py(y_lo + 0.1 * i), 1), f"{y_lo + 0.1 * i:.1f}") for i in range(steps + 1)]
    return Plot(
        width, height, dots, x_ticks, y_ticks, "members (log scale)", "mean cosine",
        legend=list((s, c) for s, c in colours.items()), margin=(left, right, top, bottom),
    )  # fmt: skip


# --------------------------------------------------------------------------- bar charts


def similarity_counts(labelled: pd.DataFrame) -> dict[str, np.ndarray]:
    """Histogram counts over :data:`SIM_BIN_EDGES`: all rows, and the rows kept."""
    sim = np.clip(labelled["sim"].to_numpy(dtype=np.float64), -1.0, 1.0)  # float32 may pass 1
    kept = (labelled[schema.STATUS] == schema.STATUS_KEPT).to_numpy()
    return {
        "all": np.histogram(sim, SIM_BIN_EDGES)[0],
        "kept": np.histogram(sim[kept], SIM_BIN_EDGES)[0],
    }


def size_histogram(sizes: pd.Series) -> tuple[list[str], np.ndarray]:
    """Counts of non-empty cluster sizes in powers-of-two bins, with labels.

    >>> size_histogram(pd.Series([0, 1, 2, 3, 9]))
    (['1', '2–3', '4–7', '8–15'], array([1, 2, 0, 1]))
    """
    live = sizes[sizes > 0].to_numpy()
    top = int(live.max()) if len(live) else 1
    n_bins = int(math.floor(math.log2(top))) + 1
    edges = 2 ** np.arange(n_bins + 1)
    counts = np.histogram(live, edges)[0]
    pairs = zip(edges[:-1], edges[1:], strict=True)
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}–{hi - 1}" for lo, hi in pairs]
    return labels, counts


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str
    opacity: float = 1.0


@dataclass(frozen=True)
class BarChart:
    """Geometry of a bar chart (pixels), ready to be laid out as SVG."""

    title: str
    width: int
    height: int
    bars: list[Bar]
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str]]
    x_label: str
    y_label: str
    legend: list[tuple[float, str, str]]
    plot: tuple[float, float, float, float]  # left, top, width, height
    marker: tuple[float, str] | None = None


def bar_chart(
    labels: list[str],
    series: list[tuple[str, np.ndarray, str]],
    title: str,
    x_label: str,
    y_label: str,
    overlay: bool = False,
    marker: tuple[float, str] | None = None,
    width: int = 760,
    height: int = 280,
    margins: tuple[int, int, int, int] = (64, 16, 34, 50),
) -> BarChart:
    """Bars of ``series`` (``(name, values, colour)``), grouped or overlaid, with ticks.

    ``marker`` is ``(x in bar units, label)`` for a dashed vertical line (a threshold).

    >>> chart = bar_chart(["a", "b"], [("n", np.array([1, 2]), "#000")], "t", "x", "y")
    >>> [round(b.height, 1) for b in chart.bars], chart.y_ticks[-1][1]
    ([98.0, 196.0], '2')
    """
    left, right, top, bottom = margins
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(1, len(labels))
    ticks = nice_ticks(max((float(np.max(v)) for _, v, _ in series if len(v)), default=1.0))
    y_max = ticks[-1] or 1
    slot = plot_w / n
    inner = 0.86 * slot
    bar_w = inner if overlay else inner / max(1, len(series))
    bars = []
    for s, (name, values, colour) in enumerate(series):
        for i, value in enumerate(values):
            if value <= 0:
                continue
            h = plot_h * float(value) / y_max
            x = left + i * slot + 0.07 * slot + (0 if overlay else s * bar_w)
            bars.append(
                Bar(round(x, 2), round(top + plot_h - h, 2), round(max(bar_w, 0.6), 2),
                    round(h, 2), colour, f"{labels[i]}: {int(value):,} ({name})",
                    0.85 if overlay and s else 1.0)
            )  # fmt: skip
    y_ticks = [
        (round(top + plot_h - plot_h * v / y_max, 1), f"{v:,}" if isinstance(v, int) else f"{v:g}")
        for v in ticks
    ]
    longest = max((len(label) for label in labels), default=1)
    step = max(1, math.ceil(n / 14), math.ceil(longest * 6.5 / slot))
    x_ticks = [(round(left + (i + 0.5) * slot, 1), labels[i]) for i in range(0, n, step)]
    legend = []
    lx = left + plot_w
    for name, _, colour in reversed(series):
        lx -= 12 + 7 * len(name) + 18
        legend.append((lx, name, colour))
    mark = None if marker is None else (round(left + marker[0] * slot, 1), marker[1])
    return BarChart(
        title, width, height, bars, y_ticks, x_ticks, x_label, y_label, legend,
        (left, top, plot_w, plot_h), mark,
    )  # fmt: skip


def size_chart(summary: pd.DataFrame) -> BarChart:
    labels, before = size_histogram(summary["size"])
    _, after = size_histogram(summary["size_final"].where(summary["size_final"] > 0, 0))
    after = np.pad(after, (0, len(before) - len(after)))[: len(before)]
    return bar_chart(
        labels,
        [("before", before, "#9aa5b1"), ("after", after, "#2563eb")],
        "Cluster sizes before and after post-processing",
        "members per cluster (log₂ bins)",
        "clusters",
    )


def similarity_chart(
    counts: dict[str, np.ndarray], threshold: float, title: str, small: bool = False
) -> BarChart:
    """The cosine histogram of all and of kept members, over the bins that hold any
    (and the threshold), with the threshold marked."""
    counts_all, counts_kept = counts["all"], counts["kept"]
    edges_all = SIM_BIN_EDGES
    if small:  # 0.04 wide: a few bars for a cluster's page
        counts_all = counts_all.reshape(-1, 2).sum(axis=1)
        counts_kept = counts_kept.reshape(-1, 2).sum(axis=1)
        edges_all = SIM_BIN_EDGES[::2]
    nonzero = np.flatnonzero(counts_all)
    lo, hi = (nonzero[0], nonzero[-1] + 1) if len(nonzero) else (0, len(counts_all))
    t_bin = int(np.clip(np.searchsorted(edges_all, threshold), 0, len(counts_all)))
    lo, hi = min(lo, t_bin), max(hi, t_bin)
    edges = edges_all[lo : hi + 1]
    bin_w = edges_all[1] - edges_all[0]
    size = {"width": 360, "height": 150, "margins": (40, 8, 24, 34)} if small else {}
    return bar_chart(
        [f"{e:.2f}" for e in edges[:-1]],
        [("all", counts_all[lo:hi], "#9aa5b1"), ("kept", counts_kept[lo:hi], "#2563eb")],
        title,
        "cosine similarity (bin start)",
        "objects",
        overlay=True,
        marker=((threshold - edges[0]) / bin_w, f"threshold {threshold}"),
        **size,
    )


@dataclass(frozen=True)
class FunnelBar:
    y: float
    width: float
    step: str
    rows: int


def funnel_bars(funnel_table: pd.DataFrame, bar_width: int = 280) -> list[FunnelBar]:
    """One horizontal bar per funnel step, its width by the rows left.

    >>> [b.width for b in funnel_bars(pd.DataFrame({"step": ["a", "b"], "rows": [10, 5]}), 100)]
    [100.0, 50.0]
    """
    top = max(1, int(funnel_table["rows"].max()))
    return [
        FunnelBar(6 + 26 * i, round(max(bar_width * int(rec["rows"]) / top, 1), 1),
                  str(rec["step"]), int(rec["rows"]))
        for i, rec in enumerate(funnel_table.to_dict("records"))
    ]  # fmt: skip
