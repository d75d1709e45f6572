import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import pairwise_distances

from pipeline import kernels


def reference_assign(x, c):
    """Plain float64 numpy: nearest centre, distance and cosine similarity."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    d = pairwise_distances(x64, c64)
    labels = d.argmin(axis=1)
    dist = d[np.arange(len(x)), labels]
    cos = (x64 * c64[labels]).sum(1) / (
        np.linalg.norm(x64, axis=1) * np.linalg.norm(c64[labels], axis=1)
    )
    return labels, dist, cos


def test_assign_block_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 64), dtype=np.float32)
    c = rng.standard_normal((30, 64), dtype=np.float32)
    out = kernels.assign_block(x, c)
    labels, dist, cos = reference_assign(x, c)
    np.testing.assert_array_equal(out["cluster"], labels)
    np.testing.assert_allclose(out["dist"], dist, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["sim"], cos, rtol=1e-5, atol=1e-5)
    assert out["dist"].dtype == np.float32 and out["sim"].dtype == np.float32


def test_assign_block_hand_computed():
    c = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    x = np.array([[1.0, 1.0], [9.0, 0.0], [5.0, 0.0]], dtype=np.float32)
    out = kernels.assign_block(x, c)
    # [5, 0] is equidistant: ties go to the lowest index, as in scikit-learn.
    assert out["cluster"].tolist() == [0, 1, 0]
    np.testing.assert_allclose(out["dist"], [np.sqrt(2), 1.0, 5.0], rtol=1e-6)
    # Cosine to the zero centre is undefined: reported as 0.
    np.testing.assert_allclose(out["sim"], [0.0, 1.0, 0.0], atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 8),
    d=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_assign_block_invariants(n, k, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    c = rng.standard_normal((k, d), dtype=np.float32)
    out = kernels.assign_block(x, c)
    assert ((0 <= out["cluster"]) & (out["cluster"] < k)).all()
    assert (out["dist"] >= 0).all()
    assert ((-1 <= out["sim"]) & (out["sim"] <= 1)).all()
    # The assigned centre is never farther than any other centre (up to float32 rounding).
    all_d = np.sqrt(((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1))
    assert (out["dist"] <= all_d.min(axis=1) * (1 + 1e-4) + 1e-4).all()


def test_cluster_sums_is_one_lloyd_step():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8), dtype=np.float32)
    c = x[:5].copy()
    sums, counts, inertia = kernels.cluster_sums(x, c, kernels.row_sq_norms(c))
    labels, dist, _ = reference_assign(x, c)
    for j in range(5):
        np.testing.assert_allclose(sums[j], x[labels == j].sum(0), rtol=1e-5, atol=1e-4)
        assert counts[j] == (labels == j).sum()
    assert inertia == pytest.approx((dist**2).sum(), rel=1e-5)
    # Split into two blocks: the statistics add up.
    a = kernels.cluster_sums(x[:120], c, kernels.row_sq_norms(c))
    b = kernels.cluster_sums(x[120:], c, kernels.row_sq_norms(c))
    np.testing.assert_allclose(a[0] + b[0], sums, rtol=1e-6)
    np.testing.assert_array_equal(a[1] + b[1], counts)


def test_kmeans_plusplus_picks_distinct_sample_rows_deterministically():
    rng = np.random.default_rng(2)
    # Three far-apart blobs: k-means++ must seed one centre in each.
    blobs = np.concatenate([rng.normal(m, 0.1, (50, 4)) for m in (0, 10, 20)]).astype(np.float32)
    centres = kernels.kmeans_plusplus(blobs, 3, seed=5)
    assert centres.dtype == np.float32
    assert sorted(np.round(centres.mean(axis=1) / 10).astype(int).tolist()) == [0, 1, 2]
    rows = {tuple(r) for r in blobs.tolist()}
    assert all(tuple(r) in rows for r in centres.tolist())
    np.testing.assert_array_equal(centres, kernels.kmeans_plusplus(blobs, 3, seed=5))


def test_kmeans_plusplus_needs_enough_rows():
    with pytest.raises(ValueError, match="at least 4 rows"):
        kernels.kmeans_plusplus(np.zeros((3, 2), np.float32), 4, seed=0)


@settings(max_examples=25, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(2, 30), st.integers(1, 6)),
        elements=st.floats(-100, 100, width=32),
    )
)
def test_kmeans_plusplus_on_any_data(sample):
    k = min(len(sample), 3)
    centres = kernels.kmeans_plusplus(sample, k, seed=0)
    assert centres.shape == (k, sample.shape[1])
    assert np.isfinite(centres).all()


# ----------------------------------------------------------------------------- production shape

PROD_DIM, PROD_K, PROD_CHUNK = 1792, 600, 8192  # the demo's width, default k and chunk_rows


def production_block(n_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows around k centres with a shared positive offset (as ReLU-style embeddings have),
    which makes ``|c|^2 - 2 x.c`` cancel heavily: the float32 path's hard case."""
    rng = np.random.default_rng(seed)
    centres = (rng.standard_normal((PROD_K, PROD_DIM)) + 2.0).astype(np.float32)
    members = rng.integers(PROD_K, size=n_rows)
    x = centres[members] + rng.standard_normal((n_rows, PROD_DIM)).astype(np.float32) * 0.8
    return x.astype(np.float32), centres


