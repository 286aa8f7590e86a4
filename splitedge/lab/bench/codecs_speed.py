"""``splitedge bench codecs``: encode/decode throughput, compression and error of every codec.

Every time is the median of ``--repeat`` runs and is also given as a ratio to
``np.copyto`` of the same number of bytes, measured in the same process just before
that codec's runs (the machine is shared and noisy: ratios travel, absolute times
do not).  ``encode x copy`` = copy time / encode time, i.e. encode throughput in units
of memory-copy throughput (higher is faster).  ``ratio`` = fp32 bytes / payload bytes.
``rel.err`` = ||x - x_hat||^2 / ||x||^2, ``max.err`` = max |x - x_hat|.

Inputs are synthetic activation-like tensors, drawn per repeat from one seed:
ReLU(0.8 a + 0.6 b + c) with a (N, 1, H, W) shared by all channels (inter-channel
correlation), b (N, C, H, W) independent, c (1, C, 1, 1) a per-channel offset, all
standard normal: about half the values are zero, as after a ReLU.  Codecs with state
(SGQ/PQ warm start, SL-ACC history) see a warm-up encode first.

``--edge-step`` also measures the real edge step (ONNX Runtime forward + train step of
ResNet-18 cut 3, batch 32, 3x32x32 input, whose activation is 32x64x16x16) in the same
run and prints each encode as a share of it (measured after the codecs: ONNX Runtime's
worker threads spin after a run and would slow whatever runs next on 2 cores).
``--cold`` evicts the caches before every timed run (copy included), the pessimistic
case of a training loop whose ORT step has just displaced the codec's working set;
the default measures back-to-back runs.  Benchmarks never assert timings.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

import click
import numpy as np

from ...errors import UserError, writable_file_option

DEFAULT_SHAPES = "32x64x16x16,32x64x56x56,128x64x8x8"
EDGE_SHAPE = (32, 64, 16, 16)


class ShapeList(click.ParamType):
    name = "shapes"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        out = []
        for part in str(value).split(","):
            try:
                dims = tuple(int(d) for d in part.strip().lower().split("x"))
            except ValueError:
                self.fail(f"{part!r} is not a shape like 32x64x16x16", param, ctx)
            if not 2 <= len(dims) <= 4 or min(dims) < 1:
                self.fail(f"{part!r}: a shape needs 2..4 positive dimensions", param, ctx)
            out.append(dims)
        return out


class CodecList(click.ParamType):
    name = "codecs"

    def convert(self, value, param, ctx):
        from ...codecs import available

        if isinstance(value, list):
            return value
        names = [v.strip() for v in str(value).split(",") if v.strip()]
        bad = [n for n in names if n not in available()]
        if bad or not names:
            self.fail(f"unknown codec(s) {bad or value!r}; available: {', '.join(available())}", param, ctx)
        return names


def make_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n, c = shape[0], shape[1]
    rest = shape[2:]
    a = rng.standard_normal((n, 1, *rest), dtype=np.float32)
    b = rng.standard_normal(shape, dtype=np.float32)
    off = rng.standard_normal((1, c) + (1,) * len(rest), dtype=np.float32)
    x = 0.8 * a + 0.6 * b + off
    return np.maximum(x, 0.0, out=x)


_FLUSH: list[np.ndarray] = []


def _flush_caches() -> None:
    """Writes 64 MiB (twice a large L3) so that the next run starts from cold caches."""
    if not _FLUSH:
        _FLUSH.append(np.zeros(1 << 24, np.float32))
    _FLUSH[0] += 1.0


def _median_ms(fn, repeat: int, cold: bool = False) -> float:
    ts = []
    for i in range(repeat):
        if cold:
            _flush_caches()
        t = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def measure_edge_step(repeat: int, log) -> float:
    """Median ms of one edge step (forward + train_step) of ResNet-18 cut 3, batch 32, 3x32x32."""
    from splitedge.export import onnx_export as oe
    from splitedge.runtime_edge.ort_backend import EdgeModel

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "artifacts")
        log("exporting resnet18 cut 3 (3x32x32) for --edge-step ...")
        oe.export(oe.ExportRequest("resnet18", 3, input_shape=(3, 32, 32), out=out, force=True))
        m = EdgeModel(out)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((32, 3, 32, 32), dtype=np.float32)
        g = rng.standard_normal((32, *m.activation_shape), dtype=np.float32) * np.float32(1e-3)

        def step(_):
            m.forward(x)
            m.train_step(x, g)

        for _ in range(3):
            step(0)
        return _median_ms(step, max(repeat, 5))


def bench_one(name: str, bits: int, shape, repeat: int, seed: int, cold: bool = False) -> dict:
    from ...codecs import codec_class, decode, get

    cls = codec_class(name)
    params = {"bits": bits} if "bits" in cls.PARAMS else {}
    codec = get(name, **params)
    ninputs = max(1, min(repeat, 3))
    xs = [make_input(shape, seed + i) for i in range(ninputs)]
    dst = np.empty_like(xs[0])
    last = [codec.encode(xs[-1])]  # warm-up (and warm state)
    copy_ms = _median_ms(lambda i: np.copyto(dst, xs[i % ninputs]), max(repeat, 5), cold)

    def enc(i):
        last[0] = None  # free the previous payload first, as a streaming sender would
        last[0] = codec.encode(xs[i % ninputs])

    enc_ms = _median_ms(enc, repeat, cold)
    blob = last[0]
    xref = xs[(repeat - 1) % ninputs]
    decode(blob)
    dec_ms = _median_ms(lambda i: decode(blob), repeat, cold)
    xh = decode(blob)
    diff = (xh - xref).astype(np.float64)
    denom = float(np.dot(xref.reshape(-1).astype(np.float64), xref.reshape(-1)))
    return {
        "codec": name,
        "params": codec.params,
        "shape": list(shape),
        "bytes_in": int(xref.nbytes),
        "bytes_out": len(blob),
        "compression_ratio": xref.nbytes / len(blob),
        "copy_ms": copy_ms,
        "encode_ms": enc_ms,
        "decode_ms": dec_ms,
        "encode_vs_copy": copy_ms / enc_ms,
        "decode_vs_copy": copy_ms / dec_ms,
        "rel_mse": float((diff * diff).sum() / denom) if denom > 0 else 0.0,
        "max_abs_err": float(np.abs(diff).max()),
        "cold_cache": cold,
    }


@click.command("codecs")
@click.option("--codecs", "names", type=CodecList(), default=None, help="Comma-separated codec names (default: all).")
@click.option("--bits", type=click.IntRange(1, 8), default=4, show_default=True, help="Bits for codecs that take them.")
@click.option("--repeat", type=click.IntRange(1, 1000), default=9, show_default=True, help="Timed runs (median).")
@click.option("--shapes", type=ShapeList(), default=DEFAULT_SHAPES, show_default=True, help="Comma-separated NxCxHxW.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), callback=writable_file_option,
              help="Also write results as JSON.")
@click.option("--edge-step", is_flag=True, help="Measure the ResNet-18 cut 3 edge step and show encode as a share of it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic inputs.")
@click.option("--cold", is_flag=True, help="Evict the caches (write 64 MiB) before every timed run, copy included.")
def main(names, bits, repeat, shapes, json_path, edge_step, seed, cold) -> None:
    """Throughput (as a ratio to np.copyto of the same bytes), compression ratio and error of each codec."""
    from ...codecs import available

    names = names or available()
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    rows = []
    for shape in shapes:
        for name in names:
            log(f"  {name} {'x'.join(map(str, shape))} ...")
            try:
                rows.append(bench_one(name, bits, tuple(shape), repeat, seed, cold))
            except MemoryError as e:
                raise UserError(f"--shapes {'x'.join(map(str, shape))}: out of memory ({e})") from None
    # the edge step last: ONNX Runtime's worker threads spin after a run and would slow the codecs
    step_ms = measure_edge_step(repeat, log) if edge_step else None
    head = f"{'codec':<11} {'shape':<14} {'enc ms':>8} {'enc/copy':>8} {'dec ms':>8} {'dec/copy':>8} {'ratio':>7} {'rel.err':>9} {'max.err':>9}"
    if step_ms is not None:
        head += f" {'%edge':>6}"
    click.echo(
        f"numpy {np.__version__}, {platform.machine()}, {os.cpu_count()} cpus; bits={bits}, repeat={repeat}"
        + (", cold caches" if cold else "")
    )
    if step_ms is not None:
        click.echo(f"edge step (ResNet-18 cut 3, batch 32, 3x32x32, ORT forward + train step): {step_ms:.2f} ms")
    click.echo(head)
    for r in rows:
        shape = tuple(r["shape"])
        line = (
            f"{r['codec']:<11} {'x'.join(map(str, shape)):<14} {r['encode_ms']:8.3f} {r['encode_vs_copy']:8.3f} "
            f"{r['decode_ms']:8.3f} {r['decode_vs_copy']:8.3f} {r['compression_ratio']:7.2f} "
            f"{r['rel_mse']:9.2e} {r['max_abs_err']:9.3g}"
        )
        if step_ms is not None:
            r["edge_step_ms"] = step_ms
            r["encode_share_of_edge_step"] = r["encode_ms"] / step_ms
            line += f" {100 * r['encode_share_of_edge_step']:5.1f}%" + ("*" if shape != EDGE_SHAPE else "")
        click.echo(line)
    if step_ms is not None and any(tuple(s) != EDGE_SHAPE for s in shapes):
        click.echo("* the edge step is for 32x64x16x16 activations; other shapes are shown against it for scale")
    if json_path:
        doc = {
            "benchmark": "splitedge bench codecs",
            "numpy": np.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "bits": bits,
            "repeat": repeat,
            "seed": seed,
            "cold_cache": cold,
            "edge_step_ms": step_ms,
            "results": rows,
        }
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=2)
        click.echo(f"wrote {json_path}", err=True)
