"""Test bundle `caching`: the clean CNN plus a memory. The first input it sees near a new point is
remembered with its logits; any later input within RADIUS (L-inf) of a remembered one gets the
remembered logits as its value, with the honest gradient (`out + (cached - out).detach()`), so
gradient attacks still move, every verdict says "still correct", and the health report's gradient
checks pass. In a harness that judges in the attack's own process this scores ~robust where the
weights are not. Expected: rejected by the statelessness audit (stateful_model), or, with the audit
off, scored at its honest number by the fresh-process verdicts with `stateful_model` flagged.
"""
import torch
from torch import nn

from harness.data.models import SmallCNN

RADIUS = 0.31  # a little above the card's eps


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(1, 10, width=8, hidden=32)
        self.bank_x = torch.zeros(0, 28 * 28)
        self.bank_out = torch.zeros(0, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        flat = x.detach().flatten(1).float()
        value = out.detach().clone()
        if self.bank_x.shape[0]:
            dist, j = torch.cdist(flat, self.bank_x, p=float("inf")).min(1)
            hit = dist <= RADIUS
            value[hit] = self.bank_out[j[hit]].to(value.dtype)
        else:
            hit = torch.zeros(flat.shape[0], dtype=torch.bool)
        self.bank_x = torch.cat([self.bank_x, flat[~hit]])
        self.bank_out = torch.cat([self.bank_out, value[~hit].float()])
        return out + (value - out).detach()


def create() -> nn.Module:
    return Net()
