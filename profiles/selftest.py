"""The edge bundle's self-test: proves the runtime works on this board, and says what ran where.

Run on the board from an unpacked bundle (``./run.sh selftest``), or here against any
artifact directory (``python -m splitedge.profiles.selftest --profile cpu --artifacts DIR``).

Steps, each failing with a plain-words reason:

1. the bundle's files match BUNDLE.json (sha256); edge-train's modules import, and every
   ``splitedge`` module in use was imported from the bundle (nothing from another install
   leaks in);
2. the profile loads; this Python is at least the profile's;
3. the profile's edge backend imports: ``portable`` (plain onnxruntime) or ``ort-training``
   (ORT's training build; ``--backend`` overrides); providers are selected from what it
   reports (:func:`splitedge.profiles.select.select_providers`), and TensorRT's engine cache
   directory is created when TensorRT is used;
4. the artifacts load with those providers; on random data of the profile's batch size:
   one train-mode forward (the activation the cloud would get), one train step with a
   random activation gradient (a parameter must change), two runs of the forward-only
   inference graph (cold: includes TensorRT's engine build; warm);
5. one activation payload is encoded and decoded with a codec (default ``uq:bits=4``);
6. the peak resident memory stays within the profile's ``memory_budget_mb``.

The report ends with one machine-readable line, ``SELFTEST_JSON {...}``; the exit code is
0 only when every step passed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

JSON_PREFIX = "SELFTEST_JSON "


class SelfTestFailed(Exception):
    def __init__(self, step: str, message: str):
        self.step = step
        super().__init__(message)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _parse_codec(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise SelfTestFailed("codec", f"--codec {spec!r}: expected NAME or NAME:key=value,...")
        for conv in (int, float):
            try:
                params[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            params[k] = v
    return name, params


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image. Linux: VmHWM, which starts afresh at exec;
    ru_maxrss would carry the high-water mark of whatever process forked this one over exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / (1024.0 * 1024.0)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 2)


def run(*, bundle: Path | None, profile_ref: str | None, artifacts: Path | None, codec_spec: str = "uq:bits=4",
        batch_size: int | None = None, seed: int = 0, backend: str | None = None, say=print) -> dict[str, Any]:
    """Runs every step; returns the result dict (``ok``, ``failed_step``, ``error``, ...)."""
    res: dict[str, Any] = {"ok": False, "failed_step": None, "error": None, "python": sys.version.split()[0],
                           "python_executable": sys.executable, "machine": platform.machine()}
    step = "bundle"
    try:
        # 1. the bundle is intact and is what runs
        if bundle is not None:
            meta_path = bundle / "BUNDLE.json"
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError) as e:
                raise SelfTestFailed(step, f"cannot read {meta_path}: {e}") from None
            bad = []
            for rel, want in sorted(meta["files"].items()):
                p = bundle / rel
                if not p.is_file():
                    bad.append(f"{rel} is missing")
                elif _sha256(p) != want["sha256"]:
                    bad.append(f"{rel} does not match its sha256")
            if bad:
                raise SelfTestFailed(step, "the bundle is damaged: " + "; ".join(bad[:5])
                                     + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""))
            res["bundle_files"] = len(meta["files"])
            res["bundle_profile"] = meta.get("profile")
            profile_ref = profile_ref or str(bundle / "profile.toml")
            artifacts = artifacts or bundle / "artifacts"
            say(f"bundle: {len(meta['files'])} files match BUNDLE.json (profile {meta.get('profile')}, "
                f"splitedge {meta.get('splitedge')})")

        # the modules edge-train runs (imported here so that a module missing from the bundle, or a
        # missing requirement such as pyzmq, shows now and not at the first training run)
        step = "imports"
        import importlib

        for mod in ("splitedge.runtime_edge.cli", "splitedge.runtime_edge.client", "splitedge.codecs"):
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise SelfTestFailed(step, f"{mod} cannot be imported by {sys.executable}: {e} (install the "
                                           "bundle's requirements.txt, or flash-board --install-deps)") from None

        # 2. the profile, and this Python
        step = "profile"
        from . import ProfileError, load

        try:
            profile = load(profile_ref or "cpu")
        except ProfileError as e:
            raise SelfTestFailed(step, str(e)) from None
        res["profile"] = profile.name
        need = profile.board.python_tuple
        if sys.version_info[:2] < need:
            raise SelfTestFailed(step, f"this is Python {res['python']} ({sys.executable}); profile {profile.name} "
                                       f"needs Python >= {profile.board.python}")
        if platform.machine() != profile.board.arch:
            say(f"warning: this machine is {platform.machine()}, profile {profile.name} is for {profile.board.arch}")
        say(f"profile: {profile.name} ({profile.description})")
        say(f"python: {res['python']} at {sys.executable} on {platform.machine()}")

        # 3. the edge backend and its onnxruntime, and the provider choice
        step = "onnxruntime"
        backend = backend or profile.backend
        if backend not in ("portable", "ort-training"):
            raise SelfTestFailed(step, f"unknown edge backend {backend!r}; choose portable or ort-training")
        res["backend"] = backend
        t0 = time.perf_counter()
        try:
            if backend == "portable":
                from ..runtime_edge import portable_backend as edge_backend
            else:
                from ..runtime_edge import ort_backend as edge_backend  # type: ignore[no-redef]
        except ImportError as e:
            what = "onnxruntime" if backend == "portable" else "onnxruntime with the training APIs"
            raise SelfTestFailed(step, f"{what} cannot be imported by {sys.executable} (edge backend {backend}): "
                                       f"{e}. Install the bundle's requirements.txt (flash-board --install-deps)"
                                       + ("" if backend == "portable" else
                                          ", or on a board the ORT training build from source (see requirements.txt)")) \
                from None
        res["import_ms"] = _ms(t0)
        available = edge_backend.available_providers()
        ort_version = getattr(edge_backend.ort, "__version__", "?")
        res["onnxruntime"] = ort_version
        res["available_providers"] = available
        say(f"onnxruntime {ort_version}: providers reported: {', '.join(available)}")
        res["tensorrt_package"] = _tensorrt_package()
        if res["tensorrt_package"]:
            say(f"tensorrt Python package {res['tensorrt_package']} is installed"
                + ("" if "TensorrtExecutionProvider" in available else
                   "; this ONNX Runtime has no TensorRT provider (build ORT with --use_tensorrt to use it)"))
        else:
            say("tensorrt Python package: not installed")
        from .select import select_providers, short_name

        choice = select_providers(profile, available, artifacts_dir=artifacts)
        choice.prepare()
        res["selection"] = choice.to_dict()
        say(f"selected: {choice.sentence}")
        if choice.engine_cache_dir:
            say(f"TensorRT engine cache: {choice.engine_cache_dir}")

        # 4. the artifacts, one forward, one train step, inference
        step = "load"
        import numpy as np

        from ..export.manifest import ManifestError

        if artifacts is None:
            raise SelfTestFailed(step, "no artifact directory: give --artifacts or --bundle")
        t0 = time.perf_counter()
        try:
            model = edge_backend.EdgeModel(
                artifacts, device=choice.training_device, threads=profile.runtime.threads or None,
                inference_providers=list(choice.inference_providers),
                inference_provider_options=[dict(o) for o in choice.inference_provider_options])
        except ManifestError as e:
            raise SelfTestFailed(step, str(e)) from None
        res["load_ms"] = _ms(t0)
        m = model.manifest
        n = batch_size or profile.runtime.batch_size
        res["model"] = {"name": m.model, "cut": m.cut, "input_shape": list(m.input_shape),
                        "activation_shape": list(m.activation_shape), "batch_size": n}
        say(f"artifacts: {m.model} cut {m.cut}, input {'x'.join(map(str, m.input_shape))} -> activation "
            f"{'x'.join(map(str, m.activation_shape))}, batch {n}; loaded in {res['load_ms']:.0f} ms")
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, *m.input_shape), dtype=np.float32)

        step = "forward"
        t0 = time.perf_counter()
        act = model.forward(x)
        res["forward_ms"] = _ms(t0)
        if act.shape != (n, *m.activation_shape) or not np.isfinite(act).all():
            raise SelfTestFailed(step, f"the forward returned shape {act.shape} (finite: {bool(np.isfinite(act).all())}),"
                                       f" expected {(n, *m.activation_shape)}")
        train_where = f"{short_name(choice.training_provider)} (device {choice.training_device})"

        step = "train"
        name = m.trainable_params[0]
        before = model.get_parameters(trainable_only=True)[name]
        grad = (rng.standard_normal(act.shape, dtype=np.float32) * 1e-2).astype(np.float32)
        t0 = time.perf_counter()
        model.train_step(x, grad)
        res["train_step_ms"] = _ms(t0)
        after = model.get_parameters(trainable_only=True)[name]
        if not np.isfinite(after).all() or np.array_equal(before, after):
            raise SelfTestFailed(step, f"the train step did not change parameter {name} (or made it non-finite)")

        step = "infer"
        t0 = time.perf_counter()
        y = model.infer(x)
        res["infer_cold_ms"] = _ms(t0)
        t0 = time.perf_counter()
        model.infer(x)
        res["infer_warm_ms"] = _ms(t0)
        if y.shape != (n, *m.activation_shape) or not np.isfinite(y).all():
            raise SelfTestFailed(step, f"inference returned shape {y.shape}, expected {(n, *m.activation_shape)}")
        in_use = list(model.inference_providers_in_use)
        res["forward_providers_in_use"] = in_use
        if in_use and in_use[0] != choice.forward_provider:
            say(f"warning: asked ONNX Runtime for {short_name(choice.forward_provider)} for the forward-only graph, "
                f"it runs on {short_name(in_use[0])} (the provider failed to start; see ORT's log)")
        say(f"edge backend {backend}")
        say(f"forward (train mode)                       {res['forward_ms']:9.1f} ms  on {train_where}")
        say(f"train step (forward, backward, optimizer)  {res['train_step_ms']:9.1f} ms  on {train_where}")
        say(f"inference (forward-only graph) cold/warm   {res['infer_cold_ms']:9.1f} / {res['infer_warm_ms']:.1f} ms"
            f"  on {in_use[0] if in_use else '?'}")

        # 5. one payload
        step = "codec"
        from .. import codecs

        cname, cparams = _parse_codec(codec_spec)
        try:
            codec = codecs.get(cname, **cparams)
        except (TypeError, ValueError) as e:
            raise SelfTestFailed(step, f"--codec {codec_spec!r}: {e}") from None
        t0 = time.perf_counter()
        blob = codec.encode(act, step=1, total_rounds=1)
        res["encode_ms"] = _ms(t0)
        back = codecs.decode(blob)
        if back.shape != act.shape:
            raise SelfTestFailed(step, f"{cname} decoded shape {back.shape}, expected {act.shape}")
        res["payload"] = {"codec": cname, "params": cparams, "bytes": len(blob), "fp32_bytes": int(act.nbytes)}
        say(f"encode {codec_spec:<28}      {res['encode_ms']:9.1f} ms  {len(blob)} bytes "
            f"({act.nbytes / max(1, len(blob)):.1f}x smaller than fp32)")

        # 6. memory
        step = "memory"
        peak = _peak_rss_mb()
        res["peak_rss_mb"] = round(peak, 1)
        res["memory_budget_mb"] = profile.runtime.memory_budget_mb
        say(f"peak memory {peak:.0f} MB of the profile's {profile.runtime.memory_budget_mb} MB budget")
        if peak > profile.runtime.memory_budget_mb:
            raise SelfTestFailed(step, f"peak memory {peak:.0f} MB is above profile {profile.name}'s budget of "
                                       f"{profile.runtime.memory_budget_mb} MB at batch {n}: lower runtime.batch_size "
                                       f"or raise runtime.memory_budget_mb")
        res["ok"] = True
        res["summary"] = (f"forward-only graph on {short_name(in_use[0]) if in_use else '?'}, training on "
                          f"{short_name(choice.training_provider)}; {choice.sentence}")
    except SelfTestFailed as e:
        res["failed_step"], res["error"] = e.step, str(e)
    except Exception as e:  # anything else is a failure of this step too, reported plainly
        res["failed_step"], res["error"] = step, f"{type(e).__name__}: {e}"
    if bundle is not None:
        foreign = _foreign_modules(bundle)
        if foreign and res["ok"]:
            res["ok"] = False
            res["failed_step"] = "bundle"
            res["error"] = ("the bundle is incomplete: these modules were imported from outside it: "
                            + ", ".join(foreign[:5]))
    return res


def _tensorrt_package() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return None
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown version"


def _foreign_modules(bundle: Path) -> list[str]:
    root = str((bundle / "splitedge_edge").resolve()) + os.sep
    out = []
    for name, mod in list(sys.modules.items()):
        if name == "splitedge" or name.startswith("splitedge."):
            f = getattr(mod, "__file__", None)
            if f and not str(Path(f).resolve()).startswith(root):
                out.append(f"{name} ({f})")
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="selftest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="an unpacked edge bundle (run.sh passes its own)")
    ap.add_argument("--profile", default=None, help="profile name or file [default: the bundle's profile.toml]")
    ap.add_argument("--artifacts", type=Path, default=None, help="artifact directory [default: the bundle's]")
    ap.add_argument("--codec", default="uq:bits=4", help="codec for the payload, NAME[:key=value,...]")
    ap.add_argument("--batch-size", type=int, default=None, help="[default: the profile's batch_size]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=("portable", "ort-training"), default=None,
                    help="edge backend [default: the profile's: portable for plain onnxruntime builds]")
    ap.add_argument("--json", action="store_true", help="print only the SELFTEST_JSON line")
    a = ap.parse_args(argv)
    if a.bundle is None and a.artifacts is None:
        ap.error("give --bundle DIR, or --artifacts DIR (and --profile)")
    say = (lambda *_: None) if a.json else (lambda s: print(f"  {s}", flush=True))
    if not a.json:
        print(f"splitedge self-test{f' of {a.bundle}' if a.bundle else ''}", flush=True)
    res = run(bundle=a.bundle.resolve() if a.bundle else None, profile_ref=a.profile, artifacts=a.artifacts,
              codec_spec=a.codec, batch_size=a.batch_size, seed=a.seed, backend=a.backend, say=say)
    if not a.json:
        if res["ok"]:
            print(f"PASS: {res['summary']}", flush=True)
        else:
            print(f"FAIL at {res['failed_step']}: {res['error']}", flush=True)
    print(JSON_PREFIX + json.dumps(res, sort_keys=True), flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
