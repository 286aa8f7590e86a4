"""Codecs against references: hand-computed SL-ACC, scikit-learn K-means, the papers' traffic formulas,
finite differences of SGQ's Eq. 7, and the CAG learning rule.

Stated tolerances: K-means inertia within 5% of scikit-learn's KMeans (n_init=10) when fitted
on all points, 12% on a 1024-point subsample, and SGQ's per-group inertia at its default
settings within 25% (mean 15%).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import splitedge.codecs as codecs
from splitedge.codecs import _linear, bitpack, format as fmt, kmeans, sgq, slacc

# ====================================================================== helpers


def relu_stripes(m=6000, d=7, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((m, 1))
    return np.maximum(0.8 * base + 0.6 * rng.standard_normal((m, d)) + 0.3, 0).astype(np.float32)


def relu_act(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((shape[0], 1, *shape[2:]), dtype=np.float32)
    b = rng.standard_normal(shape, dtype=np.float32)
    off = rng.standard_normal((1, shape[1]) + (1,) * (len(shape) - 2), dtype=np.float32)
    return np.maximum(0.8 * a + 0.6 * b + off, 0).astype(np.float32)


def entropy_by_definition(ch: np.ndarray) -> float:
    """Eq. 1 literally, float64: min-max normalize, softmax, -sum p log p."""
    v = ch.astype(np.float64).ravel()
    r = v.max() - v.min()
    z = (v - v.min()) / r if r > 0 else np.zeros_like(v)
    p = np.exp(z) / np.exp(z).sum()
    return float(-(p * np.log(p)).sum())


def best_1d_partition(values, g):
    """Exhaustive Eq. 4 for a few scalars: the optimal split of the sorted values into g contiguous groups."""
    v = np.sort(np.asarray(values, np.float64))
    best = (np.inf, None)
    for cuts in itertools.combinations(range(1, v.size), g - 1):
        parts = np.split(v, cuts)
        sse = sum(((p - p.mean()) ** 2).sum() for p in parts)
        if sse < best[0]:
            best = (sse, [p.mean() for p in parts])
    return best[1]


# ====================================================================== SL-ACC


def test_slacc_entropy_hand_computed():
    x = np.array([[[0, 1, 1, 0], [2, 2, 2, 2], [0, 0, 0, 4], [-3, -1, -1, -3]]], np.float32)  # (N=1, C=4, S=4)
    e = math.e
    hand = [
        math.log(2 + 2 * e) - 2 * e / (2 + 2 * e),  # z = 0,1,1,0
        math.log(4),  # constant channel: uniform softmax, the largest entropy log M
        math.log(3 + e) - e / (3 + e),  # z = 0,0,0,1
        math.log(2 + 2 * e) - 2 * e / (2 + 2 * e),  # min-max normalization removes offset and scale
    ]
    got = slacc.channel_entropy(x)
    np.testing.assert_allclose(got, hand, rtol=0, atol=1e-7)
    np.testing.assert_allclose(got, [entropy_by_definition(x[0, c]) for c in range(4)], atol=1e-7)


def test_slacc_entropy_of_real_sized_channels_matches_the_definition():
    x = relu_act((16, 8, 12, 12), 3).reshape(16, 8, -1)
    ref = [entropy_by_definition(x[:, c]) for c in range(8)]
    np.testing.assert_allclose(slacc.channel_entropy(x), ref, rtol=0, atol=2e-6)
    # entropies sit just under log M, as the notes say; the differences are what matters
    assert (np.log(x.shape[0] * x.shape[2]) - np.array(ref) < 0.05).all()


@pytest.mark.parametrize("offset", [0.0, -0.5, 10.0, 1000.0])
def test_slacc_entropy_matches_the_definition_on_either_side_of_the_shift_shortcut(offset):
    # channel_entropy uses z' = x / (max - min) (no subtraction) when every |min| <= max - min,
    # else (x - min) / (max - min): offsets 0 and -0.5 take the first path, 10 and 1000 the second
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 6, 40)) * np.linspace(0.5, 2.0, 6)[None, :, None] + offset).astype(np.float32)
    mn = x.min(axis=(0, 2))
    direct = bool((np.abs(mn.astype(np.float64)) <= x.max(axis=(0, 2)).astype(np.float64) - mn).all())
    assert direct == (offset < 1.0)
    ref = [entropy_by_definition(x[:, c]) for c in range(6)]
    np.testing.assert_allclose(slacc.channel_entropy(x), ref, rtol=0, atol=2e-6)


def test_slacc_group_assignment_and_bit_allocation_hand_computed():
    # three well separated pairs; exact binary fractions so the group means are exact
    E = np.array([1.96875, 0.96875, 1.59375, 2.03125, 1.03125, 1.65625])
    lab, ebar, bits = slacc.allocate_bits(E, groups=3, b_min=2, b_max=6)
    np.testing.assert_array_equal(lab, [2, 0, 1, 2, 0, 1])  # groups numbered by increasing mean entropy
    np.testing.assert_array_equal(ebar, [1.0, 1.625, 2.0])
    # Eq. 6: 2 + round((1.625 - 1) / (2 - 1) * 4) = 2 + round(2.5) = 5 (half away from zero; banker's gives 4)
    np.testing.assert_array_equal(bits, [2, 5, 6])
    assert best_1d_partition(E, 3) == [1.0, 1.625, 2.0]  # the optimal partition
    # all group means equal -> every group gets b_max
    lab, ebar, bits = slacc.allocate_bits(np.full(5, 3.0), groups=3, b_min=2, b_max=8)
    assert (lab == 0).all() and bits.tolist() == [8]
    assert slacc.round_half_away(np.array([0.5, 1.5, 2.5, -0.5, 2.4999])).tolist() == [1, 2, 3, -1, 2]


def _sse(v, lab):
    return sum(((v[lab == k] - v[lab == k].mean()) ** 2).sum() for k in np.unique(lab))


def _exhaustive_sse(v, g):
    """The least Eq. 4 objective over all partitions of sorted v into g contiguous groups that keep
    equal values together."""
    vs = np.sort(v)
    allowed = [i for i in range(1, vs.size) if vs[i] != vs[i - 1]]
    return min(sum(((p - p.mean()) ** 2).sum() for p in np.split(vs, cuts))
               for cuts in itertools.combinations(allowed, g - 1))


@pytest.mark.parametrize("dense", [True, False])
def test_slacc_eq4_kmeans_is_the_exact_optimum(dense, monkeypatch):
    """Eq. 4 is an argmin: kmeans_1d's partition has the least within-group sum of squares of all
    partitions (exhaustive search), equal values share a group, groups are numbered by increasing
    mean. Both of its paths: the whole cost matrix, and divide and conquer (forced here on small
    inputs; the encoder takes it above slacc._DP_DENSE boundaries)."""
    if not dense:
        monkeypatch.setattr(slacc, "_DP_DENSE", 1)
    rng = np.random.default_rng(11)
    for t in range(300):
        c, g = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        v = np.round(rng.standard_normal(c) * 2, 1) if t % 2 else rng.standard_normal(c) * rng.random()
        lab = slacc.kmeans_1d(v, g)
        gg = min(g, np.unique(v).size)
        assert lab.min() == 0 and lab.max() == gg - 1
        assert np.all(np.diff([v[lab == k].mean() for k in range(gg)]) > 0)
        assert all(np.unique(lab[v == u]).size == 1 for u in np.unique(v))
        assert _sse(v, lab) <= _exhaustive_sse(v, gg) + 1e-12
    # entropies are close to log M: centring keeps the objective exact there
    v = np.log(50176) - np.array([0.0, 1e-4, 2e-4, 0.01, 0.0101, 0.03, 0.0302, 0.0304])
    assert _sse(v, slacc.kmeans_1d(v, 3)) <= _exhaustive_sse(v, 3) + 1e-15


def test_slacc_eq4_both_paths_agree_on_wide_layers(monkeypatch):
    rng = np.random.default_rng(12)
    for c in (300, 777):
        v = np.log(1e4) - np.abs(rng.standard_normal(c)) * 0.01
        fast = slacc.kmeans_1d(v, 4)
        monkeypatch.setattr(slacc, "_DP_DENSE", 10**6)
        full = slacc.kmeans_1d(v, 4)
        monkeypatch.undo()
        assert abs(_sse(v, fast) - _sse(v, full)) <= 1e-12 * _sse(v, full)


def test_slacc_eq7_linear_quantization_rounds_half_away_from_zero():
    # one group, 2 bits, range [0, 3]: scale 1, so 0.5, 1.5, 2.5 are exact ties
    x = np.array([[[0.0, 0.5, 1.5, 2.5, 3.0, 1.2]]], np.float32)
    codec = codecs.get("slacc", groups=1, min_bits=2, max_bits=2)
    y, meta = codecs.decode_with_meta(codec.encode(x))
    np.testing.assert_array_equal(y, [[[0.0, 1.0, 2.0, 3.0, 3.0, 1.0]]])
    assert meta["bits"].tolist() == [2] and meta["group_min"][0] == 0 and meta["group_max"][0] == 3


@pytest.mark.parametrize("grid", ["zero", "minmax"])
def test_slacc_full_pipeline_small_case(grid):
    """Entropy -> groups -> bits -> ranges of a small tensor, against an independent float64 reference."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 6, 5)).astype(np.float32)
    x[:, 1] = np.round(x[:, 1])  # a few distinct values: lower entropy
    x[:, 4] = 0.25  # constant: the largest entropy
    x[:, 5] **= 3  # heavy tails: most values near the minimum-maximum middle
    codec = codecs.get("slacc", groups=3, min_bits=2, max_bits=8, grid=grid)
    y, meta = codecs.decode_with_meta(codec.encode(x))
    H = np.array([entropy_by_definition(x[:, c]) for c in range(6)])
    np.testing.assert_allclose(codec.last_stats["H"], H, atol=1e-9)
    means = best_1d_partition(H, 3)
    ebar_of_channel = [means[int(np.argmin([abs(h - m) for m in means]))] for h in H]
    np.testing.assert_allclose(codec.last_stats["ebar"][meta["groups"]], ebar_of_channel, atol=1e-12)
    lo, hi = min(means), max(means)
    expect_bits = [2 + int(math.floor((m - lo) / (hi - lo) * 6 + 0.5)) for m in ebar_of_channel]
    assert meta["bits_per_channel"].tolist() == expect_bits
    for g in range(meta["bits"].size):
        ch = meta["groups"] == g
        lo, hi = x[:, ch].min(), x[:, ch].max()
        if grid == "minmax":
            assert meta["group_min"][g] == lo and meta["group_max"][g] == hi
        else:  # the smallest zero-preserving grid covering [min(lo, 0), max(hi, 0)]
            step, zp = _linear.zero_grid(lo, hi, int(meta["bits"][g]))
            assert meta["step"][g] == step and meta["zero_point"][g] == zp
            assert meta["group_min"][g] <= min(lo, 0) and meta["group_max"][g] >= max(hi, 0)
    assert np.abs(y - x).max() <= codec.error_bound(x, meta)


