"""``sgq``: Stripe-wise Group Quantization (sgq.md) with Channel-Attention Grouping and Gradient Calibration.

Notation: X (N, C, S) with S = H*W; a *stripe* is the vector x = X[n, channels of a group, s].

Forward (edge), per group g of C_g channels, k = 2^n centroids:

    J   = sum_i sum_j r_ij sum_c v_c (x_ic - u_jc)^2       weighted K-means objective   (Eq. 1, 2, 11)
    y_i = argmin_j sum_c v_c (x_ic - u_jc)^2                                             (Eq. 3)
    u_j = sum_i r_ij x_i / sum_i r_ij                                                    (Eq. 4)
    Q(x_i) = u_{y_i} = onehot(y_i) U                                                     (Eq. 5, 6)

The centroids are fitted on ``sample`` stripes drawn uniformly with replacement from
the N*S stripes (all of them when N*S <= sample) by ``iters`` Lloyd iterations
(numpy, matmul distances; kmeans.py), then every stripe is assigned (Eq. 3).  The
paper subsamples by average pooling; uniform sampling is used instead because pooled
stripes are blurred averages that pull the centroids towards the mean.  Seeds: random
distinct sample stripes, or (``warm_start``) the previous training encode's centroids for the
groups whose channel set did not change -- consecutive batches of one stream are
alike, so fewer iterations give the same quality (defaults: 512 stripes, 4 iterations,
chosen to keep the 4-bit encode of a 32x64x16x16 activation near 2.5 ms on the 2-core
test machine; raise them for a better fit).  Empty clusters are re-seeded at the
farthest stripes.  All G groups are padded to a common width (zero distance weight on
the padding) and fitted/assigned in the same numpy calls, on a group-major copy of the
stripes centred per channel (the codebook is stored uncentred): the matmul form of the
distance then does not cancel for data with a large offset.  The argmin over the
centroids is one integer min (kmeans.nearest).  |x| must stay below ~1e18 (squared
distances in float32); larger values raise ValueError.

Traffic (Eq. 8; the paper's W*H is per sample, here N*S stripes):

    S_SGQ = sum_g (n N S  +  32 * 2^n * C_g)  bits

CAG (channel-attention grouping, paper sec. 2.2), this project's design:

    p   = mean over S of X            (N, C)  channel-wise average pool
    z   = p / rms_c(p)                        per-sample scale normalisation (inputs O(1))
    o   = sigmoid(W2 relu(W1 z + b1) + b2)    two-layer FC, C -> C/r -> C (squeeze-excitation)
    V   = mean over N of o, floored at 1e-3   the significance vector, length C

  V weights the K-means distances (Eq. 11 read per channel: sum_c v_c (x_c - u_c)^2; the
  paper's v_i indexed by pixel is read as the channel weight) and orders the channels:
  sorted by decreasing V (stable), cut into G contiguous groups of near-equal size
  (``np.array_split``: the first C mod G groups get one more channel), channels inside a
  group in increasing index.  Eq. 8 traffic is therefore fixed by (n, N, S, C, G).
  Since neighbours in V share a group, the weights vary little inside a group; their
  main effect is which channels are quantized together.
  Learning (Eq. 14/15 leave it open): the FC is trained online on the edge, in numpy,
  at zero extra traffic: :meth:`SGQ.observe_gradient` receives the decoded gradient g
  of the last encoded batch and takes ``cag_steps`` SGD steps (rate ``cag_lr``) on

      L = mean_{n,c} (o_nc - t_c)^2,   t_c = e_c / max_c e_c,   e_c = mean_{n,s} g_{n,c,s}^2

  with the pooled input z saved at that encode: V learns which channels the cloud's
  loss is sensitive to.  W1 ~ N(0, 2/C), W2 ~ N(0, 1e-4), biases 0 (V starts near 0.5),
  drawn from the codec's seed.  ``significance=False`` switches CAG off for the
  ablation: V = 1, groups are consecutive channels in natural order.

Gradient Calibration (cloud; paper sec. 2.3).  The soft assignment of Eq. 7, with the
distance weights and a temperature tau (raw squared distances of real activations are
large, which makes the softmax a hard argmax and its Jacobian zero):

    pi_j(x) = softmax_j(-||x - u_j||_W^2 / tau),   Q~(x) = sum_j pi_j(x) u_j             (Eq. 7)

  Its Jacobian, derived: ds_j/dx = -2 W (x - u_j)/tau, dpi_j/dx = (2/tau) pi_j W (u_j - Q~), so

    J(x) = dQ~/dx = (2/tau) (sum_j pi_j u_j u_j^T - Q~ Q~^T) W = (2/tau) Cov_pi(u) W

  which is Eq. 12 (2 sum_j sum_l u_j (u_j - u_l)^T p_j p_l / sum_j sum_l p_j p_l, with the
  paper's scalar-looking u_j^T(u_j - u_l) read as the outer product) for tau = 1, W = I.
  Eq. 13 writes the same with pi replaced by pi~ = Q~ U^+ (coordinates of Q~ in the
  centroids, U^+ the pseudo-inverse) and U_o the stack of u_j u_j^T:
  2 Q~ U^+ U_o - 2 Q~^T Q~ = 2 (sum_j pi~_j u_j u_j^T - Q~ Q~^T).  It equals Eq. 12 exactly
  when the centroids are linearly independent (k <= d: then pi~ = pi); for k > d (16
  centroids of 6-7 channels) pi~ is only the minimum-norm solution, so this code uses the
  exact form (tested against both and against finite differences of Eq. 7 in float64).
  The cloud knows only Q(x) = u_y, so J is evaluated at x = u_y; the rule applied to
  g = dL/dQ(X), per stripe, vectorized:

    g_x = J^T g = (2/tau) W (sum_l pi_yl u_l (u_l . g) - Q~_y (Q~_y . g)),  pi_y = pi(u_y)

  tau_g = ``temperature`` * median_j min_{l: d_jl > 0} ||u_j - u_l||_W^2 (from the codebook
  and V alone, so the cloud needs nothing more); a group whose centroids all coincide
  keeps the identity.  ``calibrate=False``: identity (straight-through estimator).

Payload (codec version 1):

    params   u8 n, u16 G, u8 flags (bit 0: CAG on)                          (P = 4)
    sec 0    u16[C]      channel order: the channels of group 0, then group 1, ...
    sec 1    u16[G]      C_g
    sec 2    f32[C]      V (distance weight of every channel, natural order; 1 without CAG)
    sec 3    f32         codebooks, group by group, (2^n, C_g) row-major
    sec 4    packed      n-bit indices, group by group, each N*S in (n, s) order, one stream

    bytes = 60 + 6 C + 2 G + 4 * 2^n * C + ceil(G n N S / 8)
          = 60 + 6 C + 2 G + ceil(S_SGQ / 8)

meta from decode_with_meta: ``perm`` (C,) int64, ``group_sizes`` (G,) int64, ``weights``
(C,) float32, ``codebooks`` list of (2^n, C_g) float32, ``labels`` (G, N, S) uint8, ``bits``.
"""

