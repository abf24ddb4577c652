"""`pgd_at`: PGD adversarial training (Madry et al. 2018), the reference robust baseline; TRADES
(Zhang et al. 2019) as `method: trades`.

Madry: minimise CE(f(x'), y) where x' is a k-step PGD example (random start, sign steps for
Linf, normalised steps for L2) inside the training ball. TRADES: minimise
CE(f(x), y) + beta * KL(f(x) || f(x')) with x' maximising the KL term (reference: beta = 6).
The inner attack runs in eval mode (see `defenses.adv_examples`); the training forward passes
run in train mode. `step_size` is relative to eps, like the `pgd` attack's.

Also home of the small helpers every adversarially trained defense here shares: the AT loss
factory, seeded model initialisation and the training-cost accounting that adds the inner
attack's input-gradient passes to the backward count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses.adv_examples import pgd_examples, trades_examples
from harness.core.defense import BuildContext, Defense, register
from defenses.standard import SGD_RECIPE, recipe, train_defended
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.core.registry import follows
from harness.data.models import build_model
from harness.core.threat import ThreatModel
from harness.data.training import LossFn, TrainConfig

METHODS = ("madry", "trades")


def at_loss(threat: ThreatModel, *, steps: int, step_size: float, random_start: bool = True,
            method: str = "madry", beta: float = 6.0, eps_warmup: int = 0) -> LossFn:
    """The training loss of Madry PGD-AT or TRADES, as a `harness.data.training.LossFn`.

    `eps_warmup` > 0: the training radius grows linearly, eps * (epoch + 1) / eps_warmup, over the
    first `eps_warmup` epochs (from scratch at MNIST eps 0.3 a small network otherwise collapses
    to one class; see docs/defenses.md).
    """

    def ball(epoch: int) -> ThreatModel:
        if eps_warmup <= 0 or epoch + 1 >= eps_warmup:
            return threat
        return ThreatModel(norm=threat.norm, eps=threat.eps * (epoch + 1) / eps_warmup)

    def madry(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        x_adv = pgd_examples(model, x, y, ball(epoch), steps=steps, step_size=step_size, random_start=random_start)
        return F.cross_entropy(model(x_adv), y)

    def trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        x_adv = trades_examples(model, x, ball(epoch), steps=steps, step_size=step_size)
        logits = model(x)
        robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + beta * robust

    return madry if method == "madry" else trades


def seeded_model(ctx: BuildContext, seed: int) -> nn.Module:
    """The configured architecture, initialised from `seed` without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(ctx.model_cfg, ctx.data.num_classes, ctx.data.input_shape)


def add_input_gradient_passes(facts: dict[str, Any], per_image_per_epoch: int, extra_param_backward: int = 0) -> dict[str, Any]:
    """Count the inner attack's backward passes, which `harness.data.training.train` does not see.

    `train` counts every forward image-pass (the PGD steps go through its counted model) but only
    one parameter-backward pass per training image. Here `backward_passes` becomes the total:
    parameter backward passes (`param_backward_passes`, plus `extra_param_backward` per image and
    epoch when the loss back-propagates through several forwards, as TRADES does) and
    `input_grad_passes` (k per image and epoch for k-step PGD). Deterministic, so a cache hit
    reports the same cost as the training run that produced the checkpoint.
    """
    train = dict(facts.get("train", {}))
    epochs = int(train.get("epochs", 0))
    n = int(train.get("backward_passes", 0)) // epochs if epochs else 0  # training images per epoch
    param = int(train.get("backward_passes", 0)) + extra_param_backward * n * epochs
    inputs = per_image_per_epoch * n * epochs
    train.update(param_backward_passes=param, input_grad_passes=inputs, backward_passes=param + inputs)
    return {**facts, "train": train}


