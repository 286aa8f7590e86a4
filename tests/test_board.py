"""flash-board against the emulated aarch64 board (scripts/emulated-board): a real arm64 Debian 12
root run by user-mode QEMU, with its own sshd on a loopback port.

The test starts the board itself (building the root first if no complete cached one exists,
minutes; .ci/run builds it beforehand) and stops it again if it was not already running. It
needs what the script needs: root, binfmt_misc, a reachable Debian mirror.
"""

from __future__ import annotations

import re
import subprocess
import uuid

import pytest

from helpers import REPO, bin_path

SCRIPT = REPO / "scripts" / "emulated-board"
ADDRESS = re.compile(r"ssh://root@127\.0\.0\.1:(\d+) identity=(\S+)")


@pytest.fixture(scope="module")
def emulated_board():
    was_running = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, timeout=60).returncode == 0
    r = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, f"scripts/emulated-board start failed:\n{r.stderr}"
    last = r.stdout.strip().splitlines()[-1]
    m = ADDRESS.fullmatch(last)
    assert m, f"the last line is not the board's address: {last!r}"
    yield int(m.group(1)), m.group(2)
    if not was_running:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True, timeout=300)


def _ssh(port: int, key: str, known_hosts, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-p", str(port), "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                           "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}",
                           "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.board
@pytest.mark.slow
def test_the_emulated_board_is_aarch64_and_flash_board_pairs_profiles_by_its_architecture(
        emulated_board, exported, tmp_path):
    port, key = emulated_board
    kh = tmp_path / "known_hosts"
    r = _ssh(port, key, kh, "uname -m; python3 -c 'import platform; print(platform.python_version())'")
    assert r.returncode == 0, r.stderr
    arch, python = r.stdout.split()
    assert arch == "aarch64"

    art = exported("resnet18", 3, input_shape=(1, 28, 28))
    remote = f"/root/splitedge-test-{uuid.uuid4().hex[:8]}"

    def flash(profile: str) -> subprocess.CompletedProcess:
        return subprocess.run([bin_path("flash-board"), "--profile", profile, "--artifacts", str(art), "--host",
                               "root@127.0.0.1", "--port", str(port), "--identity", key, "--known-hosts", str(kh),
                               "--remote-dir", remote, "--connect-timeout", "30", "--selftest-timeout", "600"],
                              capture_output=True, text=True, timeout=900)

    try:
        # an x86_64 profile to this aarch64 board: refused at the check, naming both, nothing created
        r = flash("cpu")
        assert r.returncode == 1, r.stdout + r.stderr
        assert (f"FAILED at check: profile cpu is for x86_64 boards but the board root@127.0.0.1 (port {port}) is "
                "aarch64 (uname -m); nothing was copied: choose a profile for aarch64 boards (atlas-200dk, "
                "jetson-nano, jetson-orin-nano, raspberry-pi-4)") in r.stdout, r.stdout
        assert "  copy " not in r.stdout
        assert _ssh(port, key, kh, f"test -e {remote}").returncode == 1  # the remote dir was never created

        # the board's own profile passes the check and is copied and unpacked there
        r = flash("raspberry-pi-4")
        out = r.stdout
        assert f"  check     ssh ok; Python {python} at /usr/bin/python3; aarch64;" in out, out + r.stderr
        assert "  copy " in out and f"  unpack    {remote}/releases/" in out, out + r.stderr
        r = _ssh(port, key, kh, f"cd {remote}/releases && ls")
        assert r.returncode == 0 and r.stdout.split(), r.stdout + r.stderr
    finally:
        _ssh(port, key, kh, f"rm -rf {remote}")


VENV = "/root/splitedge-board-venv"  # Debian 12 refuses pip installs into the system Python (PEP 668)
STEPS = 20


@pytest.mark.board
@pytest.mark.slow
@pytest.mark.dataset
def test_flash_install_self_test_and_train_20_sgq_steps_on_the_emulated_board(emulated_board, exported, tmp_path):
    """The whole path on aarch64: flash-board --install-deps with raspberry-pi-4's pinned stock wheels
    (plain onnxruntime, no torch), the self-test on the board, then the installed release trains 20 real
    Fashion-MNIST steps with SGQ against a cloud-serve on this machine, over tcp on loopback. The same
    run with this machine's edge gives the range the board's losses must fall in."""
    from helpers import REPO as repo
    from splitedge.lab import launch

    port, key = emulated_board
    kh = tmp_path / "known_hosts"
    art = exported("resnet18", 3, input_shape=(1, 28, 28))
    remote = f"/root/splitedge-train-{uuid.uuid4().hex[:8]}"
    r = _ssh(port, key, kh, f"test -x {VENV}/bin/python || python3 -m venv {VENV}")
    assert r.returncode == 0, r.stderr
    try:
        r = subprocess.run([bin_path("flash-board"), "--profile", "raspberry-pi-4", "--artifacts", str(art),
                            "--host", "root@127.0.0.1", "--port", str(port), "--identity", key, "--known-hosts", str(kh),
                            "--remote-dir", remote, "--remote-python", f"{VENV}/bin/python", "--install-deps",
                            "--connect-timeout", "30", "--selftest-timeout", "900"],
                           capture_output=True, text=True, timeout=2400)
        out = r.stdout
        assert r.returncode == 0, out + r.stderr
        assert "PASS: " in out and "  activate " in out, out
        # the board's environment holds neither torch nor ORT's training build, so no edge process there can
        # import them: the self-test and the training below ran the portable backend on plain onnxruntime
        r = _ssh(port, key, kh, f"uname -m; {VENV}/bin/python -m pip list --format=freeze --disable-pip-version-check")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split()
        assert lines[0] == "aarch64"
        names = {ln.split("==")[0].lower() for ln in lines[1:]}
        assert "onnxruntime" in names and "torch" not in names and not any("training" in n for n in names), names

        # Fashion-MNIST's training files go to the board (the edge reads them from disk there)
        data = "/usr/share/datasets/fashion-mnist"
        r = subprocess.run(["scp", "-P", str(port), "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                            "-o", f"UserKnownHostsFile={kh}", "-o", "LogLevel=ERROR",
                            f"{data}/train-images-idx3-ubyte.gz", f"{data}/train-labels-idx1-ubyte.gz",
                            f"{data}/t10k-images-idx3-ubyte.gz", f"{data}/t10k-labels-idx1-ubyte.gz",
                            f"root@127.0.0.1:{remote}/"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr

        common_cloud = ["--codec", "sgq", "--bits", "4", "--lr", "0.01", "--momentum", "0.9", "--threads", "1"]
        edge_args = ["--steps", str(STEPS), "--batch-size", "32", "--eval-samples", "64", "--threads", "1",
                     "--backend", "portable"]
        # the host's run of the same configuration: the range the board's losses must fall in
        host = launch.run(launch.RunSpec(workdir=tmp_path / "host", artifacts=art, num_clients=1,
                                         cloud_args=common_cloud, edge_args=["--data", "fashion-mnist", *edge_args],
                                         timeout_s=900))
        host_losses = [e["loss"] for e in host.metrics() if e.get("event") == "step"]
        assert len(host_losses) == STEPS

        # the board's run: cloud-serve here, the installed release's run.sh there (its profile and artifacts)
        ep_port = launch.free_port()
        metrics = tmp_path / "board-metrics.jsonl"
        cloud = launch.popen_logged(launch.script("cloud-serve") + [
            "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{ep_port}", "--metrics", str(metrics),
            "--expect-clients", "1", "--exit-when-done", *common_cloud], tmp_path / "cloud.log", cwd=repo)
        try:
            r = _ssh(port, key, kh,
                     f"cd {remote} && PYTHON={VENV}/bin/python ./current/run.sh train --connect tcp://127.0.0.1:{ep_port} "
                     f"--data idx:{remote} --no-progress --summary {remote}/summary.json " + " ".join(edge_args),
                     timeout=1800)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            assert cloud.wait(timeout=120) == 0, (tmp_path / "cloud.log").read_text()[-3000:]
        finally:
            if cloud.poll() is None:
                cloud.kill()
                cloud.wait()
        steps = [e for e in launch.read_jsonl(metrics) if e.get("event") == "step"]
        assert sorted(e["step"] for e in steps) == list(range(1, STEPS + 1)), steps
        assert {e["client"] for e in steps} == {0}
        board_losses = [e["loss"] for e in sorted(steps, key=lambda e: e["step"])]
        lo, hi = min(host_losses), max(host_losses)
        margin = 0.25 * (hi - lo)
        assert all(lo - margin <= v <= hi + margin for v in board_losses), (board_losses, host_losses)
        assert sum(board_losses[-5:]) < sum(board_losses[:5]), board_losses  # it learned there too
        print(f"board losses {[f'{v:.3f}' for v in board_losses]}; host {[f'{v:.3f}' for v in host_losses]}")
    finally:
        _ssh(port, key, kh, f"rm -rf {remote}")
