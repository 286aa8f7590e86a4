"""``splitedge demo``: the main job on one machine, with real processes and real data.

1. export ResNet-18 cut 3 for the data set's input shape (Fashion-MNIST: 1x28x28);
2. start ``cloud-serve`` on a free TCP loopback port;
3. start ``--clients`` ``edge-train`` processes, each on its IID shard;
4. train for ``--epochs`` with SGQ 4-bit in both directions;
5. print the test accuracy and the traffic against what fp32 payloads would have been.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..errors import Checked, FiniteFloat, UserError
from ..export.zoo_names import MODEL_NAMES, check_cut
from ..runtime_edge.data import parse_scheme

MARKER = ".splitedge-demo"  # marks a --workdir this command wrote (and may replace)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--workdir", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="Where artifacts, logs, metrics and summaries go (replaced on every run; a non-empty directory "
                   "that an earlier demo did not write is refused).")
@click.option("--data", default="fashion-mnist", show_default=True, help="Data set (see edge-train --data).")
@click.option("--model", type=click.Choice(MODEL_NAMES), default="resnet18", show_default=True, help="Zoo model.")
@click.option("--cut", default="3", show_default=True, help="Cut (index or unit name).")
@click.option("--clients", type=click.IntRange(min=1), default=2, show_default=True, help="Edge processes.")
@click.option("--partition", type=Checked(parse_scheme, "iid|dirichlet:ALPHA"), default="iid", show_default=True, help="iid or dirichlet:ALPHA.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, help="Epochs per client.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps per client instead of --epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Batch size.")
@click.option("--codec", default="sgq", show_default=True, help="Codec in both directions.")
@click.option("--bits", type=click.IntRange(1, 8), default=4, show_default=True, help="Codec bits.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=0.02, show_default=True, help="Learning rate of edge and cloud (SGD).")
@click.option("--momentum", type=FiniteFloat(0, 1), default=0.9, show_default=True, help="Cloud SGD momentum.")
@click.option("--eval-samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="Test samples to evaluate on (0: all 10000).")
@click.option("--timeout", type=FiniteFloat(min=1), default=7200, show_default=True, help="Give up after this many seconds.")
def demo(workdir, data, model, cut, clients, partition, epochs, steps, batch_size, codec, bits, lr, momentum,
         eval_samples, timeout):
    """Export, serve and train on this machine: the whole system in one command."""
    import shutil

    ctx = click.get_current_context()
    if steps is not None and ctx.get_parameter_source("epochs") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("give --epochs or --steps, not both")

    from . import launch
    from ..export import onnx_export as oe
    from .. import codecs as sc
    from ..runtime_edge import data as D

    try:  # before the workdir is replaced: a typo must not cost the last demo's results
        check_cut(model, cut)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--cut") from None
    try:
        takes_bits = "bits" in sc.get(codec).params
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--codec") from None
    try:
        test = D.load(data, split="test")
    except D.DatasetError as e:
        raise UserError(str(e)) from None
    wd = Path(workdir)
    if wd.exists():
        # replace only what an earlier demo wrote: --workdir may be mistyped as a directory that matters
        if not wd.is_dir():
            raise UserError(f"--workdir {wd} exists and is not a directory")
        if any(wd.iterdir()) and not (wd / MARKER).is_file():
            raise UserError(f"--workdir {wd} is not empty and was not written by splitedge demo; "
                            "choose another directory or remove it yourself")
        shutil.rmtree(wd)
    try:
        wd.mkdir(parents=True)
        (wd / MARKER).write_text("written by `splitedge demo`; replaced by its next run with this --workdir\n")
    except OSError as e:
        raise UserError(f"--workdir {wd}: cannot write: {e}") from None
    t0 = time.monotonic()
    click.echo(f"[1/4] exporting {model} cut {cut} for {data} ({'x'.join(map(str, test.input_shape))}, "
               f"{test.num_classes} classes)")
    try:
        _, m = oe.export(oe.ExportRequest(model, cut, input_shape=tuple(test.input_shape),
                                          num_classes=test.num_classes, lr=lr, out=str(wd / "artifacts")))
    except oe.ExportError as e:
        raise UserError(str(e)) from None
    click.echo(f"      activation {'x'.join(map(str, m.activation_shape))} per sample, "
               f"{m.extra['edge_params']:,} edge parameters")
    codec_args = ["--codec", codec] + (["--bits", str(bits)] if takes_bits else [])
    cloud_args = [*codec_args, "--lr", str(lr), "--momentum", str(momentum), "--threads", "1",
                  "--checkpoint-dir", str(wd / "cloud-checkpoints"), "--log-every", "100"]
    edge_args = ["--data", data, "--partition", partition, "--batch-size", str(batch_size), "--threads", "1",
                 "--eval-samples", str(eval_samples)]
    edge_args += ["--steps", str(steps)] if steps else ["--epochs", str(epochs)]
    click.echo(f"[2/4] starting cloud-serve ({codec} {bits}-bit both ways) and {clients} edge-train processes; "
               f"logs in {wd}/")
    status_port = launch.free_port()
    cloud_args += ["--status", f"127.0.0.1:{status_port}"]
    spec = launch.RunSpec(wd / "run", wd / "artifacts", clients, cloud_args, edge_args, timeout_s=timeout)

    tty = sys.stdout.isatty()
    last = [0.0, ""]  # when, and what, the last progress line said

    def status(events) -> str | None:
        steps_done = [e for e in events if e.get("event") == "step"]
        if not steps_done:
            return None
        return (f"      {len(steps_done)} server steps, loss {steps_done[-1]['loss']:.3f}, "
                f"{_fmt_bytes(sum(x['bytes_in'] + x['bytes_out'] for x in steps_done))} on the wire")

    def tick(events):
        now = time.monotonic()
        if not tty and now - last[0] < 15:
            return
        line = status(events)
        if line is None:
            return
        last[0], last[1] = now, line
        click.echo(("\r" + line + "   ") if tty else line, nl=not tty)

    click.echo(f"[3/4] training; watch it live at http://127.0.0.1:{status_port}/")
    try:
        result = launch.run(spec, on_tick=tick)
    except launch.RunFailed as e:
        raise click.ClickException(str(e)) from None
    events = result.metrics()
    final = status(events)  # the last tick may be older than the last steps
    if tty:
        click.echo(("\r" + final + "   ") if final is not None else "")
    elif final is not None and final != last[1]:
        click.echo(final)
    t = launch.traffic(events)
    accs = [s["final_accuracy"] for s in result.summaries]
    click.echo(f"[4/4] done in {time.monotonic() - t0:.0f}s")
    for s in result.summaries:
        click.echo(f"      client {s['client_id']}: {s['steps']} steps, test accuracy {100 * s['final_accuracy']:.2f}% "
                   f"on {s['eval_samples']} samples, sent {_fmt_bytes(s['bytes_sent'])}, "
                   f"received {_fmt_bytes(s['bytes_received'])}")
    click.echo(f"      activation payloads {_fmt_bytes(t['activation_bytes'])}, gradient payloads "
               f"{_fmt_bytes(t['gradient_bytes'])}; fp32 would have sent {_fmt_bytes(t['fp32_payload_bytes'])}: "
               f"{t['reduction_vs_fp32']:.1f}x less traffic than fp32")
    summary = {"accuracy_per_client": accs, "traffic": t, "wall_s": round(result.wall_s, 1), "codec": codec,
               "bits": bits, "model": model, "cut": m.cut, "clients": clients, "data": data}
    (wd / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(f"      summary: {wd / 'demo-summary.json'}")
