"""The codec contract: one registration per codec (name and wire id), typed meta, CodecSpec."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from splitedge import codecs
from splitedge.codecs import format as fmt
from splitedge.codecs import registry

CODECS_DIR = Path(codecs.__file__).resolve().parent


def test_every_codec_is_registered_once_with_its_wire_id():
    names = codecs.available()
    assert len(names) == 11
    ids = [fmt.CODEC_IDS[n] for n in names]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for n in names:
        cls = codecs.codec_class(n)
        assert cls.name == n and cls.wire_id == fmt.CODEC_IDS[n] and fmt.CODEC_NAMES[cls.wire_id] == n
        assert codecs.get(n).codec_id == cls.wire_id


def test_the_wire_id_is_stated_only_in_the_decorator():
    """No codec class sets ``name`` in its body, and no module but registry.py lists the ids."""
    for path in CODECS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == "Codec" for b in node.bases):
                assigned = {t.id for st in node.body if isinstance(st, ast.Assign) for t in st.targets
                            if isinstance(t, ast.Name)}
                assert "name" not in assigned and "wire_id" not in assigned, f"{path.name}: {node.name}"
                decos = [d for d in node.decorator_list if isinstance(d, ast.Call)
                         and getattr(d.func, "id", None) == "register"]
                assert len(decos) == 1, f"{path.name}: {node.name} needs one @register(name, wire_id=...)"


def test_registering_a_taken_name_or_id_is_refused():
    with pytest.raises(ValueError, match="already registered to 'uq'"):
        registry.register("newcodec", wire_id=fmt.CODEC_IDS["uq"])(type("X", (), {}))
    with pytest.raises(ValueError, match="name 'uq' is already registered"):
        registry.register("uq", wire_id=200)(type("X", (), {}))
    with pytest.raises(ValueError, match="1..255"):
        registry.register("newcodec", wire_id=256)
    assert "newcodec" not in codecs.available() and 200 not in fmt.CODEC_NAMES
    with pytest.raises(TypeError):
        fmt.CODEC_IDS["x"] = 99  # a read-only view


def test_a_stream_decodes_its_own_codec_and_refuses_another():
    import numpy as np

    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    uq = codecs.get("uq", bits=4)
    blob = codecs.get("uq", bits=2).encode(x)  # the same codec with other settings: fine
    np.testing.assert_array_equal(uq.decode(blob), codecs.decode(blob))
    other = codecs.get("fp32").encode(x)
    np.testing.assert_array_equal(codecs.decode(other), x)  # the module-level decode reads any codec
    for call in (uq.decode, uq.decode_with_meta):
        with pytest.raises(codecs.PayloadError, match=r"a fp32 payload \(codec id 1\), but this stream's codec is uq"):
            call(other)


def test_meta_is_a_typed_read_only_value():
    import numpy as np

    x = np.random.default_rng(1).standard_normal((2, 5, 3, 3)).astype(np.float32)
    codec = codecs.get("splitfc", bits=4, keep=0.6)
    _, meta = codec.decode_with_meta(codec.encode(x))
    assert isinstance(meta, codecs.Meta)
    assert (meta.codec, meta.codec_version, meta.shape) == ("splitfc", codec.version, (2, 5, 3, 3))
    assert meta["shape"] == meta.shape and meta["kept"] is meta.fields["kept"] and meta["bits"] == 4
    assert set(meta) == {"codec", "codec_version", "shape", *meta.fields}
    with pytest.raises(AttributeError):
        meta.codec = "uq"  # type: ignore[misc]
    with pytest.raises(TypeError):
        meta.fields["kept"] = None  # type: ignore[index]
    with pytest.raises(ValueError, match="may not redefine"):
        codecs.Meta("uq", 1, (1, 1), {"shape": (2, 2)})
    with pytest.raises(ValueError, match="gradient shape"):
        codec.backward(np.zeros((1, 5, 3, 3), np.float32), meta)


def test_codec_spec_builds_rebuilds_and_round_trips_its_json_form():
    spec = codecs.CodecSpec("uq", {"bits": 4})
    assert spec == codecs.CodecSpec("uq", [("bits", 4)]) and hash(spec) == hash(codecs.CodecSpec("uq", {"bits": 4}))
    assert spec.kwargs == {"bits": 4} and spec.build().params == {"bits": 4, "grid": "zero"}
    full = spec.resolved()
    assert full == codecs.CodecSpec.of(codecs.get("uq", bits=4)) and full.params == (("bits", 4), ("grid", "zero"))
    assert codecs.CodecSpec.from_json(full.to_json()) == full
    for bad, needle in (([], "exactly 'name' and 'params'"), ({"name": "uq"}, "exactly 'name' and 'params'"),
                        ({"name": "uq", "params": [1]}, "params must be an object"),
                        ({"name": 3, "params": {}}, "non-empty string"),
                        ({"name": "uq", "params": {"bits": [4]}}, "must be a number")):
        with pytest.raises(ValueError, match=needle):
            codecs.CodecSpec.from_json(bad, "WELCOME.codec")
    with pytest.raises(ValueError, match="unknown codec 'nope'"):
        codecs.CodecSpec("nope").build()
    with pytest.raises(ValueError, match="parameter 'bits' must be"):
        codecs.CodecSpec("uq", {"bits": 99}).build()
