"""``cloud-serve --tensorboard DIR``: the run's metrics as TensorBoard scalars.

Fed with the cloud's metrics events (the same records ``--metrics`` writes), on the cloud only; the
edge never imports TensorBoard. Written with torch's ``SummaryWriter`` (it needs the ``tensorboard``
package), whose event file is written by a background thread.

Tags (x axis: the server step for ``*/all`` and ``time/*`` and ``bytes/*``, the client's own step for
``*/client_K``):

* ``loss/all``, ``loss/client_K``: the training loss of each step;
* ``accuracy/client_K``: a client's evaluation accuracy (labels sent with EVAL), at the client step
  it was taken, when the evaluation is complete;
* ``bytes/step``: bytes on the wire for one step (request + reply); ``bytes/cumulative``: all of them
  so far; ``bytes/client_K_cumulative``: per client;
* ``time/decode_ms``, ``time/compute_ms``, ``time/calibration_ms``, ``time/encode_ms``: the cloud's
  phases of a step; ``time/edge_encode_ms``: what the edge reported for its encode;
* ``fedavg/clients``: the clients averaged in each FedAvg round (x: the round).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("cloud-serve")


class TensorBoardSink:
    def __init__(self, logdir: str, *, flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch is there on the cloud; the tensorboard package may not be
            raise ValueError(f"--tensorboard needs the tensorboard package ({e}); pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=logdir, flush_secs=flush_secs)
        self.logdir = logdir
        self._bytes = 0
        self._client_bytes: dict[int, int] = {}
        self._eval: dict[int, list[int]] = {}  # client -> [client step, n, correct] of the evaluation under way
        self._client_step: dict[int, int] = {}
        self._failed = False

    def observe(self, rec: dict[str, Any]) -> None:
        if self._failed:
            return
        try:
            self._observe(rec)
        except Exception as e:  # noqa: BLE001 - a failing writer (full disk) never stops training
            self._failed = True
            log.error("tensorboard: cannot write to %s (%s); TensorBoard scalars are off from here", self.logdir, e)

    def _observe(self, rec: dict[str, Any]) -> None:
        ev = rec.get("event")
        w = self.writer
        t = rec.get("t")
        if ev == "step":
            s, cid, step = rec["server_step"], rec["client"], rec["step"]
            b = (rec.get("bytes_in") or 0) + (rec.get("bytes_out") or 0)
            self._bytes += b
            self._client_bytes[cid] = self._client_bytes.get(cid, 0) + b
            self._client_step[cid] = step
            w.add_scalar("loss/all", rec["loss"], s, walltime=t)
            w.add_scalar(f"loss/client_{cid}", rec["loss"], step, walltime=t)
            w.add_scalar("bytes/step", b, s, walltime=t)
            w.add_scalar("bytes/cumulative", self._bytes, s, walltime=t)
            w.add_scalar(f"bytes/client_{cid}_cumulative", self._client_bytes[cid], step, walltime=t)
            for tag, field in (("decode_ms", "decode_ms"), ("compute_ms", "compute_ms"),
                               ("calibration_ms", "backward_ms"), ("encode_ms", "encode_ms"),
                               ("edge_encode_ms", "edge_encode_ms")):
                v = rec.get(field)
                if isinstance(v, (int, float)):
                    w.add_scalar(f"time/{tag}", v, s, walltime=t)
        elif ev == "eval" and isinstance(rec.get("correct"), int):
            cid = rec["client"]
            step = self._client_step.get(cid, 0)
            cur = self._eval.get(cid)
            if cur is not None and cur[0] != step:
                self._finish_eval(cid, t)
                cur = None
            if cur is None:
                cur = self._eval[cid] = [step, 0, 0]
            cur[1] += rec.get("n") or 0
            cur[2] += rec["correct"]
        elif ev in ("client_done", "client_stopped", "client_timeout", "client_dropped"):
            self._finish_eval(rec.get("client"), t)
        elif ev == "fedavg":
            w.add_scalar("fedavg/clients", len(rec.get("clients") or ()), rec["round"], walltime=t)
        elif ev == "stop":
            for cid in list(self._eval):
                self._finish_eval(cid, t)
            w.flush()

    def _finish_eval(self, cid: Any, t: float | None) -> None:
        cur = self._eval.pop(cid, None)
        if cur is not None and cur[1]:
            self.writer.add_scalar(f"accuracy/client_{cid}", cur[2] / cur[1], cur[0], walltime=t)

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception as e:  # noqa: BLE001
            log.error("tensorboard: closing %s failed: %s", self.logdir, e)
