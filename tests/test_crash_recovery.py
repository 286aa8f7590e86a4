"""Crash safety: a cloud or an edge killed with SIGKILL mid-run, damaged checkpoint directories,
a full disk at checkpoint time.

The cloud's metrics are the ledger the checks read (JSON lines, appended by every run of the
cloud): a ``step`` event per applied step (client, step, server_step, session), and on
``--resume`` a ``resume`` event naming the checkpoint's server step and each client's last
applied step in it. A killed cloud's steps after that checkpoint are rolled back: the new
process's model never had them. An edge does not re-send a step its own model has already
trained (it goes on from where it is), so such a step is lost to the server model -- at most
``--checkpoint-every`` of them per crash -- unless it was in flight (applied, its GRAD not yet
received), in which case the edge retries it and the new process applies it again.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from splitedge.lab import launch
from splitedge.fsutil import CheckpointDir

SYNTH = "synthetic:n=2048,classes=10,shape=1x28x28,seed=0"


@pytest.fixture(scope="module")
def art(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28), lr=0.02)


def _cloud(art: Path, port: int, wd: Path, *extra: str, log: str = "cloud.log") -> subprocess.Popen:
    cmd = launch.script("cloud-serve") + ["--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{port}", "--codec", "uq",
                                          "--bits", "4", "--threads", "1", "--metrics", str(wd / "metrics.jsonl"),
                                          "--log-every", "0", *extra]
    return subprocess.Popen(cmd, stdout=open(wd / log, "a"), stderr=subprocess.STDOUT)


def _edge(art: Path, port: int, wd: Path, cid: int, k: int, *extra: str) -> subprocess.Popen:
    cmd = launch.script("edge-train") + [
        "--artifacts", str(art), "--connect", f"tcp://127.0.0.1:{port}", "--data", SYNTH, "--client-id", str(cid),
        "--num-clients", str(k), "--batch-size", "16", "--eval-samples", "32", "--threads", "1", "--no-progress",
        "--timeout", "1", "--give-up", "120", "--summary", str(wd / f"edge-{cid}.json"), *extra,
    ]
    return subprocess.Popen(cmd, stdout=open(wd / f"edge-{cid}.log", "a"), stderr=subprocess.STDOUT)


def _events(wd: Path) -> list[dict]:
    return launch.read_jsonl(wd / "metrics.jsonl")


def _wait_for(pred, timeout: float, what: str, procs=()) -> None:
    t0 = time.monotonic()
    while not pred():
        for p in procs:
            assert p.poll() is None, f"{p.args[0]} exited early with {p.returncode}"
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------- the cloud crashes


@pytest.mark.slow
def test_cloud_killed_mid_run_resumes_and_every_step_is_accounted_for(art, tmp_path):
    """3 edges x 40 steps; the cloud checkpoints every 5 server steps and is SIGKILLed once the
    metrics show half the steps, then restarted with --resume on the same port. The edges
    reconnect by themselves and finish; the metrics account for every step exactly."""
    clients, planned, every = 3, 40, 5
    port = launch.free_port()
    common = ("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", str(every), "--expect-clients",
              str(clients), "--exit-when-done")
    cloud = _cloud(art, port, tmp_path, *common)
    edges = [_edge(art, port, tmp_path, c, clients, "--steps", str(planned)) for c in range(clients)]
    try:
        # half the steps, and between two checkpoints: the last steps before the kill are rolled back
        _wait_for(lambda: (n := sum(e["event"] == "step" for e in _events(tmp_path))) >= clients * planned // 2
                  and n % every in (2, 3), 240, "half the steps", [cloud, *edges])
        cloud.send_signal(signal.SIGKILL)
        cloud.wait()
        cloud = _cloud(art, port, tmp_path, *common, "--resume", log="cloud2.log")
        for c, e in enumerate(edges):
            assert e.wait(timeout=240) == 0, _tail(tmp_path / f"edge-{c}.log")
        assert cloud.wait(timeout=60) == 0, _tail(tmp_path / "cloud2.log")
    finally:
        _stop(cloud, *edges)

    events = _events(tmp_path)
    # every client finished its plan
    for c in range(clients):
        s = json.loads((tmp_path / f"edge-{c}.json").read_text())
        assert s["steps"] == planned, s
    # split the ledger at the resume event: the killed run before it, the new run after it
    (cut,) = [i for i, e in enumerate(events) if e["event"] == "resume"]
    resume = events[cut]
    killed = [e for e in events[:cut] if e["event"] == "step"]
    new = [e for e in events[cut:] if e["event"] == "step"]
    assert killed and new, "both runs applied steps"
    assert len({e["session"] for e in killed}) == 1 and {e["session"] for e in new} == {resume["session"]}
    ckpt_step = resume["server_step"]
    in_ckpt = {int(c): last for c, last in resume["clients"].items()}
    # server steps are consecutive in each run; the new one continues from the checkpoint
    assert [e["server_step"] for e in killed] == list(range(1, len(killed) + 1))
    assert [e["server_step"] for e in new] == list(range(ckpt_step + 1, ckpt_step + 1 + len(new)))
    written = [e["server_step"] for e in events[:cut] if e["event"] == "checkpoint"]
    assert written and max(written) <= ckpt_step <= len(killed), "resumed from the newest checkpoint"

    kept = [e for e in killed if e["server_step"] <= ckpt_step]  # in the checkpoint the new run started from
    rolled_back = [e for e in killed if e["server_step"] > ckpt_step]
    effective = kept + new
    counts = Counter((e["client"], e["step"]) for e in effective)
    twice = {k: n for k, n in counts.items() if n > 1}
    assert not twice, f"applied twice in the effective history: {twice}"
    for c in range(clients):
        kept_c = sorted(e["step"] for e in kept if e["client"] == c)
        assert kept_c == list(range(1, in_ckpt.get(c, 0) + 1)), "the checkpoint holds exactly the steps before it"
        assert all(e["step"] > in_ckpt.get(c, 0) for e in new if e["client"] == c), "nothing re-applied"
        seen = {e["step"] for e in effective + rolled_back if e["client"] == c}
        assert seen == set(range(1, planned + 1)), f"client {c}: steps missing {set(range(1, planned + 1)) - seen}"
        lost = {e["step"] for e in rolled_back if e["client"] == c} - {e["step"] for e in new if e["client"] == c}
        assert len(lost) <= every, f"client {c} lost {sorted(lost)} to the crash, more than --checkpoint-every"
    assert len(rolled_back) <= every, "the killed run applied at most --checkpoint-every steps after its checkpoint"
    print(f"\ncloud killed at server step {len(killed)}, resumed from {ckpt_step}; rolled back "
          f"{[(e['client'], e['step']) for e in rolled_back]}; re-applied "
          f"{sorted(set((e['client'], e['step']) for e in rolled_back) & set(counts))}")


# ---------------------------------------------------------------------------- an edge crashes


@pytest.mark.slow
def test_edge_killed_and_restarted_resumes_its_shard(art, exported, tmp_path):
    """An edge checkpointing every 5 steps is SIGKILLed mid-run and restarted with --resume: it
    says HELLO, learns how far the cloud got with its client id, skips those batches (never
    re-sending an applied step), and finishes; the cloud applied each of its steps once."""
    planned = 40
    other_art = exported("resnet18", 4, input_shape=(1, 28, 28), lr=0.02)
    port = launch.free_port()
    ckpt = tmp_path / "edge-ckpt"
    cloud = _cloud(art, port, tmp_path, "--expect-clients", "1", "--exit-when-done")
    edge_args = ("--steps", str(planned), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5")
    edge = _edge(art, port, tmp_path, 0, 1, *edge_args)
    try:
        # kill it between two of its checkpoints, so that the cloud is ahead of the checkpoint
        _wait_for(lambda: (n := sum(e["event"] == "step" for e in _events(tmp_path))) >= planned // 2 and n % 5 >= 2,
                  240, "half the steps", [cloud, edge])
        edge.send_signal(signal.SIGKILL)
        edge.wait()
        time.sleep(1.0)  # a TRAIN the edge sent just before it died may still be applied
        applied_before = max(e["step"] for e in _events(tmp_path) if e["event"] == "step")
        edge = _edge(art, port, tmp_path, 0, 1, *edge_args, "--resume")
        assert edge.wait(timeout=240) == 0, _tail(tmp_path / "edge-0.log")
        assert cloud.wait(timeout=60) == 0, _tail(tmp_path / "cloud.log")
    finally:
        _stop(cloud, edge)

    events = _events(tmp_path)
    assert json.loads((tmp_path / "edge-0.json").read_text())["steps"] == planned
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert sorted(steps) == list(range(1, planned + 1)), "every step applied exactly once"
    joins = [e for e in events if e["event"] == "client_joined"]  # a HELLO retried at start joins twice
    second = joins[-1]
    assert second["last_step"] == applied_before, "the cloud told the restarted edge how far it got"
    assert second["resume_step"] % 5 == 0 and second["resume_step"] < second["last_step"], second
    assert f"skipping {second['last_step'] - second['resume_step']} batches" in (tmp_path / "edge-0.log").read_text()
    assert not [e for e in events if e["event"] == "error"], "no step re-sent (it would be stale_step)"
    progress = json.loads((ckpt / (ckpt / "LATEST").read_text().strip() / "edge_progress.json").read_text())
    assert (progress["step"], progress["epoch"], progress["batch"]) == (planned, 0, planned), progress

    # resuming that checkpoint with other arguments would train another shard or batches: refused, exit 2
    def resume(*extra, artifacts=art):
        args = ["--artifacts", str(artifacts), "--data", SYNTH, "--batch-size", "16", "--steps", str(planned + 5),
                "--checkpoint-dir", str(ckpt), "--resume", "--give-up", "5",
                "--connect", f"tcp://127.0.0.1:{launch.free_port()}", *extra]
        return subprocess.run(launch.script("edge-train") + args, capture_output=True, text=True, timeout=120)

    for extra, what in ((("--batch-size", "32"), "a different --batch-size (16 there, 32 here)"),
                        (("--num-clients", "2", "--client-id", "1"),
                         "a different --client-id (0 there, 1 here); --num-clients (1 there, 2 here)"),
                        (("--seed", "7"), "a different --seed (0 there, 7 here); resume with the same arguments"),
                        (("--partition", "dirichlet:0.5"), 'a different --partition ("iid" there, "dirichlet:0.5" here)')):
        res = resume(*extra)
        assert res.returncode == 2 and what in " ".join(res.stderr.split()), res.stderr[-2000:]
    res = resume(artifacts=other_art)
    assert res.returncode == 2 and "a different --artifacts (cut) (3 there, 4 here); --artifacts (their files differ)" \
        in " ".join(res.stderr.split()), res.stderr[-2000:]
    (ckpt / (ckpt / "LATEST").read_text().strip() / "edge_progress.json").write_text('{"step": ')
    res = resume()
    assert res.returncode == 2 and "edge_progress.json: not valid JSON" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.slow
def test_an_interrupted_edge_saves_a_checkpoint_and_resumes_without_losing_a_step(art, tmp_path, sig):
    """Ctrl-C (or a service manager's SIGTERM) stops edge-train at the next safe point -- between
    steps or while it waits for the cloud -- with a checkpoint of its last completed step, exit
    128 + the signal number, and a message saying how to continue. --resume then finishes the run;
    the cloud applied every step exactly once, and no step was retrained from older weights (the
    checkpoint is not behind the cloud by more than a step in flight)."""
    planned = 60
    port = launch.free_port()
    ckpt = tmp_path / "edge-ckpt"
    cloud = _cloud(art, port, tmp_path, "--expect-clients", "1", "--exit-when-done")
    edge_args = ("--steps", str(planned), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1000")
    edge = _edge(art, port, tmp_path, 0, 1, *edge_args)
    try:
        _wait_for(lambda: sum(e["event"] == "step" for e in _events(tmp_path)) >= 10, 240, "10 steps", [cloud, edge])
        edge.send_signal(sig)
        assert edge.wait(timeout=60) == 128 + sig, _tail(tmp_path / "edge-0.log")
        log = _tail(tmp_path / "edge-0.log")
        stopped = int(log.split(" after step ")[1].split()[0])
        assert f"stopped by {sig.name} after step {stopped} of {planned}" in log and "with --resume to continue" in log
        assert (ckpt / "LATEST").read_text().strip() == f"ckpt-{stopped:09d}", "a checkpoint of that very step"
        applied = max(e["step"] for e in _events(tmp_path) if e["event"] == "step")
        assert stopped <= applied <= stopped + 1, (stopped, applied)
        edge = _edge(art, port, tmp_path, 0, 1, *edge_args, "--resume")
        assert edge.wait(timeout=240) == 0, _tail(tmp_path / "edge-0.log")
        assert cloud.wait(timeout=60) == 0, _tail(tmp_path / "cloud.log")
    finally:
        _stop(edge, cloud)
    steps = Counter(e["step"] for e in _events(tmp_path) if e["event"] == "step")
    assert sorted(steps) == list(range(1, planned + 1)) and set(steps.values()) == {1}


@pytest.mark.slow
def test_an_interrupted_edge_frees_its_place_on_the_cloud_at_once(art, tmp_path):
    """With --max-clients 1, a second edge waited for --client-timeout after the first one was
    stopped with Ctrl-C. The stopped edge now says BYE "interrupted": its place is free at once,
    its progress kept (it resumes where the cloud left it)."""
    port = launch.free_port()
    cloud = _cloud(art, port, tmp_path, "--max-clients", "1", "--client-timeout", "300")
    first = _edge(art, port, tmp_path, 0, 2, "--steps", "200", "--checkpoint-dir", str(tmp_path / "ck0"))
    second = None
    try:
        _wait_for(lambda: sum(e["event"] == "step" for e in _events(tmp_path)) >= 5, 240, "5 steps", [cloud, first])
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130, _tail(tmp_path / "edge-0.log")
        t0 = time.monotonic()
        second = _edge(art, port, tmp_path, 1, 2, "--steps", "3")
        assert second.wait(timeout=120) == 0, _tail(tmp_path / "edge-1.log")
        assert time.monotonic() - t0 < 100, "the second edge did not wait for --client-timeout (300 s)"
        assert "server_full" not in (tmp_path / "edge-1.log").read_text()
        stopped = [e for e in _events(tmp_path) if e["event"] == "client_stopped"]
        assert [e["client"] for e in stopped] == [0] and stopped[0]["steps"] >= 5
        assert not [e for e in _events(tmp_path) if e["event"] == "client_done" and e["client"] == 0]
    finally:
        _stop(*(p for p in (first, second, cloud) if p is not None))


# ---------------------------------------------------------------------------- damaged checkpoint directories


def _fill(d: Path) -> None:
    (d / "state.json").write_text('{"ok": true}')


def test_checkpoint_dir_ignores_leftover_temporaries_and_an_uncommitted_checkpoint(tmp_path):
    """What fsutil documents: LATEST names the committed checkpoint; a .tmp-ckpt-* directory (a
    write cut short, by another pid) and a ckpt-* directory that LATEST does not name (renamed
    into place, the crash came before LATEST was replaced) are ignored."""
    cd = CheckpointDir(tmp_path, keep=2)
    assert cd.latest() is None
    first = cd.write("000000005", _fill)
    leftover = tmp_path / ".tmp-ckpt-000000010-999999"
    leftover.mkdir()
    (leftover / "state.json").write_text('{"ok": tr')  # half written
    uncommitted = tmp_path / "ckpt-000000010"
    uncommitted.mkdir()
    assert cd.latest() == first
    # the next write with the same tag never replaces a directory in place: it commits beside it
    second = cd.write("000000010", _fill)
    assert second == tmp_path / "ckpt-000000010-0001" and cd.latest() == second
    assert json.loads((second / "state.json").read_text()) == {"ok": True}
    assert cd.write("000000015", _fill) == tmp_path / "ckpt-000000015"
    # its own older checkpoint is rotated out; the uncommitted one it did not write stays
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000010", "ckpt-000000010-0001",
                                                               "ckpt-000000015"]
    assert not [p for p in tmp_path.glob(f".tmp-ckpt-*-{os.getpid()}-*")], "its own temporaries are gone"
    assert leftover.is_dir(), "another process's temporary is not this run's to delete"
    # with no LATEST at all (a crash before the very first LATEST was written) there is no checkpoint
    empty = CheckpointDir(tmp_path / "new")
    assert empty.latest() is None


@pytest.mark.parametrize("latest", ["ckpt-000000099", "../ckpt-000000005", "", "garbage"])
def test_a_latest_naming_no_checkpoint_is_a_clear_error(tmp_path, latest):
    cd = CheckpointDir(tmp_path)
    cd.write("000000005", _fill)
    (tmp_path / "LATEST").write_text(latest + "\n")
    with pytest.raises(OSError, match="LATEST names .* not a checkpoint directory"):
        cd.latest()


def _tree(d: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def _earlier_run(root: Path) -> None:
    """An earlier run's checkpoints 5 and 10 (LATEST is set by each case)."""
    old = CheckpointDir(root, keep=5)
    for tag in ("000000005", "000000010"):
        old.write(tag, _fill)


@pytest.mark.parametrize("state", ["LATEST missing", "LATEST empty", "LATEST names a missing checkpoint",
                                   "LATEST is binary garbage"])
def test_a_directory_of_checkpoints_without_a_readable_latest_is_never_read_as_empty(tmp_path, state):
    """D1: a missing LATEST used to read as "no checkpoint yet": --resume started over and its rotation
    deleted the earlier run's checkpoints. Now latest() refuses, with a repair hint naming the newest
    checkpoint, and a writer that goes on anyway deletes none of them."""
    _earlier_run(tmp_path)
    latest = tmp_path / "LATEST"
    if state == "LATEST missing":
        latest.unlink()
    else:
        latest.write_bytes({"LATEST empty": b"", "LATEST names a missing checkpoint": b"ckpt-000000099\n",
                            "LATEST is binary garbage": b"\xff\xfe\x00ckpt"}[state])
    before = _tree(tmp_path)
    cd = CheckpointDir(tmp_path, keep=1)
    with pytest.raises(OSError) as e:
        cd.latest()
    assert f"echo ckpt-000000010 > {latest}" in str(e.value) and "nothing was changed" in str(e.value)
    assert _tree(tmp_path) == before
    for tag in ("000000001", "000000002", "000000003"):  # a run that started over regardless
        cd.write(tag, _fill)
    assert {"ckpt-000000005", "ckpt-000000010"} <= {p.name for p in tmp_path.glob("ckpt-*")}
    assert sorted(p.name for p in tmp_path.glob("ckpt-00000000[123]")) == ["ckpt-000000003"], "its own rotate"


def test_rotation_deletes_only_the_checkpoints_of_this_run_in_a_directory_of_foreign_files(tmp_path):
    """Foreign files and directories, some named like checkpoints, survive any number of checkpoints;
    the checkpoint a run resumed from (adopted) rotates out like its own, the older ones it did not
    write stay."""
    foreign = {"notes.txt": b"mine", "ckpt-000000001.txt": b"a file, not a checkpoint", "backup/x.bin": b"\0"}
    for rel, data in foreign.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    cd = CheckpointDir(tmp_path, keep=1)
    assert cd.latest() is None, "no checkpoint directory here: a run that stopped before its first"
    for tag in ("000000002", "000000004", "000000004"):
        cd.write(tag, _fill)
    assert {rel: (tmp_path / rel).read_bytes() for rel in foreign} == foreign
    assert [p.name for p in tmp_path.glob("ckpt-*") if p.is_dir()] == ["ckpt-000000004-0001"]
    # a later run resumes from the latest one, with an older one of another run beside it
    (tmp_path / "ckpt-000000003").mkdir()
    resumed = CheckpointDir(tmp_path, keep=1)
    start = resumed.latest()
    resumed.adopt(start)
    resumed.write("000000006", _fill)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*") if p.is_dir()) == ["ckpt-000000003", "ckpt-000000006"]
    assert {rel: (tmp_path / rel).read_bytes() for rel in foreign} == foreign


@pytest.mark.parametrize("state", ["LATEST missing", "LATEST empty"])
@pytest.mark.slow
def test_cloud_and_edge_resume_refuse_checkpoints_without_a_readable_latest(art, tmp_path, state):
    """D1 through the commands: exit 2 with the repair hint, the directory untouched (the cloud used
    to start fresh here, the edge to train from its initial weights)."""
    ckpt = tmp_path / "ckpt"
    _earlier_run(ckpt)
    if state == "LATEST missing":
        (ckpt / "LATEST").unlink()
    else:
        (ckpt / "LATEST").write_text("")
    before = _tree(ckpt)
    res = subprocess.run(launch.script("cloud-serve") + [
        "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{launch.free_port()}", "--checkpoint-dir", str(ckpt),
        "--resume"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and f"echo ckpt-000000010 > {ckpt / 'LATEST'}" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and _tree(ckpt) == before
    res = subprocess.run(launch.script("edge-train") + [
        "--artifacts", str(art), "--data", SYNTH, "--checkpoint-dir", str(ckpt), "--resume", "--steps", "1",
        "--connect", f"tcp://127.0.0.1:{launch.free_port()}", "--give-up", "2"], capture_output=True, text=True,
        timeout=60)
    assert res.returncode == 2 and f"echo ckpt-000000010 > {ckpt / 'LATEST'}" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and _tree(ckpt) == before


@pytest.mark.slow
def test_cloud_and_edge_refuse_to_resume_from_a_damaged_checkpoint_dir(art, tmp_path):
    """--resume with a LATEST naming a missing directory, or a checkpoint lacking a file: both
    programs stop with a message naming the problem (not a traceback, not a silent fresh start)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "LATEST").write_text("ckpt-000000042\n")
    base = ["--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{launch.free_port()}", "--checkpoint-dir", str(ckpt),
            "--resume"]
    res = subprocess.run(launch.script("cloud-serve") + base, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "LATEST names 'ckpt-000000042'" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    res = subprocess.run(launch.script("edge-train") + [
        "--artifacts", str(art), "--data", SYNTH, "--checkpoint-dir", str(ckpt), "--resume", "--steps", "1",
        "--connect", f"tcp://127.0.0.1:{launch.free_port()}", "--give-up", "5"], capture_output=True, text=True,
        timeout=120)
    assert res.returncode == 2 and "LATEST names 'ckpt-000000042'" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    # a committed checkpoint that lacks its state file (e.g. deleted by hand)
    (ckpt / "ckpt-000000042").mkdir()
    res = subprocess.run(launch.script("cloud-serve") + base, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "server_state.json" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------------- a full disk


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    """ENOSPC in the middle of a checkpoint (simulated in the writer, after part of a file):
    the error reaches the caller, LATEST still names the previous checkpoint, its files are
    untouched, and the temporary directory is gone."""
    cd = CheckpointDir(tmp_path, keep=2)
    first = cd.write("000000005", _fill)

    def full_disk(d: Path) -> None:
        (d / "state.json").write_text('{"ok": tr')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        cd.write("000000010", full_disk)
    assert e.value.errno == errno.ENOSPC
    assert cd.latest() == first and json.loads((first / "state.json").read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-000000005"]


@pytest.fixture
def tiny_disk(tmp_path):
    """``tiny_disk(size)``: a tmpfs of that size (e.g. "64m") under tmp_path; skips where no tmpfs
    can be mounted (it needs root)."""
    mounted = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"disk-{len(mounted)}"
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_at_checkpoint_time_is_reported_and_training_goes_on(art, tmp_path, tiny_disk):
    """The cloud checkpoints every 5 steps onto a disk with room for one checkpoint: the first is
    written, the second fails with ENOSPC. The failure is logged and in the metrics, the previous
    checkpoint stays intact (and loads), training goes on to the end, and the cloud exits 1
    because its final checkpoint could not be written."""
    port = launch.free_port()
    ckpt = tiny_disk("64m") / "ckpt"  # room for one cloud checkpoint (ResNet-18 after cut 3: 45 MB), not two
    cloud = _cloud(art, port, tmp_path, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5",
                   "--expect-clients", "1", "--exit-when-done")
    edge = _edge(art, port, tmp_path, 0, 1, "--steps", "15")
    try:
        assert edge.wait(timeout=240) == 0, _tail(tmp_path / "edge-0.log")
        assert cloud.wait(timeout=60) == 1, _tail(tmp_path / "cloud.log")
    finally:
        _stop(cloud, edge)
    events = _events(tmp_path)
    assert [e["server_step"] for e in events if e["event"] == "checkpoint"] == [5]
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    # at 10 and 15 (every 5), and the final one at shutdown, again at 15
    assert [e["server_step"] for e in failed] == [10, 15, 15] and all("No space left" in e["error"] for e in failed)
    assert sorted(e["step"] for e in events if e["event"] == "step") == list(range(1, 16))
    log = (tmp_path / "cloud.log").read_text()
    assert "the previous checkpoint is intact" in log and "final checkpoint failed" in log
    assert sorted(p.name for p in ckpt.iterdir()) == ["LATEST", "ckpt-000000005"], "no temporary left behind"
    from safetensors.torch import load_file

    kept = CheckpointDir(ckpt).latest()
    assert kept == ckpt / "ckpt-000000005"
    assert json.loads((kept / "server_state.json").read_text())["server_step"] == 5
    assert len(load_file(str(kept / "server_model.safetensors"))) > 0


@pytest.mark.slow
def test_a_full_disk_at_edge_checkpoint_time_is_reported_and_training_goes_on(art, tmp_path, tiny_disk):
    """The edge checkpoints every 2 steps onto a 40 KiB disk (an edge checkpoint of this model is
    about 16 KB): the writes that do not fit fail, are logged, and the edge trains on to the end;
    LATEST names an intact checkpoint that loads, and no temporary is left behind."""
    from splitedge.runtime_edge.ort_backend import EdgeModel

    port = launch.free_port()
    ckpt = tiny_disk("40k") / "ckpt"
    cloud = _cloud(art, port, tmp_path, "--expect-clients", "1", "--exit-when-done")
    edge = _edge(art, port, tmp_path, 0, 1, "--steps", "12", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2")
    try:
        assert edge.wait(timeout=240) == 0, _tail(tmp_path / "edge-0.log")
        assert cloud.wait(timeout=60) == 0, _tail(tmp_path / "cloud.log")
    finally:
        _stop(cloud, edge)
    assert json.loads((tmp_path / "edge-0.json").read_text())["steps"] == 12
    log = (tmp_path / "edge-0.log").read_text()
    assert "No space left on device" in log and "the previous one is intact" in log
    kept = CheckpointDir(ckpt).latest()
    assert kept is not None and not list(ckpt.glob(".tmp-ckpt-*"))
    progress = json.loads((kept / "edge_progress.json").read_text())
    assert 2 <= progress["step"] < 12 and progress["step"] % 2 == 0
    assert EdgeModel(art, checkpoint=kept / "edge_checkpoint").get_parameters()


def test_checkpoint_of_a_step_is_the_one_that_superseded_it(tmp_path):
    from splitedge.fsutil import CheckpointDir

    cd = CheckpointDir(tmp_path / "ck", keep=5)
    write = lambda text: (lambda d: (d / "f").write_text(text))  # noqa: E731
    first = cd.write("000000005", write("periodic"))
    assert cd.for_tag("000000005") == first and cd.for_tag("000000006") is None
    final = cd.write("000000005", write("final"))  # the shutdown checkpoint at the same step
    assert final.name == "ckpt-000000005-0001" and not first.exists()
    assert cd.for_tag("000000005") == final == cd.latest() and (final / "f").read_text() == "final"
    cd.write("000000010", write("later"))
    assert cd.for_tag("000000005") == final, "an older step's checkpoint is still found by its tag"
