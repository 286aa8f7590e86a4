"""One run of the grid: the exported halves, the processes, the run's ``result.json``.

A run is *done* when its ``result.json`` exists (written atomically, last, with the run's exact
settings): :func:`load_result` is what makes a rerun of the grid resume.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from bisect import bisect_right
from collections import Counter
from pathlib import Path
from typing import Any, cast
from collections.abc import Callable, Iterable

from .config import RESULT_VERSION, RunConfig, _slug
from .report import codec_payload_size


def _artifacts(exp_out: Path, run: RunConfig, log: Callable[[str], None]) -> Path:
    """Exports the edge/cloud halves once per (model, cut, input shape, classes, optimizer, lr)."""
    from ...export import onnx_export as oe
    from ...runtime_edge import data as D

    ds = D.load(run.data, split="test")
    key = {"model": run.model, "cut": run.cut, "input_shape": list(ds.input_shape), "num_classes": ds.num_classes,
           "optimizer": run.optimizer, "lr": run.lr}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    out = exp_out / "artifacts" / f"{_slug(run.model)}-cut{_slug(str(run.cut))}-{digest}"
    if (out / "manifest.json").exists():
        return out
    log(f"exporting {run.model} cut {run.cut} for {'x'.join(map(str, ds.input_shape))} inputs, "
        f"{ds.num_classes} classes, {run.optimizer} lr {run.lr} -> {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    oe.export(oe.ExportRequest(run.model, run.cut, input_shape=cast("tuple[int, int, int]", tuple(ds.input_shape)), num_classes=ds.num_classes,
                               optimizer=run.optimizer, lr=run.lr, out=str(out)))
    return out


def _cumulative(events: list[dict[str, Any]], key: Callable[[dict], int]) -> dict[int, tuple[list[int], list[int]]]:
    """Per client: (sorted steps, cumulative ``key`` up to and including each)."""
    per: dict[int, list[tuple[int, int]]] = {}
    for e in events:
        per.setdefault(int(e["client"]), []).append((int(e["step"]), key(e)))
    out = {}
    for c, items in per.items():
        items.sort()
        steps, cum, total = [], [], 0
        for s, v in items:
            total += v
            steps.append(s)
            cum.append(total)
        out[c] = (steps, cum)
    return out


def _upto(table: tuple[list[int], list[int]] | None, step: int) -> int:
    if table is None:
        return 0
    i = bisect_right(table[0], step)
    return table[1][i - 1] if i else 0


def eval_points(summaries: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's evaluation points, one per step at which clients evaluated, in step order.

    * ``step``: the clients' own step count at the evaluation (every client evaluates at
      the same steps: every ``eval_every`` and at its last step);
    * ``clients_reporting``: how many clients evaluated at that step (all of them, unless
      their step counts differ, as with ``epochs`` on unequal shards);
    * ``accuracy``, ``loss``: mean over the reporting clients; ``accuracy_per_client``: one
      entry per client id (``None`` where it did not evaluate at that step);
    * ``time_s``: mean over the reporting clients of the seconds since the client started
      training (``edge-train``'s ``time_s``); ``train_time_s``: the same minus the client's
      own evaluation time so far (its ``eval_s`` summed), the time axis of the plots and of
      time-to-target;
    * ``payload_bytes``: activation + gradient payload bytes of the training steps up to
      this step, summed over all clients (from the cloud's step metrics);
      ``fp32_payload_bytes``: what fp32 payloads of the same tensors would have been;
    * ``wire_bytes``: bytes sent + received by the reporting clients so far (every ZeroMQ
      frame: training, evaluation, FedAvg, heartbeats), from ``edge-train``'s counters.
    """
    steps = [e for e in events if e.get("event") == "step"]
    payload = _cumulative(steps, lambda e: int(e["payload_in"]) + int(e["payload_out"]))
    fp32 = _cumulative(steps, lambda e: 2 * codec_payload_size("fp32", {}, e["shape"]))
    by_step: dict[int, dict[int, dict[str, Any]]] = {}
    for cid, s in enumerate(summaries):
        spent = 0.0
        for ev in s["evals"]:
            spent += float(ev.get("eval_s") or 0.0)
            by_step.setdefault(int(ev["step"]), {})[cid] = {**ev, "train_time_s": float(ev["time_s"]) - spent}
    points = []
    k = len(summaries)
    for step in sorted(by_step):
        got = by_step[step]
        n = len(got)
        points.append({
            "step": step, "clients_reporting": n,
            "accuracy": sum(e["accuracy"] for e in got.values()) / n,
            "accuracy_per_client": [got[c]["accuracy"] if c in got else None for c in range(k)],
            "loss": sum(e["loss"] for e in got.values()) / n,
            "time_s": round(sum(e["time_s"] for e in got.values()) / n, 3),
            "train_time_s": round(sum(e["train_time_s"] for e in got.values()) / n, 3),
            "payload_bytes": sum(_upto(payload.get(c), step) for c in range(k)),
            "fp32_payload_bytes": sum(_upto(fp32.get(c), step) for c in range(k)),
            "wire_bytes": sum(int(e["bytes_sent"]) + int(e["bytes_received"]) for e in got.values()),
        })
    return points


