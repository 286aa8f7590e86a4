"""The umbrella command ``splitedge``: it only wires subcommands that live with their owners.

Subcommands are imported lazily, so ``splitedge --help`` and the light commands
never pay for importing torch or onnxruntime.
"""

from __future__ import annotations

import importlib

import click

import splitedge

# name -> "module:attribute" of a click command; owners register their commands here
SUBCOMMANDS: dict[str, str] = {
    "export": "splitedge.export.cli:main",
    "serve": "splitedge.runtime_cloud.cli:main",
    "train": "splitedge.runtime_edge.cli:main",
    "flash": "splitedge.profiles.flash_cli:main",
    "profiles": "splitedge.profiles.cli:profiles",
    "bench": "splitedge.bench:bench",
    "demo": "splitedge.demo:demo",
    "experiment": "splitedge.experiment:main",
    "keys": "splitedge.security:keys",
}


class LazyGroup(click.Group):
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


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(splitedge.__version__, prog_name="splitedge")
def main() -> None:
    """Split learning between edge boards (ONNX Runtime) and a cloud (PyTorch).

    The stand-alone commands export-client, cloud-serve, edge-train and
    flash-board are also available here as export, serve, train and flash.
    """
