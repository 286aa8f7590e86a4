"""``splitedge experiment CONFIG.toml``: a grid of real split-training runs, a table and plots.

Every run of the grid is one real ``cloud-serve`` process and K real ``edge-train``
processes over TCP loopback (:mod:`splitedge.lab.launch`), each client on an emulated access
link (:mod:`splitedge.wire.shaping`). Runs execute one after the other; a run is *done* when
its ``result.json`` exists (written atomically, last), so rerunning the same command
skips finished runs and redoes interrupted or failed ones from scratch.

The package, one concern a module:

* :mod:`.config`: the TOML config (format, validation) into an :class:`Experiment`;
* :mod:`.run`: one run of the grid (exported halves, processes, ``result.json``, resuming);
* :mod:`.report`: ``results.json`` / ``results.md`` tables from the finished runs;
* :mod:`.plots`: the PNGs (matplotlib imported only when they are drawn);
* :mod:`.outputs`: the output directory (its marker) and the files rebuilt from every run;
* :mod:`.command`: the command, :func:`main`.
"""

from __future__ import annotations

from .command import main
from .config import (EXPERIMENT_ONLY, GRID_DEFAULTS, GROUP_ONLY, OPTIMIZERS, RESULT_VERSION, RUN_DEFAULTS, UNLIMITED,
                     CodecSpec, ConfigError, Experiment, Group, RunConfig, load_config, parse_codec)
from .outputs import MARKER, check_out_dir, init_out_dir, write_outputs
from .report import build_report, codec_payload_size, render_markdown, time_to_target, uq_payload_bytes
from .run import eval_points, execute, load_result, run_dir, summarize

__all__ = [
    "EXPERIMENT_ONLY", "GRID_DEFAULTS", "GROUP_ONLY", "MARKER", "OPTIMIZERS", "RESULT_VERSION", "RUN_DEFAULTS",
    "UNLIMITED", "CodecSpec", "ConfigError", "Experiment", "Group", "RunConfig", "build_report", "check_out_dir",
    "codec_payload_size", "eval_points", "execute", "init_out_dir", "load_config", "load_result", "main",
    "parse_codec", "render_markdown", "run_dir", "summarize", "time_to_target", "uq_payload_bytes",
    "write_outputs",
]
