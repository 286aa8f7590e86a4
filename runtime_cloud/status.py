"""A run while it trains: the live state behind ``cloud-serve --status`` and its HTTP page.

:class:`StatusBoard` is fed by the cloud's training loop -- every metrics event it writes
(``observe``), and a few times a second the sessions' liveness (``sync``) -- and keeps a small,
bounded picture of the run: who is connected, each client's step, loss, bytes, link rate and last
evaluation, and short histories for the charts. Feeding it is O(1) per event under a lock held for
microseconds, so the training loop never waits for the page.

:class:`StatusServer` serves that picture read-only over HTTP from a daemon thread (the standard
library's ``ThreadingHTTPServer``): ``/`` is a self-contained page that polls ``/status.json`` once a
second and redraws its table and SVG charts; ``/status.json`` is the same data for scripts. The
JSON is built at most twice a second however many viewers poll, outside the training loop.

``/status.json``::

    {"run": {model, cut, codec, grad_codec, session, bind, uptime_s, server_step, steps_per_s,
             bytes_in, bytes_out, payload_bytes, fp32_payload_bytes, compression, errors,
             phases_ms: {decode, compute, calibration, encode, edge_encode, edge_link_queue}},
     "clients": [{client_id, state, step, planned_steps, loss, accuracy, eval_samples, samples,
                  bytes_in, bytes_out, link_bytes_per_s, since_last_s, done}],
     "series": {t, server_step, loss, step_ms, bytes}}

A client's ``state`` is ``connected`` (a message within the stall time), ``stalled`` (silent for
longer, not yet timed out), ``waiting`` (stopped with Ctrl-C and may ``--resume``, or its edge
weights wait for a FedAvg round) or ``gone`` (timed out, disconnected, or finished its plan:
``done`` is then true).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("cloud-serve")

HISTORY = 600  # points per chart (server steps, thinned when a run is longer)
STALL_S = 10.0  # seconds of silence after which an active client shows as stalled (at least)
JSON_MAX_AGE_S = 0.5  # /status.json is rebuilt at most this often, whatever the number of viewers


class _Client:
    __slots__ = ("client_id", "step", "planned", "loss", "samples", "bytes_in", "bytes_out", "last_seen",
                 "state", "done", "eval_step", "eval_n", "eval_correct", "accuracy", "eval_samples", "recent")

    def __init__(self, client_id: int):
        self.client_id = client_id
        self.step = 0
        self.planned: int | None = None
        self.loss: float | None = None
        self.samples = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_seen = time.time()
        self.state = "connected"
        self.done = False
        self.eval_step: int | None = None  # the client step of the evaluation being received
        self.eval_n = 0
        self.eval_correct = 0
        self.accuracy: float | None = None  # of the last complete evaluation
        self.eval_samples = 0
        self.recent: deque = deque(maxlen=20)  # (t, bytes of the step) for the link rate

    def finish_eval(self) -> None:
        if self.eval_step is not None and self.eval_n:
            self.accuracy = self.eval_correct / self.eval_n
            self.eval_samples = self.eval_n
        self.eval_step, self.eval_n, self.eval_correct = None, 0, 0


class StatusBoard:
    """The live picture of one cloud's run (thread-safe: fed by the loop, read by the page)."""

    def __init__(self, *, history: int = HISTORY, stall_s: float = STALL_S):
        self._lock = threading.Lock()
        self._history = history
        self.stall_s = stall_s
        self.run: dict[str, Any] = {}
        self.started = time.time()
        self.server_step = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.payload = 0
        self.fp32_payload = 0
        self.errors = 0
        self.clients: dict[int, _Client] = {}
        self.series: deque = deque(maxlen=history)  # (t, server_step, loss, step_ms, bytes)
        self._thin = 1  # keep one step in _thin once the history is full
        self._steps_t: deque = deque(maxlen=256)  # times of recent server steps (steps/s)
        self._phases: dict[str, deque] = {k: deque(maxlen=256) for k in
                                          ("decode", "compute", "calibration", "encode", "edge_encode", "edge_link_queue")}
        self._json: bytes = b""
        self._json_t = 0.0

    def _client(self, cid: Any) -> _Client | None:
        if not isinstance(cid, int):
            return None
        c = self.clients.get(cid)
        if c is None:
            c = self.clients[cid] = _Client(cid)
        return c

    # ---------------------------------------------------------------- fed by the training loop

    def observe(self, rec: dict[str, Any]) -> None:
        """One metrics event (the dict written to ``--metrics``), as the cloud writes it."""
        ev = rec.get("event")
        t = rec.get("t") or time.time()
        with self._lock:
            if ev == "start":
                self.run = {k: rec.get(k) for k in ("model", "cut", "codec", "grad_codec", "session", "bind")}
                self.server_step = rec.get("server_step") or 0
            elif ev == "step":
                self._on_step(rec, t)
            elif ev == "client_joined":
                c = self._client(rec.get("client"))
                if c is not None:
                    c.step = rec.get("last_step") or 0
                    c.samples = rec.get("samples") or 0
                    c.planned = rec.get("planned_steps")
                    c.last_seen, c.state, c.done = t, "connected", False
            elif ev == "eval":
                c = self._client(rec.get("client"))
                if c is not None and isinstance(rec.get("correct"), int):
                    if c.eval_step != c.step:
                        c.finish_eval()
                        c.eval_step = c.step
                    c.eval_n += rec.get("n") or 0
                    c.eval_correct += rec["correct"]
                    c.last_seen = t
            elif ev in ("client_done", "client_stopped", "client_timeout", "client_dropped"):
                c = self._client(rec.get("client"))
                if c is not None:
                    c.finish_eval()
                    c.done = ev == "client_done"
                    c.state = "waiting" if ev == "client_stopped" else "gone"
            elif ev == "error":
                self.errors += 1
            elif ev == "resume":
                self.server_step = rec.get("server_step") or 0

    def _on_step(self, rec: dict[str, Any], t: float) -> None:
        self.server_step = rec.get("server_step") or self.server_step + 1
        b_in, b_out = rec.get("bytes_in") or 0, rec.get("bytes_out") or 0
        self.bytes_in += b_in
        self.bytes_out += b_out
        self.payload += (rec.get("payload_in") or 0) + (rec.get("payload_out") or 0)
        n_values = 1
        for d in rec.get("shape") or ():
            n_values *= d
        self.fp32_payload += 2 * 4 * n_values  # the activation and its gradient as float32
        cloud_ms = sum(rec.get(k) or 0 for k in ("decode_ms", "compute_ms", "backward_ms", "encode_ms"))
        c = self._client(rec.get("client"))
        if c is not None:
            if c.recent:
                gap_ms = (t - c.recent[-1][0]) * 1000 - cloud_ms
                if gap_ms >= 0:
                    self._phases["edge_link_queue"].append(gap_ms)
            c.step = rec.get("step") or c.step
            c.loss = rec.get("loss")
            c.bytes_in += b_in
            c.bytes_out += b_out
            c.last_seen, c.state = t, "connected"
            c.recent.append((t, b_in + b_out))
        for key, field in (("decode", "decode_ms"), ("compute", "compute_ms"), ("calibration", "backward_ms"),
                           ("encode", "encode_ms"), ("edge_encode", "edge_encode_ms")):
            v = rec.get(field)
            if isinstance(v, (int, float)):
                self._phases[key].append(float(v))
        self._steps_t.append(t)
        if self.server_step % self._thin == 0:
            if len(self.series) == self.series.maxlen:  # full: keep every other point, then half as many
                kept = list(self.series)[::2]
                self.series.clear()
                self.series.extend(kept)
                self._thin *= 2
            self.series.append((round(t, 3), self.server_step, rec.get("loss"), round(cloud_ms, 3), b_in + b_out))

    def sync(self, sessions: list[tuple[int, float, bool, bool, bool]]) -> None:
        """The sessions' liveness: (client id, seconds since its last message, active, timed out, waiting)."""
        now = time.time()
        with self._lock:
            for cid, silent_s, active, timed_out, waiting in sessions:
                c = self._client(cid)
                if c is None:
                    continue
                c.last_seen = now - silent_s
                if c.done:
                    c.state = "gone"
                elif waiting:
                    c.state = "waiting"
                elif timed_out or not active:
                    c.state = "gone"
                else:
                    c.state = "stalled" if silent_s > self._stall_after(c) else "connected"

    def _stall_after(self, c: _Client) -> float:
        """At least ``stall_s``; longer for a client whose steps are slow (three of its step intervals)."""
        if len(c.recent) >= 2:
            interval = (c.recent[-1][0] - c.recent[0][0]) / (len(c.recent) - 1)
            return max(self.stall_s, 3 * interval)
        return self.stall_s

    # ---------------------------------------------------------------- read by the page

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:  # copy what is needed; everything else happens outside the lock
            clients = [(c.client_id, c.state, c.step, c.planned, c.loss, c.accuracy, c.eval_samples, c.samples,
                        c.bytes_in, c.bytes_out, list(c.recent), c.last_seen, c.done)
                       for c in self.clients.values()]
            phases = {k: list(v) for k, v in self._phases.items()}
            steps_t = list(self._steps_t)
            series = list(self.series)
            run = dict(self.run, server_step=self.server_step, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                       payload_bytes=self.payload, fp32_payload_bytes=self.fp32_payload, errors=self.errors)
        recent = [t for t in steps_t if now - t <= 30]
        run["uptime_s"] = round(now - self.started, 1)
        run["steps_per_s"] = round(len(recent) / (now - recent[0]), 3) if len(recent) >= 2 and now > recent[0] else 0.0
        run["compression"] = round(run["fp32_payload_bytes"] / run["payload_bytes"], 2) if run["payload_bytes"] else None
        run["phases_ms"] = {k: (round(_median(v), 3) if v else None) for k, v in phases.items()}
        out_clients = []
        for (cid, state, step, planned, loss, acc, eval_n, samples, b_in, b_out, rec, seen, done) in sorted(clients):
            rate = None
            if len(rec) >= 2 and rec[-1][0] > rec[0][0]:
                rate = round(sum(b for _, b in rec[1:]) / (rec[-1][0] - rec[0][0]), 1)
            out_clients.append({
                "client_id": cid, "state": state, "step": step, "planned_steps": planned, "loss": loss,
                "accuracy": acc, "eval_samples": eval_n, "samples": samples, "bytes_in": b_in, "bytes_out": b_out,
                "link_bytes_per_s": rate, "since_last_s": round(max(0.0, now - seen), 1), "done": done,
            })
        cols = list(zip(*series)) if series else [(), (), (), (), ()]
        return {"run": run, "clients": out_clients,
                "series": {"t": list(cols[0]), "server_step": list(cols[1]), "loss": list(cols[2]),
                           "step_ms": list(cols[3]), "bytes": list(cols[4])}}

    def json_bytes(self) -> bytes:
        """``snapshot()`` as JSON, rebuilt at most every JSON_MAX_AGE_S seconds."""
        now = time.monotonic()
        if not self._json or now - self._json_t >= JSON_MAX_AGE_S:
            self._json = json.dumps(self.snapshot(), allow_nan=False, default=_json_default).encode()
            self._json_t = now
        return self._json


