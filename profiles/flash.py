"""flash-board's engine: bundle, check the board, copy, unpack, self-test, switch ``current``.

Steps, in order (each prints one line; a failure stops the flash and says why in plain words)::

    bundle    build the edge bundle locally (splitedge.profiles.bundle), deterministic
    check     ssh: connect (BatchMode, never prompts), probe the board read-only: its architecture
              (uname -m) and Python version, free disk space, rsync present?; a profile for
              another architecture, or a board Python older than the profile needs, stops here,
              before anything is created or copied on the board
    copy      rsync over ssh if both ends have it, else scp, into <remote-dir>/.incoming-<flash-id>/
    unpack    into <remote-dir>/releases/<bundle-id>/ (a release already installed and GOOD is reused)
    deps      only with --install-deps: <python> -m pip install -r requirements.txt on the board
    selftest  <remote-dir>/releases/<bundle-id>/run.sh selftest with --remote-python
    activate  only after a passing self-test: write GOOD in the release, switch the <remote-dir>/current
              symlink to it atomically (rename over the old link), prune old releases (--keep)

On a failed self-test ``current`` is left where it was, and the new release is renamed
``releases/<bundle-id>.failed`` with a ``FAILED`` file holding the self-test's output: nothing
half-installed is ever marked good. Relative remote paths are relative to the remote
user's home directory. ``--dry-run`` prints every command (and every remote script) and runs
none of them; the bundle is then only hashed in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bundle as B
from .schema import ARCHES, Profile
from .selftest import JSON_PREFIX


class FlashError(Exception):
    def __init__(self, step: str, message: str):
        self.step = step
        super().__init__(message)


@dataclass(frozen=True)
class Target:
    """Where to flash, and how to reach it with OpenSSH."""

    host: str  # USER@HOST or HOST
    port: int = 22
    identity: str | None = None
    known_hosts: str | None = None
    connect_timeout: int = 10
    ssh_options: tuple[str, ...] = ()

    @property
    def hostname(self) -> str:
        return self.host.rpartition("@")[2]

    def _options(self) -> list[str]:
        o = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
             "-o", f"ConnectTimeout={self.connect_timeout}", "-o", "ServerAliveInterval=15",
             "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR"]
        if self.identity:
            o += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            o += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        for opt in self.ssh_options:
            o += ["-o", opt]
        return o

    def ssh(self) -> list[str]:
        """``ssh ... HOST sh -s``: the remote script comes on stdin (no quoting through the login shell)."""
        return ["ssh", "-p", str(self.port), *self._options(), self.host, "sh -s"]

    def scp(self, local: str, remote: str) -> list[str]:
        return ["scp", "-q", "-P", str(self.port), *self._options(), local, f"{self.host}:{remote}"]

    def rsync(self, local: str, remote: str) -> list[str]:
        rsh = shlex.join(["ssh", "-p", str(self.port), *self._options()])
        return ["rsync", "-a", "--partial", "-e", rsh, local, f"{self.host}:{remote}"]


@dataclass(frozen=True)
class FlashRequest:
    profile: Profile
    artifacts: Path
    target: Target
    remote_dir: str = "splitedge"
    remote_python: str = "python3"
    install_deps: bool = False
    copy: str = "auto"  # auto | scp | rsync
    keep: int = 3
    selftest_timeout_s: float = 900.0
    selftest_args: tuple[str, ...] = ()


@dataclass
class FlashResult:
    ok: bool = False
    failed_step: str | None = None
    error: str | None = None
    bundle_id: str | None = None
    release: str | None = None  # remote path of the release
    previous: str | None = None  # what current pointed to before
    current: str | None = None  # what current points to after
    selftest: dict[str, Any] | None = None
    facts: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------ ssh failures, in words

def explain_ssh_failure(rc: int, stderr: str, target: Target) -> str:
    s = stderr
    where = f"{target.host} (port {target.port})"
    last = next((ln.strip() for ln in reversed(s.strip().splitlines()) if ln.strip()), "no message")
    if "UNPROTECTED PRIVATE KEY FILE" in s or "bad permissions" in s:
        return (f"the key {target.identity} is readable by others, so ssh refuses to use it: chmod 600 "
                f"{target.identity}")
    if re.search(r"Load key .*: (invalid format|error in libcrypto)", s):
        return f"the key {target.identity} is not a private key ssh can read ({last})"
    if "Permission denied" in s or "Too many authentication failures" in s:
        key = f"key {target.identity}" if target.identity else "ssh's default keys (no --identity given)"
        return (f"authentication refused for {target.host} with {key}: the board does not accept it "
                f"(is the public key in the board's ~/.ssh/authorized_keys?)")
    if "Host key verification failed" in s or "REMOTE HOST IDENTIFICATION HAS CHANGED" in s:
        kh = target.known_hosts or "~/.ssh/known_hosts"
        return (f"the host key of {target.hostname} does not match the one in {kh} (board reinstalled? then "
                f"remove the old key with: ssh-keygen -f {kh} -R '[{target.hostname}]:{target.port}' "
                f"or -R {target.hostname})")
    if "Could not resolve hostname" in s:
        return f"host unreachable: cannot resolve the name {target.hostname!r}"
    if "Connection refused" in s:
        return f"host unreachable: {where} refused the connection (is sshd running on the board, on that port?)"
    if "No route to host" in s or "Network is unreachable" in s:
        return f"host unreachable: no route to {where} ({last})"
    if "timed out" in s or "Operation timed out" in s:
        return f"host unreachable: {where} did not answer within {target.connect_timeout} s (board off or another address?)"
    if "Connection closed" in s or "Connection reset" in s or "kex_exchange_identification" in s:
        return f"the board at {where} closed the connection during login ({last})"
    return f"ssh to {where} failed (exit {rc}): {last}"


# ------------------------------------------------------------------------------ remote scripts

def _dir_prelude(remote_dir: str) -> str:
    return (f"d={shlex.quote(remote_dir)}\n"
            'case "$d" in /*) ;; *) d="$HOME/$d" ;; esac\n')


def _py_prelude(python: str) -> str:
    """``py`` = the remote Python, with a leading ``~/`` meaning the remote home."""
    return (f"py={shlex.quote(python)}\n"
            'case "$py" in "~/"*) py="$HOME/${py#??}" ;; esac\n')


def probe_script(remote_dir: str, python: str) -> str:
    return "set -u\n" + _dir_prelude(remote_dir) + _py_prelude(python) + """echo "dir=$d"
