"""flash-board against a real OpenSSH server on 127.0.0.1, and the edge bundle itself.

The sshd runs as a child process of the tests, as the current user, on a free port of
127.0.0.1, with a throwaway host key and authorized_keys in a temporary directory
(``scripts/setup --dev`` installs openssh-server; the tests skip, saying so, only when
sshd is absent). The "board" is this machine: the remote Python is the test's own
interpreter, which has the bundle's requirements installed.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from splitedge.lab import launch
from splitedge.profiles import flash as F
from splitedge.profiles import schema

from helpers import bin_path

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
needs_sshd = pytest.mark.skipif(
    SSHD is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
    reason="needs OpenSSH's sshd, ssh and ssh-keygen (scripts/setup --dev installs openssh-server)",
)


@pytest.fixture(scope="module")
def art(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28))


class Board:
    def __init__(self, root: Path, port: int, key: Path, wrong_key: Path, log: Path):
        self.root, self.port, self.key, self.wrong_key, self.log = root, port, key, wrong_key, log
        self.user = getpass.getuser()
        self.host = f"{self.user}@127.0.0.1"

    def flash(self, *args: str, key: Path | None = None, remote: Path | None = None,
              known_hosts: Path | None = None) -> subprocess.CompletedProcess:
        cmd = [bin_path("flash-board"), "--host", self.host, "--port", str(self.port),
               "--identity", str(key or self.key), "--known-hosts", str(known_hosts or self.root / "known_hosts"),
               "--remote-python", sys.executable, "--connect-timeout", "5", *args]
        if remote is not None:
            cmd += ["--remote-dir", str(remote)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "splitedge-test", "-f", str(path)],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    if SSHD is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs OpenSSH's sshd, ssh and ssh-keygen (scripts/setup --dev installs openssh-server)")
    root = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key", "wrong_key"):
        _keygen(root / name)
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    port = launch.free_port()
    sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                             "/usr/lib/ssh/sftp-server") if os.path.exists(p)), None)
    (root / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}", f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", "StrictModes no", "UsePAM no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", f"AllowUsers {getpass.getuser()}",
        *([f"Subsystem sftp {sftp}"] if sftp else []), "",
    ]))
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory, as root
    log = root / "sshd.log"
    proc = launch.popen_logged([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], log)
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"sshd did not listen on port {port}:\n{log.read_text()}")
            time.sleep(0.1)
    yield Board(root, port, root / "user_key", root / "wrong_key", log)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def flashed(board, art, tmp_path_factory):
    """One successful flash of the cpu profile, shared by the tests that need a good release."""
    remote = tmp_path_factory.mktemp("remote") / "splitedge"
    r = board.flash("--profile", "cpu", "--artifacts", str(art), remote=remote)
    return r, remote


def _release(remote: Path) -> Path:
    return remote / os.readlink(remote / "current")


# ------------------------------------------------------------------------------------- over ssh

@needs_sshd
def test_flash_cpu_profile_self_test_passes_and_current_points_at_it(flashed):
    r, remote = flashed
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "FAILED" not in out
    assert "PASS: forward-only graph on CPU, training on CPU; forward: CPU; training: CPU" in out
    assert "CPUExecutionProvider" in out and "selected: forward: CPU; training: CPU" in out
    assert "bundle: " in out and "files match BUNDLE.json" in out
    link = os.readlink(remote / "current")
    assert link.startswith("releases/")
    rel = remote / link
    good = json.loads((rel / "GOOD").read_text())
    assert good["bundle"] == rel.name and good["profile"] == "cpu"
    assert good["selftest"]["selection"]["forward"] == "CPUExecutionProvider"
    assert (rel / "run.sh").stat().st_mode & 0o111
    assert not list(remote.glob(".incoming-*")) and not list((remote / "releases").glob("*.partial-*"))
    for step in ("bundle", "check", "copy", "unpack", "deps", "selftest", "activate"):
        assert f"  {step} " in out, step
    assert "must already have the bundle's requirements.txt" in out  # --install-deps was not given


@needs_sshd
def test_flashing_the_same_bundle_again_reuses_the_release(board, art, flashed):
    r0, remote = flashed
    assert r0.returncode == 0, r0.stdout + r0.stderr
    before = _release(remote)
    r = board.flash("--profile", "cpu", "--artifacts", str(art), "--copy", "scp", remote=remote)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "already installed and GOOD: reused" in r.stdout and "scp:" in r.stdout
    assert _release(remote) == before


@needs_sshd
def test_a_failing_self_test_leaves_current_on_the_previous_good_release(board, art, flashed, tmp_path):
    r0, remote = flashed
    assert r0.returncode == 0, r0.stdout + r0.stderr
    good = _release(remote)
    # a profile whose self-test must fail: no process fits a 1 MB memory budget
    tiny = tmp_path / "tiny.toml"
    tiny.write_text((schema.PROFILE_DIR / "cpu.toml").read_text().replace('name = "cpu"', 'name = "cpu-tiny"')
                    .replace("memory_budget_mb = 4096", "memory_budget_mb = 1"))
    r = board.flash("--profile", str(tiny), "--artifacts", str(art), remote=remote)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED at selftest: self-test failed on the board: peak memory" in r.stdout
    assert "above profile cpu-tiny's budget of 1 MB" in r.stdout
    assert f"the board's current release is unchanged: releases/{good.name}" in r.stdout
    assert _release(remote) == good and (good / "GOOD").is_file()
    failed = list((remote / "releases").glob("*.failed"))
    assert len(failed) == 1 and not (failed[0] / "GOOD").exists()
    assert "self-test failed" in (failed[0] / "FAILED").read_text()
    assert not [p for p in (remote / "releases").iterdir() if p.name not in (good.name, failed[0].name)]


@needs_sshd
def test_a_wrong_key_fails_with_a_clear_message_and_installs_nothing(board, art, tmp_path):
    remote = tmp_path / "remote"
    r = board.flash("--profile", "cpu", "--artifacts", str(art), key=board.wrong_key, remote=remote)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"FAILED at check: authentication refused for {board.host} with key {board.wrong_key}"
            in r.stdout), r.stdout
    assert not remote.exists()  # nothing was created, so no current and no GOOD anywhere


@needs_sshd
def test_dry_run_prints_the_plan_and_touches_nothing(board, art, tmp_path):
    remote = tmp_path / "remote"
    kh = tmp_path / "kh"
    r = board.flash("--profile", "jetson-nano", "--artifacts", str(art), "--dry-run", "--install-deps",
                    remote=remote, known_hosts=kh)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "[dry run: nothing is run]" in out and "nothing was copied, installed or run" in out
    assert out.count("$ ssh -p") >= 6 and "$ scp " in out and "'sh -s' <<'EOF'" in out
    assert "BatchMode=yes" in out and "StrictHostKeyChecking=accept-new" in out and "IdentitiesOnly=yes" in out
    assert "-m pip install --disable-pip-version-check -r requirements.txt" in out
    assert "./run.sh selftest" in out and "os.replace(link, \"current\")" in out
    assert not remote.exists() and not kh.exists()  # ssh never ran: no known_hosts entry either
    assert not list(Path(tmp_path).glob("*.tar.gz"))


@needs_sshd
def test_unreachable_board_and_missing_python_are_said_plainly(board, art, tmp_path):
    free = launch.free_port()
    r = subprocess.run([bin_path("flash-board"), "--profile", "cpu", "--artifacts", str(art), "--host",
                        board.host, "--port", str(free), "--identity", str(board.key), "--known-hosts",
                        str(tmp_path / "kh"), "--remote-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"FAILED at check: host unreachable: {board.host} (port {free}) refused the connection" in r.stdout
    r = board.flash("--profile", "cpu", "--artifacts", str(art), "--remote-python", "/nonexistent/python3",
                    remote=tmp_path / "r")
    assert r.returncode == 1
    assert "FAILED at check: no Python 3 on the board at '/nonexistent/python3'" in r.stdout
    assert not (tmp_path / "r").exists()  # the probe is read-only: nothing was created on the board


@needs_sshd
def test_a_profile_for_another_architecture_is_refused_before_anything_is_copied(board, art, tmp_path):
    """This board is x86_64 (the test machine): an aarch64 profile stops at the check, naming both."""
    host_arch = os.uname().machine
    if host_arch != "x86_64":
        pytest.skip(f"the test machine is {host_arch}; this case needs an x86_64 board")
    remote = tmp_path / "r"
    r = board.flash("--profile", "raspberry-pi-4", "--artifacts", str(art), remote=remote)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"FAILED at check: profile raspberry-pi-4 is for aarch64 boards but the board {board.host} "
            f"(port {board.port}) is x86_64 (uname -m); nothing was copied: choose a profile for x86_64 boards "
            f"(cpu)") in r.stdout, r.stdout
    for step in ("copy", "unpack", "selftest"):
        assert f"  {step} " not in r.stdout, step
    assert not remote.exists()


@needs_sshd
def test_a_board_python_older_than_the_profile_needs_is_refused_before_anything_is_copied(board, art, tmp_path):
    """The board's real Python (this interpreter) against a profile that asks for a newer one."""
    future = tmp_path / "cpu-future.toml"
    future.write_text((schema.PROFILE_DIR / "cpu.toml").read_text().replace('name = "cpu"', 'name = "cpu-future"')
                      .replace('python = "3.11"', 'python = "3.99"'))
    remote = tmp_path / "r"
    r = board.flash("--profile", str(future), "--artifacts", str(art), remote=remote)
    assert r.returncode == 1, r.stdout + r.stderr
    have = "{}.{}.{}".format(*sys.version_info[:3])
    assert (f"FAILED at check: profile cpu-future needs Python >= 3.99 but the board {board.host} (port {board.port})"
            f" has Python {have} ({sys.executable}); nothing was copied") in r.stdout, r.stdout
    assert "  copy " not in r.stdout and not remote.exists()


