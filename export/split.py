"""Cutting a zoo model in two: the client (edge) part and the server (cloud) part.

``--cut N`` keeps the first N cut units on the edge (see :mod:`splitedge.export.zoo`
for what a unit is), as in ``nn.Sequential(*list(model.children())[:N])``;
``--cut NAME`` cuts after the unit called NAME. Both parts keep the original
module paths, so ``client.state_dict()`` and ``server.state_dict()`` together are
exactly the full model's ``state_dict()`` with torchvision keys, and the ONNX
initializers of the client carry those names too.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import zoo, zoo_names


class Part(nn.Module):
    """A contiguous run of cut units, registered under their original dotted paths."""

    def __init__(self, units: list[tuple[str, nn.Module]], pre_ops: dict[str, Callable[[Tensor], Tensor]]):
        super().__init__()
        self._order: list[tuple[str, Callable[[Tensor], Tensor] | None]] = []
        for dotted, module in units:
            parent: nn.Module = self
            *path, leaf = dotted.split(".")
            for p in path:
                if p not in parent._modules:
                    parent.add_module(p, nn.Module())
                parent = parent._modules[p]  # type: ignore[assignment]
            parent.add_module(leaf, module)
            self._order.append((dotted, pre_ops.get(dotted)))

    def forward(self, x: Tensor) -> Tensor:
        for dotted, pre in self._order:
            if pre is not None:
                x = pre(x)
            x = self.get_submodule(dotted)(x)
        return x


@dataclass(frozen=True)
class CutInfo:
    index: int  # number of units on the edge
    name: str  # name of the last edge unit
    activation_shape: tuple[int, ...]  # per sample (C, H, W) or (F,)
    edge_params: int

    @property
    def activation_bytes(self) -> int:
        n = 1
        for d in self.activation_shape:
            n *= d
        return 4 * n


class ShapeTooSmall(ValueError):
    pass


def resolve_cut(units: list[tuple[str, nn.Module]], cut: str | int) -> int:
    """Returns the number of edge units for ``--cut`` (an index or a unit name)."""
    return zoo_names.resolve_cut([n for n, _ in units], cut)


def split(model_name: str, model: nn.Module, n_edge: int) -> tuple[Part, Part]:
    s = zoo.spec(model_name)
    units = zoo.cut_units(model_name, model)
    return Part(units[:n_edge], s.pre_ops), Part(units[n_edge:], s.pre_ops)


@torch.no_grad()
def trace_cuts(model_name: str, model: nn.Module, input_shape: tuple[int, int, int]) -> list[CutInfo]:
    """Runs one sample through the model in eval mode and records every cut.

    Raises :class:`ShapeTooSmall` naming the unit where the input became too small.
    """
    s = zoo.spec(model_name)
    units = zoo.cut_units(model_name, model)
    was_training = model.training
    model.eval()
    x = torch.zeros((1, *input_shape))
    infos: list[CutInfo] = []
    params = 0
    try:
        for i, (name, module) in enumerate(units):
            pre = s.pre_ops.get(name)
            try:
                if pre is not None:
                    x = pre(x)
                x = module(x)
            except RuntimeError as e:
                raise ShapeTooSmall(
                    f"input shape {','.join(map(str, input_shape))} is too small for {model_name}: "
                    f"it fails at {name} ({type(module).__name__}): {str(e).splitlines()[0]}"
                ) from None
            if x.numel() == 0 or (x.dim() == 4 and min(x.shape[2:]) < 1):
                raise ShapeTooSmall(
                    f"input shape {','.join(map(str, input_shape))} is too small for {model_name}: "
                    f"the activation after {name} is empty ({tuple(x.shape[1:])})"
                )
            params += sum(p.numel() for p in module.parameters())
            infos.append(CutInfo(i + 1, name, tuple(x.shape[1:]), params))
    finally:
        model.train(was_training)
    return infos[:-1]  # the last unit must stay on the server


def format_cut_table(infos: list[CutInfo]) -> str:
    rows = [("cut", "after", "activation (per sample)", "edge params", "activation bytes/sample")]
    for c in infos:
        rows.append((str(c.index), c.name, "x".join(map(str, c.activation_shape)), f"{c.edge_params:,}", f"{c.activation_bytes:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(v.rjust(w) if i in (0, 3, 4) else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
