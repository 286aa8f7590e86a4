"""``slacc``: SL-ACC (sl-acc.txt) = ACII (entropy-based channel importance) + CGC (grouped bit widths).

Equations implemented (the extracted paper lost them; restated from shared/notes/codecs.md).
Channel i of X (N, C, S...) has M = N*S values x_i1..x_iM.

ACII, at training round t:

    z_ij   = (x_ij - min_j x_ij) / (max_j x_ij - min_j x_ij)             normalize to [0, 1]
    p_ij   = exp(z_ij) / sum_l exp(z_il)                                   softmax over the channel
    H_i(t) = - sum_j p_ij log p_ij                                                         (Eq. 1)
           = log S_i - (sum_j z_ij e^{z_ij}) / S_i,   S_i = sum_j e^{z_ij}   (identity used here)
    Hbar_i(t) = mean of H_i over the past rounds (the last ``window`` ones; 0 = all)
    E_i(t) = a_t H_i(t) + (1 - a_t) Hbar_i(t)                                              (Eq. 2)
    a_t    = 1 - t / T                                                                     (Eq. 3)

CGC:

    {P_g} = argmin sum_g sum_{i in P_g} (E_i - mu_g)^2     1-D K-means of the E_i, G groups (Eq. 4)
    Ebar_g = (1/|P_g|) sum_{i in P_g} E_i                                                  (Eq. 5)
    b_g = b_min + round((Ebar_g - min_g Ebar_g) / (max_g Ebar_g - min_g Ebar_g) (b_max - b_min))
          (all groups b_max if every Ebar_g is equal)                                      (Eq. 6)
    q = round((x - x_min,g) / (x_max,g - x_min,g) (2^b_g - 1)),                            (Eq. 7)
    x_hat = x_min,g + q (x_max,g - x_min,g) / (2^b_g - 1)
    with round() = round half away from zero everywhere (Eq. 6 and Eq. 7).

Eq. 7 as implemented by default (``grid="zero"``, codec version 2) -- an interpretation:

    lo_g = min(x_min,g, 0), hi_g = max(x_max,g, 0)       the group's range widened to include 0
    (step_g, zp_g) = the smallest step whose levels (k - zp_g) step_g, zp_g an integer,
                     k = 0..2^b_g-1, cover [lo_g, hi_g]   (codecs/_linear.py, zero_grid)
    q = round_half_away(x / step_g) + zp_g,   x_hat = (q - zp_g) step_g   0 decodes to exactly 0

The paper rounds "half away from zero to reduce quantization bias", which means something only
on a grid centred on zero.  On the literal grid (``grid="minmax"``, codec version 1, kept for
the ablation) no level is at 0, and the gradient returned to the edge -- ~80% exact zeros from
the maxpool at ResNet-18 cut 3, its range set by heavy tails -- decodes every zero to a level
up to half a step away: about range/6 at 2 bits, roughly 10x mean|g| (issue 14).  A ReLU
activation (x_min = 0) gets zp = 0 and the same grid either way.

Interpretations (where the paper is silent or ambiguous):

* Entropies are computed with the identity above (softmax of values in [0,1] is nearly
  uniform, H sits within ~0.03 nats of log M): exponentials in float32, sums reduced to
  float64.  H does not change when z is shifted, so where every channel has
  |min| <= max - min the exponent is x / (max - min) (one multiply) instead of
  (x - min) / (max - min).  A constant channel (max == min) has z = 0, a uniform softmax and the
  largest possible entropy log M -- faithful to Eq. 1.
* "Round" t = one training encode of this stream (one batch exchange, the edge's training step).  The history
  holds one entry per training encode; ``Hbar`` averages the entries *before* the
  current one; at the first encode ``Hbar = H``.  If the channel count changes the
  history restarts.  ``training=False`` (evaluation) reads the state, never changes it.
* Schedule: ``schedule="linear"`` uses a_t = clip(1 - t/T, 0, 1) with t = ``step``
  (else an internal counter of training encodes, starting at 0) and T = ``total_rounds``
  (from the call, else the ``total_rounds`` parameter).  With no T known a_t = 1
  (instantaneous entropy only).  ``schedule="constant"`` uses a_t = ``alpha``.
* Eq. 4 is solved exactly (the optimal 1-D partition is contiguous in sorted order: a
  dynamic programme, :func:`kmeans_1d`); equal entropies share a group, so a payload carries
  min(``groups``, distinct values) groups; groups are numbered by increasing mean entropy.
* ``bits`` (what every quantizing codec takes) is a shorthand for the ceiling: it sets
  ``max_bits = bits`` and lowers ``min_bits`` to ``bits`` if needed.  Default 2..8 as in
  the paper's experiments.  ``groups`` defaults to 4 (not stated in the paper).
* The quantization range of a group is the min and max over all its channels (widened to 0
  on the zero grid); no clipping, so |x - x_hat| <= step_g / 2 (zero grid; except 1 bit
  across 0, see _linear.py) or (x_max,g - x_min,g) / (2 (2^b_g - 1)) (min-max grid).
* The same codec compresses the gradients on the way back (its own object and state).
* ``bit_map`` (default ``"minmax"``: Eq. 6 as written).  Eq. 6 normalizes by the observed
  spread, so one group is always at b_min and one at b_max, even when the entropies differ by
  0.04 nats.  ``"span"`` normalizes by the largest possible spread instead (ENTROPY_SPAN =
  0.1233 nats, the log M - H of the most concentrated softmax of values in [0, 1]):
  b_g = b_max - round((max Ebar - Ebar_g) / ENTROPY_SPAN (b_max - b_min)), clipped to [b_min, b_max].
* ``ranking`` (default ``"entropy"``: ACII + CGC).  ``"none"``: one group, every channel at
  max_bits -- the ablation of the channel ranking (on gradients the entropy ranking is close
  to noise: issue 14).  scripts/grad_fidelity.py measures both settings on real gradients.

Payload (codec version 2, ``grid="zero"``), after the common header:

    params   u8 G (groups present), u8 b_min, u8 b_max                  (P = 3)
    sec 0    u8[C]         group of every channel
    sec 1    u8[G]         bit width b_g
    sec 2    u8[G]         zero point zp_g
    sec 3    f32[G]        step_g
    sec 4    packed codes: group by group (increasing g), each the values x[:, channels
             of g (increasing index), :] in C order, b_g bits each, ceil(N*C_g*S*b_g/8) bytes

    bytes = 36 + 3 + 4*5 + C + 6 G + sum_g ceil(N * C_g * S * b_g / 8)

Codec version 1 (``grid="minmax"``): sec 2 is f32[G, 2] (x_min,g, x_max,g), no sec 3;
bytes = 36 + 3 + 4*4 + C + 9 G + sum_g ceil(...).

meta from decode_with_meta: ``groups`` (C,) int64, ``bits`` (G,) int64, ``group_min`` and
``group_max`` (G,) float32 (the grid's end levels), ``bits_per_channel`` (C,) int64, and in
version 2 ``step`` (G,) float32 and ``zero_point`` (G,) int64.  backward: identity (STE).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from . import _linear, bitpack
from . import format as fmt
from .base import Codec, Param, as3, check_finite, expect_sections, f32, grid_param, prod, read_struct
from .registry import register

_CHUNK = 1 << 18  # floats per entropy block


def round_half_away(v):
    """round() of the paper: nearest integer, halves away from zero."""
    v = np.asarray(v, np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def channel_minmax(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (min, max) of x3 (N, C, S): an elementwise reduction over N first (fast,
    contiguous), then over S.  NaN propagates and raises."""
    mn = np.minimum.reduce(x3, axis=0).min(axis=1)
    mx = np.maximum.reduce(x3, axis=0).max(axis=1)
    check_finite(mn, mx)
    return mn, mx


