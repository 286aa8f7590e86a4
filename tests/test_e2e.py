"""End to end: real cloud-serve and edge-train processes over TCP loopback.

Settings of the accuracy runs: ResNet-18 cut 3 for 1x28x28, 2 clients x 100 steps of batch 64
(12,800 of Fashion-MNIST's 60,000 training images), SGD lr 0.01 on both sides (momentum 0.9
on the cloud), evaluation on the first 2,000 test images. On the 2-core CI machine each run
takes about 50 s and ends at 72-80 % test accuracy (fp32, SGQ 4-bit, SL-ACC; measured over
several runs, evaluations fluctuate by several points this early in training). The asserted
floor of 60 % is six times chance (10 %).
"""

from __future__ import annotations

import json
import os
import zlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from helpers import run_cli
from splitedge.lab import launch
from splitedge.wire import protocol as P
from splitedge.runtime_edge import data as D

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist (scripts/setup installs it)"
)

STEPS, BATCH, EVAL = 100, 64, 2000
ACCURACY_FLOOR = 0.60
SYNTH = "synthetic:n=2048,classes=10,shape=1x28x28,seed=0"


@pytest.fixture(scope="module")
def fashion_artifacts(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28), lr=0.01)


@pytest.fixture(scope="module")
def e2e_runs(fashion_artifacts, tmp_path_factory):
    """Runs (and caches) one 2-client training per codec."""
    cache: dict[str, launch.RunResult] = {}

    def run(codec: str) -> launch.RunResult:
        if codec not in cache:
            bits = ["--bits", "4"] if codec in ("sgq", "slacc", "uq") else []
            if codec == "slacc":
                bits = []  # SL-ACC allocates 2..8 bits per group itself
            spec = launch.RunSpec(
                workdir=tmp_path_factory.mktemp(f"e2e-{codec}"), artifacts=fashion_artifacts, num_clients=2,
                cloud_args=["--codec", codec, *bits, "--lr", "0.01", "--momentum", "0.9", "--threads", "1"],
                edge_args=["--data", "fashion-mnist", "--steps", str(STEPS), "--batch-size", str(BATCH),
                           "--eval-samples", str(EVAL), "--threads", "1"],
                timeout_s=600,
            )
            cache[codec] = launch.run(spec)
        return cache[codec]

    return run


@needs_fashion
@pytest.mark.slow
@pytest.mark.dataset
@pytest.mark.parametrize("codec", ["fp32", "sgq", "slacc"])
def test_two_clients_learn_fashion_mnist(e2e_runs, codec):
    result = e2e_runs(codec)
    assert len(result.summaries) == 2
    for s in result.summaries:
        assert s["steps"] == STEPS and s["samples"] == STEPS * BATCH
        assert s["eval_samples"] == EVAL
        assert s["final_accuracy"] >= ACCURACY_FLOOR, s
        assert s["codec"]["name"] == codec
    events = result.metrics()
    steps = [(e["client"], e["step"]) for e in events if e["event"] == "step"]
    assert sorted(steps) == sorted((c, s) for c in (0, 1) for s in range(1, STEPS + 1)), "each step applied once"
    assert not [e for e in events if e["event"] == "error"]


@needs_fashion
@pytest.mark.slow
@pytest.mark.dataset
def test_sgq_cuts_real_traffic_against_fp32(e2e_runs):
    """Bytes really sent and received by the edges (ZeroMQ frames), SGQ 4-bit vs fp32, same steps."""
    fp32, sgq = e2e_runs("fp32"), e2e_runs("sgq")
    wire = {name: sum(s["bytes_sent"] + s["bytes_received"] for s in r.summaries) for name, r in
            (("fp32", fp32), ("sgq", sgq))}
    train = {name: launch.traffic(r.metrics())["frame_bytes"] for name, r in (("fp32", fp32), ("sgq", sgq))}
    # every TRAIN/GRAD/EVAL frame of the run: SGQ's 4-bit indices plus its small codebooks come to
    # about 1/40 of fp32; 20x is the stated floor
    assert wire["fp32"] / wire["sgq"] >= 20, wire
    assert train["fp32"] / train["sgq"] >= 20, train
    t = launch.traffic(sgq.metrics())
    assert t["reduction_vs_fp32"] >= 20


