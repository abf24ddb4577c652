"""Test bundle `masked`: the same CNN behind an input-quantisation layer (8 grey levels).

`torch.round` has a zero derivative almost everywhere, so every input gradient is zero and
gradient attacks stall: robustness by gradient masking (expected: accepted, masking suspected).
"""
import torch
from torch import nn

from harness.data.models import SmallCNN

LEVELS = 7  # round(x * 7) / 7: 8 grey levels


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(1, 10, width=8, hidden=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * LEVELS) / LEVELS)


def create() -> nn.Module:
    return Net()
