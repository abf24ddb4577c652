"""Threat models: the norm ball plus the [0, 1] box, projection and verification.

Every attack works in [0, 1] image space; the harness re-checks whatever an attack returns with
`ThreatModel.violations`, so an attack cannot inflate a result by stepping outside the ball.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.core.errors import UserError

NORMS = ("Linf", "L2")
# Float slack when checking a returned example: attacks work in float32, external checkers too.
ABS_TOL = 1e-6


@dataclass(frozen=True)
class ThreatModel:
    """An Lp ball of radius `eps` around the clean input, intersected with the [0, 1] box."""

    norm: str = "Linf"
    eps: float = 0.3

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise UserError(f"threat.norm={self.norm!r} is not supported; use one of: {', '.join(NORMS)}")
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise UserError(f"threat.eps={self.eps!r} must be > 0; e.g. threat.eps=0.031 (8/255)")
        if self.norm == "Linf" and self.eps > 1:
            raise UserError(
                f"threat.eps={self.eps} exceeds 1 for Linf on [0,1] images; use a fraction such as 0.031 (8/255)"
            )

    @property
    def name(self) -> str:
        """Short id used in leaderboard rows, e.g. `Linf-0.0314`."""
        return f"{self.norm}-{self.eps:.4g}"

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project onto the ball around `x`, then onto the box. Differentiable-free, in place safe."""
        delta = x_adv - x
        if self.norm == "Linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            factor = (self.eps / norms).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (delta.dim() - 1)))
        return (x + delta).clamp(0.0, 1.0)

    def norms(self, x_adv: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (Linf, L2) norms of the perturbation."""
        delta = (x_adv - x).flatten(1)
        return delta.abs().amax(dim=1), delta.norm(p=2, dim=1)

    def violations(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample bool: outside the ball or box beyond float tolerance, or not finite."""
        finite = torch.isfinite(x_adv.flatten(1)).all(dim=1)
        x_safe = torch.where(torch.isfinite(x_adv), x_adv, x)
        flat = x_safe.flatten(1)
        out_of_box = (flat.amin(dim=1) < -ABS_TOL) | (flat.amax(dim=1) > 1 + ABS_TOL)
        linf, l2 = self.norms(x_safe, x)
        size = linf if self.norm == "Linf" else l2
        out_of_ball = size > self.eps * (1 + 1e-6) + ABS_TOL
        return ~finite | out_of_box | out_of_ball