def summarize(run: RunConfig, summaries: list[dict[str, Any]], events: list[dict[str, Any]],
              wall_s: float) -> dict[str, Any]:
    """A finished run's ``result.json``."""
    from .. import launch

    steps = [e for e in events if e.get("event") == "step"]
    traffic = launch.traffic(events)
    shapes = Counter(tuple(e["shape"]) for e in steps)
    return {
        "version": RESULT_VERSION, "run": run.run_id, "settings": run.identity(), "label": run.codec.label,
        "wall_s": round(wall_s, 3),
        "final_accuracy": sum(s["final_accuracy"] for s in summaries) / len(summaries),
        "final_accuracy_per_client": [s["final_accuracy"] for s in summaries],
        "steps_per_client": [s["steps"] for s in summaries],
        "traffic": traffic,
        "payload_bytes_per_step": traffic["payload_bytes"] / traffic["steps"] if traffic["steps"] else None,
        "shapes": [[list(s), n] for s, n in sorted(shapes.items())],
        "errors": sum(1 for e in events if e.get("event") == "error"),
        "clients": [{k: s.get(k) for k in ("client_id", "final_accuracy", "final_loss", "steps", "samples",
                                            "shard_samples", "bytes_sent", "bytes_received", "wall_time_s", "link",
                                            "timings", "train_accuracy")} for s in summaries],
        "points": eval_points(summaries, events),
    }


def _point_lines(run: RunConfig, result: dict[str, Any]) -> list[dict[str, Any]]:
    """evals.jsonl lines of one run: the run's settings, then the point."""
    c = run.codec
    head = {"run": run.run_id, "codec": c.label, "codec_name": c.name, "codec_params": dict(c.params),
            "bits": c.bits, "partition": run.partition, "clients": run.clients,
            "bandwidth": run.bandwidth or "unlimited", "latency": run.latency, "seed": run.seed,
            "steps_planned": run.steps, "epochs_planned": run.epochs}
    order = ("step", "clients_reporting", "accuracy", "accuracy_per_client", "loss", "time_s", "train_time_s",
             "payload_bytes", "fp32_payload_bytes", "wire_bytes")
    return [{**head, **{k: p[k] for k in order}, **{k: v for k, v in p.items() if k not in order}}
            for p in result["points"]]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    from ...fsutil import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows).encode())


_ACC_LINE = re.compile(r"client (\d+) step (\d+): test accuracy ([0-9.]+)%")


class _Ticker:
    """Progress of a running run: steps from the cloud's metrics, accuracy from the edge logs."""

    def __init__(self, run: RunConfig, workdir: Path, echo: Callable[[str], None], every_s: float):
        self.run, self.wd, self.echo, self.every = run, workdir, echo, every_s
        self.t0 = time.monotonic()
        self.last = self.t0

    def __call__(self, events: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        per: dict[int, int] = {}
        loss = None
        for e in events:
            if e.get("event") == "step":
                per[e["client"]] = max(per.get(e["client"], 0), e["step"])
                loss = e["loss"]
        mean = sum(per.values()) / max(1, self.run.clients)
        planned = f"/{self.run.steps}" if self.run.steps else ""
        acc = self._last_accuracy()
        self.echo(f"      {now - self.t0:5.0f}s  step {mean:.0f}{planned} (mean over clients)"
                  + (f", loss {loss:.3f}" if loss is not None else "")
                  + (f", last test accuracy {acc}" if acc else ""))

    def _last_accuracy(self) -> str | None:
        best: tuple[int, int, float] | None = None
        for log in sorted(self.wd.glob("edge-*.log")):
            try:
                for line in log.read_text(errors="replace").splitlines()[-200:]:
                    m = _ACC_LINE.search(line)
                    if m:
                        cand = (int(m.group(2)), int(m.group(1)), float(m.group(3)))
                        if best is None or cand[0] > best[0]:
                            best = cand
            except OSError:
                continue
        return f"{best[2]:.1f}% (client {best[1]} at step {best[0]})" if best else None


def run_dir(out: Path, run: RunConfig) -> Path:
    return out / "runs" / run.run_id


def load_result(out: Path, run: RunConfig) -> dict[str, Any] | None:
    """The run's result if it finished (with these exact settings), else None."""
    path = run_dir(out, run) / "result.json"
    try:
        r = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if r.get("version") != RESULT_VERSION or r.get("settings") != run.identity():
        return None
    return r


def execute(out: Path, run: RunConfig, artifacts: Path, timeout_s: float, echo: Callable[[str], None],
            tick_s: float = 30.0) -> dict[str, Any]:
    """Runs one grid point from scratch (a partial directory is deleted first); returns its result."""
    from .. import launch
    from ...fsutil import atomic_write_json

    wd = run_dir(out, run)
    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    atomic_write_json(wd / "settings.json", {"run": run.run_id, "settings": run.identity(),
                                             "artifacts": str(artifacts), "timeout_s": timeout_s})
    # TensorBoard scalars per run: `tensorboard --logdir OUT/runs` shows every run side by side
    spec = launch.RunSpec(wd, artifacts, run.clients, run.cloud_args() + ["--tensorboard", str(wd / "tensorboard")],
                          run.edge_args(), env={"OMP_NUM_THREADS": str(run.threads)}, timeout_s=timeout_s)
    res = launch.run(spec, on_tick=_Ticker(run, wd, echo, tick_s))
    result = summarize(run, res.summaries, res.metrics(), res.wall_s)
    _write_jsonl(wd / "evals.jsonl", _point_lines(run, result))
    atomic_write_json(wd / "result.json", result)  # last: marks the run done
    return result
