"""ATen -> ONNX: :class:`_Converter` translates one AOTAutograd FX graph into ONNX default-domain nodes.

The op-by-op translation table of the portable export (:mod:`splitedge.export.portable`, whose
docstring describes the route: tracing, then this translation, then checks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from onnx import TensorProto, helper

TRACE_BATCH = 13  # a batch size no channel count of the zoo equals (dimension 0 is recognised by it)


class PortableExportError(Exception):
    """The client part cannot be expressed as portable graphs (an op outside the allow-list, ...)."""


@dataclass
class _Val:
    name: str
    shape: tuple[int, ...]


def _meta_shape(node) -> Any:
    v = node.meta.get("val")
    if isinstance(v, (list, tuple)):
        return [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in v]
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


class _Converter:
    """Translates one AOTAutograd FX graph into ONNX nodes."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.env: dict[str, Any] = {}  # fx node name -> onnx value name (or list, or None)
        self.shapes: dict[str, tuple[int, ...]] = {}  # onnx value name -> traced shape
        self._n = 0
        self._consts: dict[tuple, str] = {}
        self.prefix = prefix

    # -------------------------------------------------------------- helpers
    def fresh(self, hint: str = "t") -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> Any:
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh("n" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("c")
            self.inits.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, values) -> str:
        return self.const(list(values), np.int64)

    def reshape(self, x: str, shape) -> str:
        return self.op("Reshape", [x, self.i64(shape)])

    def transpose(self, x: str, perm) -> str:
        return self.op("Transpose", [x], perm=list(perm))

    def slice(self, x: str, starts, ends, axes, steps=None) -> str:
        ins = [x, self.i64(starts), self.i64(ends), self.i64(axes)]
        if steps is not None:
            ins.append(self.i64(steps))
        return self.op("Slice", ins)

    def reduce_sum(self, x: str, axes, keepdims: int) -> str:
        return self.op("ReduceSum", [x, self.i64(axes)], keepdims=keepdims)

    def reduce_mean(self, x: str, axes, keepdims: int) -> str:
        return self.op("ReduceMean", [x], axes=list(axes), keepdims=keepdims)

    def v(self, a) -> str:
        """The ONNX value of an FX argument."""
        name = self.env[a.name]
        if name is None:
            raise PortableExportError(f"{a.name} has no ONNX value")
        return name

    @staticmethod
    def batched(shape) -> bool:
        return bool(shape) and shape[0] == TRACE_BATCH

    # -------------------------------------------------------------- graph
    def run(self, gm: torch.fx.GraphModule, placeholder_names: dict[str, str]) -> list:
        outputs = None
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node.name] = placeholder_names.get(node.name)
                if self.env[node.name] is not None:
                    self.shapes[self.env[node.name]] = _meta_shape(node)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                outputs = node.args[0]
            else:
                raise PortableExportError(f"unsupported FX node kind {node.op}")
        assert outputs is not None, "the FX graph has no output node"
        return list(outputs)

    def _call(self, node) -> None:
        import operator

        t = node.target
        if t is operator.getitem:
            src, i = node.args
            val = self.env[src.name]
            self.env[node.name] = val[i] if isinstance(val, list) else None
            return
        name = str(getattr(t, "_overloadpacket", t)).split(".")[-1] if hasattr(t, "_overloadpacket") else str(t)
        full = str(t)
        handler = getattr(self, "_op_" + name, None)
        if handler is None:
            raise PortableExportError(f"the ATen op {full} has no portable ONNX translation")
        out = handler(node, *node.args, **node.kwargs)
        self.env[node.name] = out
        shape = _meta_shape(node)
        if isinstance(out, str):
            self.shapes[out] = shape
        elif isinstance(out, list):
            for o, s in zip(out, shape or []):
                if o is not None:
                    self.shapes[o] = s

    # -------------------------------------------------------------- simple ops
    def _op_detach(self, node, x):
        return self.v(x)

    _op_alias = _op_detach

    def _op_clone(self, node, x, **kw):
        return self.v(x)

    def _op_relu(self, node, x):
        return self.op("Relu", [self.v(x)])

    def _op_threshold_backward(self, node, grad, x, threshold):
        mask = self.op("Greater", [self.v(x), self.const(float(threshold))])
        return self.op("Where", [mask, self.v(grad), self.const(0.0)])

    def _op_hardtanh(self, node, x, lo=-1.0, hi=1.0):
        return self.op("Clip", [self.v(x), self.const(float(lo)), self.const(float(hi))])

    def _op_hardtanh_backward(self, node, grad, x, lo, hi):
        m = self.op("And", [self.op("Greater", [self.v(x), self.const(float(lo))]),
                            self.op("Less", [self.v(x), self.const(float(hi))])])
        return self.op("Where", [m, self.v(grad), self.const(0.0)])

    def _op_add(self, node, a, b, alpha=1):
        if alpha != 1:
            raise PortableExportError("add with alpha != 1")
        bv = self.v(b) if hasattr(b, "name") else self.const(float(b))
        return self.op("Add", [self.v(a), bv])

    def _op_mul(self, node, a, b):
        bv = self.v(b) if hasattr(b, "name") else self.const(float(b))
        return self.op("Mul", [self.v(a), bv])

    def _op_div(self, node, a, b):
        bv = self.v(b) if hasattr(b, "name") else self.const(float(b))
        return self.op("Div", [self.v(a), bv])

    def _target_shape(self, node, x, shape) -> list[int]:
        shape = [int(s) for s in shape]
        in_shape = self.shapes.get(self.v(x))
        if self.batched(in_shape):
            if not shape or shape[0] != TRACE_BATCH:
                raise PortableExportError(f"{node.name}: a reshape that mixes the batch dimension {shape}")
            shape[0] = 0  # ONNX Reshape: 0 copies the input's dimension (the batch)
        return shape

    def _op_view(self, node, x, shape):
        return self.reshape(self.v(x), self._target_shape(node, x, shape))

    _op__unsafe_view = _op_view
    _op_reshape = _op_view

    def _op_expand(self, node, x, shape, **kw):
        in_shape = self.shapes.get(self.v(x))
        target = [int(s) for s in shape]
        if in_shape is not None:
            off = len(target) - len(in_shape)
            for i, d in enumerate(in_shape):
                if d == target[off + i]:
                    target[off + i] = 1  # Expand broadcasts both ways: 1 keeps the input's dimension
        if TRACE_BATCH in target[:1]:
            raise PortableExportError(f"{node.name}: an expand over the batch dimension")
        return self.op("Expand", [self.v(x), self.i64(target)])

    def _op_transpose(self, node, x, d0, d1):
        rank = len(self.shapes[self.v(x)])
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self.transpose(self.v(x), perm)

    def _op_permute(self, node, x, dims):
        return self.transpose(self.v(x), [int(d) for d in dims])

    def _op_cat(self, node, xs, dim=0):
        return self.op("Concat", [self.v(a) for a in xs], axis=int(dim))

    def _op_split(self, node, x, size, dim=0):
        total = self.shapes[self.v(x)][dim]
        sizes = [min(size, total - s) for s in range(0, total, size)]
        outs = self.op("Split", [self.v(x), self.i64(sizes)], n_out=len(sizes), axis=int(dim))
        return outs if isinstance(outs, list) else [outs]

    def _op_split_with_sizes(self, node, x, sizes, dim=0):
        outs = self.op("Split", [self.v(x), self.i64(sizes)], n_out=len(sizes), axis=int(dim))
        return outs if isinstance(outs, list) else [outs]

    def _op_slice(self, node, x, dim=0, start=None, end=None, step=1):
        size = self.shapes[self.v(x)][dim]
        start = 0 if start is None else int(start)
        end = size if end is None else min(int(end), size)
        return self.slice(self.v(x), [start], [end], [int(dim)], [int(step)])

    def _op_mean(self, node, x, dims, keepdim=False, **kw):
        return self.reduce_mean(self.v(x), [int(d) for d in dims], int(bool(keepdim)))

    def _op_sum(self, node, x, dims=None, keepdim=False, **kw):
        return self.reduce_sum(self.v(x), [int(d) for d in dims], int(bool(keepdim)))

    # -------------------------------------------------------------- convolution
    def _op_convolution(self, node, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
        if transposed:
            raise PortableExportError("transposed convolutions are not supported")
        ins = [self.v(x), self.v(w)] + ([self.v(b)] if b is not None else [])
        return self.op("Conv", ins, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation),
                       group=int(groups))

    def _op_convolution_backward(self, node, grad, x, w, bias_sizes, stride, padding, dilation, transposed,
                                 output_padding, groups, mask):
        if transposed:
            raise PortableExportError("transposed convolutions are not supported")
        g, xv, wv = self.v(grad), self.v(x), self.v(w)
        n, cin, h, wd = self.shapes[xv]
        cout, cig, kh, kw = self.shapes[wv]
        _, _, ho, wo = self.shapes[g]
        s, p, d = list(stride), list(padding), list(dilation)
        groups = int(groups)
        outs: list[str | None] = [None, None, None]
        if mask[0]:
            op = [h - ((ho - 1) * s[0] - 2 * p[0] + d[0] * (kh - 1) + 1),
                  wd - ((wo - 1) * s[1] - 2 * p[1] + d[1] * (kw - 1) + 1)]
            attrs = dict(strides=s, pads=p * 2, dilations=d, group=groups)
            if any(op):
                attrs["output_padding"] = op
            outs[0] = self.op("ConvTranspose", [g, wv], **attrs)
        if mask[1]:
            if kh == kw == 1 and p == [0, 0] and groups == 1 and d == [1, 1]:
                xs = xv if s == [1, 1] else self.slice(xv, [0, 0], [h, wd], [2, 3], s)
                gm = self.reshape(g, [0, cout, -1])  # N, Cout, HW
                xm = self.transpose(self.reshape(xs, [0, cin, -1]), [0, 2, 1])  # N, HW, Cin
                prod = self.reduce_sum(self.op("MatMul", [gm, xm]), [0], 0)  # Cout, Cin
                outs[1] = self.reshape(prod, [cout, cin, 1, 1])
            elif groups == 1 and d == [1, 1] and kh * kw <= _im2col_max_window():
                # im2col: the kh*kw strided windows of the padded input, then one batched MatMul (faster
                # than the swapped Conv for 3x3 kernels; the swapped Conv wins for the 7x7 stem: measured
                # on ResNet-18 at 3x32x32, batch 32, one thread: cut 5 102 ms against 174 ms, cut 3
                # 29 ms against 15 ms per step)
                xp = xv
                if p != [0, 0]:
                    xp = self.op("Pad", [xv, self.i64([0, 0, p[0], p[1], 0, 0, p[0], p[1]]), self.const(0.0)],
                                 mode="constant")
                cols = []
                for i in range(kh):
                    for j in range(kw):
                        win = self.slice(xp, [i, j], [i + s[0] * (ho - 1) + 1, j + s[1] * (wo - 1) + 1], [2, 3], s)
                        cols.append(self.op("Unsqueeze", [win, self.i64([2])]))
                col = cols[0] if len(cols) == 1 else self.op("Concat", cols, axis=2)  # N, Cin, k*k, Ho, Wo
                col = self.transpose(self.reshape(col, [0, cin * kh * kw, ho * wo]), [0, 2, 1])
                prod = self.op("MatMul", [self.reshape(g, [0, cout, ho * wo]), col])  # N, Cout, Cin*k*k
                outs[1] = self.reshape(self.reduce_sum(prod, [0], 0), [cout, cin, kh, kw])
            else:
                cog = cout // groups
                if groups == 1:
                    xt = self.transpose(xv, [1, 0, 2, 3])  # Cin, N, H, W
                    gt = self.transpose(g, [1, 0, 2, 3])  # Cout, N, Ho, Wo
                else:
                    xt = self.reshape(self.transpose(self.reshape(xv, [0, groups, cig, h, wd]), [2, 1, 0, 3, 4]),
                                      [cig, -1, h, wd])  # cig, (g, N), H, W
                    gt = self.reshape(self.transpose(self.reshape(g, [0, groups, cog, ho, wo]), [1, 2, 0, 3, 4]),
                                      [cout, -1, ho, wo])  # (g, cog), N, Ho, Wo
                conv = self.op("Conv", [xt, gt], strides=d, dilations=s, pads=p * 2, group=groups)
                out_h = h + 2 * p[0] - s[0] * (ho - 1)
                out_w = wd + 2 * p[1] - s[1] * (wo - 1)
                if (out_h, out_w) != (kh, kw):
                    conv = self.slice(conv, [0, 0], [kh, kw], [2, 3])
                outs[1] = self.transpose(conv, [1, 0, 2, 3])  # Cout, cig, kh, kw
        if mask[2]:
            outs[2] = self.reduce_sum(g, [0, 2, 3], 0)
        return outs

    # -------------------------------------------------------------- batch norm
    def _op__native_batch_norm_legit_functional(self, node, x, w, b, rm, rv, training, momentum, eps):
        if not training:
            raise PortableExportError("BatchNorm in eval mode inside the training graph")
        xv = self.v(x)
        c = self.shapes[xv][1]
        axes = [0, 2, 3]
        mean = self.reduce_mean(xv, axes, 1)
        diff = self.op("Sub", [xv, mean])
        var = self.reduce_mean(self.op("Mul", [diff, diff]), axes, 1)
        rstd = self.op("Div", [self.const(1.0), self.op("Sqrt", [self.op("Add", [var, self.const(float(eps))])])])
        xhat = self.op("Mul", [diff, rstd])
        y = xhat
        if w is not None:
            y = self.op("Mul", [y, self.reshape(self.v(w), [1, c, 1, 1])])
        if b is not None:
            y = self.op("Add", [y, self.reshape(self.v(b), [1, c, 1, 1])])
        mean_c = self.reshape(mean, [c])
        var_c = self.reshape(var, [c])
        # torch: running_var moves with the unbiased batch variance, n / (n - 1) with n = N*H*W
        n = self.op("Cast", [self.op("ReduceProd", [self.op("Gather", [self.op("Shape", [xv]), self.i64(axes)])],
                                     keepdims=0)], to=TensorProto.FLOAT)
        unbiased = self.op("Div", [self.op("Mul", [var_c, n]), self.op("Sub", [n, self.const(1.0)])])
        m = float(momentum)
        new_rm = self.op("Add", [self.op("Mul", [self.v(rm), self.const(1.0 - m)]), self.op("Mul", [mean_c, self.const(m)])])
        new_rv = self.op("Add", [self.op("Mul", [self.v(rv), self.const(1.0 - m)]),
                                 self.op("Mul", [unbiased, self.const(m)])])
        return [y, mean_c, self.reshape(rstd, [c]), new_rm, new_rv]

    def _op__native_batch_norm_legit_no_training(self, node, x, w, b, rm, rv, momentum, eps):
        ins = [self.v(x), self.v(w), self.v(b), self.v(rm), self.v(rv)]
        return [self.op("BatchNormalization", ins, epsilon=float(eps)), None, None]

    def _op_native_batch_norm_backward(self, node, grad, x, w, rm, rv, save_mean, save_invstd, train, eps, mask):
        if not train:
            raise PortableExportError("BatchNorm backward in eval mode")
        g, xv = self.v(grad), self.v(x)
        c = self.shapes[xv][1]
        axes = [0, 2, 3]
        mean = self.reshape(self.v(save_mean), [1, c, 1, 1])
        rstd = self.reshape(self.v(save_invstd), [1, c, 1, 1])
        xhat = self.op("Mul", [self.op("Sub", [xv, mean]), rstd])
        outs: list[str | None] = [None, None, None]
        if mask[0]:
            dxhat = self.op("Mul", [g, self.reshape(self.v(w), [1, c, 1, 1])]) if w is not None else g
            m1 = self.reduce_mean(dxhat, axes, 1)
            m2 = self.reduce_mean(self.op("Mul", [dxhat, xhat]), axes, 1)
            inner = self.op("Sub", [self.op("Sub", [dxhat, m1]), self.op("Mul", [xhat, m2])])
            outs[0] = self.op("Mul", [inner, rstd])
        if mask[1]:
            outs[1] = self.reduce_sum(self.op("Mul", [g, xhat]), axes, 0)
        if mask[2]:
            outs[2] = self.reduce_sum(g, axes, 0)
        return outs

    # -------------------------------------------------------------- pooling
    def _op_max_pool2d_with_indices(self, node, x, kernel, stride=(), padding=(0, 0), dilation=(1, 1),
                                    ceil_mode=False):
        kernel = list(kernel) * (2 // len(kernel))
        stride = list(stride or kernel) * (2 // len(stride or kernel))
        padding = list(padding) * (2 // len(padding))
        if ceil_mode or list(dilation) not in ([1, 1], [1]):
            raise PortableExportError("max pooling with ceil_mode or dilation")
        out = self.op("MaxPool", [self.v(x)], kernel_shape=kernel, strides=stride, pads=padding * 2)
        # the Indices output is not portable: the backward finds the maxima again from the pooled values
        return [out, out]

    def _op_max_pool2d_with_indices_backward(self, node, grad, x, kernel, stride, padding, dilation, ceil_mode,
                                             indices):
        kernel = list(kernel) * (2 // len(kernel))
        stride = list(stride or kernel) * (2 // len(stride or kernel))
        padding = list(padding) * (2 // len(padding))
        g, xv, pooled = self.v(grad), self.v(x), self.v(indices)
        n, c, h, w = self.shapes[xv]
        _, _, ho, wo = self.shapes[g]
        kh, kw = kernel
        (sh, sw), (ph, pw) = stride, padding
        if ph or pw:
            xp = self.op("Pad", [xv, self.i64([0, 0, ph, pw, 0, 0, ph, pw]), self.const(-np.inf)], mode="constant")
        else:
            xp = xv
        taken = None
        parts = []
        for i in range(kh):
            for j in range(kw):
                win = self.slice(xp, [i, j], [i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1], [2, 3], [sh, sw])
                eq = self.op("Equal", [win, pooled])
                if taken is None:
                    mask, taken = eq, eq
                else:
                    mask = self.op("And", [eq, self.op("Not", [taken])])
                    taken = self.op("Or", [taken, eq])
                part = self.op("Where", [mask, g, self.const(0.0)])
                parts.append(self.op("Unsqueeze", [part, self.i64([2])]))
        stacked = self.reshape(self.op("Concat", parts, axis=2), [0, c * kh * kw, ho, wo])
        onehot = np.zeros((c * kh * kw, 1, kh, kw), np.float32)
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    onehot[ch * kh * kw + i * kw + j, 0, i, j] = 1.0
        op = [h - ((ho - 1) * sh - 2 * ph + kh), w - ((wo - 1) * sw - 2 * pw + kw)]
        attrs = dict(strides=[sh, sw], pads=[ph, pw, ph, pw], group=c)
        if any(op):
            attrs["output_padding"] = op
        return self.op("ConvTranspose", [stacked, self.const(onehot)], **attrs)

    def _op__adaptive_avg_pool2d(self, node, x, out_size):
        xv = self.v(x)
        _, c, h, w = self.shapes[xv]
        oh, ow = (list(out_size) * 2)[:2]
        if h % oh == 0 and w % ow == 0:
            if (oh, ow) == (1, 1):
                return self.reduce_mean(xv, [2, 3], 1)
            return self.op("AveragePool", [xv], kernel_shape=[h // oh, w // ow], strides=[h // oh, w // ow])
        if oh % h == 0 and ow % w == 0:  # upsampling: every output cell copies one input cell
            rh, rw = oh // h, ow // w
            e = self.op("Expand", [self.reshape(xv, [0, c, h, 1, w, 1]), self.i64([1, 1, 1, rh, 1, rw])])
            return self.reshape(e, [0, c, oh, ow])
        raise PortableExportError(f"adaptive average pooling from {h}x{w} to {oh}x{ow}")

    def _op__adaptive_avg_pool2d_backward(self, node, grad, x):
        g, xv = self.v(grad), self.v(x)
        _, c, h, w = self.shapes[xv]
        _, _, oh, ow = self.shapes[g]
        if h % oh == 0 and w % ow == 0:
            kh, kw = h // oh, w // ow
            scaled = self.op("Div", [g, self.const(float(kh * kw))])
            e = self.op("Expand", [self.reshape(scaled, [0, c, oh, 1, ow, 1]), self.i64([1, 1, 1, kh, 1, kw])])
            return self.reshape(e, [0, c, h, w])
        if oh % h == 0 and ow % w == 0:
            rh, rw = oh // h, ow // w
            return self.reduce_sum(self.reshape(g, [0, c, h, rh, w, rw]), [3, 5], 0)
        raise PortableExportError(f"adaptive average pooling from {h}x{w} to {oh}x{ow}")


def _im2col_max_window() -> int:
    """Largest kernel area whose weight gradient uses im2col (SPLITEDGE_IM2COL_MAX_WINDOW, default 9)."""
    try:
        return int(os.environ.get("SPLITEDGE_IM2COL_MAX_WINDOW", "9"))
    except ValueError:
        return 9
