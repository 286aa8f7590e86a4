"""The client half as plain ONNX graphs: the *portable* training backend's artifacts.

Route taken (no graph is written by hand per layer)
---------------------------------------------------
1. The client ``Part`` is traced by **AOTAutograd** (``functorch.compile.aot_function``) as a
   function of the input, the parameters and the BatchNorm running statistics. AOTAutograd
   functionalizes the running-statistics update (so the new statistics are forward outputs) and
   splits the joint forward/backward graph with its **default partitioner** into a forward that
   returns the activation plus the tensors the backward needs, and a backward that takes those
   tensors and the activation's gradient (the server's gradient) and returns the parameter gradients.
2. Each ATen op of both FX graphs is translated by :class:`_Converter` into ONNX default-domain
   ops (opset 13 by default, IR 7), not through ``torch.onnx``:

   * ``convolution`` -> ``Conv``; ``convolution_backward`` -> ``ConvTranspose`` for the input
     gradient and, for the weight gradient, a ``Conv`` of the input with batch and channels swapped
     (per group) by the output gradient, ``dilations = stride``, then a ``Slice`` to the kernel size;
     ungrouped kernels up to 3x3 use im2col (strided ``Slice`` s of the padded input, ``Concat``)
     and one batched ``MatMul`` instead, and a 1x1 unpadded one a plain batched ``MatMul``;
   * BatchNorm in training mode -> ``ReduceMean``/``Sub``/``Mul``/``Sqrt``/``Div`` with torch's
     semantics (batch statistics, running statistics moved with momentum 0.1 and the *unbiased*
     batch variance); its backward -> the closed-form formula on the same primitive ops;
   * ``max_pool2d_with_indices`` -> ``MaxPool`` without its (non-portable) ``Indices`` output; its
     backward compares strided ``Slice`` s of the (-inf padded) input with the pooled output, keeps
     the first maximum of each window as torch does, and scatters the gradient back with one
     ``ConvTranspose`` of a constant one-hot kernel;
   * the rest (ReLU, ReLU6, residual adds, channel shuffle's views/transposes, split/cat, means,
     adaptive average pooling) map one to one.

   The batch dimension stays symbolic: the graphs are traced at batch ``TRACE_BATCH`` and every
   reshape keeps dimension 0 from its input.
3. The inference forward (running statistics) is traced and translated the same way in eval mode
   (BatchNorm as ``BatchNormalization``), with the parameters as graph inputs so the runtime feeds
   the current weights.

Every graph is checked with ``onnx.checker`` and against :data:`ALLOWED_OPS`; an op type outside
that list stops the export (:class:`PortableExportError`).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from onnx import TensorProto, helper
from torch import nn

#: ONNX op types the portable graphs may contain (default domain only). All are in ONNX opset 13 and
#: are accepted by ONNX Runtime 1.10+, TensorRT 8.2+ and Ascend ATC (CANN 5+).
ALLOWED_OPS = frozenset({
    "Add", "And", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "Conv",
    "ConvTranspose", "Div", "Equal", "Expand", "Flatten", "Gather", "GlobalAveragePool", "Greater",
    "Identity", "Less", "MatMul", "Max", "MaxPool", "Mul", "Not", "Or", "Pad", "ReduceMean", "ReduceProd",
    "ReduceSum", "Relu", "Reshape", "Shape", "Slice", "Split", "Sqrt", "Sub", "Transpose", "Unsqueeze",
    "Where", "Gemm",
})

DEFAULT_OPSET = 13
DEFAULT_IR = 7
MAX_OPSET = 17  # ReduceMean's axes attribute (used here) became an input in opset 18


def ir_version_for(opset: int) -> int:
    """The lowest IR version that carries ``opset``: 7 up to opset 13, 8 for opsets 14 to 17."""
    return DEFAULT_IR if opset <= 13 else 8


def optimizer_section(name: str, lr: float, weight_decay: float, momentum: float) -> dict:
    """The portable backend's optimizer, with torch's formulas (torch.optim.SGD / torch.optim.AdamW)."""
    if name == "sgd":
        return {"name": "sgd", "lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay),
                "dampening": 0.0, "nesterov": False}
    return {"name": "adamw", "lr": float(lr), "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": float(weight_decay)}
TRACE_BATCH = 13  # a batch size no channel count of the zoo equals (dimension 0 is recognised by it)
BN_MOMENTUM = 0.1

INPUT = "input"
ACTIVATION = "activation"
GRAD_ACTIVATION = "grad_activation"
NEW_PREFIX = "new:"  # forward output: the moved running statistic NEW_PREFIX + buffer name
GRAD_PREFIX = "grad:"  # backward output: GRAD_PREFIX + parameter name

FILES = {
    "forward": "client/portable/forward_train.onnx",
    "backward": "client/portable/backward.onnx",
    "inference": "client/portable/inference.onnx",
    "params": "client/portable/params.npz",
}


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


def _value_info(name: str, shape, batched: bool) -> onnx.ValueInfoProto:
    dims: list[Any] = list(shape)
    if batched and dims:
        dims[0] = "batch"
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _trace(client: nn.Module, input_shape: tuple[int, ...], training: bool = True):
    """AOTAutograd's forward and backward FX graphs of ``client`` in train mode (in eval mode: the
    forward only, backward None)."""
    from functorch.compile import aot_function, default_partition, make_boxed_func
    from torch.func import functional_call

    model = copy.deepcopy(client).train(training)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if mod.momentum is None or not mod.track_running_stats:
                raise PortableExportError("BatchNorm without momentum or running statistics is not supported")
            mod.num_batches_tracked = None  # the counter only matters with momentum=None
    params = dict(model.named_parameters())
    buffers = {k: v for k, v in model.named_buffers() if v is not None}
    names = list(params) + list(buffers)
    graphs: dict[str, torch.fx.GraphModule] = {}

    def fw(gm, _):
        graphs["fw"] = gm
        return make_boxed_func(gm)

    def bw(gm, _):
        graphs["bw"] = gm
        return make_boxed_func(gm)

    def f(x, *tensors):
        return functional_call(model, dict(zip(names, tensors)), (x,))

    g = aot_function(f, fw_compiler=fw, bw_compiler=bw, partition_fn=default_partition)
    x = torch.randn(TRACE_BATCH, *input_shape)
    args = [p.detach().clone().requires_grad_(training) for p in params.values()]
    args += [b.detach().clone() for b in buffers.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = g(x, *args)
        if training:
            out.backward(torch.ones_like(out))
    return graphs["fw"], graphs.get("bw"), list(params), list(buffers)


def build_inference_graph(client: nn.Module, input_shape: tuple[int, ...], *, opset: int = DEFAULT_OPSET,
                          ir_version: int = DEFAULT_IR) -> onnx.ModelProto:
    """The eval-mode forward (BatchNorm on running statistics), parameters and statistics as inputs."""
    fw, _, pnames, bnames = _trace(client, input_shape, training=False)
    names = [INPUT] + pnames + bnames
    ph = [n for n in fw.graph.nodes if n.op == "placeholder"]
    conv = _Converter("i_")
    outs = conv.run(fw, {n.name: names[i] for i, n in enumerate(ph)})
    nodes = list(conv.nodes) + [helper.make_node("Identity", [conv.v(outs[0])], [ACTIVATION])]
    sd = client.state_dict()
    inputs = [_value_info(INPUT, (TRACE_BATCH, *input_shape), True)]
    inputs += [_value_info(n, tuple(sd[n].shape), False) for n in pnames + bnames]
    graph = helper.make_graph(nodes, "splitedge_inference", inputs,
                              [_value_info(ACTIVATION, _meta_shape(outs[0]), True)], initializer=conv.inits)
    _prune(graph)
    return _finish(graph, opset, ir_version, "inference.onnx")


def _prune(graph: onnx.GraphProto) -> None:
    """Drops nodes and initializers no output depends on."""
    need = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in need]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _finish(graph: onnx.GraphProto, opset: int, ir: int, what: str) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="splitedge")
    model.ir_version = ir
    check_model(model, what)
    return model


def check_model(model: onnx.ModelProto, what: str) -> None:
    """``onnx.checker`` plus the allow-list and the default-domain rule."""
    bad = sorted({n.op_type for n in model.graph.node if n.op_type not in ALLOWED_OPS or n.domain not in ("", "ai.onnx")})
    if bad:
        raise PortableExportError(f"{what}: op types outside the portable allow-list: {', '.join(bad)}")
    if any(o.domain not in ("", "ai.onnx") for o in model.opset_import):
        raise PortableExportError(f"{what}: imports a non-default ONNX domain")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise PortableExportError(f"{what}: onnx.checker: {str(e).splitlines()[0][:300]}") from None


def build_training_graphs(client: nn.Module, input_shape: tuple[int, ...], *, opset: int = DEFAULT_OPSET,
                          ir_version: int = DEFAULT_IR):
    """Returns (forward ModelProto, backward ModelProto, io description)."""
    fw, bw, pnames, bnames = _trace(client, input_shape)
    primal_names = [INPUT] + pnames + bnames
    fw_ph = [n for n in fw.graph.nodes if n.op == "placeholder"]
    if len(fw_ph) != len(primal_names):
        raise PortableExportError("unexpected AOTAutograd forward signature")
    fconv = _Converter("f_")
    fw_outs = fconv.run(fw, {n.name: primal_names[i] for i, n in enumerate(fw_ph)})
    bw_ph = [n for n in bw.graph.nodes if n.op == "placeholder"]
    n_saved = len(bw_ph) - 1
    n_mut = len(fw_outs) - 1 - n_saved
    if n_mut != 2 * sum(1 for b in bnames if b.endswith("running_mean")) or n_mut != len(bnames):
        raise PortableExportError("unexpected AOTAutograd forward outputs (running statistics)")
    act_node = fw_outs[n_mut]
    saved_nodes = fw_outs[n_mut + 1:]
    ph_by_name = {n.name: primal_names[i] for i, n in enumerate(fw_ph)}

    # forward graph outputs: activation, moved running statistics, saved tensors
    f_graph_nodes = list(fconv.nodes)
    outputs: list[onnx.ValueInfoProto] = []

    renamed: dict[str, str] = {}
    graph_inputs = set(primal_names)

    def alias(src: str, dst: str) -> None:
        """Makes value ``src`` a graph output named ``dst``: by renaming it where that is possible
        (an Identity node would copy the tensor on every run), else through an Identity."""
        if src in graph_inputs or src in renamed:
            f_graph_nodes.append(helper.make_node("Identity", [renamed.get(src, src)], [dst]))
            return
        renamed[src] = dst
        for node in f_graph_nodes:
            for k, name in enumerate(node.output):
                if name == src:
                    node.output[k] = dst
            for k, name in enumerate(node.input):
                if name == src:
                    node.input[k] = dst

    alias(fconv.v(act_node), ACTIVATION)
    act_shape = _meta_shape(act_node)
    outputs.append(_value_info(ACTIVATION, act_shape, True))
    for node, buf in zip(fw_outs[:n_mut], bnames):
        alias(fconv.v(node), NEW_PREFIX + buf)
        outputs.append(_value_info(NEW_PREFIX + buf, _meta_shape(node), False))
    # backward placeholders: saved tensors -> the forward's value names they come from
    bmap: dict[str, str] = {}
    saved_out: dict[str, tuple[str, tuple, bool]] = {}  # bw input name -> (forward value, shape, batched)
    for ph, node in zip(bw_ph[:n_saved], saved_nodes):
        if node is None:
            continue
        if node.name in ph_by_name:
            bmap[ph.name] = ph_by_name[node.name]  # a graph input: the runtime feeds it again
        elif node is act_node:
            bmap[ph.name] = ACTIVATION
        else:
            name = "saved:" + node.name
            bmap[ph.name] = name
            shape = _meta_shape(node)
            saved_out[name] = (fconv.v(node), shape, _Converter.batched(shape))
    bmap[bw_ph[-1].name] = GRAD_ACTIVATION
    bconv = _Converter("b_")
    bw_outs = bconv.run(bw, bmap)
    # backward outputs: trainable parameter gradients
    b_outputs = []
    b_nodes = list(bconv.nodes)
    for i, pname in enumerate(pnames, start=1):
        o = bw_outs[i]
        if o is None:
            raise PortableExportError(f"no gradient for {pname}")
        b_nodes.append(helper.make_node("Identity", [bconv.v(o)], [GRAD_PREFIX + pname]))
        b_outputs.append(_value_info(GRAD_PREFIX + pname, tuple(client.get_parameter(pname).shape), False))
    bgraph = helper.make_graph(b_nodes, "splitedge_backward", [], b_outputs, initializer=bconv.inits)
    _prune(bgraph)
    used = {i for n in bgraph.node for i in n.input}
    # backward inputs: only what its nodes use
    b_inputs = []
    pshape = {INPUT: (TRACE_BATCH, *input_shape), ACTIVATION: act_shape}
    pshape.update({k: tuple(v.shape) for k, v in client.state_dict().items()})
    for name in bmap.values():
        if name not in used or any(i.name == name for i in b_inputs):
            continue
        if name in saved_out:
            _, shape, batched = saved_out[name]
        elif name == GRAD_ACTIVATION:
            shape, batched = act_shape, True
        else:
            shape = pshape[name]
            batched = name in (INPUT, ACTIVATION)
        b_inputs.append(_value_info(name, shape, batched))
    del bgraph.input[:]
    bgraph.input.extend(b_inputs)
    for name, (src, shape, batched) in saved_out.items():
        if name in used:
            alias(src, name)
            outputs.append(_value_info(name, shape, batched))
    f_inputs = [_value_info(INPUT, (TRACE_BATCH, *input_shape), True)]
    f_inputs += [_value_info(n, pshape[n], False) for n in pnames + bnames]
    fgraph = helper.make_graph(f_graph_nodes, "splitedge_forward_train", f_inputs, outputs, initializer=fconv.inits)
    _prune(fgraph)
    fmodel = _finish(fgraph, opset, ir_version, "forward_train.onnx")
    bmodel = _finish(bgraph, opset, ir_version, "backward.onnx")
    io = {
        "params": pnames,
        "buffers": bnames,
        "saved": [o.name for o in outputs if o.name.startswith("saved:")],
        "backward_inputs": [i.name for i in b_inputs],
    }
    return fmodel, bmodel, io


def write(directory: Path, client: nn.Module, input_shape: tuple[int, ...], *,
          opset: int, ir_version: int, log=lambda s: None) -> dict:
    """Writes the portable graphs and initial parameters into ``directory``; returns the manifest section."""
    if opset < DEFAULT_OPSET:
        raise PortableExportError(f"--opset {opset}: the portable graphs need opset {DEFAULT_OPSET} or later")
    log(f"deriving the portable forward and backward graphs (AOTAutograd, opset {opset}, IR {ir_version})")
    fmodel, bmodel, io = build_training_graphs(client, input_shape, opset=opset, ir_version=ir_version)
    imodel = build_inference_graph(client, input_shape, opset=opset, ir_version=ir_version)
    (directory / "client" / "portable").mkdir(parents=True, exist_ok=True)
    onnx.save(fmodel, str(directory / FILES["forward"]))
    onnx.save(bmodel, str(directory / FILES["backward"]))
    onnx.save(imodel, str(directory / FILES["inference"]))
    state = client.state_dict()
    arrays = {k: state[k].detach().cpu().numpy().astype(np.float32) for k in io["params"] + io["buffers"]}
    with open(directory / FILES["params"], "wb") as f:
        np.savez(f, **arrays)
    ops = sorted({n.op_type for m in (fmodel, bmodel, imodel) for n in m.graph.node})
    return {
        "files": dict(FILES),
        "opset": opset,
        "ir_version": ir_version,
        "route": "AOTAutograd joint graph (default partitioner) -> ATen-to-ONNX translation (export/portable.py)",
        "op_types": ops,
        "params": io["params"],
        "buffers": io["buffers"],
        "saved": io["saved"],
        "batchnorm": {"momentum": BN_MOMENTUM, "running_var": "unbiased"},
    }
