"""``splitedge bench load``: one real ``cloud-serve`` process and N simulated edge clients.

The cloud is the real program (a subprocess on TCP loopback) serving a small model: by
default ResNet-18 cut 3 for 1x16x16 inputs, exported to a temporary directory (one server
step of batch 8 is then tens of milliseconds on one thread, most of it the backward pass
and SGD update of the 11 M server parameters; ``--model mobilenet_v2`` is lighter). The N clients are simulated in this process by one
ZeroMQ poller loop over N DEALER sockets (no ONNX Runtime: the edge's own compute is not
what is measured). Each client says HELLO, then runs ``--steps`` TRAIN steps -- a real
codec payload of the activation shape and random labels, sent as soon as the previous
step's GRAD arrives and has been decoded and checked -- then BYE. All clients run at once.

Reported: steps per second over the whole run (all clients, first TRAIN to last GRAD),
the latency of one step as a client sees it (TRAIN sent to GRAD received: the server's
work plus its queue, since it applies one step at a time) as p50/p99/max, the server's own
time per step (from the GRAD timings), and the errors (any ERROR reply, a reply that does
not match, a client silent for ``--timeout``). The cloud's metrics are cross-checked: it
must have applied exactly clients x steps steps and counted no error.

Figures vary with the machine's load; they are measurements of this run, not thresholds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from ...errors import FiniteFloat, InputShape, UserError
from ...export.zoo_names import MODEL_NAMES, check_cut
from ...fsutil import check_writable_file

if TYPE_CHECKING:
    import zmq


@dataclass
class SimClient:
    cid: int
    sock: zmq.Socket
    payloads: list[bytes]
    labels: list[bytes]
    state: str = "hello"  # hello -> train -> bye -> done (or failed)
    step: int = 0  # the step in flight (or the last one done)
    sent_at: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)


def _wait_for_cloud(ctx, endpoint: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    import zmq

    from ...wire import protocol as P

    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send_multipart(P.pack_request(P.ping(t=0), 1))
        deadline = time.monotonic() + timeout_s
        while not s.poll(200):
            if proc.poll() is not None:
                raise click.ClickException(f"cloud-serve exited with code {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise click.ClickException(f"cloud-serve did not answer within {timeout_s:.0f}s:\n{_tail(log)}")
        s.recv_multipart()
    finally:
        s.close()


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_load(artifacts: Path, workdir: Path, *, clients: int, steps: int, batch_size: int, codec: str, bits: int | None,
             cloud_threads: int, timeout_s: float, seed: int, status_page: bool = False) -> dict:
    """Runs the cloud and the simulated clients; returns the figures (see the module docstring).

    With ``status_page`` the cloud also serves ``--status`` and a viewer polls it as an open page does
    (``/status.json`` every second, the page itself every 5 s) for the whole run."""
    import zmq

    from ... import codecs as sc
    from .. import launch
    from ...wire import protocol as P
    from ...export import manifest as mf

    m = mf.load(artifacts)
    port = launch.free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    metrics = workdir / "cloud-metrics.jsonl"
    log = workdir / "cloud.log"
    cmd = launch.script("cloud-serve") + [
        "--artifacts", str(artifacts), "--bind", endpoint, "--codec", codec, "--metrics", str(metrics),
        "--expect-clients", str(clients), "--exit-when-done", "--log-every", "0", "--threads", str(cloud_threads),
    ] + (["--bits", str(bits)] if bits is not None else [])
    viewer = None
    if status_page:
        status_port = launch.free_port()
        cmd += ["--status", f"127.0.0.1:{status_port}"]
        viewer = _PageViewer(f"http://127.0.0.1:{status_port}/")
    proc = launch.popen_logged(cmd, log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ctx: zmq.Context = zmq.Context.instance()
    sims: list[SimClient] = []
    errors: Counter = Counter()
    try:
        _wait_for_cloud(ctx, endpoint, proc, 120.0, log)
        if viewer is not None:
            viewer.start()
        # the payloads: a few real encodes per client, reused in turn (encoding is the edge's work, not measured)
        rng = np.random.default_rng(seed)
        enc = sc.get(codec, **({"bits": bits} if bits is not None else {}))
        shape = (batch_size, *m.activation_shape)
        pool = [enc.encode(rng.standard_normal(shape).astype(np.float32), step=1, total_rounds=steps)
                for _ in range(4)]
        poller = zmq.Poller()
        by_sock = {}
        for cid in range(clients):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, f"sim-{cid}-{os.getpid()}".encode())
            s.connect(endpoint)
            ys = [rng.integers(0, m.num_classes, batch_size).astype("<i8").tobytes() for _ in range(4)]
            c = SimClient(cid, s, pool, ys)
            sims.append(c)
            poller.register(s, zmq.POLLIN)
            by_sock[s] = c

        def send_train(c: SimClient) -> None:
            c.step += 1
            k = c.step % len(c.payloads)
            frames = P.pack_request(P.train(step=c.step, n=batch_size, total_rounds=steps, encode_ms=0.0,
                                            activation=c.payloads[k], labels=np.frombuffer(c.labels[k], "<i8")),
                                    c.step)  # request id: the step (HELLO is request 0)
            c.sent_at = time.perf_counter()
            c.sock.send_multipart(frames, copy=False)

        def fail(c: SimClient, why: str) -> None:
            errors[why] += 1
            c.state = "failed"

        for c in sims:
            c.sock.send_multipart(P.pack_request(P.hello(
                client_id=c.cid, num_clients=clients, model=m.model, cut=m.cut,
                activation_shape=m.activation_shape, input_shape=m.input_shape, num_classes=m.num_classes,
                samples=batch_size * steps, resume_step=0, planned_steps=steps), 0))
            c.sent_at = time.perf_counter()
        t_first = t_last = None
        while any(c.state not in ("done", "failed") for c in sims):
            ready = dict(poller.poll(100))
            now = time.perf_counter()
            for c in sims:
                if c.state not in ("done", "failed") and now - c.sent_at > timeout_s:
                    fail(c, f"no reply within {timeout_s:.0f}s")
            if proc.poll() is not None and any(c.state not in ("done", "failed") for c in sims):
                for c in sims:
                    if c.state not in ("done", "failed"):
                        fail(c, f"cloud-serve exited with code {proc.returncode}")
                break
            for sock in ready:
                c = by_sock[sock]
                frames = sock.recv_multipart(copy=False)
                t_recv = time.perf_counter()
                if c.state in ("done", "failed"):
                    continue
                try:
                    msg = P.unpack(frames)
                except P.ProtocolError as e:
                    fail(c, f"malformed reply: {e}")
                    continue
                if msg.type == P.MsgType.ERROR:
                    fail(c, f"ERROR {msg.header.get('code')}")
                    continue
                if c.state == "hello" and msg.type == P.MsgType.WELCOME:
                    if msg.header["codec"]["name"] != codec:
                        fail(c, f"WELCOME with codec {msg.header['codec']['name']}")
                        continue
                    c.state = "train"
                    t_first = t_first or time.perf_counter()
                    send_train(c)
                elif c.state == "train" and msg.type == P.MsgType.GRAD and msg.header["reply_to"] == c.step:
                    c.latencies_ms.append((t_recv - c.sent_at) * 1000)
                    t_last = t_recv
                    tm = msg.header["timings"]
                    c.server_ms.append(sum(tm[k] for k in ("decode_ms", "compute_ms", "backward_ms", "encode_ms")))
                    grad = sc.decode(frames[1].buffer)  # what an edge does with it, and a check that it is one
                    if grad.shape != shape or not np.isfinite(grad).all():
                        fail(c, f"gradient of shape {grad.shape}")
                        continue
                    if c.step < steps:
                        send_train(c)
                    else:
                        c.state = "bye"
                        c.sent_at = time.perf_counter()
                        c.sock.send_multipart(P.pack_request(P.bye(reason="finished", steps=c.step), c.step + 1))
                elif c.state == "bye" and msg.type == P.MsgType.BYE_ACK:
                    c.state = "done"
                elif msg.type != P.MsgType.PONG:
                    fail(c, f"unexpected {msg.type.name} while in {c.state}")
        if viewer is not None:  # before the cloud exits (--exit-when-done): what it answered while it served
            viewer.stop()
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = None
            errors["cloud-serve did not exit after every client's BYE"] += 1
    finally:
        if viewer is not None:
            viewer.stop()
        for c in sims:
            c.sock.close(linger=0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    lat = np.array([v for c in sims for v in c.latencies_ms]) if sims else np.zeros(0)
    srv = np.array([v for c in sims for v in c.server_ms]) if sims else np.zeros(0)
    done_steps = int(lat.size)
    wall = (t_last - t_first) if (t_first is not None and t_last is not None and t_last > t_first) else float("nan")
    events = launch.read_jsonl(metrics)
    cloud_steps = sum(1 for e in events if e.get("event") == "step")
    cloud_errors = sum(1 for e in events if e.get("event") == "error")
    if rc not in (0, None):
        errors[f"cloud-serve exited with code {rc}"] += 1
    if cloud_steps != done_steps:
        errors[f"cloud applied {cloud_steps} steps, the clients saw {done_steps} GRADs"] += 1
    if cloud_errors:
        errors[f"cloud counted {cloud_errors} errors"] += 1

    def pct(a: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(a, q)), 3) if a.size else None

    return {
        "benchmark": "load", "clients": clients, "steps_per_client": steps, "batch_size": batch_size,
        "model": m.model, "cut": m.cut, "input_shape": list(m.input_shape), "activation_shape": list(shape),
        "codec": enc.name, "codec_params": enc.params, "payload_bytes": len(pool[0]), "cloud_threads": cloud_threads,
        "steps": done_steps, "clients_finished": sum(c.state == "done" for c in sims),
        "wall_s": round(wall, 3), "steps_per_s": round(done_steps / wall, 2) if done_steps and wall == wall else None,
        "latency_ms": {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": round(float(lat.max()), 3) if lat.size else None,
                       "mean": round(float(lat.mean()), 3) if lat.size else None},
        "server_step_ms": {"p50": pct(srv, 50), "p99": pct(srv, 99)},
        "cloud_steps": cloud_steps, "cloud_errors": cloud_errors,
        "errors": sum(errors.values()), "error_kinds": dict(errors),
        "status_page": status_page, "status_polls": viewer.polls if viewer else 0,
        "status_poll_errors": viewer.errors if viewer else 0,
    }


class _PageViewer:
    """Polls a status page as a browser tab showing it does: /status.json every second, / every 5 s."""

    def __init__(self, url: str):
        import threading

        self.url = url
        self.polls = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-viewer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import urllib.request

        n = 0
        while not self._stop.wait(1.0):
            for path in (["", "status.json"] if n % 5 == 0 else ["status.json"]):
                try:
                    with urllib.request.urlopen(self.url + path, timeout=5) as r:
                        r.read()
                    self.polls += 1
                except OSError:
                    self.errors += 1
            n += 1


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--clients", type=click.IntRange(min=1), default=32, show_default=True,
              help="Simulated edge clients, all connected to the one cloud at once.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="TRAIN steps per client.")
@click.option("--batch-size", type=click.IntRange(min=2), default=8, show_default=True,
              help="Samples per step (at least 2: the model's BatchNorm layers train on batches).")
@click.option("--codec", default="uq", show_default=True, help="Codec of the activations and gradients.")
@click.option("--bits", type=click.IntRange(1, 8), default=4, show_default=True,
              help="Bits of the codec (ignored by codecs without a bit width).")
@click.option("--model", type=click.Choice(MODEL_NAMES), default="resnet18", show_default=True,
              help="Zoo model to export.")
@click.option("--cut", default="3", show_default=True, metavar="N|NAME",
              help="Cut of the exported model: an index or a unit name (export-client --list-cuts).")
@click.option("--input-shape", type=InputShape(), default="1,16,16", show_default=True,
              help="Input shape C,H,W (or CxHxW) of the exported model (small, so that one server step is short).")
@click.option("--artifacts", type=click.Path(file_okay=False, exists=True), default=None,
              help="Use these exported artifacts instead of exporting --input-shape to a temporary directory.")
@click.option("--cloud-threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="cloud-serve's torch threads (0: torch's default).")
@click.option("--timeout", "timeout_s", type=FiniteFloat(min=1), default=120.0, show_default=True,
              help="Seconds a client waits for a reply before the run counts an error.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the activations and labels.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@click.option("--status-page", is_flag=True,
              help="Measure what cloud-serve --status costs: run the load without the status page, then with it and a "
                   "viewer polling it as an open page does, three times in turn (off, on, ...), and print the server "
                   "step's time of each, their ratios and the spread of the runs without it (the machine's noise).")
def main(clients, steps, batch_size, codec, bits, model, cut, input_shape, artifacts, cloud_threads, timeout_s, seed,
         json_path, status_page):
    """One cloud-serve, N simulated edge clients: steps/s and p50/p99 step latency."""
    from ... import codecs as sc

    if codec not in sc.available():
        raise click.BadParameter(f"unknown codec {codec!r}; available: {', '.join(sc.available())}", param_hint="--codec")
    bits_or_none = bits if "bits" in sc.get(codec).params else None
    shape = input_shape
    try:
        check_cut(model, cut)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--cut") from None
    if artifacts is not None:
        from ...export import manifest as mf

        try:
            mf.load(artifacts)
        except mf.ManifestError as e:
            raise UserError(f"--artifacts: {e}") from None
    if json_path:  # found out now, not after the run (whose results would be lost)
        try:
            check_writable_file(json_path)
        except OSError as e:
            raise UserError(f"--json: {e.strerror or e}") from None
    with tempfile.TemporaryDirectory(prefix="splitedge-load-") as tmp:
        work = Path(tmp)
        if artifacts is None:
            from ...export import onnx_export as oe

            artifacts = work / "artifacts"
            click.echo(f"exporting {model} cut {cut} for {'x'.join(map(str, shape))} to a temporary directory ...")
            try:
                oe.export(oe.ExportRequest(model, cut, input_shape=shape, out=str(artifacts)))
            except (ValueError, oe.ExportError) as e:
                raise click.UsageError(str(e)) from None
        kw = dict(clients=clients, steps=steps, batch_size=batch_size, codec=codec, bits=bits_or_none,
                  cloud_threads=cloud_threads, timeout_s=timeout_s, seed=seed)
        if status_page:
            _status_page_comparison(Path(artifacts), work, kw, json_path)
            return
        r = run_load(Path(artifacts), work, **kw)
    lat, srv = r["latency_ms"], r["server_step_ms"]
    click.echo(f"\none cloud-serve ({r['model']} cut {r['cut']}, input {'x'.join(map(str, r['input_shape']))}, "
               f"{r['codec']} {r['codec_params']}, {r['cloud_threads'] or 'default'} torch thread(s)), "
               f"{r['clients']} simulated clients x {r['steps_per_client']} steps of batch {r['batch_size']}")
    click.echo(f"  steps:            {r['steps']} of {r['clients'] * r['steps_per_client']} "
               f"({r['clients_finished']} clients finished; the cloud applied {r['cloud_steps']})")
    click.echo(f"  throughput:       {r['steps_per_s']} steps/s over {r['wall_s']} s")
    click.echo(f"  step latency:     p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms "
               "(TRAIN sent -> GRAD received)")
    click.echo(f"  server step time: p50 {srv['p50']} ms, p99 {srv['p99']} ms (decode + model + backward + encode)")
    click.echo(f"  errors:           {r['errors']}" + (f" {r['error_kinds']}" if r["errors"] else ""))
    click.echo(json.dumps(r))
    if json_path:
        try:
            Path(json_path).write_text(json.dumps(r, indent=2) + "\n")
        except OSError as e:  # e.g. a full disk since the check: the results are on stdout above
            raise click.ClickException(f"--json: cannot write {json_path}: {e.strerror or e} "
                                       "(the results are the JSON line above)") from None
        click.echo(f"wrote {json_path}")
    if r["errors"]:
        raise SystemExit(1)


def _status_page_comparison(artifacts: Path, work: Path, kw: dict, json_path: str | None, pairs: int = 3) -> None:
    """``--status-page``: the same load without and with the status page (and a viewer), alternating."""
    runs = []
    order = [False, True] * pairs
    for i, on in enumerate(order):
        click.echo(f"run {i + 1}/{len(order)}: status page {'on, polled' if on else 'off'} ...")
        d = work / f"run{i}"
        d.mkdir()
        r = run_load(artifacts, d, status_page=on, **kw)
        runs.append(r)
        click.echo(f"  server step p50 {r['server_step_ms']['p50']} ms, p99 {r['server_step_ms']['p99']} ms; "
                   f"{r['steps_per_s']} steps/s; errors {r['errors']}"
                   + (f"; {r['status_polls']} page requests answered, {r['status_poll_errors']} failed" if on else ""))
    off = [r["server_step_ms"]["p50"] for r in runs if not r["status_page"]]
    on_ = [r["server_step_ms"]["p50"] for r in runs if r["status_page"]]
    ratios = sorted(b / a for a, b in zip(off, on_) if a and b)
    noise = max(off) / min(off) if off and min(off) else float("nan")
    click.echo(f"\nserver step p50 without the status page: {', '.join(map(str, off))} ms; with it and a viewer: "
               f"{', '.join(map(str, on_))} ms")
    click.echo(f"ratio with/without, pair by pair: {', '.join(f'{x:.3f}' for x in ratios)} (median "
               f"{ratios[len(ratios) // 2]:.3f}); the runs without it differ among themselves by up to {noise:.3f}x "
               "(the machine's noise)")
    out = {"benchmark": "load-status-page", "runs": runs, "p50_off_ms": off, "p50_on_ms": on_,
           "ratios": [round(x, 4) for x in ratios], "off_spread": round(noise, 4)}
    click.echo(json.dumps(out))
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    if any(r["errors"] or r["status_poll_errors"] for r in runs):
        raise SystemExit(1)
