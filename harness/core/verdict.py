"""The harness's verdict as attacks see it, and the bookkeeping that keeps the right iterate.

An attack that keeps a "best iterate so far" or stops attacking samples it thinks are fooled is
only as good as its judgement. Two ways to judge wrongly, both measured on this project:

- on a randomised model, calling a sample fooled when *any* draw misclassifies and freezing that
  early iterate, although later iterates are fooled in far more draws (EOT-PGD then looked weaker
  than single-draw PGD);
- on a hard-vote ensemble, judging with the smoothed vote proxy that the attack differentiates,
  although the harness judges with the votes.

So attacks judge with `ModelAccess.verdict` (the harness's own rule: the true decision, over the
harness's R draws when the classifier is randomised), score an iterate by the *fraction* of
decision draws it fools, keep per sample the iterate with the highest score (ties: the highest
loss; `BestIterate`), and treat a sample as done only when every draw is fooled. The harness calls
a sample broken when more than half of its draws are fooled (`is_fooled`), as the evaluator does.

For code that judges success from the very logits it differentiates (the reference AutoAttack),
`StraightThrough` (or a proxy's fused `straight_through()`) is a stand-in whose forward value is the true decision's scores and whose
gradient is the differentiable proxy's, so its internal judgement is the harness's.
"""
from __future__ import annotations

import torch
from torch import nn

FOOLED_ABOVE = 0.5  # the evaluator's rule: broken when more than half of the R draws are wrong


def is_fooled(score: torch.Tensor) -> torch.Tensor:
    """Per-sample bool from verdict scores (fraction of decision draws fooled), the harness's rule."""
    return score > FOOLED_ABOVE


def fully_fooled(score: torch.Tensor) -> torch.Tensor:
    """Every decision draw fooled: nothing left to gain by attacking the sample further."""
    return score >= 1.0


class BestIterate:
    """Per sample, the most fooled iterate offered so far: highest verdict score, ties to higher loss,
    and a full tie to the later iterate.

    The later iterate wins a full tie so that a model whose answers do not change as the attack
    moves (a stateful model replaying remembered logits, a flat region) gets the attack's last
    point, not its first: the point the gradient actually reached, which a fresh-process verdict
    can then judge. Starts at `x` with score -1 (below any real score), so the first offer always
    replaces it.
    Everything stays on the device; no host synchronisation.
    """

    def __init__(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self.x = x.detach().clone()
        self.score = torch.full((n,), -1.0, device=x.device)
        self.loss = torch.full((n,), float("-inf"), device=x.device)
        self._view = (-1,) + (1,) * (x.dim() - 1)

    def offer(self, x_it: torch.Tensor, score: torch.Tensor, loss: torch.Tensor,
              idx: torch.Tensor | None = None) -> torch.Tensor:
        """Keep `x_it` where it beats the kept iterate; returns the per-sample replaced mask.

        With `idx`, `x_it`, `score` and `loss` are for the samples `idx` of this tracker (a chunk).
        """
        score = score.to(self.score.dtype)
        loss = loss.detach().to(self.loss.dtype)
        if idx is None:
            kept_x, kept_score, kept_loss = self.x, self.score, self.loss
        else:
            kept_x, kept_score, kept_loss = self.x[idx], self.score[idx], self.loss[idx]
        better = (score > kept_score) | ((score == kept_score) & (loss >= kept_loss))
        new_x = torch.where(better.view(self._view), x_it.detach(), kept_x)
        new_score = torch.where(better, score, kept_score)
        new_loss = torch.where(better, loss, kept_loss)
        if idx is None:
            self.x, self.score, self.loss = new_x, new_score, new_loss
        else:
            self.x[idx], self.score[idx], self.loss[idx] = new_x, new_score, new_loss
        return better

    def merge(self, other: "BestIterate") -> torch.Tensor:
        """Offer another tracker's kept iterates (e.g. one restart's) to this one."""
        return self.offer(other.x, other.score, other.loss)


def confirm(best: BestIterate, access, x_last: torch.Tensor, y: torch.Tensor, loss_last: torch.Tensor) -> None:
    """Re-score `best` and the final iterate with the harness's verdict and keep the better of the two.

    Needed where per-step scores are estimates (a randomised decision: the attack's own few draws);
    a no-op where they are exact (`access.draws == 1`).
    """
    if access.draws <= 1:
        return
    best.score = access.verdict(best.x, y).to(best.score.dtype)
    best.offer(x_last, access.verdict(x_last, y), loss_last)


class _ValueOf(torch.autograd.Function):
    """Returns `value` exactly; the gradient goes to `proxy` unchanged (a straight-through estimator)."""

    @staticmethod
    def forward(ctx, proxy: torch.Tensor, value: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def value_of(value: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass (bit for bit, so argmax is exactly the decision's), `proxy`'s gradient."""
    return _ValueOf.apply(proxy, value)


class StraightThrough(nn.Module):
    """Forward value = `decision(x)`, gradient = `proxy(x)`'s: two passes per call (both counted
    when the two modules are counted). For hard-vote ensembles use the fused
    `VotingProxy.straight_through()` (one pass of the members)."""

    def __init__(self, proxy: nn.Module, decision: nn.Module) -> None:
        super().__init__()
        self.proxy = proxy
        self.decision = decision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proxy(x)
        with torch.no_grad():
            d = self.decision(x)
        return value_of(d, p)


def fused_straight_through(proxy: nn.Module, decision: nn.Module) -> nn.Module | None:
    """`proxy`'s own one-pass straight-through stand-in for `decision`, if it offers one (hard votes)."""
    fused = getattr(proxy, "straight_through", None)
    if callable(fused) and getattr(proxy, "ensemble", None) is decision:
        return fused()
    return None
