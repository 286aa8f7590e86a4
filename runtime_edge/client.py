"""``edge-train``'s engine: train the client sub-model on ONNX Runtime against ``cloud-serve``.

One step::

    a = model.forward(x)                       # eval model: the train-mode forward
    send TRAIN(step, codec.encode(a), labels)  # compressed activation
    g = decode(GRAD)                           # compressed dL/da, after the cloud's backward rule
    codec.observe_gradient(g)                  # e.g. SGQ's channel attention learns from it
    model.train_step(x, g)                     # ORT backward from g, then SGD/AdamW

Requests are retried with backoff on timeout under the same step id (the cloud
applies a step at most once and answers a retry from its cache); while waiting,
the edge sends PINGs so the cloud knows it is alive. If the cloud restarted and no
longer knows this connection, the edge says HELLO again and continues from the
step the cloud has applied.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from .. import codecs as sc
from ..wire import protocol as P
from ..wire import security
from ..export import manifest as mf
from ..fsutil import (MAX_INT, BadFile, CheckpointDir, CheckpointDirError, atomic_write_json, is_int, load_json,
                      load_json_object, probe_write)
from ..wire.shaping import Link, LinkInterrupted
from ..wire.transport import client_socket
from . import data as D

log = logging.getLogger("edge-train")

RETRY_FIRST_S = 0.5  # first wait before asking the cloud again after an answer that allows no progress
RETRY_MAX_S = 30.0  # longest such wait (doubling from RETRY_FIRST_S)


class EdgeError(RuntimeError):
    """A failure the user must act on (cloud unreachable, incompatible artifacts, ...)."""


class EdgeInputError(EdgeError):
    """Bad input found before training starts (arguments, key files, output places that cannot be
    written, data that does not fit the artifacts): nothing was trained or written. ``edge-train``
    exits with code 2 on it."""


class SummaryError(EdgeError):
    """The run completed but --summary could not be written; ``summary`` holds what it would have held."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


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
class Progress:
    """What an edge checkpoint records besides the ORT checkpoint itself."""

    step: int = 0  # train steps completed (== the last step id the cloud acknowledged)
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    bytes_sent: int = 0
    bytes_received: int = 0
    samples: int = 0
    evals: list[dict] = field(default_factory=list)


