"""Names of the zoo's models and of their cut units, without importing torch (for CLI choices,
--help, and checking a --cut before anything is built). ``zoo.cut_units`` builds the same
lists from the modules; a test keeps the two equal."""

from __future__ import annotations

MODEL_NAMES = ["mobilenet_v2", "resnet18", "resnet34", "shufflenet_v2_x1_0", "vgg11"]

_RESNET = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
CUT_UNITS: dict[str, tuple[str, ...]] = {
    "mobilenet_v2": (*(f"features.{i}" for i in range(19)), "classifier"),
    "resnet18": _RESNET,
    "resnet34": _RESNET,
    "shufflenet_v2_x1_0": ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5", "fc"),
    "vgg11": (*(f"features.{i}" for i in range(21)), "avgpool", "classifier"),
}


def resolve_cut(names: list[str] | tuple[str, ...], cut: str | int, hint: str = "use --list-cuts") -> int:
    """The number of edge units for ``--cut`` (an index or a unit name) among the unit ``names``."""
    n_max = len(names) - 1
    if isinstance(cut, int) or (isinstance(cut, str) and cut.strip().lstrip("-").isdigit()):
        n = int(cut)
        if not 1 <= n <= n_max:
            raise ValueError(f"cut {n} out of range: this model has cuts 1..{n_max} ({hint})")
        return n
    if cut not in names:
        raise ValueError(f"unknown cut {cut!r}: cuts are {', '.join(names[:-1])} ({hint})")
    n = list(names).index(cut) + 1
    if n > n_max:
        raise ValueError(f"cut {cut!r} leaves nothing on the server; the last cut is {names[n_max - 1]!r}")
    return n


def check_cut(model: str, cut: str | int) -> int:
    """resolve_cut for a zoo model by name; ValueError for an unknown model or cut."""
    if model not in CUT_UNITS:
        raise ValueError(f"unknown model {model!r}; available: {', '.join(MODEL_NAMES)}")
    return resolve_cut(CUT_UNITS[model], cut, f"`export-client --model {model} --list-cuts` lists them")
