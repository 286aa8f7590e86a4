"""Golden payloads: one file per codec and payload version, so a format change is seen.

tests/golden/codecs/<name>-v<version>.bin      the payload
                    <name>-v<version>.input.npy the exact input it encodes (regenerated from a seed)
                    <name>-v<version>.decoded.npy what it must decode to

Regenerate (after a deliberate format change, with a new codec version) with
``SPLITEDGE_REGEN_GOLDEN=1 pytest tests/test_codecs_golden.py``.  Files of older versions
stay: every stored payload must keep decoding to its stored output.

Encoding is compared byte for byte.  Codecs whose encoder goes through BLAS or SIMD
transcendental functions (sgq, pq: matrix products; powerquant: np.power; easyquant,
slacc: sums and exp) may differ in the last bits of a float on another CPU; for them a
byte mismatch still passes when the header, parameter block and section table are
identical and both payloads decode to the same values within float32 rounding (a
format change cannot pass that), with a warning saying so.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

import splitedge.codecs as codecs
from splitedge.codecs import format as fmt

GOLDEN = Path(__file__).resolve().parent / "golden" / "codecs"
REGEN = os.environ.get("SPLITEDGE_REGEN_GOLDEN") == "1"
SEED = 20251124


def golden_input(name: str) -> np.ndarray:
    """Odd sizes, ReLU-like activations with some negative values, seeded by the codec id."""
    rng = np.random.default_rng([SEED, fmt.CODEC_IDS[name]])
    x = 0.8 * rng.standard_normal((3, 6, 5, 3)) + 0.5 * rng.standard_normal((3, 1, 5, 3)) + 0.2
    return np.where(x > 0, x, 0.1 * x).astype(np.float32)


def paths(name: str, version: int) -> tuple[Path, Path, Path]:
    stem = GOLDEN / f"{name}-v{version}"
    return stem.with_suffix(".bin"), Path(f"{stem}.input.npy"), Path(f"{stem}.decoded.npy")


@pytest.mark.parametrize("name", codecs.available())
def test_encoding_matches_the_golden_payload(name):
    codec = codecs.get(name)
    x = golden_input(name)
    blob = codec.encode(x)
    bin_path, in_path, out_path = paths(name, codec.version)
    if REGEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        bin_path.write_bytes(blob)
        np.save(in_path, x, allow_pickle=False)
        np.save(out_path, codecs.decode(blob), allow_pickle=False)
    assert bin_path.exists(), f"no golden payload {bin_path.name}: run with SPLITEDGE_REGEN_GOLDEN=1"
    same_as_golden(name, codec.version, x, blob)


GRID_CODECS = [n for n in codecs.available() if "grid" in codecs.codec_class(n).PARAMS]


@pytest.mark.parametrize("name", GRID_CODECS)
def test_the_minmax_grid_still_writes_the_version_1_payload(name):
    """grid="minmax" (the ablation) is the codec version 1 of before the zero-preserving grid."""
    codec = codecs.get(name, grid="minmax")
    assert codec.version == 1 and codecs.get(name).version == 2
    same_as_golden(name, 1, golden_input(name), codec.encode(golden_input(name)))


def same_as_golden(name: str, version: int, x: np.ndarray, blob: bytes) -> None:
    bin_path, in_path, _ = paths(name, version)
    np.testing.assert_array_equal(np.load(in_path, allow_pickle=False), x)
    golden = bin_path.read_bytes()
    if blob == golden:
        return
    msg = f"{name} v{version} no longer writes its golden payload: a format change needs a new codec version"
    assert name in NUMERIC_DRIFT_OK, msg
    assert layout(blob) == layout(golden), msg
    a, b = codecs.decode(blob), codecs.decode(golden)
    close = np.isclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(x).max()))
    assert close.mean() >= 0.99, msg
    warnings.warn(f"{name}: golden bytes differ only in float rounding (another CPU or BLAS?)", stacklevel=1)


NUMERIC_DRIFT_OK = {"sgq", "pq", "powerquant", "easyquant", "slacc"}


def layout(blob: bytes) -> tuple:
    """Header fields, parameter block and section lengths: everything but the section contents."""
    head = struct.unpack_from("<4sBBBBBBH4II", blob)
    nsec, plen = head[6], head[7]
    return head, blob[32 : 32 + plen], struct.unpack_from(f"<{nsec}I", blob, 32 + plen)


def stored_payloads():
    return sorted(p.name for p in GOLDEN.glob("*.bin"))


@pytest.mark.parametrize("file", stored_payloads())
def test_every_stored_payload_still_decodes(file):
    bin_path = GOLDEN / file
    out_path = Path(str(bin_path.with_suffix("")) + ".decoded.npy")
    y, meta = codecs.decode_with_meta(bin_path.read_bytes())
    name, version = file[: -len(".bin")].rsplit("-v", 1)
    assert meta["codec"] == name and meta["codec_version"] == int(version)
    # decoders are elementwise float32 arithmetic (np.power for powerquant): equal up to an ulp
    np.testing.assert_allclose(y, np.load(out_path, allow_pickle=False), rtol=1e-6, atol=0)


def test_every_codec_has_a_golden_file():
    have = set(stored_payloads())
    for name in codecs.available():
        assert f"{name}-v{codecs.codec_class(name).version}.bin" in have