def float64_oracle(x: np.ndarray, c: np.ndarray):
    """Squared distances to every centre in float64, by the direct difference for the
    assigned centre (no cancellation): labels, margins, dist and cosine."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    sq = (x64**2).sum(1)[:, None] - 2.0 * x64 @ c64.T + (c64**2).sum(1)[None]
    order = np.argsort(sq, axis=1)[:, :2]
    labels = order[:, 0]
    rows = np.arange(len(x))
    margin = sq[rows, order[:, 1]] - sq[rows, labels]
    diff = x64 - c64[labels]
    dist = np.sqrt((diff**2).sum(1))
    cos = (x64 * c64[labels]).sum(1) / (
        np.linalg.norm(x64, axis=1) * np.linalg.norm(c64[labels], axis=1)
    )
    return labels, margin, dist, cos, sq


@pytest.mark.parametrize("n_rows", [PROD_CHUNK, PROD_CHUNK + 517], ids=["full", "ragged"])
def test_assign_block_production_shape_matches_float64(n_rows):
    x, c = production_block(n_rows, seed=n_rows)
    out = kernels.assign_block(x, c, kernels.row_sq_norms(c))
    labels, margin, dist, cos, sq = float64_oracle(x, c)
    assert out.shape == (n_rows,) and out.dtype == kernels.ASSIGNMENT_DTYPE
    # Labels agree wherever the two nearest centres are not a float32 near-tie; at a
    # near-tie ours must still pick a centre whose distance is the minimum up to round-off.
    clear = margin > 1e-3 * sq[np.arange(n_rows), labels]
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(out["cluster"][clear], labels[clear])
    ours = sq[np.arange(n_rows), out["cluster"]]
    np.testing.assert_allclose(ours, sq.min(axis=1), rtol=1e-4)
    # dist and sim are those of the assigned centre, to float32 round-off.
    same = out["cluster"] == labels
    np.testing.assert_allclose(out["dist"][same], dist[same], rtol=1e-5)
    np.testing.assert_allclose(out["sim"][same], cos[same], rtol=0, atol=2e-6)
    # The rows past the last full 1,024-row slice are filled too (no stale values).
    assert np.isfinite(out["dist"]).all() and (out["dist"] > 0).all()
    np.testing.assert_array_equal(out, kernels.assign_block(x, c))  # norms given or not


def test_cluster_sums_production_shape_matches_numpy():
    n_rows = PROD_CHUNK + 517
    x, c = production_block(n_rows, seed=3)
    far = c[:3] + 100.0  # three centres no row is nearest to: empty clusters
    c = np.concatenate([c[:400], far, c[400:]])
    sums, counts, inertia = kernels.cluster_sums(x, c, kernels.row_sq_norms(c))
    labels, margin, _, _, sq = float64_oracle(x, c)
    assert (margin > 1e-3 * sq[np.arange(n_rows), labels]).all()  # no near-ties: exact labels
    k = len(c)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=k))
    assert (counts[400:403] == 0).all() and (sums[400:403] == 0).all()
    assert counts.sum() == n_rows and sums.dtype == np.float64 and sums.shape == (k, PROD_DIM)
    order = np.argsort(labels, kind="stable")
    expected = np.zeros((k, PROD_DIM))
    filled = np.flatnonzero(counts)
    starts = np.searchsorted(labels[order], filled)
    expected[filled] = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
    np.testing.assert_allclose(sums, expected, rtol=1e-5, atol=1e-3)
    assert inertia == pytest.approx(sq.min(axis=1).sum(), rel=1e-5)


# --------------------------------------------------------------------------- cosine metric


def reference_cosine(x, c):
    """Plain float64 numpy: argmax of normalised dot products, the cosine, sqrt(2 - 2 cos)."""
    xu = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    cu = c.astype(np.float64) / np.linalg.norm(c.astype(np.float64), axis=1, keepdims=True)
    cos = xu @ cu.T
    labels = cos.argmax(axis=1)
    best = cos[np.arange(len(x)), labels]
    return labels, np.linalg.norm(xu - cu[labels], axis=1), best, cos


def test_assign_block_cosine_matches_numpy_reference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 48), dtype=np.float32) * rng.uniform(0.1, 5, (400, 1)).astype(
        np.float32
    )
    c = kernels.normalize_rows(rng.standard_normal((25, 48), dtype=np.float32))
    out = kernels.assign_block_cosine(x, c)
    labels, dist, best, cos = reference_cosine(x, c)
    # float32 may break near-ties differently: the chosen centre must be (nearly) the best.
    chosen = cos[np.arange(len(x)), out["cluster"]]
    np.testing.assert_allclose(chosen, best, atol=1e-5)
    assert (out["cluster"] == labels).mean() > 0.99
    np.testing.assert_allclose(out["sim"], best, atol=1e-5)
    # dist is the Euclidean distance between the unit row and the unit centre.
    np.testing.assert_allclose(out["dist"], dist, atol=1e-3)
    np.testing.assert_allclose(
        out["dist"], np.sqrt(2 - 2 * out["sim"].astype(np.float64)), atol=1e-5
    )
    assert out["dist"].dtype == np.float32 and out["sim"].dtype == np.float32


def test_assign_block_cosine_ignores_row_scale_and_handles_zero_rows():
    c = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    x = np.array([[0.1, 0.2], [100.0, 1.0], [0.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    out = kernels.assign_block_cosine(x, c)
    assert out["cluster"].tolist() == [1, 0, 0, 1]
    assert out["sim"][2] == 0.0 and out["dist"][2] == pytest.approx(np.sqrt(2))
    assert out["sim"][3] == pytest.approx(0.0, abs=1e-7)


def test_normalize_rows_in_place_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    same = kernels.normalize_rows(x, out=x)
    assert same is x
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 0.0]])
    # Any input comes back float32, as documented (a float64 sum of rows, say).
    unit = kernels.normalize_rows(np.array([[0.0, 2.0], [1.0, 1.0]]))
    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, [[0, 1], [np.sqrt(0.5), np.sqrt(0.5)]], rtol=1e-7)


def reference_spherical_step(batch, centres, counts):
    """The mini-batch rule written out per centre, in float64."""
    centres, counts = centres.astype(np.float64).copy(), counts.astype(np.float64).copy()
    labels = (batch.astype(np.float64) @ centres.T).argmax(axis=1)
    for j in range(len(centres)):
        members = batch[labels == j].astype(np.float64)
        if len(members):
            moved = (counts[j] * centres[j] + members.sum(0)) / (counts[j] + len(members))
            centres[j] = moved / np.linalg.norm(moved)
            counts[j] += len(members)
    return centres, counts, labels


def test_spherical_minibatch_step_matches_reference():
    rng = np.random.default_rng(2)
    batch = kernels.normalize_rows(rng.standard_normal((300, 16), dtype=np.float32))
    centres = kernels.normalize_rows(rng.standard_normal((12, 16), dtype=np.float32))
    counts = rng.integers(0, 50, 12).astype(np.float64)
    before = centres.copy()
    new, new_counts, labels, sims = kernels.spherical_minibatch_step(batch, centres, counts)
    ref, ref_counts, ref_labels = reference_spherical_step(batch, before, counts)
    np.testing.assert_array_equal(centres, before)  # pure: inputs untouched
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(new, ref, atol=1e-5)
    np.testing.assert_array_equal(new_counts, ref_counts)
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(sims, (batch @ before.T).max(1), atol=1e-6)


def test_reseed_from_block_lands_in_the_worst_served_group_not_on_an_outlier():
    rng = np.random.default_rng(3)
    dim = 64
    group = kernels.normalize_rows(
        np.ones((1, dim), np.float32) + 0.1 * rng.standard_normal((40, dim), dtype=np.float32)
    )
    served = kernels.normalize_rows(
        -np.ones((1, dim), np.float32) + 0.1 * rng.standard_normal((200, dim), dtype=np.float32)
    )
    outliers = kernels.normalize_rows(rng.standard_normal((20, dim), dtype=np.float32))
    block = np.concatenate([group, served, outliers])
    # The second group is served by its own mean direction; the first by a far centre.
    served_sims = served @ kernels.normalize_rows(-np.ones((1, dim), np.float32))[0]
    sims = np.concatenate([np.full(40, 0.1), served_sims, np.full(20, 0.3)]).astype(np.float32)
    centres, captured = kernels.reseed_from_block(block, sims, 1, np.random.default_rng(0))
    assert captured.tolist() == [40]
    assert float(centres[0] @ kernels.normalize_rows(np.ones((1, dim), np.float32))[0]) > 0.99
    # Deterministic for a generator seed; never more centres than asked for.
    same, same_captured = kernels.reseed_from_block(block, sims, 1, np.random.default_rng(0))
    np.testing.assert_array_equal(same, centres)
    more, _ = kernels.reseed_from_block(block, sims, 2, np.random.default_rng(0))
    assert len(more) <= 2


def reference_reseed(block, sims, n_new, seed, min_captured=3, per_centre=2, neighbours=8):
    """:func:`kernels.reseed_from_block` written out in float64 loops: the same generator
    draws (``max(16, per_centre x n_new)`` uniforms, at most one per row, scaled to the
    total ``1 - cos`` weight), each candidate denoised into the normalised sum of its
    ``neighbours`` most similar rows, then the greedy choice by total cosine gain."""
    x = block.astype(np.float64)
    n = len(x)
    current = sims.astype(np.float64)
    weight = np.maximum(1.0 - current, 0.0)
    if n_new <= 0 or n == 0 or weight.sum() <= 0:
        return np.empty((0, block.shape[1])), []
    cumulative = np.cumsum(weight)
    draws = np.random.default_rng(seed).random(min(n, max(16, per_centre * n_new)))
    candidates = []
    for u in draws * cumulative[-1]:
        above = np.flatnonzero(cumulative >= u)
        candidates.append(above[0] if len(above) else n - 1)
    proposals = []
    for c in candidates:
        closest = np.argsort(-(x @ x[c]), kind="stable")[: min(neighbours, n)]
        total = x[closest].sum(axis=0)
        proposals.append(total / np.linalg.norm(total))
    cos = np.array(proposals) @ x.T
    taken, centres, captured = set(), [], []
    for _ in range(n_new):
        gains = [
            -1.0 if p in taken else np.maximum(cos[p] - current, 0.0).sum() for p in range(len(cos))
        ]
        best = int(np.argmax(gains))
        members = cos[best] > current
        if gains[best] <= 0 or members.sum() < min_captured:
            break
        taken.add(best)
        centre = x[members].sum(axis=0)
        centre /= np.linalg.norm(centre)
        current = np.maximum(current, np.maximum(cos[best], x @ centre))
        centres.append(centre)
        captured.append(int(members.sum()))
    return np.array(centres).reshape(-1, block.shape[1]), captured


@pytest.mark.parametrize(
    ("n_rows", "n_new", "seed"), [(60, 2, 0), (60, 10, 1), (25, 3, 2), (200, 12, 3)]
)
def test_reseed_from_block_matches_reference(n_rows, n_new, seed):
    """Random unit rows in a few loose groups, each row served with a random cosine: the
    chosen centres and captured counts are the reference's, with the default settings."""
    rng = np.random.default_rng(10 + seed)
    directions = kernels.normalize_rows(rng.standard_normal((6, 12), dtype=np.float32))
    rows = directions[rng.integers(0, 6, n_rows)]
    block = kernels.normalize_rows(rows + 0.4 * rng.standard_normal(rows.shape, np.float32))
    sims = rng.uniform(-0.2, 1.0, n_rows).astype(np.float32)
    centres, captured = kernels.reseed_from_block(block, sims, n_new, np.random.default_rng(seed))
    expected, expected_captured = reference_reseed(block, sims, n_new, seed)
    assert len(expected_captured) > 0
    assert captured.tolist() == expected_captured
    np.testing.assert_allclose(centres, expected, atol=1e-5)
    assert centres.dtype == np.float32 and captured.dtype == np.int64


