"""Access by capability, and cost counting.

An attack declares what it needs (`Capability`); the evaluator hands it exactly that, wrapped so
that every forward and backward image-pass is counted. A score-only attack receives a
`harness.core.oracle.QueryOracle` and never the module, so threat-model honesty is structural.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from typing import TYPE_CHECKING

import torch
from torch import nn

from harness.core.verdict import StraightThrough, fused_straight_through

if TYPE_CHECKING:
    from harness.core.classifier import Classifier


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
    """White-box access: a counted differentiable model, and the harness's verdict.

    `eot` is the number of random draws a gradient attack should average when `randomized`
    (expectation over transformation); 1 for deterministic models. `randomized` describes `model`
    (what the attack differentiates); `draws` is how many decision draws the harness's verdict
    takes (its R when the defended classifier is randomised, else 1), so a deterministic view of a
    randomised model (`view: fixed`) has `randomized=False` and `draws=R`.
    """

    model: nn.Module
    num_classes: int
    counter: PassCounter
    randomized: bool = False
    eot: int = 1
    # The true decision when `model` is only a differentiable stand-in (hard-vote ensembles, views
    # of a randomised model): attacks judge their bookkeeping with it, through `verdict`.
    decision: nn.Module | None = None
    draws: int = 1
    # `model` with the decision's forward value and `model`'s gradient (deterministic stand-ins
    # only); for code that judges success from the logits it differentiates (pyautoattack).
    judged_model: nn.Module | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def eot_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Mean logits over `eot` draws (one draw for deterministic models)."""
        if not self.randomized or self.eot <= 1:
            return self.model(x)
        return torch.stack([self.model(x) for _ in range(self.eot)]).mean(0)

    @torch.no_grad()
    def verdict(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample fraction of the harness's decision draws that misclassify `x` (counted passes).

        The evaluator's own rule: the true decision (`decision`, else `model`), `draws` times.
        0 or 1 for a deterministic classifier; a sample is broken when the fraction exceeds 1/2
        (`harness.core.verdict.is_fooled`). `logits` of `model` at `x`, when the attack has them,
        make it free where they are the decision (a deterministic model that is no stand-in).
        """
        if logits is not None and self.decision is None and self.draws <= 1:
            return (logits.detach().argmax(1) != y).float()
        module = self.decision if self.decision is not None else self.model
        wrong = torch.zeros(x.shape[0], device=x.device)
        for _ in range(max(self.draws, 1)):
            wrong += (module(x).argmax(1) != y).float()
        return wrong / max(self.draws, 1)

    @torch.no_grad()
    def step_verdict(self, x: torch.Tensor, y: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
        """The verdict score of an iterate whose logits (one per EOT draw) the attack already has.

        Free and exact when `model` is the decision of a deterministic classifier; on a randomised
        one, the fraction of the attack's own draws that misclassify (an estimate of `verdict`,
        which attacks use to confirm their final candidates, `harness.core.verdict.confirm`).
        With a stand-in: one counted pass of the decision (exact for hard votes; one draw, an
        estimate, for a randomised decision).
        """
        if self.decision is None:
            wrong = torch.stack([(z.detach().argmax(1) != y).float() for z in logits])
            return wrong.mean(0)
        return (self.decision(x).argmax(1) != y).float()

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


def make_model_access(classifier: "Classifier", counter: PassCounter, *, eot: int = 1, draws: int = 1,
                      view: str | None = None) -> ModelAccess:
    """Gradient access to a defended classifier, counted, with the harness's verdict attached.

    `view` names one of `classifier.views` to differentiate instead (a deterministic stand-in);
    the verdict is always the classifier's own decision, over `draws` draws when it is randomised
    (the evaluator's R). A deterministic stand-in (hard votes) also gets `judged_model`.
    """
    if view is not None:
        target, randomized = classifier.views[view], False  # views are deterministic stand-ins
    else:
        target, randomized = classifier.differentiable, classifier.randomized
    n_draws = max(int(draws), 1) if classifier.randomized else 1
    if target is classifier.module:
        return ModelAccess(CountingModule(target, counter), classifier.num_classes, counter, randomized=randomized,
                           eot=eot, draws=n_draws)
    decision = CountingModule(classifier.module, counter)
    judged = None
    if not classifier.randomized:  # a randomised decision has no cheap deterministic value to pass through
        fused = fused_straight_through(target, classifier.module)
        judged = CountingModule(fused, counter) if fused is not None else \
            StraightThrough(CountingModule(target, counter), decision)
    return ModelAccess(CountingModule(target, counter), classifier.num_classes, counter, randomized=randomized,
                       eot=eot, decision=decision, draws=n_draws, judged_model=judged)
