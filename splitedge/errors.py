"""Errors and click helpers shared by every command (a small, torch-free module: the edge bundle carries it)."""

from __future__ import annotations

import importlib

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


class InputShape(click.ParamType):
    """``C,H,W`` (or ``CxHxW``) of one input sample: three positive integers."""

    name = "C,H,W"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).replace("x", ",").split(",")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            self.fail(f"{value!r} is not three integers C,H,W (e.g. 1,28,28)", param, ctx)
        if len(shape) != 3 or min(shape) < 1:
            self.fail(f"{value!r} must be three positive integers C,H,W (e.g. 1,28,28)", param, ctx)
        return shape


class Checked(click.ParamType):
    """A string option checked at parse time by ``check`` (which raises ValueError naming the problem)."""

    def __init__(self, check, name: str):
        self.check, self.name = check, name

    def convert(self, value, param, ctx):
        try:
            self.check(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return str(value)


class LazyGroup(click.Group):
    """A click group whose subcommands, given as ``name -> "module:attribute"``, are imported only when used."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)