def test_pairing_check_names_the_profile_and_the_board_both_ways():
    from splitedge.profiles import load

    nano, cpu = load("jetson-nano"), load("cpu")
    ok = {"arch": "aarch64", "python": "3.11.2", "python_path": "/usr/bin/python3"}
    assert F.check_pairing(nano, ok, board="root@pi (port 22)", remote_python="python3") is None
    # an x86_64 profile to an aarch64 board
    msg = F.check_pairing(cpu, ok, board="root@pi (port 22)", remote_python="python3")
    assert msg.startswith("profile cpu is for x86_64 boards but the board root@pi (port 22) is aarch64 (uname -m); "
                          "nothing was copied: choose a profile for aarch64 boards (")
    assert "jetson-nano" in msg and "raspberry-pi-4" in msg and "cpu," not in msg
    # an aarch64 profile to an x86_64 board
    msg = F.check_pairing(nano, {**ok, "arch": "x86_64"}, board="b (port 2)", remote_python="python3")
    assert msg == ("profile jetson-nano is for aarch64 boards but the board b (port 2) is x86_64 (uname -m); "
                   "nothing was copied: choose a profile for x86_64 boards (cpu)")
    msg = F.check_pairing(nano, {**ok, "arch": "armv7l"}, board="b (port 2)", remote_python="python3")
    assert "the board b (port 2) is armv7l" in msg and "profiles for x86_64 and aarch64 boards only" in msg
    # JetPack 4.6's own Python
    msg = F.check_pairing(nano, {**ok, "python": "3.6.9"}, board="nano (port 22)", remote_python="python3")
    assert msg.startswith(f"profile jetson-nano needs Python >= {nano.board.python} but the board nano (port 22) "
                          "has Python 3.6.9 (/usr/bin/python3); nothing was copied")
    assert msg.endswith(f"--remote-python /path/to/python{nano.board.python}")
    assert F.check_pairing(nano, {**ok, "python": "missing"}, board="n", remote_python="py").startswith(
        "no Python 3 on the board at 'py' (n); profile jetson-nano needs Python >= ")
    assert "does not run as a Python interpreter" in F.check_pairing(nano, {**ok, "python": "broken"}, board="n",
                                                                     remote_python="py")


