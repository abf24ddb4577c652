"""Test bundle `wrong_checksum`: the clean CNN, but the card declares another sha256 (expected: rejected)."""
import torch
from torch import nn

from harness.data.models import SmallCNN


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(1, 10, width=8, hidden=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def create() -> nn.Module:
    return Net()