def test_slacc_historical_entropy_and_schedule():
    xs = [relu_act((4, 6, 5, 5), s) for s in range(3)]
    c = codecs.get("slacc")
    c.encode(xs[0], step=0, total_rounds=4)
    H0 = c.last_stats["H"]
    assert c.last_stats["a_t"] == 1.0 and np.array_equal(c.last_stats["E"], H0)  # Eq. 3 at t = 0
    c.encode(xs[1], step=1, total_rounds=4)
    H1 = c.last_stats["H"]
    assert c.last_stats["a_t"] == 0.75
    np.testing.assert_allclose(c.last_stats["E"], 0.75 * H1 + 0.25 * H0)  # Eq. 2, Hbar = mean of past rounds
    c.encode(xs[2], step=3, total_rounds=4, training=False)  # evaluation: reads the state only
    np.testing.assert_allclose(c.last_stats["Hbar"], (H0 + H1) / 2)
    assert c.last_stats["a_t"] == 0.25
    c.encode(xs[2], step=4, total_rounds=4)
    np.testing.assert_allclose(c.last_stats["E"], (H0 + H1) / 2)  # a_T = 0: historical only
    # no total_rounds known: instantaneous entropy only; a window limits the history
    d = codecs.get("slacc", window=1)
    for x in xs:
        d.encode(x)
        assert d.last_stats["a_t"] == 1.0
    d2 = codecs.get("slacc", window=1, schedule="constant", alpha=0.0)
    d2.encode(xs[0])
    d2.encode(xs[1])
    d2.encode(xs[2])
    np.testing.assert_allclose(d2.last_stats["E"], slacc.channel_entropy(xs[1].reshape(4, 6, -1)))


