"""An edge checkpoint and ``--resume``: what a checkpoint records, and the checks that a run may
continue it (the same artifacts, client id, batch size and shard plan; a position inside the epoch;
finite weights).

A checkpoint directory ``ckpt-<step>/`` holds ``edge_checkpoint`` (the backend's own checkpoint)
and ``edge_progress.json``: the :class:`Progress` counters plus ``run``, the identity of the run
that wrote it (:func:`run_identity`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..export import manifest as mf
from ..fsutil import MAX_INT, BadFile, CheckpointDir, CheckpointDirError, is_int, load_json_object
from .errors import EdgeError, EdgeInputError

log = logging.getLogger("edge-train")


@dataclass
class Progress:
    """What an edge checkpoint records besides the backend's checkpoint itself."""

    step: int = 0  # train steps completed (== the last step id the cloud acknowledged)
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    bytes_sent: int = 0
    bytes_received: int = 0
    samples: int = 0
    evals: list[dict] = field(default_factory=list)


class ResumeMismatch(EdgeError):
    """--resume with arguments or artifacts other than those the checkpoint was written with."""


_RESUME_WHAT = {
    "model": "--artifacts (model)", "cut": "--artifacts (cut)", "artifacts": "--artifacts (files)",
    "client_id": "--client-id", "batch_size": "--batch-size", "data": "--data", "partition": "--partition",
    "seed": "--seed", "num_clients": "--num-clients",
}
_PLAN = "partition_plan"  # a digest of the shard plan (data contents, --partition, --seed, --num-clients)
_PLAN_INPUTS = ("data", "partition", "seed", "num_clients")  # named when the plan differs, not compared alone
RUN_KEYS = (*_RESUME_WHAT, _PLAN)  # what every checkpoint's ``run`` holds


def artifacts_identity(m: mf.Manifest) -> dict[str, Any]:
    files = hashlib.sha256(json.dumps(m.files, sort_keys=True).encode()).hexdigest()[:32]
    return {"model": m.model, "cut": m.cut, "artifacts": files}


def run_identity(cfg: Any, manifest: mf.Manifest, partition_plan: str) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it (see :func:`check_resume`)."""
    return {**artifacts_identity(manifest), "client_id": cfg.client_id, "batch_size": cfg.batch_size,
            "data": cfg.data, "partition": cfg.partition, "seed": cfg.seed, "num_clients": cfg.num_clients,
            _PLAN: partition_plan}


def check_resume(saved: dict[str, Any], now: dict[str, Any], where: Any) -> None:
    """ResumeMismatch naming each setting in which ``now`` differs from the checkpoint's run ``saved``.
    ``now`` may be a part of the identity (the artifacts alone, checked before the data is loaded).

    The shard plan decides whether the data settings match (``--data fashion-mnist`` and the same
    directory spelled out are one plan); when it differs, the settings behind it are named."""
    def shown(k: str) -> str:
        return "--artifacts (their files differ)" if k == "artifacts" else \
            f"{_RESUME_WHAT[k]} ({json.dumps(saved[k])} there, {json.dumps(now[k])} here)"

    diff = [shown(k) for k in now if k in _RESUME_WHAT and k not in _PLAN_INPUTS and saved[k] != now[k]]
    if _PLAN in now and saved[_PLAN] != now[_PLAN]:
        named = [shown(k) for k in _PLAN_INPUTS if saved[k] != now[k]]
        diff += named or ["data: the same --data, --partition, --seed and --num-clients split other samples (the "
                          "data set's files changed)"]
    if diff:
        raise ResumeMismatch(f"--resume: the checkpoint in {where} was written by a run with a different "
                             f"{'; '.join(diff)}; resume with the same arguments, or start fresh with another "
                             "--checkpoint-dir")


def load_progress(path: Path) -> tuple[Progress, dict[str, Any]]:
    """The checkpoint's Progress and the identity of the run that wrote it. EdgeInputError naming the
    file and the field unless each has its type and range."""
    try:
        raw = load_json_object(path)
    except BadFile as e:
        raise EdgeInputError(f"--resume: {e} (a damaged checkpoint directory)") from None

    def bad(why: str) -> EdgeInputError:
        return EdgeInputError(f"--resume: {path}: {why} (a damaged checkpoint directory)")

    counts = {}
    for f in fields(Progress):
        if f.name == "evals" or f.name not in raw:
            continue
        v = raw[f.name]
        if not is_int(v):
            raise bad(f"{f.name} is {json.dumps(v)[:40]}, not an integer in 0..{MAX_INT}")
        counts[f.name] = v
    evals = raw.get("evals", [])
    if not (isinstance(evals, list) and all(isinstance(e, dict) for e in evals)):
        raise bad("evals is not a list of objects")
    run = raw.get("run")
    if not (isinstance(run, dict) and all(v is None or isinstance(v, (str, int, float)) for v in run.values())):
        raise bad("run is not an object of plain values")
    missing = [k for k in RUN_KEYS if k not in run]
    if missing:
        raise bad(f"run lacks {', '.join(missing)}")
    return Progress(**counts, evals=list(evals)), run


@dataclass
class ResumePoint:
    """Where a resumed run starts: the checkpoint directory (None: none written yet), its progress and run."""

    latest: Path | None = None
    progress: Progress = field(default_factory=Progress)
    run: dict[str, Any] | None = None

    @property
    def backend_checkpoint(self) -> Path | None:
        return self.latest / "edge_checkpoint" if self.latest is not None else None


def find(ckpt: CheckpointDir | None, artifacts: str) -> ResumePoint:
    """The checkpoint --resume continues, checked against the artifacts before anything is loaded."""
    if ckpt is None:
        raise EdgeInputError("--resume needs --checkpoint-dir")
    if not ckpt.root.is_dir():
        raise EdgeInputError(
            f"--resume: --checkpoint-dir {ckpt.root} does not exist, so no run wrote there (a mistyped "
            "path?): give the directory of the run to continue, or leave out --resume to start a new run")
    try:
        latest = ckpt.latest()
    except CheckpointDirError as e:
        raise EdgeInputError(f"--resume: {e}") from None
    if latest is None:
        log.warning("--resume: %s holds no checkpoint yet (its run stopped before the first one): the edge "
                    "starts from its initial weights", ckpt.root)
        return ResumePoint()
    progress, run = load_progress(latest / "edge_progress.json")
    check_resume(run, artifacts_identity(mf.load(artifacts)), latest)  # the checkpoint's own artifacts
    log.info("resuming from %s at step %d (epoch %d, batch %d)", latest, progress.step, progress.epoch,
             progress.batch)
    return ResumePoint(latest, progress, run)


def damaged(ckpt: CheckpointDir, latest: Path, error: Exception) -> EdgeInputError:
    """The error for a backend checkpoint that does not load: it names an earlier one to go back to."""
    earlier = sorted((p.name for p in ckpt.root.glob("ckpt-*") if p.is_dir() and p != latest), reverse=True)
    hint = (f"resume from an earlier one by writing its name ({earlier[0]}) into {ckpt.root / 'LATEST'}, "
            if earlier else "")
    return EdgeInputError(f"--resume: {error}: the checkpoint is damaged; {hint}or start fresh with an empty "
                          "--checkpoint-dir")


def check_position(point: ResumePoint, batches_per_epoch: int) -> None:
    if point.latest is not None and point.progress.batch >= batches_per_epoch:
        raise EdgeInputError(f"--resume: {point.latest / 'edge_progress.json'}: batch {point.progress.batch} is "
                             f"beyond the {batches_per_epoch} batches of an epoch (a damaged checkpoint directory)")
