"""fp16's float32 <-> half conversion: the codec's integer arithmetic against numpy's float16 cast.

Run:  splitedge bench fp16-cast [--repeat 50] [--exhaustive]

Prints, measured in one process (medians of --repeat runs, the two timed alternately; ms and
GB/s of float32), for a 32x64x16x16 activation (ResNet-18 cut 3, batch 32) of three kinds of
values: N(0, 1) (no zeros), ReLU'd N(0, 1) as activations are (half of them zeros), and a wide
range (2^-26 .. 2^16, many subnormal halves and saturated values):

* encode: ``codecs.fp.to_half`` (round to nearest even on the float32 bits) against clipping to
  +-65504 and numpy's float32 -> float16 cast (``numpy_to_half`` below);
* decode: ``codecs.fp.from_half`` against numpy's float16 -> float32 cast;

and checks each pair bit-identical on those arrays, on every finite half code (decode) and,
with ``--exhaustive``, on every finite float32 bit pattern (encode; a few minutes).
"""

from __future__ import annotations

import time

import click
import numpy as np

from ...codecs import fp

_HALF_MAX = np.float32(65504.0)


def numpy_to_half(x: np.ndarray) -> np.ndarray:
    """Clip to +-65504, then numpy's cast (the saturation fp16 documents)."""
    return np.clip(x.reshape(-1), -_HALF_MAX, _HALF_MAX).astype(np.float16).view(np.uint16)


def numpy_from_half(h: np.ndarray) -> np.ndarray:
    return h.view(np.float16).astype(np.float32)


def median_ms_pair(a, b, repeat: int) -> tuple[float, float]:
    """Medians (ms) of ``a`` and ``b``, timed alternately so that a shared machine's load hits both alike."""
    a(), b()  # warm-up
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(repeat):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(ta)) * 1e3, float(np.median(tb)) * 1e3


def exhaustive_encode_check() -> None:
    step = 1 << 24
    for start in range(0, 1 << 32, step):
        x = np.arange(start, start + step, dtype=np.uint64).astype(np.uint32).view(np.float32)
        x = x[np.isfinite(x)]
        if not np.array_equal(fp.to_half(x), numpy_to_half(x)):
            raise SystemExit(f"encode differs in the float32 bit patterns {start:#010x}..{start + step - 1:#010x}")
    print("encode: bit-identical on every finite float32 bit pattern")


@click.command("fp16-cast", help=__doc__.split("\n")[0])
@click.option("--repeat", type=click.IntRange(min=1), default=50, show_default=True, help="timed runs per figure (median)")
@click.option("--exhaustive", is_flag=True, help="check encode on every finite float32 bit pattern")
def main(repeat: int, exhaustive: bool) -> None:
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    codes = codes[(codes & 0x7FFF) < 0x7C00]  # every finite half
    assert np.array_equal(fp.from_half(codes).view(np.uint32), numpy_from_half(codes).view(np.uint32))
    print(f"decode: bit-identical on every finite half code ({codes.size})")
    rng = np.random.default_rng(0)
    shape = (32, 64, 16, 16)
    normal = rng.standard_normal(shape).astype(np.float32)
    kinds = {
        "N(0,1)": normal,
        "relu N(0,1)": np.maximum(normal, 0),
        "wide 2^-26..2^16": (rng.standard_normal(shape) * np.exp2(rng.integers(-26, 17, shape))).astype(np.float32),
    }
    print(f"numpy {np.__version__}; {'x'.join(map(str, shape))} float32; medians of {repeat} runs")
    print(f"{'values':>16} {'op':>6} {'codec ms':>9} {'numpy ms':>9} {'codec GB/s':>10} {'numpy GB/s':>10} "
          f"{'numpy/codec':>11}")
    for label, x in kinds.items():
        h = fp.to_half(x)
        assert np.array_equal(h, numpy_to_half(x)), "encode differs"
        assert np.array_equal(fp.from_half(h).view(np.uint32), numpy_from_half(h).view(np.uint32)), "decode differs"
        gb = x.nbytes / 1e9
        for op, codec, numpy_ in (("encode", lambda x=x: fp.to_half(x), lambda x=x: numpy_to_half(x)),
                                  ("decode", lambda h=h: fp.from_half(h), lambda h=h: numpy_from_half(h))):
            t_codec, t_numpy = median_ms_pair(codec, numpy_, repeat)
            print(f"{label:>16} {op:>6} {t_codec:9.3f} {t_numpy:9.3f} {gb / t_codec * 1e3:10.2f} "
                  f"{gb / t_numpy * 1e3:10.2f} {t_numpy / t_codec:11.2f}")
    if exhaustive:
        exhaustive_encode_check()


if __name__ == "__main__":
    main()