def test_slacc_bits_parameter_sets_the_ceiling():
    c = codecs.get("slacc", bits=4)
    assert c.params["max_bits"] == 4 and c.params["min_bits"] == 2
    assert codecs.get("slacc", **c.params).params == c.params  # the settings round-trip
    assert codecs.get("slacc", bits=1).params["min_bits"] == 1
    with pytest.raises(ValueError, match="max_bits"):
        codecs.get("slacc", bits=4, max_bits=6)
    with pytest.raises(ValueError, match="min_bits"):
        codecs.get("slacc", min_bits=6, max_bits=3)
    _, meta = codecs.decode_with_meta(c.encode(relu_act((4, 16, 5, 5))))
    assert meta["bits"].max() <= 4 and meta["bits"].min() >= 2


# ====================================================================== K-means vs scikit-learn


@pytest.fixture(scope="module")
def sklearn_reference():
    from sklearn.cluster import KMeans

    X = relu_stripes()
    w = (np.random.default_rng(1).random(7) + 0.2).astype(np.float32)
    km = KMeans(16, n_init=10, random_state=0).fit(X)
    kmw = KMeans(16, n_init=10, random_state=0).fit(X * np.sqrt(w))  # weighted = scaled features
    return X, w, kmeans.inertia(X, km.cluster_centers_), kmeans.inertia(X * np.sqrt(w), kmw.cluster_centers_)


