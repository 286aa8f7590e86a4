"""Device profiles: the shipped files, strict validation, provider selection, the CLIs, edge-train --profile."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from splitedge.lab import launch
from splitedge import profiles as P
from splitedge.profiles import schema

from helpers import bin_path

SHIPPED = ("atlas-200dk", "cpu", "jetson-nano", "jetson-orin-nano", "raspberry-pi-4")
CPU, CUDA, TRT, CANN = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                        "CANNExecutionProvider")
SYNTH = "synthetic:n=256,classes=10,shape=1x28x28,seed=0"


@pytest.fixture(scope="module")
def art(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28))


def nano_text() -> str:
    return (schema.PROFILE_DIR / "jetson-nano.toml").read_text()


def write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------- shipped files

def test_every_shipped_profile_validates():
    assert tuple(P.shipped()) == SHIPPED
    for name in SHIPPED:
        p = P.load(name)
        assert p.name == name and p.schema_version == 1
        assert p.forward[-1] == CPU and p.training[-1] == CPU
        assert set(p.training) <= {CUDA, CPU}
        assert p.description and p.ort.origin and p.board.python == "3.11"
        # no shipped profile needs a source build any more: stock wheels serve every board
        assert p.ort.source == "pypi" and not p.ort.build
        assert p.to_dict()["providers"]["forward"] == list(p.forward)
        if p.board.arch == "aarch64":
            # plain onnxruntime, pinned, and a [[stack]] that splitedge can use, on the CPU, with the same pin
            assert p.ort.package == "onnxruntime" and p.ort.requirements == (f"onnxruntime=={p.ort.version}",)
            usable = [st for st in p.stacks if st.usable]
            assert usable and all(st.placement == "inference: CPU; forward: CPU; backward: CPU" for st in usable)
            assert all(st.python == p.board.python for st in usable)
            assert any(pkg.startswith(f"onnxruntime=={p.ort.version} ") for st in usable for pkg in st.packages)
    assert TRT in P.load("jetson-nano").forward
    assert P.load("jetson-nano").tensorrt == schema.TensorRTOptions(fp16=True, engine_cache=True,
                                                                     engine_cache_dir="trt-engines")
    assert P.load("atlas-200dk").forward == (CANN, CPU)
    # every shipped profile installs plain onnxruntime and trains with the portable backend: no torch,
    # no onnxruntime-training on any board
    assert P.load("cpu").ort.requirements == ("onnxruntime==1.19.2",)
    assert {P.load(n).backend for n in SHIPPED} == {"portable"}
    assert not any("torch" in r or "training" in r for n in SHIPPED for r in P.load(n).ort.requirements)
    # one pin for every aarch64 board: the newest onnxruntime that ran on the emulated board (and whose cp311
    # aarch64 wheel is tagged manylinux_2_27, for the Ubuntu 18.04 boards' glibc 2.27)
    assert {P.load(n).ort.version for n in SHIPPED if n != "cpu"} == {"1.27.0"}


def test_the_accelerator_stacks_say_where_each_graph_runs_and_whether_they_train():
    nano = {st.name: st for st in P.load("jetson-nano").stacks}
    gpu = nano["jetpack-4.6-gpu"]
    assert (gpu.inference, gpu.forward, gpu.backward) == ("TensorRT", "CUDA", "CUDA") and not gpu.usable
    assert gpu.python == "3.6" and "TensorRT 8.2.1" in gpu.system and "CUDA 10.2" in gpu.system
    assert gpu.packages[0].startswith("onnxruntime-gpu==1.11.0: onnxruntime_gpu-1.11.0-cp36-cp36m-linux_aarch64.whl")
    orin = {st.name: st for st in P.load("jetson-orin-nano").stacks}["jetpack-6-gpu"]
    assert orin.python == "3.10" and "TensorRT 10.3" in orin.system and "CUDA 12.6" in orin.system
    assert orin.packages[0].startswith("onnxruntime-gpu==1.23.0: onnxruntime_gpu-1.23.0-cp310-cp310-linux_aarch64.whl")
    atlas = {st.name: st for st in P.load("atlas-200dk").stacks}
    assert atlas["cann-atc"].inference == "ATC" and atlas["cann-ep"].inference == "CANN"
    for st in (atlas["cann-atc"], atlas["cann-ep"]):
        assert (st.forward, st.backward) == ("CPU", "CPU") and st.accelerated and not st.trains_on_accelerator

    r = run(bin_path("splitedge"), "profiles", "show", "jetson-nano")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "# jetpack-4.6-gpu: JetPack 4.6.1-4.6.6 (L4T R32.7.x, Ubuntu 18.04); Python 3.6; NOT usable by splitedge" in out
    assert "#   package: onnxruntime-gpu==1.11.0: onnxruntime_gpu-1.11.0-cp36-cp36m-linux_aarch64.whl" in out
    assert "#   graphs:  inference: TensorRT; forward: CUDA; backward: CUDA" in out
    assert "#   TensorRT: the inference graph only\n" in out and "cannot train" not in out  # it trains on CUDA
    assert "#   CUDA: the forward and backward graphs; trains on the accelerator" in out
    assert "#   system:  TensorRT 8.2.1" in out and "#   system:  CUDA 10.2" in out
    assert "# jetpack-4.6-cpu:" in out and "#   package: onnxruntime==1.27.0 (PyPI, cp311 manylinux_2_27 aarch64)" in out
    assert ("# jetson-nano: splitedge trains on CPU here (usable stacks: jetpack-4.6-cpu); no usable stack trains "
            "on an accelerator") in out
    # JetPack 6.x is not for the Nano: the profile says so and names its packages
    assert "JetPack 6.x does not support the" in out and "onnxruntime-gpu 1.23.0" in out
    import tomllib

    tomllib.loads(out)  # the summary is TOML comments: the output stays a valid profile file

    r = run(bin_path("splitedge"), "profiles", "show", "atlas-200dk")
    out = r.stdout
    assert "#   ATC: the inference graph only\n" in out and "#   CANN: the inference graph only\n" in out
    assert out.count("#   this accelerator path cannot train: training (forward, backward) runs on the CPU") == 2
    assert "onnxruntime-cann==1.20.1" in out and "atc --model=inference_model.onnx --framework=5" in out
    r = run(bin_path("splitedge"), "profiles", "show", "jetson-orin-nano", "--json")
    d = json.loads(r.stdout)
    gpu = next(st for st in d["stack"] if st["name"] == "jetpack-6-gpu")
    assert gpu["inference"] == "TensorRT" and gpu["trains_on_accelerator"] and not gpu["usable"]


def test_profiles_are_frozen():
    p = P.load("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.runtime.threads = 3  # type: ignore[misc]


def test_known_provider_names_are_ort_s_full_list():
    import onnxruntime as ort

    assert tuple(ort.get_all_providers()) == schema.ORT_PROVIDERS


def test_a_user_profile_file_loads_by_path(tmp_path):
    path = write(tmp_path, nano_text().replace('name = "jetson-nano"', 'name = "my-nano"')
                 .replace("batch_size = 16", "batch_size = 8"))
    p = P.load(str(path))
    assert p.name == "my-nano" and p.runtime.batch_size == 8 and p.path == str(path)


# ------------------------------------------------------------------------------------- validation

BAD = [
    # (id, transform of jetson-nano.toml, key named, fragment of the message)
    ("unknown-top-key", lambda t: t.replace("schema_version = 1", 'schema_version = 1\ncolour = "red"'),
     "colour", "unknown key"),
    ("unknown-table-key", lambda t: t.replace("fp16 = true", "fp16 = true\nfp17 = true"),
     "tensorrt.fp17", "allowed: fp16, engine_cache, engine_cache_dir"),
    ("unknown-table", lambda t: t + "\n[gpu]\nx = 1\n", "gpu", "unknown key"),
    ("bad-provider", lambda t: t.replace('forward = ["TensorrtExecutionProvider"', 'forward = ["TensorRTProvider"'),
     "providers.forward", "'TensorRTProvider'"),
    ("training-tensorrt", lambda t: t.replace('training = ["CUDAExecutionProvider"', 'training = ["TensorrtExecutionProvider"'),
     "providers.training", "allowed: CUDAExecutionProvider, CPUExecutionProvider"),
    ("training-cann", lambda t: t.replace('training = ["CUDAExecutionProvider", "CPUExecutionProvider"]',
                                          'training = ["CANNExecutionProvider", "CPUExecutionProvider"]'),
     "providers.training", "training API runs on cpu or cuda only"),
    ("no-cpu-fallback", lambda t: t.replace('"CUDAExecutionProvider", "CPUExecutionProvider"]\ntraining',
                                            '"CUDAExecutionProvider"]\ntraining'),
     "providers.forward", "must end with CPUExecutionProvider"),
    ("cpu-not-last", lambda t: t.replace('training = ["CUDAExecutionProvider", "CPUExecutionProvider"]',
                                         'training = ["CPUExecutionProvider", "CUDAExecutionProvider"]'),
     "providers.training", "must end with CPUExecutionProvider"),
    ("duplicate-provider", lambda t: t.replace('training = ["CUDAExecutionProvider", "CPUExecutionProvider"]',
                                               'training = ["CPUExecutionProvider", "CPUExecutionProvider"]'),
     "providers.training", "twice"),
    ("threads-string", lambda t: t.replace("threads = 4", 'threads = "4"'), "runtime.threads", "must be an integer"),
    ("threads-negative", lambda t: t.replace("threads = 4", "threads = -1"), "runtime.threads", "must be >= 0"),
    ("batch-bool", lambda t: t.replace("batch_size = 16", "batch_size = true"), "runtime.batch_size",
     "must be an integer"),
    ("batch-zero", lambda t: t.replace("batch_size = 16", "batch_size = 0"), "runtime.batch_size", ">= 1"),
    ("fp16-string", lambda t: t.replace("fp16 = true ", 'fp16 = "yes" '), "tensorrt.fp16", "must be true or false"),
    ("device-negative", lambda t: t.replace("device_id = 0", "device_id = -2"), "cuda.device_id", ">= 0"),
    ("schema-version", lambda t: t.replace("schema_version = 1", "schema_version = 2"), "schema_version",
     "not supported"),
    ("missing-runtime", lambda t: t[:t.index("[runtime]")], "runtime", "is missing"),
    ("missing-memory", lambda t: t.replace("memory_budget_mb = 2500", ""), "runtime.memory_budget_mb", "is missing"),
    ("bad-arch", lambda t: t.replace('arch = "aarch64"', 'arch = "armv7l"'), "board.arch", "allowed: x86_64, aarch64"),
    ("bad-python", lambda t: t.replace('python = "3.11"', 'python = "3"'), "board.python", '"3.N"'),
    ("bad-name", lambda t: t.replace('name = "jetson-nano"', 'name = "Jetson Nano"'), "name", "not a valid"),
    ("section-without-provider", lambda t: t + "\n[cann]\ndevice_id = 0\n", "cann", "CANNExecutionProvider is not in"),
    ("source-without-build", lambda t: t.replace('source = "pypi"', 'source = "source"'), "ort.build",
     "build command"),
    ("bad-version", lambda t: t.replace('version = "1.27.0"', 'version = "latest"'), "ort.version", "X.Y.Z"),
    ("stack-bad-place", lambda t: t.replace('inference = "TensorRT"', 'inference = "GPU"'), "stack[1].inference",
     "allowed: TensorRT, CUDA, CANN, ATC, CPU"),
    ("stack-unknown-key", lambda t: t.replace('usable = false', 'usable = false\ntrains = true'), "stack[1].trains",
     "unknown key"),
    ("stack-usable-not-bool", lambda t: t.replace('usable = false', 'usable = "no"'), "stack[1].usable",
     "true or false"),
    ("stack-without-why", lambda t: re.sub(r'(?m)^why = .*\n', '', t), "stack[0].why", "is missing"),
    ("stack-twice", lambda t: t.replace('name = "jetpack-4.6-gpu"', 'name = "jetpack-4.6-cpu"'), "stack[1].name",
     "names a stack twice"),
    ("stack-bad-python", lambda t: t.replace('python = "3.6"', 'python = "three"'), "stack[1].python", '"3.N"'),
    ("stack-no-packages", lambda t: re.sub(r'(?m)^packages = \["onnxruntime-gpu.*\n', 'packages = []\n', t),
     "stack[1].packages", "must name"),
    ("stack-not-a-table", lambda t: t[:t.index("[[stack]]")].replace("schema_version = 1",
                                                                      "schema_version = 1\nstack = [3]"),
     "stack[0]", "must be a table"),
]


@pytest.mark.parametrize("transform,key,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_profiles_raise_profile_error_naming_file_and_key(tmp_path, transform, key, fragment):
    text = transform(nano_text())
    assert text != nano_text()
    path = write(tmp_path, text)
    with pytest.raises(P.ProfileError) as ei:
        P.load(path)
    e = ei.value
    assert isinstance(e, ValueError)
    assert e.key == key, str(e)
    msg = str(e)
    assert str(path) in msg and f"key '{key}'" in msg and fragment in msg, msg


def test_bad_provider_message_shows_allowed_and_received(tmp_path):
    path = write(tmp_path, nano_text().replace('forward = ["TensorrtExecutionProvider"', 'forward = ["TensorRT"'))
    with pytest.raises(P.ProfileError) as ei:
        P.load(path)
    msg = str(ei.value)
    assert "entry 0 is not an ONNX Runtime execution provider" in msg and msg.endswith("got 'TensorRT'")
    assert "CANNExecutionProvider" in msg  # the allowed list is ORT's


def test_not_toml_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(P.ProfileError, match="not valid TOML"):
        P.load(write(tmp_path, "schema_version = = 1"))
    with pytest.raises(P.ProfileError, match="no profile named 'jetson-nan'; shipped profiles: atlas-200dk, cpu"):
        P.load("jetson-nan")
    with pytest.raises(P.ProfileError, match="does not exist"):
        P.load(tmp_path / "nope.toml")


# ------------------------------------------------------------------------------------- selection

def test_selection_against_the_providers_ort_really_reports(art):
    from splitedge.runtime_edge.ort_backend import EdgeModel, available_providers

    avail = available_providers()
    c = P.select_providers(P.load("jetson-nano"), avail, artifacts_dir=art)
    if TRT in avail or CUDA in avail:
        pytest.skip(f"this machine's ORT has GPU providers ({avail}); the CPU-only expectations do not apply")
    assert avail == [CPU]
    assert c.inference_providers == (CPU,) and c.training_device == "cpu"
    assert c.sentence == "forward: CPU (TensorRT, CUDA not available); training: CPU (CUDA not available)"
    assert c.engine_cache_dir is None
    # the session ORT builds with that choice really runs on it
    m = EdgeModel(art, device=c.training_device, inference_providers=list(c.inference_providers),
                  inference_provider_options=[dict(o) for o in c.inference_provider_options])
    assert m.inference_providers_in_use == [CPU]
    assert P.select_providers(P.load("cpu"), avail).sentence == "forward: CPU; training: CPU"
    assert P.select_providers(P.load("atlas-200dk"), avail).sentence == "forward: CPU (CANN not available); training: CPU"


SYNTHETIC = [
    ("jetson-nano", [TRT, CUDA, CPU], (TRT, CUDA, CPU), "cuda", "forward: TensorRT fp16; training: CUDA"),
    ("jetson-nano", [CPU, CUDA, TRT], (TRT, CUDA, CPU), "cuda", "forward: TensorRT fp16; training: CUDA"),
    ("jetson-nano", [TRT, CPU], (TRT, CPU), "cpu", "forward: TensorRT fp16; training: CPU (CUDA not available)"),
    ("jetson-nano", [CUDA, CPU], (CUDA, CPU), "cuda", "forward: CUDA (TensorRT not available); training: CUDA"),
    ("jetson-orin-nano", [CPU], (CPU,), "cpu",
     "forward: CPU (TensorRT, CUDA not available); training: CPU (CUDA not available)"),
    ("atlas-200dk", [CANN, CPU], (CANN, CPU), "cpu", "forward: CANN; training: CPU"),
    ("atlas-200dk", [TRT, CUDA, CANN, CPU], (CANN, CPU), "cpu", "forward: CANN; training: CPU"),
    ("cpu", [TRT, CUDA, CANN, CPU], (CPU,), "cpu", "forward: CPU; training: CPU"),
    ("raspberry-pi-4", ["XnnpackExecutionProvider", CPU], (CPU,), "cpu", "forward: CPU; training: CPU"),
]


@pytest.mark.parametrize("name,avail,providers,device,sentence", SYNTHETIC)
def test_selection_is_a_pure_function_of_profile_and_available(name, avail, providers, device, sentence, tmp_path):
    c = P.select_providers(P.load(name), avail, artifacts_dir=tmp_path / "art")
    assert c.inference_providers == providers
    assert c.training_device == device
    assert c.sentence == sentence
    assert len(c.inference_provider_options) == len(providers)
    opts = dict(zip(c.inference_providers, c.inference_provider_options))
    if TRT in opts:
        assert opts[TRT] == {"device_id": "0", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                             "trt_engine_cache_path": str(tmp_path / "art" / "trt-engines")}
        assert c.engine_cache_dir == str(tmp_path / "art" / "trt-engines")
    else:
        assert c.engine_cache_dir is None
    if CANN in opts:
        assert opts[CANN] == {"device_id": "0"}
    assert opts[CPU] == {}
    assert not (tmp_path / "art").exists()  # pure: creates nothing


def test_selection_options_follow_the_profile(tmp_path):
    text = (nano_text().replace("fp16 = true ", "fp16 = false ").replace("engine_cache = true", "engine_cache = false")
            .replace("device_id = 0", "device_id = 1"))
    p = P.load(write(tmp_path, text))
    c = P.select_providers(p, [TRT, CUDA, CPU])
    assert c.sentence == "forward: TensorRT; training: CUDA"
    assert c.training_device == "cuda:1"
    assert c.inference_provider_options[0] == {"device_id": "1", "trt_fp16_enable": "False",
                                               "trt_engine_cache_enable": "False"}
    assert c.inference_provider_options[1] == {"device_id": "1"}
    assert c.engine_cache_dir is None
    # an absolute engine cache directory stays where it is
    p2 = P.load(write(tmp_path, nano_text().replace('engine_cache_dir = "trt-engines"',
                                                    f'engine_cache_dir = "{tmp_path / "engines"}"'), "abs.toml"))
    assert P.select_providers(p2, [TRT, CPU], artifacts_dir="/elsewhere").engine_cache_dir == str(tmp_path / "engines")


def test_edge_settings_explicit_values_win_and_engine_cache_is_created(tmp_path):
    s = P.edge_settings("jetson-nano", [TRT, CUDA, CPU], threads=None, batch_size=None, artifacts_dir=tmp_path)
    assert (s.threads, s.batch_size, s.device) == (4, 16, "cuda")
    assert (tmp_path / "trt-engines").is_dir()
    s = P.edge_settings("jetson-nano", [CPU], threads=2, batch_size=64, artifacts_dir=tmp_path / "x")
    assert (s.threads, s.batch_size, s.device, s.inference_providers) == (2, 64, "cpu", [CPU])
    assert not (tmp_path / "x").exists()  # no TensorRT, no cache directory
    assert P.edge_settings("cpu", [CPU], threads=None, batch_size=None).threads is None  # 0: ORT's default


# ------------------------------------------------------------------------------------- CLIs

def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_splitedge_profiles_list_and_show(tmp_path):
    r = run(bin_path("splitedge"), "profiles", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == list(SHIPPED)
    assert "forward TensorRT>CUDA>CPU" in next(ln for ln in lines if ln.startswith("jetson-nano "))

    r = run(bin_path("splitedge"), "profiles", "show", "jetson-nano")
    assert r.returncode == 0, r.stderr
    assert 'name = "jetson-nano"' in r.stdout and "TensorrtExecutionProvider" in r.stdout

    r = run(bin_path("splitedge"), "profiles", "show", "atlas-200dk", "--json", "--here")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["name"] == "atlas-200dk" and d["cann"] == {"device_id": 0}
    assert d["here"]["sentence"].startswith("forward: ")

    bad = write(tmp_path, nano_text().replace("threads = 4", "threads = -1"))
    r = run(bin_path("splitedge"), "profiles", "show", str(bad))
    assert r.returncode == 2 and "runtime.threads" in r.stderr and "got -1" in r.stderr
    r = run(bin_path("splitedge"), "profiles", "show", "nope")
    assert r.returncode == 2 and "no profile named 'nope'" in r.stderr


def test_help_of_flash_board_and_edge_train():
    r = run(bin_path("flash-board"), "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--profile", "--artifacts", "--host", "--port", "--identity", "--remote-dir", "--dry-run",
                "--bundle-only", "--remote-python", "--install-deps"):
        assert opt in r.stdout
    r = run(bin_path("splitedge"), "flash", "--help")
    assert r.returncode == 0 and "--bundle-only" in r.stdout
    r = run(bin_path("edge-train"), "--help")
    assert r.returncode == 0 and "--profile" in r.stdout
    r = run(bin_path("edge-train"), "--artifacts", "x", "--profile", "jetson-nan")
    assert r.returncode == 2 and "no profile named 'jetson-nan'" in r.stderr


def test_profiles_package_is_light():
    code = ("import sys, splitedge.profiles, splitedge.profiles.cli, splitedge.profiles.flash_cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnxruntime', 'torch', 'numpy'}))")
    r = run(sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- edge-train --profile

def test_edge_client_applies_the_profile(art, caplog):
    """The prepare step (no socket yet) applies the profile: providers, threads, batch size."""
    from splitedge.runtime_edge.prepare import EdgeConfig, prepare

    port = launch.free_port()
    caplog.set_level(logging.INFO, logger="edge-train")
    cfg = EdgeConfig(artifacts=str(art), connect=f"tcp://127.0.0.1:{port}", data=SYNTH, profile="jetson-nano",
                     batch_size=None, threads=None)
    prep = prepare(cfg)
    assert prep.cfg.batch_size == 16 and prep.cfg.threads == 4 and prep.cfg.device == "cpu"
    assert prep.cfg.inference_providers == [CPU]
    assert prep.model._options.intra_op_num_threads == 4
    assert prep.model.inference_providers_in_use == [CPU]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("profile ")]
    assert said == ["profile jetson-nano: forward: CPU (TensorRT, CUDA not available); "
                    "training: CPU (CUDA not available)"]
    prep = prepare(EdgeConfig(artifacts=str(art), connect=f"tcp://127.0.0.1:{port}", data=SYNTH,
                              profile="jetson-nano", batch_size=8, threads=2))
    assert prep.cfg.batch_size == 8 and prep.cfg.threads == 2
    prep = prepare(EdgeConfig(artifacts=str(art), connect=f"tcp://127.0.0.1:{port}", data=SYNTH, batch_size=None))
    assert prep.cfg.batch_size == 32 and prep.provider_choice is None


def test_edge_train_with_a_profile_file_trains_with_its_batch_size(art, tmp_path):
    prof = write(tmp_path, (schema.PROFILE_DIR / "cpu.toml").read_text()
                 .replace('name = "cpu"', 'name = "tiny-board"').replace("batch_size = 32", "batch_size = 16")
                 .replace("threads = 0 ", "threads = 1 "), "tiny-board.toml")
    spec = launch.RunSpec(workdir=tmp_path / "run", artifacts=art, num_clients=1,
                          cloud_args=["--codec", "uq", "--bits", "8", "--threads", "1"],
                          edge_args=["--data", SYNTH, "--steps", "3", "--eval-samples", "32", "--profile", str(prof)],
                          timeout_s=120)
    result = launch.run(spec)
    s = result.summaries[0]
    assert s["batch_size"] == 16 and s["samples"] == 48 and s["steps"] == 3
    assert s["profile"] == str(prof) and s["providers"] == "forward: CPU; training: CPU"
    log = (tmp_path / "run" / "edge-0.log").read_text()
    assert log.count("profile tiny-board: forward: CPU; training: CPU") == 1
