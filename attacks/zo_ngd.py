"""ZO-NGD: zeroth-order natural-gradient descent (Zhao, Chen, Wang, Lin, AAAI 2020).

A score-only (black-box) attack. Each iteration, for every still-unbroken sample, it queries q
points on a sphere of radius mu around the current image and forms two sphere-smoothing
forward-difference estimates from the *same* queries:

    g_hat  = d/(mu*q) * sum_j (F(x+delta+mu*u_j) - F(x+delta)) u_j     (attack loss F, C&W hinge)
    gl_hat = d/(mu*q) * sum_j (l(x+delta+mu*u_j) - l(x+delta)) u_j     (log-likelihood l = log p_y)

It then preconditions g_hat with a damped empirical Fisher, delta <- delta - eta*(F + lambda*I)^-1 g_hat,
clips delta to the L-inf box (and the image to [0, 1]), and queries the new point once: that query
both decides success (stop at success) and is the base point of the next iteration, so one
iteration costs exactly q+1 queries per sample (plus one initial query of the clean image).

Fisher variants (`fisher`):
- "rank1" (default; the reference's CIFAR/ImageNet path): F = gl gl^T, solved in closed form by
  Sherman-Morrison.
- "two_class" (the reference's MNIST path): F = p_y gl gl^T + (1-p_y) go go^T with
  go = ZO gradient of log(1.0001 - p_y); the reference inverts the dense d x d matrix, we solve the
  same system exactly through its rank-2 structure (Woodbury).
- "kclass" (ours, an ablation, not in the paper or its code): the full K-class Fisher
  sum_k p_k g_k g_k^T with every g_k estimated from the same q queries, solved through its rank-K
  structure.

`loss="nll"` (ours, not a default) minimises log p_y instead of the hinge: the loss whose curvature
the Fisher is, which turns the rank-one step into a Gauss-Newton step (see docs/zo_ngd.md for why).

Per iteration the probes of all active samples go to the oracle in one call (A*q rows) and their
updated points in a second (A rows); a single call cannot hold both, since the update depends on
the probes' answers. Directions come from the evaluator's generator, drawn for the whole batch.

The shared driver (`ZOAttack`) is also used by the baselines in `attacks.zo_baselines` (ZO-SGD, NES),
so every score-based attack here shares one loop, one query accounting and one stopping rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from harness.core.attack import Attack, AttackResult, register
from harness.core.access import Capability
from harness.core.errors import UserError, choices_error
from harness.core.oracle import OUTPUTS, QueryOracle, log_scores
from harness.core.threat import ThreatModel

FISHERS = ("rank1", "two_class", "kclass")
LOSSES = ("hinge", "nll")


# ------------------------------------------------------------------------------- small helpers
def hinge_loss(logp: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """C&W hinge max(0, log p_y - max_{j!=y} log p_j + kappa) on (..., K) log-probabilities.

    Log-probability differences equal logit differences, so this is the reference's logit hinge.
    """
    y = y.view(*y.shape, *([1] * (logp.dim() - y.dim()))).expand(*logp.shape[:-1], 1)
    true = logp.gather(-1, y).squeeze(-1)
    other = logp.scatter(-1, y, float("-inf")).amax(-1)
    return (true - other + kappa).clamp_min(0.0)


def true_logp(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p_y from (..., K) log-probabilities, y broadcast over the leading dims."""
    y = y.view(*y.shape, *([1] * (logp.dim() - y.dim()))).expand(*logp.shape[:-1], 1)
    return logp.gather(-1, y).squeeze(-1)


