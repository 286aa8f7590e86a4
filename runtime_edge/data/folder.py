"""Image folders: the HAM10000 layout (``HAM10000_metadata.csv``) or a generic ``labels.csv``.

Pillow decodes the images; it is imported only once the layout has been checked,
so a broken layout is reported as such, not as a missing Pillow.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .spec import NORMALIZATION, Dataset, DatasetError, to_float

__all__ = ["FOLDER_HELP", "FOLDER_TEST_FRACTION", "GENERIC_CSV", "HAM_CSV", "load_folder", "stratified_split"]

FOLDER_HELP = (
    "folder:DIR expects either the HAM10000 layout, DIR/HAM10000_metadata.csv (columns image_id and "
    "dx, the class name; lesion_id optional) with images <image_id>.jpg in DIR or in its "
    "sub-folders (HAM10000_images_part_1/, HAM10000_images_part_2/), or a generic DIR/labels.csv "
    "with columns filename,label (filenames relative to DIR). Images are read as RGB and resized to "
    "the artifacts' input size (edge-train) or 64x64. HAM10000 is at https://doi.org/10.7910/DVN/DBW86T."
)
FOLDER_TEST_FRACTION = 0.2
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
HAM_CSV = "HAM10000_metadata.csv"
GENERIC_CSV = "labels.csv"


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            absent = [c for c in required if c not in cols]
            if absent:
                raise DatasetError(
                    f"{path}: missing column(s) {', '.join(absent)} "
                    f"(found: {', '.join(cols) or 'none'}). {FOLDER_HELP}"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read CSV: {e}") from e
    if not rows:
        raise DatasetError(f"{path}: no rows. {FOLDER_HELP}")
    return rows


def _image_index(directory: Path) -> dict[str, Path]:
    """stem -> image path, for images in ``directory`` and its direct sub-folders (first found wins)."""
    index: dict[str, Path] = {}
    folders = [directory] + sorted(p for p in directory.iterdir() if p.is_dir())
    for folder in folders:
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in _IMAGE_EXTS and p.is_file():
                index.setdefault(p.stem, p)
    return index


def _folder_samples(directory: Path) -> tuple[list[str], list[Path], list[str], list[str]]:
    """(ids, paths, class names, group keys), sorted by id."""
    ham, generic = directory / HAM_CSV, directory / GENERIC_CSV
    if ham.is_file():
        rows = _read_csv(ham, ("image_id", "dx"))
        index = _image_index(directory)
        seen: set[str] = set()
        samples = []
        missing = []
        for i, r in enumerate(rows, start=2):
            image_id, dx = r.get("image_id", ""), r.get("dx", "")
            if not image_id or not dx:
                raise DatasetError(f"{ham}:{i}: empty image_id or dx")
            if image_id in seen:
                raise DatasetError(f"{ham}:{i}: image_id {image_id!r} listed twice")
            seen.add(image_id)
            p = index.get(image_id)
            if p is None:
                missing.append(image_id)
                continue
            samples.append((image_id, p, dx, r.get("lesion_id") or image_id))
    elif generic.is_file():
        rows = _read_csv(generic, ("filename", "label"))
        root = directory.resolve()
        seen = set()
        samples, missing = [], []
        for i, r in enumerate(rows, start=2):
            name, label = r.get("filename", ""), r.get("label", "")
            if not name or not label:
                raise DatasetError(f"{generic}:{i}: empty filename or label")
            if name in seen:
                raise DatasetError(f"{generic}:{i}: filename {name!r} listed twice")
            seen.add(name)
            p = (directory / name).resolve()
            if not p.is_relative_to(root):
                raise DatasetError(f"{generic}:{i}: filename {name!r} points outside {directory}")
            if not p.is_file():
                missing.append(name)
                continue
            samples.append((name, p, label, name))
    else:
        raise DatasetError(f"folder: {directory} has neither {HAM_CSV} nor {GENERIC_CSV}. {FOLDER_HELP}")
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise DatasetError(f"folder: {directory}: {len(missing)} listed image(s) not found: {shown}. {FOLDER_HELP}")
    samples.sort(key=lambda s: s[0])
    return [s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples], [s[3] for s in samples]


def stratified_split(
    labels: np.ndarray, groups: Sequence[str] | None, *, seed: int, test_fraction: float = FOLDER_TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified train/test split: (train indices, test indices), each ascending.

    Per class (ascending), the class's groups (``groups[i]``, e.g. HAM10000's
    lesion_id, so several images of one lesion never straddle the split; each
    sample is its own group when ``groups`` is None) are shuffled with
    ``default_rng(seed)`` and the first ``round(test_fraction * n_groups)``
    go to test, clamped to 1..n_groups-1 when the class has two or more groups
    (a class with one group stays in train).
    """
    labels = np.asarray(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    keys = list(groups) if groups is not None else [str(i) for i in range(labels.shape[0])]
    if len(keys) != labels.shape[0]:
        raise ValueError(f"groups must have one entry per label ({labels.shape[0]}), got {len(keys)}")
    rng = np.random.default_rng(seed)
    test = np.zeros(labels.shape[0], dtype=bool)
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        unit_of: dict[str, list[int]] = {}
        for i in members:
            unit_of.setdefault(keys[i], []).append(int(i))
        units = sorted(unit_of)
        n_units = len(units)
        n_test = round(test_fraction * n_units)
        if n_units >= 2:
            n_test = min(max(n_test, 1), n_units - 1)
        else:
            n_test = 0
        for j in rng.permutation(n_units)[:n_test]:
            test[unit_of[units[j]]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def load_folder(directory: Path, split: str, image_size: tuple[int, int], split_seed: int, normalize: bool) -> Dataset:
    if not (
        isinstance(image_size, tuple) and len(image_size) == 2 and all(isinstance(v, int) and v > 0 for v in image_size)
    ):
        raise ValueError(f"image_size must be a tuple (H, W) of positive ints, got {image_size!r}")
    if not directory.is_dir():
        raise DatasetError(f"folder: directory {directory} not found. {FOLDER_HELP}")
    ids, paths, names, groups = _folder_samples(directory)  # the layout is checked before Pillow is needed
    try:
        from PIL import Image
    except ImportError as e:
        raise DatasetError(
            "folder: datasets need Pillow to decode images, and it is not installed (it is not an edge "
            "dependency): pip install Pillow"
        ) from e
    classes = tuple(sorted(set(names)))
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.array([lookup[c] for c in names], dtype=np.int64)
    train, test = stratified_split(labels, groups, seed=split_seed)
    chosen = train if split == "train" else test
    h, w = image_size
    raw = np.empty((len(chosen), h, w, 3), dtype=np.uint8)

    def decode(j: int) -> None:
        p = paths[int(chosen[j])]
        try:
            with Image.open(p) as im:
                im.draft("RGB", (w, h))  # JPEG: decode at the smallest DCT scale >= the target size
                raw[j] = np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
        except (OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"folder: cannot decode image {p}: {e}") from e

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(chosen))))
    x, norm = to_float(raw.transpose(0, 3, 1, 2), NORMALIZATION["folder"] if normalize else None)
    chosen_ids = tuple(ids[int(i)] for i in chosen)
    return Dataset(f"folder:{directory}", split, x, labels[chosen], classes, norm, ids=chosen_ids)
