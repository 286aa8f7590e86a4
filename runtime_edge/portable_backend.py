"""The portable edge backend: the client half trained with plain ONNX graphs on any ONNX Runtime.

No torch and no ``onnxruntime.training``: two ``InferenceSession`` s run the graphs that
``export-client`` derives from the PyTorch module (``client/portable/``, see
``splitedge/export/portable.py``), and the optimizer runs in numpy. One split-learning step::

    a = model.forward(x)        # forward_train.onnx: activation + the tensors backward needs (cached)
    ... send a, receive g = dL/da ...
    model.train_step(x, g)      # backward.onnx on the cached tensors -> parameter gradients;
                                # BatchNorm running statistics committed; SGD/AdamW step in numpy

The forward runs once per step: ``train_step(x, g)`` reuses what the last ``forward(x)`` of the same
array object computed (a different array, or changed parameters, runs the forward again).

BatchNorm follows torch exactly: batch statistics in training, running statistics moved once per
step with momentum 0.1 and the *unbiased* batch variance (the ORT-training backend uses ONNX's
momentum 0.9 convention and the biased variance). The optimizers are torch's formulas:
``torch.optim.SGD`` (momentum, dampening 0, L2 weight decay) and ``torch.optim.AdamW`` (bias
correction, decoupled weight decay, eps 1e-8).

Checkpoints are ``.npz`` files (read with ``allow_pickle=False``) that record the backend; a
checkpoint of the ORT-training backend is refused with :class:`BackendMismatch`.

This module runs on CPython 3.8+ with numpy 1.17+ and onnxruntime 1.10+.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort

from ..export import manifest as mf
from .backend_errors import (BackendMismatch, CheckpointLoadError, ModelLoadError,  # noqa: F401 - re-exported
                             checkpoint_backend, mismatch_message)

log = logging.getLogger(__name__)

INPUT = "input"
ACTIVATION = "activation"
GRAD_ACTIVATION = "grad_activation"
NEW_PREFIX = "new:"
GRAD_PREFIX = "grad:"
CHECKPOINT_FORMAT = 1


def available_providers() -> List[str]:
    return list(ort.get_available_providers())


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    marker = "[ONNXRuntimeError] : "
    if marker in text:
        text = text.split(marker, 1)[1].split(" : ", 1)[-1]
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)


def _session_options(threads: Optional[int]) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


def _damaged(path: Path, e: BaseException) -> mf.ManifestError:
    return mf.ManifestError(f"{path} cannot be loaded by ONNX Runtime ({_reason(e)}): the artifacts are damaged; "
                            "re-export with export-client")


class _Optimizer:
    """torch.optim.SGD / torch.optim.AdamW on one flat float32 parameter vector."""

    def __init__(self, spec: Mapping, size: int, lr: float):
        self.name = str(spec.get("name", "sgd"))
        if self.name not in ("sgd", "adamw"):
            raise mf.ManifestError(f"unknown optimizer {self.name!r} in manifest.json")
        self.lr = float(lr)
        self.weight_decay = float(spec.get("weight_decay", 0.0))
        self.momentum = float(spec.get("momentum", 0.0))
        betas = spec.get("betas", (0.9, 0.999))
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(spec.get("eps", 1e-8))
        self.t = 0
        self.tmp = np.zeros(size, np.float32)
        self.state: Dict[str, np.ndarray] = {}
        if self.name == "sgd" and self.momentum:
            self.state["momentum_buffer"] = np.zeros(size, np.float32)
        if self.name == "adamw":
            self.state["exp_avg"] = np.zeros(size, np.float32)
            self.state["exp_avg_sq"] = np.zeros(size, np.float32)
            self.tmp2 = np.zeros(size, np.float32)

    def step(self, p: np.ndarray, g: np.ndarray) -> None:
        """One step; ``g`` is scratch (overwritten)."""
        lr, tmp = self.lr, self.tmp
        self.t += 1
        if self.name == "sgd":
            if self.weight_decay:
                np.multiply(p, self.weight_decay, out=tmp)
                g += tmp
            if self.momentum:
                buf = self.state["momentum_buffer"]
                if self.t == 1:
                    buf[...] = g
                else:
                    buf *= self.momentum
                    buf += g
                g = buf
            np.multiply(g, lr, out=tmp)
            p -= tmp
            return
        m, v, tmp2 = self.state["exp_avg"], self.state["exp_avg_sq"], self.tmp2
        if self.weight_decay:
            p *= np.float32(1.0 - lr * self.weight_decay)
        # exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        np.subtract(g, m, out=tmp)
        tmp *= np.float32(1.0 - self.beta1)
        m += tmp
        v *= np.float32(self.beta2)
        np.multiply(g, g, out=tmp)
        tmp *= np.float32(1.0 - self.beta2)
        v += tmp
        bc1 = 1.0 - self.beta1 ** self.t
        bc2_sqrt = (1.0 - self.beta2 ** self.t) ** 0.5
        # denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps; param.addcdiv_(exp_avg, denom, -lr / bc1)
        np.sqrt(v, out=tmp2)
        tmp2 /= np.float32(bc2_sqrt)
        tmp2 += np.float32(self.eps)
        np.divide(m, tmp2, out=tmp)
        tmp *= np.float32(lr / bc1)
        p -= tmp


class EdgeModel:
    """The client half on plain ONNX Runtime sessions (same interface as the ORT-training backend's)."""

    backend = "portable"

    def __init__(
        self,
        artifacts: str | os.PathLike[str],
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        threads: Optional[int] = None,
        lr: Optional[float] = None,
        inference_providers: Optional[Sequence[str]] = None,
        inference_provider_options: Optional[Sequence[dict]] = None,
        training_providers: Optional[Sequence[str]] = None,
        optimizer: Optional[Mapping] = None,
        verify: bool = True,
    ) -> None:
        self.dir = Path(artifacts)
        self.manifest = mf.load(self.dir, verify=verify)
        sec = self.manifest.portable
        if not sec:
            raise mf.ManifestError(
                f"{self.dir} holds no portable graphs (exported by an export-client without the portable backend): "
                "re-export with this export-client, or train with --backend ort-training")
        self.section = sec
        files = {k: self.dir / v for k, v in sec["files"].items()}
        if verify:
            unlisted = [v for v in sec["files"].values() if v not in self.manifest.files]
            if unlisted:
                raise mf.ManifestError(
                    f"{self.dir / mf.MANIFEST_NAME} lists no sha256 for {', '.join(unlisted)}, so these files cannot "
                    "be checked: the manifest is damaged or was edited; re-export with export-client")
        self.param_order = [str(n) for n in sec["params"]]  # trainable, in the flat vector's order
        self.buffer_names = [str(n) for n in sec["buffers"]]
        self.param_names = tuple(self.manifest.trainable_params) + tuple(self.manifest.frozen_params)
        self.input_shape = tuple(self.manifest.input_shape)
        self.activation_shape = tuple(self.manifest.activation_shape)
        self._threads = threads
        if training_providers is None:
            training_providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda"
                                  else ["CPUExecutionProvider"])
        self._training_providers = list(training_providers)
        self._fwd = self._session(files["forward"], self._training_providers)
        self._bwd = self._session(files["backward"], self._training_providers)
        self._fwd_outputs = [(o.name, list(o.shape)) for o in self._fwd.get_outputs()]
        self._bwd_inputs = [i.name for i in self._bwd.get_inputs()]
        self._bwd_outputs = [o.name for o in self._bwd.get_outputs()]

        initial = self._read_npz(files["params"], what="initial parameters")
        shapes = {n: tuple(initial[n].shape) for n in self.param_order + self.buffer_names if n in initial}
        missing = [n for n in self.param_order + self.buffer_names if n not in initial]
        if missing:
            raise mf.ManifestError(f"{files['params']} lacks {', '.join(missing[:5])}: re-export with export-client")
        self._shapes = shapes
        sizes = [int(np.prod(shapes[n])) for n in self.param_order]
        self._offsets = {}
        off = 0
        for n, s in zip(self.param_order, sizes):
            self._offsets[n] = (off, off + s)
            off += s
        self._flat = np.zeros(off, np.float32)
        self._grad = np.zeros(off, np.float32)
        self._acc: Optional[np.ndarray] = None  # gradients accumulated by train_step(step_optimizer=False)
        self._params = {n: self._flat[a:b].reshape(shapes[n]) for n, (a, b) in self._offsets.items()}
        self._grads = {n: self._grad[a:b].reshape(shapes[n]) for n, (a, b) in self._offsets.items()}
        self._buffers = {n: np.zeros(shapes[n], np.float32) for n in self.buffer_names}
        opt_spec = dict(optimizer or sec.get("optimizer") or {"name": self.manifest.optimizer.name, "lr": self.manifest.optimizer.lr,
                                                 "weight_decay": self.manifest.optimizer.weight_decay})
        self.optimizer = _Optimizer(opt_spec, off, float(lr if lr is not None else opt_spec.get("lr", 0.01)))
        self._load_values(initial)
        if checkpoint:
            self._load_checkpoint(Path(checkpoint), lr)
        self._version = 0
        # (x object, converted x, outputs dict, parameter version)
        self._cache: Optional[Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray], int]] = None
        self._outbuf: Dict[int, Dict[str, np.ndarray]] = {}
        self._inference_path = files["inference"]
        self._inference_providers = list(inference_providers or ["CPUExecutionProvider"])
        self._inference_provider_options = list(inference_provider_options or [{} for _ in self._inference_providers])
        self._infer_session = None
        # the inference session is created at the first evaluation: make sure now that the file loads
        try:
            probe = ort.SessionOptions()
            probe.log_severity_level = 3
            probe.intra_op_num_threads = 1
            probe.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            ort.InferenceSession(str(self._inference_path), sess_options=probe, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise _damaged(self._inference_path, e) from None

    # ---------------------------------------------------------------- loading

    def _session(self, path: Path, providers: List[str]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path), sess_options=_session_options(self._threads), providers=providers)
        except Exception as e:  # noqa: BLE001
            raise _damaged(path, e) from None

    @staticmethod
    def _read_npz(path: Path, what: str) -> Dict[str, np.ndarray]:
        try:
            with np.load(str(path), allow_pickle=False) as z:
                return {k: np.array(z[k]) for k in z.files}
        except Exception as e:  # noqa: BLE001 - a damaged file: zipfile, ValueError, OSError ...
            raise mf.ManifestError(f"{path} ({what}) cannot be read: {type(e).__name__}: {e}; "
                                   "re-export with export-client") from None

    def _load_values(self, values: Mapping[str, np.ndarray]) -> None:
        for n in self.param_order:
            self._params[n][...] = values[n]
        for n in self.buffer_names:
            self._buffers[n][...] = values[n]

    def _load_checkpoint(self, path: Path, lr: Optional[float]) -> None:
        written_by = checkpoint_backend(path)
        if written_by == "ort-training":
            raise BackendMismatch(mismatch_message(path, "ort-training", "portable"))
        try:
            with np.load(str(path), allow_pickle=False) as z:
                data = {k: np.array(z[k]) for k in z.files}
            meta = json.loads(str(data.pop("__meta__")))
        except Exception as e:  # noqa: BLE001
            raise CheckpointLoadError(f"{path} is not a readable portable edge checkpoint ({type(e).__name__}: {e})",
                                      path) from None
        if meta.get("backend") != "portable":
            raise BackendMismatch(mismatch_message(path, str(meta.get("backend")), "portable"))
        values = {}
        for n in self.param_order + self.buffer_names:
            key = "param/" + n
            if key not in data or tuple(data[key].shape) != self._shapes[n]:
                raise CheckpointLoadError(f"{path} does not fit these artifacts ({n} missing or of another shape)",
                                          path)
            values[n] = data[key]
        self._load_values(values)
        opt = self.optimizer
        if meta.get("optimizer") != opt.name:
            raise CheckpointLoadError(f"{path} holds {meta.get('optimizer')} state, the artifacts use {opt.name}", path)
        opt.t = int(meta.get("optimizer_steps", 0))
        for k in opt.state:
            arr = data.get("opt/" + k)
            if arr is not None and arr.shape == opt.state[k].shape:
                opt.state[k][...] = arr
            elif opt.t:
                raise CheckpointLoadError(f"{path} lacks the optimizer state {k}", path)
        if lr is None and "lr" in meta:
            opt.lr = float(meta["lr"])

    # ---------------------------------------------------------------- steps

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"input shape {tuple(x.shape)} does not match the exported (N, {', '.join(map(str, self.input_shape))})"
            )
        return x

    def _outputs(self, n: int) -> Dict[str, np.ndarray]:
        bufs = self._outbuf.get(n)
        if bufs is None:
            bufs = {name: np.empty([n if not isinstance(d, int) else d for d in shape], np.float32)
                    for name, shape in self._fwd_outputs if name != ACTIVATION}
            if len(self._outbuf) > 4:
                self._outbuf.clear()
            self._outbuf[n] = bufs
        return bufs

    def _run_forward(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        n = int(x.shape[0])
        outs = dict(self._outputs(n))
        outs[ACTIVATION] = np.empty((n, *self.activation_shape), np.float32)  # handed to the caller: fresh
        b = self._fwd.io_binding()
        b.bind_cpu_input(INPUT, x)
        for name, arr in self._params.items():
            b.bind_cpu_input(name, arr)
        for name, arr in self._buffers.items():
            b.bind_cpu_input(name, arr)
        for name, arr in outs.items():
            b.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        self._fwd.run_with_iobinding(b)
        return outs

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The train-mode forward (batch statistics); changes no state. Its saved tensors are kept for
        the next ``train_step`` of the same array."""
        xc = self._check_input(x)
        outs = self._run_forward(xc)
        self._cache = (x, xc, outs, self._version)
        return outs[ACTIVATION]

    def train_step(self, x: np.ndarray, grad: np.ndarray, *, step_optimizer: bool = True) -> np.ndarray:
        """Backward from ``grad`` = dL/d(activation), then one optimizer step. Returns the activation."""
        cache = self._cache
        if cache is not None and cache[0] is x and cache[3] == self._version:
            _, xc, outs, _ = cache
        else:
            xc = self._check_input(x)
            outs = self._run_forward(xc)
        self._cache = None
        grad = np.ascontiguousarray(grad, dtype=np.float32)
        expect = (xc.shape[0], *self.activation_shape)
        if grad.shape != expect:
            raise ValueError(f"gradient shape {grad.shape} does not match the activation shape {expect}")
        b = self._bwd.io_binding()
        for name in self._bwd_inputs:
            if name == INPUT:
                arr = xc
            elif name == GRAD_ACTIVATION:
                arr = grad
            elif name in outs:
                arr = outs[name]
            elif name in self._params:
                arr = self._params[name]
            else:
                arr = self._buffers[name]
            b.bind_cpu_input(name, arr)
        for name in self._bwd_outputs:
            arr = self._grads[name[len(GRAD_PREFIX):]]
            b.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        self._bwd.run_with_iobinding(b)
        for name in self.buffer_names:  # torch moves the running statistics once per train-mode forward
            self._buffers[name][...] = outs[NEW_PREFIX + name]
        if self._acc is not None:
            self._grad += self._acc
        if step_optimizer:
            self._acc = None
            self.optimizer.step(self._flat, self._grad)
        else:
            self._acc = self._grad.copy()
        self._version += 1
        return outs[ACTIVATION]

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Evaluation forward with BatchNorm on running statistics and the current weights."""
        x = self._check_input(x)
        feeds = {INPUT: x}
        feeds.update(self._params)
        feeds.update(self._buffers)
        return self._inference_session().run([ACTIVATION], feeds)[0]

    def _inference_session(self) -> ort.InferenceSession:
        if self._infer_session is None:
            try:
                self._infer_session = ort.InferenceSession(
                    str(self._inference_path), sess_options=_session_options(self._threads),
                    providers=self._inference_providers, provider_options=self._inference_provider_options)
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"ONNX Runtime cannot create a session of {self._inference_path} with "
                                     f"{', '.join(self._inference_providers)} ({_reason(e)})",
                                     self._inference_path) from None
        return self._infer_session

    @property
    def inference_providers_in_use(self) -> List[str]:
        return self._inference_session().get_providers()

    # ---------------------------------------------------------------- weights

    @property
    def lr(self) -> float:
        return float(self.optimizer.lr)

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.lr = float(value)

    def get_parameters(self, trainable_only: bool = False) -> Dict[str, np.ndarray]:
        names = self.manifest.trainable_params if trainable_only else self.param_names
        out = {}
        for n in names:
            src = self._params.get(n)
            out[n] = np.array(src if src is not None else self._buffers[n], copy=True)
        return out

    def set_parameters(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrites parameters (e.g. after FedAvg). Unknown names or shapes raise ValueError."""
        for n, v in values.items():
            if n not in self._shapes:
                raise ValueError(f"unknown parameter {n!r}")
            if tuple(np.shape(v)) != self._shapes[n]:
                raise ValueError(f"parameter {n}: shape {np.shape(v)} does not match {self._shapes[n]}")
        for n, v in values.items():
            target = self._params.get(n)
            (target if target is not None else self._buffers[n])[...] = np.asarray(v, dtype=np.float32)
        self._version += 1

    def save_checkpoint(self, path: str | os.PathLike[str], include_optimizer_state: bool = True) -> None:
        """Writes an npz checkpoint atomically (temporary file, fsync, rename)."""
        path = Path(path)
        opt = self.optimizer
        meta = {"backend": self.backend, "format": CHECKPOINT_FORMAT, "optimizer": opt.name, "lr": opt.lr,
                "optimizer_steps": opt.t if include_optimizer_state else 0, "model": self.manifest.model,
                "cut": self.manifest.cut}
        arrays = {"__meta__": np.array(json.dumps(meta, sort_keys=True))}
        for n in self.param_order:
            arrays["param/" + n] = self._params[n]
        for n in self.buffer_names:
            arrays["param/" + n] = self._buffers[n]
        if include_optimizer_state:
            for k, v in opt.state.items():
                arrays["opt/" + k] = v
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dfd = os.open(str(path.parent), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            if tmp.exists():
                tmp.unlink()
