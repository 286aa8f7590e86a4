"""Provider selection: which execution provider runs which graph, from a profile and what ORT reports.

:func:`select_providers` is a pure function of the profile and the list of providers
ONNX Runtime reports (``onnxruntime.get_available_providers()``, which callers get
through :func:`splitedge.runtime_edge.ort_backend.available_providers`, the one module
of the edge that imports onnxruntime). For each graph the first provider of the
profile's list that ORT reports is used:

* the forward-only graph (``client/inference_model.onnx``, evaluation and deployment)
  gets an ``InferenceSession`` with the reported providers of ``providers.forward``,
  in the profile's order (ORT assigns each node to the first provider that can run it,
  so TensorRT falls back to CUDA, then to the CPU, node by node);
* the training graphs (``eval_model.onnx``, the train-mode forward whose activation is
  sent to the cloud, ``training_model.onnx`` and ``optimizer_model.onnx``) run on one
  device of ORT's training API: ``cuda`` (or ``cuda:N``) or ``cpu``.

The choice comes with a plain-words sentence, logged once by the edge runtime::

    forward: TensorRT fp16; training: CUDA
    forward: CPU (TensorRT, CUDA not available); training: CPU (CUDA not available)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .schema import CANN, CPU, CUDA, TENSORRT, Profile


def short_name(provider: str) -> str:
    """``TensorrtExecutionProvider`` -> ``TensorRT``; ``CUDAExecutionProvider`` -> ``CUDA``."""
    special = {TENSORRT: "TensorRT", "DmlExecutionProvider": "DirectML", "MIGraphXExecutionProvider": "MIGraphX"}
    return special.get(provider, provider.removesuffix("ExecutionProvider"))


@dataclass(frozen=True)
class ProviderChoice:
    """What runs where. ``inference_providers``/``inference_provider_options`` go to
    ``EdgeModel(inference_providers=..., inference_provider_options=...)``, ``training_device``
    to ``EdgeModel(device=...)``."""

    inference_providers: tuple[str, ...]
    inference_provider_options: tuple[dict[str, str], ...]
    training_device: str  # "cpu" | "cuda" | "cuda:N"
    training_provider: str  # CUDAExecutionProvider | CPUExecutionProvider
    forward_unavailable: tuple[str, ...]  # the profile's providers ahead of the chosen one that ORT lacks
    training_unavailable: tuple[str, ...]
    fp16: bool  # TensorRT with fp16
    engine_cache_dir: str | None  # TensorRT's engine cache, when TensorRT is used and caching is on

    @property
    def forward_provider(self) -> str:
        return self.inference_providers[0]

    @property
    def sentence(self) -> str:
        """e.g. ``forward: TensorRT fp16; training: CPU (CUDA not available)``."""
        return f"forward: {self.forward_words}; training: {self.training_words}"

    @property
    def forward_words(self) -> str:
        return _words(self.forward_provider, self.forward_unavailable, self.fp16 and self.forward_provider == TENSORRT)

    @property
    def training_words(self) -> str:
        return _words(self.training_provider, self.training_unavailable, False)

    def prepare(self) -> None:
        """Creates the TensorRT engine cache directory (TensorRT does not create it)."""
        if self.engine_cache_dir:
            os.makedirs(self.engine_cache_dir, exist_ok=True)

    def to_dict(self) -> dict:
        return {
            "forward": self.forward_provider, "forward_providers": list(self.inference_providers),
            "forward_provider_options": [dict(o) for o in self.inference_provider_options],
            "training": self.training_provider, "training_device": self.training_device,
            "forward_unavailable": list(self.forward_unavailable),
            "training_unavailable": list(self.training_unavailable),
            "engine_cache_dir": self.engine_cache_dir, "sentence": self.sentence,
        }


def _words(provider: str, missing: Sequence[str], fp16: bool) -> str:
    text = short_name(provider) + (" fp16" if fp16 else "")
    if missing:
        text += f" ({', '.join(short_name(m) for m in missing)} not available)"
    return text


def select_providers(profile: Profile, available: Sequence[str], *,
                     artifacts_dir: str | os.PathLike[str] | None = None) -> ProviderChoice:
    """The providers for the forward-only graph and the device for training.

    ``available`` is what ONNX Runtime reports on this machine. A relative TensorRT
    ``engine_cache_dir`` is resolved inside ``artifacts_dir`` (engines are per model and
    per GPU); without ``artifacts_dir`` it is left relative (to the working directory).
    Pure: reads nothing, creates nothing (see :meth:`ProviderChoice.prepare`).
    """
    have = set(available)
    forward = [p for p in profile.forward if p in have]
    if not forward:  # cannot happen with a validated profile and a real ORT (CPU is always there)
        forward = [CPU]
    first = profile.forward.index(forward[0]) if forward[0] in profile.forward else len(profile.forward)
    forward_missing = tuple(p for p in profile.forward[:first])

    training = next((p for p in profile.training if p in have), CPU)
    first_t = profile.training.index(training) if training in profile.training else len(profile.training)
    training_missing = tuple(profile.training[:first_t])
    device = "cpu"
    if training == CUDA:
        device = "cuda" if profile.cuda.device_id == 0 else f"cuda:{profile.cuda.device_id}"

    cache_dir: str | None = None
    options: list[dict[str, str]] = []
    for p in forward:
        if p == TENSORRT:
            o = {"device_id": str(profile.cuda.device_id), "trt_fp16_enable": str(bool(profile.tensorrt.fp16)),
                 "trt_engine_cache_enable": str(bool(profile.tensorrt.engine_cache))}
            if profile.tensorrt.engine_cache:
                d = Path(profile.tensorrt.engine_cache_dir)
                if artifacts_dir is not None and not d.is_absolute():
                    d = Path(artifacts_dir) / d
                cache_dir = str(d)
                o["trt_engine_cache_path"] = cache_dir
            options.append(o)
        elif p == CUDA:
            options.append({"device_id": str(profile.cuda.device_id)})
        elif p == CANN:
            options.append({"device_id": str(profile.cann.device_id)})
        else:
            options.append({})
    return ProviderChoice(
        inference_providers=tuple(forward), inference_provider_options=tuple(options), training_device=device,
        training_provider=training, forward_unavailable=forward_missing, training_unavailable=training_missing,
        fp16=bool(profile.tensorrt.fp16) and forward[0] == TENSORRT, engine_cache_dir=cache_dir,
    )


@dataclass(frozen=True)
class EdgeSettings:
    """What ``edge-train --profile`` applies (explicit --threads/--batch-size win)."""

    profile: Profile
    choice: ProviderChoice
    device: str
    threads: int | None  # None: ONNX Runtime's default
    batch_size: int
    inference_providers: list[str]
    inference_provider_options: list[dict[str, str]]

    @property
    def sentence(self) -> str:
        return self.choice.sentence


def edge_settings(profile: Profile | str | os.PathLike[str], available: Sequence[str], *, threads: int | None,
                  batch_size: int | None, artifacts_dir: str | os.PathLike[str] | None = None) -> EdgeSettings:
    """The edge runtime's settings under a profile. ``threads``/``batch_size``: what the user
    gave (None: not given, the profile's value is used). Creates the TensorRT engine cache."""
    from .schema import load

    prof = profile if isinstance(profile, Profile) else load(profile)
    choice = select_providers(prof, available, artifacts_dir=artifacts_dir)
    choice.prepare()
    if threads is None:
        threads = prof.runtime.threads or None
    return EdgeSettings(
        profile=prof, choice=choice, device=choice.training_device, threads=threads,
        batch_size=batch_size if batch_size is not None else prof.runtime.batch_size,
        inference_providers=list(choice.inference_providers),
        inference_provider_options=[dict(o) for o in choice.inference_provider_options],
    )