from __future__ import annotations

import numpy as np

from . import bitpack
from . import format as fmt
from .base import Codec, Param, as3, bits_param, check_grad, expect_sections, f32, prod, read_struct, seed_param
from .registry import register
from .vq import checked_means, fit_groups, group_sizes, padded_index, parse_books_codes, parse_groups, vq_reconstruct


# ====================================================================== Eq. 7 and its Jacobian (float64 references)


def soft_quantize(x: np.ndarray, U: np.ndarray, w: np.ndarray | None = None, tau: float = 1.0) -> np.ndarray:
    """Eq. 7 with weights and temperature: sum_j softmax_j(-||x - u_j||_W^2 / tau) u_j, for x (..., d)."""
    x = np.asarray(x, np.float64)
    U = np.asarray(U, np.float64)
    w = np.ones(U.shape[1]) if w is None else np.asarray(w, np.float64)
    d2 = (((x[..., None, :] - U) ** 2) * w).sum(-1)
    s = -d2 / tau
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return p @ U


def soft_jacobian(x: np.ndarray, U: np.ndarray, w: np.ndarray | None = None, tau: float = 1.0) -> np.ndarray:
    """Closed form J = dQ~/dx = (2/tau)(sum_j pi_j u_j u_j^T - Q~ Q~^T) W at one point x (d,)."""
    x = np.asarray(x, np.float64)
    U = np.asarray(U, np.float64)
    w = np.ones(U.shape[1]) if w is None else np.asarray(w, np.float64)
    s = -(((x - U) ** 2) * w).sum(-1) / tau
    p = np.exp(s - s.max())
    p /= p.sum()
    q = p @ U
    return (2.0 / tau) * ((U.T * p) @ U - np.outer(q, q)) * w[None, :]


