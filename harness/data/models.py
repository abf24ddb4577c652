"""Built-in architectures. Every model takes [0, 1] NCHW images and returns logits.

Each is registered in `MODELS` as a `@dataclass` of its `model.*` options (conf/model/*.yaml):
`build_model(cfg, num_classes, input_shape)` builds one.

Normalisation lives inside the model (`mean`/`std` buffers, not saved in the state dict), so the
harness and every attack work on raw [0, 1] pixels. Layer names follow the usual CIFAR code
(`conv1`, `bn1`, `layer1..4`, `linear`), so published state dicts such as
`pyautoattack/examples/model_test.pt` load without key surgery.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.errors import UserError
from harness.core.registry import Plugin, Registry


class Normalized(nn.Module):
    """Base class: subtract `mean`, divide by `std` (per channel) before the network proper."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(Normalized):
    """Two conv blocks and a 2-layer head; for 28x28 (or any small) grey or colour images.

    `batchnorm=True` puts a BatchNorm after each conv and the hidden layer: the same cost, but it
    fits a 10,000-image Fashion-MNIST split in a few epochs (the poisoning track's converged recipe
    needs a model that fits its training set, the regime where shortcuts are learned).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, hidden: int = 128,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), batchnorm: bool = False,
                 pool: int = 4) -> None:
        super().__init__(mean, std)
        if int(pool) < 1:
            raise UserError(f"model.pool={pool} must be >= 1 (side of the pooled feature grid)")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(int(pool))  # 28x28 -> 14x14 after one max-pool -> pool x pool; 8x8 works too
        self.fc1 = nn.Linear(2 * width * int(pool) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.bn1 = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(2 * width) if batchnorm else nn.Identity()
        self.bn3 = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2) if x.shape[-1] >= 16 else x
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2) if x.shape[-1] >= 16 else x
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(F.relu(self.bn3(self.fc1(x))))


class ConvSmall(Normalized):
    """The verification benchmarks' small MNIST network (ERAN's ConvSmall family): two 4x4 stride-2
    convolutions, one hidden dense layer, ReLU, no pooling, as one `nn.Sequential` (`net`).

    Small enough that `attack=exact` decides robustness with a MIP; 28x28 -> 14x14 -> 7x7 with
    padding 1 (8x8 digits: 4x4 -> 2x2).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (8, 16), hidden: int = 100,
                 image_size: int = 28, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> None:
        super().__init__(mean, std)
        if len(channels) != 2 or min(channels) < 1 or hidden < 1:
            raise UserError(f"model.channels={list(channels)} and model.hidden={hidden}: give two positive channel counts and hidden >= 1")
        c1, c2 = (int(c) for c in channels)
        side = (image_size + 1) // 2
        side = (side + 1) // 2  # two 4x4 stride-2 convolutions with padding 1 halve each side (rounding up)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(c2 * side * side, int(hidden)), nn.ReLU(),
            nn.Linear(int(hidden), num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(Normalized):
    """ResNet in the CIFAR layout (3x3 stem, no max-pool): ResNet-18 = [2, 2, 2, 2] basic blocks."""

    def __init__(self, block: type[nn.Module], num_blocks: Sequence[int], in_channels: int = 3, num_classes: int = 10,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), preact: bool = False) -> None:
        super().__init__(mean, std)
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2))):
            layers = []
            for s in [stride] + [1] * (n - 1):
                layers.append(block(cin, planes, s))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        if preact:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(Normalized):
    """WideResNet-depth-widen (Zagoruyko & Komodakis), as used by TRADES (34-10) and many AT papers."""

    def __init__(self, depth: int = 28, widen: int = 10, in_channels: int = 3, num_classes: int = 10,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> None:
        super().__init__(mean, std)
        if (depth - 4) % 6:
            raise UserError(f"model.depth={depth} is invalid for a WideResNet; use 6n+4 (16, 28, 34, ...)")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        cin = widths[0]
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(WideBlock(cin, w, s))
                cin = w
            setattr(self, f"block{i + 1}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        out = F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1)
        return self.fc(out)


class ResNet20Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(Normalized):
    """ResNet-20 (He et al. 2016, CIFAR): 3 stages of 3 blocks, widths 16/32/64. Ensemble members in ADP/GAL/DVERGE/TRS."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> None:
        super().__init__(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, (w, stride) in enumerate(zip((16, 32, 64), (1, 2, 2))):
            blocks = []
            for s in [stride, 1, 1]:
                blocks.append(ResNet20Block(cin, w, s))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _norm_args(mean_in: Sequence[float], std_in: Sequence[float], channels: int) -> dict[str, Any]:
    mean, std = list(mean_in or [0.0]), list(std_in or [1.0])
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"model.mean/std have {len(mean)}/{len(std)} entries for {channels}-channel images; give one value "
                        f"or {channels} (e.g. model.mean=[{', '.join(['0.5'] * channels)}] model.std=[{', '.join(['0.5'] * channels)}])")
    if any(s <= 0 for s in std):
        raise UserError(f"model.std={std} must be positive")
    return {"mean": mean, "std": std}


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


def _stats(values: Sequence[float]) -> Any:
    return field(default_factory=lambda: list(values))


@dataclass
class Architecture(Plugin):
    """A registered architecture: its options, and `create` for a given input shape and class count.

    `mean`/`std` (one value, or one per channel) are the normalisation inside the model.
    """

    kind: ClassVar[str] = "model"

    mean: list[float] = _stats([0.0])
    std: list[float] = _stats([1.0])

    def create(self, input_shape: Sequence[int], num_classes: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def norm(self, channels: int) -> dict[str, Any]:
        return _norm_args(self.mean, self.std, channels)


MODELS: Registry[Architecture] = Registry("model", Architecture)


@MODELS.register("small_cnn")
@dataclass
class SmallCNNArch(Architecture):
    """`SmallCNN`, sized for 28x28 grey images (works on 8x8 too); MNIST statistics by default."""

    width: int = 32
    hidden: int = 128
    batchnorm: bool = False  # BatchNorm after each conv (the converged poisoning recipe)
    pool: int = 4  # adaptive-pool output size before the classifier head
    mean: list[float] = _stats([0.1307])
    std: list[float] = _stats([0.3081])

    def create(self, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        c = int(input_shape[0])
        return SmallCNN(c, num_classes, width=self.width, hidden=self.hidden, batchnorm=self.batchnorm,
                        pool=self.pool, **self.norm(c))


@MODELS.register("resnet18")
@dataclass
class ResNet18Arch(Architecture):
    """ResNet-18, CIFAR layout; mean/std 0/1 as pyautoattack's examples/model_test.pt was trained."""

    def create(self, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        c = int(input_shape[0])
        return ResNet(BasicBlock, (2, 2, 2, 2), c, num_classes, **self.norm(c))


@MODELS.register("preact_resnet18")
@dataclass
class PreActResNet18Arch(Architecture):
    """Pre-activation ResNet-18 with CIFAR-10 statistics."""

    mean: list[float] = _stats(CIFAR_MEAN)
    std: list[float] = _stats(CIFAR_STD)

    def create(self, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        c = int(input_shape[0])
        return ResNet(PreActBlock, (2, 2, 2, 2), c, num_classes, preact=True, **self.norm(c))


@MODELS.register("wrn")
@dataclass
class WideResNetArch(Architecture):
    """WideResNet-depth-widen; conf/model/wrn28_10.yaml and wrn34_10.yaml are its presets."""

    depth: int = 28
    widen: int = 10
    mean: list[float] = _stats(CIFAR_MEAN)
    std: list[float] = _stats(CIFAR_STD)

    def create(self, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        c = int(input_shape[0])
        return WideResNet(self.depth, self.widen, c, num_classes, **self.norm(c))


@MODELS.register("resnet20")
@dataclass
class ResNet20Arch(Architecture):
    """ResNet-20 with CIFAR-10 statistics: the ensemble members of ADP / GAL / DVERGE / TRS."""

    mean: list[float] = _stats(CIFAR_MEAN)
    std: list[float] = _stats(CIFAR_STD)

    def create(self, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        c = int(input_shape[0])
        return ResNet20(c, num_classes, **self.norm(c))


@MODELS.register("conv_small")
@dataclass
class ConvSmallArch(Architecture):
    """`ConvSmall`: the verification benchmarks' small MNIST network (`attack=exact` decides it)."""

    channels: list[int] = field(default_factory=lambda: [8, 16])
    hidden: int = 100
    mean: list[float] = _stats([0.1307])
    std: list[float] = _stats([0.3081])

    def create(self, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        c = int(input_shape[0])
        return ConvSmall(c, num_classes, channels=tuple(self.channels), hidden=self.hidden,
                         image_size=int(input_shape[-1]), **self.norm(c))


BUILDERS = MODELS  # the older name: `name in BUILDERS`, `sorted(BUILDERS)`


def model_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model config with every default filled in: what a checkpoint's cache key should hold."""
    arch = MODELS.build(dict(cfg or {}))
    return {"name": arch.name, **arch.describe()}


def build_model(cfg: dict[str, Any], num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """Instantiate the architecture named by `cfg["name"]` for inputs of `input_shape` (C, H, W)."""
    return MODELS.build(dict(cfg or {})).create(input_shape, int(num_classes))


def import_model_file(path: Path) -> Any:
    """Import a user's model file as a module (it must define `create()`)."""
    if not path.is_file():
        raise UserError(f"defense.model_file={str(path)!r} does not exist; give a .py file that defines create()")
    name = f"arena_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"defense.model_file={str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"defense.model_file={str(path)!r} fails to import ({type(exc).__name__}: {exc})") from None
    if not callable(getattr(module, "create", None)):
        raise UserError(f"defense.model_file={str(path)!r} defines no create() returning the model")
    return module