echo "arch=$(uname -m)"
if command -v "$py" >/dev/null 2>&1; then
  echo "python_path=$(command -v "$py")"
  "$py" -c 'import sys; print("python=%d.%d.%d" % tuple(sys.version_info[:3]))' 2>/dev/null || echo "python=broken"
else
  echo "python=missing"
fi
if command -v rsync >/dev/null 2>&1; then echo "rsync=yes"; else echo "rsync=no"; fi
w="$d"
while [ ! -e "$w" ] && [ "$w" != "/" ]; do w=$(dirname "$w"); done
if [ -d "$w" ] && [ -w "$w" ]; then echo "writable=yes"; else echo "writable=no"; fi
df -Pk "$w" 2>/dev/null | awk 'NR==2 {print "free_kb=" $4}'
echo "current=$(readlink "$d/current" 2>/dev/null || true)"
"""


def mkdir_script(remote_dir: str, incoming: str) -> str:
    return "set -eu\n" + _dir_prelude(remote_dir) + f'mkdir -p "$d/{incoming}"\n'


def unpack_script(remote_dir: str, incoming: str, bundle_id: str, flash_id: str) -> str:
    rel = f"releases/{bundle_id}"
    return "set -eu\n" + _dir_prelude(remote_dir) + f"""cd "$d"
trap 'rm -rf "{incoming}" "{rel}.partial-{flash_id}"' EXIT
if [ -f "{rel}/GOOD" ]; then
  echo "state=reuse"
else
  if [ -e "{rel}" ]; then
    if [ "$(readlink current 2>/dev/null || true)" = "{rel}" ]; then
      echo "{rel} is the current release but has no GOOD marker: refusing to replace it" >&2; exit 3
    fi
    rm -rf "{rel}"
  fi
  mkdir -p "{rel}.partial-{flash_id}"
  tar -xzf "{incoming}/bundle.tar.gz" -C "{rel}.partial-{flash_id}"
  mv "{rel}.partial-{flash_id}" "{rel}"
  echo "state=new"
