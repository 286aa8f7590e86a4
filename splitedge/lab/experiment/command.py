"""``splitedge experiment CONFIG.toml``: the command; runs the selected grid points one after
the other, resuming, then rebuilds the outputs."""

from __future__ import annotations

import fnmatch
import sys
import time
from pathlib import Path
from typing import Any

import click

from ...errors import FiniteFloat, UserError
from .config import ConfigError, Experiment, RunConfig, load_config
from .outputs import check_out_dir, init_out_dir, write_outputs
from .report import fmt_kb
from .run import _artifacts, execute, load_result, run_dir
import contextlib


def _select(exp: Experiment, patterns: tuple[str, ...]) -> list[tuple[RunConfig, float]]:
    runs = exp.runs()
    if not patterns:
        return runs
    groups_of: dict[str, list[str]] = {}
    for g in exp.groups:
        for r in g.runs:
            groups_of.setdefault(r.run_id, []).append(g.name)
    return [(r, t) for r, t in runs
            if any(fnmatch.fnmatchcase(name, p) for p in patterns for name in [r.run_id, *groups_of[r.run_id]])]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory [default: the config's out, else runs/experiments/<name>]; a non-empty "
                   "directory that this command did not write is refused.")
@click.option("--dry-run", is_flag=True, help="List the runs (done or to do) and exit.")
@click.option("--only", "only", multiple=True, metavar="PATTERN",
              help="Run only runs whose id or group name matches this glob (repeatable); the report covers "
                   "every finished run.")
@click.option("--report-only", is_flag=True, help="Rebuild evals.jsonl, results.md/json and the plots; run nothing.")
@click.option("--progress-every", type=FiniteFloat(min=1), default=30.0, show_default=True,
              help="Seconds between progress lines of a running run.")
def main(config, out, dry_run, only, report_only, progress_every):
    """Run a grid of real split-training runs from a TOML config; write a table and plots.

    \b
    Each run is one cloud-serve and K edge-train processes on this machine, one run
    at a time. A finished run (its result.json) is never redone: rerun the same
    command after an interruption or a failure and only the missing runs execute.
    Exit code 0 when every selected run finished, 1 if some failed, 2 for a bad config
    or an output directory it did not write.

    \b
    Example:
      splitedge experiment experiments/papers.toml --dry-run
      splitedge experiment experiments/papers.toml
      splitedge experiment experiments/papers.toml --only 'sgq4-*' --out /tmp/sgq
    """
    try:
        exp = load_config(config, out, check_data=not report_only)
    except ConfigError as e:
        raise UserError(str(e)) from None
    check_out_dir(exp.out)
    runs = _select(exp, only)
    if only and not runs:
        raise click.BadParameter(f"no run id or group name matches {', '.join(only)}", param_hint="--only")
    echo = lambda s: click.echo(s)  # noqa: E731
    done = {r.run_id for r, _ in runs if load_result(exp.out, r) is not None}
    if dry_run:
        echo(f"{exp.name}: {len(runs)} runs ({len(done)} done) in {exp.out}")
        for g in exp.groups:
            echo(f"  group {g.name}: {len(g.runs)} runs, target {100 * g.target_accuracy:g}%")
        for i, (r, _) in enumerate(runs, 1):
            echo(f"[{i}/{len(runs)}] {'done' if r.run_id in done else 'todo'}  {r.run_id}  "
                 f"({r.codec.label}; {r.describe_setting()}; seed {r.seed})")
        return
    init_out_dir(exp.out, exp.text)
    failed: list[dict[str, Any]] = []
    if not report_only:
        t_grid = time.monotonic()
        artifacts: dict[tuple, Path] = {}
        ran = 0
        for i, (r, timeout_s) in enumerate(runs, 1):
            head = f"[{i}/{len(runs)}] {r.run_id}"
            if r.run_id in done:
                echo(f"{head}: done earlier, skipped")
                continue
            if run_dir(exp.out, r).exists():
                echo(f"{head}: removing an unfinished earlier attempt")
            echo(f"{head}: {r.codec.label}; {r.describe_setting()}; seed {r.seed} "
                 f"(grid time so far {time.monotonic() - t_grid:.0f}s)")
            akey = (r.model, r.cut, r.data, r.optimizer, r.lr)
            try:
                if akey not in artifacts:
                    artifacts[akey] = _artifacts(exp.out, r, echo)
            except Exception as e:  # noqa: BLE001 - export errors are the config's fault
                raise UserError(f"cannot export {r.model} cut {r.cut} for {r.data}: {e}") from None
            try:
                res = execute(exp.out, r, artifacts[akey], timeout_s, echo, progress_every)
            except KeyboardInterrupt:
                echo(f"{head}: interrupted; rerun the same command to resume (finished runs are kept)")
                raise
            except Exception as e:  # noqa: BLE001 - a failed run is reported and the grid goes on
                from .. import launch

                msg = str(e) if isinstance(e, launch.RunFailed) else f"{type(e).__name__}: {e}"
                failed.append({"run": r.run_id, "error": msg})
                with contextlib.suppress(OSError):
                    (run_dir(exp.out, r) / "error.txt").write_text(msg + "\n")
                echo(f"{head}: FAILED\n" + "\n".join("      | " + ln for ln in msg.splitlines()))
                continue
            ran += 1
            t = res["traffic"]
            echo(f"      done in {res['wall_s']:.0f}s: final accuracy {100 * res['final_accuracy']:.2f}% (mean of "
                 f"{r.clients}), {fmt_kb(res['payload_bytes_per_step'])} per step, "
                 f"{t['reduction_vs_fp32']:.1f}x less than fp32")
            write_outputs(exp, failed, plots=False)
        echo(f"ran {ran} runs, skipped {len(done)} finished ones, {len(failed)} failed, "
             f"in {time.monotonic() - t_grid:.0f}s")
    report = write_outputs(exp, failed, plots=True)
    missing = sum(len(x["missing"]) for g in report["groups"] for t in g["tables"] for x in t["rows"])
    echo(f"wrote {exp.out / 'results.md'}, results.json, evals.jsonl and plots/"
         + (f" ({missing} grid points not finished)" if missing else ""))
    if failed:
        echo("failed runs (rerun the same command to retry them):")
        for f in failed:
            echo(f"  {f['run']}: {f['error'].splitlines()[0]}")
        sys.exit(1)
