"""The server sub-model in PyTorch: one shared model trained by every client's batches.

Clients' steps are applied one at a time in arrival order to one model and one
optimizer (split-federated learning with a shared server part, "SFLV2"). The loss
is the batch-mean cross-entropy; its gradient with respect to the received
activation is what the cloud returns (after the codec's backward rule).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..export import manifest as mf
from ..export import split, zoo
from ..fsutil import BadFile, load_json_object

OPTIMIZERS = ("sgd", "adam", "adamw")


class CorruptFile(BadFile):
    """A file the server model reads (artifact weights, a checkpoint's files) is missing, unreadable
    or does not hold what it should; the message names the file."""


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file ``path``; :class:`CorruptFile` if it is missing or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CorruptFile(path, "missing") from None
    except (SafetensorError, OSError) as e:
        raise CorruptFile(path, f"not a readable safetensors file ({e})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # weights or optimizer state that would make every step NaN, silently
        raise CorruptFile(path, f"tensor {bad[0]!r}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} holds "
                                "NaN or Inf")
    return tensors


def read_json_object(path: str | Path) -> dict:
    """The JSON object in file ``path`` (bounded size and depth, finite numbers); :class:`CorruptFile`
    if it is missing, unreadable or not one."""
    try:
        return load_json_object(path)
    except BadFile as e:
        raise CorruptFile(e.path, e.why) from None


def _check_tensors(path: Path, got: dict[str, torch.Tensor], expect: dict[str, torch.Tensor], what: str) -> None:
    """CorruptFile unless ``got`` has exactly the names and shapes of ``expect`` (one line, not torch's list)."""
    missing = [k for k in expect if k not in got]
    extra = [k for k in got if k not in expect]
    shapes = [k for k in expect if k in got and tuple(got[k].shape) != tuple(expect[k].shape)]
    if missing or extra or shapes:
        parts = [f"{len(v)} {name} (e.g. {v[0]!r})" for name, v in
                 (("missing", missing), ("unexpected", extra), ("of another shape", shapes)) if v]
        raise CorruptFile(path, f"does not hold the weights of {what}: tensors {', '.join(parts)}")


def _check_param_groups(groups: list) -> None:
    """ValueError/TypeError unless ``groups`` are optimizer parameter groups with settings in range
    (numbers are finite already: the JSON loader refuses NaN and Infinity)."""
    ranges = {"lr": (0.0, 1e6), "momentum": (0.0, 1.0), "weight_decay": (0.0, 1e6), "dampening": (0.0, 1.0),
              "eps": (0.0, 1.0)}
    for g in groups:
        if not (isinstance(g, dict) and isinstance(g.get("params"), list)):
            raise TypeError("a parameter group without params")
        for k, (lo, hi) in ranges.items():
            v = g.get(k)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi):
                raise ValueError(f"{k} {v!r} is out of range {lo:g}..{hi:g}")


class StepRefused(ValueError):
    """A batch the server model did not train on; weights, optimizer state and BatchNorm
    statistics are as they were before it."""

    def __init__(self, message: str, *, not_finite: bool = False):
        super().__init__(message)
        self.not_finite = not_finite


@dataclass
class StepResult:
    loss: float
    correct: int
    grad: np.ndarray  # dL/d(activation), float32, the activation's shape


def check_device(name: str) -> torch.device:
    """The torch device ``name`` (cpu, cuda, cuda:N, mps) if this machine has it, else ValueError saying why."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no usable GPU"
            raise ValueError(f"device {name}: CUDA is not available here (torch {torch.__version__}, {built}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"device {name}: the cloud runs on cpu, cuda[:N] or mps, not {dev.type}")
    return dev


class ServerModel:
    def __init__(
        self,
        artifacts: str | Path,
        manifest: mf.Manifest,
        *,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        device: str = "cpu",
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        self.manifest = manifest
        self.device = check_device(device)
        full = zoo.build(manifest.model, manifest.num_classes, manifest.input_shape[0])
        _, server = split.split(manifest.model, full, manifest.cut)
        self.what = f"{manifest.model} cut {manifest.cut} (server part)"
        path = Path(artifacts) / mf.SERVER_WEIGHTS
        if mf.SERVER_WEIGHTS not in manifest.files:  # checked like the edge's files: an unlisted file is unchecked
            raise CorruptFile(Path(artifacts) / mf.MANIFEST_NAME,
                              f"lists no sha256 for {mf.SERVER_WEIGHTS}, so it cannot be checked: the manifest is "
                              "damaged or was edited; re-export with export-client")
        try:
            state = load_tensors(path)
            _check_tensors(path, state, server.state_dict(), self.what)
        except CorruptFile as e:
            raise CorruptFile(e.path, f"{e.why}; the artifacts are damaged: export them again with export-client") \
                from None
        server.load_state_dict(state, strict=True)
        self.model = server.to(self.device).train()
        params = list(self.model.parameters())
        if optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        elif optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.optimizer_name = optimizer
        self.steps = 0

    @property
    def hparams(self) -> dict[str, float]:
        """The optimizer's current lr, momentum (SGD) and weight_decay."""
        group = self.opt.param_groups[0]
        return {k: float(group[k]) for k in ("lr", "momentum", "weight_decay") if k in group}

    def set_hparams(self, values: dict[str, float]) -> None:
        """Sets lr / momentum / weight_decay on every parameter group (those the optimizer has)."""
        for group in self.opt.param_groups:
            for k, v in values.items():
                if k in group:
                    group[k] = v

    def train_step(self, activation: np.ndarray, labels: np.ndarray) -> StepResult:
        """One SGD step on one batch. Raises :class:`StepRefused` -- with nothing applied -- when the
        model cannot train on the batch or its loss or gradients are not finite (e.g. huge activations)."""
        x = torch.from_numpy(np.array(activation, dtype=np.float32, copy=True)).to(self.device).requires_grad_(True)
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.model.train()
        # the forward updates the BatchNorm statistics: keep them, to undo a refused step
        buffers = [b.detach().clone() for b in self.model.buffers()]
        try:
            try:
                logits = self.model(x)
            except ValueError as e:  # e.g. BatchNorm cannot train on one value per channel
                raise StepRefused(f"the server model cannot train on this batch: {e}") from None
            loss = F.cross_entropy(logits, y)
            if not bool(torch.isfinite(loss)):
                raise StepRefused(f"the loss is {float(loss.detach())}", not_finite=True)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            x_grad = x.grad
            if x_grad is None:  # x requires grad, so the backward always fills it
                raise RuntimeError("the activation received no gradient")
            grads = [p.grad for p in self.model.parameters() if p.grad is not None] + [x_grad]
            if not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
                raise StepRefused("the gradients are not finite", not_finite=True)
        except StepRefused:
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
            raise
        self.opt.step()
        self.steps += 1
        correct = int((logits.detach().argmax(1) == y).sum())
        grad = x_grad.detach().to("cpu").numpy().astype(np.float32, copy=False)
        return StepResult(float(loss.detach()), correct, grad)

    @torch.no_grad()
    def evaluate(self, activation: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, float | None]:
        """Predictions with BatchNorm on running statistics; the loss sum when labels are given."""
        x = torch.from_numpy(np.array(activation, dtype=np.float32, copy=True)).to(self.device)
        self.model.eval()
        try:
            logits = self.model(x)
        finally:
            self.model.train()
        pred = logits.argmax(1).to("cpu").numpy().astype(np.int64)
        loss_sum = None
        if labels is not None:
            y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
            loss_sum = float(F.cross_entropy(logits, y, reduction="sum"))
        return pred, loss_sum

    # ------------------------------------------------------------------ state

    def save(self, directory: Path) -> None:
        """Model and optimizer state as safetensors plus JSON (no pickle). A write failure (e.g. a
        full disk) raises OSError."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        sd = self.opt.state_dict()
        tensors, scalars = {}, {}
        for idx, st in sd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"{idx}.{key}"] = val.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}.{key}"] = val
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                      str(directory / "server_model.safetensors"))
            save_file(tensors, str(directory / "server_optimizer.safetensors"))
        except SafetensorError as e:  # safetensors reports I/O errors (ENOSPC included) as its own type
            raise OSError(f"cannot write the server model to {directory}: {e}") from e
        meta = {"optimizer": self.optimizer_name, "param_groups": sd["param_groups"], "scalars": scalars, "steps": self.steps}
        (directory / "server_optimizer.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    def load(self, directory: Path) -> None:
        """Model and optimizer state written by :meth:`save`. Every file is read and checked before
        anything is replaced: a missing, corrupt or mismatched file raises :class:`CorruptFile` naming it
        (the model and optimizer are then as they were); another optimizer raises ValueError."""
        model_path = directory / "server_model.safetensors"
        weights = load_tensors(model_path)
        _check_tensors(model_path, weights, self.model.state_dict(), self.what)
        meta_path = directory / "server_optimizer.json"
        meta = read_json_object(meta_path)
        try:
            name, groups, scalars, steps = meta["optimizer"], meta["param_groups"], meta["scalars"], int(meta.get("steps", 0))
            if not (isinstance(name, str) and isinstance(groups, list) and isinstance(scalars, dict)):
                raise TypeError("wrong types")
            _check_param_groups(groups)
            if steps < 0 or any(isinstance(v, (int, float)) and v < 0 for v in scalars.values()):
                raise ValueError("negative step counts")
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFile(meta_path, f"is not an optimizer state ({type(e).__name__}: {e})") from None
        if name != self.optimizer_name:
            raise ValueError(
                f"checkpoint {directory} was trained with server optimizer {name!r}, not {self.optimizer_name!r}"
            )
        opt_path = directory / "server_optimizer.safetensors"
        tensors = load_tensors(opt_path)
        params = list(self.model.parameters())
        state: dict[int, dict] = {}
        for key, val in [*tensors.items(), *scalars.items()]:
            idx, _, field = key.partition(".")
            if not (idx.isdigit() and int(idx) < len(params) and field):
                raise CorruptFile(opt_path if key in tensors else meta_path,
                                  f"{key!r} names no parameter of the server model")
            if torch.is_tensor(val) and val.dim() and tuple(val.shape) != tuple(params[int(idx)].shape):
                raise CorruptFile(opt_path, f"{key!r} has shape {tuple(val.shape)}, its parameter "
                                            f"{tuple(params[int(idx)].shape)}")
            state.setdefault(int(idx), {})[field] = val
        saved_opt = self.opt.state_dict()
        try:
            self.opt.load_state_dict({"state": state, "param_groups": groups})
        except (KeyError, TypeError, ValueError) as e:
            self.opt.load_state_dict(saved_opt)
            raise CorruptFile(meta_path, f"does not match the server model's optimizer ({type(e).__name__}: {e})") \
                from None
        self.model.load_state_dict(weights, strict=True)
        self.steps = steps
