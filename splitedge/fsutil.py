"""Crash-safe files: write to a temporary name, fsync, rename; checkpoints as versioned directories.

A checkpoint directory holds ``ckpt-<tag>/`` subdirectories and a ``LATEST`` file
naming the newest complete one. A checkpoint is written into ``.tmp-ckpt-<tag>-<pid>/``,
every file fsynced, the directory renamed into place, and only then is ``LATEST``
replaced (itself written atomically). A crash at any point leaves the previous
checkpoint intact and ``LATEST`` pointing at it; a full disk raises ``OSError`` with
the temporary directory removed. A second checkpoint with a tag already present is
committed beside the first (``ckpt-<tag>-0001``), never over it; once ``LATEST`` names
it, the first is deleted. Only after that commit are older checkpoints pruned, by tag:
the newest ``keep`` tags stay.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

_CKPT_NAME = re.compile(r"^ckpt-(.+?)(?:-\d{4})?$")


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


def _why(e: OSError) -> str:
    if isinstance(e, FileExistsError):  # mkdir(exist_ok=True) of a path that is a file
        return "it exists and is not a directory"
    return e.strerror or str(e)


def probe_write(directory: str | os.PathLike[str]) -> None:
    """Creates and removes a file in the existing ``directory``; OSError if that fails. Trying is the only
    reliable test: permission bits say yes to root, and nothing about /proc or read-only mounts."""
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
    os.close(fd)
    os.unlink(probe)


def check_writable_dir(path: str | os.PathLike[str]) -> None:
    """Creates directory ``path`` (and its parents) if missing and writes and removes a probe file in
    it; OSError naming the directory if that fails (checked by trying: permission bits say nothing to root)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the directory {str(path)!r}: {_why(e)}") from None
    try:
        probe_write(path)
    except OSError as e:
        raise OSError(e.errno, f"cannot write in the directory {str(path)!r}: {_why(e)}") from None


def check_writable_file(path: str | os.PathLike[str]) -> None:
    """Makes sure file ``path`` can be written later (its directory is created if missing): opens it for
    appending, which changes nothing in an existing file, and removes it again if it did not exist.
    OSError naming the file otherwise."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the directory {str(path.parent)!r}: {_why(e)}") from None
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"cannot write {str(path)!r}: {_why(e)}") from None
    if not existed:
        try:
            path.unlink()
        except OSError:
            pass


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

    def for_tag(self, tag: str) -> Path | None:
        """The checkpoint of ``tag`` (e.g. ``f"{step:09d}"``): ``ckpt-TAG``, or the later ``ckpt-TAG-NNNN``
        that superseded it; None if there is none."""
        found = sorted(p for p in self.root.glob(f"ckpt-{tag}*") if p.is_dir() and self._tag_of(p.name) == tag)
        return found[-1] if found else None

    def write(self, tag: str, writer) -> Path:
        """Calls ``writer(tmpdir)`` to fill a new checkpoint, then commits it atomically.

        ``tag`` should sort like the training progress (e.g. ``f"{step:09d}"``) and not end in ``-NNNN``.
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
        self._prune(final, tag)
        return final

    @staticmethod
    def _tag_of(name: str) -> str:
        """The tag of checkpoint directory ``name``: ``ckpt-TAG`` or ``ckpt-TAG-NNNN`` (a later one of that tag)."""
        m = _CKPT_NAME.match(name)
        return m.group(1) if m else name

    def _prune(self, newest: Path, tag: str) -> None:
        """Runs once ``newest`` is committed and LATEST names it. Earlier checkpoints of the same tag
        are superseded by it (e.g. the final checkpoint at shutdown, at the step of the last periodic
        one): they are deleted, so that they take no --keep slot. Then the newest ``keep`` tags are
        kept, older ones deleted. Nothing deleted here is what LATEST names."""
        ckpts = [p for p in self.root.glob("ckpt-*") if p.is_dir() and p != newest]
        for p in ckpts:
            if self._tag_of(p.name) == tag:
                shutil.rmtree(p, ignore_errors=True)
        # tags are zero-padded step counts, so they sort in age order
        tags = sorted({self._tag_of(p.name) for p in ckpts} | {tag})
        old = set(tags[: -self.keep])
        old.discard(tag)
        for p in ckpts:
            if self._tag_of(p.name) in old:
                shutil.rmtree(p, ignore_errors=True)
