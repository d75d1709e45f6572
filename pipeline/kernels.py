"""Pure numpy kernels, one block of rows at a time, float32 end to end.

Module-level functions so they pickle to dask workers; no I/O, no dask. Each costs one
matrix product of the block against the centres plus O(rows * dim) work.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from .schema import ASSIGNMENT_DTYPE

_SLICE_ROWS = 1024


def row_sq_norms(x: np.ndarray) -> np.ndarray:
    """Squared euclidean norm of each row, in the input's dtype.

    >>> row_sq_norms(np.array([[3.0, 4.0]], dtype=np.float32))
    array([25.], dtype=float32)
    """
    return np.einsum("ij,ij->i", x, x)


def nearest_centres(
    block: np.ndarray, centres: np.ndarray, centre_sq_norms: np.ndarray
) -> np.ndarray:
    """Index of the nearest centre for each row, shape ``(n_rows,)``.

    Uses ``|c|^2 - 2 x.c`` (the row norm does not change the argmin), so the only
    ``(n_rows, n_clusters)`` work is one matrix product and one in-place update.
    Ties go to the lowest index, as in scikit-learn.
    """
    scores = block @ centres.T
    scores *= -2.0
    scores += centre_sq_norms
    return np.argmin(scores, axis=1).astype(np.int32)


def assign_block(
    block: np.ndarray, centres: np.ndarray, centre_sq_norms: np.ndarray | None = None
) -> np.ndarray:
    """Cluster, euclidean distance and cosine similarity to the assigned centre.

    Parameters
    ----------
    block : ndarray of shape (n_rows, n_features), float32
    centres : ndarray of shape (n_clusters, n_features), float32
    centre_sq_norms : ndarray of shape (n_clusters,), default=None
        Precomputed ``row_sq_norms(centres)``.

    Returns
    -------
    records : structured ndarray of shape (n_rows,) with fields cluster, dist, sim
        (see :data:`pipeline.schema.ASSIGNMENT_DTYPE`). A zero row gets ``sim = 0``.

    >>> c = np.array([[1, 0], [0, 2]], dtype=np.float32)
    >>> r = assign_block(np.array([[0, 1]], dtype=np.float32), c)
    >>> int(r["cluster"][0]), float(r["dist"][0]), float(r["sim"][0])
    (1, 1.0, 1.0)
    """
    block = np.asarray(block, dtype=np.float32)
    centres = np.asarray(centres, dtype=np.float32)
    if centre_sq_norms is None:
        centre_sq_norms = row_sq_norms(centres)
    labels = nearest_centres(block, centres, centre_sq_norms)
    out = np.empty(len(block), dtype=ASSIGNMENT_DTYPE)
    out["cluster"] = labels
    # Exact distances and dots against the assigned centre, a slice of rows at a time so
    # the temporary copy of the assigned centres stays small.
    for start in range(0, len(block), _SLICE_ROWS):
        rows = block[start : start + _SLICE_ROWS]
        assigned = centres[labels[start : start + _SLICE_ROWS]]
        dots = row_dots(rows, assigned)
        assigned -= rows
        out["dist"][start : start + _SLICE_ROWS] = np.sqrt(row_sq_norms(assigned))
        norms = np.sqrt(row_sq_norms(rows) * centre_sq_norms[labels[start : start + _SLICE_ROWS]])
        sim = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
        out["sim"][start : start + _SLICE_ROWS] = np.clip(sim, -1.0, 1.0)
    return out


def row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two arrays of the same shape."""
    return np.einsum("ij,ij->i", a, b)


