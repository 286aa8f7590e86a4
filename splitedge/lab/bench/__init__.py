"""``splitedge bench``: benchmarks that print ratios measured in the same run."""

from __future__ import annotations

import click

from ...errors import LazyGroup

BENCHMARKS: dict[str, str] = {
    "codecs": "splitedge.lab.bench.codecs_speed:main",
    "step": "splitedge.lab.bench.step:main",
    "load": "splitedge.lab.bench.load:main",
    "sgq-floor": "splitedge.lab.bench.sgq_floor:main",
    "fp16-cast": "splitedge.lab.bench.fp16_cast:main",
}


@click.group(cls=LazyGroup, lazy=BENCHMARKS)
def bench() -> None:
    """Benchmarks. Every figure is a ratio to a reference measured in the same process."""
