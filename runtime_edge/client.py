"""``edge-train``'s engine: train the client sub-model on ONNX Runtime against ``cloud-serve``.

One step::

    a = model.forward(x)                       # eval model: the train-mode forward
    send TRAIN(step, codec.encode(a), labels)  # compressed activation
    g = decode(GRAD)                           # compressed dL/da, after the cloud's backward rule
    codec.observe_gradient(g)                  # e.g. SGQ's channel attention learns from it
    model.train_step(x, g)                     # ORT backward from g, then SGD/AdamW

Requests go through one :class:`splitedge.wire.channel.Channel`: each is numbered, retried
with backoff on timeout under the same request id (the cloud applies a step at most once
and answers a retry from its cache), and answered by the reply that names its id; while
waiting, the channel sends PINGs so the cloud knows the edge is alive. If the cloud restarted and no
longer knows this connection, the edge says HELLO again and continues from the
step the cloud has applied.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import zmq

from .. import codecs as sc
from ..export import manifest as mf
from ..fsutil import atomic_write_json, is_int
from ..wire import protocol as P
from ..wire.channel import Channel, ChannelError, RemoteError
from ..wire.shaping import Link, LinkInterrupted
from ..wire.transport import client_socket
from . import data as D
from .errors import EdgeError, EdgeInputError, SummaryError
from .prepare import EdgeConfig, Prepared, prepare as prepare_run
from .resume import Progress, ResumeMismatch

__all__ = ["EdgeClient", "EdgeConfig", "EdgeError", "EdgeInputError", "Interrupted", "Progress", "Prepared",
           "RemoteError", "ResumeMismatch", "SummaryError"]

log = logging.getLogger("edge-train")


class EdgeClient:
    """Trains the edge half of one prepared run against the cloud: ``EdgeClient.prepare(cfg).run()``."""

    def __init__(self, prep: Prepared):
        cfg = self.cfg = prep.cfg
        self.prep = prep
        self.provider_choice = prep.provider_choice
        self.ckpt = prep.ckpt
        self.progress = prep.start.progress
        self.model = prep.model
        self.manifest = prep.manifest
        self.client_files = mf.client_digest(self.manifest)  # which export this edge half comes from (HELLO)
        self.train_set, self.test_set, self.shard = prep.train_set, prep.test_set, prep.shard
        self.partition_info = prep.partition_info
        self.batches_per_epoch, self.planned_steps = prep.batches_per_epoch, prep.planned_steps
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.identity = f"edge-{cfg.client_id}-{uuid.uuid4().hex[:8]}".encode()
        # the emulated link's waits (hours per message at 1bit) end at SIGINT/SIGTERM and at --give-up
        self.link = Link(cfg.uplink_bps, cfg.downlink_bps, cfg.latency_s, interrupt=lambda: self.stop_signal is not None)
        if self.link.active:
            log.info("emulated link: %s", self.link.describe())
        # the largest message this edge expects: a gradient of one batch, or the averaged edge weights
        assert cfg.batch_size is not None  # prepare() resolved it from the profile
        act_bytes = 4 * cfg.batch_size * int(np.prod(self.manifest.activation_shape))
        param_bytes = sum(4 * int(np.prod(v.shape)) for v in self.model.get_parameters().values())
        self.ep = client_socket(self.ctx, cfg.connect, self.identity, link=self.link, curve=prep.curve,
                                max_message_bytes=2 * max(act_bytes, param_bytes) + (1 << 20))
        self.chan = Channel(self.ep, peer=cfg.connect, request_timeout_s=cfg.request_timeout_s,
                            give_up_s=cfg.give_up_s, heartbeat_s=cfg.heartbeat_s, server_key=cfg.server_key,
                            link=self.link, check_stop=self._check_stop, on_bytes=self._count_bytes)
        self.fwd_codec: Any = None
        self.settings: dict[str, Any] = {}
        self.fedavg_every = 0
        self.t_start = time.time()
        self.timings: dict[str, list[float]] = {k: [] for k in ("forward", "encode", "wait", "decode", "train")}
        self.last_loss = float("nan")
        self.train_correct = 0
        self.train_seen = 0
        self._welcomed = False  # set by the first WELCOME of this process
        self.stop_signal: int | None = None  # SIGINT/SIGTERM received: stop at the next safe point

    def _count_bytes(self, sent: int, received: int) -> None:
        self.progress.bytes_sent += sent
        self.progress.bytes_received += received

    @classmethod
    def prepare(cls, cfg: EdgeConfig) -> EdgeClient:
        """Checks ``cfg``, loads the model, the data and any checkpoint to resume (:func:`.prepare.prepare`),
        then opens the connection. Bad input raises :class:`EdgeInputError` before anything is sent."""
        return cls(prepare_run(cfg))

    # ------------------------------------------------------------------ requests

    def _request(self, msg: P.Message, want: P.MsgType) -> P.Message:
        """Sends request ``msg`` and returns its reply of type ``want`` (see :class:`Channel`); an ERROR
        reply raises :class:`RemoteError` for the caller to handle."""
        try:
            return self.chan.request(msg, want)
        except ChannelError as e:
            raise EdgeError(str(e)) from None

    def _retry_later(self, e: RemoteError, what: str) -> None:
        try:
            self.chan.retry_later(e, what)
        except ChannelError as e2:
            raise EdgeError(str(e2)) from None

    def _progressed(self) -> None:
        self.chan.progressed()

    def hello(self) -> None:
        m = self.manifest
        req = P.hello(
            client_id=self.cfg.client_id, num_clients=self.cfg.num_clients, model=m.model, cut=m.cut,
            activation_shape=m.activation_shape, input_shape=m.input_shape, num_classes=m.num_classes,
            samples=int(len(self.shard)), resume_step=self.progress.step, planned_steps=self.planned_steps,
            partition=self.partition_info, client_files=self.client_files,
            # the cloud refuses a fresh run whose client id already has steps, before touching that id's state
            fresh=not self._welcomed and not self.cfg.resume,
        )
        while True:
            try:
                msg = self._request(req, P.MsgType.WELCOME)
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
        self._welcomed = True
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
                assert self.cfg.batch_size is not None  # prepare() resolved it
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

    def _interrupted(self) -> Interrupted:
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
                self.chan.send(P.bye(reason="interrupted", steps=p.step))
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
        req = P.train(step=step, n=int(x.shape[0]), total_rounds=self.planned_steps,
                      encode_ms=round((t2 - t1) * 1000, 3), activation=blob, labels=y)
        while True:
            try:
                msg = self._request(req, P.MsgType.GRAD)
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
                    if is_int(expected) and cast(int, expected) > step:  # applied already: go on from there
                        self._advance(cast(int, expected) - step)
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
            msg = self._request(P.weights(rnd=rnd, samples=int(len(self.shard)), params=params), P.MsgType.WEIGHTS_AVG)
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
            req = P.eval_request(activation=blob, labels=y, n=int(len(x)))
            while True:
                try:
                    msg = self._request(req, P.MsgType.EVAL_RESULT)
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
                self._request(P.bye(reason=reason, steps=self.progress.step), P.MsgType.BYE_ACK)
                return
            except RemoteError as e:
                err: EdgeError | RemoteError = e
                if again and e.code == P.ErrorCode.UNKNOWN_CLIENT:  # its session was closed (timed out): once more
                    try:
                        self.hello()
                        continue
                    except (EdgeError, RemoteError) as e2:
                        err = e2
                log.warning("BYE not acknowledged: %s", err)
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
        """What a checkpoint must share with the run that resumes it (see :func:`.resume.check_resume`)."""
        return self.prep.run_identity()

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


class _Stop(Exception):
    """Raised at a safe point after SIGINT/SIGTERM (see EdgeClient.request_stop)."""


class Interrupted(Exception):
    """edge-train stopped by a signal, cleanly; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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