def _json_default(o: Any) -> Any:
    return float(o)


def _median(v: list[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ------------------------------------------------------------------------------------------ HTTP


def parse_address(text: str) -> tuple[str, int]:
    """``PORT`` (loopback), ``HOST:PORT`` or ``[V6]:PORT``; ValueError naming what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"{text!r} is not PORT or HOST:PORT") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"port {p} is not in 0..65535")
    return host, p


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class _Handler(BaseHTTPRequestHandler):
    board: StatusBoard  # set on the subclass made per server
    server_version = "splitedge-status"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._reply(PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/status.json":
            self._reply(self.board.json_bytes(), "application/json")
        else:
            self._reply(b"not found: the status page is / and its data /status.json\n", "text/plain; charset=utf-8",
                        HTTPStatus.NOT_FOUND)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _refuse(self) -> None:
        self._reply(b"read-only: GET / or /status.json\n", "text/plain; charset=utf-8", HTTPStatus.METHOD_NOT_ALLOWED)

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _reply(self, body: bytes, ctype: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, HEAD")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the page's requests are not news
        pass


class StatusServer:
    """Serves a :class:`StatusBoard` over HTTP from a daemon thread, until ``close()``."""

    def __init__(self, board: StatusBoard, host: str, port: int):
        handler = type("Handler", (_Handler,), {"board": board})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="status-page", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>splitedge: cloud status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:16px 24px;color:#222;background:#fafafa}
h1{font-size:18px;margin:0 0 4px} .sub{color:#666;margin-bottom:12px}
.kpis{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:12px}
.kpi{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 10px;min-width:110px}
.kpi b{display:block;font-size:16px} .kpi span{color:#666;font-size:12px}
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:12px}
th,td{border-bottom:1px solid #eee;padding:4px 8px;text-align:right} th{background:#f0f0f0}
td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}
.connected{color:#17803d} .stalled{color:#b45309;font-weight:bold} .waiting{color:#1d4ed8} .gone{color:#888}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}
.chart h2{font-size:13px;margin:0 0 4px;font-weight:600}
svg polyline{fill:none;stroke-width:1.5} #err{color:#b91c1c}
</style></head><body>
<h1>splitedge cloud <span id="title"></span></h1>
<div class="sub" id="sub">waiting for the first update...</div><div id="err"></div>
<div class="kpis" id="kpis"></div>
<table id="clients"><thead><tr><th>client</th><th>state</th><th>step / plan</th><th>loss</th><th>accuracy</th>
<th>in</th><th>out</th><th>link</th><th>last message</th></tr></thead><tbody></tbody></table>
<div class="charts">
<div class="chart"><h2>loss per server step</h2><svg id="chart-loss" width="420" height="160"><polyline stroke="#2563eb" points=""/></svg></div>
<div class="chart"><h2>traffic per step (bytes, activation + gradient)</h2><svg id="chart-bytes" width="420" height="160"><polyline stroke="#16a34a" points=""/></svg></div>
<div class="chart"><h2>cloud time per step (ms: decode, compute, calibration, encode)</h2><svg id="chart-latency" width="420" height="160"><polyline stroke="#dc2626" points=""/></svg></div>
</div>
<div class="sub" id="phases"></div>
<script>
"use strict";
function fmtB(n){if(n==null)return "-";const u=["B","kB","MB","GB","TB"];let i=0;while(Math.abs(n)>=1000&&i<u.length-1){n/=1000;i++}return (i?n.toFixed(1):Math.round(n))+" "+u[i]}
function fmt(x,d){return x==null?"-":Number(x).toFixed(d)}
function esc(s){return String(s).replace(/[&<>"']/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]))}
function draw(id,xs,ys,unit){
  const svg=document.getElementById(id),pl=svg.querySelector("polyline"),W=+svg.getAttribute("width"),H=+svg.getAttribute("height"),p=16;
  const pts=[];for(let i=0;i<ys.length;i++){if(ys[i]!=null&&isFinite(ys[i]))pts.push([xs[i],ys[i]])}
  svg.querySelectorAll("text").forEach(t=>t.remove());
  if(pts.length<2){pl.setAttribute("points","");return}
  let x0=pts[0][0],x1=pts[pts.length-1][0],y0=Math.min(0,...pts.map(q=>q[1])),y1=Math.max(...pts.map(q=>q[1]));
  if(x1==x0)x1=x0+1; if(y1==y0){y1=y0+1}
  pl.setAttribute("points",pts.map(q=>((q[0]-x0)/(x1-x0)*(W-2*p)+p).toFixed(1)+","+(H-p-(q[1]-y0)/(y1-y0)*(H-2*p)).toFixed(1)).join(" "));
  for(const [v,y] of [[y1,11],[y0,H-3]]){const t=document.createElementNS("http://www.w3.org/2000/svg","text");
    t.setAttribute("x",W-4);t.setAttribute("y",y);t.setAttribute("text-anchor","end");t.setAttribute("font-size","10");t.setAttribute("fill","#666");
    t.textContent=unit=="B"?fmtB(v):(Math.abs(v)>=100?Math.round(v):Number(v).toPrecision(3))+(unit?" "+unit:"");svg.appendChild(t)}
}
async function tick(){
  try{
    const r=await fetch("status.json",{cache:"no-store"}); const s=await r.json(); const run=s.run;
    document.getElementById("err").textContent="";
    document.getElementById("title").textContent=(run.model||"")+" cut "+(run.cut??"");
    const cn=x=>x&&x.name?x.name+(x.params&&x.params.bits?" "+x.params.bits+"-bit":""):"?";
    document.getElementById("sub").textContent="activations "+cn(run.codec)+", gradients "+cn(run.grad_codec)+"; up "+fmt(run.uptime_s,0)+" s";
    const k=[["server steps",run.server_step],["steps/s",fmt(run.steps_per_s,2)],["bytes in",fmtB(run.bytes_in)],["bytes out",fmtB(run.bytes_out)],
      ["vs fp32",run.compression==null?"-":run.compression+"x less"],["clients",s.clients.length],["errors",run.errors]];
    document.getElementById("kpis").innerHTML=k.map(([n,v])=>'<div class="kpi"><b>'+esc(v)+"</b><span>"+esc(n)+"</span></div>").join("");
    document.querySelector("#clients tbody").innerHTML=s.clients.map(x=>"<tr data-client='"+x.client_id+"'><td>"+x.client_id+"</td><td class='"+esc(x.state)+"'>"+esc(x.state)+(x.done?" (done)":"")+
      "</td><td class='step'>"+x.step+(x.planned_steps?" / "+x.planned_steps:"")+"</td><td>"+fmt(x.loss,4)+"</td><td>"+(x.accuracy==null?"-":(100*x.accuracy).toFixed(2)+"% of "+x.eval_samples)+
      "</td><td>"+fmtB(x.bytes_in)+"</td><td>"+fmtB(x.bytes_out)+"</td><td>"+(x.link_bytes_per_s==null?"-":fmtB(x.link_bytes_per_s)+"/s")+"</td><td>"+fmt(x.since_last_s,1)+" s ago</td></tr>").join("");
    const se=s.series; draw("chart-loss",se.server_step,se.loss,""); draw("chart-bytes",se.server_step,se.bytes,"B"); draw("chart-latency",se.server_step,se.step_ms,"ms");
    const ph=run.phases_ms||{}; document.getElementById("phases").textContent="median ms per step (edge link queue: a client's time between its steps less the cloud's work): "+Object.entries(ph).map(([a,b])=>a.replace(/_/g," ")+" "+fmt(b,2)).join(", ");
  }catch(e){document.getElementById("err").textContent="cannot reach the cloud: "+e}
}
tick(); setInterval(tick,1000);
</script></body></html>
"""
