"""export-client: the zoo, the cut, the ONNX training artifacts and their agreement with PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from splitedge.export import manifest as mf
from splitedge.export import onnx_export as oe
from splitedge.export import split, zoo, zoo_names
from splitedge.runtime_edge.ort_backend import EdgeModel

from helpers import bin_path

REFERENCE = Path(__file__).parent / "reference" / "torchvision_reference.json"


# ---------------------------------------------------------------------------- zoo


def _fill_like_reference(model: torch.nn.Module) -> None:
    """The deterministic weights tests/reference/gen_torchvision_reference.py gives torchvision's models."""
    import math

    sd = model.state_dict()
    for i, k in enumerate(sorted(sd)):
        t = sd[k]
        if not t.is_floating_point():
            t.zero_()
            continue
        n = t.numel()
        base = torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + i).to(t.dtype).reshape(t.shape)
        if k.endswith("running_var"):
            t.copy_(1.0 + 0.1 * base * base)
        elif k.endswith("running_mean"):
            t.copy_(0.05 * base)
        elif t.dim() > 1:
            t.copy_(base * math.sqrt(3.0 / (n // t.shape[0])))
        else:
            t.copy_(0.1 * base + (1.0 if k.endswith("weight") else 0.0))


def test_zoo_names_match_the_registry():
    assert zoo.available() == zoo_names.MODEL_NAMES


@pytest.mark.parametrize("name", zoo_names.MODEL_NAMES)
def test_zoo_matches_torchvision(name):
    """Same state_dict keys and shapes as torchvision, and the same logits for the same weights.

    The reference was produced by real torchvision 0.29.1 (tests/reference/gen_torchvision_reference.py).
    """
    ref = json.loads(REFERENCE.read_text())["models"][name]
    model = zoo.build(name, num_classes=1000, in_channels=3)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["keys"]

    _fill_like_reference(model)
    x = torch.sin(torch.arange(3 * 64 * 64, dtype=torch.float32) * 0.01).reshape(1, 3, 64, 64)
    with torch.no_grad():
        logits = model.eval()(x)[0].numpy()
    np.testing.assert_allclose(logits, np.array(ref["logits"], dtype=np.float32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", zoo_names.MODEL_NAMES)
def test_every_cut_reassembles_to_the_whole_model(name):
    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = zoo.build(name, 10, 3).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        full = model(x)
        for info in split.trace_cuts(name, model, shape):
            client, server = split.split(name, model, info.index)
            a = client(x)
            assert tuple(a.shape[1:]) == info.activation_shape
            assert torch.equal(server(a), full), info.name
            keys_c, keys_s = set(client.state_dict()), set(server.state_dict())
            assert not keys_c & keys_s and keys_c | keys_s == set(model.state_dict())


def test_cut_by_name_and_by_index_agree():
    model = zoo.build("vgg11", 10, 3)
    units = zoo.cut_units("vgg11", model)
    assert split.resolve_cut(units, "features.5") == 6
    assert split.resolve_cut(units, "6") == 6
    for bad in ("0", "23", "-1", "classifier", "nope"):
        with pytest.raises(ValueError, match="cut"):
            split.resolve_cut(units, bad)


@pytest.mark.parametrize("name", zoo_names.MODEL_NAMES)
def test_torch_free_cut_table_matches_the_models(name):
    """zoo_names.CUT_UNITS lets experiment configs and the demo check a --cut without torch; it must
    name exactly the units zoo.cut_units finds in the built model (for 1 and 3 input channels)."""
    for channels in (1, 3):
        units = [n for n, _ in zoo.cut_units(name, zoo.build(name, 10, channels))]
        assert list(zoo_names.CUT_UNITS[name]) == units
    assert zoo_names.check_cut(name, units[0]) == 1
    assert zoo_names.check_cut(name, len(units) - 1) == len(units) - 1
    for bad in (0, len(units), units[-1], "nope"):
        with pytest.raises(ValueError, match="cut"):
            zoo_names.check_cut(name, bad)


def test_load_weights_adapts_stem_and_head(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = zoo.build("resnet18", 1000, 3)
    path = tmp_path / "rn18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))

    dst = zoo.build("resnet18", 10, 1)
    notes = zoo.load_weights(dst, "resnet18", oe.load_state_file(str(path)))
    assert any("conv1.weight" in n for n in notes) and any("head" in n for n in notes)
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(dst.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    assert dst.fc.weight.shape == (10, 512)

    # a torch file is read with weights_only=True; wrapped checkpoints and DataParallel prefixes are unwrapped
    pth = tmp_path / "rn18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, str(pth))
    again = zoo.build("resnet18", 1000, 3)
    assert zoo.load_weights(again, "resnet18", oe.load_state_file(str(pth))) == []
    torch.testing.assert_close(again.fc.weight, src.fc.weight)

    wrong = {k: v for k, v in src.state_dict().items() if not k.startswith("layer4")}
    with pytest.raises(ValueError, match="missing keys"):
        zoo.load_weights(zoo.build("resnet18", 1000, 3), "resnet18", wrong)


# ---------------------------------------------------------------------------- artifacts


def test_artifacts_layout_manifest_and_checker(exported):
    out = exported("resnet18", 3)
    m = mf.load(out)
    assert (m.model, m.cut, m.cut_name) == ("resnet18", 3, "relu")
    assert m.input_shape == (3, 32, 32) and m.activation_shape == (64, 16, 16)
    assert m.num_classes == 10 and m.opset == oe.OPSET and m.format_version == mf.FORMAT_VERSION
    assert m.optimizer.name == "sgd" and m.optimizer.lr == 0.01
    assert set(m.files) == {*mf.CLIENT_FILES, *m.portable["files"].values(), mf.SERVER_WEIGHTS}
    assert {"torch", "onnx", "onnxruntime", "splitedge", "numpy"} <= set(m.versions)
    assert set(m.trainable_params) == {"conv1.weight", "bn1.weight", "bn1.bias"}
    assert set(m.frozen_params) == {"bn1.running_mean", "bn1.running_var"}

    oe.register_ort_training_schemas()
    for rel in m.files:
        if rel.endswith(".onnx"):
            onnx.checker.check_model(str(out / rel))
    train = onnx.load(str(out / "client" / "training_model.onnx"))
    assert [i.name for i in train.graph.input][:2] == ["input", "grad_activation"]
    assert "activation" in [o.name for o in train.graph.output]
    ev = onnx.load(str(out / "client" / "eval_model.onnx"))
    params = {*m.trainable_params, *m.frozen_params}
    assert [i.name for i in ev.graph.input if i.name not in params] == ["input"]
    assert [o.name for o in ev.graph.output] == ["activation"]


def test_manifest_detects_tampering(exported, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(exported("resnet18", 3), out)
    mf.load(out)  # intact
    with open(out / "client" / "checkpoint", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(mf.ManifestError, match="sha256"):
        mf.load(out)
    (out / "manifest.json").write_text('{"format_version": 99}')
    with pytest.raises(mf.ManifestError, match="format_version"):
        mf.load(out)
    with pytest.raises(mf.ManifestError, match="does not exist"):
        mf.load(tmp_path / "nothing-here")


def _torch_client(model: str, n_edge: int, in_channels: int, params: dict[str, np.ndarray]) -> torch.nn.Module:
    client, _ = split.split(model, zoo.build(model, 10, in_channels), n_edge)
    sd = client.state_dict()
    for k, v in params.items():
        sd[k].copy_(torch.from_numpy(v))
    return client


# Tolerance of the update comparison, per parameter tensor t:
#     ||dW_ort - dW_torch|| <= RTOL * ||dW_torch|| + ATOL_GLOBAL * ||dW_torch over all tensors||
# RTOL: both frameworks compute in float32 but sum in different orders (MLAS vs oneDNN); the
# observed relative difference is ~1e-6, and 1e-4 leaves room for rare ReLU/MaxPool ties that
# float32 rounding flips (~2e-2 on single elements at worst, far less on a tensor's norm).
# ATOL: some tensors have an exactly-zero true gradient because a train-mode BatchNorm follows
# them (BN makes the loss invariant to the previous layer's shift and, through homogeneous ops,
# its scale), e.g. ShuffleNet's BN biases before a 1x1 conv and another BN. Both frameworks then
# return float32 cancellation noise (~1e-8 of the global update norm); a relative test on noise
# is meaningless, so those tensors are held to 1e-5 of the global norm instead.
RTOL, ATOL_GLOBAL = 1e-4, 1e-5


@pytest.mark.parametrize(
    "model,cut",
    [("resnet18", 3), ("resnet18", 5), ("shufflenet_v2_x1_0", 3), ("mobilenet_v2", 4)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edge_update_matches_pytorch(exported, model, cut, seed):
    """One ORT train step with an injected gradient == torch SGD on loss (activation * grad).sum()."""
    out = exported(model, cut, lr=0.1)
    em = EdgeModel(out, threads=1)
    p0 = em.get_parameters()
    client = _torch_client(model, cut, 3, p0).train()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)

    a = em.forward(x)
    g = rng.standard_normal(a.shape).astype(np.float32)
    em.train_step(x, g)
    p1 = em.get_parameters()

    opt = torch.optim.SGD(client.parameters(), lr=0.1)
    a_t = client(torch.from_numpy(x))
    (a_t * torch.from_numpy(g)).sum().backward()
    opt.step()
    after = client.state_dict()

    np.testing.assert_allclose(a, a_t.detach().numpy(), rtol=1e-4, atol=1e-4)
    d_ort = {k: p1[k] - p0[k] for k in em.manifest.trainable_params}
    d_torch = {k: after[k].numpy() - p0[k] for k in em.manifest.trainable_params}
    global_norm = np.sqrt(sum(float(np.sum(d**2)) for d in d_torch.values()))
    assert global_norm > 0
    for k in d_ort:
        err = float(np.linalg.norm(d_ort[k] - d_torch[k]))
        bound = RTOL * float(np.linalg.norm(d_torch[k])) + ATOL_GLOBAL * global_norm
        assert err <= bound, f"{k}: update differs by {err:.3g} > {bound:.3g}"


def test_adamw_follows_the_documented_formula(exported):
    """ORT's AdamW is the Hugging Face formula: two steps checked against it in float64.

    Tolerance: atol = 5e-3 * lr. Adam normalises every gradient element, g / (|g| + eps), so an
    element whose |g| is within a few eps (1e-6) of zero turns the ~1e-6 relative float32 difference
    between ORT's and torch's gradients into a visible difference of the step; elsewhere the match
    is ~1e-7.
    """
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-6, 0.1
    out = exported("resnet18", 3, optimizer="adamw", lr=lr, weight_decay=wd)
    em = EdgeModel(out, threads=1)
    rng = np.random.default_rng(0)
    w = {k: v.astype(np.float64) for k, v in em.get_parameters(trainable_only=True).items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(v) for k, v in w.items()}
    for t in (1, 2):
        x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
        g = rng.standard_normal((8, *em.activation_shape)).astype(np.float32)
        client = _torch_client("resnet18", 3, 3, em.get_parameters()).train()
        (client(torch.from_numpy(x)) * torch.from_numpy(g)).sum().backward()
        em.train_step(x, g)
        for name, p in client.named_parameters():
            grad = p.grad.numpy().astype(np.float64)
            m[name] = b1 * m[name] + (1 - b1) * grad
            v[name] = b2 * v[name] + (1 - b2) * grad**2
            m_hat, v_hat = m[name] / (1 - b1**t), v[name] / (1 - b2**t)
            w[name] = w[name] - lr * m_hat / (np.sqrt(v_hat) + eps)
            w[name] = w[name] - lr * wd * w[name]  # HF: decoupled decay applied after the Adam step
        got = em.get_parameters(trainable_only=True)
        for name in w:
            np.testing.assert_allclose(got[name], w[name], rtol=0, atol=5e-3 * lr, err_msg=f"step {t} {name}")
            w[name] = got[name].astype(np.float64)  # follow ORT so float drift does not accumulate


def test_eval_forward_equals_train_step_forward(exported):
    em = EdgeModel(exported("resnet18", 5), threads=1)
    x = np.random.default_rng(3).standard_normal((8, 3, 32, 32)).astype(np.float32)
    a = em.forward(x)
    before = em.get_parameters()
    assert np.array_equal(a, em.forward(x))
    after_fwd = em.get_parameters()
    assert all(np.array_equal(before[k], after_fwd[k]) for k in before), "forward changed state"
    a_train = em.train_step(x, np.zeros_like(a))
    assert np.array_equal(a, a_train)


def test_batchnorm_running_statistics(exported):
    """ONNX semantics: running = 0.9 running + 0.1 batch, with the *biased* batch variance, once per train step."""
    em = EdgeModel(exported("resnet18", 3), threads=1)
    p0 = em.get_parameters()
    x = np.random.default_rng(4).standard_normal((8, 3, 32, 32)).astype(np.float32)
    a = em.forward(x)
    em.infer(x)
    unchanged = em.get_parameters()
    assert np.array_equal(unchanged["bn1.running_mean"], p0["bn1.running_mean"])
    assert np.array_equal(unchanged["bn1.running_var"], p0["bn1.running_var"])

    em.train_step(x, np.zeros_like(a))  # zero gradient: only the statistics move
    p1 = em.get_parameters()
    with torch.no_grad():
        h = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(p0["conv1.weight"]), stride=2, padding=3)
    mean = h.mean((0, 2, 3)).numpy()
    var_biased = h.var((0, 2, 3), unbiased=False).numpy()
    np.testing.assert_allclose(p1["bn1.running_mean"], 0.9 * p0["bn1.running_mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p1["bn1.running_var"], 0.9 * p0["bn1.running_var"] + 0.1 * var_biased, rtol=1e-5, atol=1e-6)
    # torch would have used the unbiased variance: the documented, known difference
    var_unbiased = h.var((0, 2, 3), unbiased=True).numpy()
    assert not np.allclose(p1["bn1.running_var"], 0.9 * p0["bn1.running_var"] + 0.1 * var_unbiased, rtol=1e-6, atol=0)

    # inference uses the running statistics: equal to torch's eval-mode forward with the same state
    client = _torch_client("resnet18", 3, 3, p1).eval()
    with torch.no_grad():
        np.testing.assert_allclose(em.infer(x), client(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_server_weights_and_client_checkpoint_reassemble(exported):
    from safetensors.torch import load_file

    out = exported("mobilenet_v2", 4)
    m = mf.load(out)
    em = EdgeModel(out)
    state = {k: torch.from_numpy(v) for k, v in em.get_parameters().items()}
    state.update(load_file(str(out / mf.SERVER_WEIGHTS)))

    torch.manual_seed(m.seed)
    original = zoo.build(m.model, m.num_classes, m.input_shape[0])  # the export's own initialisation
    rebuilt = zoo.build(m.model, m.num_classes, m.input_shape[0])
    missing = rebuilt.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in missing.missing_keys)
    x = torch.randn(4, *m.input_shape)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), original.eval()(x))


# ---------------------------------------------------------------------------- CLI


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path("export-client"), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_help_documents_every_option():
    from splitedge.export.cli import main

    res = _run("--help")
    assert res.returncode == 0
    for p in main.params:
        for opt in p.opts:
            if opt.startswith("--"):
                assert opt in res.stdout, opt
        assert p.help, f"{p.name} has no help text"


def test_cli_export_and_list_cuts(tmp_path):
    out = tmp_path / "a"
    res = _run("--model", "resnet18", "--cut", "layer1", "--input-shape", "1,28,28", "--out", str(out), "-q")
    assert res.returncode == 0, res.stderr
    m = mf.load(out)
    assert (m.cut, m.cut_name, m.activation_shape) == (5, "layer1", (64, 7, 7))
    assert oct(out.stat().st_mode & 0o777) != oct(0o700), "the artifact directory must not stay private"

    res = _run("--model", "resnet18", "--list-cuts", "--input-shape", "3,32,32")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert any(line.split()[:2] == ["3", "relu"] and "64x16x16" in line and "65,536" in line for line in lines)
    assert sum(1 for line in lines if line.strip()[:1].isdigit()) == 9


def test_cli_default_out_is_artifacts_model_cut(tmp_path):
    res = _run("--model", "resnet18", "--cut", "relu", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert mf.load(tmp_path / "artifacts" / "resnet18-cut3").cut == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "resnet50", "--cut", "3"], "'resnet50' is not one of"),
        (["--model", "resnet18", "--cut", "10"], "cut 10 out of range"),
        (["--model", "resnet18", "--cut", "0"], "cut 0 out of range"),
        (["--model", "resnet18", "--cut", "fc"], "leaves nothing on the server"),
        (["--model", "vgg11", "--cut", "3", "--input-shape", "1,28,28"], "too small for vgg11"),
        (["--model", "resnet18", "--cut", "3", "--input-shape", "1,28"], "three positive integers"),
        (["--model", "resnet18", "--cut", "3", "--lr", "-1"], "--lr"),
        (["--model", "resnet18"], "missing --cut"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    res = _run(*args, "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_unwritable_out_exits_2(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _run("--model", "resnet18", "--cut", "3", "--out", str(blocker / "sub"))
    assert res.returncode == 2 and "not a directory" in res.stderr
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    if os.geteuid() != 0:  # permission bits bind ordinary users: the whole command
        res = _run("--model", "resnet18", "--cut", "3", "--out", str(ro / "a"))
        assert res.returncode == 2 and "not writable" in res.stderr
    # root writes through permission bits (CI runs as root): the check itself, with access() saying no
    real_access = os.access
    monkeypatch.setattr(oe.os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    with pytest.raises(oe.ExportError, match="not writable"):
        oe._check_out(ro / "a", False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"] and not any(ro.iterdir())


def test_cli_existing_out_needs_force(tmp_path):
    out = tmp_path / "a"
    assert _run("--model", "resnet18", "--cut", "5", "--out", str(out), "-q").returncode == 0
    (out / "keep.txt").write_text("precious")
    res = _run("--model", "resnet18", "--cut", "3", "--out", str(out))
    assert res.returncode == 2 and "--force" in res.stderr
    assert (out / "keep.txt").read_text() == "precious" and mf.load(out).cut == 5
    res = _run("--model", "resnet18", "--cut", "3", "--out", str(out), "--force", "-q")
    assert res.returncode == 0
    assert not (out / "keep.txt").exists() and mf.load(out).cut == 3
    assert [p.name for p in tmp_path.iterdir()] == ["a"], "no temporary or backup directory left behind"


def test_export_failure_leaves_nothing_and_keeps_the_old_directory(tmp_path, monkeypatch):
    out = tmp_path / "a"
    oe.export(oe.ExportRequest("resnet18", 3, out=str(out)))
    before = mf.sha256_file(out / "manifest.json")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="No space left"):
        oe.export(oe.ExportRequest("resnet18", 5, out=str(out), force=True))
    assert mf.sha256_file(out / "manifest.json") == before and mf.load(out).cut == 3
    with pytest.raises(OSError):
        oe.export(oe.ExportRequest("resnet18", 5, out=str(tmp_path / "b")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_export_does_not_import_onnxruntime_for_help():
    code = "import sys; from splitedge.export import cli; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_cli_weights_needing_code_execution_or_garbage_are_refused(tmp_path):
    """A pickled module (loading it would run code) and a garbage file: exit 2, nothing written, and no advice
    to load with weights_only=False."""
    full = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), full)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage\n")
    for path, detail in ((full, "Unsupported global"), (junk, "Unsupported operand")):
        out = tmp_path / "out"
        res = _run("--model", "resnet18", "--cut", "3", "--weights", str(path), "--out", str(out))
        assert res.returncode == 2, res.stderr
        assert "loads without executing code" in res.stderr and detail in res.stderr
        assert "weights_only` set to `False`" not in res.stderr and not out.exists()


def test_cli_force_never_replaces_a_directory_that_is_not_artifacts(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me\n")
    res = _run("--model", "resnet18", "--cut", "3", "--out", str(out), "--force")
    assert res.returncode == 2 and "not an artifact directory" in res.stderr, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["todo.txt"] and (out / "todo.txt").read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"], "no temporary directory left behind"
