"""Errors shared by every command (a small, torch-free module: the edge bundle carries it)."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A request that cannot be carried out as given (bad input; nothing was done): exit code 2.

    Shared by every command of the distribution, so that bad input means exit code 2 everywhere.
    """

    exit_code = 2
