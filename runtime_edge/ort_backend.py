"""The client sub-model on ONNX Runtime: the one place the edge imports onnxruntime.

(The ``onnxruntime-training`` wheels import torch when ``onnxruntime`` is imported;
keeping every onnxruntime import in this module keeps that cost out of the codecs,
the wire protocol and the data loaders, which stay numpy/pyzmq only.)

One split-learning step on the edge, as :class:`EdgeModel` runs it::

    a = model.forward(x)            # eval_model.onnx: train-mode forward, BN stats untouched
    ... send a, receive g = dL/da ...
    model.train_step(x, g)          # training_model.onnx: loss = sum(a * g); backward; SGD/AdamW step

The two forward passes compute bit-identical activations (checked by the tests):
ORT's training API cannot start backward from an external gradient, so the
activation must exist before the server's gradient does.

BatchNorm running statistics move once per :meth:`EdgeModel.train_step`, with
ONNX semantics: ``running = momentum * running + (1 - momentum) * batch`` with
``momentum = 0.9`` (torch's 0.1) and the *biased* batch variance (torch's
running_var uses the unbiased one, a factor n/(n-1) on the update).
:meth:`EdgeModel.infer` evaluates with the running statistics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..export import manifest as mf


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Holds back Ctrl-C until the block is done, then raises KeyboardInterrupt.

    Importing onnxruntime's training build takes seconds (it imports torch). A KeyboardInterrupt
    in the middle of it can land inside a C extension's module initialisation, which aborts the
    process ("terminate called after throwing an instance of 'pybind11::error_already_set'"), or
    leave torch half-imported with its exit hooks registered but its loggers not yet quietened
    (they then print "FakeTensor cache stats" at exit).
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


with _sigint_deferred():
    import onnxruntime as ort
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

log = logging.getLogger(__name__)

ort.set_default_logger_severity(3)  # ORT's INFO/WARNING graph-transformer chatter is not for users

INPUT = "input"
GRAD_INPUT = "grad_activation"


from .backend_errors import (BackendMismatch, CheckpointLoadError, ModelLoadError,  # noqa: E402,F401 - re-exported
                             checkpoint_backend, mismatch_message)


def ort_reason(e: BaseException) -> str:
    """ONNX Runtime's own words from one of its exceptions, on one line and without the C++ source location."""
    text = " ".join(str(e).split())
    m = re.search(r"\[ONNXRuntimeError\] : \d+ : (.*)", text)
    if m:
        text = m.group(1)
    text = text.replace(" : ", ": ", 1)
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def _session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT's worker threads spin after each run by default; the edge encodes right after its
    # forward, so spinning threads slowed the codecs 2-3x on a 2-core machine (and the step too)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