# ------------------------------------------------------------------------------------- arguments

def test_bad_arguments_exit_2(art, tmp_path):
    def fb(*args):
        return subprocess.run([bin_path("flash-board"), *args], capture_output=True, text=True, timeout=60)

    r = fb("--profile", "cpu", "--artifacts", str(art))
    assert r.returncode == 2 and "give --host" in r.stderr
    r = fb("--profile", "cpu", "--artifacts", str(art), "--host", "-oProxyCommand=touch /tmp/x")
    assert r.returncode == 2 and "is not USER@HOST" in r.stderr
    r = fb("--profile", "cpu", "--artifacts", str(art), "--host", "pi@rpi4.local:2222")
    assert r.returncode == 2 and "--port 2222" in r.stderr
    r = fb("--profile", "cpu", "--artifacts", str(art), "--host", "u@h", "--identity", str(tmp_path / "nokey"))
    assert r.returncode == 2 and "--identity" in r.stderr
    r = fb("--profile", "cpu", "--artifacts", str(tmp_path / "none"), "--host", "u@h", "--dry-run")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = fb("--profile", "cpu", "--artifacts", str(art), "--host", "u@h", "--remote-dir", "../up")
    assert r.returncode == 2 and "--remote-dir" in r.stderr
    r = fb("--profile", "nope", "--artifacts", str(art), "--host", "u@h")
    assert r.returncode == 2 and "no profile named 'nope'" in r.stderr