# ---------------------------------------------------------------------------- equivalence


@pytest.mark.slow
def test_split_training_equals_one_pytorch_process(exported, tmp_path):
    """fp32 codec, one client, plain SGD on both sides: each step of the real split system (edge
    process on ORT, cloud process on torch, ZeroMQ between) equals one SGD step of the whole
    model in one PyTorch process on the same batch, from the same weights.

    Both sides checkpoint after every step; for every step k the reference starts from the
    split system's weights after step k-1 and takes the whole-model step on batch k.
    Tolerance per tensor: ||split - ref|| <= 1e-4 ||update|| + 1e-5 ||update of all tensors||,
    the tolerance test_export.py justifies for ORT against torch. Comparing after several steps
    instead would not be a float tolerance: a 1e-6 difference flips MaxPool ties right after the
    cut, and SGD amplifies that chaotically (measured: 1e-3 after two steps).

    The activation at the cut: torch's edge half and ORT's differ by float32 rounding (~1e-7 of
    its norm; asserted below to be under 1e-5). Fed into the cloud half, such a difference can flip
    a ReLU whose input is within ~1e-6 of zero, and one flipped element changes the whole
    backward: measured on a 2-vCPU AMD EPYC (family 25), step 2 had one such ReLU in layer2.0
    (pre-activation 4e-9 from ORT's activation, -5e-7 from torch's), which changed dL/d(activation)
    by 4e-3 of its norm and the updates upstream of it by up to 38x the tolerance (the earlier CI
    machine, whose kernels round otherwise, passed: no flip there). So the reference takes, at the cut, the
    value of ORT's activation -- the one the edge sent, recomputed from its checkpoint with the
    edge's one thread -- with torch's edge-half graph under it for the backward
    (``a + (a_ort - a).detach()``): the cloud half then sees the cloud's exact input, and the edge
    half is still held to torch's backward from the gradient the cloud returned.
    BatchNorm running statistics are not compared (ORT's running_var uses the biased variance).
    """
    import torch
    from safetensors.torch import load_file
    from torch.nn import functional as F

    from splitedge.export import manifest as mf
    from splitedge.export import split, zoo
    from splitedge.fsutil import CheckpointDir
    from splitedge.runtime_edge.ort_backend import EdgeModel

    lr, steps, batch = 0.05, 5, 16
    art = exported("resnet18", 3, input_shape=(1, 28, 28), lr=lr)
    m = mf.load(art)
    spec = launch.RunSpec(
        workdir=tmp_path, artifacts=art, num_clients=1,
        cloud_args=["--codec", "fp32", "--lr", str(lr), "--momentum", "0", "--threads", "1",
                    "--checkpoint-dir", str(tmp_path / "cloud-ckpt"), "--checkpoint-every", "1",
                    "--keep-checkpoints", "100"],
        edge_args=["--data", SYNTH, "--steps", str(steps), "--batch-size", str(batch), "--eval-samples", "64",
                   "--threads", "1", "--checkpoint-dir", str(tmp_path / "edge-ckpt"), "--checkpoint-every", "1",
                   "--keep-checkpoints", "100", "--seed", "3"],
        timeout_s=300,
    )
    launch.run(spec)

    def split_state(k: int) -> tuple[EdgeModel, dict[str, torch.Tensor]]:
        """The edge model after step k of the split run (k=0: the exported one) and the whole model's weights."""
        if k == 0:
            edge_model = EdgeModel(art, threads=1)
            cloud = load_file(str(art / "server" / "model.safetensors"))
        else:
            # the checkpoint of step k (the final one at shutdown supersedes the periodic one of its step)
            edge_ck, cloud_ck = (CheckpointDir(tmp_path / d).for_tag(f"{k:09d}") for d in ("edge-ckpt", "cloud-ckpt"))
            edge_model = EdgeModel(art, checkpoint=edge_ck / "edge_checkpoint", threads=1)
            cloud = load_file(str(cloud_ck / "server_model.safetensors"))
        return edge_model, {**{n: torch.from_numpy(v) for n, v in edge_model.get_parameters().items()}, **cloud}

    ds = D.load(SYNTH, split="train")
    shard = D.partition(ds.labels, 1, 0, "iid", 3)
    batches = list(D.batches(ds, shard, batch, seed=3, epoch=0))[:steps]
    ref = zoo.build(m.model, m.num_classes, m.input_shape[0]).train()
    edge_half, cloud_half = split.split(m.model, ref, m.cut)  # views of ref's modules
    names = [n for n, _ in ref.named_parameters()]
    for k, (x, y) in enumerate(batches, start=1):
        (edge_model, before), (_, after) = split_state(k - 1), split_state(k)
        a_ort = torch.from_numpy(edge_model.forward(x))  # the activation the edge sent for step k
        ref.load_state_dict(before, strict=False)
        opt = torch.optim.SGD(ref.parameters(), lr=lr)
        opt.zero_grad()
        a = edge_half(torch.from_numpy(x))
        cut_err = float((a.detach() - a_ort).norm() / a.detach().norm())
        assert cut_err <= 1e-5, f"step {k}: the edge's activation differs from torch's edge half by {cut_err:.3g}"
        F.cross_entropy(cloud_half(a + (a_ort - a).detach()), torch.from_numpy(y)).backward()
        opt.step()
        expected = ref.state_dict()
        update = {n: (expected[n] - before[n]).double() for n in names}
        total = float(torch.sqrt(sum((u**2).sum() for u in update.values())))
        assert total > 0
        for n in names:
            err = float((after[n].double() - expected[n].double()).norm())
            bound = 1e-4 * float(update[n].norm()) + 1e-5 * total
            assert err <= bound, f"step {k}, {n}: split differs from whole-model SGD by {err:.3g} > {bound:.3g}"
        assert not torch.allclose(after["conv1.weight"], before["conv1.weight"]), "the edge did not learn"


