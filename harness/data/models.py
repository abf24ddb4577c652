"""Built-in architectures. Every model takes [0, 1] NCHW images and returns logits.

Normalisation lives inside the model (`mean`/`std` buffers, not saved in the state dict), so the
harness and every attack work on raw [0, 1] pixels. Layer names follow the usual CIFAR code
(`conv1`, `bn1`, `layer1..4`, `linear`), so published state dicts such as
`pyautoattack/examples/model_test.pt` load without key surgery.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.errors import UserError, choices_error


class Normalized(nn.Module):
    """Base class: subtract `mean`, divide by `std` (per channel) before the network proper."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(Normalized):
    """Two conv blocks and a 2-layer head; for 28x28 (or any small) grey or colour images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, hidden: int = 128,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> None:
        super().__init__(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)  # 28x28 -> 7x7 after two max-pools -> 4x4; 8x8 works too
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2) if x.shape[-1] >= 16 else F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2) if x.shape[-1] >= 16 else F.relu(self.conv2(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


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


def _norm_args(cfg: dict[str, Any], channels: int) -> dict[str, Any]:
    mean = list(cfg.get("mean") or [0.0])
    std = list(cfg.get("std") or [1.0])
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"model.mean/std have {len(mean)}/{len(std)} entries for {channels}-channel images; give 1 or {channels}")
    if any(s <= 0 for s in std):
        raise UserError(f"model.std={std} must be positive")
    return {"mean": mean, "std": std}


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda c, k, cfg: SmallCNN(c, k, width=int(cfg.get("width", 32)), hidden=int(cfg.get("hidden", 128)), **_norm_args(cfg, c)),
    "resnet18": lambda c, k, cfg: ResNet(BasicBlock, (2, 2, 2, 2), c, k, **_norm_args(cfg, c)),
    "preact_resnet18": lambda c, k, cfg: ResNet(PreActBlock, (2, 2, 2, 2), c, k, preact=True, **_norm_args(cfg, c)),
    "wrn": lambda c, k, cfg: WideResNet(int(cfg.get("depth", 28)), int(cfg.get("widen", 10)), c, k, **_norm_args(cfg, c)),
    "resnet20": lambda c, k, cfg: ResNet20(c, k, **_norm_args(cfg, c)),
    "conv_small": lambda c, k, cfg: ConvSmall(c, k, channels=tuple(cfg.get("channels") or (8, 16)),
                                              hidden=int(cfg.get("hidden", 100)), image_size=int(cfg.get("_image_size", 28)),
                                              **_norm_args(cfg, c)),
}


def build_model(cfg: dict[str, Any], num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """Instantiate the architecture named by `cfg["name"]` for inputs of `input_shape` (C, H, W)."""
    name = cfg.get("name")
    if name not in BUILDERS:
        raise choices_error("model", name, list(BUILDERS))
    if name == "conv_small":  # the dense layer's width depends on the image size
        cfg = {**cfg, "_image_size": int(input_shape[-1])}
    return BUILDERS[name](int(input_shape[0]), int(num_classes), cfg)