@pytest.mark.parametrize("seed", range(3))
def test_kmeans_inertia_against_sklearn(sklearn_reference, seed):
    X, w, ref, refw = sklearn_reference
    assert kmeans.inertia(X, kmeans.fit(X, 16, iters=30, rng=seed)) <= 1.05 * ref
    assert kmeans.inertia(X, kmeans.fit(X, 16, iters=30, rng=seed, init="random")) <= 1.05 * ref
    assert kmeans.inertia(X, kmeans.fit(X, 16, iters=10, rng=seed, sample=1024)) <= 1.12 * ref
    assert kmeans.inertia(X, kmeans.fit(X, 16, weights=w, iters=30, rng=seed), w) <= 1.05 * refw


def test_kmeans_nearest_matches_brute_force_argmin():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 5)).astype(np.float32)
    U = rng.standard_normal((16, 5)).astype(np.float32)
    w = rng.random(5).astype(np.float32)
    d = (((X[:, None, :].astype(np.float64) - U[None]) ** 2) * w).sum(-1)
    got = kmeans.assign(X, U, w)
    chosen = d[np.arange(len(X)), got]
    assert (chosen <= d.min(1) * (1 + 1e-5) + 1e-6).all()
    assert (got == d.argmin(1)).mean() > 0.999


def test_kmeans_duplicated_seeds_are_separated():
    X = np.zeros((400, 3), np.float32)
    X[200:] = np.random.default_rng(0).standard_normal((200, 3))
    U = kmeans.fit(X, 8, iters=20, rng=0, init=np.zeros((8, 3), np.float32))
    assert len({tuple(u) for u in np.round(U, 6)}) == 8


def test_sgq_kmeans_quality_per_group_against_sklearn():
    from sklearn.cluster import KMeans

    x = relu_act((32, 64, 16, 16), 5)
    c = codecs.get("sgq")
    for _ in range(3):  # steady state (warm start)
        blob = c.encode(x)
    _, meta = codecs.decode_with_meta(blob)
    x3 = x.reshape(32, 64, -1)
    ratios, off = [], 0
    for i, sz in enumerate(meta["group_sizes"]):
        ch = meta["perm"][off : off + sz]
        off += sz
        S = x3[:, ch, :].transpose(0, 2, 1).reshape(-1, sz)
        w = meta["weights"][ch]
        ref = KMeans(16, n_init=3, random_state=0).fit(S * np.sqrt(w))
        ratios.append(kmeans.inertia(S, meta["codebooks"][i], w) / kmeans.inertia(S * np.sqrt(w), ref.cluster_centers_))
    assert max(ratios) <= 1.25 and np.mean(ratios) <= 1.15, ratios


