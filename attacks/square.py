"""Square Attack (Andriushchenko et al., ECCV 2020) from pyautoattack, driven through our oracle.

pyautoattack's `SquareAttack.attack_single_run` only ever sees a `predict(images) -> logits`
function, and it queries subsets of the batch: first every sample, then, each iteration, the
samples whose best margin is still positive, in index order. `_OracleRouter` is that predict
function: it mirrors Square's margin bookkeeping (the running minimum of y-margin per sample, which
is exactly Square's `margin_min` with the margin loss) to know which samples the rows belong to,
charges each row to its sample on the oracle, and fails loudly if a call's row count ever differs
from the mirror's prediction. The router finds the active samples without a host synchronisation
(`nonzero_static` sized by Square's own row count; a disagreement is flagged on the device and
raised once after the run), so per iteration only the oracle's budget check synchronises; Square's
own loop (reference code) synchronises on its own. After the run, Square's own per-sample query
counter is compared with the oracle's tally; they must match.

Square draws its random squares from torch's global RNG; we seed it from the attack's generator
inside `torch.random.fork_rng`, so the caller's global RNG state is untouched and a run is
reproducible. One restart, `n_queries = budget - 1` iterations: with the initial query that is at
most `budget` queries per sample, and success stops a sample (Square drops it from the batch).
If the oracle returns probabilities, Square gets their logarithm (same margins as logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pyautoattack.square import SquareAttack

from harness.core.attack import Attack, AttackResult, register
from harness.core.access import Capability
from harness.core.errors import UserError, choices_error
from harness.core.oracle import OUTPUTS, QueryOracle, log_scores
from harness.core.threat import ThreatModel


class _OracleRouter:
    """Square's `predict`: routes rows to the oracle with the sample indices they belong to."""

    def __init__(self, oracle: QueryOracle, samples: torch.Tensor, y: torch.Tensor) -> None:
        self.oracle = oracle
        self.samples = samples  # batch-local sample index of each row Square was given
        self.y = y
        self.margin_min: torch.Tensor | None = None
        # on-device flag: a call's row count differed from the mirror's active samples (read once, `check`)
        self.drift = torch.zeros((), dtype=torch.bool, device=samples.device)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if self.margin_min is None:
            pos = torch.arange(self.samples.numel(), device=self.samples.device)
            if rows.shape[0] != pos.numel():
                raise RuntimeError(f"Square's first query has {rows.shape[0]} rows for {pos.numel()} samples: "
                                   "the row-to-sample mapping does not match pyautoattack's SquareAttack")
        else:
            # the active samples without a host sync: Square's own row count says how many there are,
            # and a disagreement is flagged on the device and raised after the run (`check`)
            active = self.margin_min > 0.0
            self.drift |= active.sum() != rows.shape[0]
            try:
                pos = torch.nonzero_static(active, size=rows.shape[0], fill_value=0).flatten()
            except NotImplementedError:  # torch < 2.6 has no CUDA kernel for it: one sync per call there
                pos = active.nonzero().flatten()[: rows.shape[0]]
        logits = log_scores(self.oracle(rows, self.samples[pos]), self.oracle.output)
        y = self.y[pos]
        u = torch.arange(rows.shape[0], device=rows.device)
        other = logits.clone()
        other[u, y] = -float("inf")
        margin = logits[u, y] - other.max(dim=-1)[0]
        if self.margin_min is None:
            self.margin_min = margin.clone()
        else:  # Square's update with the margin loss: improved or misclassified -> new margin
            cur = self.margin_min[pos]
            improved = ((margin < cur) | (margin <= 0.0)).float()
            self.margin_min[pos] = improved * margin + (1.0 - improved) * cur
        return logits.clone()

    def check(self) -> None:
        """Raise if any call's rows did not match the mirror's active samples (one host sync)."""
        if bool(self.drift):
            raise RuntimeError("Square queried a number of rows that differs from the samples still active: "
                               "the row-to-sample mapping no longer matches pyautoattack's SquareAttack")


@register("square")
@dataclass
class Square(Attack):
    """pyautoattack's Square Attack (margin loss, one restart) under a per-sample query budget."""

    requires: ClassVar[Capability] = Capability.SCORES

    budget: int = 10_000
    p_init: float = 0.8
    output: str = "probs"
    rescale_schedule: bool = True

    def validate(self) -> None:
        budget, p_init, output = self.budget, self.p_init, self.output
        if not isinstance(budget, int) or budget < 2:
            raise UserError(f"square budget={budget!r} must be an integer >= 2 (queries per sample)")
        if not 0 < p_init <= 1:
            raise UserError(f"square p_init={p_init!r} must be in (0, 1]")
        if output not in OUTPUTS:
            raise choices_error("oracle output", output, OUTPUTS)

    def run(self, access: QueryOracle, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
            generator: torch.Generator) -> AttackResult:
        oracle = access
        b = x.shape[0]
        samples = oracle.affordable(self.budget)[:b].nonzero().flatten()  # untouched samples only
        x_adv = x.clone()
        if samples.numel() == 0:
            return AttackResult(x_adv=x_adv, stage=[""] * b)
        router = _OracleRouter(oracle, samples, y[samples])
        sq = SquareAttack(
            router, norm=threat.norm, n_queries=self.budget - 1, eps=threat.eps, p_init=self.p_init,
            n_restarts=1, seed=0, verbose=False, targeted=False, loss="margin",
            resc_schedule=self.rescale_schedule, device=x.device,
        )
        sq.init_hyperparam(x)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            n_queries, adv = sq.attack_single_run(x[samples], y[samples])
        router.check()
        tally = oracle.queries[samples]
        if not torch.equal(n_queries.to(tally.device).long(), tally):
            raise RuntimeError("Square's own query count differs from the oracle's tally")
        x_adv[samples] = adv
        fooled = torch.zeros(b, dtype=torch.bool, device=x.device)
        fooled[samples] = router.margin_min <= 0.0
        oracle.mark_exhausted((oracle.queries[:b] >= self.budget) & ~fooled)
        return AttackResult(x_adv=x_adv, stage=["square" if f else "" for f in fooled.tolist()],
                            extras={"seed": seed})
