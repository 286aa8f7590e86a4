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