def label_sums(block: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-label row sums ``(k, n_features)`` float64 and counts ``(k,)`` (a sparse product).

    >>> sums, counts = label_sums(np.eye(3, dtype=np.float32), np.array([0, 0, 2]), 3)
    >>> sums.tolist(), counts.tolist()
    ([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [2, 0, 1])
    """
    n = len(block)
    onehot = sp.csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(onehot @ block, dtype=np.float64)
    return sums, np.bincount(labels, minlength=k).astype(np.int64)


def cluster_sums(
    block: np.ndarray, centres: np.ndarray, centre_sq_norms: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """One Lloyd step's sufficient statistics for a block.

    Returns per-cluster sums ``(n_clusters, n_features)`` in float64, member counts
    ``(n_clusters,)`` and the block's inertia (sum of squared distances). Summing these
    over blocks and dividing gives the full-batch k-means update, so a Lloyd iteration is
    a parallel map-reduce over the store.
    """
    labels = nearest_centres(block, centres, centre_sq_norms)
    sums, counts = label_sums(block, labels, len(centres))
    diff = block - centres[labels]
    inertia = float(row_sq_norms(diff).sum(dtype=np.float64))
    return sums, counts, inertia


def inertia_of(block: np.ndarray, centres: np.ndarray, centre_sq_norms: np.ndarray) -> float:
    """Sum of squared distances of the block's rows to their nearest centre."""
    labels = nearest_centres(block, centres, centre_sq_norms)
    diff = block - centres[labels]
    return float(row_sq_norms(diff).sum(dtype=np.float64))


def greedy_trials(n_clusters: int) -> int:
    """Candidates greedy k-means++ draws per centre (scikit-learn's ``2 + log(k)``)."""
    return 2 + int(math.log(n_clusters))


def kmeans_plusplus_indices(
    sample: np.ndarray, n_clusters: int, seed: int, trials: int | None = None
) -> np.ndarray:
    """Rows chosen by greedy k-means++ (scikit-learn's algorithm, in float32).

    Each step draws ``trials`` candidates (default ``2 + log(k)``) in proportion to the
    squared distance to the nearest chosen row and keeps the one that lowers the potential
    most; ``trials=1`` is plain k-means++.
    """
    x = np.ascontiguousarray(sample, dtype=np.float32)
    n = len(x)
    if n < n_clusters:
        raise ValueError(f"k-means++ needs at least {n_clusters} rows; got {n}.")
    rng = np.random.default_rng(seed)
    trials = trials or greedy_trials(n_clusters)
    x_sq = row_sq_norms(x)
    chosen = np.empty(n_clusters, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    closest = np.maximum(x_sq - 2.0 * (x @ x[chosen[0]]) + x_sq[chosen[0]], 0.0)
    potential = float(closest.sum(dtype=np.float64))
    for c in range(1, n_clusters):
        if potential <= 0.0:  # every row coincides with a chosen one: pick uniformly
            candidates = rng.integers(n, size=trials)
        else:
            cumulative = np.cumsum(closest, dtype=np.float64)
            candidates = np.searchsorted(cumulative, rng.random(trials) * cumulative[-1])
            candidates = np.minimum(candidates, n - 1)
        dist = x_sq[candidates, None] - 2.0 * (x[candidates] @ x.T) + x_sq[None, :]
        np.maximum(dist, 0.0, out=dist)
        np.minimum(dist, closest[None, :], out=dist)
        potentials = dist.sum(axis=1, dtype=np.float64)
        best = int(np.argmin(potentials))
        closest = dist[best]
        potential = float(potentials[best])
        chosen[c] = candidates[best]
    return chosen


def principal_projection(centred: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """Projection of centred rows onto their top ``n_components`` principal axes.

    Randomized SVD (scikit-learn); float32 result of shape ``(n_rows, n_components)``.
    """
    from sklearn.utils.extmath import randomized_svd

    _, _, components = randomized_svd(
        centred, n_components, n_iter=PROJECTION_POWER_ITERATIONS, random_state=seed
    )
    return centred @ components.T.astype(np.float32)


#: Power iterations of the seeding's randomized SVD (:func:`principal_projection`).
PROJECTION_POWER_ITERATIONS = 2


def seeding_projection_dim(
    n_clusters: int, n_features: int, projection_dim: int | None
) -> int | None:
    """``projection_dim`` where seeding on the projection is cheaper, else ``None``.

    Greedy k-means++ costs about ``k x trials x 2 x rows x dims`` flops; on the projection
    the same with ``projection_dim`` dims, plus the randomized SVD's passes over the sample
    (``2 x iterations + 2`` products with ``projection_dim + 10`` columns). Both scale with
    the sample's rows, so the choice depends on k and the dims only: with few clusters the
    projection costs more than it saves (k = 40 on 1,024 dims: ~8x more).

    >>> seeding_projection_dim(600, 1792, 256), seeding_projection_dim(40, 1024, 256)
    (256, None)
    >>> seeding_projection_dim(600, 128, 256) is None
    True
    """
    if projection_dim is None or projection_dim >= n_features:
        return None
    trials = greedy_trials(n_clusters)
    full = n_clusters * trials * n_features
    projected = n_clusters * trials * projection_dim + (
        (2 * PROJECTION_POWER_ITERATIONS + 2) * n_features * (projection_dim + 10)
    )
    return projection_dim if projected < full else None


def kmeans_plusplus(
    sample: np.ndarray,
    n_clusters: int,
    seed: int,
    projection_dim: int | None = None,
    overwrite_sample: bool = False,
) -> np.ndarray:
    """k-means++ seeding on a sample; returns ``(n_clusters, n_features)`` float32 centres.

    Seeding is memory-bound (one scan of the sample per centre), and its quality grows
    with the sample (small clusters need rows in it to get a centre). With
    ``projection_dim`` set below the feature count, candidate distances are computed on
    the sample's top principal components: cluster structure lives there while the
    dropped directions are mostly isotropic noise, so a 1,792 -> 256 projection makes
    seeding ~7x cheaper at nearly the same quality, which pays for a larger sample.
    The centres are always rows of the sample, in full dimension.

    We use this instead of ``sklearn.cluster.kmeans_plusplus`` because scikit-learn
    upcasts float32 distance blocks to float64, while this stays in float32 end to end.
    It can also seed on the sample's principal subspace, and centre the sample in place
    (``overwrite_sample``) so that no second sample-sized copy is held. Seeding quality is
    comparable: on blob data its potential (the sum of squared distances to the nearest
    centre) divided by scikit-learn's has a median of 1.02 over 5 seeds at full dimension
    (3,000 x 32, k = 40), and 0.91 over 3 seeds with the 1,792 -> 256 projection
    (2,000 x 1,792, k = 30), one BLAS thread; ``tests/test_train.py`` asserts at most 1.10.

    Parameters
    ----------
    sample : ndarray of shape (n_rows, n_features)
        A random sample of the dataset (``n_rows >= n_clusters``).
    n_clusters : int
    seed : int
    projection_dim : int, default=None
    overwrite_sample : bool, default=False
        Centre a float32 ``sample`` in place instead of copying it (as scipy's
        ``overwrite_a``): saves one sample-sized array; the sample is garbage afterwards.
    """
    x = np.asarray(sample, dtype=np.float32)
    if projection_dim is None or projection_dim >= min(x.shape):
        return x[kmeans_plusplus_indices(x, n_clusters, seed)].copy()
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = np.subtract(x, mean, out=x if overwrite_sample and x is sample else None)
    chosen = kmeans_plusplus_indices(
        principal_projection(centred, projection_dim, seed), n_clusters, seed
    )
    return centred[chosen] + mean


# --------------------------------------------------------------------------- cosine metric
# Spherical k-means: rows and centres live on the unit sphere, a row belongs to the centre
# of largest cosine, and a centre is the normalised mean of its members. On unit vectors
# ``|x - c|^2 = 2 - 2 cos(x, c)``, so this is k-means on normalised rows, and the
# k-means++ "D^2" weight of a row is proportional to ``1 - cos``.


def normalize_rows(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero), float32.

    Pass ``out=x`` to normalise a float32 block in place (no copy of the block).

    >>> normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32))
    array([[0.6, 0.8],
           [0. , 0. ]], dtype=float32)
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(row_sq_norms(x))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return np.multiply(x, scale[:, None], out=out)


def cosine_dist(sim: np.ndarray) -> np.ndarray:
    """The ``dist`` of the cosine metric: the Euclidean distance between the unit row and
    the unit centre, ``sqrt(2 - 2 cos)`` (0 for the same direction, 2 for opposite).

    >>> cosine_dist(np.array([1.0, 0.0, -1.0], dtype=np.float32)).tolist()
    [0.0, 1.4142135381698608, 2.0]
    """
    return np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0)).astype(np.float32)