def sphere_directions(shape: tuple[int, int, int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B, q, d) directions uniform on the unit L2 sphere, drawn from `generator`."""
    u = torch.randn(shape, generator=generator, device=generator.device).to(device)
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def damped_solve(h: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """(lam*I + H H^T)^-1 b per sample, for H (A, d, r) of small rank r, in float64.

    Push-through identity: (lam I + H H^T)^-1 = (I - H (lam I_r + H^T H)^-1 H^T) / lam. For r = 1
    this is Sherman-Morrison: b/lam - h (h.b) / (lam (lam + |h|^2)). float64 because the
    two-class Fisher's columns are nearly parallel and lam is tiny (5e-6 in the MNIST reference).
    """
    h64, b64 = h.double(), b.double()
    r = h64.shape[-1]
    hb = torch.einsum("adr,ad->ar", h64, b64)
    gram = torch.einsum("adr,ads->ars", h64, h64) + lam * torch.eye(r, dtype=torch.float64, device=h.device)
    sol = torch.linalg.solve(gram, hb.unsqueeze(-1)).squeeze(-1)
    return ((b64 - torch.einsum("adr,ar->ad", h64, sol)) / lam).to(b.dtype)


def zo_gradient(values: torch.Tensor, base: torch.Tensor, dirs: torch.Tensor, mu: float) -> torch.Tensor:
    """Sphere-smoothing forward difference: d/(mu q) sum_j (f_j - f_0) u_j.

    values (A, q[, K]), base (A[, K]), dirs (A, q, d) -> (A, d[, K]).
    """
    q, d = dirs.shape[1], dirs.shape[2]
    diff = values - base.unsqueeze(1)
    if diff.dim() == 2:
        return torch.einsum("aq,aqd->ad", diff, dirs) * (d / (mu * q))
    return torch.einsum("aqk,aqd->adk", diff, dirs) * (d / (mu * q))


# ------------------------------------------------------------------------------ shared driver
@dataclass
class ZOAttack(Attack):
    """Score-based attack loop shared by ZO-NGD, ZO-SGD and NES.

    Subclasses say how to draw directions (`draw`), where to probe (`probe_points`), how many rows
    a step queries (`probes_per_step`) and how to turn the probe scores into a step (`step`). The
    driver owns the rest: the initial query, stop at success, per-sample budgets (a sample is
    stepped only if it can pay a whole step: q probes + 1 check), projection and seeding.
    """

    requires: ClassVar[Capability] = Capability.SCORES

    q: int = 30
    iterations: int | None = 100
    budget: int = 10_000
    output: str = "probs"
    kappa: float = 0.0
    clip_queries: bool = False

    def validate(self) -> None:
        q, iterations, budget, output = self.q, self.iterations, self.budget, self.output
        if not isinstance(q, int) or q < 1:
            raise UserError(f"q={q!r} must be a positive integer (directions per iteration)")
        if iterations is not None and (not isinstance(iterations, int) or iterations < 0):
            raise UserError(f"iterations={iterations!r} must be a non-negative integer or null (until the budget)")
        if not isinstance(budget, int) or budget < 1:
            raise UserError(f"budget={budget!r} must be a positive integer (queries per sample)")
        if output not in OUTPUTS:
            raise choices_error("oracle output", output, OUTPUTS)

    # hooks ------------------------------------------------------------------------------------
    @property
    def probes_per_step(self) -> int:
        return self.q

    def draw(self, b: int, d: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Directions for the whole batch (B, q, d): drawn for every sample every iteration, so a
        sample's directions do not depend on which other samples are still active."""
        return sphere_directions((b, self.q, d), generator, device)

    def init_state(self, b: int, d: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-sample optimiser state (e.g. a momentum buffer); none by default."""
        return {}

    def state_extras(self, state: dict[str, torch.Tensor]) -> dict[str, object]:
        """Facts from the final state worth returning in `AttackResult.extras`; none by default."""
        return {}

    def probe_points(self, xa: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        """(A, d) current points and (A, q, d) directions -> (A, P, d) probe points."""
        raise NotImplementedError

    def step(self, logp0: torch.Tensor, logp: torch.Tensor, dirs: torch.Tensor, y: torch.Tensor,
             state: dict[str, torch.Tensor], act: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        """The update to subtract from delta (A, d), from base (A, K) and probe (A, P, K) log-probs."""
        raise NotImplementedError

    def max_iterations(self) -> int:
        cap = (self.budget - 1) // (self.probes_per_step + 1)
        return cap if self.iterations is None else min(self.iterations, cap)

    # the loop ---------------------------------------------------------------------------------
    def run(self, access: QueryOracle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
            generator: torch.Generator) -> AttackResult:
        oracle = access
        b = x.shape[0]
        shape = x.shape[1:]
        d = math.prod(shape)
        device = x.device
        x_flat = x.reshape(b, d)
        cur = x_flat.clone()  # the current point x + delta, exactly as last queried
        state = self.init_state(b, d, device)
        rows = torch.arange(b, device=device)

        # initial query of the clean point: base of the first iteration and a success check
        ok0 = oracle.affordable(1)[:b]
        first = rows[ok0]
        logp0 = torch.zeros(b, oracle.num_classes, device=device)
        logp0[first] = log_scores(oracle(x[first], first), oracle.output)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        done[first] = logp0[first].argmax(1) != y[first]
        cost = self.probes_per_step + 1

        it = 0
        for it in range(1, self.max_iterations() + 1):
            dirs_all = self.draw(b, d, generator, device)
            act = (oracle.affordable(cost)[:b] & ~done & ok0).nonzero().flatten()
            if act.numel() == 0:  # host sync: which samples to query is data-dependent
                it -= 1
                break
            a = act.numel()
            xa = cur[act]
            probes = self.probe_points(xa, dirs_all[act])  # (A, P, d)
            p = probes.shape[1]
            if self.clip_queries:
                probes = probes.clamp(0.0, 1.0)
            scores = oracle(probes.reshape(a * p, *shape), act.repeat_interleave(p))
            logp = log_scores(scores, oracle.output).view(a, p, -1)
            upd = self.step(logp0[act], logp, dirs_all[act], y[act], state, act, threat)
            x_new = threat.project((xa - upd).view(a, *shape), x[act])
            cur[act] = x_new.reshape(a, d)
            logp0[act] = log_scores(oracle(x_new, act), oracle.output)
            done[act] = logp0[act].argmax(1) != y[act]

        oracle.affordable(cost)  # marks the samples whose budget cannot pay another step
        x_adv = cur.view_as(x)
        stage = [self.name if flag else "" for flag in done.tolist()]
        return AttackResult(x_adv=x_adv, stage=stage, extras={"iterations": it, **self.state_extras(state)})


@register("zo_ngd")
@dataclass
class ZONGD(ZOAttack):
    """ZO-NGD. Defaults are the reference code's CIFAR-10 settings (`attack_batch2`):
    q=30, mu=10, eta=1e-3, lam=1e-3, rank-one Fisher, 100 iterations.
    The reference's MNIST path is q=40, mu=1, eta=4e-4, lam=5e-6, fisher=two_class.
    """

    mu: float = 10.0
    eta: float = 1e-3
    lam: float = 1e-3
    fisher: str = "rank1"
    loss: str = "hinge"

    def validate(self) -> None:
        super().validate()
        if self.loss not in LOSSES:
            raise choices_error("zo_ngd loss", self.loss, LOSSES)
        if self.fisher not in FISHERS:
            raise choices_error("zo_ngd fisher", self.fisher, FISHERS)
        for key in ("mu", "eta", "lam"):
            val = getattr(self, key)
            if not isinstance(val, (int, float)) or not val > 0:
                raise UserError(f"zo_ngd {key}={val!r} must be > 0")

    def probe_points(self, xa: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        return xa.unsqueeze(1) + self.mu * dirs

    def fisher_factor(self, logp0: torch.Tensor, logp: torch.Tensor, dirs: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
        """H (A, d, r) with Fisher = H H^T, estimated from the same probes as the loss gradient."""
        if self.fisher == "kclass":
            g_all = zo_gradient(logp, logp0, dirs, self.mu)  # (A, d, K)
            return g_all * logp0.exp().sqrt().unsqueeze(1)
        l0, lj = true_logp(logp0, y), true_logp(logp, y)
        g_l = zo_gradient(lj, l0, dirs, self.mu)
        if self.fisher == "rank1":
            return g_l.unsqueeze(-1)
        p0 = l0.exp()
        # log(1.0001 - p_y) as in the reference (1e-4 guards log 0); 1 - p_y = -expm1(log p_y) keeps
        # the digits that 1 - p_y loses once p_y is within float precision of 1
        o0 = torch.log(1e-4 - torch.expm1(l0))
        oj = torch.log(1e-4 - torch.expm1(lj))
        g_o = zo_gradient(oj, o0, dirs, self.mu)
        return torch.stack([p0.sqrt().unsqueeze(1) * g_l, (1 - p0).clamp_min(0).sqrt().unsqueeze(1) * g_o], -1)

    def init_state(self, b, d, device):
        return {"fisher_change": torch.zeros(b, device=device), "steps": torch.zeros(b, device=device)}

    def state_extras(self, state):
        """`fisher_change`: per sample, the mean over its steps of |lam*n - g| / |g|, how much the
        Fisher changed the step from plain gradient descent with step eta/lam (0: inert)."""
        mean = state["fisher_change"] / state["steps"].clamp_min(1)
        return {"fisher_change": torch.where(state["steps"] > 0, mean, torch.nan).tolist()}

    def step(self, logp0, logp, dirs, y, state, act, threat):
        if self.loss == "hinge":
            f0, fj = hinge_loss(logp0, y, self.kappa), hinge_loss(logp, y, self.kappa)
        else:  # "nll": minimise log p_y, the likelihood whose curvature the Fisher is
            f0, fj = true_logp(logp0, y), true_logp(logp, y)
        g = zo_gradient(fj, f0, dirs, self.mu)
        n = damped_solve(self.fisher_factor(logp0, logp, dirs, y), g, self.lam)
        change = (self.lam * n - g).norm(dim=1) / g.norm(dim=1).clamp_min(1e-30)
        state["fisher_change"][act] += torch.where(g.norm(dim=1) > 0, change, torch.zeros_like(change))
        state["steps"][act] += 1
        return self.eta * n