fi
"""


def deps_script(remote_dir: str, bundle_id: str, python: str) -> str:
    return "set -eu\n" + _dir_prelude(remote_dir) + _py_prelude(python) + (
        f'cd "$d/releases/{bundle_id}"\n'
        '"$py" -m pip install --disable-pip-version-check -r requirements.txt\n')


def selftest_script(remote_dir: str, bundle_id: str, python: str, args: tuple[str, ...] = ()) -> str:
    extra = "".join(" " + shlex.quote(a) for a in args)
    return "set -u\n" + _dir_prelude(remote_dir) + _py_prelude(python) + (
        f'cd "$d/releases/{bundle_id}"\n'
        f'PYTHON="$py" exec ./run.sh selftest{extra}\n')


_ACTIVATE_PY = r"""
import json, os, shutil, sys
d, rel, keep, good = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
os.chdir(d)
tmp = os.path.join(rel, ".GOOD.tmp")
with open(tmp, "w") as f:
    f.write(good + "\n"); f.flush(); os.fsync(f.fileno())
os.replace(tmp, os.path.join(rel, "GOOD"))
link = ".current.tmp-%d" % os.getpid()
if os.path.lexists(link):
    os.unlink(link)
os.symlink(rel, link)
os.replace(link, "current")
fd = os.open(".", os.O_RDONLY); os.fsync(fd); os.close(fd)
print("current=" + os.readlink("current"))
rels = [e for e in os.listdir("releases") if os.path.isfile(os.path.join("releases", e, "GOOD"))]
rels.sort(key=lambda e: os.path.getmtime(os.path.join("releases", e, "GOOD")), reverse=True)
for e in rels[keep:]:
    if os.path.join("releases", e) != rel:
        shutil.rmtree(os.path.join("releases", e)); print("pruned=releases/" + e)
failed = [e for e in os.listdir("releases") if e.endswith(".failed")]
failed.sort(key=lambda e: os.path.getmtime(os.path.join("releases", e)), reverse=True)
for e in failed[1:]:
    shutil.rmtree(os.path.join("releases", e)); print("pruned=releases/" + e)
"""


def activate_script(remote_dir: str, bundle_id: str, python: str, keep: int, good: dict) -> str:
    args = " ".join(shlex.quote(a) for a in (f"releases/{bundle_id}", str(keep), json.dumps(good, sort_keys=True)))
    return "set -eu\n" + _dir_prelude(remote_dir) + _py_prelude(python) + (
        f'"$py" -c {shlex.quote(_ACTIVATE_PY)} "$d" {args}\n')


def fail_script(remote_dir: str, bundle_id: str, log: str) -> str:
    rel = f"releases/{bundle_id}"
    return "set -eu\n" + _dir_prelude(remote_dir) + f"""cd "$d"
