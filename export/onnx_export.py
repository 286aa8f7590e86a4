"""Export of the client sub-model as ONNX Runtime on-device training artifacts.

The construction (verified on ORT 1.19.2, see docs/export.md):

1. The client part is exported with torch's legacy exporter in training mode,
   ``do_constant_folding=False`` and opset 17, so BatchNorm keeps its training
   form and every initializer keeps its torchvision parameter name. The exporter
   runs the model once in train mode, which would move BatchNorm running
   statistics: the state is snapshotted before and restored after.
2. ORT's training API cannot start backward from an external gradient, so the
   "loss" is ``ReduceSum(activation * grad_activation)`` with ``grad_activation``
   an extra graph input. Its parameter gradients are exactly the vector-Jacobian
   product the client needs from the server's gradient.
3. BatchNorm running statistics are frozen parameters; everything else requires
   gradients.
4. ``eval_model.onnx`` is rewritten into the train-mode forward (BatchNorm on
   batch statistics, ``momentum=1`` so the running statistics stay untouched, the
   loss and its ``grad_activation`` input removed): its output is bit-identical to
   the activation the train step computes. ``inference_model.onnx`` is the
   eval-mode forward (running statistics) for evaluation and for inference-only
   providers (TensorRT, CANN).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import warnings
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from . import manifest as mf
from . import portable, split, zoo

OPSET = 17
ACTIVATION = "activation"
INPUT = "input"
GRAD_INPUT = "grad_activation"


class ExportError(Exception):
    """Bad export request (reported to the user, exit code 2)."""


@dataclass(frozen=True)
class ExportRequest:
    model: str
    cut: str | int
    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    optimizer: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 0.0
    out: str | None = None
    force: bool = False
    weights: str | None = None
    seed: int = 0
    momentum: float = 0.0  # SGD momentum (the portable backend; ORT's SGD has none)
    opset: int = 13  # opset of the portable graphs (client/portable/)
    #: which backends' files to write; the ORT-training artifacts are skipped without "ort-training"
    backends: tuple[str, ...] = ("ort-training", "portable")


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """Reads a ``state_dict`` from safetensors, or from a torch file without executing pickled code."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"--weights {path}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, i.e. running the file's code: never here
        tail = str(e).split("WeightsUnpickler error:", 1)[-1]
        detail = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "unreadable").split(". Please use")[0]
        raise ExportError(
            f"--weights {path}: not a torch state_dict file that loads without executing code ({detail[:200]}); "
            "save the weights with torch.save(model.state_dict(), PATH) or as .safetensors") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is a user error here
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(f"--weights {path}: not a readable torch or safetensors weights file "
                          f"({type(e).__name__}: {first[:200]}); save the weights with "
                          "torch.save(model.state_dict(), PATH) or as .safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"--weights {path}: not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"--out {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / mf.MANIFEST_NAME).is_file():
        # --force replaces artifacts, never a directory export-client did not write (a mistyped --out)
        raise ExportError(f"--out {out} is not empty and holds no {mf.MANIFEST_NAME}: not an artifact directory, "
                          "refusing to replace it even with --force")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ExportError(f"--out {out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: {probe} is not writable")


class _InjectedGradLoss:
    """``loss = ReduceSum(activation * grad_activation)`` as an onnxblock."""

    def __new__(cls):  # built lazily so importing this module does not import ORT
        from onnxruntime.training import onnxblock

        class Loss(onnxblock.Block):
            def __init__(self):
                super().__init__()
                self._grad = onnxblock.blocks.InputLike(ACTIVATION)
                self._mul = onnxblock.blocks.Mul()
                self._sum = onnxblock.blocks.ReduceSum(keepdims=False)

            def build(self, activation_name: str):
                return self._sum(self._mul(activation_name, self._grad(GRAD_INPUT)))

        return Loss()


def _torch_export(part: nn.Module, sample: torch.Tensor, training: bool, opset: int = OPSET) -> onnx.ModelProto:
    state = {k: v.clone() for k, v in part.state_dict().items()}
    buf = io.BytesIO()
    part.train(training)
    try:
        with warnings.catch_warnings():
            # "Removing mutation from node aten::add_ on block input: 'bn1.num_batches_tracked'":
            # expected, ORT does not track that counter
            warnings.filterwarnings("ignore", message=".*num_batches_tracked.*")
            # the legacy exporter is chosen on purpose (the dynamo one exports BN in inference form)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                part,
                (sample,),
                buf,  # type: ignore[arg-type]  # the legacy exporter writes to a file object; torch's stub omits it
                input_names=[INPUT],
                output_names=[ACTIVATION],
                dynamic_axes={INPUT: {0: "batch"}, ACTIVATION: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=False,
                training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL,
                export_params=True,
                dynamo=False,
            )
    finally:
        part.load_state_dict(state)  # the exporter ran a train-mode forward: undo its BN updates
    proto = onnx.load_from_string(buf.getvalue())
    g = proto.graph
    # The exporter deduplicates equal initializers (a fresh BatchNorm's running_var equals its
    # weight) into `Identity(other)` nodes: undo that, so every parameter is an initializer under
    # its own name and can be replaced by name (the edge swaps in current weights for inference).
    init_names = {i.name for i in g.initializer}
    aliases = [n for n in g.node if n.op_type == "Identity" and n.output[0] in state and n.input[0] in init_names]
    for n in aliases:
        g.node.remove(n)
        g.initializer.append(onnx.TensorProto(name=n.output[0]))
    # ...and the initializers it captured may carry the forward's BN updates: write the snapshot back
    for init in g.initializer:
        if init.name in state:
            init.CopyFrom(onnx.numpy_helper.from_array(state[init.name].numpy(), init.name))
    return proto


def _patch_eval_model(path: Path) -> None:
    """Turns the generated eval model into the train-mode forward that leaves BN statistics alone."""
    m = onnx.load(str(path))
    g = m.graph
    for node in g.node:
        if node.op_type == "BatchNormalization":
            attrs = {a.name: a for a in node.attribute}
            for name, val in (("training_mode", 1), ("momentum", 1.0)):
                if name in attrs:
                    node.attribute.remove(attrs[name])
                node.attribute.append(onnx.helper.make_attribute(name, val))
    # drop the loss: keep only what `activation` needs, and the grad_activation input
    keep = {ACTIVATION}
    nodes = []
    for node in reversed(list(g.node)):
        if any(o in keep for o in node.output):
            nodes.append(node)
            keep.update(i for i in node.input if i)
    nodes.reverse()
    del g.node[:]
    g.node.extend(nodes)
    outs = [o for o in g.output if o.name == ACTIVATION]
    del g.output[:]
    g.output.extend(outs)
    ins = [i for i in g.input if i.name != GRAD_INPUT]
    del g.input[:]
    g.input.extend(ins)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


@contextlib.contextmanager
def _native_stderr_captured():
    """Redirects file descriptor 2 (native code's stderr) to a temporary file.

    What was captured is replayed if the block raises, so nothing useful is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as cap:
        os.dup2(cap.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            cap.seek(0)
            sys.stderr.write(cap.read().decode(errors="replace")[-20000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_SCHEMAS_REGISTERED = False


def register_ort_training_schemas() -> None:
    """Teaches the onnx checker the gradient ops ORT puts in the *default* ONNX domain.

    ORT's gradient builder emits ``MaxPoolGrad`` in the default domain (its other
    gradient ops live in ``com.microsoft``, which the checker does not know and
    skips). The schema registered here is the one ORT defines in
    ``orttraining/core/graph/training_op_defs.cc`` (since version 9: inputs dY:T,
    Indices:int64, output dX:T, MaxPool's attributes), so the checker validates
    the training graph like any other instead of rejecting it.
    """
    global _SCHEMAS_REGISTERED
    if _SCHEMAS_REGISTERED:
        return
    from onnx import defs

    try:
        defs.get_schema("MaxPoolGrad", OPSET, "")
    except defs.SchemaError:
        P = defs.OpSchema.FormalParameter
        A = defs.OpSchema.Attribute
        T = defs.OpSchema.AttrType
        attrs = [
            A("auto_pad", T.STRING, "", required=False),
            A("ceil_mode", T.INT, "", required=False),
            A("dilations", T.INTS, "", required=False),
            A("kernel_shape", T.INTS, "", required=False),
            A("pads", T.INTS, "", required=False),
            A("storage_order", T.INT, "", required=False),
            A("strides", T.INTS, "", required=False),
        ]
        defs.register_schema(
            defs.OpSchema(
                "MaxPoolGrad", "", 9, "ORT training: gradient of MaxPool",
                inputs=[P("dY", "T", "gradient of Y"), P("Indices", "I", "indices from MaxPool")],
                outputs=[P("dX", "T", "gradient of X")],
                type_constraints=[
                    ("T", ["tensor(float16)", "tensor(float)", "tensor(double)"], ""),
                    ("I", ["tensor(int64)"], ""),
                ],
                attributes=attrs,
            )
        )
    _SCHEMAS_REGISTERED = True


def _versions() -> dict[str, str]:
    import onnxruntime

    import splitedge

    return {
        "splitedge": splitedge.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def prepare(req: ExportRequest) -> tuple[nn.Module, int, list[split.CutInfo], list[str]]:
    """Validates a request and builds the model; raises ExportError before anything is written."""
    try:
        zoo.spec(req.model)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if req.optimizer not in ("sgd", "adamw"):
        raise ExportError(f"unknown optimizer {req.optimizer!r}; choose sgd or adamw")
    if not (req.lr > 0 and np.isfinite(req.lr)):
        raise ExportError(f"--lr must be a positive number, got {req.lr}")
    if req.weight_decay < 0:
        raise ExportError(f"--weight-decay must be >= 0, got {req.weight_decay}")
    if not (0 <= req.momentum < 1):
        raise ExportError(f"--momentum must be in [0, 1), got {req.momentum}")
    if req.momentum and req.optimizer != "sgd":
        raise ExportError("--momentum is SGD's; AdamW has betas instead")
    if not (portable.DEFAULT_OPSET <= req.opset <= portable.MAX_OPSET):
        raise ExportError(f"--opset {req.opset}: choose {portable.DEFAULT_OPSET} to {portable.MAX_OPSET} "
                          f"({portable.DEFAULT_OPSET} is what TensorRT 8.2, Ascend ATC and ONNX Runtime 1.10+ accept)")
    torch.manual_seed(req.seed)
    model = zoo.build(req.model, req.num_classes, req.input_shape[0])
    notes: list[str] = []
    if req.weights:
        try:
            notes = zoo.load_weights(model, req.model, load_state_file(req.weights))
        except ValueError as e:
            raise ExportError(f"--weights {req.weights}: {e}") from None
    units = zoo.cut_units(req.model, model)
    try:
        n_edge = split.resolve_cut(units, req.cut)
        infos = split.trace_cuts(req.model, model, req.input_shape)
    except ValueError as e:
        raise ExportError(str(e)) from None
    return model, n_edge, infos, notes


def default_out(model: str, n_edge: int) -> str:
    return os.path.join("artifacts", f"{model}-cut{n_edge}")


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("can't allocate memory", "not enough memory")))


def export(req: ExportRequest, log: Callable[[str], None] = lambda s: None) -> tuple[Path, mf.Manifest]:
    """Exports and returns (artifact directory, manifest). Atomic: all or nothing."""
    try:
        return _export(req, log)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise ExportError(f"out of memory building {req.model} for input shape "
                          f"{'x'.join(map(str, req.input_shape))} and {req.num_classes} classes: are --input-shape "
                          "and --num-classes what you meant?") from None


def _export(req: ExportRequest, log: Callable[[str], None]) -> tuple[Path, mf.Manifest]:
    model, n_edge, infos, notes = prepare(req)
    for n in notes:
        log(f"weights: {n}")
    out = Path(req.out or default_out(req.model, n_edge))
    _check_out(out, req.force)
    cut = infos[n_edge - 1]
    client, server = split.split(req.model, model, n_edge)

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write there ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        trainable, frozen, portable_section = _write_artifacts(tmp, req, client, server, log)
        m = mf.Manifest(
            model=req.model,
            cut=n_edge,
            cut_name=cut.name,
            input_shape=tuple(req.input_shape),
            activation_shape=cut.activation_shape,
            num_classes=req.num_classes,
            optimizer=mf.Optimizer(req.optimizer, float(req.lr), float(req.weight_decay)),
            opset=OPSET,
            trainable_params=tuple(trainable),
            frozen_params=tuple(frozen),
            versions=_versions(),
            files={rel: mf.sha256_file(tmp / rel)
                   for rel in (*mf.CLIENT_FILES, *portable_section["files"].values(), mf.SERVER_WEIGHTS)
                   if (tmp / rel).is_file()},
            seed=req.seed,
            weights=os.path.abspath(req.weights) if req.weights else None,
            extra={"edge_params": cut.edge_params, "weight_notes": notes},
            portable=portable_section,
        )
        (tmp / mf.MANIFEST_NAME).write_text(m.to_json())
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, m


def _replace_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_artifacts(
    tmp: Path, req: ExportRequest, client: nn.Module, server: nn.Module, log: Callable[[str], None]
) -> tuple[list[str], list[str], dict]:
    """Writes client/ and server/ into ``tmp``; returns (trainable, frozen) parameter names and the
    manifest's ``portable`` section."""
    import onnxruntime
    from safetensors.torch import save_file

    onnxruntime.set_default_logger_severity(3)

    (tmp / "client").mkdir()
    (tmp / "server").mkdir()
    sample = torch.randn(2, *req.input_shape)

    ort_training = "ort-training" in req.backends
    if ort_training:
        log("exporting the client part to ONNX (training form)")
        train_proto = _torch_export(client, sample, training=True)
    log("exporting the client part to ONNX (inference form)")
    infer_proto = _torch_export(client, sample, training=False)
    onnx.checker.check_model(infer_proto)
    onnx.save(infer_proto, str(tmp / "client" / "inference_model.onnx"))

    init_names = {i.name for i in (train_proto if ort_training else infer_proto).graph.initializer}
    named = dict(client.named_parameters())
    buffers = {k for k, _ in client.named_buffers() if not k.endswith("num_batches_tracked")}
    trainable = [k for k in named if k in init_names]
    frozen = [k for k in buffers if k in init_names]
    missing = (set(named) | buffers) - init_names
    if missing:
        raise RuntimeError(f"ONNX export renamed or dropped parameters: {sorted(missing)[:5]}")
    if not trainable:
        raise ExportError("the client part has no trainable parameters at this cut; choose a later --cut")

    if ort_training:
        _write_ort_training(tmp, req, train_proto, trainable, frozen, log)
    section = _write_portable(tmp, req, client, sample, log)

    log("saving the server part's weights")
    sd = {k: v.detach().contiguous().clone() for k, v in server.state_dict().items()}
    save_file(sd, str(tmp / mf.SERVER_WEIGHTS), metadata={"model": req.model, "cut": str(req.cut)})
    return trainable, frozen, section


def _write_ort_training(tmp: Path, req: ExportRequest, train_proto: onnx.ModelProto, trainable: list[str],
                        frozen: list[str], log: Callable[[str], None]) -> None:
    from onnxruntime.training import artifacts as ort_artifacts
    from onnxruntime.training import onnxblock

    log("generating ORT training artifacts (gradient graph, optimizer, checkpoint)")
    if req.optimizer == "sgd":
        opt_block = onnxblock.optim.SGD()
    else:
        opt_block = onnxblock.optim.AdamW(weight_decay=req.weight_decay)
    with _native_stderr_captured():  # ORT's gradient builder logs every graph pass at INFO level
        ort_artifacts.generate_artifacts(
            train_proto,
            requires_grad=trainable,
            frozen_params=frozen,
            loss=_InjectedGradLoss(),
            optimizer=opt_block,
            artifact_directory=str(tmp / "client"),
            additional_output_names=[ACTIVATION],
        )
    _patch_eval_model(tmp / "client" / "eval_model.onnx")
    register_ort_training_schemas()
    for name in ("training_model.onnx", "optimizer_model.onnx", "inference_model.onnx"):
        onnx.checker.check_model(str(tmp / "client" / name))


def _write_portable(tmp: Path, req: ExportRequest, client: nn.Module, sample: torch.Tensor,
                    log: Callable[[str], None]) -> dict:
    try:
        section = portable.write(tmp, client, tuple(req.input_shape), opset=req.opset,
                                 ir_version=portable.ir_version_for(req.opset), log=log)
    except portable.PortableExportError as e:
        raise ExportError(f"{req.model} cut {req.cut}: the portable graphs cannot be built: {e}") from None
    section["optimizer"] = portable.optimizer_section(req.optimizer, req.lr, req.weight_decay, req.momentum)
    return section