def best_cosine(block: np.ndarray, unit_centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of largest dot product with each row and that dot product (one GEMM).

    For unit ``block`` rows the dot product is the cosine; for raw rows it is the cosine
    times the row norm, which has the same argmax. Ties go to the lowest index.
    """
    scores = block @ unit_centres.T
    labels = np.argmax(scores, axis=1)
    return labels.astype(np.int32), scores[np.arange(len(block)), labels]


def assign_block_cosine(block: np.ndarray, unit_centres: np.ndarray) -> np.ndarray:
    """Cluster of largest cosine, ``dist = sqrt(2 - 2 sim)`` and cosine ``sim``.

    One matrix product of the raw block against the unit centres; dividing the best dot
    product by the row norm gives the cosine, so the block is never copied. A zero row
    gets ``sim = 0`` (and cluster 0).

    >>> c = np.array([[1, 0], [0, 1]], dtype=np.float32)
    >>> r = assign_block_cosine(np.array([[0, 3]], dtype=np.float32), c)
    >>> int(r["cluster"][0]), float(r["dist"][0]), float(r["sim"][0])
    (1, 0.0, 1.0)
    """
    block = np.asarray(block, dtype=np.float32)
    unit_centres = np.asarray(unit_centres, dtype=np.float32)
    labels, dots = best_cosine(block, unit_centres)
    norms = np.sqrt(row_sq_norms(block))
    sim = np.clip(np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0), -1.0, 1.0)
    out = np.empty(len(block), dtype=ASSIGNMENT_DTYPE)
    out["cluster"] = labels
    out["sim"] = sim
    out["dist"] = cosine_dist(sim)
    return out


def spherical_minibatch_step(
    batch: np.ndarray, centres: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One spherical mini-batch k-means update on unit rows (pure: inputs are not changed).

    Each row goes to the centre of largest cosine; a centre with members moves to the
    count-weighted mean of its past position and its new members,
    ``(N_j c_j + sum_j) / (N_j + n_j)`` (scikit-learn's mini-batch rule), and is then
    renormalised to unit length. ``N_j`` (``counts``) accumulates members over the fit.

    Parameters
    ----------
    batch : ndarray of shape (n_rows, n_features), float32, unit rows
    centres : ndarray of shape (n_clusters, n_features), float32, unit rows
    counts : ndarray of shape (n_clusters,), float64

    Returns
    -------
    centres, counts : the updated model
    labels : int32 (n_rows,), the centre each row was assigned to (before the update)
    sims : float32 (n_rows,), the cosine to that centre
    """
    k = len(centres)
    labels, sims = best_cosine(batch, centres)
    n = len(batch)
    onehot = sp.csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(onehot @ batch, dtype=np.float64)
    members = np.bincount(labels, minlength=k).astype(np.float64)
    hit = members > 0
    new_counts = counts + members
    new_centres = centres.copy()
    moved = (centres[hit] * counts[hit, None] + sums[hit]) / new_counts[hit, None]
    new_centres[hit] = normalize_rows(moved.astype(np.float32))
    return new_centres, new_counts, labels, sims


def spherical_cluster_sums(
    block: np.ndarray, unit_centres: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """One spherical Lloyd step's statistics for a block of unit rows: per-cluster sums
    (float64), member counts and the sum of cosines to the assigned centre. Summing over
    blocks and normalising the sums gives the full-batch spherical k-means update."""
    k = len(unit_centres)
    labels, sims = best_cosine(block, unit_centres)
    n = len(block)
    onehot = sp.csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(onehot @ block, dtype=np.float64)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return sums, counts, float(sims.sum(dtype=np.float64))


def reseed_from_block(
    block: np.ndarray,
    sims: np.ndarray,
    n_new: int,
    rng: np.random.Generator,
    min_captured: int = 3,
    candidates_per_centre: int = 2,
    neighbours: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """New unit centres placed where they help the block's rows most (greedy, batched).

    ``candidates_per_centre x n_new`` (at least 16) candidate rows are drawn with
    probability proportional to ``1 - cos`` to their current centre (the D^2 weight of the
    cosine metric: the worst-served rows). Each candidate is denoised into a centre: the
    normalised mean of its ``neighbours`` most similar rows of the block. Then, greedily,
    the candidate centre that raises the rows' cosines the most in total is taken, the
    rows it captures (now closer to it than to their centre) are credited to it, and the
    gains of the others are recomputed; the new centre is the normalised mean of its
    captured rows. A lone outlier has no close neighbours and captures only itself, so it
    loses to a group of badly served look-alikes. Stops early when the best candidate
    captures fewer than ``min_captured`` rows. Costs two matrix products of the candidates
    against the block.

    Parameters
    ----------
    block : ndarray (n_rows, n_features), unit rows
    sims : ndarray (n_rows,), each row's cosine to its current centre

    Returns
    -------
    centres : float32 (m, n_features), m <= n_new
    captured : int64 (m,), rows of the block each new centre captured
    """
    current = np.asarray(sims, dtype=np.float32).copy()
    n = len(block)
    empty = np.empty((0, block.shape[1]), np.float32), np.empty(0, np.int64)
    weight = np.maximum(1.0 - current, 0.0).astype(np.float64)
    cumulative = np.cumsum(weight)
    if n_new <= 0 or n == 0 or cumulative[-1] <= 0:
        return empty
    n_candidates = min(n, max(16, candidates_per_centre * n_new))
    candidates = np.minimum(
        np.searchsorted(cumulative, rng.random(n_candidates) * cumulative[-1]), n - 1
    )
    cos = block[candidates] @ block.T
    q = min(neighbours, n)
    nearest = np.argpartition(-cos, q - 1, axis=1)[:, :q]
    proposals = normalize_rows(block[nearest].sum(axis=1))
    cos = proposals @ block.T
    found: list[np.ndarray] = []
    captured: list[int] = []
    available = np.ones(len(proposals), dtype=bool)
    for _ in range(n_new):
        gains = np.maximum(cos - current[None, :], 0.0).sum(axis=1, dtype=np.float64)
        gains[~available] = -1.0
        best = int(np.argmax(gains))
        members = cos[best] > current
        if gains[best] <= 0 or int(members.sum()) < min_captured:
            break
        available[best] = False
        centre = normalize_rows(block[members].sum(axis=0, dtype=np.float64)[None, :])[0]
        current = np.maximum(current, np.maximum(cos[best], block @ centre))
        found.append(centre)
        captured.append(int(members.sum()))
    if not found:
        return empty
    return np.stack(found).astype(np.float32), np.array(captured, dtype=np.int64)
