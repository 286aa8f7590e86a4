"""The plots of an experiment; matplotlib (Agg backend) is imported only when they are drawn."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import Experiment


def draw_plots(exp: Experiment, report: dict[str, Any], results: dict[str, dict[str, Any]], plot_dir: Path) -> list[Path]:
    """Three PNGs per group; one panel per table (setting), one colour per codec, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cmap = plt.get_cmap("tab10")
    for g, gr in zip(exp.groups, report["groups"]):
        colors = {c.label: cmap(i % 10) for i, c in enumerate(g.codecs)}
        n = len(gr["tables"])
        for kind in ("accuracy-time", "accuracy-traffic", "bytes-per-step"):
            fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 4.4), squeeze=False)
            for ax, table in zip(axes[0], gr["tables"]):
                ax.set_title(table["describe"], fontsize=8.5)
                if kind == "bytes-per-step":
                    rows = [x for x in table["rows"] if "payload_bytes_per_step" in x]
                    vals = [x["payload_bytes_per_step"] / 1000 for x in rows]
                    bars = ax.bar(range(len(rows)), vals, color=[colors[x["codec"]] for x in rows])
                    ax.set_yscale("log")
                    ax.set_xticks(range(len(rows)), [x["codec"] for x in rows], rotation=30, ha="right", fontsize=8)
                    ax.set_ylabel("payload kB per client step (activation + gradient)")
                    for b, v, x in zip(bars, vals, rows):
                        ax.annotate(f"{v:,.0f} kB\n{x['reduction_vs_fp32']:.0f}× < fp32", (b.get_x() + b.get_width() / 2, v),
                                    ha="center", va="bottom", fontsize=7)
                    if vals:
                        ax.set_ylim(min(vals) / 2, max(vals) * 4)
                    continue
                for x in table["rows"]:
                    for i, rid in enumerate(x["runs"]):
                        pts = results[rid]["points"]
                        if kind == "accuracy-time":
                            xs = [p["train_time_s"] for p in pts]
                        else:
                            xs = [p["payload_bytes"] / 1e6 for p in pts]
                        ax.plot(xs, [100 * p["accuracy"] for p in pts], marker="o", ms=3, color=colors[x["codec"]],
                                label=x["codec"] if i == 0 else None)
                ax.axhline(100 * g.target_accuracy, color="grey", ls="--", lw=0.8)
                ax.set_ylabel("test accuracy, % (mean over clients)")
                if kind == "accuracy-time":
                    ax.set_xlabel("training time, s (evaluations excluded, mean over clients)")
                else:
                    ax.set_xscale("log")
                    ax.set_xlabel("cumulative payload, MB (all clients, both directions; log)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.suptitle(g.title, fontsize=10)
            fig.tight_layout()
            path = plot_dir / f"{g.name}-{kind}.png"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
            fig.savefig(tmp, dpi=110)
            plt.close(fig)
            os.replace(tmp, path)
            written.append(path)
    return written
