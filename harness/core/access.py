"""Access by capability, and cost counting.

An attack declares what it needs (`Capability`); the evaluator hands it exactly that, wrapped so
that every forward and backward image-pass is counted. A score-only attack receives a
`harness.core.oracle.QueryOracle` and never the module, so threat-model honesty is structural.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn


class Capability(str, Enum):
    """What an attack needs from the model."""

    GRADIENTS = "gradients"  # white-box: a differentiable model returning logits
    FEATURES = "features"  # white-box plus a latent feature tap (LAFEAT)
    ENSEMBLE = "ensemble"  # white-box plus the ensemble's members (MORA)
    SCORES = "scores"  # black-box: a counted, budgeted query oracle only


@dataclass
class PassCounter:
    """Image-passes through the model: one forward of a batch of B images counts B."""

    forward: int = 0
    backward: int = 0

    def reset(self) -> None:
        self.forward = 0
        self.backward = 0


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts the input-gradient image-passes (exact, no host sync)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counter: PassCounter) -> torch.Tensor:  # type: ignore[override]
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.counter.backward += grad.shape[0]
        return grad, None


def count_input(x: torch.Tensor, counter: PassCounter) -> torch.Tensor:
    """Count one forward pass of `x`, and its backward pass if a gradient flows back to it."""
    counter.forward += x.shape[0]
    if x.requires_grad:
        return _CountBackward.apply(x, counter)
    return x


class CountingModule(nn.Module):
    """Wraps a model so that every call counts forward (and backward) image-passes."""

    def __init__(self, module: nn.Module, counter: PassCounter) -> None:
        super().__init__()
        self.module = module
        self.counter = counter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(count_input(x, self.counter))


@dataclass
class ModelAccess:
    """White-box access: a counted differentiable model.

    `eot` is the number of random draws a gradient attack should average when `randomized`
    (expectation over transformation); 1 for deterministic models.
    """

    model: nn.Module
    num_classes: int
    counter: PassCounter
    randomized: bool = False
    eot: int = 1
    # The true decision when `model` is only a differentiable stand-in (hard-vote ensembles):
    # attacks that keep their own "already fooled" bookkeeping should judge with this.
    decision: nn.Module | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def eot_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Mean logits over `eot` draws (one draw for deterministic models)."""
        if not self.randomized or self.eot <= 1:
            return self.model(x)
        return torch.stack([self.model(x) for _ in range(self.eot)]).mean(0)


@dataclass
class EnsembleAccess(ModelAccess):
    """White-box access to an ensemble: the aggregate plus each counted member.

    `mode` is the aggregation rule (softmax, logits, voting). Member passes are counted on the
    same counter: one ensemble forward of B images through M members counts M*B member passes
    under `member_counter` and B under `counter`.
    """

    members: list[nn.Module] | None = None
    mode: str = "softmax"
    member_counter: PassCounter | None = None
    tie_break: str = "lowest"
    vote_sharpness: float = 10.0


@dataclass
class FeatureAccess(ModelAccess):
    """White-box access plus a latent feature tap: `features(x) -> (feature_map, logits)`.

    Built by `harness.core.features` for attacks declaring `Capability.FEATURES`; the tap is one
    counted forward pass that returns both the tapped map and the final logits.
    """

    tap: nn.Module | None = None
    layer: str = ""

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.tap is not None
        return self.tap(count_input(x, self.counter))