def eq12_jacobian(x: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Eq. 12 as printed (tau = 1, W = I), the double sum with u_j (u_j - u_l)^T as an outer product."""
    x = np.asarray(x, np.float64)
    U = np.asarray(U, np.float64)
    d2 = ((x - U) ** 2).sum(-1)
    p = np.exp(-(d2 - d2.min()))  # a common factor cancels between numerator and denominator
    num = np.zeros((U.shape[1], U.shape[1]))
    for j in range(U.shape[0]):
        for l in range(U.shape[0]):  # noqa: E741
            num += np.outer(U[j], U[j] - U[l]) * p[j] * p[l]
    return 2.0 * num / (p.sum() ** 2)


def eq13_jacobian(xhat: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Eq. 13 (tau = 1, W = I): 2 x^ U^+ U_o - 2 x^^T x^, U_o the stack of u_j^T u_j (d x d each)."""
    xhat = np.asarray(xhat, np.float64)
    U = np.asarray(U, np.float64)
    pit = xhat @ np.linalg.pinv(U)  # (k,)
    Uo = U[:, :, None] * U[:, None, :]  # (k, d, d)
    return 2.0 * np.tensordot(pit, Uo, axes=1) - 2.0 * np.outer(xhat, xhat)


def calibration_tables(U: np.ndarray, w: np.ndarray, temperature: float):
    """(tau, Pi (k, k) softmax rows at each centroid, Q~ (k, d)) for one group; tau None if degenerate."""
    U = np.asarray(U, np.float64)
    w = np.asarray(w, np.float64)
    d2 = (((U[:, None, :] - U[None, :, :]) ** 2) * w).sum(-1)
    pos = np.where(d2 > 0, d2, np.inf)
    nn = pos.min(axis=1)
    nn = nn[np.isfinite(nn)]
    if nn.size == 0:
        return None, None, None
    tau = float(temperature) * float(np.median(nn))
    s = -d2 / tau
    s -= s.max(axis=1, keepdims=True)
    P = np.exp(s)
    P /= P.sum(axis=1, keepdims=True)
    return tau, P, P @ U


def calibrate_group(g3: np.ndarray, U: np.ndarray, w: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """Gradient Calibration for one group: g3 (N, d, S) = dL/dQ on its channels, labels (N, S)."""
    tau, P, Q = calibration_tables(U, w, temperature)
    if tau is None:
        return g3
    U32 = U.astype(np.float32)
    A = np.matmul(U32, g3)  # (N, k, S): u_l . g
    Pl = np.take(P.T.astype(np.float32), labels, axis=1).transpose(1, 0, 2)  # (N, k, S): pi_{y,l}
    A *= Pl
    T1 = np.matmul(U32.T, A)  # (N, d, S)
    Xh = np.take(Q.T.astype(np.float32), labels, axis=1).transpose(1, 0, 2)  # (N, d, S)
    c = (Xh * g3).sum(axis=1, keepdims=True)
    Xh *= c
    T1 -= Xh
    T1 *= (np.float32(2.0 / tau) * np.asarray(w, np.float32))[None, :, None]
    return T1


# ====================================================================== CAG


class SignificanceNet:
    """Two-layer FC (C -> C/r -> C, ReLU, sigmoid) on the pooled activation; trained by observe_gradient."""

    def __init__(self, c: int, reduction: int, rng: np.random.Generator) -> None:
        hd = max(1, c // reduction)
        self.c = c
        self.W1 = rng.normal(0.0, np.sqrt(2.0 / c), (c, hd))
        self.b1 = np.zeros(hd)
        self.W2 = rng.normal(0.0, 1e-2, (hd, c))
        self.b2 = np.zeros(c)

    @staticmethod
    def pool(means: np.ndarray) -> np.ndarray:
        """z = channel-wise average pool (N, C), divided by its RMS over channels."""
        p = means.astype(np.float64)
        rms = np.sqrt((p * p).mean(axis=1, keepdims=True))
        return p / np.where(rms > 0, rms, 1.0)

    def forward(self, z: np.ndarray):
        a1 = z @ self.W1 + self.b1
        h = np.maximum(a1, 0.0)
        o = 1.0 / (1.0 + np.exp(-(h @ self.W2 + self.b2)))
        return h, o

    def significance(self, z: np.ndarray) -> np.ndarray:
        return np.maximum(self.forward(z)[1].mean(axis=0), 1e-3)

    def train(self, z: np.ndarray, target: np.ndarray, lr: float, steps: int) -> float:
        """SGD on mean (o - t)^2; returns the loss before the last step."""
        loss = 0.0
        for _ in range(steps):
            h, o = self.forward(z)
            diff = o - target[None, :]
            loss = float((diff * diff).mean())
            da = (2.0 / diff.size) * diff * o * (1.0 - o)
            dW2 = h.T @ da
            db2 = da.sum(axis=0)
            dh = (da @ self.W2.T) * (h > 0)
            dW1 = z.T @ dh
            db1 = dh.sum(axis=0)
            self.W2 -= lr * dW2
            self.b2 -= lr * db2
            self.W1 -= lr * dW1
            self.b1 -= lr * db1
        return loss


# ====================================================================== codec


@register("sgq", wire_id=5)
class SGQ(Codec):
    PARAMS = {
        "bits": bits_param(4),
        "groups": Param(10, int, 1, 65535, doc="G channel groups (fewer if C < G)"),
        "significance": Param(True, bool, doc="CAG on (V from the FC) or off (V = 1, natural order)"),
        "calibrate": Param(True, bool, doc="Gradient Calibration in backward(), else identity"),
        "temperature": Param(1.0, float, 1e-6, 1e6, doc="tau of Eq. 7, in units of the codebook's spacing"),
        "reduction": Param(4, int, 1, 4096, doc="r of the FC: C -> C/r -> C"),
        "cag_lr": Param(1.0, float, 0.0, 1e3, doc="SGD rate of the FC in observe_gradient"),
        "cag_steps": Param(5, int, 0, 10000, doc="SGD steps per observed gradient"),
        "sample": Param(512, int, 16, 1 << 26, doc="stripes sampled for the K-means fit"),
        "iters": Param(4, int, 1, 1000, doc="Lloyd iterations"),
        "warm_start": Param(True, bool, doc="seed K-means with the previous training encode's centroids"),
        "seed": seed_param(),
    }
    flag_cag = 1

    def __init__(self, **params):
        super().__init__(**params)
        ss = np.random.SeedSequence(self._p["seed"])
        s_fit, s_net = ss.spawn(2)
        self._rng = np.random.default_rng(s_fit)
        self._net_seed = s_net
        self._net: SignificanceNet | None = None
        self._warm: tuple[np.ndarray, np.ndarray] | None = None
        self._last_z: np.ndarray | None = None
        self._last_shape: tuple | None = None
        self.last_significance: np.ndarray | None = None
        self.last_cag_loss: float | None = None

    # ------------------------------------------------------------------ CAG

    def _significance(self, x3: np.ndarray, means: np.ndarray, training: bool) -> np.ndarray:
        c = x3.shape[1]
        if not self._p["significance"]:
            return np.ones(c, np.float64)
        if self._net is None or self._net.c != c:
            self._net = SignificanceNet(c, self._p["reduction"], np.random.default_rng(self._net_seed))
        z = SignificanceNet.pool(means)
        if training:
            self._last_z = z
            self._last_shape = x3.shape
        return self._net.significance(z)

    def observe_gradient(self, grad: np.ndarray) -> None:
        """Trains the CAG FC towards the channel energy of ``grad`` (see the module docstring)."""
        if not self._p["significance"] or self._last_z is None or self._net is None:
            return
        g3 = as3(np.ascontiguousarray(grad, np.float32))
        if g3.shape != self._last_shape:
            raise ValueError(f"gradient shape {np.shape(grad)} does not match the last encoded batch {self._last_shape}")
        e = np.einsum("ncs,ncs->c", g3, g3, dtype=np.float64) / (g3.shape[0] * g3.shape[2])
        m = e.max()
        if not np.isfinite(m) or m <= 0:
            return
        self.last_cag_loss = self._net.train(self._last_z, e / m, self._p["cag_lr"], self._p["cag_steps"])

    def grouping(self, v: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        g = min(self._p["groups"], c)
        sizes = group_sizes(c, g)
        if not self._p["significance"]:
            return np.arange(c), sizes
        order = np.argsort(-v, kind="stable")
        perm = np.concatenate([np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])])
        return perm, sizes

    # ------------------------------------------------------------------ encode

    def _encode(self, x, *, step, total_rounds, training):
        x3 = as3(x)
        n, c, s = x3.shape
        if c > 65535:
            raise ValueError(f"sgq: at most 65535 channels, got {c}")
        means = checked_means(x3)
        bits = self._p["bits"]
        v = self._significance(x3, means, training)
        self.last_significance = v
        perm, sizes = self.grouping(v, c)
        idx, valid = padded_index(perm, sizes)
        wpad = np.where(valid, v[idx], 0.0).astype(np.float32)
        warm = None
        if self._p["warm_start"] and self._warm is not None:
            pidx, pU = self._warm
            if pidx.shape == idx.shape and pU.shape[1] == (1 << bits):
                same = (pidx == idx).all(axis=1)
                if same.any():
                    warm = np.full(pU.shape, np.nan, np.float32)
                    warm[same] = pU[same]
        U, labels, books = fit_groups(self, x3, idx, wpad, sizes, bits, warm, means, training)
        flags = self.flag_cag if self._p["significance"] else 0
        params = np.array([bits], "<u1").tobytes() + np.array([sizes.size], "<u2").tobytes() + bytes([flags])
        return params, [
            perm.astype("<u2"),
            sizes.astype("<u2"),
            v.astype("<f4"),
            books.astype("<f4"),
            bitpack.pack(labels, bits, check=False),
        ]

    # ------------------------------------------------------------------ decode

    @classmethod
    def _decode(cls, h: fmt.Header):
        bits, g, flags = read_struct(h, "BHB")
        if not 1 <= bits <= 8:
            raise fmt.PayloadError(f"sgq payload: bit width {bits} outside 1..8")
        if flags & ~cls.flag_cag:
            raise fmt.PayloadError(f"sgq payload: unknown flags {flags:#x}")
        shape = h.shape
        n, c = shape[0], shape[1]
        s = prod(shape[2:])
        expect_sections(h, [2 * c, 2 * g, 4 * c, None, None])
        perm, sizes = parse_groups(h, h.sections[0], h.sections[1], c, g)
        w = f32(h.sections[2], c, "sgq weights").copy()
        if w.min() < 0:
            raise fmt.PayloadError("sgq payload: negative channel weight")
        books, labels = parse_books_codes(h, h.sections[3], h.sections[4], sizes, bits, n, s)
        out = vq_reconstruct(shape, perm, sizes, books, labels)
        meta = {
            "bits": bits,
            "significance": bool(flags & cls.flag_cag),
            "perm": perm,
            "group_sizes": sizes,
            "weights": w,
            "codebooks": books,
            "labels": labels,
        }
        return out, meta

    # ------------------------------------------------------------------ backward (cloud)

    def backward(self, grad, meta):
        """Gradient Calibration (module docstring) when ``calibrate``; identity otherwise."""
        g = check_grad(grad, meta)
        if not self._p["calibrate"]:
            return g
        g3 = as3(g)
        out = np.empty_like(g3)
        perm, sizes, w = meta["perm"], meta["group_sizes"], meta["weights"]
        off = 0
        for i, sz in enumerate(sizes):
            ch = perm[off : off + int(sz)]
            off += int(sz)
            out[:, ch, :] = calibrate_group(
                g3[:, ch, :], meta["codebooks"][i], w[ch], meta["labels"][i], self._p["temperature"]
            )
        return out.reshape(g.shape)