# ---------------------------------------------------------------------------- failure paths


def _start_cloud(art: Path, port: int, workdir: Path, *extra: str, log_name: str = "cloud.log") -> subprocess.Popen:
    cmd = launch.script("cloud-serve") + ["--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{port}",
                                          "--metrics", str(workdir / "metrics.jsonl"), "--threads", "1", *extra]
    return subprocess.Popen(cmd, stdout=open(workdir / log_name, "a"), stderr=subprocess.STDOUT)


def _start_edge(art: Path, port: int, workdir: Path, cid: int, k: int, *extra: str) -> subprocess.Popen:
    cmd = launch.script("edge-train") + [
        "--artifacts", str(art), "--connect", f"tcp://127.0.0.1:{port}", "--data", SYNTH, "--client-id", str(cid),
        "--num-clients", str(k), "--batch-size", "16", "--eval-samples", "64", "--threads", "1", "--no-progress",
        "--summary", str(workdir / f"edge-{cid}.json"), *extra,
    ]
    return subprocess.Popen(cmd, stdout=open(workdir / f"edge-{cid}.log", "a"), stderr=subprocess.STDOUT)


def _wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _steps(workdir: Path) -> list[tuple[int, int]]:
    return [(e["client"], e["step"]) for e in launch.read_jsonl(workdir / "metrics.jsonl") if e["event"] == "step"]


@pytest.fixture
def synth_artifacts(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28), lr=0.02)


def _dealer(port: int) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10000)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


