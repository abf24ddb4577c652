"""FGSM (Goodfellow et al. 2015): one step of size eps along the sign of the loss gradient.

The worked example of docs/extending.md (the page shows this file verbatim; a test holds the two
equal): the cheapest gradient attack, a sanity floor for any suite (one forward and one backward
pass per sample; for L2, the step follows the normalised gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.core.access import Capability, ModelAccess
from harness.core.attack import Attack, AttackResult, register
from harness.core.errors import UserError
from harness.core.losses import LOSSES, attack_loss
from harness.core.threat import ThreatModel


@register("fgsm")
@dataclass
class FGSM(Attack):
    """Fast gradient sign method. `step_size` is a fraction of eps (1.0 = the whole radius)."""

    requires = Capability.GRADIENTS
    amp_safe = True  # sign / normalised steps of input gradients: autocast-safe (evaluator.amp)

    step_size: float = 1.0
    loss: str = "ce"  # ce | margin | dlr

    def validate(self) -> None:
        if not 0 < self.step_size <= 1:
            raise UserError(f"fgsm step_size={self.step_size} must be in (0, 1] (a fraction of eps)")
        if self.loss not in LOSSES:
            raise UserError(f"fgsm loss={self.loss!r} unknown; use one of: {', '.join(LOSSES)}")

    def run(self, access: ModelAccess, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
            generator: torch.Generator) -> AttackResult:
        x_adv = x.clone().requires_grad_(True)
        loss = attack_loss(self.loss, access.eot_logits(x_adv), y).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        if threat.norm == "Linf":
            step = grad.sign()
        else:
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        return AttackResult(threat.project(x + self.step_size * threat.eps * step, x))