class EdgeModel:
    """Loads ``DIR/client`` and trains it with an injected activation gradient."""

    backend = "ort-training"

    def __init__(
        self,
        artifacts: str | os.PathLike[str],
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        threads: int | None = None,
        lr: float | None = None,
        inference_providers: Sequence[str] | None = None,
        inference_provider_options: Sequence[dict] | None = None,
        verify: bool = True,
    ) -> None:
        self.dir = Path(artifacts)
        self.manifest = mf.load(self.dir, verify=verify)
        if verify:
            # mf.load checks the files manifest.json lists: one it does not list is not checked at all
            unlisted = [f for f in mf.CLIENT_FILES if f not in self.manifest.files]
            if unlisted:
                raise mf.ManifestError(
                    f"{self.dir / mf.MANIFEST_NAME} lists no sha256 for {', '.join(unlisted)}, so these files cannot "
                    "be checked: the manifest is damaged or was edited; re-export with export-client")
        opt = (self.manifest.portable or {}).get("optimizer") or {}
        if opt.get("momentum"):
            raise mf.ManifestError(
                f"{self.dir} was exported with SGD momentum {opt['momentum']:g}: ONNX Runtime training's SGD has no "
                "momentum; train these artifacts with --backend portable (or re-export without --momentum)")
        client = self.dir / "client"
        ckpt = Path(checkpoint) if checkpoint else client / "checkpoint"
        if checkpoint and checkpoint_backend(ckpt) == "portable":
            raise BackendMismatch(mismatch_message(ckpt, "portable", "ort-training"))
        try:
            self.state = CheckpointState.load_checkpoint(str(ckpt))
        except Exception as e:  # ORT raises RuntimeError or its own Exception subclasses
            if checkpoint:
                raise CheckpointLoadError(f"{ckpt} cannot be loaded by ONNX Runtime ({ort_reason(e)})", ckpt) from None
            raise _damaged(ckpt, e) from None
        self._options = _session_options(threads)
        try:
            self.module = Module(
                str(client / "training_model.onnx"),
                self.state,
                str(client / "eval_model.onnx"),
                device=device,
                session_options=self._options,
            )
        except Exception as e:
            named = [f for f in ("training_model.onnx", "eval_model.onnx") if f in str(e)]
            if named:
                raise _damaged(client / named[0], e) from None
            if checkpoint:  # the models parse: the checkpoint does not fit them
                raise CheckpointLoadError(f"{ckpt} does not fit {client / 'training_model.onnx'} "
                                          f"({ort_reason(e)})", ckpt) from None
            raise _damaged(client / "training_model.onnx", e) from None
        try:
            self.optimizer = Optimizer(str(client / "optimizer_model.onnx"), self.module)
        except Exception as e:
            raise _damaged(client / "optimizer_model.onnx", e) from None
        self.optimizer.set_learning_rate(float(lr if lr is not None else self.manifest.optimizer.lr))
        self.param_names = tuple(self.manifest.trainable_params) + tuple(self.manifest.frozen_params)
        self._inference_model = client / "inference_model.onnx"
        self._inference_providers = list(inference_providers or ["CPUExecutionProvider"])
        self._inference_provider_options = list(inference_provider_options or [{} for _ in self._inference_providers])
        self._infer_session: ort.InferenceSession | None = None
        self._infer_version = -1
        self._version = 0  # bumped whenever parameters change
        self.input_shape = tuple(self.manifest.input_shape)
        self.activation_shape = tuple(self.manifest.activation_shape)
        # the inference session is created at the first evaluation, after training: make sure now that
        # the file loads at all (on the CPU, unoptimised: cheap), not after the training it would end
        try:
            probe = ort.SessionOptions()
            probe.log_severity_level = 3
            probe.intra_op_num_threads = 1
            probe.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            ort.InferenceSession(str(self._inference_model), sess_options=probe, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise _damaged(self._inference_model, e) from None

    # ---------------------------------------------------------------- steps

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"input shape {tuple(x.shape)} does not match the exported (N, {', '.join(map(str, self.input_shape))})"
            )
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The train-mode forward (batch statistics); does not change any state."""
        x = self._check_input(x)
        self.module.eval()
        return self.module(x)

    def train_step(self, x: np.ndarray, grad: np.ndarray, *, step_optimizer: bool = True) -> np.ndarray:
        """Backward from ``grad`` = dL/d(activation), then one optimizer step. Returns the activation."""
        x = self._check_input(x)
        grad = np.ascontiguousarray(grad, dtype=np.float32)
        expect = (x.shape[0], *self.activation_shape)
        if grad.shape != expect:
            raise ValueError(f"gradient shape {grad.shape} does not match the activation shape {expect}")
        self.module.train()
        _, act = self.module(x, grad)
        if step_optimizer:
            self.optimizer.step()
            self.module.lazy_reset_grad()
        self._version += 1
        return act

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Evaluation forward with BatchNorm on running statistics and the current weights."""
        x = self._check_input(x)
        return self._inference_session().run(None, {INPUT: x})[0]

    def _inference_session(self) -> ort.InferenceSession:
        if self._infer_session is None or self._infer_version != self._version:
            so = _session_options(self._options.intra_op_num_threads or None)
            # ORT 1.19 ignores add_initializer() overrides once graph optimisations fold or fuse
            # the original initializers (seen with BatchNormalization); at ORT_DISABLE_ALL the
            # current weights are used, as the tests check.
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            # keep the arrays and OrtValues alive as long as the session: ORT does not copy them
            self._infer_arrays = {k: np.ascontiguousarray(v) for k, v in self.get_parameters().items()}
            self._infer_values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self._infer_arrays.items()}
            for k, v in self._infer_values.items():
                so.add_initializer(k, v)
            try:
                self._infer_session = ort.InferenceSession(
                    str(self._inference_model),
                    sess_options=so,
                    providers=self._inference_providers,
                    provider_options=self._inference_provider_options,
                )
            except Exception as e:
                raise ModelLoadError(f"ONNX Runtime cannot create a session of {self._inference_model} with "
                                     f"{', '.join(self._inference_providers)} ({ort_reason(e)})",
                                     self._inference_model) from None
            self._infer_version = self._version
        return self._infer_session

    @property
    def inference_providers_in_use(self) -> list[str]:
        return self._inference_session().get_providers()

    # ---------------------------------------------------------------- weights

    @property
    def lr(self) -> float:
        return float(self.optimizer.get_learning_rate())

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.set_learning_rate(float(value))

    def get_parameters(self, trainable_only: bool = False) -> dict[str, np.ndarray]:
        names = self.manifest.trainable_params if trainable_only else self.param_names
        return {n: np.array(self.state.parameters[n].data, copy=True) for n in names}

    def set_parameters(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrites parameters (e.g. after FedAvg). Unknown names or shapes raise ValueError."""
        current = {n: self.state.parameters[n].data for n in self.param_names}
        for n, v in values.items():
            if n not in current:
                raise ValueError(f"unknown parameter {n!r}")
            if tuple(np.shape(v)) != current[n].shape:
                raise ValueError(f"parameter {n}: shape {np.shape(v)} does not match {current[n].shape}")
        for n, v in values.items():
            arr = np.ascontiguousarray(v, dtype=np.float32)
            self.state.parameters[n] = arr
        self._version += 1

    def save_checkpoint(self, path: str | os.PathLike[str], include_optimizer_state: bool = True) -> None:
        """Writes an ORT checkpoint atomically (write to a temporary file, fsync, rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            CheckpointState.save_checkpoint(self.state, str(tmp), include_optimizer_state=include_optimizer_state)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            if tmp.exists():
                tmp.unlink()


def _damaged(path: Path, e: BaseException) -> mf.ManifestError:
    """An artifact file whose checksum matches manifest.json but that ONNX Runtime cannot load."""
    return mf.ManifestError(f"{path} cannot be loaded by ONNX Runtime ({ort_reason(e)}): the artifacts are damaged; "
                            "re-export with export-client")
