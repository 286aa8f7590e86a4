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