@pytest.mark.parametrize("significance", [True, False])
def test_sgq_decodes_every_stripe_to_its_nearest_centroid(significance):
    """Eq. 3 with the Eq. 11 weights, over all stripes (the fit uses a sample, the assignment all)."""
    x = relu_act((6, 12, 5, 7), 2)
    c = codecs.get("sgq", bits=3, groups=3, significance=significance)
    y, meta = codecs.decode_with_meta(c.encode(x))
    x3, y3 = x.reshape(6, 12, -1), y.reshape(6, 12, -1)
    off = 0
    for i, sz in enumerate(meta["group_sizes"]):
        ch = meta["perm"][off : off + sz]
        off += sz
        S = x3[:, ch, :].transpose(0, 2, 1).reshape(-1, sz).astype(np.float64)
        Q = y3[:, ch, :].transpose(0, 2, 1).reshape(-1, sz)
        U = meta["codebooks"][i].astype(np.float64)
        w = meta["weights"][ch].astype(np.float64)
        d = (((S[:, None, :] - U[None]) ** 2) * w).sum(-1)
        lab = meta["labels"][i].reshape(-1)
        np.testing.assert_array_equal(Q, meta["codebooks"][i][lab])
        assert (d[np.arange(len(S)), lab] <= d.min(1) * (1 + 1e-5) + 1e-6).all()


# ====================================================================== traffic formulas


