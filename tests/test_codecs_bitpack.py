"""Property tests: bit packing at every width, and decoding arbitrary bytes never crashes."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import splitedge.codecs as codecs
from splitedge.codecs import PayloadError, bitpack
from splitedge.codecs import format as fmt

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """The documented layout, bit by bit: code i at bits [b*i, b*i+b) of an LSB-first stream."""
    c = np.asarray(codes, np.uint64)
    bitsarr = ((c[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bitsarr, bitorder="little")  # reference only: the codec never uses packbits


@st.composite
def codes_and_width(draw, lo=1, hi=8, max_size=600):
    b = draw(st.integers(lo, hi))
    n = draw(st.integers(0, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    top = 1 << b
    kind = draw(st.sampled_from(["uniform", "max", "zero", "sparse"]))
    if kind == "uniform":
        c = rng.integers(0, top, n)
    elif kind == "max":
        c = np.full(n, top - 1)
    elif kind == "zero":
        c = np.zeros(n, np.int64)
    else:
        c = np.where(rng.random(n) < 0.05, rng.integers(0, top, n), 0)
    return b, c


@SETTINGS
@given(codes_and_width())
def test_pack_matches_the_documented_layout_and_round_trips(bw):
    b, c = bw
    c8 = c.astype(np.uint8)
    packed = bitpack.pack(c8, b)
    assert packed.dtype == np.uint8 and packed.size == (c.size * b + 7) // 8 == bitpack.packed_size(c.size, b)
    np.testing.assert_array_equal(packed, reference_stream(c, b))
    np.testing.assert_array_equal(bitpack.unpack(packed.tobytes(), b, c.size), c8)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_over_block_boundaries(bits):
    """Sizes that cross the internal block size, with a ragged tail."""
    rng = np.random.default_rng(bits)
    for n in (bitpack.BLOCK - 8, bitpack.BLOCK, bitpack.BLOCK + 13, 2 * bitpack.BLOCK + 5):
        c = rng.integers(0, 1 << bits, n).astype(np.uint8)
        p = bitpack.pack(c, bits)
        np.testing.assert_array_equal(p, reference_stream(c, bits))
        np.testing.assert_array_equal(bitpack.unpack(p, bits, n), c)


@SETTINGS
@given(st.integers(0, 32), st.integers(0, 300), st.integers(0, 2**32 - 1))
def test_wide_integers_round_trip(b, n, seed):
    v = np.random.default_rng(seed).integers(0, 1 << b, size=n, dtype=np.uint64)
    p = bitpack.pack_wide(v, b)
    assert p.size == (v.size * b + 7) // 8
    np.testing.assert_array_equal(bitpack.unpack_wide(p, b, v.size), v.astype(np.uint32))


def test_pack_refuses_out_of_range_codes_and_bad_widths():
    with pytest.raises(ValueError, match="out of range"):
        bitpack.pack(np.array([0, 4], np.uint8), 2)
    with pytest.raises(ValueError, match="bits must be"):
        bitpack.pack(np.array([0], np.uint8), 9)
    with pytest.raises(ValueError, match="need"):
        bitpack.unpack(b"\0\0", 3, 8)
    assert bitpack.index_bits(1) == 0 and bitpack.index_bits(2) == 1 and bitpack.index_bits(16384) == 14
    assert bitpack.index_bits(16385) == 15


# ---------------------------------------------------------------------- decode fuzzing

NAMES = codecs.available()


def _valid(name: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in rng.integers(1, 6, size=int(rng.integers(2, 5))))
    x = np.maximum(rng.standard_normal(shape), -0.5).astype(np.float32)
    return codecs.get(name).encode(x)


VALID = {n: _valid(n, i) for i, n in enumerate(NAMES)}


def _decode_or_payload_error(blob: bytes) -> None:
    try:
        y = codecs.decode(blob, max_bytes=1 << 24)
    except PayloadError:
        return
    assert y.dtype == np.float32 and np.isfinite(y).all()


@SETTINGS
@given(st.binary(max_size=400))
def test_decode_never_crashes_on_random_bytes(data):
    with pytest.raises(PayloadError):
        codecs.decode(data)


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


@SETTINGS
@given(st.sampled_from(NAMES), st.data())
def test_decode_never_crashes_on_random_contents_in_a_valid_envelope(name, data):
    """Header, section table and CRC valid; parameters and section bytes random: this reaches
    every codec's own decoder, which must refuse (PayloadError) or return finite floats."""
    blob = VALID[name]
    plen, nsec = blob[10] | blob[11] << 8, blob[9]
    start = fmt.HEADER_BYTES + plen + 4 * nsec
    params = data.draw(st.binary(min_size=plen, max_size=plen))
    body = data.draw(st.binary(min_size=len(blob) - 4 - start, max_size=len(blob) - 4 - start))
    mutated = _with_crc(blob[: fmt.HEADER_BYTES] + params + blob[fmt.HEADER_BYTES + plen : start] + body)
    assert fmt.parse(mutated).codec_name == name  # the envelope is valid: the codec decodes it
    _decode_or_payload_error(mutated)


@SETTINGS
@given(st.sampled_from(NAMES), st.data())
def test_mutated_payloads_with_a_recomputed_crc(name, data):
    """Beyond the CRC: random byte edits with the CRC fixed up must be refused or decode to finite floats."""
    blob = bytearray(VALID[name][:-4])
    edits = data.draw(st.lists(st.tuples(st.integers(8, len(blob) - 1), st.integers(0, 255)), min_size=1, max_size=4))
    for pos, val in edits:
        blob[pos] = val
    body = bytes(blob)
    _decode_or_payload_error(body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF))