rm -rf "{rel}.failed"
mv "{rel}" "{rel}.failed"
cat > "{rel}.failed/FAILED" <<'SPLITEDGE_FAILED_EOF'
{log.replace("SPLITEDGE_FAILED_EOF", "SPLITEDGE-FAILED-EOF")}
SPLITEDGE_FAILED_EOF
echo "marked={rel}.failed"
"""


def cleanup_script(remote_dir: str, incoming: str) -> str:
    return "set -u\n" + _dir_prelude(remote_dir) + f'rm -rf "$d/{incoming}"\n'


# ------------------------------------------------------------------------------ profile and board

def profiles_for_arch(arch: str) -> list[str]:
    """The shipped profiles for boards of architecture ``arch``."""
    from .schema import ProfileError, load, shipped

    out = []
    for name in shipped():
        try:
            if load(name).board.arch == arch:
                out.append(name)
        except ProfileError:
            continue
    return out


def check_pairing(profile: Profile, facts: dict[str, str], *, board: str, remote_python: str) -> str | None:
    """Why ``profile`` cannot go to this board, from the probe's facts (``arch``, ``python``,
    ``python_path``), in words naming both; None when they pair. Pure: runs nothing."""
    p = profile
    arch = facts.get("arch") or "unknown"
    if arch != p.board.arch:
        others = [n for n in profiles_for_arch(arch)] if arch in ARCHES else []
        hint = (f"choose a profile for {arch} boards ({', '.join(others)})" if others
                else f"splitedge has profiles for {' and '.join(ARCHES)} boards only")
        return (f"profile {p.name} is for {p.board.arch} boards but the board {board} is {arch} (uname -m); "
                f"nothing was copied: {hint}")
    ver = facts.get("python")
    where = facts.get("python_path", remote_python)
    if ver == "missing":
        return (f"no Python 3 on the board at {remote_python!r} ({board}); profile {p.name} needs Python >= "
                f"{p.board.python} (install it there, or pass --remote-python /path/to/python{p.board.python})")
    if ver in (None, "broken") or not re.fullmatch(r"\d+\.\d+\.\d+", ver or ""):
        return f"{remote_python!r} on the board {board} does not run as a Python interpreter"
    if tuple(int(v) for v in ver.split("."))[:2] < p.board.python_tuple:
        return (f"profile {p.name} needs Python >= {p.board.python} but the board {board} has Python {ver} "
                f"({where}); nothing was copied: install Python {p.board.python} or newer there and pass "
                f"--remote-python /path/to/python{p.board.python}")
    return None


# ------------------------------------------------------------------------------ the flash

def _parse_kv(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, eq, v = line.partition("=")
        if eq and re.fullmatch(r"[a-z_]+", k):
            out[k] = v.strip()
    return out


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class Flasher:
    def __init__(self, req: FlashRequest, *, out: Callable[[str], None] = print, dry_run: bool = False):
        self.req = req
        self.t = req.target
        self.out = out
        self.dry_run = dry_run
        self.flash_id = time.strftime("%Y%m%dT%H%M%S") + "-" + os.urandom(3).hex()
        self.incoming = f".incoming-{self.flash_id}"
        self.result = FlashResult()

    # -- command running

    def _show(self, cmd: list[str], script: str | None = None) -> None:
        line = "    $ " + shlex.join(cmd)
        if script is None:
            self.out(line)
        else:
            self.out(line + " <<'EOF'")
            for s in script.rstrip("\n").splitlines():
                self.out("    " + s)
            self.out("    EOF")

    def _ssh(self, step: str, script: str, *, timeout: float = 120.0, check: bool = True
             ) -> subprocess.CompletedProcess:
        cmd = self.t.ssh()
        try:
            p = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise FlashError(step, "the OpenSSH client (ssh) is not installed on this machine") from None
        except subprocess.TimeoutExpired:
            raise FlashError(step, f"no answer from {self.t.host} within {timeout:.0f} s") from None
        if p.returncode == 255:
            raise FlashError(step, explain_ssh_failure(p.returncode, p.stderr, self.t))
        if check and p.returncode != 0:
            tail = [ln.strip() for ln in (p.stderr or p.stdout).splitlines() if ln.strip()][-3:]
            raise FlashError(step, f"the board answered with exit code {p.returncode}: {' / '.join(tail)}")
        return p

    def _stream(self, step: str, script: str, timeout: float) -> tuple[int, list[str]]:
        """Runs a remote script, echoing its output as it comes; returns (exit code, lines)."""
        proc = subprocess.Popen(self.t.ssh(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        lines: list[str] = []
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(script)
            proc.stdin.close()
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                if not line.startswith(JSON_PREFIX):
                    self.out(f"    | {line}")
            rc = proc.wait()
        finally:
            timer.cancel()
        if fired.is_set():
            raise FlashError(step, f"the self-test did not finish within {timeout:.0f} s")
        if rc == 255 and not any(ln.startswith(JSON_PREFIX) for ln in lines):
            raise FlashError(step, explain_ssh_failure(rc, "\n".join(lines), self.t))
        return rc, lines

    # -- steps

    def run(self, bundle_path: Path | None = None) -> FlashResult:
        req, r = self.req, self.result
        p = req.profile
        self.out(f"flash-board: profile {p.name} -> {self.t.host} (port {self.t.port}), remote dir {req.remote_dir}"
                 + (" [dry run: nothing is run]" if self.dry_run else ""))
        step = "bundle"
        tmpdir = None
        try:
            if self.dry_run:
                info = B.build(p, req.artifacts, None)
                local = f"<bundle {info.id}>.tar.gz"
            else:
                if bundle_path is None:
                    tmpdir = tempfile.mkdtemp(prefix="splitedge-flash-")
                    bundle_path = Path(tmpdir) / "bundle.tar.gz"
                info = B.build(p, req.artifacts, bundle_path)
                local = str(bundle_path)
            r.bundle_id = info.id
            rel = f"releases/{info.id}"
            self._line("bundle", f"{info.id}: {info.files} files, {_human(info.size)} "
                                 f"({info.manifest['artifacts']['model']} cut {info.manifest['artifacts']['cut']}, "
                                 f"profile {p.name}, sha256 {info.sha256[:16]}...)")

            step = "check"
            probe = probe_script(req.remote_dir, req.remote_python)
            if self.dry_run:
                self._line("check", "connect, find Python, architecture, disk space; create the remote dir")
                self._show(self.t.ssh(), probe)
            else:
                facts = _parse_kv(self._ssh(step, probe, timeout=self.t.connect_timeout + 60).stdout)
                r.facts = facts
                self._check(facts, info.size)
                r.previous = facts.get("current") or None
                r.release = f"{facts['dir']}/{rel}"

            step = "copy"
            use_rsync = req.copy == "rsync" or (
                req.copy == "auto" and shutil.which("rsync") is not None and r.facts.get("rsync") == "yes")
            dest_dir = req.remote_dir.rstrip("/") + "/" + self.incoming
            dest = dest_dir + "/bundle.tar.gz"
            copy_cmd = self.t.rsync(local, dest) if use_rsync else self.t.scp(local, dest)
            if self.dry_run:
                how = {"auto": "scp, or rsync over ssh when both ends have rsync", "scp": "scp",
                       "rsync": "rsync over ssh"}[req.copy]
                self._line("copy", f"{how}, into {dest_dir}/")
                self._show(self.t.ssh(), mkdir_script(req.remote_dir, self.incoming))
                self._show(copy_cmd)
            else:
                self._ssh(step, mkdir_script(req.remote_dir, self.incoming))
                t0 = time.monotonic()
                self._copy(copy_cmd, use_rsync)
                self._line("copy", f"{'rsync' if use_rsync else 'scp'}: {_human(info.size)} in "
                                   f"{time.monotonic() - t0:.1f} s to {dest_dir}/")

            step = "unpack"
            unpack = unpack_script(req.remote_dir, self.incoming, info.id, self.flash_id)
            state = "new"
            if self.dry_run:
                self._line("unpack", f"into {req.remote_dir}/{rel}/ (a release already marked GOOD is reused)")
                self._show(self.t.ssh(), unpack)
            else:
                state = _parse_kv(self._ssh(step, unpack).stdout).get("state", "new")
                self._line("unpack", f"{r.release}/" + (" (already installed and GOOD: reused)" if state == "reuse"
                                                        else ""))

            step = "deps"
            if req.install_deps:
                deps = deps_script(req.remote_dir, info.id, req.remote_python)
                if self.dry_run:
                    self._line("deps", f"{req.remote_python} -m pip install -r requirements.txt on the board")
                    self._show(self.t.ssh(), deps)
                else:
                    self._line("deps", f"{req.remote_python} -m pip install -r requirements.txt ...")
                    try:
                        self._ssh(step, deps, timeout=3600)
                    except FlashError as e:
                        where = self._mark_failed(info.id, state, f"installing requirements failed: {e}")
                        raise FlashError(step, f"installing the requirements on the board failed: {e}; {where}") \
                            from None
                    self._line("deps", "installed")
            else:
                how = ("the ORT training build comes from source: install it first (requirements.txt says how)"
                       if p.ort.source == "source" else "pass --install-deps to pip-install them")
                self._line("deps", f"not installed by flash-board: the board's {req.remote_python} must already have "
                                   f"the bundle's requirements.txt ({how})")

            step = "selftest"
            st = selftest_script(req.remote_dir, info.id, req.remote_python, req.selftest_args)
            if self.dry_run:
                self._line("selftest", f"run.sh selftest in the release with {req.remote_python}")
                self._show(self.t.ssh(), st)
                self._line("activate", "only if the self-test passes: write GOOD, switch current, prune "
                                       f"(keep {req.keep}); otherwise rename the release to {rel}.failed")
                self._show(self.t.ssh(), activate_script(req.remote_dir, info.id, req.remote_python, req.keep,
                                                         {"bundle": info.id, "selftest": "..."}))
                self.out("dry run: nothing was copied, installed or run on the board")
                r.ok = True
                return r
            self._line("selftest", f"{rel}/run.sh selftest with {req.remote_python} ...")
            t0 = time.monotonic()
            rc, lines = self._stream(step, st, req.selftest_timeout_s)
            js = next((ln[len(JSON_PREFIX):] for ln in reversed(lines) if ln.startswith(JSON_PREFIX)), None)
            try:
                r.selftest = json.loads(js) if js else None
            except ValueError:
                r.selftest = None
            if rc != 0 or not r.selftest or not r.selftest.get("ok"):
                why = (r.selftest or {}).get("error") or (
                    f"the self-test printed no result (exit code {rc}): see its output above")
                where = self._mark_failed(info.id, state, f"self-test failed: {why}\n\n" + "\n".join(lines[-200:]))
                raise FlashError(step, f"self-test failed on the board: {why}; {where}")
            self._line("selftest", f"passed in {time.monotonic() - t0:.1f} s: {r.selftest.get('summary')}")

            step = "activate"
            good = {"bundle": info.id, "profile": p.name, "flash_id": self.flash_id,
                    "selftest": {k: r.selftest.get(k) for k in ("python", "onnxruntime", "selection", "forward_ms",
                                                                "train_step_ms", "infer_warm_ms", "peak_rss_mb")}}
            out = self._ssh(step, activate_script(req.remote_dir, info.id, req.remote_python, req.keep, good)).stdout
            r.current = _parse_kv(out).get("current")
            pruned = [ln.partition("=")[2] for ln in out.splitlines() if ln.startswith("pruned=")]
            self._line("activate", f"GOOD written; current -> {r.current}"
                                   + (f" (was {r.previous})" if r.previous and r.previous != r.current else "")
                                   + (f"; pruned {', '.join(pruned)}" if pruned else ""))
            r.ok = True
            self.out(f"OK: {p.name} bundle {info.id} installed and self-tested on {self.t.host}. Train with:")
            self.out(f"    ssh {self.t.host} 'PYTHON={req.remote_python} {req.remote_dir}/current/run.sh train "
                     f"--connect tcp://CLOUD:5555 --client-id 0 --num-clients 1 --data DATASET'")
            return r
        except FlashError as e:
            r.ok, r.failed_step, r.error = False, e.step, str(e)
            if step in ("copy", "unpack") and not self.dry_run:
                with contextlib.suppress(FlashError):
                    self._ssh("cleanup", cleanup_script(req.remote_dir, self.incoming), check=False)
            self.out(f"FAILED at {e.step}: {e}")
            if step not in ("bundle", "check"):
                prev = r.previous or "nothing (no release was installed before)"
                self.out(f"    the board's current release is unchanged: {prev}")
            return r
        finally:
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)

    def _mark_failed(self, bundle_id: str, state: str, log: str) -> str:
        """Renames a new release to <id>.failed (with a FAILED file); returns what happened, in words."""
        rel = f"releases/{bundle_id}"
        if state != "new":
            return f"the already installed release {rel} was left as it was"
        try:
            self._ssh("mark-failed", fail_script(self.req.remote_dir, bundle_id, log))
            return f"the new release was renamed {rel}.failed (its FAILED file has the output)"
        except FlashError as e:
            return f"marking the release failed did not work either ({e}); it has no GOOD marker"

    def _line(self, step: str, text: str) -> None:
        self.out(f"  {step:<9} {text}")

    def _check(self, facts: dict[str, str], bundle_size: int) -> None:
        p = self.req.profile
        py = self.req.remote_python
        if "dir" not in facts:
            raise FlashError("check", "the board's shell did not run the check script (is its login shell POSIX?)")
        pairing = check_pairing(p, facts, board=f"{self.t.host} (port {self.t.port})", remote_python=py)
        if pairing:
            raise FlashError("check", pairing)
        if facts.get("writable") != "yes":
            raise FlashError("check", f"cannot create or write {facts['dir']} on the board (pass --remote-dir)")
        free = int(facts.get("free_kb") or 0) * 1024
        need = 4 * bundle_size + (64 << 20)
        if facts.get("free_kb") and free < need:
            raise FlashError("check", f"not enough disk space in {facts['dir']}: {_human(free)} free, "
                                      f"about {_human(need)} needed")
        self._line("check", f"ssh ok; Python {facts['python']} at {facts.get('python_path', py)}; {facts['arch']}; "
                            f"{_human(free) if facts.get('free_kb') else '? '} free in {facts['dir']}; "
                            f"current: {facts.get('current') or 'none'}")

    def _copy(self, cmd: list[str], use_rsync: bool) -> None:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        except FileNotFoundError:
            raise FlashError("copy", f"{cmd[0]} is not installed on this machine") from None
        if p.returncode == 0:
            return
        err = p.stderr
        if not use_rsync and "subsystem request failed" in err.lower():  # a board without SFTP: legacy scp
            p = subprocess.run([cmd[0], "-O", *cmd[1:]], capture_output=True, text=True, timeout=3600)
            if p.returncode == 0:
                return
            err = p.stderr
        if p.returncode == 255 or "Permission denied" in err or "Connection" in err:
            raise FlashError("copy", explain_ssh_failure(p.returncode, err, self.t))
        tail = " / ".join(err.strip().splitlines()[-3:])
        raise FlashError("copy", f"{cmd[0]} failed (exit {p.returncode}): {tail}")
