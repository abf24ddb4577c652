"""Ensembles as first-class models: members, an aggregation rule, and counted member access.

An `Ensemble` holds M members (each a [0, 1] -> logits module with its own normalisation inside)
and one aggregation rule:

- ``softmax``: average the members' softmax distributions; the scores are log of that average
  (computed as a log-sum-exp, so they stay finite).
- ``logits``: average the members' logits.
- ``voting``: hard majority vote. The scores are the vote counts plus a tie-break below 0.5, so
  `argmax` is the vote winner. Tie rule (`tie_break`): ``lowest`` (default; the lowest class index
  among the tied classes wins, as in scikit-learn's hard VotingClassifier) or ``mean_prob`` (the
  tied class with the highest average member softmax wins). Voting is not differentiable: the
  classifier's `differentiable` is a sharpened-softmax proxy (`VotingProxy`), each member's logits
  rescaled so its top-1/top-2 gap equals `vote_sharpness` (MORA's f), and the harness still judges
  every decision with the hard votes.

`forward(x)` returns the decision scores; `forward_members(x)` the stacked member logits (M, N, C).
One prediction costs M member forward passes (`passes_per_prediction`).

Attacks that declare `Capability.ENSEMBLE` receive `make_ensemble_access(...)`: an
`EnsembleAccess` whose members are counted. Use `forward_members(access, x)`: it counts one
ensemble-equivalent pass per image on `access.counter` (the cost unit shared with every other
gradient attack, so MORA and APGD are compared at equal units) and one pass per member and image on
`access.member_counter`, forward and backward alike.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.access import CountingModule, EnsembleAccess, PassCounter, count_input
from harness.core.classifier import Classifier
from harness.core.errors import UserError

MODES = ("softmax", "logits", "voting")
TIE_BREAKS = ("lowest", "mean_prob")


# ---------------------------------------------------------------------------------------------
# aggregation rules on stacked member logits z of shape (M, N, C)
# ---------------------------------------------------------------------------------------------


def top_margin(scores: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 value along the last dimension (same leading shape, no gradient)."""
    top2 = scores.detach().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def log_mean_softmax(z: torch.Tensor) -> torch.Tensor:
    """log( mean_i softmax(z_i) ), exact and finite: logsumexp over members of log-softmax - log M."""
    return torch.logsumexp(F.log_softmax(z, dim=-1), dim=0) - math.log(z.shape[0])


def sharpened_log_votes(z: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Differentiable vote-share proxy: log mean softmax of each member rescaled to a top gap of `sharpness`.

    Each member's logits are divided by its detached top-1/top-2 gap (clamped away from 0) and
    multiplied by `sharpness`, so with sharpness 10 every member's softmax is ~one-hot (MORA's f);
    with 1 it is MORA's smoother scale score f_s.
    """
    gap = top_margin(z).clamp_min(1e-12).unsqueeze(-1)
    return log_mean_softmax(z * (sharpness / gap))


def hard_votes(z: torch.Tensor) -> torch.Tensor:
    """(N, C) float vote counts: how many members put each class first."""
    return F.one_hot(z.argmax(dim=-1), z.shape[-1]).sum(dim=0).to(z.dtype)


def voting_scores(z: torch.Tensor, tie_break: str = "lowest") -> torch.Tensor:
    """Vote counts plus a tie-break term in [0, 0.5), so argmax = winner under the tie rule."""
    votes = hard_votes(z.detach())
    c = z.shape[-1]
    if tie_break == "lowest":
        tie = -torch.arange(c, device=z.device, dtype=votes.dtype) / (2.0 * c)
        return votes + tie
    if tie_break == "mean_prob":
        return votes + 0.49 * F.softmax(z.detach(), dim=-1).mean(dim=0)
    raise UserError(f"defense.tie_break={tie_break!r} unknown; use one of: {', '.join(TIE_BREAKS)}")


def aggregate(z: torch.Tensor, mode: str, tie_break: str = "lowest") -> torch.Tensor:
    """Decision scores (N, C) of the true aggregation rule: argmax is the ensemble's prediction."""
    if mode == "softmax":
        return log_mean_softmax(z)
    if mode == "logits":
        return z.mean(dim=0)
    if mode == "voting":
        return voting_scores(z, tie_break)
    raise UserError(f"defense.mode={mode!r} unknown; use one of: {', '.join(MODES)}")


def proxy_scores(z: torch.Tensor, mode: str, sharpness: float = 10.0) -> torch.Tensor:
    """What a gradient attack differentiates (MORA's f): the aggregate, or the vote proxy for voting."""
    if mode == "voting":
        return sharpened_log_votes(z, sharpness)
    return aggregate(z, mode)


def scale_scores(z: torch.Tensor, mode: str) -> torch.Tensor:
    """MORA's scale score f_s: log mean softmax, mean logits, or the vote proxy with top gap 1."""
    if mode == "voting":
        return sharpened_log_votes(z, 1.0)
    return aggregate(z, mode)


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------


