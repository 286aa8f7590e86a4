"""Errors shared by every command (a small, torch-free module: the edge bundle carries it)."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A request that cannot be carried out as given (bad input; nothing was done): exit code 2.

    Shared by every command of the distribution, so that bad input means exit code 2 everywhere.
    """

    exit_code = 2


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and infinities (click's range checks let NaN through)."""

    name = "float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if rv != rv or rv in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


#: upper bound of every --threads option: far above any board or server, far below what
#: makes ONNX Runtime or torch hang or crash while creating threads
MAX_THREADS = 256


def check_writable_file(path, option: str) -> None:
    """Raises UserError unless ``path`` can be created or replaced as a file (checked before long work)."""
    import os
    from pathlib import Path

    from .fsutil import probe_write

    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} {path}: is a directory, expected a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: the directory {parent} does not exist")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{option} {path}: not writable")
    try:
        probe_write(parent)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot create files in {parent} ({e.strerror})") from None


def writable_file_option(ctx, param, value):
    """click callback: checks an output file option at parse time (before any work is done)."""
    if value is not None:
        check_writable_file(value, param.opts[0])
    return value