def check_at_params(name: str, eps: float | None, norm: str | None, steps: int, step_size: float) -> ThreatModel | None:
    """Validate the inner attack's knobs; return the training threat model (None while eps/norm
    still follow the evaluation's threat, i.e. until `Defense.follow_threat` fills them)."""
    if steps < 0:
        raise UserError(f"defense {name!r}: steps={steps} must be >= 0 (0 = no inner attack)")
    if not step_size > 0:
        raise UserError(f"defense {name!r}: step_size={step_size} must be > 0 (a fraction of eps, e.g. 0.25)")
    if eps is None or norm is None:
        return None
    try:
        return ThreatModel(norm=norm, eps=float(eps))
    except UserError as exc:
        raise UserError(f"defense {name!r} training ball: {exc}") from None


def collapse_notes(name: str, eps: float | None, norm: str | None, data_name: str, epochs: int) -> list[str]:
    """The radius known to be unstable here: Linf 0.3 from scratch in a few epochs on mnist5k (docs/defenses.md)."""
    if norm == "Linf" and eps is not None and eps >= 0.3 and data_name == "mnist5k" and epochs <= 10:
        return [f"defense {name!r}: adversarial training at Linf eps={eps:g} from scratch in {epochs} epochs is unstable "
                f"on mnist5k (one 4-epoch trial collapsed to chance, another reached 66 % clean; docs/defenses.md): "
                f"check the clean accuracy, or train longer or at a smaller radius (defense.eps=0.1)"]
    return []


@register("pgd_at")
@dataclass
class PGDAT(Defense):
    """PGD adversarial training (Madry) or TRADES.

    Args:
        eps: training radius (pixel scale, [0, 1] images); None = the evaluation's threat.eps.
        norm: Linf | L2; None = the evaluation's threat.norm.
        steps: inner PGD steps k.
        step_size: inner step as a fraction of eps (Madry's 2.5 / k rule: 0.5 with k = 5).
        random_start: Madry's uniform random start (TRADES always starts at x + 0.001 N(0, I)).
        method: madry | trades.
        beta: TRADES' robustness weight (ignored by madry).
        train: the training recipe (TrainConfig).
        eps_warmup: epochs over which the training radius ramps up linearly to eps (0: none; from
            scratch at MNIST eps 0.3 a small network otherwise collapses to a constant).
    """

    eps: float | None = follows("threat.eps")
    norm: str | None = follows("threat.norm")
    steps: int = 5
    step_size: float = 0.5
    random_start: bool = True
    method: str = "madry"
    beta: float = 6.0
    train: TrainConfig = recipe(**SGD_RECIPE)
    eps_warmup: int = 0

    def validate(self) -> None:
        if not isinstance(self.eps_warmup, int) or isinstance(self.eps_warmup, bool) or self.eps_warmup < 0:
            raise UserError(f"defense 'pgd_at': eps_warmup={self.eps_warmup!r} must be an integer >= 0 (epochs)")
        if self.method not in METHODS:
            raise UserError(f"defense 'pgd_at': method={self.method!r} unknown; use one of: {', '.join(METHODS)}")
        self._threat = check_at_params("pgd_at", self.eps, self.norm, self.steps, self.step_size)

    def notes(self, data_name: str) -> list[str]:
        return collapse_notes(self.name, self.eps, self.norm, data_name, self.train.epochs)

    def build(self, ctx: BuildContext) -> Classifier:
        self.follow_threat(ctx)
        loss = at_loss(self._threat, steps=self.steps, step_size=self.step_size, random_start=self.random_start,
                       method=self.method, beta=self.beta, eps_warmup=self.eps_warmup)
        module, facts = train_defended(ctx, self, loss_fn=loss, train_cfg=self.train,
                                       module=seeded_model(ctx, ctx.seed))
        facts = add_input_gradient_passes(facts, self.steps, extra_param_backward=1 if self.method == "trades" else 0)
        facts["adversarial_training"] = {"method": self.method, "eps": self.eps, "norm": self.norm,
                                         "steps": self.steps, "step_size": self.step_size, "eps_warmup": self.eps_warmup,
                                         "mode": "inner attack in eval mode, training forward in train mode"}
        return Classifier(module, ctx.data.num_classes, ctx.data.input_shape, info=facts)
