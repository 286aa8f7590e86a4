"""results.json and results.md: per group and setting, one row per codec."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from .config import RESULT_VERSION, Experiment, RunConfig


_SIZES: dict[tuple, int] = {}


def codec_payload_size(name: str, params: dict[str, Any], shape: Iterable[int]) -> int:
    """The payload size of a codec whose size depends only on the shape (fp32, fp16, uq)."""
    import numpy as np

    from ... import codecs as sc

    key = (name, tuple(sorted(params.items())), tuple(shape))
    if key not in _SIZES:
        _SIZES[key] = len(sc.get(name, **params).encode(np.zeros(key[2], dtype=np.float32)))
    return _SIZES[key]


def uq_payload_bytes(shapes: list[list], bits: int) -> int:
    """Activation + gradient payload bytes that ``uq`` at ``bits`` would send for these tensors
    (``shapes``: [[shape, steps], ...])."""
    return sum(2 * n * codec_payload_size("uq", {"bits": bits}, shape) for shape, n in shapes)


def time_to_target(points: list[dict[str, Any]], target: float, clients: int) -> dict[str, Any] | None:
    """The first evaluation point (all clients reporting) whose mean accuracy reaches ``target``."""
    for p in points:
        if p["clients_reporting"] == clients and p["accuracy"] >= target:
            return {"train_time_s": p["train_time_s"], "time_s": p["time_s"], "step": p["step"],
                    "payload_bytes": p["payload_bytes"]}
    return None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def build_report(exp: Experiment, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """results.json: per group, per setting (everything but codec and seed), one row per codec.

    A row averages its finished seeds: ``final_accuracy`` (mean over clients, then seeds),
    ``gap_to_fp32`` (row minus the fp32 row of the same setting, in accuracy points),
    ``payload_bytes_per_step`` (activation + gradient payload bytes per client step),
    ``reduction_vs_fp32`` (fp32 payload bytes of the same tensors / this row's),
    ``reduction_vs_uq`` (uq payload bytes at ``uq_bits_used`` for the same tensors / this
    row's; ``uq_bits_used`` = the codec's bits, or the group's ``uq_bits`` for codecs without),
    ``time_to_target_s`` (train_time_s of the first evaluation point at or above the
    target, mean over seeds; None unless every seed reached it), ``steps_to_target``,
    ``payload_bytes_to_target``.
    """
    groups = []
    for g in exp.groups:
        settings: dict[tuple, list[RunConfig]] = {}
        for r in g.runs:
            settings.setdefault(r.setting(), []).append(r)
        tables = []
        for key, runs in settings.items():
            rows = []
            for codec in g.codecs:
                mine = [r for r in runs if r.codec == codec]
                done = [(r, results[r.run_id]) for r in mine if r.run_id in results]
                row: dict[str, Any] = {"codec": codec.label, "codec_name": codec.name, "codec_params": dict(codec.params),
                                       "runs": [r.run_id for r, _ in done], "missing": [r.run_id for r in mine
                                                                                        if r.run_id not in results]}
                if done:
                    bits = codec.bits if codec.bits is not None else g.uq_bits
                    ttt = [time_to_target(res["points"], g.target_accuracy, r.clients) for r, res in done]
                    reached = [t for t in ttt if t is not None]
                    payload = sum(res["traffic"]["payload_bytes"] for _, res in done)
                    row.update({
                        "seeds": [r.seed for r, _ in done],
                        "final_accuracy": _mean([res["final_accuracy"] for _, res in done]),
                        "payload_bytes_per_step": payload / sum(res["traffic"]["steps"] for _, res in done),
                        "reduction_vs_fp32": sum(res["traffic"]["fp32_payload_bytes"] for _, res in done) / payload,
                        "uq_bits_used": bits,
                        "reduction_vs_uq": sum(uq_payload_bytes(res["shapes"], bits) for _, res in done) / payload,
                        "target_reached": len(reached), "time_to_target_s": None, "steps_to_target": None,
                        "payload_bytes_to_target": None,
                        "wall_s": _mean([res["wall_s"] for _, res in done]),
                    })
                    if reached and len(reached) == len(done):
                        row["time_to_target_s"] = _mean([t["train_time_s"] for t in reached])
                        row["steps_to_target"] = _mean([t["step"] for t in reached])
                        row["payload_bytes_to_target"] = _mean([t["payload_bytes"] for t in reached])
                rows.append(row)
            ref = next((x for x in rows if x["codec_name"] == "fp32" and not x["codec_params"]
                        and "final_accuracy" in x), None)
            for x in rows:
                x["gap_to_fp32"] = (100 * (x["final_accuracy"] - ref["final_accuracy"])
                                    if ref is not None and "final_accuracy" in x else None)
            tables.append({"setting": dict((k, json.loads(v)) for k, v in key), "describe": runs[0].describe_setting(),
                           "rows": rows})
        groups.append({"name": g.name, "title": g.title, "target_accuracy": g.target_accuracy, "uq_bits": g.uq_bits,
                       "tables": tables})
    return {"version": RESULT_VERSION, "experiment": exp.name, "title": exp.title, "config": str(exp.source),
            "groups": groups}


def fmt_kb(n: float) -> str:
    return f"{n / 1000:,.1f} kB"


def fmt_mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def render_markdown(exp: Experiment, report: dict[str, Any], failed: list[dict[str, Any]]) -> str:
    lines = [f"# {exp.title}", "",
             f"Config `{exp.source}`; generated by `splitedge experiment` on {_machine()}.", "",
             "Columns: final test accuracy (mean over clients and seeds); gap to the fp32 row of the same table, "
             "in points; payload bytes per client step (activation + gradient, from the cloud's metrics); how many "
             "times fewer bytes than fp32 and than uq at the codec's bits (`uq_bits` for codecs without) would "
             "send for the same tensors; training time (evaluations excluded, mean over clients), steps and "
             "payload until the mean test accuracy first reached the target at an evaluation point.", ""]
    for g in report["groups"]:
        tgt = 100 * g["target_accuracy"]
        lines += [f"## {g['title']}", ""]
        for t in g["tables"]:
            lines += [f"### {t['describe']}", "",
                      f"| codec | final acc. | gap to fp32 | bytes/step | vs fp32 | vs uq | time to {tgt:g}% | "
                      f"steps to {tgt:g}% | traffic to {tgt:g}% | run wall time |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for x in t["rows"]:
                if "final_accuracy" not in x:
                    lines.append(f"| {x['codec']} | not run | | | | | | | | |")
                    continue
                gap = f"{x['gap_to_fp32']:+.2f}" if x["gap_to_fp32"] is not None else "—"
                if x["time_to_target_s"] is not None:
                    ttt, stt, btt = (f"{x['time_to_target_s']:.0f} s", f"{x['steps_to_target']:.0f}",
                                     fmt_mb(x["payload_bytes_to_target"]))
                else:
                    ttt = "not reached" + (f" ({x['target_reached']}/{len(x['runs'])})" if x["target_reached"] else "")
                    stt = btt = "—"
                lines.append(f"| {x['codec']} | {100 * x['final_accuracy']:.2f}% | {gap} | "
                             f"{fmt_kb(x['payload_bytes_per_step'])} | {x['reduction_vs_fp32']:.1f}× | "
                             f"{x['reduction_vs_uq']:.2f}× (uq{x['uq_bits_used']}) | {ttt} | {stt} | {btt} | "
                             f"{x['wall_s']:.0f} s |")
            lines.append("")
        lines += [f"![accuracy vs time](plots/{g['name']}-accuracy-time.png)",
                  f"![accuracy vs traffic](plots/{g['name']}-accuracy-traffic.png)",
                  f"![bytes per step](plots/{g['name']}-bytes-per-step.png)", ""]
    if failed:
        lines += ["## Failed runs", ""] + [f"* `{f['run']}`: {f['error'].splitlines()[0]}" for f in failed] + [""]
    return "\n".join(lines)