class Ensemble(nn.Module):
    """M members and an aggregation rule; `forward` returns the decision scores (see module doc)."""

    def __init__(self, members: Sequence[nn.Module], mode: str = "softmax", tie_break: str = "lowest",
                 vote_sharpness: float = 10.0) -> None:
        super().__init__()
        if len(members) == 0:
            raise UserError("an ensemble needs at least one member; set defense.members >= 1")
        if mode not in MODES:
            raise UserError(f"defense.mode={mode!r} unknown; use one of: {', '.join(MODES)}")
        if tie_break not in TIE_BREAKS:
            raise UserError(f"defense.tie_break={tie_break!r} unknown; use one of: {', '.join(TIE_BREAKS)}")
        if not vote_sharpness > 0:
            raise UserError(f"defense.vote_sharpness={vote_sharpness!r} must be > 0 (MORA uses 10)")
        self.members = nn.ModuleList(members)
        self.mode = mode
        self.tie_break = tie_break
        self.vote_sharpness = float(vote_sharpness)

    @property
    def passes_per_prediction(self) -> int:
        """Member forward passes one prediction costs."""
        return len(self.members)

    @property
    def differentiable(self) -> bool:
        """False for hard voting: gradients of the decision are zero almost everywhere."""
        return self.mode != "voting"

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Stacked member logits (M, N, C)."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aggregate(self.forward_members(x), self.mode, self.tie_break)

    def proxy(self) -> nn.Module:
        """The module gradient attacks differentiate: self, or a `VotingProxy` for voting."""
        return VotingProxy(self) if self.mode == "voting" else self

    def with_members(self, members: Sequence[nn.Module]) -> "Ensemble":
        """The same rule over other member modules (e.g. counted wrappers of these members)."""
        return Ensemble(members, self.mode, self.tie_break, self.vote_sharpness)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, tie_break={self.tie_break}, members={len(self.members)}"


class VotingProxy(nn.Module):
    """Differentiable stand-in for a hard-vote ensemble: log mean sharpened softmax (MORA's f)."""

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    @property
    def members(self) -> nn.ModuleList:
        return self.ensemble.members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sharpened_log_votes(self.ensemble.forward_members(x), self.ensemble.vote_sharpness)


# ---------------------------------------------------------------------------------------------
# classifier and access
# ---------------------------------------------------------------------------------------------


def ensemble_info(ens: Ensemble) -> dict[str, Any]:
    """Facts for the manifest and the leaderboard's health flags."""
    return {
        "ensemble": True,
        "mode": ens.mode,
        "members": len(ens.members),
        "passes_per_prediction": ens.passes_per_prediction,
        "differentiable": ens.differentiable,
        "tie_break": ens.tie_break if ens.mode == "voting" else None,
        "vote_sharpness": ens.vote_sharpness if ens.mode == "voting" else None,
    }


def make_classifier(
    members: Sequence[nn.Module] | Ensemble,
    mode: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    tie_break: str = "lowest",
    vote_sharpness: float = 10.0,
    randomized: bool = False,
    info: dict[str, Any] | None = None,
) -> Classifier:
    """Wrap members (or an `Ensemble` whose members are reused) as a harness `Classifier`.

    `module` takes the true decision (hard votes for voting); `differentiable` is the module
    gradient attacks use (the sharpened-softmax proxy for voting).
    """
    mods = list(members.members) if isinstance(members, Ensemble) else list(members)
    ens = Ensemble(mods, mode, tie_break, vote_sharpness)
    return Classifier(
        ens, num_classes, tuple(input_shape), randomized=randomized, differentiable=ens.proxy(),
        info={**(info or {}), **ensemble_info(ens)},
    )


def make_ensemble_access(classifier: Classifier, counter: PassCounter, eot: int = 1) -> EnsembleAccess:
    """Access for `Capability.ENSEMBLE` attacks: the counted aggregate plus each counted member.

    `model` is the differentiable aggregate (the vote proxy for voting) counted on `counter`;
    `members` are the member modules counted on a fresh `member_counter`, which `model` also
    uses, so member passes are counted whichever path an attack takes.
    """
    ens = classifier.ensemble
    if not isinstance(ens, Ensemble):
        raise UserError(
            "this attack needs an ensemble defense (defense=ensemble|adp|gal|dverge|trs|ensemble_checkpoint); "
            f"the defended model is a {type(classifier.module).__name__}"
        )
    member_counter = PassCounter()
    counted_members = [CountingModule(m, member_counter) for m in ens.members]
    counted = ens.with_members(counted_members)
    access = EnsembleAccess(
        model=CountingModule(counted.proxy(), counter),
        num_classes=classifier.num_classes,
        counter=counter,
        randomized=classifier.randomized,
        eot=eot,
        members=counted_members,
        mode=ens.mode,
        member_counter=member_counter,
    )
    # Facts of the rule an attack needs to judge success exactly as the harness will.
    access.tie_break = ens.tie_break
    access.vote_sharpness = ens.vote_sharpness
    return access


def forward_members(access: EnsembleAccess, x: torch.Tensor) -> torch.Tensor:
    """Stacked member logits (M, N, C) through the counted members of `access`.

    Counts N ensemble-equivalent passes on `access.counter` (and N backward passes when a
    gradient reaches `x`), plus N per member on `access.member_counter`.
    """
    if not access.members:
        raise UserError("the model access holds no ensemble members; the defense is not an ensemble")
    xc = count_input(x, access.counter)
    return torch.stack([m(xc) for m in access.members])


def decide(access: EnsembleAccess, z: torch.Tensor) -> torch.Tensor:
    """Predicted classes (N,) of the true aggregation rule from member logits `z` (M, N, C)."""
    return aggregate(z.detach(), access.mode, getattr(access, "tie_break", "lowest")).argmax(dim=1)
