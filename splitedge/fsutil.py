"""Crash-safe files: write to a temporary name, fsync, rename; checkpoints as versioned directories.

A checkpoint directory holds ``ckpt-<tag>/`` subdirectories and a ``LATEST`` file
naming the newest complete one. A checkpoint is written into ``.tmp-ckpt-<tag>-<pid>/``,
every file fsynced, the directory renamed into place, and only then is ``LATEST``
replaced (itself written atomically). A crash at any point leaves the previous
checkpoint intact and ``LATEST`` pointing at it; a full disk raises ``OSError`` with
the temporary directory removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class CheckpointDir:
    """Versioned, crash-safe checkpoints in one directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, int(keep))

    def latest(self) -> Path | None:
        try:
            name = (self.root / "LATEST").read_text().strip()
        except FileNotFoundError:
            return None
        path = self.root / name
        if not name.startswith("ckpt-") or "/" in name or not path.is_dir():
            raise OSError(f"{self.root}/LATEST names {name!r}, which is not a checkpoint directory")
        return path

    def write(self, tag: str, writer) -> Path:
        """Calls ``writer(tmpdir)`` to fill a new checkpoint, then commits it atomically.

        ``tag`` should sort like the training progress (e.g. ``f"{step:09d}"``).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        # never replace a checkpoint in place (a crash between removing it and renaming the new one
        # would leave LATEST naming nothing): a second checkpoint with the same tag gets a suffix
        final = self.root / f"ckpt-{tag}"
        n = 0
        while final.exists():
            n += 1
            final = self.root / f"ckpt-{tag}-{n:04d}"
        tmp = self.root / f".tmp-ckpt-{tag}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            writer(tmp)
            for p in tmp.iterdir():
                fsync_file(p)
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(self.root)
            atomic_write_bytes(self.root / "LATEST", (final.name + "\n").encode())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(final)
        return final

    def _prune(self, newest: Path) -> None:
        # tags are zero-padded step counts, so names sort in age order
        ckpts = sorted(p for p in self.root.glob("ckpt-*") if p.is_dir())
        for p in ckpts[: -self.keep]:
            if p != newest:
                shutil.rmtree(p, ignore_errors=True)