@pytest.mark.slow
def test_garbage_and_bad_messages_get_errors_and_the_server_keeps_serving(synth_artifacts, tmp_path):
    port = launch.free_port()
    cloud = _start_cloud(synth_artifacts, port, tmp_path, "--codec", "fp32", "--expect-clients", "1",
                         "--exit-when-done", "--client-timeout", "5")
    try:
        s = _dealer(port)
        s.send(b"garbage")
        reply = P.unpack(s.recv_multipart())
        assert reply.type == P.MsgType.ERROR and reply.header["code"] == "bad_message" and "magic" in reply.header["message"]

        s.send_multipart(P.pack(P.MsgType.TRAIN, {"id": 1, "step": 1, "n": 1, "round": 1, "total_rounds": 1, "encode_ms": 0},
                                [b"x", b"y"]))
        reply = P.unpack(s.recv_multipart())
        assert reply.header["code"] == "unknown_client"

        hello = {"id": 2, "client_id": 7, "num_clients": 8, "model": "vgg11", "cut": 3, "activation_shape": [1],
                 "input_shape": [1, 28, 28], "num_classes": 10, "samples": 1, "resume_step": 0, "planned_steps": 1}
        s.send_multipart(P.pack(P.MsgType.HELLO, hello))
        reply = P.unpack(s.recv_multipart())
        assert reply.header["code"] == "incompatible" and "vgg11" in reply.header["message"]

        hello.update(model="resnet18", activation_shape=[64, 14, 14])
        s.send_multipart(P.pack(P.MsgType.HELLO, hello))
        assert P.unpack(s.recv_multipart()).type == P.MsgType.WELCOME
        header = {"id": 3, "step": 1, "n": 2, "round": 1, "total_rounds": 1, "encode_ms": 0}
        s.send_multipart(P.pack(P.MsgType.TRAIN, header, [b"\x00" * 100, np.zeros(2, np.int64).tobytes()]))
        reply = P.unpack(s.recv_multipart())
        assert reply.header["code"] == "bad_payload"
        from splitedge import codecs as sc

        wrong = sc.get("fp32").encode(np.zeros((2, 64, 7, 7), np.float32))
        s.send_multipart(P.pack(P.MsgType.TRAIN, header, [wrong, np.zeros(2, np.int64).tobytes()]))
        reply = P.unpack(s.recv_multipart())
        assert reply.header["code"] == "shape_mismatch"
        other = sc.get("uq").encode(np.zeros((2, 64, 14, 14), np.float32))  # the right shape, another codec
        s.send_multipart(P.pack(P.MsgType.TRAIN, header, [other, np.zeros(2, np.int64).tobytes()]))
        reply = P.unpack(s.recv_multipart())
        assert reply.header["code"] == "bad_payload" and "this stream's codec is fp32" in reply.header["message"]
        nan = np.zeros((2, 64, 14, 14), np.float32)
        nan[0, 0, 0, 0] = np.nan
        s.send_multipart(P.pack(P.MsgType.TRAIN, header, [_fp32_with_nan(nan), np.zeros(2, np.int64).tobytes()]))
        reply = P.unpack(s.recv_multipart())
        assert reply.header["code"] in ("not_finite", "bad_payload") and "NaN" in reply.header["message"]

        # edges that partition the same data differently (e.g. numpy versions whose streams differ) are refused
        plan = {"plan": "p" * 32, "digest": "a" * 32, "numpy": "1.26.4"}
        s.send_multipart(P.pack(P.MsgType.HELLO, {**hello, "client_id": 3, "partition": plan}))
        assert P.unpack(s.recv_multipart()).type == P.MsgType.WELCOME
        s.send_multipart(P.pack(P.MsgType.HELLO, {**hello, "client_id": 4, "partition": {**plan, "digest": "b" * 32,
                                                                                          "numpy": "2.4.0"}}))
        reply = P.unpack(s.recv_multipart())
        assert reply.header["code"] == "incompatible", reply.header
        assert "client 4 computed a different partition than client 3" in reply.header["message"]
        assert "numpy 2.4.0 here, 1.26.4 there" in reply.header["message"]
        s.send_multipart(P.pack(P.MsgType.HELLO, {**hello, "client_id": 5, "partition": plan}))
        assert P.unpack(s.recv_multipart()).type == P.MsgType.WELCOME, "an agreeing edge joins"
        s.send_multipart(P.pack(P.MsgType.HELLO, {**hello, "client_id": 6, "partition": {"plan": 1}}))
        reply = P.unpack(s.recv_multipart())
        assert reply.header["code"] == "bad_message" and "HELLO.partition" in reply.header["message"]
        s.close()

        edge = _start_edge(synth_artifacts, port, tmp_path, 0, 1, "--steps", "10")
        assert edge.wait(timeout=120) == 0, (tmp_path / "edge-0.log").read_text()
        assert cloud.wait(timeout=60) == 0
        assert json.loads((tmp_path / "edge-0.json").read_text())["steps"] == 10
        errors = [e for e in launch.read_jsonl(tmp_path / "metrics.jsonl") if e["event"] == "error"]
        assert {e["code"] for e in errors} >= {"bad_message", "unknown_client", "incompatible", "bad_payload",
                                               "shape_mismatch"}
    finally:
        cloud.kill()


