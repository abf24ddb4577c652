"""Test bundle `clean`: an undefended small CNN for 28x28 grey digits (expected: accepted, not flagged)."""
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
