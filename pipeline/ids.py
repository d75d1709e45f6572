"""Cluster ids that last: renumber a new fit's centres to match a previous model's (pure).

A reviewer's groups file names cluster ids, so a re-fit (another seed, more data) must
give a cluster that is still there the id it had. :func:`match_ids` pairs each new centre
with at most one old centre by an optimal one-to-one matching on centre cosine
(:func:`scipy.optimize.linear_sum_assignment`). A pair is *the same cluster* when

- its centre cosine is at least ``min_cos`` (:data:`SAME_CLUSTER_COS`, 0.9), or
- given the members of both fits on the same rows (:func:`member_jaccard`: each row of a
  uniform sample labelled by the old and by the new centres), the two clusters share at
  least ``min_jaccard`` (:data:`SAME_CLUSTER_JACCARD`, 0.5) of their members (Jaccard:
  members in common over members in either);

the new centre then takes the old id. Every other new centre gets a fresh id above every
id used before (the old maximum and every id retired earlier), so an id is never reused
for another cluster; old ids left without a partner are *gone*.

Why 0.9: two fits of the same members give centres of cosine ~0.99 or more, while
distinct clusters sit far lower (the report flags centres at >= 0.95 as near-duplicates,
so two clusters that close are the same kind anyway). Why members too: a loose cluster
(low mean cosine) or one a mini-batch fit seeded late has a centre that wanders with the
seed while its members stay put: on the demo, 31 of the 79 clusters a seed-1 re-fit left
unmatched by centre cosine shared >= 0.5 of their members with an old cluster (11 of them
>= 0.9) at centre cosines of 0.34-0.9. A groups file names clusters for their members, so
"more than half of the members are the same objects" is the reviewer's sense of "the same
cluster"; it is also the stability diagnostic's "found again" (:mod:`pipeline.stability`,
``FOUND_JACCARD``). A Jaccard above 0.5 can hold for one partner at most, so the rule
cannot pair a cluster with two. The matching maximises first the number of pairs that
qualify, then their total cosine plus Jaccard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Centre cosine at or above which a new centre is the same cluster as an old one.
SAME_CLUSTER_COS = 0.9
#: Member Jaccard (on a sample labelled by both fits) at or above which a new cluster is
#: the same as an old one, whatever their centre cosine.
SAME_CLUSTER_JACCARD = 0.5
#: Rows of the store's uniform sample labelled by both fits for the member Jaccard, per
#: cluster (of the larger k): 200 x 600 covers the whole demo.
MEMBER_ROWS_PER_CLUSTER = 200


@dataclass(frozen=True)
class IdMatch:
    """How a new fit's centres were numbered against a previous model.

    Attributes
    ----------
    ids : int64 (n_new,)
        The id of each new centre, in the new fit's row order.
    matched : int64 (n_matched,)
        Ids kept (a new centre matched the old centre of that id).
    matched_cos : float64 (n_matched,)
        Centre cosine of each kept id's pair.
    new : int64 (n_new_ids,)
        Fresh ids (new centres without an old partner), ascending.
    gone : int64 (n_gone,)
        Old ids without a new partner, ascending.
    retired : int64
        Every id gone so far (this match and the previous model's), ascending: never
        given to another cluster.
    matched_jaccard : float64 (n_matched,)
        Member Jaccard of each kept id's pair (NaN where no members were compared).
    min_jaccard : float or None
        The member Jaccard rule's threshold; ``None``: matched on centres alone.
    member_rows : int
        Rows labelled by both fits for the member Jaccard (0: none).
    """

    ids: np.ndarray
    matched: np.ndarray
    matched_cos: np.ndarray
    new: np.ndarray
    gone: np.ndarray
    retired: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    min_cos: float = SAME_CLUSTER_COS
    matched_jaccard: np.ndarray = field(default_factory=lambda: np.empty(0))
    min_jaccard: float | None = None
    member_rows: int = 0

    @property
    def matched_share(self) -> float:
        """Share of the new centres that kept an old id."""
        return len(self.matched) / max(1, len(self.ids))

    @property
    def matched_by_members(self) -> int:
        """Kept ids whose pair is below the centre cosine threshold (the member rule)."""
        return int((self.matched_cos < self.min_cos).sum())

    def rule(self) -> str:
        """The "same cluster" rule in words."""
        text = f"centre cosine >= {self.min_cos}"
        if self.min_jaccard is not None:
            text += f" or member Jaccard >= {self.min_jaccard} on {self.member_rows:,} rows"
        return text

    def describe(self) -> dict:
        """What ``model.json`` records under ``"ids"``."""
        jaccard = self.matched_jaccard[np.isfinite(self.matched_jaccard)]
        return {
            "rule": self.rule(),
            "min_cos": self.min_cos,
            "min_jaccard": self.min_jaccard,
            "member_rows": self.member_rows,
            "matched": len(self.matched),
            "matched_by_members": self.matched_by_members,
            "new_count": len(self.new),
            "gone_count": len(self.gone),
            "new": [int(i) for i in self.new],
            "gone": [int(i) for i in self.gone],
            "retired": [int(i) for i in self.retired],
            "matched_share": round(self.matched_share, 4),
            "matched_cos_min": round(float(self.matched_cos.min()), 4)
            if len(self.matched_cos)
            else None,
            "matched_jaccard_min": round(float(jaccard.min()), 4) if len(jaccard) else None,
        }

    def summary_line(self, kept: tuple[int, int] | None = None) -> str:
        """One line for the log: kept, new and gone ids (and, given ``kept`` = (matched,
        total), how many of the previous run's kept clusters kept their id)."""
        gone = f" ({_clip_ids(self.gone)})" if len(self.gone) else ""
        new = f" ({_clip_ids(self.new)})" if len(self.new) else ""
        reviewed = (
            f"; of the previous run's {kept[1]} kept clusters, {kept[0]} kept their id"
            if kept is not None
            else ""
        )
        by_members = (
            f"; {self.matched_by_members} of them by members alone"
            if self.min_jaccard is not None
            else ""
        )
        return (
            f"cluster ids: {len(self.matched)} of {len(self.ids)} clusters kept their id "
            f"({self.rule()}{by_members}), {len(self.new)} new{new}, "
            f"{len(self.gone)} gone{gone}{reviewed}"
        )


def _clip_ids(ids: np.ndarray, n: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:n])
    return shown + (f", ... {len(ids) - n} more" if len(ids) > n else "")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, in float64 (zero rows stay zero).

    >>> unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6, 0.8], [0.0, 0.0]]
    """
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def fresh_ids(n_new: int) -> IdMatch:
    """Ids ``0..n_new-1`` for a first fit (nothing to match against)."""
    ids = np.arange(n_new, dtype=np.int64)
    return IdMatch(ids=ids, matched=np.empty(0, np.int64), matched_cos=np.empty(0),
                   new=ids.copy(), gone=np.empty(0, np.int64))  # fmt: skip


def member_jaccard(
    new_labels: np.ndarray, old_labels: np.ndarray, n_new: int, n_old: int
) -> np.ndarray:
    """Jaccard index of every (new, old) pair of clusters, from the labels both fits give
    the same rows (row numbers ``0..n_new-1`` and ``0..n_old-1``): members in common over
    members in either.

    >>> member_jaccard(np.array([0, 0, 0, 1]), np.array([1, 1, 0, 0]), 2, 2).round(3).tolist()
    [[0.25, 0.667], [0.5, 0.0]]
    """
    new_labels = np.asarray(new_labels, np.int64)
    old_labels = np.asarray(old_labels, np.int64)
    if new_labels.shape != old_labels.shape:
        raise ValueError(
            f"labels must be of the same rows. Got {new_labels.shape} and {old_labels.shape}."
        )
    both = np.bincount(new_labels * n_old + old_labels, minlength=n_new * n_old)
    both = both.reshape(n_new, n_old).astype(np.float64)
    union = both.sum(1)[:, None] + both.sum(0)[None, :] - both
    return np.divide(both, union, out=np.zeros_like(both), where=union > 0)


def match_ids(
    old_centres: np.ndarray,
    new_centres: np.ndarray,
    old_ids: np.ndarray | None = None,
    retired: np.ndarray | None = None,
    min_cos: float = SAME_CLUSTER_COS,
    jaccard: np.ndarray | None = None,
    min_jaccard: float = SAME_CLUSTER_JACCARD,
    member_rows: int = 0,
) -> IdMatch:
    """Number ``new_centres`` after ``old_centres`` (see the module docstring).

    Parameters
    ----------
    old_centres : ndarray of shape (n_old, n_features)
    new_centres : ndarray of shape (n_new, n_features)
    old_ids : ndarray of shape (n_old,), default=None
        The id of each old centre (``None``: ``0..n_old-1``).
    retired : ndarray, default=None
        Ids gone before the old model (never reused).
    min_cos : float, default=0.9
        Centre cosine at or above which two centres are the same cluster.
    jaccard : ndarray of shape (n_new, n_old), default=None
        Member Jaccard of each pair (:func:`member_jaccard`); ``None``: centres alone.
    min_jaccard : float, default=0.5
        Member Jaccard at or above which two clusters are the same (with ``jaccard``).
    member_rows : int, default=0
        Rows ``jaccard`` was counted on (recorded only).

    >>> old = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> new = np.array([[0.0, 1.0], [1.0, 0.05], [-1.0, 0.0]])
    >>> m = match_ids(old, new, old_ids=np.array([4, 7]))
    >>> m.ids.tolist(), m.new.tolist(), m.gone.tolist()
    ([7, 4, 8], [8], [])
    """
    old_centres = np.asarray(old_centres)
    new_centres = np.asarray(new_centres)
    if (
        old_centres.ndim != 2
        or new_centres.ndim != 2
        or old_centres.shape[1] != new_centres.shape[1]
    ):
        raise ValueError(
            f"centres must be 2-D of one width. Got {old_centres.shape} and {new_centres.shape}."
        )
    n_old, n_new = len(old_centres), len(new_centres)
    old_ids = np.arange(n_old, dtype=np.int64) if old_ids is None else np.asarray(old_ids, np.int64)
    if len(old_ids) != n_old or len(np.unique(old_ids)) != n_old:
        raise ValueError(f"old_ids must be {n_old} distinct ids. Got {old_ids.tolist()[:10]}.")
    retired = np.empty(0, np.int64) if retired is None else np.asarray(retired, np.int64)
    cos = unit_rows(new_centres) @ unit_rows(old_centres).T  # (n_new, n_old)
    if jaccard is not None:
        jaccard = np.asarray(jaccard, np.float64)
        if jaccard.shape != cos.shape:
            raise ValueError(f"jaccard must be of shape {cos.shape}. Got {jaccard.shape}.")
    rows, cols = _best_pairs(cos, min_cos, jaccard, min_jaccard)
    ids = np.full(n_new, -1, dtype=np.int64)
    ids[rows] = old_ids[cols]
    unmatched = np.flatnonzero(ids < 0)
    top = max([int(old_ids.max()) if n_old else -1, int(retired.max()) if len(retired) else -1])
    ids[unmatched] = top + 1 + np.arange(len(unmatched))
    order = np.argsort(old_ids[cols], kind="stable")
    gone = np.setdiff1d(old_ids, old_ids[cols])
    return IdMatch(
        ids=ids,
        matched=old_ids[cols][order],
        matched_cos=cos[rows, cols][order],
        new=np.sort(ids[unmatched]),
        gone=gone,
        retired=np.union1d(retired, gone).astype(np.int64),
        min_cos=min_cos,
        matched_jaccard=(jaccard[rows, cols][order] if jaccard is not None
                         else np.full(len(cols), np.nan)),
        min_jaccard=min_jaccard if jaccard is not None else None,
        member_rows=int(member_rows) if jaccard is not None else 0,
    )  # fmt: skip


def _best_pairs(
    cos: np.ndarray,
    min_cos: float,
    jaccard: np.ndarray | None = None,
    min_jaccard: float = SAME_CLUSTER_JACCARD,
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each pair of an optimal one-to-one matching: most pairs that
    qualify (cosine >= ``min_cos``, or Jaccard >= ``min_jaccard``) first, then the largest
    total cosine (plus Jaccard, when given) among them."""
    from scipy.optimize import linear_sum_assignment

    if cos.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    eligible = cos >= min_cos
    secondary = cos
    if jaccard is not None:
        eligible |= jaccard >= min_jaccard
        secondary = cos + jaccard
    # Each pair's secondary weight lies in [-1, 2]: a bonus above 3 x (pairs) + 1 makes
    # the count of qualifying pairs come first.
    bonus = 3.0 * min(cos.shape) + 2.0
    weight = np.where(eligible, bonus + secondary, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    keep = eligible[rows, cols]
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


def sort_by_id(centres: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres reordered so their ids ascend; also the order used (new row -> fit row).

    Saved models keep ``cluster_ids`` ascending, so the row of largest score maps to an
    id by one lookup and ties still go to the lowest id.

    >>> c, i, order = sort_by_id(np.array([[1.0], [2.0]]), np.array([9, 3]))
    >>> c.ravel().tolist(), i.tolist(), order.tolist()
    ([2.0, 1.0], [3, 9], [1, 0])
    """
    order = np.argsort(ids, kind="stable")
    return np.asarray(centres)[order], np.asarray(ids, np.int64)[order], order
