"""``splitedge bench step``: the edge's split step on ONNX Runtime, each codec's share of it,
and the same step in PyTorch eager, all measured in one process, medians of repeats.

For each input shape (default 1x28x28 and 3x32x32) it exports ResNet-18 cut 3 to a
temporary directory and times, with a fixed random batch:

* the edge step on ORT: ``forward`` (eval model) + ``train_step`` (backward from an
  injected gradient + optimizer step), as ``edge-train`` runs it;
* each codec's encode of the real activation and decode of its payload, in ms and as a
  share of that step;
* the same step in PyTorch eager (forward, ``backward(grad)``, SGD step) on the same
  client sub-model: the ratio ORT / torch.

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

from ..errors import MAX_THREADS, UserError, writable_file_option
from ..export.zoo_names import MODEL_NAMES


def _median_ms(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(shape: tuple[int, int, int], *, model: str, cut: int, batch: int, codecs: list[str], bits: int,
            repeat: int, threads: int | None) -> dict:
    import torch

    from .. import codecs as sc
    from ..export import onnx_export as oe
    from ..export import split, zoo
    from .ort_backend import EdgeModel

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "a"
        _, m = oe.export(oe.ExportRequest(model, cut, input_shape=shape, out=str(out), lr=1e-6))
        em = EdgeModel(out, threads=threads)
        act = em.forward(x)
        grad = (rng.standard_normal(act.shape) * 1e-3).astype(np.float32)

        def ort_step():
            em.forward(x)
            em.train_step(x, grad)

        fwd_ms = _median_ms(lambda: em.forward(x), repeat)
        step_ms = _median_ms(ort_step, repeat)

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

        torch_ms = _median_ms(torch_step, repeat)

        rows = []
        for name in codecs:
            params = {"bits": bits} if "bits" in sc.get(name).params else {}
            c = sc.get(name, **params)
            blob = c.encode(act)
            enc_ms = _median_ms(lambda: c.encode(act), repeat)
            dec_ms = _median_ms(lambda: sc.decode(blob), repeat)
            rows.append({
                "codec": name, "params": c.params, "encode_ms": round(enc_ms, 3), "decode_ms": round(dec_ms, 3),
                "encode_share": round(enc_ms / step_ms, 4), "decode_share": round(dec_ms / step_ms, 4),
                "payload_bytes": len(blob), "compression_vs_fp32": round(act.nbytes / len(blob), 2),
            })
    return {
        "input_shape": list(shape), "model": model, "cut": cut, "batch": batch,
        "activation_shape": list(act.shape), "ort_forward_ms": round(fwd_ms, 3), "ort_step_ms": round(step_ms, 3),
        "torch_step_ms": round(torch_ms, 3), "ort_over_torch": round(step_ms / torch_ms, 3), "codecs": rows,
    }


def _shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.strip().lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError
    return parts  # type: ignore[return-value]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--shapes", default="1x28x28,3x32x32", show_default=True, help="Input shapes CxHxW, comma-separated list.")
@click.option("--model", type=click.Choice(MODEL_NAMES), default="resnet18", show_default=True, help="Zoo model.")
@click.option("--cut", type=int, default=3, show_default=True, help="Cut index.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size.")
@click.option("--codecs", "codec_list", default=None, help="Codecs to time, comma-separated [default: all].")
@click.option("--bits", type=click.IntRange(1, 8), default=4, show_default=True, help="Bits of the quantizing codecs.")
@click.option("--repeat", type=click.IntRange(min=1), default=20, show_default=True, help="Timed repeats (median).")
@click.option("--threads", type=click.IntRange(0, MAX_THREADS), default=0, show_default=True,
              help="ORT and torch intra-op threads (0: their defaults).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=writable_file_option,
              help="Also write the results here.")
def main(shapes, model, cut, batch_size, codec_list, bits, repeat, threads, json_path):
    """Time the edge's split step (ORT), each codec's share of it, and PyTorch eager's step."""
    from .. import codecs as sc

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
    from ..export.onnx_export import ExportError

    results = []
    for shape in shape_list:
        try:
            r = measure(shape, model=model, cut=cut, batch=batch_size, codecs=names, bits=bits, repeat=repeat,
                        threads=threads or None)
        except ExportError as e:  # a cut out of range, a shape too small for the model
            raise UserError(f"{model} cut {cut}, input {'x'.join(map(str, shape))}: {e}") from None
        except (MemoryError, RuntimeError) as e:  # numpy/torch/ORT: an absurd --batch-size or shape
            text = str(e)
            if not (isinstance(e, MemoryError) or "allocate" in text or "not enough memory" in text):
                raise
            raise UserError(f"{model} cut {cut}, batch {batch_size}, input {'x'.join(map(str, shape))}: out of "
                            f"memory ({text.splitlines()[0][:200] if text else type(e).__name__})") from None
        results.append(r)
        click.echo(f"\n{model} cut {cut}, batch {batch_size}, input {'x'.join(map(str, shape))} -> activation "
                   f"{'x'.join(map(str, r['activation_shape'][1:]))}")
        click.echo(f"  edge step on ORT (forward + train step + optimizer): {r['ort_step_ms']:.2f} ms "
                   f"(forward alone {r['ort_forward_ms']:.2f} ms)")
        click.echo(f"  same step in PyTorch eager: {r['torch_step_ms']:.2f} ms -> ORT / torch = {r['ort_over_torch']:.2f}")
        click.echo(f"  {'codec':<11} {'encode ms':>9} {'% of step':>9} {'decode ms':>9} {'% of step':>9} {'x fp32':>7}")
        for c in r["codecs"]:
            click.echo(f"  {c['codec']:<11} {c['encode_ms']:>9.3f} {100 * c['encode_share']:>8.1f}% "
                       f"{c['decode_ms']:>9.3f} {100 * c['decode_share']:>8.1f}% {c['compression_vs_fp32']:>7.1f}")
        judged = [c for c in r["codecs"] if c["codec"] in ("sgq", "slacc")]
        if judged:  # issue 3's target, read from this run's own figures
            click.echo(f"  target: SGQ and SL-ACC encode under 10% of the edge step ({0.1 * r['ort_step_ms']:.2f} ms): "
                       + ", ".join(f"{c['codec']} {100 * c['encode_share']:.1f}% "
                                   f"({'met' if c['encode_share'] < 0.1 else 'not met'})" for c in judged))
    if json_path:
        Path(json_path).write_text(json.dumps({"benchmark": "step", "repeat": repeat, "results": results}, indent=2))
        click.echo(f"\nwrote {json_path}")
