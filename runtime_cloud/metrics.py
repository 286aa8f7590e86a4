"""The cloud's metrics: one JSON line per event (``cloud-serve --metrics``), also handed to the observers."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any
import contextlib

log = logging.getLogger("cloud-serve")


class Metrics:
    """JSON lines; a write failure (e.g. a full disk) is reported once and never stops training.

    Every event also goes to the ``observers`` (the status page, TensorBoard), as the dict written.
    """

    def __init__(self, path: str | None):
        self.path = path
        self._f = None
        self._failed = False
        self.observers: list[Any] = []
        if path:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._f = open(path, "a", buffering=1)  # noqa: SIM115 - held open for the run, closed by close()
            except OSError as e:
                raise OSError(e.errno, f"cannot write the metrics file {path}: {e.strerror or e}") from None

    def write(self, event: str, **fields: Any) -> None:
        to_file = self._f is not None and not self._failed
        if not to_file and not self.observers:
            return
        rec = {"event": event, "t": round(time.time(), 4), **fields}
        for observe in self.observers:
            observe(rec)
        if not to_file:
            return
        assert self._f is not None  # to_file: a metrics file is open
        try:
            self._f.write(json.dumps(rec, default=float) + "\n")
        except OSError as e:
            self._failed = True
            log.error("metrics: cannot write %s (%s); metrics are off from here, training goes on", self.path, e)

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
