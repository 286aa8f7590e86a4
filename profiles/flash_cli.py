"""``flash-board``: put the edge runtime, the artifacts and a device profile on a board over ssh, and prove it runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from ..errors import FiniteFloat, UserError

from .cli import ProfileParam




class SshHost(click.ParamType):
    """``USER@HOST`` or ``HOST``; never something ssh would read as an option."""

    name = "USER@HOST"

    def convert(self, value, param, ctx):
        v = str(value)
        user, at, host = v.rpartition("@")
        if (not host or host.startswith("-") or (at and not user) or user.startswith("-")
                or not re.fullmatch(r"[A-Za-z0-9._:\[\]%-]+", host) or re.search(r"[\s'\"`$;&|<>\\]", v)):
            self.fail(f"{v!r} is not USER@HOST or HOST (e.g. jetson@192.168.1.20)", param, ctx)
        if host.count(":") == 1 and host.rsplit(":", 1)[1].isdigit():
            self.fail(f"{v!r}: give the ssh port with --port {host.rsplit(':', 1)[1]}, not as HOST:PORT", param, ctx)
        return v


class RemoteDir(click.ParamType):
    name = "PATH"

    def convert(self, value, param, ctx):
        v = str(value)
        if not v.strip() or "\n" in v or "\0" in v or v.strip("/") == "" or ".." in Path(v).parts:
            self.fail(f"{v!r} is not a usable directory (relative paths are under the remote user's home; "
                      "'/' and '..' are not allowed)", param, ctx)
        return v.rstrip("/")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--profile", "-p", required=True, type=ProfileParam(),
              help="Device profile: a shipped name (splitedge profiles list) or a profile file.")
@click.option("--artifacts", "-a", required=True, type=click.Path(file_okay=False),
              help="Artifact directory written by export-client (only manifest.json and client/ are sent).")
@click.option("--host", type=SshHost(), default=None, help="The board, as ssh reaches it (required unless --bundle-only).")
@click.option("--port", type=click.IntRange(1, 65535), default=22, show_default=True, help="The board's ssh port.")
@click.option("--identity", "-i", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Private key for ssh (only this key is offered) [default: ssh's own keys and agent].")
@click.option("--known-hosts", type=click.Path(dir_okay=False), default=None,
              help="known_hosts file to use [default: ssh's]. New host keys are accepted and recorded, changed "
                   "ones refused.")
@click.option("--remote-dir", type=RemoteDir(), default="splitedge", show_default=True,
              help="Where on the board (relative: under the remote user's home). Releases go to "
                   "DIR/releases/<bundle-id>, DIR/current points at the good one.")
@click.option("--remote-python", default="python3", show_default=True,
              help="The board's Python that runs the edge runtime (the bundle's requirements must be installed "
                   "for it, or pass --install-deps).")
@click.option("--install-deps", is_flag=True,
              help="Run REMOTE_PYTHON -m pip install -r requirements.txt on the board before the self-test.")
@click.option("--copy", "copy_with", type=click.Choice(["auto", "scp", "rsync"]), default="auto", show_default=True,
              help="How to copy the bundle: auto uses rsync over ssh when both ends have rsync, else scp.")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True,
              help="Good releases kept on the board (older ones are deleted after a successful flash).")
@click.option("--connect-timeout", type=click.IntRange(min=1), default=10, show_default=True,
              help="Seconds ssh waits for the board to answer.")
@click.option("--selftest-timeout", type=FiniteFloat(min=1), default=900.0, show_default=True,
              help="Seconds the remote self-test may take (TensorRT engine builds are slow the first time).")
@click.option("--ssh-option", "-o", "ssh_options", multiple=True, metavar="KEY=VALUE",
              help="Extra ssh -o option (repeatable), e.g. -o ProxyJump=gateway.")
@click.option("--dry-run", is_flag=True, help="Print the plan and every command; touch neither the board nor the disk.")
@click.option("--bundle-only", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the bundle (tar.gz) to FILE and stop; no ssh.")
def main(profile, artifacts, host, port, identity, known_hosts, remote_dir, remote_python, install_deps, copy_with,
         keep, connect_timeout, selftest_timeout, ssh_options, dry_run, bundle_only):
    """Flash the edge runtime to a board and self-test it there.

    \b
    Builds one self-contained bundle (the torch-free edge runtime and codecs, the
    artifacts' client half, the profile, pinned requirements and a run.sh launcher),
    checks the board over ssh (never prompts: key authentication only), copies the
    bundle (rsync or scp), unpacks it into REMOTE_DIR/releases/<bundle-id>, runs the
    bundle's self-test there (artifacts loaded with the profile's providers, one
    forward, one train step, one encoded payload; prints what ran where), and only
    then marks it GOOD and points REMOTE_DIR/current at it. A failed flash leaves
    current where it was. Exit codes: 0 flashed, 1 flash failed, 2 bad arguments.

    \b
    Examples:
      flash-board --profile jetson-nano --artifacts artifacts/resnet18-cut3 --host jetson@192.168.1.20
      flash-board --profile cpu -a artifacts/resnet18-cut3 --host pi@rpi4 --remote-python python3.11 --dry-run
      flash-board --profile atlas-200dk -a artifacts/resnet18-cut3 --bundle-only atlas.tar.gz
    """
    from . import bundle as B
    from .flash import Flasher, FlashRequest, Target

    if bundle_only:
        if Path(bundle_only).exists() and not B.is_bundle(bundle_only):
            raise UserError(f"--bundle-only {bundle_only} exists and is not a splitedge bundle; refusing to "
                            "overwrite it (remove it or choose another file name)")
        try:
            info = B.build(profile, artifacts, bundle_only)
        except (B.BundleError, OSError) as e:
            raise UserError(str(e)) from None
        click.echo(f"wrote {bundle_only}: bundle {info.id}, {info.files} files, {info.size} bytes, profile "
                   f"{profile.name}; on the board: tar -xzf {Path(bundle_only).name} && ./run.sh selftest")
        return
    if host is None:
        raise click.UsageError("give --host USER@HOST (or --bundle-only FILE to only write the bundle)")
    for opt in ssh_options:
        if "=" not in opt or opt.startswith("-") or "\n" in opt:
            raise click.BadParameter(f"{opt!r} is not KEY=VALUE", param_hint="--ssh-option")
    req = FlashRequest(
        profile=profile, artifacts=Path(artifacts),
        target=Target(host=host, port=port, identity=identity, known_hosts=known_hosts,
                      connect_timeout=connect_timeout, ssh_options=tuple(ssh_options)),
        remote_dir=remote_dir, remote_python=remote_python, install_deps=install_deps, copy=copy_with, keep=keep,
        selftest_timeout_s=selftest_timeout,
    )
    try:
        result = Flasher(req, out=lambda s: click.echo(s), dry_run=dry_run).run()
    except B.BundleError as e:
        raise UserError(str(e)) from None
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