class EdgeClient:
    def __init__(self, cfg: EdgeConfig):
        cfg, self.provider_choice = _apply_profile(cfg)
        self.cfg = cfg
        if cfg.num_clients < 1 or not 0 <= cfg.client_id < cfg.num_clients:
            raise EdgeInputError(f"--client-id must be in 0..{cfg.num_clients - 1}, got {cfg.client_id}")
        # the cheap checks of the input first: before seconds of loading, and never after the training
        curve = None
        if cfg.curve_secret or cfg.server_key:
            if not (cfg.curve_secret and cfg.server_key):
                raise EdgeInputError("--curve-secret and --server-key go together")
            try:
                public, secret = security.load_keypair(cfg.curve_secret)
            except security.KeyFileError as e:
                raise EdgeInputError(f"--curve-secret: {e}") from None
            try:
                curve = security.CurveClient(public, secret, security.load_public(cfg.server_key))
            except security.KeyFileError as e:
                raise EdgeInputError(f"--server-key: {e}") from None
        if cfg.checkpoint_dir:
            _check_checkpoint_dir(Path(cfg.checkpoint_dir), cfg.resume)
        if cfg.summary:
            _check_summary_target(Path(cfg.summary))
            _check_writable_dir(Path(cfg.summary).parent, f"--summary {cfg.summary}: its directory")
        if cfg.backend == "portable":
            from .portable_backend import CheckpointLoadError, EdgeModel
        elif cfg.backend == "ort-training":
            from .ort_backend import CheckpointLoadError, EdgeModel  # type: ignore[assignment]
        else:
            raise EdgeInputError(f"unknown edge backend {cfg.backend!r}; choose ort-training or portable")

        self.ckpt = CheckpointDir(cfg.checkpoint_dir, keep=cfg.keep_checkpoints) if cfg.checkpoint_dir else None
        self.progress = Progress()
        ckpt_file = None
        resumed_run: dict[str, Any] | None = None
        latest = None
        if cfg.resume:
            if self.ckpt is None:
                raise EdgeInputError("--resume needs --checkpoint-dir")
            if not self.ckpt.root.is_dir():
                raise EdgeInputError(
                    f"--resume: --checkpoint-dir {self.ckpt.root} does not exist, so no run wrote there (a mistyped "
                    "path?): give the directory of the run to continue, or leave out --resume to start a new run")
            try:
                latest = self.ckpt.latest()
            except CheckpointDirError as e:
                raise EdgeInputError(f"--resume: {e}") from None
            if latest is None:
                log.warning("--resume: %s holds no checkpoint yet (its run stopped before the first one): the edge "
                            "starts from its initial weights", self.ckpt.root)
            else:
                ckpt_file = latest / "edge_checkpoint"
                self.progress, resumed_run = _load_progress(latest / "edge_progress.json")
                if resumed_run is not None:  # the artifacts must be the ones the checkpoint was trained from
                    _check_resume(resumed_run, _artifacts_identity(mf.load(cfg.artifacts)), latest)
                log.info("resuming from %s at step %d (epoch %d, batch %d)", latest, self.progress.step,
                         self.progress.epoch, self.progress.batch)
        try:
            self.model = EdgeModel(cfg.artifacts, checkpoint=ckpt_file, device=cfg.device, threads=cfg.threads,
                                   lr=cfg.lr, inference_providers=cfg.inference_providers,
                                   inference_provider_options=cfg.inference_provider_options)
        except CheckpointLoadError as e:
            assert latest is not None and self.ckpt is not None
            earlier = sorted((p.name for p in self.ckpt.root.glob("ckpt-*") if p.is_dir() and p != latest),
                             reverse=True)
            hint = (f"resume from an earlier one by writing its name ({earlier[0]}) into {self.ckpt.root / 'LATEST'}, "
                    if earlier else "")
            raise EdgeInputError(f"--resume: {e}: the checkpoint is damaged; {hint}or start fresh with an empty "
                                 "--checkpoint-dir") from None
        if ckpt_file is not None:
            bad = [k for k, v in self.model.get_parameters().items() if not np.isfinite(v).all()]
            if bad:  # every step from these would be NaN, and the cloud would refuse them one by one
                raise EdgeInputError(f"--resume: {ckpt_file}: parameter {bad[0]} holds NaN or Inf (a damaged or "
                                     "diverged checkpoint); resume from an earlier one or start fresh")
        if latest is not None and self.ckpt is not None:
            self.ckpt.adopt(latest)  # this run continues it: rotation may delete it once newer ones exist
        self.manifest = self.model.manifest
        self.client_files = mf.client_digest(self.manifest)  # which export this edge half comes from (HELLO)
        # folder: images are resized to the artifacts' H x W (the other kinds have a native size)
        size = {"image_size": tuple(self.manifest.input_shape[1:])} if len(self.manifest.input_shape) == 3 else {}
        self.train_set = D.load(cfg.data, split="train", **size)
        self.test_set = D.load(cfg.data, split="test", **size)
        if tuple(self.train_set.input_shape) != tuple(self.manifest.input_shape):
            raise EdgeInputError(
                f"{cfg.data} has inputs {'x'.join(map(str, self.train_set.input_shape))} but the artifacts expect "
                f"{'x'.join(map(str, self.manifest.input_shape))}: re-export with "
                f"--input-shape {','.join(map(str, self.train_set.input_shape))}"
            )
        if self.train_set.num_classes > self.manifest.num_classes:
            raise EdgeInputError(f"{cfg.data} has {self.train_set.num_classes} classes but the artifacts' head has "
                            f"{self.manifest.num_classes}: re-export with --num-classes {self.train_set.num_classes}")
        try:
            shards = D.partition_all(self.train_set.labels, cfg.num_clients, cfg.partition, cfg.seed)
        except ValueError as e:
            raise D.DatasetError(f"--partition {cfg.partition} of {cfg.data} over --num-clients {cfg.num_clients}: {e}") from None
        self.shard = shards[cfg.client_id]
        self.partition_info = D.partition_fingerprint(self.train_set.labels, shards, cfg.partition, cfg.seed)
        if resumed_run is not None:  # the same shard, cut into batches the same way
            _check_resume(resumed_run, self._run_identity(), latest)
        self.batches_per_epoch = len(self.shard) // cfg.batch_size
        if self.batches_per_epoch < 1:
            raise EdgeInputError(f"client {cfg.client_id}'s shard has {len(self.shard)} samples, fewer than one batch "
                            f"of {cfg.batch_size}")
        if latest is not None and self.progress.batch >= self.batches_per_epoch:
            raise EdgeInputError(f"--resume: {latest / 'edge_progress.json'}: batch {self.progress.batch} is beyond "
                                 f"the {self.batches_per_epoch} batches of an epoch (a damaged checkpoint directory)")
        self.planned_steps = cfg.steps if cfg.steps else (cfg.epochs or 1) * self.batches_per_epoch
        if self.planned_steps > P.MAX_HEADER_INT - 1:  # step ids must stay protocol integers
            raise EdgeInputError(f"{self.planned_steps} steps are more than the protocol counts "
                                 f"({P.MAX_HEADER_INT - 1}): give fewer --epochs or --steps")
        self.ctx = zmq.Context.instance()
        self.identity = f"edge-{cfg.client_id}-{uuid.uuid4().hex[:8]}".encode()
        # the emulated link's waits (hours per message at 1bit) end at SIGINT/SIGTERM and at --give-up
        self.link = Link(cfg.uplink_bps, cfg.downlink_bps, cfg.latency_s, interrupt=lambda: self.stop_signal is not None)
        if self.link.active:
            log.info("emulated link: %s", self.link.describe())
        # the largest message this edge expects: a gradient of one batch, or the averaged edge weights
        act_bytes = 4 * cfg.batch_size * int(np.prod(self.manifest.activation_shape))
        param_bytes = sum(4 * int(np.prod(v.shape)) for v in self.model.get_parameters().values())
        self.ep = client_socket(self.ctx, cfg.connect, self.identity, link=self.link, curve=curve,
                                max_message_bytes=2 * max(act_bytes, param_bytes) + (1 << 20))
        self.fwd_codec: Any = None
        self.settings: dict[str, Any] = {}
        self.fedavg_every = 0
        self._eval_id = 0
        self.t_start = time.time()
        self.timings: dict[str, list[float]] = {k: [] for k in ("forward", "encode", "wait", "decode", "train")}
        self.last_loss = float("nan")
        self.train_correct = 0
        self.train_seen = 0
        self._welcomed = False  # set by the first WELCOME of this process
        self.stop_signal: int | None = None  # SIGINT/SIGTERM received: stop at the next safe point
        self._stuck_since: float | None = None  # first answer, since the last progress, that made the edge ask again
        self._backoff = RETRY_FIRST_S

    # ------------------------------------------------------------------ requests

    def _request(self, type_: P.MsgType, header: dict, frames: list, want: P.MsgType,
                 match: tuple[str, Any] | None = None) -> P.Message:
        """Sends, then waits for the reply of type ``want`` (and header[match[0]] == match[1]).

        Retries with exponential backoff on timeout; PINGs while waiting; ERROR replies
        raise :class:`RemoteError` for the caller to handle.
        """
        out = P.pack(type_, header, frames)
        deadline = time.monotonic() + self.cfg.give_up_s
        self.link.deadline = deadline
        try:
            return self._exchange(type_, out, want, match, deadline)
        except LinkInterrupted:
            self._check_stop()
            raise EdgeError(f"{type_.name} and its answer cannot cross the emulated link ({self.link.describe()}) "
                            f"within --give-up {self.cfg.give_up_s:g}s") from None
        finally:
            self.link.deadline = None

    def _exchange(self, type_: P.MsgType, out: list, want: P.MsgType, match: tuple[str, Any] | None,
                  deadline: float) -> P.Message:
        timeout = self.cfg.request_timeout_s
        sent = self.ep.try_send(out)  # None: no connection to the cloud yet; sent again below
        self.progress.bytes_sent += sent or 0
        sent_at = time.monotonic()
        last_ping = started = sent_at
        waiting_noted = type_ != P.MsgType.HELLO  # first contact: say early that nothing has answered yet
        malformed: tuple[int, str] | None = None  # (count, last reason) of unparsable replies
        while True:
            self._check_stop()
            now = time.monotonic()
            failure = self.ep.handshake_failure()
            if failure == "auth":
                raise EdgeError(f"the cloud at {self.cfg.connect} refused this edge's CurveZMQ key: is its public key "
                                "in the cloud's --authorized-clients directory, and --server-key the cloud's key?")
            if failure == "protocol":
                if self.cfg.server_key:
                    raise EdgeError(f"the CurveZMQ handshake with {self.cfg.connect} failed: is --server-key "
                                    f"{self.cfg.server_key} the public key of this cloud's --curve-secret, and does "
                                    "the cloud use CurveZMQ at all (cloud-serve --curve-secret)?")
                raise EdgeError(f"the handshake with {self.cfg.connect} failed: the cloud and this edge disagree on "
                                "encryption (a cloud with --curve-secret needs edges with --curve-secret and "
                                "--server-key, and the other way round)")
            if now > deadline:
                if malformed:
                    raise EdgeError(f"the cloud at {self.cfg.connect} sent no valid answer to {type_.name} for "
                                    f"{self.cfg.give_up_s:.0f}s but {malformed[0]} malformed message(s); the last: "
                                    f"{malformed[1]}")
                raise EdgeError(f"the cloud at {self.cfg.connect} did not answer {type_.name} for "
                                f"{self.cfg.give_up_s:.0f}s; is cloud-serve running and reachable?")
            if not waiting_noted and now - started > 5.0:
                waiting_noted = True
                log.warning("no answer from the cloud at %s yet: is cloud-serve running there, at that address? "
                            "(waiting up to --give-up %.0fs)", self.cfg.connect, self.cfg.give_up_s)
            if sent is None or now - sent_at > timeout:
                if sent is not None:
                    log.warning("no reply to %s from %s after %.1fs: retrying (same step id; giving up in %.0fs)",
                                type_.name, self.cfg.connect, now - sent_at, deadline - now)
                    timeout = min(timeout * 2, 60.0)
                if sent is not None or now - sent_at > 0.1:
                    sent = self.ep.try_send(out)
                    self.progress.bytes_sent += sent or 0
                    sent_at = now
            if now - last_ping > self.cfg.heartbeat_s:
                self.progress.bytes_sent += self.ep.try_send(P.pack(P.MsgType.PING, {"t": time.time()})) or 0
                last_ping = now
            got = self.ep.recv(timeout_ms=100)
            if got is None:
                continue
            _, frames_in = got
            self.progress.bytes_received += sum(len(f.buffer) for f in frames_in)
            try:
                msg = P.unpack(frames_in)
            except P.ProtocolError as e:
                log.warning("ignoring a malformed message from the cloud: %s", e)
                malformed = (malformed[0] + 1 if malformed else 1, str(e)[:300])
                continue
            if msg.type == P.MsgType.PONG:
                continue
            if msg.type == P.MsgType.ERROR:
                if msg.header.get("re") not in (None, type_.name):
                    continue  # an answer to an earlier request (e.g. a retried TRAIN before a new HELLO)
                err_step = msg.header.get("step")
                if match and match[0] == "step" and err_step not in (None, match[1]):
                    continue  # an error about an older retry
                raise RemoteError(msg.header)
            if msg.type == want and (match is None or msg.header.get(match[0]) == match[1]):
                return msg
            # a late duplicate reply to an earlier retry: drop it

    def _retry_later(self, e: "RemoteError", what: str) -> None:
        """Waits before asking the cloud again after answer ``e`` (server_full, unknown_client, a stale_step
        naming no later step): with exponential backoff, woken by SIGINT/SIGTERM, and EdgeError once
        --give-up seconds have passed since the last progress (a step, an evaluation, a FedAvg round)."""
        now = time.monotonic()
        if self._stuck_since is None:
            self._stuck_since, self._backoff = now, RETRY_FIRST_S
        waited = now - self._stuck_since
        if waited + self._backoff > self.cfg.give_up_s:
            raise EdgeError(f"{what} within --give-up {self.cfg.give_up_s:g}s: the cloud at {self.cfg.connect} "
                            f"answered {e} to every request for {waited:.0f}s") from None
        log.warning("%s: %s; asking again in %.1fs", what, e, self._backoff)
        self._pause(self._backoff)
        self._backoff = min(2 * self._backoff, RETRY_MAX_S)

    def _progressed(self) -> None:
        self._stuck_since = None

    def _pause(self, seconds: float) -> None:
        """Sleeps ``seconds``; SIGINT/SIGTERM end it at once (:class:`_Stop`)."""
        end = time.monotonic() + seconds
        while True:
            self._check_stop()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    def hello(self) -> None:
        m = self.manifest
        header = {
            "client_id": self.cfg.client_id, "num_clients": self.cfg.num_clients, "model": m.model, "cut": m.cut,
            "activation_shape": list(m.activation_shape), "input_shape": list(m.input_shape),
            "num_classes": m.num_classes, "samples": int(len(self.shard)), "resume_step": self.progress.step,
            "planned_steps": self.planned_steps, "partition": self.partition_info,
            # the cloud refuses a fresh run whose client id already has steps, before touching that id's state
            "fresh": not self._welcomed and not self.cfg.resume,
            "client_files": self.client_files,
        }
        while True:
            try:
                msg = self._request(P.MsgType.HELLO, header, [], P.MsgType.WELCOME)
                break
            except RemoteError as e:
                # a full cloud (--max-clients) is a transient state: wait for a place, up to --give-up
                if e.code != P.ErrorCode.SERVER_FULL:
                    raise
                self._retry_later(e, "no place")
        h = msg.header
        try:
            codec = sc.CodecSpec.from_json(h["codec"], "WELCOME.codec").build()
            sc.CodecSpec.from_json(h["grad_codec"], "WELCOME.grad_codec").build()
        except (KeyError, TypeError, ValueError) as e:
            raise EdgeError(f"the cloud asked for codec settings this edge cannot use: {e}") from None
        if self.fwd_codec is None or self.settings.get("codec") != h["codec"]:
            self.fwd_codec = codec
        self.settings = {"codec": h["codec"], "grad_codec": h["grad_codec"]}
        self.fedavg_every = h["fedavg_every"]
        theirs = h.get("client_files")
        if not self._welcomed and isinstance(theirs, str) and theirs != self.client_files:
            log.warning("the cloud serves another export of %s cut %d (the client/ files of its artifacts differ from "
                        "--artifacts %s): fine if this edge half was re-exported on purpose; otherwise the two halves "
                        "do not start from one model", self.manifest.model, self.manifest.cut, self.cfg.artifacts)
        first, self._welcomed = not self._welcomed, True
        if first and not self.cfg.resume and h["last_step"] > 0:
            # the skip below is for a run that continues (--resume after a crash, a HELLO again after the
            # cloud restarted): a fresh run would skip batches it never trained and count the steps as its own.
            # This cloud refuses such a HELLO itself (``fresh``); this check covers a cloud that predates it.
            # Exit code 1, like the cloud's client_id_taken: a conflict with the cloud's state, found only once
            # connected; the same arguments are fine against another cloud
            raise EdgeError(
                f"the cloud at {self.cfg.connect} has already applied {h['last_step']} steps from --client-id "
                f"{self.cfg.client_id} (an earlier run with this id); this run without --resume would start from the "
                "initial weights and skip them. Continue that run with --resume and its --checkpoint-dir, give this "
                "run another --client-id, or start a fresh cloud-serve")
        if h["last_step"] > self.progress.step:
            # the cloud applied steps this edge's checkpoint does not have: skip their batches, never re-send them
            skip = min(h["last_step"], self.planned_steps) - self.progress.step
            log.warning("the cloud already applied this client's steps up to %d (checkpoint: %d): skipping %d batches",
                        h["last_step"], self.progress.step, skip)
            self._advance(skip)
        log.info("connected to %s: codec %s %s, gradients %s %s%s", self.cfg.connect, h["codec"]["name"],
                 h["codec"]["params"], h["grad_codec"]["name"], h["grad_codec"]["params"],
                 f", FedAvg every {self.fedavg_every} steps" if self.fedavg_every else "")

    def _advance(self, n: int) -> None:
        """Moves the position in the shard ``n`` steps forward without training on them."""
        p = self.progress
        n = max(0, min(int(n), self.planned_steps - p.step))
        p.step += n
        p.epoch, p.batch = divmod(p.epoch * self.batches_per_epoch + p.batch + n, self.batches_per_epoch)

    # ------------------------------------------------------------------ training

    def run(self) -> dict[str, Any]:
        self.t_start = time.time()
        bar = _Bar(self.planned_steps, self.cfg.client_id, self.cfg.progress, self.cfg.log_every)
        p = self.progress
        try:
            self.hello()
            if self.ckpt is not None:
                # made now, not at the first checkpoint: --resume refuses a directory that does not exist (a
                # mistyped path), and a run that stops before its first checkpoint must still be resumable
                try:
                    self.ckpt.root.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise EdgeError(f"--checkpoint-dir {self.ckpt.root}: cannot create it ({e.strerror or e})") \
                        from None
            while p.step < self.planned_steps:
                # (re)start the batch stream at the recorded position; a skip (the cloud had already
                # applied steps) changes the position, and the stream is restarted there
                epoch, start = p.epoch, p.batch
                batches = D.batches(self.train_set, self.shard, self.cfg.batch_size, seed=self.cfg.seed,
                                    epoch=epoch, start_batch=start)
                for i, (x, y) in enumerate(batches):
                    if p.step >= self.planned_steps or (p.epoch, p.batch) != (epoch, start + i):
                        break
                    self._train_step(x, y)
                    bar.update(p.step, self.last_loss, self.train_correct / max(1, self.train_seen))
                    self._check_stop()
                    if self.cfg.eval_every and p.step % self.cfg.eval_every == 0 and p.step < self.planned_steps:
                        self.evaluate()
                    if self.ckpt and p.step % self.cfg.checkpoint_every == 0:
                        self.save_checkpoint()
            final = self.evaluate()
            if self.ckpt:
                self.save_checkpoint()
            self._bye("finished")
        except _Stop:
            raise self._interrupted() from None
        finally:
            bar.close()
        summary = self.summary(final)
        self.ep.close(linger_ms=200)
        if self.cfg.summary:
            try:
                Path(self.cfg.summary).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.cfg.summary, summary)
            except OSError as e:
                raise SummaryError(f"--summary {self.cfg.summary} could not be written ({e.strerror or e}); the run "
                                   f"itself completed ({self.progress.step} steps)", summary) from None
        return summary

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """Signal handler (SIGINT, SIGTERM): stop at the next safe point -- between steps, or while
        waiting for the cloud -- with a checkpoint of the last completed step. A second SIGINT aborts."""
        self.stop_signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _check_stop(self) -> None:
        if self.stop_signal is not None:
            raise _Stop

    def _interrupted(self) -> "Interrupted":
        """Saves a checkpoint of the last completed step (the model is never left mid-step: the handler
        only sets a flag) and words what to do next."""
        p = self.progress
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal"
        where = ""
        if self.ckpt and p.step > 0:
            self.save_checkpoint()
            where = f"; its checkpoint is in {self.ckpt.root}: run the same command with --resume to continue"
        elif p.step > 0:
            where = "; without --checkpoint-dir there is no checkpoint to continue from"
        if self._welcomed:  # free this edge's place on the cloud now, not after --client-timeout (no reply awaited)
            # on an emulated link the BYE may take a second, no more (it would take minutes at a few bit/s)
            self.link.interrupt, self.link.deadline = None, time.monotonic() + 1.0
            try:
                self.ep.try_send(P.pack(P.MsgType.BYE, {"reason": "interrupted", "steps": p.step}))
            except LinkInterrupted:
                log.info("BYE not sent: it would take more than a second on the emulated link")
        self.ep.close(linger_ms=500)
        return Interrupted(f"stopped by {name} after step {p.step} of {self.planned_steps}{where}",
                           128 + int(self.stop_signal or 0))

    def _train_step(self, x: np.ndarray, y: np.ndarray) -> None:
        p = self.progress
        step = p.step + 1
        t0 = time.perf_counter()
        act = self.model.forward(x)
        t1 = time.perf_counter()
        blob = self._encode(act, f"training diverged at step {step}", step=step, total_rounds=self.planned_steps)
        t2 = time.perf_counter()
        header = {"step": step, "n": int(x.shape[0]), "round": step, "total_rounds": self.planned_steps,
                  "encode_ms": round((t2 - t1) * 1000, 3)}
        while True:
            try:
                msg = self._request(P.MsgType.TRAIN, header, [blob, P.array_frame(y, "int64")], P.MsgType.GRAD,
                                    match=("step", step))
                break
            except RemoteError as e:
                if e.code == P.ErrorCode.UNKNOWN_CLIENT:
                    # the cloud restarted, or timed this edge out: say HELLO again -- within --give-up, with
                    # backoff (a cloud that answers every request so would otherwise be asked forever)
                    self._retry_later(e, "no session on the cloud (restarted? timed out?)")
                    self.hello()
                    if self.progress.step >= step:  # the cloud had applied this step before it went down
                        self._progressed()
                        return
                    continue
                if e.code == P.ErrorCode.STALE_STEP:
                    expected = e.header.get("expected_step")
                    if is_int(expected) and expected > step:  # applied already: go on from where the cloud is
                        self._advance(expected - step)
                        self._progressed()
                        return
                    # a stale_step that names no later step (this one again, or none): the cloud contradicts
                    # itself; ask again with backoff until --give-up
                    self._retry_later(e, f"step {step} refused as stale, with no later step to go on with")
                    continue
                if e.code == P.ErrorCode.NOT_FINITE:
                    self._bye("diverged")
                    raise EdgeError(f"training diverged at step {step}: the cloud rejected it ({e}); learning rate "
                                    "too high (this edge's --lr, or the cloud's)?" + self._ckpt_note()) from None
                raise EdgeError(f"the cloud rejected step {step}: {e}") from None
        t3 = time.perf_counter()
        self._progressed()
        P.expect_frames(msg, 1)
        # the gradient cannot be larger than the activation it belongs to: bound the decode before it allocates
        try:
            grad = sc.decode(msg.frames[0].buffer, max_bytes=act.nbytes + (1 << 20))
        except sc.PayloadError as e:
            raise EdgeError(f"the cloud's gradient for step {step} does not decode: {e}") from None
        if grad.shape != act.shape:
            raise EdgeError(f"the cloud sent a gradient of shape {grad.shape} for an activation of shape {act.shape}")
        self.fwd_codec.observe_gradient(grad)
        t4 = time.perf_counter()
        self.model.train_step(x, grad)
        t5 = time.perf_counter()
        for k, dt in zip(self.timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            self.timings[k].append(dt * 1000)
        self.last_loss = float(msg.header["loss"])
        self.train_correct += int(msg.header["correct"])
        self.train_seen += int(x.shape[0])
        p.step = step
        p.samples += int(x.shape[0])
        p.batch += 1
        if p.batch >= self.batches_per_epoch:
            p.epoch += 1
            p.batch = 0
        if msg.header.get("fedavg_round") is not None:
            self._fedavg(int(msg.header["fedavg_round"]))

    def _fedavg(self, rnd: int) -> None:
        params = self.model.get_parameters()
        names = sorted(params)
        try:
            msg = self._request(P.MsgType.WEIGHTS, {
                "round": rnd, "samples": int(len(self.shard)), "names": names,
                "shapes": [list(params[k].shape) for k in names],
            }, [P.array_frame(params[k], "float32") for k in names], P.MsgType.WEIGHTS_AVG, match=("round", rnd))
        except RemoteError as e:
            if e.code not in (P.ErrorCode.UNKNOWN_CLIENT, P.ErrorCode.UNEXPECTED):
                raise EdgeError(f"FedAvg round {rnd} failed: {e}") from None
            # the cloud restarted (its pending rounds are gone): keep the local weights, go on
            log.warning("FedAvg round %d skipped: %s", rnd, e)
            if e.code == P.ErrorCode.UNKNOWN_CLIENT:
                self.hello()
            return
        self._progressed()
        expected = {k: params[k].shape for k in names}
        shapes = P.check_shapes(msg.header["names"], msg.header["shapes"], expected, "WEIGHTS_AVG")
        P.expect_frames(msg, len(shapes))
        avg = {k: P.read_array(f, "float32", s, k).copy() for k, s, f in zip(msg.header["names"], shapes, msg.frames)}
        bad = [k for k, v in avg.items() if not np.isfinite(v).all()]
        if bad:
            raise EdgeError(f"the cloud's FedAvg round {rnd} holds NaN or Inf in {', '.join(bad[:3])}: refused")
        self.model.set_parameters(avg)
        log.info("FedAvg round %d: averaged over %d clients", rnd, msg.header["clients"])

    def evaluate(self) -> dict[str, Any]:
        """Accuracy on the test split (or its first --eval-samples), through the same codec."""
        from .backend_errors import ModelLoadError

        ds = self.test_set
        n_total = len(ds.labels) if not self.cfg.eval_samples else min(self.cfg.eval_samples, len(ds.labels))
        correct = 0
        loss_sum = 0.0
        t0 = time.perf_counter()
        for start in range(0, n_total, self.cfg.eval_batch_size):
            x = ds.images[start:min(start + self.cfg.eval_batch_size, n_total)]
            y = ds.labels[start:start + len(x)]
            try:
                act = self.model.infer(x)
            except ModelLoadError as e:
                raise EdgeError(str(e)) from None
            blob = self._encode(act, f"training diverged by step {self.progress.step}", training=False)
            self._eval_id += 1
            while True:
                try:
                    msg = self._request(P.MsgType.EVAL, {"eval_id": self._eval_id, "n": int(len(x)),
                                                         "has_labels": True},
                                        [blob, P.array_frame(y, "int64")], P.MsgType.EVAL_RESULT,
                                        match=("eval_id", self._eval_id))
                    break
                except RemoteError as e:  # e.g. timed out by the cloud during a long local step: HELLO again
                    if e.code != P.ErrorCode.UNKNOWN_CLIENT:
                        raise
                    self._retry_later(e, "no session on the cloud (restarted? timed out?)")
                    self.hello()
            self._progressed()
            P.expect_frames(msg, 1)
            pred = P.read_array(msg.frames[0], "int64", (len(x),), "predictions")
            correct += int((pred == y).sum())
            loss_sum += float(msg.header["loss_sum"] or 0.0)
        result = {
            "step": self.progress.step, "samples": n_total, "accuracy": correct / max(1, n_total),
            "loss": loss_sum / max(1, n_total), "time_s": round(time.time() - self.t_start, 3),
            "bytes_sent": self.progress.bytes_sent, "bytes_received": self.progress.bytes_received,
            "eval_s": round(time.perf_counter() - t0, 3),
        }
        self.progress.evals.append(result)
        log.info("client %d step %d: test accuracy %.2f%% (%d samples), loss %.4f", self.cfg.client_id,
                 result["step"], 100 * result["accuracy"], n_total, result["loss"])
        return result

    def _encode(self, act: np.ndarray, diverged: str, **kw: Any) -> bytes:
        """The activation, encoded; a diverged run (NaN/Inf, or values too large for the codec) stops with
        EdgeError saying so (``diverged`` begins the message): its weights are lost."""
        try:
            return self.fwd_codec.encode(act, **kw)
        except ValueError as e:  # every codec refuses NaN/Inf; a finite one may be too large (SGQ's distances)
            if not np.isfinite(act).all():  # looked at only now: no extra pass over each step's activation
                problem = "the activations contain NaN/Inf"
            else:
                problem = (f"the activations cannot be encoded ({self.settings['codec']['name']}: {e}; largest "
                           f"|value| {float(np.abs(act).max()):.3g})")
        self._bye("diverged")
        raise EdgeError(f"{diverged}: {problem}; learning rate too high? (this edge's is {self.model.lr:g})"
                        + self._ckpt_note())

    def _ckpt_note(self) -> str:
        if not self.ckpt:
            return ""
        try:
            latest = self.ckpt.latest()
        except OSError:
            latest = None
        return f"; the last checkpoint saved is {latest}" if latest else ""

    def _bye(self, reason: str) -> None:
        for again in (True, False):
            try:
                self._request(P.MsgType.BYE, {"reason": reason, "steps": self.progress.step}, [], P.MsgType.BYE_ACK)
                return
            except RemoteError as e:
                if again and e.code == P.ErrorCode.UNKNOWN_CLIENT:  # its session was closed (timed out): once more
                    try:
                        self.hello()
                        continue
                    except (EdgeError, RemoteError) as e2:
                        e = e2
                log.warning("BYE not acknowledged: %s", e)
            except EdgeError as e:
                log.warning("BYE not acknowledged: %s", e)
            return

    def save_checkpoint(self) -> None:
        assert self.ckpt is not None
        p = self.progress

        def write(d: Path) -> None:
            self.model.save_checkpoint(d / "edge_checkpoint")
            atomic_write_json(d / "edge_progress.json", {**asdict(p), "run": self._run_identity()})

        try:
            self.ckpt.write(f"{p.step:09d}", write)
        except (OSError, RuntimeError) as e:  # ONNX Runtime reports a failed write (ENOSPC too) as RuntimeError
            try:
                previous = self.ckpt.latest()
            except OSError:
                previous = None
            log.error("edge checkpoint at step %d failed: %s; %s", p.step, e,
                      f"the previous one is intact ({previous.name})" if previous else "no checkpoint has been saved")

    def _run_identity(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it (see :func:`_check_resume`)."""
        c = self.cfg
        return {**_artifacts_identity(self.manifest), "client_id": c.client_id, "batch_size": c.batch_size,
                "data": c.data, "partition": c.partition, "seed": c.seed, "num_clients": c.num_clients,
                "partition_plan": self.partition_info["plan"]}

    def summary(self, final: dict[str, Any]) -> dict[str, Any]:
        med = {f"{k}_ms_median": round(float(np.median(v)), 3) if v else None for k, v in self.timings.items()}
        return {
            "client_id": self.cfg.client_id, "num_clients": self.cfg.num_clients, "data": self.cfg.data,
            "partition": self.cfg.partition, "shard_samples": int(len(self.shard)),
            "final_accuracy": final["accuracy"], "final_loss": final["loss"], "eval_samples": final["samples"],
            "steps": self.progress.step, "planned_steps": self.planned_steps, "samples": self.progress.samples,
            "batch_size": self.cfg.batch_size, "bytes_sent": self.progress.bytes_sent,
            "bytes_received": self.progress.bytes_received, "wall_time_s": round(time.time() - self.t_start, 3),
            "codec": self.settings.get("codec"), "grad_codec": self.settings.get("grad_codec"),
            "fedavg_every": self.fedavg_every, "model": self.manifest.model, "cut": self.manifest.cut,
            "lr": self.model.lr, "evals": self.progress.evals, "timings": med,
            "link": self.link.describe() if self.link.active else None,
            "train_accuracy": self.train_correct / max(1, self.train_seen),
            "profile": self.cfg.profile,
            "providers": self.provider_choice.sentence if self.provider_choice is not None else None,
        }


def _check_writable_dir(d: Path, what: str) -> None:
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


def _check_summary_target(path: Path) -> None:
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


def _check_checkpoint_dir(d: Path, resume: bool) -> None:
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
    _check_writable_dir(d, "--checkpoint-dir")


def _apply_profile(cfg: EdgeConfig) -> tuple[EdgeConfig, Any]:
    """--profile: its providers and training device, and its threads and batch size where the
    config leaves them None (not given). Logs the choice once, in plain words."""
    if not cfg.profile:
        return (replace(cfg, batch_size=32) if cfg.batch_size is None else cfg), None
    from ..profiles import ProfileError, edge_settings
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


class ResumeMismatch(EdgeError):
    """--resume with arguments or artifacts other than those the checkpoint was written with."""


_RESUME_WHAT = {
    "model": "--artifacts (model)", "cut": "--artifacts (cut)", "artifacts": "--artifacts (files)",
    "client_id": "--client-id", "batch_size": "--batch-size", "data": "--data", "partition": "--partition",
    "seed": "--seed", "num_clients": "--num-clients",
}
_PLAN = "partition_plan"  # a digest of the shard plan (data contents, --partition, --seed, --num-clients)
_PLAN_INPUTS = ("data", "partition", "seed", "num_clients")  # named when the plan differs, not compared alone


def _artifacts_identity(m: mf.Manifest) -> dict[str, Any]:
    files = hashlib.sha256(json.dumps(m.files, sort_keys=True).encode()).hexdigest()[:32]
    return {"model": m.model, "cut": m.cut, "artifacts": files}


def _check_resume(saved: dict[str, Any], now: dict[str, Any], where: Any) -> None:
    """ResumeMismatch naming each setting in which ``now`` differs from the checkpoint's run ``saved``.

    The shard plan decides whether the data settings match (``--data fashion-mnist`` and the same
    directory spelled out are one plan); when it differs, the settings behind it are named."""
    def shown(k: str) -> str:
        return "--artifacts (their files differ)" if k == "artifacts" else \
            f"{_RESUME_WHAT[k]} ({json.dumps(saved[k])} there, {json.dumps(now[k])} here)"

    diff = [shown(k) for k in now if k in _RESUME_WHAT and k not in _PLAN_INPUTS and k in saved and saved[k] != now[k]]
    if _PLAN in saved and _PLAN in now and saved[_PLAN] != now[_PLAN]:
        named = [shown(k) for k in _PLAN_INPUTS if k in saved and k in now and saved[k] != now[k]]
        if named:
            diff += named
        elif any(k in saved for k in _PLAN_INPUTS):
            diff.append("data: the same --data, --partition, --seed and --num-clients split other samples (the data "
                        "set's files changed)")
        else:  # a checkpoint of an earlier version, which kept only the plan
            diff.append("the data set, --partition, --seed or --num-clients")
    if diff:
        raise ResumeMismatch(f"--resume: the checkpoint in {where} was written by a run with a different "
                             f"{'; '.join(diff)}; resume with the same arguments, or start fresh with another "
                             "--checkpoint-dir")



def _load_progress(path: Path) -> tuple[Progress, dict[str, Any] | None]:
    """The checkpoint's Progress and the identity of the run that wrote it (None: older checkpoints).
    EdgeInputError naming the file and the field unless each has its type and range."""
    try:
        raw = load_json_object(path)
    except BadFile as e:
        raise EdgeInputError(f"--resume: {e} (a damaged checkpoint directory)") from None

    def bad(why: str) -> EdgeInputError:
        return EdgeInputError(f"--resume: {path}: {why} (a damaged checkpoint directory)")

    counts = {}
    for f in fields(Progress):
        if f.name == "evals" or f.name not in raw:
            continue
        v = raw[f.name]
        if not is_int(v):
            raise bad(f"{f.name} is {json.dumps(v)[:40]}, not an integer in 0..{MAX_INT}")
        counts[f.name] = v
    evals = raw.get("evals", [])
    if not (isinstance(evals, list) and all(isinstance(e, dict) for e in evals)):
        raise bad("evals is not a list of objects")
    run = raw.get("run")
    if run is not None and not (isinstance(run, dict) and all(
            v is None or isinstance(v, (str, int, float)) for v in run.values())):
        raise bad("run is not an object of plain values")
    return Progress(**counts, evals=list(evals)), run


class _Stop(Exception):
    """Raised at a safe point after SIGINT/SIGTERM (see EdgeClient.request_stop)."""


class Interrupted(Exception):
    """edge-train stopped by a signal, cleanly; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RemoteError(Exception):
    """An ERROR from the cloud. Its code and message are the cloud's text: capped and with control
    characters escaped (:func:`splitedge.wire.protocol.printable`) before they reach a log or a terminal."""

    def __init__(self, header: dict):
        self.header = header
        self.code = header.get("code", "")
        super().__init__(f"{P.printable(self.code, 64)}: {P.printable(header.get('message', ''), 1000)}")


class _Bar:
    """A progress bar on a terminal; plain log lines every ``every`` steps otherwise."""

    def __init__(self, total: int, client: int, tty: bool | None, every: int):
        self.total = total
        self.client = client
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every = max(1, every)
        self.t0 = time.monotonic()

    def update(self, step: int, loss: float, acc: float) -> None:
        rate = step / max(1e-9, time.monotonic() - self.t0)
        if self.tty:
            width = 30
            filled = int(width * step / max(1, self.total))
            sys.stderr.write(f"\r[client {self.client}] |{'#' * filled}{'.' * (width - filled)}| {step}/{self.total} "
                             f"loss {loss:.4f} train acc {100 * acc:.1f}% {rate:.1f} it/s ")
            sys.stderr.flush()
        elif step % self.every == 0 or step == self.total:
            log.info("client %d step %d/%d loss %.4f train acc %.1f%% (%.1f steps/s)", self.client, step, self.total,
                     loss, 100 * acc, rate)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")

