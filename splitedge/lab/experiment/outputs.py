"""The output directory of ``splitedge experiment``: its marker, and the files rebuilt from
every finished run.

Outputs in the output directory (created with a ``.splitedge-experiment`` marker; a non-empty
directory without one is refused, see :func:`check_out_dir`):

* ``runs/<run id>/``: the processes' commands, logs, ``cloud-metrics.jsonl``, the clients'
  summaries ``edge-<i>.json``, ``settings.json``, this run's ``evals.jsonl``, its TensorBoard
  scalars in ``tensorboard/`` (``tensorboard --logdir OUT/runs`` compares the runs) and, when done,
  ``result.json``;
* ``evals.jsonl``: one line per evaluation point of every finished run (see
  :func:`eval_points` for the fields);
* ``results.md`` and ``results.json``: per group and setting, one row per codec (see
  :func:`build_report`);
* ``plots/<group>-accuracy-time.png``, ``<group>-accuracy-traffic.png``,
  ``<group>-bytes-per-step.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import UserError
from .config import Experiment
from .plots import draw_plots
from .report import _machine, build_report, render_markdown
from .run import _point_lines, _write_jsonl, load_result


MARKER = ".splitedge-experiment"  # marks an output directory this command created or took over


def check_out_dir(out: Path) -> bool:
    """Refuses (:class:`UserError`) an output directory that is not this command's to write.

    Accepted: a directory that does not exist yet or is empty, and one with the :data:`MARKER`.
    Anything else (say, ``--out`` mistyped as a directory of the user's own with a
    ``results.md`` in it) would have files overwritten. Returns whether the marker is missing.
    """
    if not out.exists():
        return True
    if not out.is_dir():
        raise UserError(f"output directory {out} exists and is not a directory")
    if (out / MARKER).is_file():
        return False
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise UserError(f"output directory {out}: cannot read: {e.strerror or e}") from None
    if empty:
        return True
    raise UserError(f"output directory {out} is not empty and was not written by splitedge experiment (it has no "
                    f"{MARKER} file); choose another --out")


def init_out_dir(out: Path, text: str) -> None:
    """Creates (or takes over, see :func:`check_out_dir`) the output directory; writes its
    marker, then ``config.toml``."""
    from ...fsutil import atomic_write_bytes

    unmarked = check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if unmarked:
            (out / MARKER).write_text("written by `splitedge experiment`: its runs, results and plots; a rerun with "
                                      "this output directory resumes and rewrites them\n")
        atomic_write_bytes(out / "config.toml", text.encode("utf-8"))
    except OSError as e:
        raise UserError(f"output directory {out}: cannot write: {e.strerror or e}") from None


def write_outputs(exp: Experiment, failed: list[dict[str, Any]], plots: bool = True) -> dict[str, Any]:
    """evals.jsonl, results.json, results.md (and the plots) from every finished run."""
    from ...fsutil import atomic_write_bytes, atomic_write_json

    results: dict[str, dict[str, Any]] = {}
    lines: list[dict[str, Any]] = []
    for run, _ in exp.runs():
        r = load_result(exp.out, run)
        if r is not None:
            results[run.run_id] = r
            lines += _point_lines(run, r)
    exp.out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(exp.out / "evals.jsonl", lines)
    report = build_report(exp, results)
    report["failed"] = failed
    report["machine"] = _machine()
    atomic_write_json(exp.out / "results.json", report)
    atomic_write_bytes(exp.out / "results.md", render_markdown(exp, report, failed).encode())
    if plots and results:
        draw_plots(exp, report, results, exp.out / "plots")
    return report
