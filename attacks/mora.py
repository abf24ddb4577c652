"""MORA (Yu, Gao, Xu, NeurIPS 2022): model-reweighing attack on ensembles.

Diversity-trained ensembles look robust because their members' input gradients point in
conflicting directions and cancel in the aggregate. MORA attacks a surrogate that mixes the
margin-normalised ensemble score with a *reweighted* average of the members' rescaled logits,
putting weight on members that still vote for the true class and whose logits most move the
ensemble's log-margin. See docs/mora.md for the derivation and the reference's quirks.

Per iteration, with member logits v_i (M of them) and the scale score f_s:
1. rescale: c = max_i gap(v_i), rho = c/10 if c > 10 else 1, v^_i = v_i / rho (gap = top1 - top2);
2. p_bar = mean_i softmax(v^_i) (detached);
3. competing class k = argmax p_bar if it is wrong, else the runner-up of p_bar;
4. p_i = softmax(tau * v_i) (detached), tau per mode (softmax 0.2, voting 0.8, logits 0);
5. w_i = p_i[k] * (p_i[y] / p_bar[y] + (1 - p_i[k]) / p_bar[k])  (d(log p_bar_k - log p_bar_y)/dv_ik);
6. m_i = [argmax v^_i == y] (softmax, voting), 1 (logits);
7. S = (1 - s) f_s / gap(f_s) + s (sum_i m_i w_i v^_i) / (sum_i m_i w_i + 1e-8); ascend CE(S, y).

Schedule: untargeted stages over `scales` (default s = 0.5, 0, 0.25, 0.75, 1, as the reference),
each from a fresh random start on the still-robust samples, then a targeted stage per target
class (the 2nd..10th classes of the clean ensemble scores). Sign steps of 2 eps with cosine or
linear decay, momentum, projection, and a per-sample early exit judged by the *true* aggregation
(hard votes for voting). `reference_quirks=True` reproduces lafeat/mora's code instead of the
intended mathematics (f_s as an extra member, p_bar divided by M+1, the sign trick in the weights,
the targeted stage without reweighing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from harness.core.attack import Attack, AttackResult, register
from harness.core.access import Capability, EnsembleAccess
from harness.core.ensemble import aggregate, forward_members, proxy_scores, scale_scores, top_margin
from harness.core.errors import UserError
from harness.core.losses import margin
from harness.core.threat import ThreatModel
from harness.core.verdict import BestIterate, fully_fooled, is_fooled

DEFAULT_TAU = {"softmax": 0.2, "voting": 0.8, "logits": 0.0}  # `float_dis` in scripts/evaluation.sh
DEFAULT_TARGET_SCALE = {"softmax": 0.5, "voting": 0.5, "logits": 0.0}  # `mora_ce_t-5` / `mora_ce_t-0`
DECAYS = ("cosine", "linear")
EPS_SLACK = 1.9e-8  # the reference shrinks eps by this much so float rounding never leaves the ball


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[..., n, C] gathered at per-sample class idx[n] -> t[..., n]."""
    index = idx.view(*([1] * (t.dim() - 2)), -1, 1).expand(*t.shape[:-1], 1)
    return t.gather(-1, index).squeeze(-1)


def member_weights(
    p: torch.Tensor, p_bar: torch.Tensor, y: torch.Tensor, k: torch.Tensor, sigma: torch.Tensor | None = None
) -> torch.Tensor:
    """Member weights (n_v, n).

    p: member distributions softmax(tau * v_i) (n_v, n, C); p_bar: average distribution (n, C);
    k: competing class. Without `sigma`, the intended weight (the sensitivity of the ensemble
    log-margin log p_bar_k - log p_bar_y to member i's class-k logit). With `sigma` (+1 when the
    ensemble is already wrong, -1 otherwise) the reference code's form a (p_y/p_bar_y + (1-a)/b),
    a = sigma p_k, b = sigma p_bar_k.
    """
    tiny = 1e-12
    pk, py = _gather(p, k), _gather(p, y)
    pbk, pby = _gather(p_bar, k).clamp_min(tiny), _gather(p_bar, y).clamp_min(tiny)
    if sigma is None:
        return pk * (py / pby + (1 - pk) / pbk)
    a = sigma * pk
    return a * (py / pby + (1 - a) / (sigma * pbk))


