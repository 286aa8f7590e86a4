"""The umbrella command ``splitedge``: it only wires subcommands that live with their owners.

Subcommands are imported lazily, so ``splitedge --help`` and the light commands
never pay for importing torch or onnxruntime.
"""

from __future__ import annotations

import click

import splitedge

from .errors import LazyGroup

# name -> "module:attribute" of a click command; owners register their commands here
SUBCOMMANDS: dict[str, str] = {
    "export": "splitedge.export.cli:main",
    "serve": "splitedge.runtime_cloud.cli:main",
    "train": "splitedge.runtime_edge.cli:main",
    "flash": "splitedge.profiles.flash_cli:main",
    "profiles": "splitedge.profiles.cli:profiles",
    "bench": "splitedge.lab.bench:bench",
    "demo": "splitedge.lab.demo:demo",
    "experiment": "splitedge.lab.experiment:main",
    "keys": "splitedge.wire.security:keys",
}


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(splitedge.__version__, prog_name="splitedge")
def main() -> None:
    """Split learning between edge boards (ONNX Runtime) and a cloud (PyTorch).

    The stand-alone commands export-client, cloud-serve, edge-train and
    flash-board are also available here as export, serve, train and flash.
    """


if __name__ == "__main__":
    main()
