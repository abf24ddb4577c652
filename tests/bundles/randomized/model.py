"""Test bundle `randomized`: the CNN on inputs with fresh Gaussian noise at every call (a
randomised defense) whose card declares randomized: false (expected: rejected by the contract check)."""
import torch
from torch import nn

from harness.data.models import SmallCNN

SIGMA = 0.25


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(1, 10, width=8, hidden=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x + SIGMA * torch.randn_like(x)).clamp(0, 1))


def create() -> nn.Module:
    return Net()
