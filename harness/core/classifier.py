"""The model contract every defense delivers and every attack consumes.

A `Classifier` wraps an `nn.Module` that takes images in [0, 1], NCHW, and returns logits (N, C),
with any normalisation inside. It also declares what the harness cannot observe cheaply:
randomness (so gradient attacks use EOT and decisions are taken over several draws), ensemble
structure (so ensemble-aware attacks can see the members) and a differentiable stand-in for a
non-differentiable decision (hard-vote ensembles).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Classifier:
    """A defended model as the harness sees it.

    Attributes:
        module: the decision model; `module(x).argmax(1)` is the prediction the harness verifies.
        num_classes: C.
        input_shape: (C, H, W) of one input.
        randomized: True if two calls on the same input may differ (random switching, noise).
        differentiable: what gradient attacks differentiate; defaults to `module`. A hard-vote
            ensemble sets a smoothed proxy here while `module` keeps the true votes.
        info: provenance and cost facts for the manifest (training passes, parameters, ...).
        views: alternative modules an attack config may ask to attack instead (`view: NAME` in
            the attack spec), e.g. "expected" (the exact expectation over a randomised model's
            paths) or "fixed" (randomness frozen by a seed: the control run). Decisions are always
            verified on `module`, never on a view.
    """

    module: nn.Module
    num_classes: int
    input_shape: tuple[int, int, int]
    randomized: bool = False
    differentiable: nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)
    views: dict[str, nn.Module] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.module.eval()
        if self.differentiable is None:
            self.differentiable = self.module
        self.differentiable.eval()

    @property
    def ensemble(self) -> nn.Module | None:
        """The module if it exposes members (see `harness.core.ensemble.Ensemble`), else None."""
        return self.module if hasattr(self.module, "members") else None

    def to(self, device: torch.device) -> "Classifier":
        self.module.to(device)
        if self.differentiable is not self.module:
            self.differentiable.to(device)
        for view in self.views.values():
            view.to(device)
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Hard prediction of one draw, no gradient."""
        return self.module(x).argmax(dim=1)