SHAPES = [(32, 64, 16, 16), (3, 5, 7, 3), (1, 8, 4, 4), (128, 64, 8, 8), (2, 3, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("significance", [True, False])
def test_sgq_payload_size_is_eq8_plus_a_stated_header(shape, bits, significance):
    n, c = shape[:2]
    s = math.prod(shape[2:])
    codec = codecs.get("sgq", bits=bits, groups=10, significance=significance)
    blob = codec.encode(relu_act(shape, 1))
    G = min(10, c)
    sizes = [c // G + (1 if i < c % G else 0) for i in range(G)]
    eq8_bits = sum(bits * n * s + 32 * 2**bits * cg for cg in sizes)  # Eq. 8 with N*S stripes
    header = fmt.overhead(4, 5) + 2 * c + 2 * G + 4 * c  # 60 B + channel order, group sizes, weights V
    assert fmt.overhead(4, 5) == 60
    # the n-bit indices of all groups form one dense stream: only the final byte is rounded
    assert len(blob) == header + 4 * 2**bits * c + math.ceil(G * bits * n * s / 8)
    assert len(blob) == header + math.ceil(eq8_bits / 8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 5, 8])
def test_uq_payload_size_is_eq9_plus_a_stated_header(shape, bits):
    M = math.prod(shape)
    x = relu_act(shape, 2) - 0.1
    # Eq. 9: n*W*H*C (times N) feature bits; the 2^n-entry fp32 codebook of a linear
    # quantizer is generated by two numbers: (step, zero point) in version 2 -- 4 bytes and a
    # byte of the parameter block --, (x_min, x_max) in version 1 -- 8 bytes
    assert len(codecs.get("uq", bits=bits).encode(x)) == fmt.overhead(2, 2) + 4 + math.ceil(bits * M / 8)
    assert len(codecs.get("uq", bits=bits, grid="minmax").encode(x)) == fmt.overhead(1, 2) + 8 + math.ceil(bits * M / 8)
    assert fmt.overhead(1, 2) == 45 and fmt.overhead(2, 2) == 46


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("training", [True, False])
def test_randtopk_payload_size_follows_the_official_accounting(shape, rate, training):
    n = shape[0]
    d = math.prod(shape[1:])
    k = max(1, int(math.floor(rate * d + 0.5)))
    blob = codecs.get("randtopk", rate=rate).encode(relu_act(shape, 3), training=training)
    idx_bits = math.ceil(math.log2(d)) if d > 1 else 0
    official = k / d * (1 + idx_bits / 32) * (4 * n * d)  # bytes: k/d (1 + ceil(log2 d)/32) of float32
    assert len(blob) == fmt.overhead(5, 2) + 4 * n * k + math.ceil(n * k * idx_bits / 8)
    assert 0 <= len(blob) - fmt.overhead(5, 2) - official < 1  # only the last byte of the index stream rounds
    assert fmt.overhead(5, 2) == 49


@pytest.mark.parametrize("shape", SHAPES)
def test_other_payload_sizes_follow_their_docstrings(shape):
    n, c = shape[:2]
    s = math.prod(shape[2:])
    M = n * c * s
    x = relu_act(shape, 4)
    G = min(10, c)
    assert len(codecs.get("pq").encode(x)) == 51 + 2 * G + 4 * 16 * c + math.ceil(G * 4 * n * s / 8)
    assert len(codecs.get("clio", bits=4).encode(x)) == 41 + 4 * n * math.ceil(c * 4 / 32) * s
    assert len(codecs.get("fp32").encode(x)) == 40 + 4 * M
    assert len(codecs.get("fp16").encode(x)) == 40 + 2 * M
    assert len(codecs.get("powerquant").encode(x)) == 54 + math.ceil(4 * M / 8)
    assert len(codecs.get("powerquant", grid="minmax").encode(x)) == 57 + math.ceil(4 * M / 8)
    for grid, fixed, per_group in (("zero", 59, 6), ("minmax", 55, 9)):
        sl = codecs.get("slacc", grid=grid)
        blob = sl.encode(x)
        _, meta = codecs.decode_with_meta(blob)
        g = meta["bits"].size
        cnt = np.bincount(meta["groups"], minlength=g)
        codes = sum(math.ceil(n * int(cnt[i]) * s * int(meta["bits"][i]) / 8) for i in range(g))
        assert len(blob) == fixed + c + per_group * g + codes
    for grid, fixed, per_kept in (("zero", 58, 5), ("minmax", 54, 8)):
        for fill in ("zero", "mean"):
            blob = codecs.get("splitfc", fill=fill, grid=grid).encode(x)
            _, meta = codecs.decode_with_meta(blob)
            k = int(meta["kept"].sum())
            extra = 4 * (c - k) if fill == "mean" else 0
            assert len(blob) == fixed + math.ceil(c / 8) + per_kept * k + extra + math.ceil(4 * n * k * s / 8)
    for grid, fixed in (("zero", 58), ("minmax", 61)):
        blob = codecs.get("easyquant", grid=grid).encode(x)
        _, meta = codecs.decode_with_meta(blob)
        K = meta["outliers"].size
        assert len(blob) == fixed + math.ceil(K * bitpack.index_bits(M) / 8) + 4 * K + math.ceil(4 * M / 8)


# ====================================================================== SGQ Gradient Calibration


def numeric_jacobian(f, x, h=1e-6):
    J = np.empty((f(x).size, x.size))
    for j in range(x.size):
        e = np.zeros_like(x)
        e[j] = h
        J[:, j] = (f(x + e) - f(x - e)) / (2 * h)
    return J


@pytest.mark.parametrize("seed", range(4))
def test_eq7_jacobian_against_finite_differences(seed):
    rng = np.random.default_rng(seed)
    k, d = 16, 6
    U = rng.standard_normal((k, d))
    w = rng.random(d) + 0.3
    tau = 0.5 + rng.random() * 3
    for x in (rng.standard_normal(d), U[3], U[3] + 0.01 * rng.standard_normal(d)):
        num = numeric_jacobian(lambda v: sgq.soft_quantize(v, U, w, tau), x)
        np.testing.assert_allclose(sgq.soft_jacobian(x, U, w, tau), num, rtol=1e-6, atol=1e-8)


def test_closed_form_equals_eq12_and_relates_to_eq13():
    rng = np.random.default_rng(0)
    # tau = 1, W = I: the closed form is Eq. 12 (double sum, outer products)
    U = rng.standard_normal((8, 5)) * 0.7
    x = rng.standard_normal(5) * 0.5
    np.testing.assert_allclose(sgq.soft_jacobian(x, U), sgq.eq12_jacobian(x, U), rtol=1e-10, atol=1e-12)
    # Eq. 13 replaces the softmax weights by x^ U^+: exact when the centroids are linearly independent (k <= d)
    U3 = rng.standard_normal((3, 5))
    x3 = rng.standard_normal(5) * 0.3
    xhat = sgq.soft_quantize(x3, U3)
    np.testing.assert_allclose(sgq.eq13_jacobian(xhat, U3), sgq.soft_jacobian(x3, U3), rtol=1e-8, atol=1e-10)
    # ... and only an approximation when k > d, the usual case (16 centroids of 6-7 channels)
    assert not np.allclose(sgq.eq13_jacobian(sgq.soft_quantize(x, U), U), sgq.soft_jacobian(x, U), atol=1e-3)


def test_calibrate_group_is_the_vectorized_vjp_at_the_decoded_centroid():
    rng = np.random.default_rng(1)
    k, d, n, s = 16, 6, 3, 10
    U = rng.standard_normal((k, d)).astype(np.float32)
    w = (rng.random(d) + 0.2).astype(np.float32)
    labels = rng.integers(0, k, (n, s)).astype(np.uint8)
    g = rng.standard_normal((n, d, s)).astype(np.float32)
    out = sgq.calibrate_group(g, U, w, labels, temperature=1.0)
    tau, _, _ = sgq.calibration_tables(U, w, 1.0)
    for i in range(n):
        for j in range(s):
            J = sgq.soft_jacobian(U[labels[i, j]], U, w, tau)
            np.testing.assert_allclose(out[i, :, j], J.T @ g[i, :, j], rtol=2e-4, atol=2e-5)


def test_sgq_backward_switch_and_degenerate_codebook():
    x = relu_act((4, 12, 6, 6), 7)
    g = (np.random.default_rng(2).standard_normal(x.shape) * 1e-2).astype(np.float32)
    on, off = codecs.get("sgq", groups=3), codecs.get("sgq", groups=3, calibrate=False)
    blob = on.encode(x)
    _, meta = codecs.decode_with_meta(blob)
    np.testing.assert_array_equal(off.backward(g, meta), g)
    gb = on.backward(g, meta)
    assert gb.shape == g.shape and np.isfinite(gb).all() and not np.allclose(gb, g)
    # a constant tensor: every centroid coincides, the Jacobian would be zero -> identity
    _, meta0 = codecs.decode_with_meta(on.encode(np.ones_like(x)))
    np.testing.assert_array_equal(on.backward(g, meta0), g)


# ====================================================================== CAG


def test_cag_learns_the_gradient_energy_of_each_channel():
    rng = np.random.default_rng(3)
    c = 32
    codec = codecs.get("sgq", groups=4, seed=5)
    energy = np.linspace(0.05, 1.0, c)
    rng.shuffle(energy)  # which channels the loss is sensitive to: unrelated to their index
    target = energy / energy.max()
    errs, corrs = [], []
    for step in range(40):
        x = relu_act((8, c, 6, 6), 100 + step)
        _, meta = codecs.decode_with_meta(codec.encode(x))
        v = codec.last_significance
        np.testing.assert_allclose(meta["weights"], v.astype(np.float32))  # V travels in the payload
        errs.append(np.abs(v - target).mean())
        corrs.append(np.corrcoef(v, target)[0, 1])
        g = rng.standard_normal(x.shape) * np.sqrt(energy)[None, :, None, None]
        codec.observe_gradient(g.astype(np.float32))
    assert errs[-1] < 0.5 * errs[0], errs
    assert corrs[-1] > 0.9 > corrs[0], corrs
    # the grouping follows V: the first group holds the channels the loss is most sensitive to
    perm, sizes = codec.grouping(codec.last_significance, c)
    assert set(perm[: sizes[0]]) == set(np.argsort(-target)[: sizes[0]])


def test_cag_switch_off_is_the_ablation():
    x = relu_act((4, 12, 5, 5), 1)
    codec = codecs.get("sgq", groups=5, significance=False)
    _, meta = codecs.decode_with_meta(codec.encode(x))
    assert meta["significance"] is False
    np.testing.assert_array_equal(meta["weights"], np.ones(12, np.float32))
    np.testing.assert_array_equal(meta["perm"], np.arange(12))
    assert meta["group_sizes"].tolist() == [3, 3, 2, 2, 2]
    codec.observe_gradient(np.ones_like(x))  # a no-op without CAG
    assert codec.last_cag_loss is None
    on = codecs.get("sgq", groups=5)
    _, meta_on = codecs.decode_with_meta(on.encode(x))
    assert meta_on["significance"] is True and not np.array_equal(meta_on["weights"], meta["weights"])
    with pytest.raises(ValueError, match="shape"):
        on.observe_gradient(np.ones((1, 12, 5, 5), np.float32))


def test_splitfc_evaluation_payload_is_the_expectation_of_training_payloads():
    """SplitFC drops channel c with probability 1 - p_c in training; an evaluation payload must
    carry what the server saw on average, E[x_hat_c] = p_c x_c (fill zero), not the full x_c."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 8, 5, 5)) * np.linspace(0.1, 2.0, 8)[None, :, None, None] + 1.0).astype(np.float32)
    train = codecs.get("splitfc", bits=8, keep=0.5, seed=1)
    mean = np.mean([codecs.decode(train.encode(x)) for _ in range(4000)], axis=0)
    ev = codecs.decode(codecs.get("splitfc", bits=8, keep=0.5).encode(x, training=False))
    # 4000 Bernoulli draws per channel: the sample mean is within ~3/sqrt(4000) of p_c in relative terms
    np.testing.assert_allclose(ev, mean, atol=0.06 * np.abs(x).max())
    assert np.abs(ev - x).max() > 0.1, "evaluation is not the unscaled input any more"


def test_slacc_entropy_without_numpy_vecdot(monkeypatch):
    # numpy < 2.0 has no np.vecdot: the fallback (multiply, then a matrix-vector product) agrees
    x = relu_act((16, 8, 12, 12), 5).reshape(16, 8, -1)
    with_vecdot = slacc.channel_entropy(x)
    monkeypatch.setattr(slacc, "_vecdot", None)
    np.testing.assert_allclose(slacc.channel_entropy(x), with_vecdot, rtol=0, atol=1e-7)
    np.testing.assert_allclose(with_vecdot, [entropy_by_definition(x[:, c]) for c in range(8)], rtol=0, atol=2e-6)


def test_fp16_matches_numpys_cast_and_saturates_instead_of_overflowing():
    """fp16 is IEEE half with round-to-nearest-even, subnormals included (|x| <= 2^-25 -> 0,
    2^-25 < |x| < 2^-24 -> 2^-24), except that values beyond the half range saturate at +-65504."""
    tiny = np.float32(2.0**-25)
    x = np.array([0.9 * tiny, tiny, 1.5 * tiny, 3 * tiny, -1.5 * tiny, 65504, 65520, 1e30, -1e30, 1.0009765625,
                  np.float32(1 + 2.0**-11), 0.0, -0.0], np.float32)
    y = codecs.decode(codecs.get("fp16").encode(x.reshape(1, -1))).ravel()
    finite = np.abs(x) < 65504
    expected = x[finite].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(y[finite], expected)
    np.testing.assert_array_equal(np.signbit(y[finite]), np.signbit(expected))
    assert y[2] == 2.0**-24 and y[0] == 0 and y[1] == 0 and y[4] == -(2.0**-24)
    np.testing.assert_array_equal(y[~finite], np.sign(x[~finite]) * 65504)
    rng = np.random.default_rng(0)
    r = (rng.standard_normal(200_000) * np.exp2(rng.integers(-30, 15, 200_000))).astype(np.float32)
    r = r[np.abs(r) < 65504]
    np.testing.assert_array_equal(codecs.decode(codecs.get("fp16").encode(r.reshape(1, -1))).ravel(),
                                  r.astype(np.float16).astype(np.float32))