_vecdot = getattr(np, "vecdot", None)  # numpy >= 2.0


def channel_entropy(x3: np.ndarray, mn: np.ndarray | None = None, mx: np.ndarray | None = None) -> np.ndarray:
    """Eq. 1 per channel of x3 (N, C, S), float64 (C,): H = log S - sum(z e^z) / S.

    H is invariant to a shift of z, so when every channel's offset ``|min| / (max - min)``
    is at most 1 (ReLU features, most gradients) z' = x / (max - min) is used directly
    (one multiply, z' in [-1, 2]); otherwise z = (x - min) / (max - min) as written.  The
    per-channel factors are expanded to rows of C*S so every operation runs over long
    contiguous rows, block by block of samples; sums of S values are float32 matrix-vector
    products, reduced over N in float64.
    """
    n, c, s = x3.shape
    if mn is None or mx is None:
        mn, mx = channel_minmax(x3)
    lo64 = mn.astype(np.float64)
    r = mx.astype(np.float64) - lo64
    inv = np.where(r > 0, 1.0 / np.where(r > 0, r, 1.0), 0.0)
    direct = bool((np.abs(lo64) * inv <= 1.0).all())
    inv_row = np.repeat(inv.astype(np.float32), s)
    lo_row = None if direct else np.repeat(mn.astype(np.float32), s)
    x2 = x3.reshape(n, c * s)
    step = max(1, _CHUNK // max(1, c * s))
    z = np.empty((min(n, step), c * s), np.float32)
    e = np.empty_like(z)
    ones = np.ones(s, np.float32)
    Sn = np.empty((n, c), np.float32)
    Tn = np.empty((n, c), np.float32)
    for a in range(0, n, step):
        b = min(n, a + step)
        zz = z[: b - a]
        ee = e[: b - a]
        if direct:
            np.multiply(x2[a:b], inv_row, out=zz)
        else:
            assert lo_row is not None  # set when not direct
            np.subtract(x2[a:b], lo_row, out=zz)
            np.multiply(zz, inv_row, out=zz)
        np.exp(zz, out=ee)
        z3 = zz.reshape(b - a, c, s)
        e3 = ee.reshape(b - a, c, s)
        np.matmul(e3, ones, out=Sn[a:b])
        if _vecdot is not None:
            _vecdot(z3, e3, out=Tn[a:b])
        else:
            np.multiply(zz, ee, out=zz)
            np.matmul(z3, ones, out=Tn[a:b])
    S = Sn.sum(axis=0, dtype=np.float64)
    T = Tn.sum(axis=0, dtype=np.float64)
    return np.log(S) - T / S


_DP_DENSE = 256  # up to this many boundaries, Eq. 4's programme fills whole cost matrices


class _SSE:
    """Within-group sum of squares of the sorted values between allowed boundaries (prefix sums
    of the centred values, so the subtraction does not cancel for entropies near log M)."""

    def __init__(self, vs: np.ndarray, bnd: np.ndarray):
        x = vs - vs.mean()
        self.s1 = np.concatenate(([0.0], np.cumsum(x)))[bnd]
        self.s2 = np.concatenate(([0.0], np.cumsum(x * x)))[bnd]
        self.n = bnd.astype(np.float64)

    def __call__(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """SSE of the group from boundary i to boundary j (broadcast); inf where i >= j."""
        s1, s2, n = self.s1, self.s2, self.n
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.maximum(s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / (n[j] - n[i]), 0.0)
        return np.where(i < j, c, np.inf)


def _min_plus(D: np.ndarray, sse: _SSE, dense: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """new[j] = min_{i<j} D[i] + sse(i, j) and its first argmin, for every boundary j.

    Small problems use the whole cost matrix ``dense`` (rows j, columns i).  Larger ones use
    that the argmin does not decrease with j (1-D K-means costs satisfy the quadrangle
    inequality): divide and conquer, one numpy pass per level over all segments, O(nb log nb).
    """
    nb = D.size
    if dense is not None:
        tot = dense + D
        arg = tot.argmin(axis=1)
        return tot[np.arange(nb), arg], arg
    new = np.full(nb, np.inf)
    arg = np.zeros(nb, np.int64)
    # segments of rows j in [jlo, jhi] whose argmin lies in [ilo, ihi]
    jlo, jhi = np.array([1]), np.array([nb - 1])
    ilo, ihi = np.array([0]), np.array([nb - 2])
    while jlo.size:
        mid = (jlo + jhi) // 2
        hi = np.minimum(ihi, mid - 1)
        lens = hi - ilo + 1  # >= 1: ilo <= the argmin of an earlier row < mid
        starts = np.cumsum(lens) - lens
        i = np.arange(lens.sum()) - np.repeat(starts - ilo, lens)
        f = D[i] + sse(i, np.repeat(mid, lens))
        mins = np.minimum.reduceat(f, starts)
        first = np.flatnonzero(f == np.repeat(mins, lens))
        best = i[first[np.searchsorted(first, starts)]]  # the first minimum of each segment
        new[mid], arg[mid] = mins, best
        left, right = jlo <= mid - 1, mid + 1 <= jhi
        jlo, jhi, ilo, ihi = (np.concatenate((jlo[left], mid[right] + 1)), np.concatenate((mid[left] - 1, jhi[right])),
                              np.concatenate((ilo[left], best[right])), np.concatenate((best[left], ihi[right])))
    return new, arg


def kmeans_1d(values: np.ndarray, groups: int) -> np.ndarray:
    """Eq. 4 on scalars, solved exactly: group index per value (0..G'-1, by increasing group mean).

    The optimal partition of scalars into G groups is contiguous in sorted order, so a dynamic
    programme over the sorted values finds it: D_g(j) = min_{i<j} D_{g-1}(i) + SSE(i, j)
    (:func:`_min_plus`).  Equal values always share a group (boundaries only between distinct
    values), so G' = min(G, number of distinct values); among equally good partitions the one
    with the earliest boundaries is taken, so the result is deterministic.
    """
    v = np.asarray(values, np.float64).ravel()
    order = np.argsort(v, kind="stable")
    vs = v[order]
    bnd = np.concatenate(([0], np.flatnonzero(vs[1:] != vs[:-1]) + 1, [v.size]))  # allowed boundaries
    nb = bnd.size
    g = max(1, min(int(groups), nb - 1))
    sse = _SSE(vs, bnd)
    idx = np.arange(nb)
    D = sse(np.zeros(nb, np.int64), idx)  # one group from the start to each boundary
    dense = sse(idx[None, :], idx[:, None]) if nb <= _DP_DENSE else None
    back = np.zeros((g, nb), np.int64)
    for k in range(1, g):
        D, back[k] = _min_plus(D, sse, dense)
    ends = [nb - 1]
    for k in range(g - 1, 0, -1):
        ends.append(int(back[k, ends[-1]]))
    sizes = np.diff(np.concatenate(([0], bnd[np.array(ends[::-1])])))
    lab = np.empty(v.size, np.int64)
    lab[order] = np.repeat(np.arange(g), sizes)
    return lab


#: The largest possible gap between two channels' Eq. 1 entropies (M -> infinity): log M - H of a
#: channel whose normalized values are 0 or 1 in the proportion that maximizes it (0.1233 nats at a
#: share of 0.34 at 1).  Every H_i lies in [log M - ENTROPY_SPAN, log M].
def _entropy_span() -> float:
    p = np.linspace(0.0, 1.0, 100001)
    s = 1 - p + p * np.e  # mean of e^z for a share p of z = 1, the rest z = 0
    return float((p * np.e / s - np.log(s)).max())


ENTROPY_SPAN = _entropy_span()

BIT_MAPS = ("minmax", "span")


def allocate_bits(
    E: np.ndarray, groups: int, b_min: int, b_max: int, bit_map: str = "minmax"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 4-6: (group of each channel, group mean entropies Ebar_g, bit width b_g).

    ``bit_map="minmax"`` is Eq. 6 as written; ``"span"`` measures each group's distance from
    the top group in units of :data:`ENTROPY_SPAN` instead of the observed spread (see the
    module docstring).
    """
    lab = kmeans_1d(E, groups)
    g = int(lab.max()) + 1
    cnt = np.bincount(lab, minlength=g)
    ebar = np.bincount(lab, weights=np.asarray(E, np.float64), minlength=g) / cnt
    lo, hi = ebar.min(), ebar.max()
    if bit_map == "span":
        bits = b_max - round_half_away((hi - ebar) / ENTROPY_SPAN * (b_max - b_min))
        bits = np.clip(bits, b_min, b_max)
    elif hi > lo:
        bits = b_min + round_half_away((ebar - lo) / (hi - lo) * (b_max - b_min))
    else:
        bits = np.full(g, b_max, np.float64)
    return lab, ebar, bits.astype(np.int64)


@register("slacc", wire_id=4)
class SLACC(Codec):
    PARAMS = {
        "groups": Param(4, int, 1, 255, doc="G, channel groups (Eq. 4)"),
        "min_bits": Param(2, int, 1, 8, doc="b_min of Eq. 6"),
        "max_bits": Param(8, int, 1, 8, doc="b_max of Eq. 6"),
        "bits": Param(None, int, 1, 8, optional=True, doc="shorthand: sets max_bits (and caps min_bits)"),
        "schedule": Param("linear", str, choices=("linear", "constant"), doc="a_t of Eq. 3"),
        "alpha": Param(1.0, float, 0.0, 1.0, doc="a_t when schedule='constant'"),
        "total_rounds": Param(None, int, 1, None, optional=True, doc="T of Eq. 3 when encode() is not given it"),
        "window": Param(0, int, 0, None, doc="rounds averaged into Hbar (0 = all past rounds)"),
        "grid": grid_param(),
        "bit_map": Param("minmax", str, choices=BIT_MAPS, doc="Eq. 6 as written ('minmax') or against the "
                         "largest possible entropy spread ('span')"),
        "ranking": Param("entropy", str, choices=("entropy", "none"), doc="'entropy': ACII + CGC; 'none': one "
                         "group at max_bits (the ablation of the channel ranking)"),
    }
    version = 2
    read_versions = (1, 2)
    minmax_version = 1

    def __init__(self, **params):
        super().__init__(**params)
        b = self._p["bits"]
        if b is not None:
            if "max_bits" in params and params["max_bits"] != b:
                raise ValueError(
                    f"codec 'slacc': bits={b} sets max_bits, which was given as {params['max_bits']!r}; give one of them"
                )
            self._p["max_bits"] = b
            self._p["min_bits"] = min(self._p["min_bits"], b)
        if self._p["min_bits"] > self._p["max_bits"]:
            raise ValueError(
                f"codec 'slacc': min_bits ({self._p['min_bits']}) must be <= max_bits ({self._p['max_bits']})"
            )
        self._hist: deque | None = None
        self._hist_sum: np.ndarray | None = None
        self._hist_n = 0
        self._count = 0
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ state

    def _a_t(self, step, total_rounds) -> float:
        if self._p["schedule"] == "constant":
            return float(self._p["alpha"])
        t = self._count if step is None else int(step)
        T = total_rounds if total_rounds is not None else self._p["total_rounds"]
        if T is None:
            return 1.0
        return float(min(1.0, max(0.0, 1.0 - t / T)))

    def _historical(self, H: np.ndarray) -> np.ndarray:
        if self._hist_sum is None or self._hist_sum.size != H.size or self._hist_n == 0:
            return H
        return self._hist_sum / self._hist_n

    def _remember(self, H: np.ndarray) -> None:
        w = self._p["window"]
        if self._hist_sum is None or self._hist_sum.size != H.size:
            self._hist = deque()
            self._hist_sum = np.zeros_like(H)
            self._hist_n = 0
        assert self._hist is not None  # set together with _hist_sum
        self._hist.append(H)
        self._hist_sum += H
        self._hist_n += 1
        if w and self._hist_n > w:
            old = self._hist.popleft()
            self._hist_sum -= old
            self._hist_n -= 1
        if not w:
            self._hist.clear()  # the running sum is all that is needed

    def channel_importance(self, x3: np.ndarray, mn, mx, step=None, total_rounds=None) -> np.ndarray:
        H = channel_entropy(x3, mn, mx)
        Hbar = self._historical(H)
        a = self._a_t(step, total_rounds)
        E = a * H + (1.0 - a) * Hbar
        self.last_stats = {"H": H, "Hbar": Hbar, "a_t": a, "E": E}
        return E

    # ------------------------------------------------------------------ encode

    def _encode(self, x, *, step, total_rounds, training):
        x3 = as3(x)
        n, c, s = x3.shape
        mn, mx = channel_minmax(x3)
        E = self.channel_importance(x3, mn, mx, step, total_rounds)
        if training:
            self._remember(self.last_stats["H"])
            self._count += 1
        bmin, bmax = self._p["min_bits"], self._p["max_bits"]
        if self._p["ranking"] == "none":
            lab, ebar, bits = np.zeros(c, np.int64), np.array([float(E.mean())]), np.array([bmax], np.int64)
        else:
            lab, ebar, bits = allocate_bits(E, self._p["groups"], bmin, bmax, self._p["bit_map"])
        g = bits.size
        self.last_stats.update(groups=lab, ebar=ebar, bits=bits)
        glo = np.full(g, np.inf, np.float32)
        ghi = np.full(g, -np.inf, np.float32)
        np.minimum.at(glo, lab, mn)
        np.maximum.at(ghi, lab, mx)
        codes = np.empty(x3.shape, np.uint8)
        rows = (n, c * s)
        if self._p["grid"] == "minmax":
            scale = np.array([_linear.scale_of(glo[i], ghi[i], int(bits[i])) for i in range(g)], np.float32)
            # per-channel factors expanded to rows of C*S: long contiguous inner loops
            _linear.codes_into(x3.reshape(rows), np.repeat(glo[lab], s), np.repeat(scale[lab], s), codes.reshape(rows))
        else:
            steps, zps = _linear.zero_grids(glo, ghi, bits)
            inv = _linear.inv_step(steps)
            _linear.zero_codes_into(x3.reshape(rows), np.repeat(inv[lab], s), np.repeat(zps[lab], s),
                                    np.repeat(bits[lab], s), codes.reshape(rows), nonneg=bool(mn.min() >= 0))
        streams = []
        for i in range(g):
            ch = np.flatnonzero(lab == i)
            sub = codes[:, ch, :] if ch.size < c else codes
            streams.append(bitpack.pack(sub, int(bits[i]), check=False))
        params = bytes([g, bmin, bmax])
        head = [lab.astype(np.uint8), bits.astype(np.uint8)]
        if self._p["grid"] == "minmax":
            return params, [*head, np.stack([glo, ghi], axis=1).astype("<f4"), np.concatenate(streams)]
        return params, [*head, zps.astype(np.uint8), steps.astype("<f4"), np.concatenate(streams)]

    # ------------------------------------------------------------------ decode

    @classmethod
    def _decode(cls, h: fmt.Header):
        g, bmin, bmax = read_struct(h, "BBB")
        shape = h.shape
        n, c = shape[0], shape[1]
        s = prod(shape[2:])
        if g < 1 or g > c:
            raise fmt.PayloadError(f"slacc payload: {g} groups for {c} channels")
        v2 = h.codec_version == 2
        expect_sections(h, [c, g, g, 4 * g, None] if v2 else [c, g, 8 * g, None])
        lab = np.frombuffer(h.sections[0], np.uint8).astype(np.int64)
        if lab.max() >= g:
            raise fmt.PayloadError(f"slacc payload: channel group {int(lab.max())} >= {g} groups")
        cnt = np.bincount(lab, minlength=g)
        if (cnt == 0).any():
            raise fmt.PayloadError("slacc payload: a group has no channel")
        bits = np.frombuffer(h.sections[1], np.uint8).astype(np.int64)
        if bits.min() < 1 or bits.max() > 8:
            raise fmt.PayloadError(f"slacc payload: bit widths {bits.tolist()} outside 1..8")
        if v2:
            zps = np.frombuffer(h.sections[2], np.uint8).astype(np.int64)
            steps = f32(h.sections[3], g, "slacc group steps")
            _linear.check_zero_grid(steps, zps, bits, "slacc")
            L = (1 << bits) - 1
            table = np.stack([-zps * steps.astype(np.float64), (L - zps) * steps.astype(np.float64)], axis=1)
        else:
            table = f32(h.sections[2], 2 * g, "slacc group ranges").reshape(g, 2)
            if (table[:, 1] < table[:, 0]).any():
                raise fmt.PayloadError("slacc payload: a group range has max < min")
        codes_sec = h.sections[-1]
        sizes = [bitpack.packed_size(n * int(cnt[i]) * s, int(bits[i])) for i in range(g)]
        if codes_sec.nbytes != sum(sizes):
            raise fmt.PayloadError(
                f"slacc payload: code section has {codes_sec.nbytes} bytes, expected {sum(sizes)}"
            )
        data = np.frombuffer(codes_sec, np.uint8)
        out = np.empty((n, c, s), np.float32)
        off = 0
        for i in range(g):
            ch = np.flatnonzero(lab == i)
            b = int(bits[i])
            q = bitpack.unpack(data[off : off + sizes[i]], b, n * ch.size * s).reshape(n, ch.size, s)
            off += sizes[i]
            vals = np.empty(q.shape, np.float32)
            if v2:
                _linear.zero_dequantize_codes(q, steps[i], zps[i], vals)
            else:
                _linear.dequantize_codes(q, table[i, 0], _linear.step_of(table[i, 0], table[i, 1], b), vals)
            if ch.size == c:
                out = vals
            else:
                out[:, ch, :] = vals
        meta = {
            "groups": lab,
            "bits": bits,
            "group_min": table[:, 0].astype(np.float32),
            "group_max": table[:, 1].astype(np.float32),
            "bits_per_channel": bits[lab],
        }
        if v2:
            meta.update(step=steps.copy(), zero_point=zps)
        return out.reshape(shape), meta

    def error_bound(self, x, meta=None):
        if meta is None:
            return None
        x3 = as3(np.ascontiguousarray(x, np.float32))
        mn, mx = x3.min(axis=(0, 2)), x3.max(axis=(0, 2))
        lab, bits = meta["groups"], meta["bits"]
        bound = 0.0
        for i in range(bits.size):
            ch = lab == i
            eb = _linear.error_bound if self._p["grid"] == "minmax" else _linear.zero_error_bound
            bound = max(bound, eb(mn[ch].min(), mx[ch].max(), int(bits[i])))
        return bound
