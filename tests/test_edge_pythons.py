"""The edge on the oldest and the newest runtimes it supports, installed as a user would.

Two fresh virtual environments hold only the edge's requirements (``pip install
'splitedge[edge]'`` from a wheel of this checkout):

* CPython 3.8 with onnxruntime 1.11.1, the release JetPack 4.6's ONNX Runtime is built from;
* CPython 3.13 with the newest onnxruntime the package registry has.

Each trains 20 real Fashion-MNIST steps with the portable backend against a ``cloud-serve`` of
this environment with SGQ 4-bit in both directions, and its loss trajectory is compared with the
same run's from this environment's edge. Neither environment may hold torch or onnxruntime-training.

Other Pythons are found through ``SPLITEDGE_PYTHON_3_8`` / ``SPLITEDGE_PYTHON_3_13``, then
``python3.8`` / ``python3.13`` on PATH, then pyenv's versions folder. ``.ci/run`` finds or
installs them and sets ``SPLITEDGE_REQUIRE_PYTHONS=1``, under which a missing one fails the test
instead of skipping it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from splitedge.lab import launch

pytestmark = [pytest.mark.slow, pytest.mark.dataset]

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH = 20, 32
#: runtimes under test: Python version -> the onnxruntime requirement installed beside the edge
RUNTIMES = {"3.8": "onnxruntime==1.11.1", "3.13": "onnxruntime"}
#: How close the trajectories must be. Two ONNX Runtime releases round convolutions differently
#: (~1.6e-7 of the activation, measured between 1.19.2 and 1.32.0); SGQ's 4-bit codes then flip on
#: such differences (its encode is deterministic: the same activation gives the same bytes under numpy
#: 1.24, 2.4 and 2.5), and from then on the two runs are two samples of the same training. Measured:
#: CPython 3.8 + onnxruntime 1.11.1 agreed to 6 digits for 9 steps; CPython 3.13 + onnxruntime 1.32.0
#: parted at step 2. So: step 1 (same weights, same batch) agrees closely, the whole run's mean loss
#: agrees within MEAN_RTOL, and the loss falls.
FIRST_STEPS, FIRST_RTOL, MEAN_RTOL = 1, 1e-4, 0.05
FORBIDDEN = ("torch", "onnxruntime-training", "onnxruntime-training-cpu")


def _is_python(cand: str, version: str) -> bool:
    try:
        out = subprocess.run([cand, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def find_python(version: str) -> str | None:
    """The first candidate that runs and is CPython ``version`` (pyenv's shims exist but may refuse)."""
    cands = [os.environ.get(f"SPLITEDGE_PYTHON_{version.replace('.', '_')}"), shutil.which(f"python{version}")]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    cands += sorted(glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*", "bin", "python")), reverse=True)
    return next((c for c in cands if c and _is_python(c, version)), None)


@pytest.fixture(scope="session")
def edge_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = out.glob("splitedge-*.whl")
    return wheel


@pytest.fixture(scope="session")
def fashion_artifacts(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28))


def make_edge_venv(python: str, runtime: str, wheel: Path, where: Path) -> Path:
    subprocess.run([python, "-m", "venv", str(where)], check=True, timeout=300)
    pip = [str(where / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    res = subprocess.run(pip + [f"splitedge[edge] @ {wheel.as_uri()}", runtime], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return where


def installed(venv: Path) -> dict[str, str]:
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json",
                          "--disable-pip-version-check"], capture_output=True, text=True, timeout=120, check=True)
    return {d["name"].lower(): d["version"] for d in json.loads(res.stdout)}


def train(tmp: Path, artifacts: Path, edge_command: list[str] | None, env: dict[str, str]) -> list[float]:
    spec = launch.RunSpec(
        workdir=tmp, artifacts=artifacts, num_clients=1,
        cloud_args=["--codec", "sgq", "--bits", "4", "--lr", "0.01", "--momentum", "0.9", "--threads", "1",
                    "--seed", "0"],
        edge_args=["--backend", "portable", "--data", "fashion-mnist", "--steps", str(STEPS),
                   "--batch-size", str(BATCH), "--eval-samples", "64", "--threads", "1", "--seed", "0"],
        env=env, timeout_s=900, edge_command=edge_command,
    )
    res = launch.run(spec)
    steps = sorted((e["step"], e["loss"]) for e in res.metrics() if e.get("event") == "step")
    assert [s for s, _ in steps] == list(range(1, STEPS + 1)), steps
    return [loss for _, loss in steps]


@pytest.fixture(scope="session")
def host_losses(tmp_path_factory, fashion_artifacts):
    return train(tmp_path_factory.mktemp("host-edge"), fashion_artifacts, None, {})


@pytest.mark.parametrize("version", sorted(RUNTIMES, key=lambda v: tuple(map(int, v.split(".")))))
def test_edge_trains_on_an_old_and_a_new_python_and_onnxruntime(version, edge_wheel, fashion_artifacts,
                                                                 host_losses, tmp_path):
    python = find_python(version)
    if python is None:
        msg = (f"no CPython {version} found (set SPLITEDGE_PYTHON_{version.replace('.', '_')}, or put "
               f"python{version} on PATH; .ci/run installs it)")
        if os.environ.get("SPLITEDGE_REQUIRE_PYTHONS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    venv = make_edge_venv(python, RUNTIMES[version], edge_wheel, tmp_path / "venv")
    have = installed(venv)
    assert not set(FORBIDDEN) & set(have), have
    assert "onnxruntime" in have and {"numpy", "pyzmq", "click"} <= set(have), have
    if RUNTIMES[version].startswith("onnxruntime=="):
        assert have["onnxruntime"] == RUNTIMES[version].split("==")[1]
    ver = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert ver == version

    # the edge process itself imports neither torch nor the training build
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sys, splitedge.runtime_edge.cli, splitedge.runtime_edge.portable_backend; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch',) or m.startswith('onnxruntime.training')))"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)  # not the checkout: its splitedge/ would shadow
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr

    losses = train(tmp_path / "run", fashion_artifacts, [str(venv / "bin" / "edge-train")],
                   {"VIRTUAL_ENV": str(venv)})
    first = max(abs(a - b) / abs(b) for a, b in zip(losses[:FIRST_STEPS], host_losses[:FIRST_STEPS]))
    mean, host_mean = sum(losses) / STEPS, sum(host_losses) / STEPS
    print(f"CPython {version} + onnxruntime {have['onnxruntime']}: losses {[f'{v:.4f}' for v in losses]}; "
          f"host {[f'{v:.4f}' for v in host_losses]}; first {FIRST_STEPS} steps within {first:.1e}; "
          f"mean {mean:.4f} against {host_mean:.4f}")
    assert first <= FIRST_RTOL, (losses, host_losses)
    assert abs(mean - host_mean) <= MEAN_RTOL * host_mean, (losses, host_losses)
    # it trained: the loss fell over the 20 steps, as on the host
    assert sum(losses[-5:]) < sum(losses[:5])