def surrogate_logits(
    z: torch.Tensor,
    y: torch.Tensor,
    mode: str,
    s: float,
    tau: float,
    *,
    quirks: bool = False,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """MORA's surrogate logits S (n, C) from member logits z (M, n, C) with reweigh strength s.

    `target` switches the competing class to a fixed target (the intended targeted stage). With
    `quirks`, f_s joins the members, p_bar is the sum over the real members divided by M + 1 and
    the weights use the reference's sign trick.
    """
    m = z.shape[0]
    f_s = scale_scores(z, mode)
    v = torch.cat([z, f_s.unsqueeze(0)]) if quirks else z
    vd = v.detach()
    c = top_margin(vd).amax(dim=0)  # (n,) largest member gap
    rho = torch.where(c > 10.0, c / 10.0, torch.ones_like(c))
    v_hat = v / rho.view(1, -1, 1)
    probs_hat = F.softmax(v_hat.detach(), dim=-1)
    p_bar = probs_hat[:m].sum(dim=0) / (m + 1) if quirks else probs_hat.mean(dim=0)
    if target is None:
        top2 = p_bar.topk(2, dim=-1).indices
        right = top2[:, 0] == y
        k = torch.where(right, top2[:, 1], top2[:, 0])
        sigma = torch.where(right, -torch.ones_like(c), torch.ones_like(c))
    else:
        k, sigma = target, torch.ones_like(c)
    p = F.softmax(tau * vd, dim=-1)
    w = member_weights(p, p_bar, y, k, sigma if quirks else None)
    if mode == "logits":
        mask = torch.ones_like(w)
    else:
        mask = (v_hat.detach().argmax(dim=-1) == y.view(1, -1)).to(w.dtype)
    mw = (mask * w).unsqueeze(-1)
    mix = (mw * v_hat).sum(dim=0) / (mw.sum(dim=0) + 1e-8)
    gap_fs = top_margin(f_s).clamp_min(1e-12).unsqueeze(-1)
    return (1.0 - s) * f_s / gap_fs + s * mix


def step_size(eps: float, i: int, n_iter: int, decay: str) -> float:
    """2 eps decayed over the iterations (cosine or linear), as in the reference."""
    if decay == "cosine":
        return 2.0 * eps * (1.0 + math.cos(math.pi * i / n_iter)) / 2.0
    return 2.0 * eps * (1.0 - i / n_iter)


@register("mora")
@dataclass
class MORA(Attack):
    """Model-reweighing attack on ensembles (needs `Capability.ENSEMBLE`).

    Args:
        n_iter: iterations per stage (reference 100).
        scales: reweigh strengths s of the untargeted stages, in order (reference 0.5, 0, 0.25, 0.75, 1).
        targeted: run the targeted stage after the untargeted ones (reference: yes).
        n_target_classes: targets, the 2nd..(n+1)th classes of the clean ensemble scores (reference 9).
        target_scale: s of the targeted stage; None = 0.5 for softmax/voting, 0 for logits.
        decay: step-size decay, "cosine" (reference scripts) or "linear" (reference class default).
        momentum: weight of the previous displacement (reference: 0.25, i.e. a = 0.75 on the new step).
        tau: temperature of the member distributions in the weights; None = per mode (0.2/0.8/0).
        reference_quirks: reproduce the reference code's quirks (see module doc and docs/mora.md).
        exit_every: drop fooled samples from the working batch every this many iterations (1 =
            the reference's per-sample early exit; larger values trade counted work on frozen,
            already-fooled samples for fewer host synchronisations on a GPU; results are identical).
    """

    requires = Capability.ENSEMBLE
    amp_safe = True  # sign / normalised steps of input gradients: autocast-safe (evaluator.amp)

    n_iter: int = 100
    scales: list[float] = field(default_factory=lambda: [0.5, 0.0, 0.25, 0.75, 1.0])
    targeted: bool = True
    n_target_classes: int = 9
    target_scale: float | None = None
    decay: str = "cosine"
    momentum: float = 0.25
    tau: float | None = None
    reference_quirks: bool = False
    exit_every: int = 1

    def validate(self) -> None:
        n_iter, decay, momentum, exit_every = self.n_iter, self.decay, self.momentum, self.exit_every
        target_scale = self.target_scale
        if int(n_iter) < 1:
            raise UserError(f"attack.n_iter={n_iter} must be >= 1")
        if decay not in DECAYS:
            raise UserError(f"attack.decay={decay!r} unknown; use one of: {', '.join(DECAYS)}")
        scales = [float(s) for s in self.scales]
        if any(not 0.0 <= s <= 1.0 for s in scales) or (target_scale is not None and not 0 <= target_scale <= 1):
            raise UserError(f"attack.scales={scales} / target_scale={target_scale} must lie in [0, 1]")
        if not 0.0 <= momentum < 1.0:
            raise UserError(f"attack.momentum={momentum} must be in [0, 1)")
        if int(exit_every) < 1:
            raise UserError(f"attack.exit_every={exit_every} must be >= 1")
        self.scales = scales

    # ------------------------------------------------------------------------------------------
    def _objective(self, z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, s: float,
                   mode: str, tau: float, sharpness: float) -> torch.Tensor:
        """Per-sample objective to ascend."""
        if target is None:
            return F.cross_entropy(surrogate_logits(z, y, mode, s, tau, quirks=self.reference_quirks), y, reduction="none")
        if self.reference_quirks:  # the reference computes the reweighted mix, then overwrites it with f
            scores = proxy_scores(z, mode, sharpness)
        else:
            scores = surrogate_logits(z, y, mode, s, tau, target=target)
        return -F.cross_entropy(scores, target, reduction="none")

    def _stage(self, access: EnsembleAccess, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
               generator: torch.Generator, s: float, target: torch.Tensor | None) -> BestIterate:
        """One run of n_iter iterations from a random start; each sample's most fooled iterate.

        Judged by the true rule at every iterate (hard votes for voting; the harness's R draws on
        a randomised ensemble); a sample leaves the batch once every decision draw is fooled.
        """
        mode = access.mode
        tie = getattr(access, "tie_break", "lowest")
        sharp = getattr(access, "vote_sharpness", 10.0)
        tau = DEFAULT_TAU[mode] if self.tau is None else self.tau
        ball = threat.shrunk(EPS_SLACK)
        eps = ball.eps
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        # the reference's start: uniform (Linf) / Gaussian (L2) noise rescaled to norm exactly eps
        x_adv = ball.random_start(x, generator, sphere=True)

        best = BestIterate(x)
        idx = torch.arange(n, device=x.device)
        xa, x0, y0 = x_adv, x, y
        t0 = target
        x_prev = xa.clone()
        for i in range(self.n_iter + 1):
            last = i == self.n_iter
            xa = xa.detach().requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                z = forward_members(access, xa)
            agg = aggregate(z.detach(), mode, tie)
            if access.draws > 1:  # a randomised ensemble: the harness's R decision draws judge (counted)
                score = access.verdict(xa.detach(), y0)
            else:  # the true rule on the member logits just computed (hard votes for voting): exact, free
                score = (agg.argmax(dim=1) != y0).float()
            now = fully_fooled(score)
            # keep each sample's most fooled point (frozen samples stay where they are)
            best.offer(xa.detach(), score, margin(agg, y0), idx=idx)
            if last:
                break
            keep = None
            if i % self.exit_every == 0:  # per-sample early exit: one host sync, before the gradient
                keep = (~fully_fooled(best.score.index_select(0, idx))).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
            obj = self._objective(z, y0, t0, s, mode, tau, sharp)
            grad = torch.autograd.grad((obj * (~now).to(obj.dtype)).sum(), xa)[0]
            with torch.no_grad():
                eta = step_size(eps, i, self.n_iter, self.decay)
                xd = xa.detach()
                x1 = ball.step(xd, grad, x0, eta)
                a = 1.0 if i == 0 else 1.0 - self.momentum
                x_new = ball.project(xd + a * (x1 - xd) + (1.0 - a) * (xd - x_prev), x0)
                active = (~now).view(view)
                x_new = torch.where(active, x_new, xd)  # fooled samples freeze until dropped
                x_prev = torch.where(active, xd, x_prev)
                xa = x_new
            if keep is not None and keep.numel() < idx.numel():  # drop the fooled samples
                idx, xa, x_prev, x0, y0 = idx[keep], xa[keep], x_prev[keep], x0[keep], y0[keep]
                t0 = None if t0 is None else t0[keep]
        return best

    def _targets(self, access: EnsembleAccess, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(n, K) target classes: the non-true classes by decreasing clean ensemble score (f)."""
        with torch.no_grad():
            z = forward_members(access, x)
            scores = proxy_scores(z, access.mode, getattr(access, "vote_sharpness", 10.0))
        scores = scores.scatter(1, y.view(-1, 1), float("-inf"))
        k = min(self.n_target_classes, scores.shape[1] - 1)
        return scores.argsort(dim=1, descending=True)[:, :k]

    def run(self, access: EnsembleAccess, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
            generator: torch.Generator) -> AttackResult:
        if getattr(access, "members", None) is None:
            raise UserError("attack mora needs an ensemble defense (defense=ensemble|adp|gal|dverge|trs|ensemble_checkpoint)")
        mode = access.mode
        stages: list[tuple[str, float, int | None]] = [(f"s={s:g}", s, None) for s in self.scales]
        if self.targeted:
            ts = DEFAULT_TARGET_SCALE[mode] if self.target_scale is None else self.target_scale
            k = min(self.n_target_classes, access.num_classes - 1)
            stages += [(f"target-{r + 2}", ts, r) for r in range(k)]
        n = x.shape[0]
        best = BestIterate(x)
        stage_of = torch.full((n,), -1, dtype=torch.long, device=x.device)
        remaining = torch.arange(n, device=x.device)
        targets = None
        fooled_per_stage: list[int] = []
        for si, (_, s, rank) in enumerate(stages):
            if remaining.numel() == 0:
                fooled_per_stage.append(0)
                continue
            target = None
            if rank is not None:
                if targets is None:  # ranked once, on the clean inputs of the samples still robust
                    targets = torch.full((n, max(1, access.num_classes - 1)), -1, dtype=torch.long, device=x.device)
                    t = self._targets(access, x[remaining], y[remaining])
                    targets[remaining, : t.shape[1]] = t
                target = targets[remaining, rank]
            found = self._stage(access, x[remaining], y[remaining], threat, generator, s, target)
            replaced = best.offer(found.x, found.score, found.loss, idx=remaining)
            hit = remaining[replaced & is_fooled(found.score)]
            stage_of[hit] = si
            fooled_per_stage.append(int(hit.numel()))
            remaining = remaining[~fully_fooled(best.score[remaining])]
        names = [name for name, _, _ in stages]
        stage_list = [names[i] if i >= 0 else "" for i in stage_of.tolist()]
        return AttackResult(
            x_adv=best.x,
            stage=stage_list,
            extras={"stages": names, "fooled_per_stage": fooled_per_stage, "reference_quirks": self.reference_quirks},
        )