def _fp32_with_nan(x: np.ndarray) -> bytes:
    """An fp32 payload carrying a NaN: the codec refuses to encode one, so build it by hand."""
    from splitedge import codecs as sc

    clean = sc.get("fp32").encode(np.zeros_like(x))
    body = bytearray(clean)
    raw = x.astype("<f4").tobytes()
    # the fp32 payload ends with the raw values followed by a CRC32; patch the values and the CRC

    start = len(body) - 4 - len(raw)
    body[start:start + len(raw)] = raw
    body[-4:] = zlib.crc32(bytes(body[:-4])).to_bytes(4, "little")
    return bytes(body)


@pytest.mark.slow
def test_a_killed_client_does_not_stall_the_others(synth_artifacts, tmp_path):
    port = launch.free_port()
    cloud = _start_cloud(synth_artifacts, port, tmp_path, "--codec", "uq", "--client-timeout", "3",
                         "--expect-clients", "2", "--exit-when-done")
    edges = [_start_edge(synth_artifacts, port, tmp_path, cid, 2, "--steps", "60") for cid in (0, 1)]
    try:
        _wait_for(lambda: sum(1 for c, _ in _steps(tmp_path) if c == 1) >= 5, 120, "client 1's first steps")
        edges[1].send_signal(signal.SIGKILL)
        assert edges[0].wait(timeout=180) == 0, (tmp_path / "edge-0.log").read_text()
        assert cloud.wait(timeout=60) == 0, (tmp_path / "cloud.log").read_text()
        assert json.loads((tmp_path / "edge-0.json").read_text())["steps"] == 60
        events = launch.read_jsonl(tmp_path / "metrics.jsonl")
        assert any(e["event"] == "client_timeout" and e["client"] == 1 for e in events)
        assert sorted(s for c, s in _steps(tmp_path) if c == 0) == list(range(1, 61))
    finally:
        for p in (cloud, *edges):
            p.kill()


@pytest.mark.slow
def test_a_restarted_cloud_resumes_and_the_clients_follow(synth_artifacts, tmp_path):
    port = launch.free_port()
    ckpt = tmp_path / "ckpt"
    common = ("--codec", "uq", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5", "--expect-clients", "2",
              "--exit-when-done")
    cloud = _start_cloud(synth_artifacts, port, tmp_path, *common)
    edges = [_start_edge(synth_artifacts, port, tmp_path, cid, 2, "--steps", "40", "--timeout", "1", "--give-up", "120")
             for cid in (0, 1)]
    try:
        _wait_for(lambda: len(_steps(tmp_path)) >= 20, 120, "20 server steps")
        cloud.send_signal(signal.SIGTERM)
        assert cloud.wait(timeout=60) == 0
        before = len(_steps(tmp_path))
        time.sleep(1.0)
        cloud = _start_cloud(synth_artifacts, port, tmp_path, *common, "--resume", log_name="cloud2.log")
        for cid, e in enumerate(edges):
            assert e.wait(timeout=180) == 0, (tmp_path / f"edge-{cid}.log").read_text()
        assert cloud.wait(timeout=60) == 0, (tmp_path / "cloud2.log").read_text()
        assert "resumed from" in (tmp_path / "cloud2.log").read_text()
        steps = _steps(tmp_path)
        assert len(steps) > before
        for cid in (0, 1):
            assert json.loads((tmp_path / f"edge-{cid}.json").read_text())["steps"] == 40
            assert sorted(s for c, s in steps if c == cid) == list(range(1, 41)), "no step lost or applied twice"
    finally:
        for p in (cloud, *edges):
            p.kill()


