"""What a dataset is here: the ``--data`` spec, the in-memory :class:`Dataset`, its normalization.

numpy and the standard library only. The loaders (:mod:`.idx`, :mod:`.cifar10`,
:mod:`.folder`, :mod:`.synthetic`) build a :class:`Dataset`; :func:`parse_spec`
turns a ``--data`` value into a :class:`DataSpec` and lists the accepted forms
when it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ACCEPTED_FORMS",
    "DataSpec",
    "Dataset",
    "DatasetError",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_HELP",
    "IDENTITY",
    "MNIST_HELP",
    "NORMALIZATION",
    "Normalization",
    "SPLITS",
    "UnsafePickleError",
    "parse_spec",
    "to_float",
]


class DatasetError(ValueError):
    """A dataset is missing, malformed, or named by a spec we do not understand.

    The message says what is wrong and how to get or lay out the data.
    """


class UnsafePickleError(DatasetError):
    """A pickle asks for something :func:`~splitedge.runtime_edge.data.cifar10.safe_unpickle` does not allow."""


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` installs the four IDX files (gzipped)."""

FASHION_MNIST_HELP = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
    f"{FASHION_MNIST_DIR}), or download the four IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from "
    "https://github.com/zalandoresearch/fashion-mnist and pass --data fashion-mnist:DIR."
)
MNIST_HELP = (
    "Debian has no MNIST package: download the four IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; e.g. from "
    "the mirror torchvision uses, https://ossci-datasets.s3.amazonaws.com/mnist/) into a directory "
    "and pass --data mnist:DIR."
)

SPLITS = ("train", "test")


# ---------------------------------------------------------------------------
# normalization


@dataclass(frozen=True)
class Normalization:
    """Per-channel constants: ``x = (pixel / 255 - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std need one value per channel, got {self.mean} and {self.std}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")


NORMALIZATION: dict[str, Normalization] = {
    "mnist": Normalization((0.1307,), (0.3081,)),
    "fashion-mnist": Normalization((0.2860,), (0.3530,)),
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "folder": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IDENTITY = Normalization((0.0,), (1.0,))


def to_float(raw: np.ndarray, norm: Normalization | None) -> tuple[np.ndarray, Normalization]:
    """uint8 (N, C, H, W) -> float32 ``(raw / 255 - mean) / std``, one allocation.

    Computed in float32 as ``raw * (1 / (255 * std)) - mean / std`` (vectorized,
    ~15x faster than a lookup table; within 1e-6 of the float64 formula).
    ``norm=None``: ``raw / 255`` (zero mean, unit std per channel).
    """
    c_count = raw.shape[1]
    norm = norm or Normalization((0.0,) * c_count, (1.0,) * c_count)
    if len(norm.mean) != c_count:
        raise DatasetError(f"normalization has {len(norm.mean)} channels, images have {c_count}")
    out = raw.astype(np.float32)
    for c, (m, s) in enumerate(zip(norm.mean, norm.std)):  # noqa: B905 - the edge runs on Python 3.8
        view = out[:, c]
        view *= np.float32(1.0 / (255.0 * s))
        view -= np.float32(m / s)
    return out, norm


# ---------------------------------------------------------------------------
# specs

ACCEPTED_FORMS: tuple[str, ...] = (
    "fashion-mnist",
    "fashion-mnist:DIR",
    "mnist:DIR",
    "idx:DIR",
    "cifar10:DIR",
    "folder:DIR",
    "synthetic",
    "synthetic:N",
    "synthetic:n=N,test=N,classes=K,shape=CxHxW,seed=S,noise=F",
)
_DIR_KINDS = ("fashion-mnist", "mnist", "idx", "cifar10", "folder")
SYNTHETIC_KEYS = ("n", "test", "classes", "shape", "seed", "noise")


def forms() -> str:
    """The accepted ``--data`` forms, comma-separated (for error messages)."""
    return ", ".join(ACCEPTED_FORMS)


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: ``kind``, an optional ``path``, and ``key=value`` params."""

    kind: str
    path: str | None = None
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if self.kind == "synthetic":
            return "synthetic" + (":" + ",".join(f"{k}={v}" for k, v in self.params) if self.params else "")
        return self.kind + (f":{self.path}" if self.path is not None else "")


def parse_spec(spec: str) -> DataSpec:
    """Parses a ``--data`` value; raises :class:`DatasetError` listing the accepted forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"data spec must be a non-empty string, got {spec!r}; accepted forms: {forms()}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if kind == "synthetic":
        return DataSpec("synthetic", None, _parse_synthetic_params(rest) if sep else ())
    if kind not in _DIR_KINDS:
        raise DatasetError(f"unknown data spec {spec!r}; accepted forms: {forms()}")
    if not sep:
        if kind == "fashion-mnist":
            return DataSpec("fashion-mnist", str(FASHION_MNIST_DIR))
        if kind == "mnist":
            raise DatasetError(f"data spec 'mnist' needs a directory, mnist:DIR. {MNIST_HELP}")
        raise DatasetError(f"data spec {kind!r} needs a directory: {kind}:DIR; accepted forms: {forms()}")
    if not rest:
        raise DatasetError(f"data spec {spec!r} has an empty directory; write {kind}:DIR")
    return DataSpec(kind, rest)


def _parse_synthetic_params(rest: str) -> tuple[tuple[str, str], ...]:
    if not rest:
        raise DatasetError("data spec 'synthetic:' is empty; write synthetic, synthetic:N or synthetic:n=N,...")
    if "=" not in rest:
        return (("n", rest),)
    out: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in SYNTHETIC_KEYS or not value:
            raise DatasetError(
                f"bad synthetic parameter {item!r} in 'synthetic:{rest}'; "
                f"known keys: {', '.join(SYNTHETIC_KEYS)} (as key=value, comma-separated)"
            )
        if key in out:
            raise DatasetError(f"synthetic parameter {key!r} given twice in 'synthetic:{rest}'")
        out[key] = value
    return tuple(out.items())


# ---------------------------------------------------------------------------
# the dataset


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """One split of a dataset, in memory, ready for the model.

    ``images``: float32 (N, C, H, W), normalized with ``normalization``;
    ``labels``: int64 (N,), in ``range(num_classes)``; ``classes``: the class
    names, ``classes[label]``; ``ids``: per-sample names (file stems) where the
    source has them, else None. The arrays are read-only; batches are copies.
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    normalization: Normalization = IDENTITY
    ids: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
            raise ValueError(
                "images must be a float32 array (N, C, H, W), got "
                f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}"
            )
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (x.shape[0],):
            raise ValueError(
                f"labels must be int64 of shape ({x.shape[0]},), got "
                f"{getattr(y, 'dtype', type(y))} {getattr(y, 'shape', '')}"
            )
        if not self.classes:
            raise ValueError("classes must name at least one class")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}, got {int(y.min())}..{int(y.max())}")
        if self.ids is not None and len(self.ids) != x.shape[0]:
            raise ValueError(f"ids must have one entry per sample ({x.shape[0]}), got {len(self.ids)}")
        x.flags.writeable = False
        y.flags.writeable = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def mean(self) -> tuple[float, ...]:
        return self.normalization.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.normalization.std

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )
