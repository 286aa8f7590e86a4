"""Datasets on the edge: loading, partitioning across clients, and batching.

numpy and the standard library only (Pillow is imported lazily, and only by the
``folder:`` loader). No torch, no onnxruntime. One module per concern:

==================  ==============================================================
:mod:`.spec`        ``--data`` specs, :class:`Dataset`, normalization, errors
:mod:`.idx`         IDX files: MNIST, Fashion-MNIST, ``idx:``
:mod:`.cifar10`     CIFAR-10, binary version, or python version via a restricted
                    :class:`pickle.Unpickler` (:func:`safe_unpickle`)
:mod:`.folder`      image folders (HAM10000, ``labels.csv``), stratified split
:mod:`.synthetic`   a generated dataset
:mod:`.partition`   shards across clients (``iid``, ``dirichlet:ALPHA``)
:mod:`.batches`     seeded, resumable batch order
==================  ==============================================================

Dataset specs (``--data``), see :func:`parse_spec`
---------------------------------------------------

=============================  ==================================================
``fashion-mnist``              IDX files in ``/usr/share/datasets/fashion-mnist``
                               (Debian: ``sudo apt-get install dataset-fashion-mnist``)
``fashion-mnist:DIR``          the same four files in ``DIR``
``mnist:DIR``                  MNIST's four IDX files in ``DIR`` (Debian ships no
                               MNIST package, so there is no default directory)
``idx:DIR``                    any dataset in MNIST's four-file IDX layout
``cifar10:DIR``                CIFAR-10 batches in ``DIR``, ``DIR/cifar-10-batches-bin``
                               (binary version, preferred) or ``DIR/cifar-10-batches-py``
                               (python version)
``folder:DIR``                 images plus a label CSV: HAM10000 layout
                               (``HAM10000_metadata.csv``) or ``labels.csv``
``synthetic[:N | :k=v,...]``   a small learnable dataset generated from a seed
=============================  ==================================================

Normalization
-------------

Pixels are divided by 255, then standardized per channel with fixed constants,
``x = (p / 255 - mean) / std`` (one vectorized float32 pass, no per-image
loop; the uint8 source and the float32 result are the only copies held):

=================  ===========================  ===========================
dataset            mean                         std
=================  ===========================  ===========================
MNIST, ``idx:``    0.1307                       0.3081
Fashion-MNIST      0.2860                       0.3530
CIFAR-10           0.4914, 0.4822, 0.4465       0.2470, 0.2435, 0.2616
``folder:``        0.485, 0.456, 0.406          0.229, 0.224, 0.225
``synthetic``      0 (generated standardized)   1
=================  ===========================  ===========================

The MNIST, Fashion-MNIST and CIFAR-10 values are the training sets' pixel mean
and standard deviation (for CIFAR-10 the true per-channel std; the
0.2023/0.1994/0.2010 found in many repositories is a mis-computed one). Folder
datasets (HAM10000) have no agreed constants; they get ImageNet's.

Folder train/test split
-----------------------

HAM10000 ships no test split, so ``folder:`` datasets get a seeded, stratified
80/20 one (:func:`stratified_split`, ``load(..., split_seed=0)``): per class,
20% of the groups (HAM10000's ``lesion_id``, so that images of one lesion never
straddle the split; otherwise each image) go to test, at least one when the
class has two or more groups. Both splits are in file-name order.

Partitioning and resuming
-------------------------

:func:`partition` is a pure function of ``(labels, num_clients, scheme, seed)``:
every client computes the whole partition and keeps its own shard, so clients
that never talk to each other get disjoint shards that cover the dataset.
:func:`batches` shuffles a shard with ``default_rng([seed, epoch])`` and can
start at any batch (``start_batch``), so an edge killed mid-epoch and restarted
with the same arguments continues exactly where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from .batches import batches, epoch_order, eval_batches, num_batches
from .cifar10 import CIFAR10_CLASSES, CIFAR10_HELP, load_cifar10, read_cifar_bin, safe_unpickle
from .folder import FOLDER_HELP, FOLDER_TEST_FRACTION, load_folder, stratified_split
from .idx import FASHION_MNIST_CLASSES, IDX_HELP, MNIST_CLASSES, load_idx_dataset, read_idx
from .partition import (
    DIRICHLET_MAX_DRAWS,
    DIRICHLET_MIN_SIZE,
    PARTITION_SCHEMES,
    parse_scheme,
    partition,
    partition_all,
    partition_fingerprint,
)
from .spec import (
    ACCEPTED_FORMS,
    FASHION_MNIST_DIR,
    FASHION_MNIST_HELP,
    IDENTITY,
    MNIST_HELP,
    NORMALIZATION,
    SPLITS,
    DataSpec,
    Dataset,
    DatasetError,
    Normalization,
    UnsafePickleError,
    forms,
    parse_spec,
)
from .synthetic import SYNTHETIC_MAX_BYTES, load_synthetic

__all__ = [
    "ACCEPTED_FORMS",
    "CIFAR10_CLASSES",
    "CIFAR10_HELP",
    "DIRICHLET_MAX_DRAWS",
    "DIRICHLET_MIN_SIZE",
    "DataSpec",
    "Dataset",
    "DatasetError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_HELP",
    "FOLDER_HELP",
    "FOLDER_TEST_FRACTION",
    "IDENTITY",
    "IDX_HELP",
    "MNIST_CLASSES",
    "MNIST_HELP",
    "NORMALIZATION",
    "Normalization",
    "PARTITION_SCHEMES",
    "SPLITS",
    "SYNTHETIC_MAX_BYTES",
    "UnsafePickleError",
    "batches",
    "epoch_order",
    "eval_batches",
    "load",
    "num_batches",
    "parse_scheme",
    "parse_spec",
    "partition",
    "partition_all",
    "partition_fingerprint",
    "read_cifar_bin",
    "read_idx",
    "safe_unpickle",
    "stratified_split",
]


def load(
    spec: str | DataSpec,
    *,
    split: str,
    image_size: tuple[int, int] = (64, 64),
    split_seed: int = 0,
    normalize: bool = True,
) -> Dataset:
    """Loads one split (``"train"`` or ``"test"``) of the dataset named by ``spec`` (a ``--data`` value).

    ``image_size`` (H, W) applies to ``folder:`` datasets only (the others have
    a native size); ``split_seed`` seeds their 80/20 train/test split.
    ``normalize=False`` leaves pixels at ``p / 255`` (synthetic data is
    generated standardized either way).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ds = spec if isinstance(spec, DataSpec) else parse_spec(spec)
    if ds.kind == "synthetic":
        return load_synthetic(dict(ds.params), split)
    if ds.path is None:  # parse_spec gives every directory kind a path
        raise DatasetError(f"data spec {ds.kind!r} needs a directory: {ds.kind}:DIR")
    path = Path(ds.path).expanduser()
    if ds.kind == "fashion-mnist":
        norm = NORMALIZATION["fashion-mnist"] if normalize else None
        return load_idx_dataset(path, split, "fashion-mnist", FASHION_MNIST_CLASSES, norm, FASHION_MNIST_HELP)
    if ds.kind == "mnist":
        norm = NORMALIZATION["mnist"] if normalize else None
        return load_idx_dataset(path, split, "mnist", MNIST_CLASSES, norm, MNIST_HELP)
    if ds.kind == "idx":
        norm = NORMALIZATION["mnist"] if normalize else None
        return load_idx_dataset(path, split, f"idx:{path}", None, norm, IDX_HELP)
    if ds.kind == "cifar10":
        return load_cifar10(path, split, normalize)
    if ds.kind == "folder":
        return load_folder(path, split, image_size, split_seed, normalize)
    raise DatasetError(f"unknown data spec kind {ds.kind!r}; accepted forms: {forms()}")
