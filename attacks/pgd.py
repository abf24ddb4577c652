"""PGD (Madry et al. 2018): projected sign-gradient (Linf) or normalised-gradient (L2) ascent.

Step size is relative to eps (Foolbox's `rel_stepsize`), so one config holds across an eps sweep.
Random start, restarts, CE / margin / DLR losses, and EOT over a randomised model's draws. Every
iterate, the final one included, is scored by the harness's verdict (`ModelAccess.step_verdict`:
free from the logits the gradient step already computed when they are the decision; one pass of
the true decision for a stand-in such as the hard-vote proxy), and per sample the most fooled
iterate across all restarts is returned: the highest fraction of fooled draws, ties to the highest
(EOT-mean) loss, never the first iterate that fooled *any* draw. On a randomised decision the
per-step scores are the attack's own few draws, so each restart's pick and its final iterate are
re-judged with the harness's R draws (`confirm`). No host synchronisation inside the loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.core.attack import Attack, AttackResult, register
from harness.core.losses import LOSSES, attack_loss
from harness.core.access import Capability, ModelAccess
from harness.core.errors import UserError
from harness.core.threat import ThreatModel
from harness.core.verdict import BestIterate, confirm


@register("pgd")
@dataclass
class PGD(Attack):
    """Projected gradient descent with restarts.

    Args:
        steps: iterations per restart.
        step_size: step as a fraction of eps (Madry: 2.5 / steps; default 2.5 / steps when None).
        restarts: independent random starts; the most fooled iterate of all restarts is returned.
        loss: "ce", "margin" (C&W) or "dlr".
        random_start: start inside the ball instead of at x.
        eot: gradient draws averaged per step on randomised models (expectation over transformation).
    """

    requires = Capability.GRADIENTS
    amp_safe = True  # sign / normalised steps of input gradients: autocast-safe (evaluator.amp)

    steps: int = 20
    step_size: float | None = None
    restarts: int = 1
    loss: str = "ce"
    random_start: bool = True
    eot: int = 1

    def validate(self) -> None:
        steps, restarts, eot = self.steps, self.restarts, self.eot
        if steps < 1 or restarts < 1 or eot < 1:
            raise UserError(f"pgd needs steps, restarts and eot >= 1 (got steps={steps}, restarts={restarts}, eot={eot})")
        if self.loss not in LOSSES:
            raise UserError(f"pgd loss={self.loss!r} unknown; use one of: {', '.join(LOSSES)}")
        if self.step_size is None:
            self.step_size = 2.5 / self.steps

    def run(self, access: ModelAccess, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
            generator: torch.Generator) -> AttackResult:
        alpha = self.step_size * threat.eps
        best = BestIterate(x)
        draws = self.eot if access.randomized else 1
        for _ in range(self.restarts):
            run = BestIterate(x)
            x_adv = threat.random_start(x, generator) if self.random_start else x.clone()
            for i in range(self.steps + 1):  # the last pass only judges the final iterate
                last = i == self.steps
                x_adv = x_adv.detach().requires_grad_(not last)
                grad = torch.zeros_like(x)
                logits, loss = [], torch.zeros(x.shape[0], device=x.device)
                with torch.set_grad_enabled(not last):
                    for _ in range(draws):
                        z = access.model(x_adv)
                        per_sample = attack_loss(self.loss, z, y)
                        if not last:
                            grad = grad + torch.autograd.grad(per_sample.sum(), x_adv)[0]
                        logits.append(z.detach())
                        loss = loss + per_sample.detach() / draws
                x_adv = x_adv.detach()
                run.offer(x_adv, access.step_verdict(x_adv, y, logits), loss)
                if not last:
                    x_adv = threat.step(x_adv, grad, x, alpha)
            confirm(run, access, x_adv, y, loss)  # per-step scores were estimates on a randomised decision
            best.merge(run)
        return AttackResult(best.x)