def test_ssh_failures_in_plain_words():
    t = F.Target(host="pi@board", port=2222, identity="/k/id", known_hosts="/k/kh", connect_timeout=7)
    cases = {
        "pi@board: Permission denied (publickey).": "authentication refused for pi@board with key /k/id",
        "ssh: connect to host board port 2222: Connection refused": "host unreachable: pi@board (port 2222) refused",
        "ssh: connect to host board port 2222: Connection timed out": "did not answer within 7 s",
        "ssh: connect to host board port 2222: No route to host": "host unreachable: no route to pi@board",
        "ssh: Could not resolve hostname board: Name or service not known": "cannot resolve the name 'board'",
        "Host key verification failed.": "does not match the one in /k/kh",
        "WARNING: UNPROTECTED PRIVATE KEY FILE!\nPermission denied": "chmod 600 /k/id",
        "something else entirely": "ssh to pi@board (port 2222) failed (exit 255): something else entirely",
    }
    for stderr, expect in cases.items():
        assert expect in F.explain_ssh_failure(255, stderr, t), stderr
    assert "ssh's default keys" in F.explain_ssh_failure(255, "Permission denied", F.Target(host="b"))


# ------------------------------------------------------------------------------------- the bundle

def test_bundle_only_replaces_a_bundle_but_never_another_file(art, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    cmd = [bin_path("flash-board"), "--profile", "cpu", "--artifacts", str(art), "--bundle-only"]
    r = subprocess.run([*cmd, str(notes)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is not a splitedge bundle; refusing to overwrite it" in r.stderr, r.stderr
    assert notes.read_text() == "the user's notes"
    bundle = tmp_path / "b.tar.gz"
    for _ in range(2):  # a second build replaces the first bundle
        r = subprocess.run([*cmd, str(bundle)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    from splitedge.profiles import bundle as B

    assert B.is_bundle(bundle) and not B.is_bundle(notes) and not B.is_bundle(tmp_path / "missing.tar.gz")


def test_bundle_only_is_deterministic_self_contained_and_self_tests(art, tmp_path):
    paths = [tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"]
    for p in paths:
        r = subprocess.run([bin_path("flash-board"), "--profile", "cpu", "--artifacts", str(art), "--bundle-only",
                            str(p)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    a, b = (p.read_bytes() for p in paths)
    assert a == b
    bundle_id = hashlib.sha256(a).hexdigest()[:16]
    assert f"bundle {bundle_id}" in r.stdout

    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert {m.mtime for m in members} == {1704067200} and {m.uid for m in members} == {0}
        tar.extractall(tmp_path / "x", filter="data")
    x = tmp_path / "x"
    meta = json.loads((x / "BUNDLE.json").read_text())
    assert set(meta["files"]) == set(names) - {"BUNDLE.json"}
    assert meta["profile"] == "cpu" and meta["artifacts"]["left_out"] == ["server/model.safetensors"]
    for must in ("run.sh", "profile.toml", "requirements.txt", "artifacts/manifest.json",
                 "artifacts/client/training_model.onnx", "artifacts/client/checkpoint",
                 "splitedge_edge/splitedge/runtime_edge/ort_backend.py", "splitedge_edge/splitedge/codecs/sgq.py",
                 "splitedge_edge/splitedge/export/manifest.py", "splitedge_edge/splitedge/profiles/selftest.py",
                 "splitedge_edge/splitedge/profiles/cpu.toml"):
        assert must in names, must
    for never in ("onnx_export.py", "zoo.py", "runtime_cloud", "flash.py", "bundle.py", "bench.py",
                  "model.safetensors", "__pycache__"):
        assert not any(never in n for n in names), never
    req = (x / "requirements.txt").read_text()
    assert "\nonnxruntime==1.19.2\n" in req and "\nnumpy==" in req
    # the cpu profile's bundle lists neither torch nor the training build (the portable backend needs neither)
    reqs = [ln for ln in req.splitlines() if ln.strip() and not ln.startswith("#")]
    assert not any("torch" in r or "onnxruntime-training" in r for r in reqs), reqs
    assert "\npyzmq==" in req and "\nclick==" in req

    # the bundle runs on its own: self-test from the unpacked tree, with this Python
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(x / "run.sh"), "selftest"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("SELFTEST_JSON "))
    assert res["ok"] and res["selection"]["sentence"] == "forward: CPU; training: CPU"
    assert res["forward_providers_in_use"] == ["CPUExecutionProvider"] and res["payload"]["codec"] == "uq"

    # damage one artifact: the self-test names it and fails
    ckpt = x / "artifacts" / "client" / "checkpoint"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    r = subprocess.run([str(x / "run.sh"), "selftest"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    assert "FAIL at bundle: the bundle is damaged: artifacts/client/checkpoint does not match its sha256" in r.stdout


def test_aarch64_bundles_pin_the_stock_onnxruntime_wheel(art, tmp_path):
    """No source build: the bundle's requirements.txt pins plain onnxruntime from PyPI for the board."""
    for name, version in (("jetson-nano", "1.27.0"), ("raspberry-pi-4", "1.27.0")):
        r = subprocess.run([bin_path("flash-board"), "--profile", name, "--artifacts", str(art),
                            "--bundle-only", str(tmp_path / f"{name}.tar.gz")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        with tarfile.open(tmp_path / f"{name}.tar.gz") as tar:
            req = tar.extractfile("requirements.txt").read().decode()
        pins = [ln for ln in req.splitlines() if ln and not ln.startswith("#")]
        assert f"onnxruntime=={version}" in pins and "NOT installable" not in req and "build.sh" not in req
        assert not any(p.startswith(("onnxruntime-training", "torch")) for p in pins), pins
        assert "# Python >= 3.11 on aarch64" in req


def test_jetson_bundle_self_test_shows_the_cpu_fallback_here(art, tmp_path):
    """No TensorRT, no CUDA on this machine: the jetson-nano bundle runs, on the CPU, and says so."""
    subprocess.run([bin_path("flash-board"), "--profile", "jetson-nano", "--artifacts", str(art), "--bundle-only",
                    str(tmp_path / "j.tar.gz")], check=True, capture_output=True, timeout=60)
    with tarfile.open(tmp_path / "j.tar.gz") as tar:
        tar.extractall(tmp_path / "j", filter="data")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(tmp_path / "j" / "run.sh"), "selftest"], capture_output=True, text=True, env=env,
                       timeout=300)
    import onnxruntime as ort

    if {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("this machine's ORT has GPU providers")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "selected: forward: CPU (TensorRT, CUDA not available); training: CPU (CUDA not available)" in out
    assert "warning: this machine is x86_64, profile jetson-nano is for aarch64" in out
    assert "tensorrt Python package" in out and "PASS: forward-only graph on CPU, training on CPU" in out
    assert not (tmp_path / "j" / "artifacts" / "trt-engines").exists()  # TensorRT not used: no engine cache


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_tensorrt_path_options_cache_and_fallback_when_the_provider_fails(art, tmp_path, monkeypatch):
    """ORT reports TensorRT (simulated) but cannot run it here: the engine cache is prepared in the
    artifact directory, ORT falls back to the CPU, and the self-test says so instead of hiding it."""
    from splitedge.profiles import selftest
    from splitedge.runtime_edge import portable_backend  # jetson-nano's backend: plain onnxruntime

    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    monkeypatch.setattr(portable_backend, "available_providers",
                        lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    # in this process the memory budget would count pytest's own peak: a profile without a real budget
    prof = tmp_path / "nano.toml"
    prof.write_text((schema.PROFILE_DIR / "jetson-nano.toml").read_text()
                    .replace("memory_budget_mb = 2500", "memory_budget_mb = 1000000"))
    said: list[str] = []
    res = selftest.run(bundle=None, profile_ref=str(prof), artifacts=copy, say=said.append)
    assert res["ok"], res
    sel = res["selection"]
    assert sel["sentence"] == "forward: TensorRT fp16; training: CPU (CUDA not available)"
    assert sel["forward_providers"] == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert sel["forward_provider_options"][0] == {
        "device_id": "0", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(copy / "trt-engines")}
    assert (copy / "trt-engines").is_dir()
    assert res["forward_providers_in_use"] == ["CPUExecutionProvider"]
    assert any("asked ONNX Runtime for TensorRT for the forward-only graph, it runs on CPU" in s for s in said)
    assert res["summary"].startswith("forward-only graph on CPU")


@needs_sshd
def test_the_installed_release_trains_against_a_cloud(board, art, flashed, tmp_path):
    """What the report's last line says to run: current/run.sh train over ssh, against a real cloud-serve."""
    r0, remote = flashed
    assert r0.returncode == 0, r0.stdout + r0.stderr
    port = launch.free_port()
    cloud_log = tmp_path / "cloud.log"
    cloud = launch.popen_logged(launch.script("cloud-serve") + [
        "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{port}", "--expect-clients", "1", "--exit-when-done",
        "--codec", "uq", "--bits", "8", "--threads", "1"], cloud_log)
    try:
        summary = tmp_path / "edge.json"
        cmd = (f"PYTHON={sys.executable} {remote}/current/run.sh train --connect tcp://127.0.0.1:{port} "
               f"--data synthetic:n=256,classes=10,shape=1x28x28,seed=0 --steps 2 --batch-size 8 --eval-samples 16 "
               f"--no-progress --summary {summary}")
        r = subprocess.run(["ssh", "-p", str(board.port), "-i", str(board.key), "-o", "BatchMode=yes",
                            "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={board.root / 'known_hosts'}",
                            board.host, cmd], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr + cloud_log.read_text()
        s = json.loads(summary.read_text())
        assert s["steps"] == 2 and s["batch_size"] == 8 and s["providers"] == "forward: CPU; training: CPU"
        assert s["profile"].endswith("/profile.toml")
        assert cloud.wait(timeout=60) == 0
    finally:
        if cloud.poll() is None:
            cloud.kill()
            cloud.wait()
