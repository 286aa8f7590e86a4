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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from .aten_onnx import TRACE_BATCH, PortableExportError, _Converter, _meta_shape

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
    b_inputs: list[onnx.ValueInfoProto] = []
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