def test_import_hygiene_of_the_edge_side():
    """The codecs, protocol, transport and data loaders import neither torch nor onnxruntime."""
    code = (
        "import sys\n"
        "import splitedge.codecs, splitedge.wire.protocol, splitedge.wire.transport, splitedge.runtime_edge.data\n"
        "import splitedge.export.manifest\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'scipy', 'sklearn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_fedavg_leaves_every_client_with_the_same_weighted_average(synth_artifacts, tmp_path):
    """3 clients with Dirichlet shards of different sizes, FedAvg every 5 steps, 10 steps: after the
    last round (step 10) all edges hold identical weights; the cloud logged both rounds with all
    clients and the sample-weighted total."""
    from splitedge.runtime_edge.ort_backend import EdgeModel

    spec = launch.RunSpec(
        workdir=tmp_path, artifacts=synth_artifacts, num_clients=3,
        cloud_args=["--codec", "uq", "--bits", "4", "--fedavg-every", "5", "--threads", "1"],
        edge_args=["--data", SYNTH, "--steps", "10", "--batch-size", "16", "--eval-samples", "32", "--threads", "1",
                   "--partition", "dirichlet:0.5"],
        per_client_args={c: ["--checkpoint-dir", str(tmp_path / f"ckpt-{c}")] for c in range(3)},
        timeout_s=300,
    )
    result = launch.run(spec)
    rounds = [e for e in result.metrics() if e["event"] == "fedavg"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["clients"] == [0, 1, 2] for r in rounds)
    shards = [s["shard_samples"] for s in result.summaries]
    assert len(set(shards)) > 1 and rounds[0]["samples"] == sum(shards)
    params = [EdgeModel(synth_artifacts, checkpoint=sorted((tmp_path / f"ckpt-{c}").glob("ckpt-*"))[-1]
                        / "edge_checkpoint").get_parameters() for c in range(3)]
    init = EdgeModel(synth_artifacts).get_parameters()
    for name in params[0]:
        assert np.array_equal(params[0][name], params[1][name]) and np.array_equal(params[0][name], params[2][name])
    assert not np.array_equal(params[0]["conv1.weight"], init["conv1.weight"])


@pytest.mark.slow
def test_fedavg_with_a_late_joiner_does_not_deadlock(synth_artifacts, tmp_path):
    """Client 0 averages alone until clients 1 and 2 join; they catch up on the rounds client 0 has
    passed among themselves, then all three average together; everyone finishes."""
    port = launch.free_port()
    cloud = _start_cloud(synth_artifacts, port, tmp_path, "--codec", "uq", "--fedavg-every", "5",
                         "--client-timeout", "30")
    edges = [_start_edge(synth_artifacts, port, tmp_path, 0, 3, "--steps", "60")]
    try:
        _wait_for(lambda: any(e["event"] == "fedavg" for e in launch.read_jsonl(tmp_path / "metrics.jsonl")), 120,
                  "client 0's first FedAvg round")
        edges += [_start_edge(synth_artifacts, port, tmp_path, c, 3, "--steps", "40") for c in (1, 2)]
        for c, e in enumerate(edges):
            assert e.wait(timeout=240) == 0, (tmp_path / f"edge-{c}.log").read_text()
        rounds = [(e["round"], e["clients"]) for e in launch.read_jsonl(tmp_path / "metrics.jsonl")
                  if e["event"] == "fedavg"]
        assert rounds[0] == (1, [0]) and (1, [1, 2]) in rounds
        assert any(clients == [0, 1, 2] for _, clients in rounds), rounds
        for c, steps in ((0, 60), (1, 40), (2, 40)):
            assert json.loads((tmp_path / f"edge-{c}.json").read_text())["steps"] == steps
    finally:
        for p in (cloud, *edges):
            p.kill()


def test_edge_train_refuses_more_clients_than_samples(synth_artifacts):
    res = run_cli("edge-train", "--artifacts", str(synth_artifacts), "--data", "synthetic:n=64,classes=10,shape=1x28x28,seed=0",
                  "--num-clients", "100", "--client-id", "3", "--give-up", "5")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "--num-clients 100" in res.stderr and "at least min_size=1 of 64 samples" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_max_clients_refuses_new_ids_while_full(synth_artifacts, tmp_path):
    port = launch.free_port()
    cloud = _start_cloud(synth_artifacts, port, tmp_path, "--codec", "uq", "--max-clients", "2")
    socks = []
    try:
        hello = {"num_clients": 3, "model": "resnet18", "cut": 3, "activation_shape": [64, 14, 14],
                 "input_shape": [1, 28, 28], "num_classes": 10, "samples": 1, "resume_step": 0, "planned_steps": 1}

        def say(s, msg_type, header):
            s.send_multipart(P.pack(msg_type, {"id": 1, **header}))
            reply = P.unpack(s.recv_multipart())
            assert reply.header["reply_to"] == 1, reply.header
            return reply

        a, b, c = (_dealer(port) for _ in range(3))
        socks += [a, b, c]
        assert say(a, P.MsgType.HELLO, {**hello, "client_id": 0}).type == P.MsgType.WELCOME
        assert say(b, P.MsgType.HELLO, {**hello, "client_id": 1}).type == P.MsgType.WELCOME
        reply = say(c, P.MsgType.HELLO, {**hello, "client_id": 2})
        assert reply.type == P.MsgType.ERROR and reply.header["code"] == "server_full"
        assert "at most 2 clients" in reply.header["message"]
        assert say(a, P.MsgType.HELLO, {**hello, "client_id": 0}).type == P.MsgType.WELCOME, "a known id may rejoin"
        assert say(b, P.MsgType.BYE, {"reason": "finished", "steps": 0}).type == P.MsgType.BYE_ACK
        assert say(c, P.MsgType.HELLO, {**hello, "client_id": 2}).type == P.MsgType.WELCOME, "a finished one frees a place"

        # a real edge finding the cloud full waits for a place (up to --give-up), then trains
        edge = _start_edge(synth_artifacts, port, tmp_path, 3, 4, "--steps", "3", "--give-up", "120")
        _wait_for(lambda: "server_full" in (tmp_path / "edge-3.log").read_text(), 60, "the edge to find the cloud full")
        assert edge.poll() is None, "a full cloud is not a reason to stop"
        assert say(c, P.MsgType.BYE, {"reason": "finished", "steps": 0}).type == P.MsgType.BYE_ACK
        assert edge.wait(timeout=120) == 0, (tmp_path / "edge-3.log").read_text()[-3000:]
        assert json.loads((tmp_path / "edge-3.json").read_text())["steps"] == 3
        # with no place before --give-up it stops with the cloud's message
        assert say(b, P.MsgType.HELLO, {**hello, "client_id": 1}).type == P.MsgType.WELCOME  # full again: 0 and 1
        late = _start_edge(synth_artifacts, port, tmp_path, 2, 4, "--steps", "3", "--give-up", "3")
        assert late.wait(timeout=120) == 1
        assert "no place within --give-up 3s" in (tmp_path / "edge-2.log").read_text()
        assert cloud.poll() is None
    finally:
        for s in socks:
            s.close()
        cloud.kill()