def test_reseed_from_block_stops_below_min_captured():
    """Three look-alike rows served at cosine 0.75 (a total ``1 - cos`` weight under 1)
    and two rows served perfectly: every candidate is one of the three, whose proposal
    captures exactly those three rows: a new centre at the default ``min_captured=3``,
    none at 4."""
    a = np.array([1.0, 0.0, 0.0], np.float32)
    block = kernels.normalize_rows(
        np.array([a + [0, 0.01, 0], a + [0, 0, 0.01], a, [0, 1, 0], [0, 0, 1]], np.float32)
    )
    sims = np.array([0.75, 0.75, 0.75, 1.0, 1.0], np.float32)
    centres, captured = kernels.reseed_from_block(block, sims, 2, np.random.default_rng(0))
    assert captured.tolist() == [3]
    expected = block[:3].astype(np.float64).sum(0)
    np.testing.assert_allclose(centres[0], expected / np.linalg.norm(expected), atol=1e-6)
    none, _ = kernels.reseed_from_block(block, sims, 2, np.random.default_rng(0), min_captured=4)
    assert none.shape == (0, 3)


@pytest.mark.parametrize(
    ("n_rows", "n_new", "sims"),
    [(0, 1, None), (6, 0, None), (1, 1, None), (6, 2, 1.0), (6, 2, 1.5)],
    ids=["no-rows", "none-asked", "one-row", "all-served", "above-one"],
)
def test_reseed_from_block_finds_nothing_to_do(n_rows, n_new, sims):
    """No rows, no centre asked for, one row (it can capture only itself), or every row
    served perfectly: no centre, as empty arrays of the right shape and dtypes."""
    rng = np.random.default_rng(0)
    block = kernels.normalize_rows(rng.standard_normal((n_rows, 4), dtype=np.float32))
    sims = np.full(n_rows, 0.0 if sims is None else sims, np.float32)
    centres, captured = kernels.reseed_from_block(block, sims, n_new, rng)
    assert centres.shape == (0, 4) and centres.dtype == np.float32
    assert captured.shape == (0,) and captured.dtype == np.int64


