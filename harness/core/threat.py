"""Threat models: the norm ball plus the [0, 1] box, its geometry, and verification.

The geometry every attack, in-training attack and health probe uses is written once here:
random starts, the ascent direction (sign for Linf, the normalised gradient for L2), the projected
step and the projection, all batched on the input's device with no host synchronisation.

Every attack works in [0, 1] image space; the harness re-checks whatever an attack returns with
`ThreatModel.violations`, so an attack cannot inflate a result by stepping outside the ball.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.core.errors import UserError
from harness.core.numbers import as_number

NORMS = ("Linf", "L2")
# Float slack when checking a returned example: attacks work in float32, external checkers too.
ABS_TOL = 1e-6


def _unit_l2(v: torch.Tensor) -> torch.Tensor:
    """Each sample's tensor divided by its L2 norm (zero stays zero)."""
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    """An Lp ball of radius `eps` around the clean input, intersected with the [0, 1] box."""

    norm: str = "Linf"
    eps: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", as_number(self.eps))  # "8/255" as papers write it
        if self.norm not in NORMS:
            raise UserError(f"threat.norm={self.norm!r} is not supported; use one of: {', '.join(NORMS)}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise UserError(f"threat.eps={self.eps!r} must be > 0; e.g. threat.eps=8/255 or 0.031")
        if not math.isfinite(self.eps):
            raise UserError(f"threat.eps={self.eps!r} must be a finite radius; e.g. threat.eps=0.5 for L2, 0.031 (8/255) for Linf")
        if self.norm == "Linf" and self.eps > 1:
            raise UserError(
                f"threat.eps={self.eps} exceeds 1 for Linf on [0,1] images; use a fraction such as 0.031 (8/255)"
            )

    @property
    def name(self) -> str:
        """Short id used in leaderboard rows, e.g. `Linf-0.0314`."""
        return f"{self.norm}-{self.eps:.4g}"

    def shrunk(self, margin: float) -> "ThreatModel":
        """The same ball, `margin` smaller (never below half): iterates kept a float's breadth inside.

        LAFEAT and MORA (reference code) run at eps - 1.9e-8 so rounding never leaves the ball.
        """
        return ThreatModel(self.norm, max(self.eps - margin, self.eps * 0.5))

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
                     sphere: bool = False) -> torch.Tensor:
        """A random point of the ball around `x`, clipped to the box.

        Default (Madry's PGD start): Linf uniform per pixel in [-eps, eps]; L2 a uniform direction
        times a radius uniform in [0, eps]. `sphere=True` (the LAFEAT / MORA reference start): the
        noise (Linf uniform per pixel, L2 Gaussian) rescaled so its norm is exactly eps. Draws
        come from `generator`, or the global RNG of `x`'s device when None.
        """
        shape = (-1, *([1] * (x.dim() - 1)))
        if self.norm == "Linf":
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
            if sphere:
                noise = noise / noise.flatten(1).abs().amax(1).clamp_min(1e-12).view(shape)
            return (x + noise * self.eps).clamp(0.0, 1.0)
        direction = _unit_l2(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
        if sphere:
            return (x + direction * self.eps).clamp(0.0, 1.0)
        radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) * self.eps
        return (x + direction * radius.view(shape)).clamp(0.0, 1.0)

    def ascent_direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit norm: sign (Linf), gradient / its L2 norm (L2).

        A zero gradient gives a zero direction (no step), never NaN.
        """
        if self.norm == "Linf":
            return grad.sign()
        return _unit_l2(grad)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, size: float) -> torch.Tensor:
        """One projected ascent step of length `size` along `grad`'s direction, back into ball and box."""
        return self.project(x_adv + size * self.ascent_direction(grad), x)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project onto the ball around `x`, then onto the box. No gradient bookkeeping, no host sync.

        Linf clamps each pixel to [x - eps, x + eps] (a point already inside is returned unchanged);
        L2 rescales the perturbation to norm eps when it is longer.
        """
        if self.norm == "Linf":
            return torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)
        delta = x_adv - x
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
