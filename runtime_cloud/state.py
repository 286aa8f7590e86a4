"""The cloud's checkpoints and ``--resume``: the server model, the server step and every client's progress.

:class:`Checkpointing` is a part of :class:`~splitedge.runtime_cloud.server.CloudServer` (which
keeps message handling); it writes ``server_state.json`` next to the model's weights in each
checkpoint of a :class:`~splitedge.fsutil.CheckpointDir`, and reads them back on resume.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fsutil import MAX_INT, atomic_write_json, is_int
from .trainer import CorruptFile, ServerModel, read_json_object

if TYPE_CHECKING:
    from ..export import manifest as mf
    from ..fsutil import CheckpointDir
    from .metrics import Metrics
    from .server import ServeConfig, Session

log = logging.getLogger("cloud-serve")


class Checkpointing:
    """Checkpoint and resume of a CloudServer (its ``ckpt``, ``model``, ``progress``, ``server_step``)."""

    # set by CloudServer.__init__
    cfg: ServeConfig
    manifest: mf.Manifest
    model: ServerModel
    ckpt: CheckpointDir | None
    metrics: Metrics
    session_id: str
    server_step: int
    _last_ckpt_step: int
    progress: dict[int, dict[str, Any]]
    by_client: dict[int, Session]

    @staticmethod
    def _progress_entry(s: Session, *, done: bool) -> dict[str, Any]:
        """What the checkpoint keeps of a client: its last applied step, whether it finished, its key."""
        e: dict[str, Any] = {"last_step": s.last_step, "done": done}
        if s.key is not None:
            e["key"] = s.key
        return e

    if TYPE_CHECKING:
        def codec_settings(self) -> dict[str, Any]: ...

    def _checkpoint(self) -> None:
        assert self.ckpt is not None
        for s in self.by_client.values():
            self.progress[s.client_id] = self._progress_entry(s, done=s.done)

        def write(d: Path) -> None:
            self.model.save(d)
            atomic_write_json(d / "server_state.json", {
                "format_version": 1, "server_step": self.server_step, "model": self.manifest.model,
                "cut": self.manifest.cut, "clients": {str(k): v for k, v in self.progress.items()},
                **self.codec_settings(),
            })

        try:
            path = self.ckpt.write(f"{self.server_step:09d}", write)
        except OSError as e:
            log.error("checkpoint at server step %d failed: %s; the previous checkpoint is intact", self.server_step, e)
            self.metrics.write("checkpoint_failed", server_step=self.server_step, error=str(e))
            self._last_ckpt_step = self.server_step  # retry at the next interval, not every message
            raise
        self._last_ckpt_step = self.server_step
        self.metrics.write("checkpoint", server_step=self.server_step, path=str(path))

    def _resume(self) -> None:
        if self.ckpt is None:
            raise ValueError("--resume needs --checkpoint-dir")
        try:
            path = self.ckpt.latest()
        except OSError as e:  # CheckpointDirError: its message says how to repair the directory
            raise OSError(f"--resume: {e}") from None
        if path is None:
            log.info("--resume: no checkpoint in %s yet; starting fresh", self.cfg.checkpoint_dir)
            return
        try:
            server_step, model, cut, progress = _read_server_state(path / "server_state.json")
            if (model, cut) != (self.manifest.model, self.manifest.cut):
                raise ValueError(f"checkpoint {path} is for {model} cut {cut}, not these artifacts")
            self.model.load(path)
            saved = self.model.hparams
            self.model.set_hparams({k: getattr(self.cfg, k) for k in self.cfg.hparams_given})
        except CorruptFile as e:
            raise CorruptFile(e.path, f"{e.why}. The checkpoint {path.name} is damaged: "
                                      f"{self._resume_advice(path)}") from None
        self.ckpt.adopt(path)  # this run continues it: rotation may delete it once newer ones exist
        self.server_step = server_step
        self._last_ckpt_step = self.server_step
        self.progress = progress
        log.info("resumed from %s: server step %d, clients %s", path, self.server_step,
                 {k: v["last_step"] for k, v in self.progress.items()})
        now = self.model.hparams
        changed = {k: (saved[k], now[k]) for k in now if now[k] != saved.get(k)}
        log.info("server optimizer %s: %s%s", self.cfg.optimizer, ", ".join(f"{k} {v:g}" for k, v in now.items()),
                 " (" + ", ".join(f"--{k.replace('_', '-')} {b:g} replaces the checkpoint's {a:g}"
                                  for k, (a, b) in changed.items()) + ")" if changed else
                 " (the checkpoint's; --lr, --momentum or --weight-decay given on the command line replace them)")
        # steps a previous run applied after this checkpoint are gone with it: say so, so that the
        # metrics can be read exactly (a step in flight at a crash may be applied again here)
        self.metrics.write("resume", session=self.session_id, checkpoint=str(path), server_step=self.server_step,
                           clients={str(k): v["last_step"] for k, v in self.progress.items()})

    def _resume_advice(self, damaged: Path) -> str:
        """What to do about a damaged checkpoint: resume from the one before it (named, by hand: never
        silently, as its clients' progress is older), or start without --resume."""
        assert self.ckpt is not None
        root = self.ckpt.root
        earlier = sorted(p.name for p in root.glob("ckpt-*") if p.is_dir() and p.name < damaged.name)
        fresh = "start without --resume (from the exported weights) and with another --checkpoint-dir"
        if not earlier:
            return f"no earlier checkpoint is kept in {root}; {fresh}"
        latest = root / "LATEST"
        return (f"to resume from the earlier checkpoint {earlier[-1]} (its client progress is older), write its name "
                f"into {latest} (echo {earlier[-1]} > {latest}) and start with --resume again; or {fresh}")


def _read_server_state(path: Path) -> tuple[int, str, int, dict[int, dict[str, Any]]]:
    """(server step, model, cut, client progress) of a checkpoint's server_state.json; CorruptFile naming it
    and the field unless every field has its type and range."""
    state = read_json_object(path)
    try:
        server_step, model, cut, clients = state["server_step"], state["model"], state["cut"], state["clients"]
        if state["format_version"] != 1:
            raise ValueError(f"format_version {str(state['format_version'])[:20]} is not 1")
        if not (is_int(server_step) and isinstance(model, str) and is_int(cut, 0, 1000)):
            raise TypeError("server_step, model or cut of the wrong type or out of range")
        if not isinstance(clients, dict):
            raise TypeError("clients is not an object")
        progress = {}
        for k, v in clients.items():
            if not (_CLIENT_KEY.fullmatch(k) and is_int(int(k))):
                raise ValueError(f"client id {k[:24]!r} is not an integer in 0..{MAX_INT}")
            if not (isinstance(v, dict) and is_int(v.get("last_step"))):
                raise TypeError(f"client {k}: last_step is not an integer in 0..{MAX_INT}")
            if not isinstance(v.get("done", False), bool) or not (v.get("key") is None or (
                    isinstance(v["key"], str) and len(v["key"]) == 40)):
                raise TypeError(f"client {k}: done or key of the wrong type")
            progress[int(k)] = {x: v[x] for x in ("last_step", "done", "key") if x in v}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptFile(path, f"is not a server state ({type(e).__name__}: {e})") from None
    return server_step, model, cut, progress


_CLIENT_KEY = re.compile(r"0|[1-9][0-9]{0,15}")
