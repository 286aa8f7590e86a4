"""``splitedge bench``: benchmarks that print ratios measured in the same run."""

from __future__ import annotations

import click

from .cli import LazyGroup

BENCHMARKS: dict[str, str] = {
    "codecs": "splitedge.codecs.bench:main",
    "step": "splitedge.runtime_edge.bench:main",
    "load": "splitedge.runtime_cloud.bench_load:main",
}


@click.group(cls=LazyGroup, lazy=BENCHMARKS)
def bench() -> None:
    """Benchmarks. Every figure is a ratio to a reference measured in the same process."""
