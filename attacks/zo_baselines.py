"""Score-based baselines run under the same oracle and loop as ZO-NGD.

- `zo_sgd`: the reference code's `attack_batch3`: ZO-NGD's sphere-smoothing estimator of the C&W
  hinge gradient, a plain gradient step delta <- delta - eta*g (no Fisher), the L-inf box.
  Reference settings: q=30, mu=10, eta=0.02 on CIFAR-10; q=40, mu=1, eta=0.01 on MNIST.
- `nes`: the NES attack of Ilyas et al. (ICML 2018, "query-limited" setting): antithetic Gaussian
  probes x +- sigma*u, the estimate sum_i (L(x+sigma u_i) - L(x-sigma u_i)) u_i / (2 sigma n),
  momentum on the estimate, and signed (L-inf) or normalised (L2) projected steps. Defaults follow
  their code: 50 probes per step (25 pairs), sigma=1e-3, momentum 0.9, step = 0.2*eps (0.01 at
  eps 0.05), loss = -CE (log p_y). We leave out their plateau learning-rate decay.

Both use `attacks.zo_ngd.ZOAttack`: the same initial query, stop at success, q+1 queries per
iteration (probes, then one query of the updated point) and the same per-sample budget rule.
"""
from __future__ import annotations

import torch

from harness.core.attack import register
from attacks.zo_ngd import ZOAttack, hinge_loss, true_logp, zo_gradient
from harness.core.errors import UserError, choices_error

NES_LOSSES = ("ce", "margin")


@register("zo_sgd")
class ZOSGD(ZOAttack):
    """Zeroth-order sign-free gradient descent with ZO-NGD's estimator and no preconditioning."""

    def __init__(
        self,
        q: int = 30,
        mu: float = 10.0,
        eta: float = 0.02,
        iterations: int | None = 100,
        budget: int = 10_000,
        output: str = "probs",
        kappa: float = 0.0,
        clip_queries: bool = False,
    ) -> None:
        super().__init__(q, iterations, budget, output, kappa, clip_queries)
        for key, val in (("mu", mu), ("eta", eta)):
            if not isinstance(val, (int, float)) or not val > 0:
                raise UserError(f"zo_sgd {key}={val!r} must be > 0")
        self.mu = float(mu)
        self.eta = float(eta)

    def probe_points(self, xa: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        return xa.unsqueeze(1) + self.mu * dirs

    def step(self, logp0, logp, dirs, y, state, act, threat):
        f0 = hinge_loss(logp0, y, self.kappa)
        fj = hinge_loss(logp, y, self.kappa)
        return self.eta * zo_gradient(fj, f0, dirs, self.mu)


@register("nes")
class NES(ZOAttack):
    """NES gradient estimation with antithetic sampling and projected signed steps."""

    def __init__(
        self,
        q: int = 50,
        sigma: float = 1e-3,
        step_size: float = 0.2,
        momentum: float = 0.9,
        loss: str = "ce",
        iterations: int | None = None,
        budget: int = 10_000,
        output: str = "probs",
        kappa: float = 0.0,
        clip_queries: bool = False,
    ) -> None:
        super().__init__(q, iterations, budget, output, kappa, clip_queries)
        if q % 2:
            raise UserError(f"nes q={q} must be even (antithetic pairs)")
        if loss not in NES_LOSSES:
            raise choices_error("nes loss", loss, NES_LOSSES)
        if not sigma > 0 or not step_size > 0 or not 0 <= momentum < 1:
            raise UserError(f"nes needs sigma>0, step_size>0, 0<=momentum<1; got {sigma}, {step_size}, {momentum}")
        self.sigma = float(sigma)
        self.step_size = float(step_size)
        self.momentum = float(momentum)
        self.loss = loss

    def draw(self, b, d, generator, device):
        return torch.randn((b, self.q // 2, d), generator=generator, device=generator.device).to(device)

    def init_state(self, b, d, device):
        return {"m": torch.zeros(b, d, device=device)}

    def probe_points(self, xa, dirs):
        xa = xa.unsqueeze(1)
        return torch.cat([xa + self.sigma * dirs, xa - self.sigma * dirs], dim=1)

    def _loss(self, logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss == "ce":
            return true_logp(logp, y)  # minimise log p_y == maximise cross-entropy
        return hinge_loss(logp, y, self.kappa)

    def step(self, logp0, logp, dirs, y, state, act, threat):
        h = self.q // 2
        f = self._loss(logp, y)
        g = torch.einsum("ah,ahd->ad", f[:, :h] - f[:, h:], dirs) / (2 * self.sigma * h)
        m = self.momentum * state["m"][act] + (1 - self.momentum) * g
        state["m"][act] = m
        size = self.step_size * threat.eps
        if threat.norm == "Linf":
            return size * m.sign()
        return size * m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)

