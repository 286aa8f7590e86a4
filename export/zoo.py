"""The model zoo, written by hand with torchvision-compatible ``state_dict`` keys.

torchvision from PyPI does not import beside the CPU build of torch this project
pins (``operator torchvision::nms does not exist``), so the architectures are
re-implemented here, module for module, with the same attribute names. A
checkpoint saved from ``torchvision.models.<name>()`` therefore loads with
:func:`load_weights` (see there for how a 3-channel stem and a different head are
adapted).

Each model also declares its *cut units*: the ordered list of top-level pieces a
``--cut`` may split between. For ResNet and ShuffleNet these are the model's
children, as in ``nn.Sequential(*list(model.children())[:N])``. For VGG and
MobileNetV2 they are the children of the feature extractor (``features.0``,
``features.1``, ...) followed by the remaining top-level children. The glue that
``forward`` applies between units (``torch.flatten`` before ``fc``, the global mean
of ShuffleNet) is declared in ``pre_ops`` so that a model cut in two computes
exactly what the whole model computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# --------------------------------------------------------------------------- ResNet


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers: list[int], num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- VGG

_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """torchvision's ``Conv2dNormActivation`` with ReLU6 (keys ``0.weight``, ``1.*``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class MBInvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2):
        super().__init__()
        setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
        cin = 32
        last = 1280
        features: list[nn.Module] = [ConvBNReLU6(in_channels, cin, stride=2)]
        for t, c, n, s in setting:
            cout = _make_divisible(c)
            for i in range(n):
                features.append(MBInvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU6(cin, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), (1, 1)), 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- ShuffleNetV2


def _channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleInvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, branch, 1, 1, 0, bias=False),
                nn.BatchNorm2d(branch),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        c2 = cin if stride > 1 else branch
        self.branch2 = nn.Sequential(
            nn.Conv2d(c2, branch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    stage2: nn.Sequential  # set by name in __init__
    stage3: nn.Sequential
    stage4: nn.Sequential

    def __init__(self, stages_repeats: list[int], stages_out: list[int], num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        cin = in_channels
        cout = stages_out[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )
        cin = cout
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for name, repeats, cout in zip(("stage2", "stage3", "stage4"), stages_repeats, stages_out[1:]):
            seq = [ShuffleInvertedResidual(cin, cout, 2)] + [
                ShuffleInvertedResidual(cout, cout, 1) for _ in range(repeats - 1)
            ]
            setattr(self, name, nn.Sequential(*seq))
            cin = cout
        cout = stages_out[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(cout, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.fc(self.conv5(x).mean([2, 3]))


# --------------------------------------------------------------------------- registry


def _flatten(x: Tensor) -> Tensor:
    return torch.flatten(x, 1)


def _global_mean(x: Tensor) -> Tensor:
    return x.mean([2, 3])


def _pool_flatten(x: Tensor) -> Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one zoo model and where it may be cut."""

    name: str
    build: Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> model
    #: container whose children are cut units before the remaining top-level children
    feature_container: str | None
    #: glue applied to the input of a unit (by the unit's dotted name), as in forward()
    pre_ops: dict[str, Callable[[Tensor], Tensor]]
    #: name of the first convolution, adapted to the input channels
    first_conv: str
    #: prefix of the classification head's parameters
    head: str
    description: str


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(
        "resnet18", lambda k, c: ResNet([2, 2, 2, 2], k, c), None, {"fc": _flatten}, "conv1", "fc.",
        "ResNet-18 (torchvision resnet18 keys)",
    ),
    "resnet34": ModelSpec(
        "resnet34", lambda k, c: ResNet([3, 4, 6, 3], k, c), None, {"fc": _flatten}, "conv1", "fc.",
        "ResNet-34 (torchvision resnet34 keys)",
    ),
    "vgg11": ModelSpec(
        "vgg11", lambda k, c: VGG(_VGG11, k, c), "features", {"classifier": _flatten}, "features.0",
        "classifier.6.", "VGG-11 without BatchNorm (torchvision vgg11 keys)",
    ),
    "mobilenet_v2": ModelSpec(
        "mobilenet_v2", lambda k, c: MobileNetV2(k, c), "features", {"classifier": _pool_flatten},
        "features.0.0", "classifier.1.", "MobileNetV2 width 1.0 (torchvision mobilenet_v2 keys)",
    ),
    "shufflenet_v2_x1_0": ModelSpec(
        "shufflenet_v2_x1_0", lambda k, c: ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], k, c), None,
        {"fc": _global_mean}, "conv1.0", "fc.", "ShuffleNetV2 x1.0 (torchvision shufflenet_v2_x1_0 keys)",
    ),
}


def available() -> list[str]:
    return sorted(MODELS)


def spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}") from None


def build(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Builds a freshly initialised zoo model (seed torch yourself for reproducibility)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return spec(name).build(num_classes, in_channels)


def cut_units(name: str, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ordered (dotted name, module) pieces a cut may split between."""
    s = spec(name)
    units: list[tuple[str, nn.Module]] = []
    for child_name, child in model.named_children():
        if child_name == s.feature_container:
            units += [(f"{child_name}.{i}", m) for i, m in child.named_children()]
        else:
            units.append((child_name, child))
    return units


def load_weights(model: nn.Module, name: str, state: dict[str, Tensor]) -> list[str]:
    """Loads a torchvision-style ``state_dict`` into a zoo model.

    Two adaptations, each reported in the returned list of notes:

    * first convolution: a checkpoint with a different number of input channels
      is adapted by summing its kernel over input channels into 1 channel (a
      grey image seen as equal R=G=B gives the same response), or by tiling the
      mean kernel over the new channels otherwise;
    * head: if the classifier's output size differs (``--num-classes``), the
      checkpoint's head is dropped and the fresh initialisation kept.

    Anything else that does not match raises ValueError naming the keys.
    """
    s = spec(name)
    own = model.state_dict()
    state = dict(state)
    notes: list[str] = []
    w_key = f"{s.first_conv}.weight"
    if w_key in state and w_key in own and state[w_key].shape != own[w_key].shape:
        w = state[w_key]
        cin = own[w_key].shape[1]
        if w.shape[0] != own[w_key].shape[0] or w.shape[2:] != own[w_key].shape[2:]:
            raise ValueError(f"{w_key}: checkpoint shape {tuple(w.shape)} cannot be adapted to {tuple(own[w_key].shape)}")
        if cin == 1:
            state[w_key] = w.sum(dim=1, keepdim=True)
        else:
            state[w_key] = w.mean(dim=1, keepdim=True).repeat(1, cin, 1, 1) * (w.shape[1] / cin)
        notes.append(f"{w_key}: adapted {w.shape[1]} input channels to {cin}")
    head_keys = [k for k in own if k.startswith(s.head)]
    if any(k in state and state[k].shape != own[k].shape for k in head_keys):
        for k in head_keys:
            state.pop(k, None)
            state[k] = own[k]
        notes.append(f"{s.head.rstrip('.')}: checkpoint head has a different number of classes; kept a fresh head")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match {name}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k in own if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(
            "checkpoint shapes do not match: "
            + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:5])
        )
    model.load_state_dict(state, strict=True)
    return notes