def test_reseed_from_block_draws_from_every_row_of_the_block():
    """Only the last rows are badly served (the first two perfectly): candidates are drawn
    by the total weight, which is all in the tail."""
    rng = np.random.default_rng(4)
    tail = kernels.normalize_rows(
        np.ones((1, 8), np.float32) + 0.05 * rng.standard_normal((10, 8), dtype=np.float32)
    )
    head = kernels.normalize_rows(-np.ones((2, 8), np.float32))
    block = np.concatenate([head, tail])
    sims = np.concatenate([np.ones(2), np.zeros(10)]).astype(np.float32)
    centres, captured = kernels.reseed_from_block(block, sims, 1, np.random.default_rng(1))
    assert captured.tolist() == [10]
    expected, _ = reference_reseed(block, sims, 1, 1)
    np.testing.assert_allclose(centres, expected, atol=1e-5)


def test_spherical_minibatch_step_leaves_centres_without_members_alone():
    """A centre no row of the batch goes to keeps its position and count, also with no
    members so far (count 0: its mean would be 0 / 0)."""
    batch = kernels.normalize_rows(np.array([[1, 0.1, 0], [1, -0.1, 0], [0.1, 1, 0]], np.float32))
    centres = kernels.normalize_rows(
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, -1]], np.float32)
    )
    counts = np.array([0.0, 4.0, 0.0, 7.0])
    new, new_counts, labels, _ = kernels.spherical_minibatch_step(batch, centres, counts)
    assert labels.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(new[2:], centres[2:])
    np.testing.assert_array_equal(new_counts, [2.0, 5.0, 0.0, 7.0])
    np.testing.assert_allclose(new[0], [1, 0, 0], atol=1e-7)


