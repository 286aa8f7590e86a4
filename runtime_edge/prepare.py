"""``edge-train``'s prepare step: everything before the first message to the cloud.

:func:`prepare` checks the input cheapest first (client id, key files, output places), then finds
the checkpoint to resume (:mod:`.resume`), loads the model and the data, partitions it, and checks
that the checkpoint fits what was loaded. It opens no socket: :class:`.client.EdgeClient` takes
the :class:`Prepared` result and talks to the cloud.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..export import manifest as mf
from ..fsutil import BadFile, CheckpointDir, load_json, probe_write
from ..wire import protocol as P
from ..wire import security
from . import data as D
from . import resume
from .errors import EdgeError, EdgeInputError

log = logging.getLogger("edge-train")


@dataclass
class EdgeConfig:
    artifacts: str
    connect: str = "tcp://127.0.0.1:5555"
    data: str = "fashion-mnist"
    client_id: int = 0
    num_clients: int = 1
    partition: str = "iid"
    epochs: int | None = 1
    steps: int | None = None
    batch_size: int | None = 32  # None: the profile's batch size (32 without a profile)
    eval_every: int = 0
    eval_samples: int = 0  # 0: the whole test split
    eval_batch_size: int = 256
    summary: str | None = None
    lr: float | None = None
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    threads: int | None = None
    device: str = "cpu"
    inference_providers: list[str] | None = None
    inference_provider_options: list[dict] | None = None
    request_timeout_s: float = 30.0
    give_up_s: float = 300.0
    heartbeat_s: float = 2.0
    progress: bool | None = None  # None: a bar on a terminal, log lines otherwise
    log_every: int = 50
    profile: str | None = None  # a device profile's name or file: providers, device, threads, batch size
    uplink_bps: float | None = None  # emulated access link (see splitedge.wire.shaping); None: unlimited
    downlink_bps: float | None = None
    latency_s: float = 0.0
    curve_secret: str | None = None  # this edge's .key_secret (CurveZMQ)
    server_key: str | None = None  # the cloud's public server.key
    backend: str = "ort-training"  # "ort-training" (onnxruntime-training) or "portable" (plain ONNX graphs)


@dataclass
class Prepared:
    """A checked configuration with its model, data and shard loaded: what an EdgeClient needs."""

    cfg: EdgeConfig
    provider_choice: Any  # the profile's provider choice (None without --profile)
    curve: Any  # security.CurveClient, or None without CurveZMQ
    ckpt: CheckpointDir | None
    start: resume.ResumePoint
    model: Any  # the backend's EdgeModel
    train_set: Any
    test_set: Any
    shard: np.ndarray
    partition_info: dict[str, str]
    batches_per_epoch: int
    planned_steps: int

    @property
    def manifest(self) -> mf.Manifest:
        return self.model.manifest

    def run_identity(self) -> dict[str, Any]:
        return resume.run_identity(self.cfg, self.manifest, self.partition_info["plan"])


def prepare(cfg: EdgeConfig) -> Prepared:
    cfg, provider_choice = _apply_profile(cfg)
    if cfg.num_clients < 1 or not 0 <= cfg.client_id < cfg.num_clients:
        raise EdgeInputError(f"--client-id must be in 0..{cfg.num_clients - 1}, got {cfg.client_id}")
    # the cheap checks of the input first: before seconds of loading, and never after the training
    curve = _curve(cfg)
    if cfg.checkpoint_dir:
        check_checkpoint_dir(Path(cfg.checkpoint_dir), cfg.resume)
    if cfg.summary:
        check_summary_target(Path(cfg.summary))
        check_writable_dir(Path(cfg.summary).parent, f"--summary {cfg.summary}: its directory")
    if cfg.backend == "portable":
        from .portable_backend import CheckpointLoadError, EdgeModel
    elif cfg.backend == "ort-training":
        from .ort_backend import CheckpointLoadError, EdgeModel  # type: ignore[assignment]
    else:
        raise EdgeInputError(f"unknown edge backend {cfg.backend!r}; choose ort-training or portable")

    ckpt = CheckpointDir(cfg.checkpoint_dir, keep=cfg.keep_checkpoints) if cfg.checkpoint_dir else None
    start = resume.find(ckpt, cfg.artifacts) if cfg.resume else resume.ResumePoint()
    try:
        model = EdgeModel(cfg.artifacts, checkpoint=start.backend_checkpoint, device=cfg.device, threads=cfg.threads,
                          lr=cfg.lr, inference_providers=cfg.inference_providers,
                          inference_provider_options=cfg.inference_provider_options)
    except CheckpointLoadError as e:
        assert start.latest is not None and ckpt is not None
        raise resume.damaged(ckpt, start.latest, e) from None
    if start.latest is not None:
        bad = [k for k, v in model.get_parameters().items() if not np.isfinite(v).all()]
        if bad:  # every step from these would be NaN, and the cloud would refuse them one by one
            raise EdgeInputError(f"--resume: {start.backend_checkpoint}: parameter {bad[0]} holds NaN or Inf (a "
                                 "damaged or diverged checkpoint); resume from an earlier one or start fresh")
        assert ckpt is not None
        ckpt.adopt(start.latest)  # this run continues it: rotation may delete it once newer ones exist
    manifest = model.manifest
    # folder: images are resized to the artifacts' H x W (the other kinds have a native size)
    size: dict[str, Any] = {"image_size": tuple(manifest.input_shape[1:])} if len(manifest.input_shape) == 3 else {}
    train_set = D.load(cfg.data, split="train", **size)
    test_set = D.load(cfg.data, split="test", **size)
    if tuple(train_set.input_shape) != tuple(manifest.input_shape):
        raise EdgeInputError(
            f"{cfg.data} has inputs {'x'.join(map(str, train_set.input_shape))} but the artifacts expect "
            f"{'x'.join(map(str, manifest.input_shape))}: re-export with "
            f"--input-shape {','.join(map(str, train_set.input_shape))}"
        )
    if train_set.num_classes > manifest.num_classes:
        raise EdgeInputError(f"{cfg.data} has {train_set.num_classes} classes but the artifacts' head has "
                             f"{manifest.num_classes}: re-export with --num-classes {train_set.num_classes}")
    try:
        shards = D.partition_all(train_set.labels, cfg.num_clients, cfg.partition, cfg.seed)
    except ValueError as e:
        raise D.DatasetError(f"--partition {cfg.partition} of {cfg.data} over --num-clients {cfg.num_clients}: {e}") \
            from None
    shard = shards[cfg.client_id]
    partition_info = D.partition_fingerprint(train_set.labels, shards, cfg.partition, cfg.seed)
    if start.run is not None:  # the same shard, cut into batches the same way
        resume.check_resume(start.run, resume.run_identity(cfg, manifest, partition_info["plan"]), start.latest)
    assert cfg.batch_size is not None  # set by _apply_profile
    batches_per_epoch = len(shard) // cfg.batch_size
    if batches_per_epoch < 1:
        raise EdgeInputError(f"client {cfg.client_id}'s shard has {len(shard)} samples, fewer than one batch "
                             f"of {cfg.batch_size}")
    resume.check_position(start, batches_per_epoch)
    planned_steps = cfg.steps if cfg.steps else (cfg.epochs or 1) * batches_per_epoch
    if planned_steps > P.MAX_HEADER_INT - 1:  # step ids must stay protocol integers
        raise EdgeInputError(f"{planned_steps} steps are more than the protocol counts "
                             f"({P.MAX_HEADER_INT - 1}): give fewer --epochs or --steps")
    return Prepared(cfg, provider_choice, curve, ckpt, start, model, train_set, test_set, shard, partition_info,
                    batches_per_epoch, planned_steps)


def _curve(cfg: EdgeConfig) -> Any:
    if not (cfg.curve_secret or cfg.server_key):
        return None
    if not (cfg.curve_secret and cfg.server_key):
        raise EdgeInputError("--curve-secret and --server-key go together")
    try:
        public, secret = security.load_keypair(cfg.curve_secret)
    except security.KeyFileError as e:
        raise EdgeInputError(f"--curve-secret: {e}") from None
    try:
        return security.CurveClient(public, secret, security.load_public(cfg.server_key))
    except security.KeyFileError as e:
        raise EdgeInputError(f"--server-key: {e}") from None


def check_writable_dir(d: Path, what: str) -> None:
    """EdgeInputError naming ``what`` unless directory ``d`` can be written, or created (tried, not read off
    permission bits, which say nothing to root): a probe file in ``d``, or a probe directory in its nearest
    existing ancestor. Leaves nothing behind."""
    target = d.absolute()
    try:
        while not target.exists() and target.parent != target:
            if target.is_symlink():  # a dangling link: mkdir would fail on it
                raise OSError(errno.ENOENT, "a symbolic link to nothing")
            target = target.parent
        if not target.is_dir():
            raise OSError(errno.ENOTDIR, f"{target} is not a directory")
        if target == d.absolute():
            probe_write(target)
        else:
            os.rmdir(tempfile.mkdtemp(dir=target, prefix=".write-test-"))
    except OSError as e:
        raise EdgeInputError(f"{what} {d} cannot be created or written ({e.strerror or e})") from None


def check_summary_target(path: Path) -> None:
    """--summary replaces an earlier summary, never another file (a mistyped path must not cost it)."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        old = load_json(path, max_bytes=1 << 20) if path.is_file() else None
    except BadFile:
        old = None
    if not (isinstance(old, dict) and {"client_id", "final_accuracy", "steps"} <= old.keys()):
        raise EdgeInputError(f"--summary {path} exists and is not an edge-train summary: refusing to overwrite it "
                             "(choose another path, or remove it yourself)")


