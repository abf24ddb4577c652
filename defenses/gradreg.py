"""`gradreg`: adversarial-gradient regularisation (Yu et al. 2018, arXiv 1805.09370).

Training loss, per batch (double back-propagation, no adversarial examples):

    z  = f(x)                        logits, x requires grad
    t* = argmax_{j != y} z_j         the largest wrong logit (no gradient through the choice)
    g  = d(z_t* - z_y) / dx          per sample, create_graph=True
    R  = mean_i ||g_i||_p ** r       per-sample penalty, averaged over the batch
    L  = CE(z, y) + lam * R

Only "what is regularised" is known about the paper (methods.md 4.2: the input gradient of the
largest-wrong minus true logit, raw logits, optimised by double back-propagation); p, r and lam
are config values (defaults p = 2, r = 2; the paper's values are unknown).

`variant: scale_invariant` is OUR variant, not the paper's: it penalises
(||g_i||_p / (|z_y - z_t*| + margin_c)) ** r, so the optimiser cannot satisfy the penalty by
shrinking every logit (which shrinks g trivially).

Per-sample gradients: the gradient of sum_i (z_t*_i - z_y_i) with respect to the batch is the
stack of per-sample gradients only if samples do not interact. BatchNorm in train mode couples
them, so with `penalty_forward: auto` a model containing BatchNorm gets a separate eval-mode
forward for the penalty (running statistics, samples independent) while the CE term keeps the
train-mode forward; a model without BatchNorm (small_cnn) shares one forward. `shared` and
`eval` force either choice.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.defense import BuildContext, Defense, register
from defenses.pgd_at import add_input_gradient_passes, seeded_model
from defenses.standard import train_defended
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.data.training import LossFn, TrainConfig

VARIANTS = ("plain", "scale_invariant")
PENALTY_FORWARDS = ("auto", "shared", "eval")


def margin_and_input_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (logits, d = z_t* - z_y per sample, g = dd/dx per sample)."""
    x = x.detach().requires_grad_(True)
    z = model(x)
    true_mask = F.one_hot(y, z.shape[1]).bool()
    top_wrong = z.detach().masked_fill(true_mask, float("-inf")).argmax(dim=1, keepdim=True)
    d = (z.gather(1, top_wrong) - z.gather(1, y.view(-1, 1))).squeeze(1)
    g = torch.autograd.grad(d.sum(), x, create_graph=create_graph)[0]
    return z, d, g


def penalty_from_gradient(g: torch.Tensor, d: torch.Tensor, *, p: float, r: float, variant: str = "plain",
                          margin_c: float = 1.0) -> torch.Tensor:
    """Per-sample penalty ||g||_p ** r (or the scale-invariant ratio), shape (N,)."""
    flat = g.flatten(1)
    if p == 2 and r == 2 and variant == "plain":
        return flat.pow(2).sum(dim=1)  # smooth everywhere (the norm's derivative is undefined at 0)
    norm = torch.linalg.vector_norm(flat, ord=p, dim=1)
    if variant == "scale_invariant":
        norm = norm / (d.abs() + margin_c)
    return norm.pow(r)


def gradreg_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, p: float = 2.0, r: float = 2.0,
                    variant: str = "plain", margin_c: float = 1.0,
                    create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample penalty (N,), logits) for a batch; differentiable in the weights when create_graph."""
    z, d, g = margin_and_input_gradient(model, x, y, create_graph=create_graph)
    return penalty_from_gradient(g, d, p=p, r=r, variant=variant, margin_c=margin_c), z


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def gradreg_loss(*, lam: float, p: float, r: float, variant: str, margin_c: float, penalty_forward: str) -> LossFn:
    """CE + lam * mean per-sample penalty, as a `harness.data.training.LossFn`."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        separate = penalty_forward == "eval" or (penalty_forward == "auto" and _has_batchnorm(model))
        if not separate:
            pen, z = gradreg_penalty(model, x, y, p=p, r=r, variant=variant, margin_c=margin_c)
            return F.cross_entropy(z, y) + lam * pen.mean()
        was_training = model.training
        model.eval()
        pen, _ = gradreg_penalty(model, x, y, p=p, r=r, variant=variant, margin_c=margin_c)
        model.train(was_training)
        return F.cross_entropy(model(x), y) + lam * pen.mean()

    return loss


def _parse_p(p: Any) -> float:
    if isinstance(p, str) and p.lower() in ("inf", "linf", ".inf"):
        return math.inf
    try:
        value = float(p)
    except (TypeError, ValueError):
        value = float("nan")
    if value not in (1.0, 2.0, math.inf):
        raise UserError(f"defense 'gradreg': p={p!r} unsupported; use 1 (dual of Linf, the default threat), 2 or inf")
    return value


@register("gradreg")
class GradReg(Defense):
    """Adversarial-gradient regularisation by double back-propagation.

    Args:
        lam: penalty weight lambda.
        p: norm of the input gradient: 1, 2 or inf (1 is the dual norm of an Linf threat).
        r: exponent of the norm.
        variant: plain (the paper's regulariser) | scale_invariant (ours, see module docstring).
        margin_c: the scale-invariant variant's offset c in ||g|| / (|margin| + c).
        penalty_forward: auto | shared | eval (see module docstring; only matters with BatchNorm).
        train: TrainConfig fields (same recipe as the standard baseline for a fair comparison).
    """

    def __init__(self, lam: float = 1.0, p: float | str = 2, r: float = 2.0, variant: str = "plain",
                 margin_c: float = 1.0, penalty_forward: str = "auto", train: dict[str, Any] | None = None) -> None:
        if variant not in VARIANTS:
            raise UserError(f"defense 'gradreg': variant={variant!r} unknown; use one of: {', '.join(VARIANTS)}")
        if penalty_forward not in PENALTY_FORWARDS:
            raise UserError(f"defense 'gradreg': penalty_forward={penalty_forward!r} unknown; use one of: {', '.join(PENALTY_FORWARDS)}")
        if not float(lam) >= 0:
            raise UserError(f"defense 'gradreg': lam={lam} must be >= 0")
        if not float(r) > 0:
            raise UserError(f"defense 'gradreg': r={r} must be > 0")
        if not float(margin_c) > 0:
            raise UserError(f"defense 'gradreg': margin_c={margin_c} must be > 0")
        self.lam = float(lam)
        self.p = "inf" if _parse_p(p) == math.inf else int(_parse_p(p))
        self.r = float(r)
        self.variant = variant
        self.margin_c = float(margin_c)
        self.penalty_forward = penalty_forward
        self.train = dict(train or {})
        self._train_cfg = TrainConfig.from_dict(self.train)

    def build(self, ctx: BuildContext) -> Classifier:
        loss = gradreg_loss(lam=self.lam, p=_parse_p(self.p), r=self.r, variant=self.variant,
                            margin_c=self.margin_c, penalty_forward=self.penalty_forward)
        module, facts = train_defended(ctx, self, loss_fn=loss, train_cfg=self._train_cfg,
                                       module=seeded_model(ctx, ctx.seed))
        # one first-order input-gradient pass per image (the second-order pass is the parameter backward)
        facts = add_input_gradient_passes(facts, 1)
        facts["gradreg"] = {"lam": self.lam, "p": self.p, "r": self.r, "variant": self.variant,
                            "penalty": "per sample: ||d(z_t* - z_y)/dx||_p^r, batch mean"}
        return Classifier(module, ctx.data.num_classes, ctx.data.input_shape, info=facts)
