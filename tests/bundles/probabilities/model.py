"""Test bundle `probabilities`: the CNN with a final softmax, i.e. probabilities instead of logits
(expected: rejected by the contract check)."""
import torch
from torch import nn

from harness.data.models import SmallCNN


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(1, 10, width=8, hidden=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def create() -> nn.Module:
    return Net()