def check_checkpoint_dir(d: Path, resume: bool) -> None:
    """A fresh run needs an empty (or new) --checkpoint-dir: its first checkpoint would point LATEST at
    itself, and the run whose checkpoints are there could not --resume any more."""
    if not resume and d.is_dir():
        try:
            held = sorted(p.name for p in d.iterdir())
        except OSError as e:
            raise EdgeInputError(f"--checkpoint-dir {d} cannot be read ({e.strerror or e})") from None
        if held:
            more = f" and {len(held) - 3} more" if len(held) > 3 else ""
            raise EdgeInputError(
                f"--checkpoint-dir {d} is not empty (it holds {', '.join(held[:3])}{more}): to continue the run "
                "whose checkpoints these are, add --resume; to start a new run, give an empty or new directory")
    check_writable_dir(d, "--checkpoint-dir")


def _apply_profile(cfg: EdgeConfig) -> tuple[EdgeConfig, Any]:
    """--profile: its providers and training device, and its threads and batch size where the
    config leaves them None (not given). Logs the choice once, in plain words."""
    if not cfg.profile:
        return (replace(cfg, batch_size=32) if cfg.batch_size is None else cfg), None
    from ..profiles import ProfileError, edge_settings

    if cfg.backend == "portable":  # plain onnxruntime: the training build's module may be absent
        from .portable_backend import available_providers
    else:
        from .ort_backend import available_providers

    try:
        s = edge_settings(cfg.profile, available_providers(), threads=cfg.threads, batch_size=cfg.batch_size,
                          artifacts_dir=cfg.artifacts)
    except ProfileError as e:
        raise EdgeError(str(e)) from None
    log.info("profile %s: %s", s.profile.name, s.sentence)
    return replace(cfg, device=s.device, threads=s.threads, batch_size=s.batch_size,
                   inference_providers=s.inference_providers,
                   inference_provider_options=s.inference_provider_options), s.choice
