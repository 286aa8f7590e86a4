"""One conformance suite run over every registered codec (splitedge.codecs.available()).

Checks, per codec: round trip keeps shape and float32 dtype; the codec's error bound
holds where it declares one; bytes are deterministic for a fixed seed and call
sequence; decoding is stateless; edge cases (constant, zeros, odd sizes, negative
values, one sample, ranks 2 and 3); NaN/Inf input is refused; corrupted, truncated,
wrong-version and oversized payloads raise PayloadError.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

import splitedge.codecs as codecs
from splitedge.codecs import PayloadError
from splitedge.codecs import format as fmt

NAMES = codecs.available()


def relu_act(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((shape[0], 1, *shape[2:]), dtype=np.float32)
    b = rng.standard_normal(shape, dtype=np.float32)
    return np.maximum(0.8 * a + 0.6 * b + 0.3, 0).astype(np.float32)


def gradient(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 1e-3).astype(np.float32)


CASES = {
    "activation": lambda: relu_act((8, 16, 6, 6), 1),
    "gradient-negative": lambda: gradient((4, 12, 5, 5), 2),
    "constant": lambda: np.full((3, 6, 4, 4), 1.5, np.float32),
    "zeros": lambda: np.zeros((2, 5, 3, 3), np.float32),
    "odd-sizes": lambda: relu_act((3, 5, 7, 3), 3) - 0.2,
    "one-sample": lambda: relu_act((1, 8, 4, 4), 4),
    "rank2": lambda: np.random.default_rng(5).standard_normal((6, 20)).astype(np.float32),
    "rank3": lambda: np.random.default_rng(6).standard_normal((4, 9, 10)).astype(np.float32),
    "one-element-per-sample": lambda: np.array([[1.0], [-2.0]], np.float32),
    "large-offset": lambda: (np.random.default_rng(7).standard_normal((2, 4, 5, 5)) * 1e-3 + 1e4).astype(np.float32),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_shape_dtype_and_bound(name, case):
    x = CASES[case]()
    codec = codecs.get(name)
    blob = codec.encode(x)
    assert isinstance(blob, bytes)
    y, meta = codecs.decode_with_meta(blob)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.isfinite(y).all()
    assert meta["codec"] == name and tuple(meta["shape"]) == x.shape
    bound = codec.error_bound(x, meta)
    if bound is not None:
        err = float(np.abs(y.astype(np.float64) - x).max())
        assert err <= bound, f"{name} on {case}: max error {err} over its bound {bound}"
    if case in ("constant", "zeros") and name not in ("randtopk", "splitfc", "clio"):
        # every quantizer reproduces a constant tensor (min == max) exactly
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("name", NAMES)
def test_error_bound_is_declared_where_the_codec_has_one(name):
    x = relu_act((4, 8, 5, 5))
    codec = codecs.get(name)
    y, meta = codecs.decode_with_meta(codec.encode(x))
    bound = codec.error_bound(x, meta)
    if name in ("sgq", "pq"):
        assert bound is None  # vector quantizers: no elementwise bound (test_codecs_reference checks Eq. 3)
    else:
        assert bound is not None and np.abs(y - x).max() <= bound


@pytest.mark.parametrize("name", NAMES)
def test_bytes_are_deterministic_for_a_seed_and_call_sequence(name):
    xs = [relu_act((4, 8, 5, 5), s) for s in range(3)]
    a, b = codecs.get(name), codecs.get(name)
    for x in xs:
        assert a.encode(x, step=1, total_rounds=10) == b.encode(x, step=1, total_rounds=10)
    # the settings rebuild an identical codec (the cloud sends params to the edge)
    c = codecs.get(name, **json.loads(json.dumps(a.params)))
    assert c.params == a.params
    assert c.encode(xs[0]) == codecs.get(name).encode(xs[0])


@pytest.mark.parametrize("name", NAMES)
def test_decode_is_stateless(name):
    x = relu_act((4, 8, 5, 5))
    enc = codecs.get(name)
    blob = enc.encode(x)
    first = codecs.decode(blob)
    for s in range(2):  # the encoder's state moves on; the old payload decodes the same
        enc.encode(relu_act((4, 8, 5, 5), 10 + s))
    np.testing.assert_array_equal(codecs.decode(blob), first)
    np.testing.assert_array_equal(enc.decode(blob), first)
    np.testing.assert_array_equal(codecs.get(name).decode(blob), first)  # a fresh stream of this codec too
    other = codecs.get(NAMES[0] if name != NAMES[0] else NAMES[1])
    with pytest.raises(PayloadError, match=f"a {name} payload .* but this stream's codec is {other.name}"):
        other.decode(blob)  # a stream reads its own codec's payloads only
    np.testing.assert_array_equal(codecs.decode(bytearray(blob)), first)
    np.testing.assert_array_equal(codecs.decode(memoryview(blob)), first)


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_mode_and_steps(name):
    x = relu_act((4, 8, 5, 5))
    codec = codecs.get(name)
    for kw in ({"training": False}, {"step": 0, "total_rounds": 5}, {"step": 4, "total_rounds": 5}):
        y = codecs.decode(codec.encode(x, **kw))
        assert y.shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_encodes_change_no_state(name):
    """training=False (the edge's evaluation batches, between training steps) reads the codec's
    state and changes none of it: random draws, warm starts, histories, counters."""
    xs = [relu_act((4, 8, 5, 5), s) for s in range(4)]
    a, b, c = codecs.get(name), codecs.get(name), codecs.get(name)
    ev = c.encode(xs[1], training=False)  # before any training encode
    assert c.encode(xs[1], training=False) == ev, "an evaluation encode depends on its input and the state only"
    assert a.encode(xs[0]) == b.encode(xs[0]) == c.encode(xs[0])
    first = a.encode(xs[1], training=False)  # a only: evaluation batches in between
    assert a.encode(xs[1], training=False) == first
    for x in xs[2:]:
        assert a.encode(x) == b.encode(x) == c.encode(x), "training goes on as if no evaluation had happened"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_input_is_refused(name, bad):
    x = relu_act((2, 4, 3, 3))
    x[1, 2, 1, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        codecs.get(name).encode(x)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_refused(name):
    codec = codecs.get(name)
    with pytest.raises(TypeError, match="floating"):
        codec.encode(np.ones((2, 3, 4, 4), np.int32))
    with pytest.raises(ValueError, match="rank"):
        codec.encode(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="rank"):
        codec.encode(np.ones((1, 2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        codec.encode(np.ones((0, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        codec.encode(np.ones((2, 3), np.float32), step=-1)
    # float64 and non-contiguous inputs are accepted (cast to C-contiguous float32)
    x = relu_act((2, 4, 3, 3))
    a = codecs.decode(codec.encode(x.astype(np.float64)))
    b = codecs.decode(codecs.get(name).encode(np.asfortranarray(x)))
    assert a.shape == b.shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_unknown_and_bad_parameters_name_the_allowed_values(name):
    with pytest.raises(ValueError, match="allowed"):
        codecs.get(name, no_such_parameter=1)
    spec = codecs.codec_class(name).PARAMS
    if "bits" in spec:
        with pytest.raises(ValueError, match="bits"):
            codecs.get(name, bits=0)
        with pytest.raises(ValueError, match="bits"):
            codecs.get(name, bits="4")
    json.dumps(codecs.get(name).params)  # JSON-serialisable


def test_unknown_codec_lists_the_known_ones():
    with pytest.raises(ValueError, match="available: fp32, fp16, uq"):
        codecs.get("zstd")
    assert NAMES == ["fp32", "fp16", "uq", "slacc", "sgq", "pq", "powerquant", "randtopk", "splitfc", "clio", "easyquant"]


@pytest.mark.parametrize("name", NAMES)
def test_backward_shape_and_support(name):
    x = relu_act((3, 6, 4, 4))
    codec = codecs.get(name)
    y, meta = codecs.decode_with_meta(codec.encode(x))
    g = gradient(x.shape, 9)
    gb = codec.backward(g, meta)
    assert gb.shape == x.shape and gb.dtype == np.float32 and np.isfinite(gb).all()
    if name in ("randtopk",):
        assert (gb[~meta["mask"]] == 0).all()
        np.testing.assert_array_equal(gb[meta["mask"]], g[meta["mask"]])
    elif name == "splitfc":
        assert (gb[:, ~meta["kept"]] == 0).all()
        np.testing.assert_array_equal(gb[:, meta["kept"]], g[:, meta["kept"]])
    elif name == "clio":
        k = meta["kept_channels"]
        assert (gb[:, k:] == 0).all() and np.array_equal(gb[:, :k], g[:, :k])
    elif name == "sgq":
        assert not np.array_equal(gb, g)  # Gradient Calibration is on by default
    else:
        np.testing.assert_array_equal(gb, g)  # straight-through estimator
    with pytest.raises(ValueError, match="shape"):
        codec.backward(g[:1], meta)
    codec.observe_gradient(g)  # accepted by every codec (a no-op for most)


# ---------------------------------------------------------------------- malformed payloads


def _payload(name):
    return codecs.get(name).encode(relu_act((3, 5, 4, 4)))


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


@pytest.mark.parametrize("name", NAMES)
def test_truncated_payloads(name):
    blob = _payload(name)
    for n in sorted({0, 1, 4, 20, 35, fmt.HEADER_BYTES, len(blob) // 2, len(blob) - 5, len(blob) - 1}):
        with pytest.raises(PayloadError, match="truncated"):
            codecs.decode(blob[:n])


@pytest.mark.parametrize("name", NAMES)
def test_corrupted_payloads_fail_the_crc(name):
    blob = bytearray(_payload(name))
    rng = np.random.default_rng(0)
    for pos in rng.choice(np.arange(fmt.HEADER_BYTES, len(blob) - 4), size=min(8, len(blob) - 40), replace=False):
        bad = bytearray(blob)
        bad[pos] ^= 0x5A
        with pytest.raises(PayloadError, match="CRC mismatch"):
            codecs.decode(bytes(bad))
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(PayloadError, match="CRC mismatch"):
        codecs.decode(bytes(bad))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_versions_magic_id_shape_and_trailing_bytes(name):
    blob = _payload(name)
    body = bytearray(blob[:-4])

    def patched(offset, value):
        b = bytearray(body)
        b[offset] = value
        return _with_crc(bytes(b))

    with pytest.raises(PayloadError, match="unsupported format version 9"):
        codecs.decode(patched(4, 9))
    with pytest.raises(PayloadError, match="codec version 77"):
        codecs.decode(patched(6, 77))
    with pytest.raises(PayloadError, match="bad magic"):
        codecs.decode(patched(0, ord("X")))
    with pytest.raises(PayloadError, match="unknown codec id 200"):
        codecs.decode(patched(5, 200))
    with pytest.raises(PayloadError, match="unknown dtype"):
        codecs.decode(patched(7, 9))
    with pytest.raises(PayloadError, match="impossible rank"):
        codecs.decode(patched(8, 7))
    with pytest.raises(PayloadError, match="impossible shape"):
        b = bytearray(body)
        b[12:16] = struct.pack("<I", 0)
        codecs.decode(_with_crc(bytes(b)))
    with pytest.raises(PayloadError, match="over the size limit"):  # a huge shape: refused before allocating
        b = bytearray(body)
        b[12:16] = struct.pack("<I", 0xFFFFFFFF)
        codecs.decode(_with_crc(bytes(b)))
    with pytest.raises(PayloadError, match="trailing"):
        codecs.decode(blob + b"\0")
    with pytest.raises(PayloadError, match="bytes-like"):
        codecs.decode("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_size_limit_is_configurable(name, monkeypatch):
    blob = _payload(name)
    codecs.decode(blob, max_bytes=len(blob) + 4 * 3 * 5 * 16)
    with pytest.raises(PayloadError, match="over the size limit"):
        codecs.decode(blob, max_bytes=len(blob) - 1)
    decoded = 4 * 3 * 5 * 16
    if len(blob) < decoded:  # the payload fits the limit, the array it decodes to does not
        with pytest.raises(PayloadError, match="decodes to .* over the size limit"):
            codecs.decode(blob, max_bytes=decoded - 1)
    monkeypatch.setattr(fmt, "DEFAULT_MAX_BYTES", 64)
    with pytest.raises(PayloadError, match="over the size limit"):
        codecs.decode(blob)


@pytest.mark.parametrize("name", NAMES)
def test_inconsistent_sections_with_a_valid_crc(name):
    """A payload whose CRC is right but whose content lies: still PayloadError, never garbage."""
    blob = _payload(name)
    h = fmt.parse(blob)
    # shrink the first dimension: every codec's section sizes then disagree with the shape
    body = bytearray(blob[:-4])
    body[12:16] = struct.pack("<I", h.shape[0] - 1)
    with pytest.raises(PayloadError):
        codecs.decode(_with_crc(bytes(body)))
    # drop the last section byte and fix the table and the length: sizes no longer add up
    body = bytearray(blob[:-4])
    nsec, plen = body[9], struct.unpack_from("<H", body, 10)[0]
    if nsec:
        table = 32 + plen
        lens = list(struct.unpack_from(f"<{nsec}I", body, table))
        last = max(i for i, n in enumerate(lens) if n)
        lens[last] -= 1
        struct.pack_into(f"<{nsec}I", body, table, *lens)
        del body[table + 4 * nsec + sum(lens)]
        struct.pack_into("<I", body, 28, len(body) + 4)
        with pytest.raises(PayloadError):
            codecs.decode(_with_crc(bytes(body)))


def test_header_layout_is_as_documented():
    x = relu_act((3, 5, 4, 4))
    blob = codecs.get("uq", bits=3).encode(x)
    magic, fver, cid, cver, dcode, rank, nsec, plen, *dims, total = struct.unpack_from("<4sBBBBBBH4II", blob)
    assert (magic, fver, cid, cver, dcode, rank) == (b"SPEC", 1, 3, 2, 1, 4)
    assert dims == [3, 5, 4, 4] and total == len(blob) and nsec == 2 and plen == 2
    assert blob[32] == 3 and blob[33] == 0  # uq v2's parameter block: the bit width, the zero point (ReLU: 0)
    assert fmt.overhead(2, 2) == 46
    old = codecs.get("uq", bits=3, grid="minmax").encode(x)  # the min-max grid writes version 1
    assert struct.unpack_from("<4sBBBBBBH", old)[3] == 1 and struct.unpack_from("<H", old, 10)[0] == 1
    assert struct.unpack_from("<I", blob, len(blob) - 4)[0] == zlib.crc32(blob[:-4])
    assert fmt.overhead(1, 2) == 45 and fmt.HEADER_BYTES == 32 and fmt.CRC_BYTES == 4
