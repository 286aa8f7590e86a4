"""Crash-safe files: write to a temporary name, fsync, rename; checkpoints as versioned directories.

A checkpoint directory holds ``ckpt-<tag>/`` subdirectories and a ``LATEST`` file
naming the newest complete one. A checkpoint is written into a new ``.tmp-ckpt-<tag>-<pid>-*/``,
every file fsynced, the directory renamed into place, and only then is ``LATEST``
replaced (itself written atomically). A crash at any point leaves the previous
checkpoint intact and ``LATEST`` pointing at it; a full disk raises ``OSError`` with
the temporary directory removed. A second checkpoint with a tag already present is
committed beside the first (``ckpt-<tag>-0001``), never over it; once ``LATEST`` names
it, the first is deleted. Only after that commit are older checkpoints pruned, by tag:
the newest ``keep`` tags stay.

Only checkpoints of this process's run are ever deleted: those it wrote, and the one it resumed
from (:meth:`CheckpointDir.adopt`). Anything else in the directory -- an earlier run's checkpoints
that no readable ``LATEST`` names, foreign files -- is left alone. A directory that holds
checkpoints but no readable ``LATEST`` makes :meth:`CheckpointDir.latest` raise
:class:`CheckpointDirError` with a repair hint, rather than look like an empty one.

:func:`load_json` reads the small JSON files the programs keep (manifests, checkpoint state,
progress) with a bounded size and nesting depth and finite numbers only: a hostile or damaged
file is a :class:`BadFile` naming it, never a RecursionError or MemoryError.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

_CKPT_NAME = re.compile(r"^ckpt-(.+?)(?:-\d{4})?$")

MAX_JSON_DEPTH = 32  # nesting levels of a JSON file the programs read (theirs need 5 at most)
MAX_JSON_BYTES = 16 << 20  # size of such a file
MAX_INT = 2**53 - 1  # the largest step or byte count a file (or a protocol header) may hold


class BadFile(ValueError):
    """A local file that is missing, unreadable, or does not hold what it should; the message names it."""

    def __init__(self, path: str | os.PathLike[str], why: str):
        super().__init__(f"{path}: {why}")
        self.path = Path(path)
        self.why = why


# a JSON string (escapes included) or one bracket: enough to measure the nesting without parsing
_JSON_NESTING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON ``text`` nests at most ``limit`` levels of arrays and objects (checked before
    parsing it: a deeply nested document makes json.loads raise RecursionError, or worse)."""
    depth = 0
    for m in _JSON_NESTING.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return False
        elif c in "]}":
            depth -= 1
    return True


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:24]} is too large for a double")
    return v


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(path: str | os.PathLike[str], *, max_depth: int = MAX_JSON_DEPTH,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in file ``path``: at most ``max_bytes`` long and ``max_depth`` levels deep, numbers
    finite (no NaN, Infinity or 1e999). :class:`BadFile` naming the file and the problem otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise BadFile(path, "missing") from None
    except OSError as e:
        raise BadFile(path, f"unreadable ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise BadFile(path, f"larger than {max_bytes} bytes: not a file this program wrote")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFile(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not json_depth_ok(text, max_depth):
        raise BadFile(path, f"JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit integer, NaN, 1e999
        raise BadFile(path, f"not valid JSON ({str(e)[:200]})") from None


def load_json_object(path: str | os.PathLike[str], **kw: Any) -> dict:
    """:func:`load_json` of a file that must hold a JSON object."""
    obj = load_json(path, **kw)
    if not isinstance(obj, dict):
        raise BadFile(path, f"holds a JSON {type(obj).__name__}, not an object")
    return obj


def is_int(v: Any, lo: int = 0, hi: int = MAX_INT) -> bool:
    """Whether ``v`` is an int (not a bool) within lo..hi."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


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
        with contextlib.suppress(OSError):
            path.unlink()


class CheckpointDirError(OSError):
    """A checkpoint directory whose ``LATEST`` cannot be trusted; the message says how to repair it."""


class CheckpointDir:
    """Versioned, crash-safe checkpoints in one directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, int(keep))
        self._ours: set[str] = set()  # names of the checkpoints this run may delete (written or adopted)

    def checkpoints(self) -> list[str]:
        """Names of the ``ckpt-*`` directories here, oldest tag first."""
        try:
            return sorted(p.name for p in self.root.glob("ckpt-*") if p.is_dir())
        except OSError:
            return []

    def _broken(self, problem: str) -> CheckpointDirError:
        held = self.checkpoints()
        latest = self.root / "LATEST"
        if held:
            hint = (f"it holds {', '.join(held[-3:])}{' and earlier ones' if len(held) > 3 else ''}: write the name "
                    f"of the checkpoint to continue from into {latest} (e.g. echo {held[-1]} > {latest}) and "
                    "start with --resume again")
        else:
            hint = f"it holds no checkpoint: remove {latest} to start from the beginning with --resume"
        return CheckpointDirError(f"{problem}; nothing was changed. To repair {self.root}: {hint}, or start without "
                                  "--resume with another --checkpoint-dir")

    def latest(self) -> Path | None:
        """The checkpoint ``LATEST`` names; None if there is no ``LATEST`` and no checkpoint (a run that
        stopped before its first one). :class:`CheckpointDirError` if ``LATEST`` is unreadable, names
        no checkpoint here, or is missing while checkpoints are present (never read as "no checkpoint":
        a run that starts over there would rotate them away)."""
        latest = self.root / "LATEST"
        try:
            with open(latest, "rb") as f:
                raw = f.read(257)
        except FileNotFoundError:
            if self.checkpoints():
                raise self._broken(f"{latest} is missing but {self.root} holds checkpoints") from None
            return None
        except OSError as e:
            raise self._broken(f"{latest} cannot be read ({e.strerror or e})") from None
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            name = repr(raw[:64])
        path = self.root / name
        if len(raw) > 256 or not _CKPT_NAME.match(name) or "/" in name or not path.is_dir():
            raise self._broken(f"{latest} names {name[:80]!r}, which is not a checkpoint directory")
        return path

    def adopt(self, path: str | os.PathLike[str]) -> None:
        """Counts checkpoint ``path`` (the one this run resumed from) as this run's: rotation may delete it
        once newer ones are committed. Other checkpoints found in the directory are never deleted."""
        self._ours.add(Path(path).name)

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
        # a new temporary name, never one found here (it is not this run's to delete)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-ckpt-{tag}-{os.getpid()}-", dir=self.root))
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
        self._ours.add(final.name)
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
        kept, older ones deleted. Nothing deleted here is what LATEST names, nor a checkpoint this run
        did not write or adopt."""
        ckpts = [p for p in self.root.glob("ckpt-*") if p.is_dir() and p != newest and p.name in self._ours]
        for p in ckpts:
            if self._tag_of(p.name) == tag:
                shutil.rmtree(p, ignore_errors=True)
                self._ours.discard(p.name)
        # tags are zero-padded step counts, so they sort in age order
        tags = sorted({self._tag_of(p.name) for p in ckpts} | {tag})
        old = set(tags[: -self.keep])
        old.discard(tag)
        for p in ckpts:
            if self._tag_of(p.name) in old:
                shutil.rmtree(p, ignore_errors=True)
                self._ours.discard(p.name)
