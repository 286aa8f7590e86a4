"""``splitedge bench step``: the edge's split step on ONNX Runtime, each codec's share of it,
and the same step in PyTorch eager, all measured in one process, medians of repeats.

For each input shape (default 1x28x28 and 3x32x32), cut (default 3 and the cut after
``layer1``) and batch size (default 32 and 64) it exports ResNet-18 to a temporary directory and
times, with a fixed random batch, one row each:

* the edge step on the ORT-training backend: ``forward`` (eval model) + ``train_step`` (backward
  from an injected gradient + optimizer step), as ``edge-train --backend ort-training`` runs it;
* the same step on the portable backend (plain ONNX graphs on an ``InferenceSession``, one
  forward per step, numpy SGD), as ``edge-train --backend portable`` runs it;
* the same step in PyTorch eager (forward, ``backward(grad)``, SGD step) on the same client
  sub-model;
* each codec's encode of the real activation and decode of its payload, in ms and as a share of
  the ORT-training step;
* the peak resident memory of the process while each of the three steps is timed (Linux: the
  peak is reset through ``/proc/self/clear_refs`` before each; the figure includes what the
  process already held, e.g. torch and ONNX Runtime themselves).

Figures vary with the machine's load; compare ratios within one run, not across runs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ...errors import MAX_THREADS, UserError, writable_file_option
from ...export.zoo_names import MODEL_NAMES


def _median_ms(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _proc_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_memory(fn) -> tuple[float | None, float | None]:
    """Runs ``fn``; returns (peak RSS, peak RSS minus the RSS before) in MiB while it ran, or Nones where
    the peak cannot be reset (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size, to the current RSS
    except OSError:
        fn()
        return None, None
    before = _proc_kib("VmRSS")
    fn()
    peak = _proc_kib("VmHWM")
    if peak is None or before is None:
        return None, None
    return round(peak / 1024, 1), round(max(0, peak - before) / 1024, 1)


def measure(shape: tuple[int, int, int], *, model: str, cut: int | str, batch: int, codecs: list[str], bits: int,
            repeat: int, threads: int | None, artifacts: dict | None = None) -> dict:
    """One row. ``artifacts`` caches exports by (shape, cut) between rows of one run."""
    import torch

    from ... import codecs as sc
    from ...export import onnx_export as oe
    from ...export import split, zoo
    from ...runtime_edge.ort_backend import EdgeModel
    from ...runtime_edge.portable_backend import EdgeModel as PortableModel

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    cache = artifacts if artifacts is not None else {}
    key = (tuple(shape), str(cut))
    if key not in cache:
        tmp = tempfile.mkdtemp(prefix="splitedge-bench-")
        out = Path(tmp) / "a"
        _, m = oe.export(oe.ExportRequest(model, cut, input_shape=shape, out=str(out), lr=1e-6))
        cache[key] = (out, m)
    out, m = cache[key]

    # Each backend lives only inside its function, so it is freed before the next one is measured.
    def measure_ort():
        em = EdgeModel(out, threads=threads)
        act = em.forward(x)
        grad = (rng.standard_normal(act.shape) * 1e-3).astype(np.float32)

        def ort_step():
            em.forward(x)
            em.train_step(x, grad)

        fwd_ms = _median_ms(lambda: em.forward(x), repeat)
        step_ms = 0.0

        def ort_timed():
            nonlocal step_ms
            step_ms = _median_ms(ort_step, repeat)

        ort_mem = _peak_memory(ort_timed)
        return act, grad, fwd_ms, step_ms, ort_mem

    def measure_portable():
        pm = PortableModel(out, threads=threads)

        def portable_step():
            pm.forward(x)
            pm.train_step(x, grad)

        portable_ms = 0.0

        def portable_timed():
            nonlocal portable_ms
            portable_ms = _median_ms(portable_step, repeat)

        portable_mem = _peak_memory(portable_timed)
        return portable_ms, portable_mem

    act, grad, fwd_ms, step_ms, ort_mem = measure_ort()
    portable_ms, portable_mem = measure_portable()

    if threads:
        torch.set_num_threads(threads)
    client, _ = split.split(model, zoo.build(model, m.num_classes, shape[0]), m.cut)
    client.train()
    opt = torch.optim.SGD(client.parameters(), lr=1e-6)
    xt, gt = torch.from_numpy(x), torch.from_numpy(grad)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        client(xt).backward(gt)
        opt.step()

    torch_ms = 0.0

    def torch_timed():
        nonlocal torch_ms
        torch_ms = _median_ms(torch_step, repeat)

    torch_mem = _peak_memory(torch_timed)

    rows = []
    for name in codecs:
        params = {"bits": bits} if "bits" in sc.get(name).params else {}
        c = sc.get(name, **params)
        blob = c.encode(act)
        enc_ms = _median_ms(lambda c=c: c.encode(act), repeat)
        dec_ms = _median_ms(lambda blob=blob: sc.decode(blob), repeat)
        rows.append({
            "codec": name, "params": c.params, "encode_ms": round(enc_ms, 3), "decode_ms": round(dec_ms, 3),
            "encode_share": round(enc_ms / step_ms, 4), "decode_share": round(dec_ms / step_ms, 4),
            "payload_bytes": len(blob), "compression_vs_fp32": round(act.nbytes / len(blob), 2),
        })
    return {
        "input_shape": list(shape), "model": model, "cut": m.cut, "cut_name": m.cut_name, "batch": batch,
        "activation_shape": list(act.shape), "ort_forward_ms": round(fwd_ms, 3), "ort_step_ms": round(step_ms, 3),
        "torch_step_ms": round(torch_ms, 3), "ort_over_torch": round(step_ms / torch_ms, 3),
        "portable_ms": round(portable_ms, 3), "ort_training_ms": round(step_ms, 3), "torch_ms": round(torch_ms, 3),
        "portable_over_torch": round(portable_ms / torch_ms, 3),
        "ort_training_over_portable": round(step_ms / portable_ms, 3),
        "peak_rss_mib": {"portable": portable_mem[0], "ort_training": ort_mem[0], "torch": torch_mem[0]},
        "peak_extra_mib": {"portable": portable_mem[1], "ort_training": ort_mem[1], "torch": torch_mem[1]},
        "codecs": rows,
    }


def _shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.strip().lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError
    return parts


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--shapes", default="1x28x28,3x32x32", show_default=True, help="Input shapes CxHxW, comma-separated list.")
@click.option("--model", type=click.Choice(MODEL_NAMES), default="resnet18", show_default=True, help="Zoo model.")
@click.option("--cut", "cut_list", default="3,layer1", show_default=True,
              help="Cuts, comma-separated: indices or unit names (see export-client --list-cuts).")
@click.option("--batch-size", "batch_list", default="32,64", show_default=True,
              help="Batch sizes, comma-separated.")
@click.option("--codecs", "codec_list", default=None, help="Codecs to time, comma-separated [default: all].")
@click.option("--bits", type=click.IntRange(1, 8), default=4, show_default=True, help="Bits of the quantizing codecs.")
@click.option("--repeat", type=click.IntRange(min=1), default=20, show_default=True, help="Timed repeats (median).")
@click.option("--threads", type=click.IntRange(0, MAX_THREADS), default=0, show_default=True,
              help="ORT and torch intra-op threads (0: their defaults).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=writable_file_option,
              help="Also write the results here.")
def main(shapes, model, cut_list, batch_list, codec_list, bits, repeat, threads, json_path):
    """Time the edge's split step on both edge backends (portable, ORT training) and in PyTorch eager,
    with each one's peak memory, and each codec's share of the step.

    \b
    Targets of the portable backend, read from this run's own figures: its step within 1.25x of
    PyTorch eager's, and at least 2.5x faster than ORT training's, on every row.
    """
    from ... import codecs as sc

    try:
        shape_list = [_shape(s) for s in shapes.split(",") if s.strip()]
    except ValueError:
        shape_list = []
    if not shape_list:
        raise click.BadParameter(f"{shapes!r}: write shapes as CxHxW, e.g. 1x28x28,3x32x32", param_hint="--shapes")
    names = codec_list.split(",") if codec_list else sc.available()
    for n in names:
        if n not in sc.available():
            raise click.BadParameter(f"unknown codec {n!r}; available: {', '.join(sc.available())}", param_hint="--codecs")
    cuts = [int(c) if c.strip().isdigit() else c.strip() for c in cut_list.split(",") if c.strip()]
    if not cuts:
        raise click.BadParameter(f"{cut_list!r}: give cut indices or names, e.g. 3,layer1", param_hint="--cut")
    try:
        batches = [int(b) for b in batch_list.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"{batch_list!r}: give positive integers, e.g. 32,64", param_hint="--batch-size")
    results = []
    exports: dict = {}
    rows_todo = [(shape, cut, b) for shape in shape_list for cut in cuts for b in batches]
    try:
        _run_rows(rows_todo, exports, results, model, names, bits, repeat, threads)
    finally:
        import shutil

        for out, _ in exports.values():
            shutil.rmtree(Path(out).parent, ignore_errors=True)
    if results:
        worst_torch = max(r["portable_over_torch"] for r in results)
        worst_ort = min(r["ort_training_over_portable"] for r in results)
        click.echo(f"\nportable targets over {len(results)} rows: step <= 1.25x torch eager (worst "
                   f"{worst_torch:.2f}x: {'met' if worst_torch <= 1.25 else 'not met'}); >= 2.5x faster than ORT "
                   f"training (worst {worst_ort:.2f}x: {'met' if worst_ort >= 2.5 else 'not met'})")
    if json_path:
        Path(json_path).write_text(json.dumps({"benchmark": "step", "repeat": repeat, "results": results}, indent=2))
        click.echo(f"\nwrote {json_path}")


def _run_rows(rows_todo, exports, results, model, names, bits, repeat, threads) -> None:
    """Measures and prints each row, appending to ``results`` (kept if a later row fails)."""
    from ...export.onnx_export import ExportError

    for shape, cut, batch_size in rows_todo:
        try:
            r = measure(shape, model=model, cut=cut, batch=batch_size, codecs=names, bits=bits, repeat=repeat,
                        threads=threads or None, artifacts=exports)
        except ExportError as e:  # a cut out of range, a shape too small for the model
            raise UserError(f"{model} cut {cut}, input {'x'.join(map(str, shape))}: {e}") from None
        except (MemoryError, RuntimeError) as e:  # numpy/torch/ORT: an absurd --batch-size or shape
            text = str(e)
            if not (isinstance(e, MemoryError) or "allocate" in text or "not enough memory" in text):
                raise
            raise UserError(f"{model} cut {cut}, batch {batch_size}, input {'x'.join(map(str, shape))}: out of "
                            f"memory ({text.splitlines()[0][:200] if text else type(e).__name__})") from None
        results.append(r)
        click.echo(f"\n{model} cut {r['cut']} (after {r['cut_name']}), batch {batch_size}, input {'x'.join(map(str, shape))} -> activation "
                   f"{'x'.join(map(str, r['activation_shape'][1:]))}")
        pk, px = r["peak_rss_mib"], r["peak_extra_mib"]

        def mem(k, pk=pk, px=px):
            return f"peak RSS {pk[k]:.0f} MiB (+{px[k]:.0f})" if pk[k] is not None else "peak RSS n/a"

        click.echo(f"  edge step on ORT (forward + train step + optimizer): {r['ort_step_ms']:.2f} ms "
                   f"(forward alone {r['ort_forward_ms']:.2f} ms), {mem('ort_training')}")
        click.echo(f"  edge step on the portable backend: {r['portable_ms']:.2f} ms, {mem('portable')}")
        click.echo(f"  same step in PyTorch eager: {r['torch_step_ms']:.2f} ms, {mem('torch')} -> ORT / torch = "
                   f"{r['ort_over_torch']:.2f}, portable / torch = {r['portable_over_torch']:.2f}, ORT / portable = "
                   f"{r['ort_training_over_portable']:.2f}")
        click.echo(f"  {'codec':<11} {'encode ms':>9} {'% of step':>9} {'decode ms':>9} {'% of step':>9} {'x fp32':>7}")
        for c in r["codecs"]:
            click.echo(f"  {c['codec']:<11} {c['encode_ms']:>9.3f} {100 * c['encode_share']:>8.1f}% "
                       f"{c['decode_ms']:>9.3f} {100 * c['decode_share']:>8.1f}% {c['compression_vs_fp32']:>7.1f}")
        judged = [c for c in r["codecs"] if c["codec"] in ("sgq", "slacc")]
        if judged:  # issue 3's target, read from this run's own figures
            click.echo(f"  target: SGQ and SL-ACC encode under 10% of the edge step ({0.1 * r['ort_step_ms']:.2f} ms): "
                       + ", ".join(f"{c['codec']} {100 * c['encode_share']:.1f}% "
                                   f"({'met' if c['encode_share'] < 0.1 else 'not met'})" for c in judged))
