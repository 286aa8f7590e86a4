"""Every command answers --help, documents every option, and turns bad arguments into exit code 2."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import click
import pytest

from helpers import bin_path, run_cli
from splitedge.cli import SUBCOMMANDS

SCRIPTS = {
    "export-client": "splitedge.export.cli:main",
    "cloud-serve": "splitedge.runtime_cloud.cli:main",
    "edge-train": "splitedge.runtime_edge.cli:main",
    "flash-board": "splitedge.profiles.flash_cli:main",
}


def _command(ref: str) -> click.Command:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _all_commands():
    """(argv prefix, click command) for every console script and every splitedge subcommand, recursively."""
    out = [([bin_path(name)], _command(ref)) for name, ref in SCRIPTS.items()]
    stack = [([bin_path("splitedge"), name], _command(ref)) for name, ref in SUBCOMMANDS.items()]
    while stack:
        argv, cmd = stack.pop()
        out.append((argv, cmd))
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)
            for sub in cmd.list_commands(ctx):
                stack.append((argv + [sub], cmd.get_command(ctx, sub)))
    return out


COMMANDS = _all_commands()


@pytest.mark.parametrize("argv,cmd", COMMANDS, ids=[" ".join(a[0].split("/")[-1:] + a[1:]) for a, _ in COMMANDS])
def test_help_documents_every_option(argv, cmd):
    res = run_cli(Path(argv[0]).name, *argv[1:], "--help")
    assert res.returncode == 0, res.stderr
    assert (cmd.help or "").strip().split("\n")[0][:40] in " ".join(res.stdout.split())
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            assert p.help, f"{' '.join(argv)}: option {p.name} has no help text"
            assert any(o in res.stdout for o in p.opts), f"{' '.join(argv)}: {p.opts} missing from --help"


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_unknown_option_exits_2(name):
    res = run_cli(name, "--no-such-option")
    assert res.returncode == 2 and "No such option" in res.stderr


def test_splitedge_lists_its_subcommands():
    res = run_cli("splitedge", "--help")
    assert res.returncode == 0
    for name in SUBCOMMANDS:
        assert name in res.stdout


@pytest.mark.parametrize("argv,needle", [
    (["cloud-serve", "--artifacts", ".", "--bind", "garbage"], "is not a ZeroMQ endpoint"),
    (["cloud-serve", "--artifacts", ".", "--bind", "tcp://127.0.0.1:70000"], "port must lie in 1..65535"),
    (["edge-train", "--connect", "tcp://localhost"], "is not a ZeroMQ endpoint"),
    (["splitedge", "bench", "step", "--model", "nosuch"], "'nosuch' is not one of"),
    (["cloud-serve", "--artifacts", ".", "--device", "tpu"], "'tpu' is not a torch device"),
])
def test_bad_endpoints_and_models_exit_2(argv, needle):
    res = run_cli(*argv)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_check_endpoint_accepts_the_forms_in_use():
    from splitedge.wire.transport import check_endpoint

    for ok in ("tcp://127.0.0.1:5555", "tcp://*:5555", "tcp://[::1]:5555", "tcp://cloud.example.com:80",
               "tcp://eth0:5555", "ipc:///tmp/splitedge.sock", "inproc://x"):
        assert check_endpoint(ok) == ok
    for bad in ("", "127.0.0.1:5555", "tcp://host", "tcp://host:port", "udp://h:1", "tcp://h:0"):
        with pytest.raises(ValueError):
            check_endpoint(bad)


def test_cloud_device_without_cuda_exits_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be shown here")
    res = run_cli("cloud-serve", "--artifacts", ".", "--device", "cuda")
    assert res.returncode == 2 and "CUDA is not available here" in res.stderr and "Traceback" not in res.stderr


def test_every_float_option_refuses_nan_and_infinity():
    """click's FloatRange lets NaN through its range checks (nan < min is False): every float option
    of every command uses FiniteFloat, and every --threads option is bounded."""
    from splitedge.errors import MAX_THREADS, FiniteFloat

    floats = threads = 0
    for argv, cmd in COMMANDS:
        for p in cmd.params:
            where = f"{' '.join(argv)} {p.opts}"
            if isinstance(p.type, (click.types.FloatParamType, click.FloatRange)):
                assert isinstance(p.type, FiniteFloat), f"{where}: a float option that accepts NaN/inf"
                for bad in ("nan", "inf", "-inf"):
                    with pytest.raises(click.BadParameter, match="not a finite number|not in the range"):
                        p.type.convert(bad, p, None)
                floats += 1
            if "--threads" in p.opts:
                assert isinstance(p.type, click.IntRange) and p.type.max == MAX_THREADS, where
                threads += 1
    assert floats >= 15 and threads >= 3, (floats, threads)


@pytest.mark.parametrize("argv", [
    ["cloud-serve", "--artifacts", "x", "--lr", "nan"],
    ["edge-train", "--artifacts", "x", "--connect", "tcp://127.0.0.1:9", "--timeout", "nan"],
    ["cloud-serve", "--artifacts", "x", "--threads", "100000"],
])
def test_nan_and_absurd_thread_counts_exit_2(argv):
    res = run_cli(*argv)
    assert res.returncode == 2, res.stderr
    assert "not a finite number" in res.stderr or "not in the range 0<=x<=256" in res.stderr, res.stderr


@pytest.mark.parametrize("argv,message", [
    (["splitedge", "bench", "codecs", "--json", "/proc/no.json"], "--json /proc/no.json: cannot create files in /proc"),
    (["splitedge", "bench", "step", "--json", "/nonexistent-dir/x.json"], "the directory /nonexistent-dir does not exist"),
    (["splitedge", "keys", "generate", "/proc/splitedge-keys"], "cannot create the key directory /proc/splitedge-keys"),
    (["splitedge", "demo", "--partition", "foo"], "unknown partition scheme 'foo'"),
    (["splitedge", "demo", "--steps", "2", "--epochs", "2"], "give --epochs or --steps, not both"),
    (["splitedge", "demo", "--cut", "99"], "cut 99 out of range: this model has cuts 1..9"),
    (["splitedge", "demo", "--model", "vgg11", "--cut", "layer1"], "unknown cut 'layer1'"),
    (["splitedge", "demo", "--model", "resnet"], "'resnet' is not one of"),
    (["splitedge", "profiles", "show", "/tmp"], "is a directory, not a profile file"),
    (["cloud-serve", "--artifacts", "x", "--codec", "uq", "--codec-param", "bits=3", "--bits", "4"],
     "--bits 4 and --codec-param bits=3 disagree"),
    (["cloud-serve", "--artifacts", "x", "--grad-codec-param", "bits=3", "--grad-bits", "2"],
     "--grad-bits 2 and --grad-codec-param bits=3 disagree"),
    (["cloud-serve", "--artifacts", "x", "--codec-param", "groups=3", "--codec-param", "groups=4"],
     "groups is given twice"),
    (["edge-train", "--artifacts", "x", "--connect", "tcp://127.0.0.1:9", "--bandwidth", "10"], "bad rate '10'"),
])
def test_bad_paths_and_conflicting_options_exit_2_before_any_work(argv, message):
    res = run_cli(*argv)
    assert res.returncode == 2, res.stderr
    assert message in " ".join(res.stderr.split()), res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("argv,message", [
    (["splitedge", "bench", "codecs", "--codecs", "uq", "--shapes", "100000x1000x100x100"], "out of memory"),
    (["export-client", "--model", "resnet18", "--cut", "3", "--num-classes", "10000000000", "--out", "{tmp}/a"],
     "out of memory building resnet18"),
])
def test_absurd_sizes_are_a_message_not_a_memory_error_traceback(argv, message, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    res = subprocess.run([bin_path(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written"


@pytest.mark.parametrize("argv,option", [
    (["cloud-serve", "--artifacts", "{art}", "--max-message-mb", "1e30"], "--max-message-mb"),
    (["edge-train", "--artifacts", "{art}", "--steps", str(2**53)], "--steps"),
    (["edge-train", "--artifacts", "{art}", "--client-id", str(2**60), "--num-clients", str(2**61)], "--client-id"),
])
def test_numbers_beyond_what_the_program_can_use_exit_2_naming_the_option(argv, option, exported):
    """D4: --max-message-mb 1e30 was an OverflowError traceback; --steps or --client-id beyond the
    protocol's integers were refused by the cloud after connecting, not by the option."""
    art = exported("resnet18", 3, input_shape=(1, 28, 28), lr=0.02)
    argv = [a.replace("{art}", str(art)) for a in argv]
    res = run_cli(*argv, "--connect" if argv[0] == "edge-train" else "--bind", "tcp://127.0.0.1:9")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert option in res.stderr and "range" in res.stderr, res.stderr[-2000:]
