"""PGD (Madry et al. 2018): projected sign-gradient (Linf) or normalised-gradient (L2) ascent.

Step size is relative to eps (Foolbox's `rel_stepsize`), so one config holds across an eps sweep.
Random start, restarts (best per sample kept), CE / margin / DLR losses, and EOT over a
randomised model's draws. Every iterate is checked for misclassification with the logits the
gradient step already computed, plus one final check after the last step, so no success found
along the way is lost. No host synchronisation inside the loop.
"""
from __future__ import annotations

import torch

from harness.core.attack import Attack, AttackResult, register
from harness.core.losses import LOSSES, attack_loss
from harness.core.access import Capability, ModelAccess
from harness.core.errors import UserError
from harness.core.threat import ThreatModel


def _l2_normalize(g: torch.Tensor) -> torch.Tensor:
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


def random_start(x: torch.Tensor, threat: ThreatModel, gen: torch.Generator) -> torch.Tensor:
    """Uniform in the Linf ball, or uniform direction times uniform radius in the L2 ball."""
    if threat.norm == "Linf":
        noise = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * threat.eps
    else:
        direction = _l2_normalize(torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype))
        radius = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype) * threat.eps
        noise = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return (x + noise).clamp(0, 1)


@register("pgd")
class PGD(Attack):
    """Projected gradient descent with restarts.

    Args:
        steps: iterations per restart.
        step_size: step as a fraction of eps (Madry: 2.5 / steps; default 2.5 / steps when None).
        restarts: independent random starts; a sample counts as broken if any restart breaks it.
        loss: "ce", "margin" (C&W) or "dlr".
        random_start: start inside the ball instead of at x.
        eot: gradient draws averaged per step on randomised models (expectation over transformation).
    """

    requires = Capability.GRADIENTS

    def __init__(self, steps: int = 20, step_size: float | None = None, restarts: int = 1, loss: str = "ce",
                 random_start: bool = True, eot: int = 1) -> None:
        if steps < 1 or restarts < 1 or eot < 1:
            raise UserError(f"pgd needs steps, restarts and eot >= 1 (got steps={steps}, restarts={restarts}, eot={eot})")
        if loss not in LOSSES:
            raise UserError(f"pgd loss={loss!r} unknown; use one of: {', '.join(LOSSES)}")
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else 2.5 / self.steps
        self.restarts = int(restarts)
        self.loss = loss
        self.random_start = bool(random_start)
        self.eot = int(eot)

    def run(self, access: ModelAccess, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
            generator: torch.Generator) -> AttackResult:
        alpha = self.step_size * threat.eps
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        draws = self.eot if access.randomized else 1
        for _ in range(self.restarts):
            x_adv = random_start(x, threat, generator) if self.random_start else x.clone()
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                grad = torch.zeros_like(x)
                fooled = torch.zeros_like(found)
                for _ in range(draws):
                    logits = access.model(x_adv)
                    loss = attack_loss(self.loss, logits, y).sum()
                    grad = grad + torch.autograd.grad(loss, x_adv)[0]
                    fooled = fooled | (logits.detach().argmax(1) != y)
                x_adv = x_adv.detach()
                newly = fooled & ~found
                best = torch.where(newly.view(-1, 1, 1, 1), x_adv, best)
                found = found | fooled
                step = grad.sign() if threat.norm == "Linf" else _l2_normalize(grad)
                x_adv = threat.project(x_adv + alpha * step, x)
            with torch.no_grad():
                fooled = access.model(x_adv).argmax(1) != y
            best = torch.where((fooled & ~found).view(-1, 1, 1, 1), x_adv, best)
            found = found | fooled
        # samples never fooled return the final iterate of the last restart (harmless; verified anyway)
        best = torch.where(found.view(-1, 1, 1, 1), best, x_adv)
        return AttackResult(best)