def test_spherical_cluster_sums_matches_numpy_with_empty_clusters():
    """Per-cluster sums and counts of unit rows and their total best cosine, against plain
    numpy; the last two centres win no row, so the shapes must still be ``k``."""
    rng = np.random.default_rng(5)
    block = rng.standard_normal((200, 6), dtype=np.float32)
    block[:, 0] = np.abs(block[:, 0]) + 0.5  # every row on the +x side
    block = kernels.normalize_rows(block)
    near = rng.standard_normal((4, 6), dtype=np.float32)
    near[:, 0] = np.abs(near[:, 0]) + 0.5
    far = np.array([[-1, 0, 0, 0, 0, 0], [-1, 0.1, 0, 0, 0, 0]], np.float32)
    centres = kernels.normalize_rows(np.concatenate([near, far]))
    sums, counts, total = kernels.spherical_cluster_sums(block, centres)
    cos = block.astype(np.float64) @ centres.T.astype(np.float64)
    labels = cos.argmax(axis=1)
    assert sums.shape == (6, 6) and counts.shape == (6,) and counts.dtype == np.int64
    assert sums.dtype == np.float64  # summed in float64, as documented
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=6))
    assert counts[4:].tolist() == [0, 0]
    for j in range(6):
        np.testing.assert_allclose(sums[j], block[labels == j].astype(np.float64).sum(0), atol=1e-5)
    assert total == pytest.approx(cos.max(axis=1).sum(), rel=1e-6)


def test_assign_block_cosine_keeps_the_cosine_in_range_and_zero_rows_at_zero():
    """A row along its only centre has cosine 1 and against it -1; float32 rounding of the
    dot product and norm can land a hair outside [-1, 1], which must be clipped. A zero row
    in the same block gets sim 0 (dist sqrt 2) every time."""
    rng = np.random.default_rng(0)
    centres = kernels.normalize_rows(rng.standard_normal((50, 16), dtype=np.float32))
    sims = []
    for c in centres:
        out = kernels.assign_block_cosine(np.stack([3 * c, -7 * c, np.zeros_like(c)]), c[None])
        sims.append(out["sim"])
        np.testing.assert_allclose(out["dist"], [0.0, 2.0, np.sqrt(2)], atol=1e-3)
    sims = np.array(sims)
    assert (sims[:, 0] <= 1.0).all() and (sims[:, 0] > 1 - 1e-6).all()
    assert (sims[:, 1] >= -1.0).all() and (sims[:, 1] < -1 + 1e-6).all()
    assert (sims[:, 2] == 0.0).all()
