"""Cluster ids that last: renumber a new fit's centres to match a previous model's (pure).

A reviewer's groups file names cluster ids, so a re-fit (another seed, more data) must
give a cluster that is still there the id it had. :func:`match_ids` pairs each new centre
with at most one old centre by an optimal one-to-one matching on centre cosine
(:func:`scipy.optimize.linear_sum_assignment`): pairs whose cosine is at least
``min_cos`` (:data:`SAME_CLUSTER_COS`, 0.9) are *the same cluster* and the new centre
takes the old id; every other new centre gets a fresh id above every id used before
(the old maximum and every id retired earlier), so an id is never reused for another
cluster; old ids left without a partner are *gone*.

Why 0.9: two fits of the same members give centres of cosine ~0.99 or more, while
distinct clusters sit far lower (the report flags centres at >= 0.95 as near-duplicates,
so two clusters that close are the same kind anyway). The matching maximises first the
number of pairs at or above the threshold, then their total cosine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Centre cosine at or above which a new centre is the same cluster as an old one.
SAME_CLUSTER_COS = 0.9


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
    """

    ids: np.ndarray
    matched: np.ndarray
    matched_cos: np.ndarray
    new: np.ndarray
    gone: np.ndarray
    retired: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    min_cos: float = SAME_CLUSTER_COS

    @property
    def matched_share(self) -> float:
        """Share of the new centres that kept an old id."""
        return len(self.matched) / max(1, len(self.ids))

    def describe(self) -> dict:
        """What ``model.json`` records under ``"ids"``."""
        return {
            "min_cos": self.min_cos,
            "matched": len(self.matched),
            "new": [int(i) for i in self.new],
            "gone": [int(i) for i in self.gone],
            "retired": [int(i) for i in self.retired],
            "matched_share": round(self.matched_share, 4),
            "matched_cos_min": round(float(self.matched_cos.min()), 4)
            if len(self.matched_cos)
            else None,
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
        return (
            f"cluster ids: {len(self.matched)} of {len(self.ids)} clusters kept their id "
            f"(centre cosine >= {self.min_cos}), {len(self.new)} new{new}, "
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


def match_ids(
    old_centres: np.ndarray,
    new_centres: np.ndarray,
    old_ids: np.ndarray | None = None,
    retired: np.ndarray | None = None,
    min_cos: float = SAME_CLUSTER_COS,
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
    rows, cols = _best_pairs(cos, min_cos)
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
    )


def _best_pairs(cos: np.ndarray, min_cos: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each pair of an optimal one-to-one matching on ``cos``: most
    pairs at or above ``min_cos`` first, then the largest total cosine among them."""
    from scipy.optimize import linear_sum_assignment

    if cos.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    eligible = cos >= min_cos
    # A bonus larger than any total cosine makes the count of pairs come first.
    bonus = 2.0 * min(cos.shape) + 2.0
    weight = np.where(eligible, bonus + cos, 0.0)
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
