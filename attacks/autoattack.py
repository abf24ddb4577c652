"""AutoAttack through the reference implementation (`pyautoattack`), always seeded.

The version's component attacks run one at a time on the still-robust samples (the same cascade
the reference runs), so each component's per-sample outcome is kept in `AttackResult.stage`.
`version=custom` with `attacks=[...]` selects components (e.g. `[apgd-ce]` = APGD-CE alone).
The seed comes from the harness's generator: the reference's default (`seed=None`) reseeds from
the clock and would make runs irreproducible.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from harness.core.attack import Attack, AttackResult, register
from harness.core.access import Capability, ModelAccess
from harness.core.errors import UserError
from harness.core.threat import ThreatModel

VERSIONS = ("standard", "plus", "rand", "custom")
COMPONENTS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


@register("autoattack")
class AutoAttackRef(Attack):
    """Reference AutoAttack (Croce & Hein 2020).

    Args:
        version: standard | plus | rand | custom.
        attacks: components for `custom` (subset of apgd-ce, apgd-dlr, fab, square, apgd-t, fab-t).
        n_iter: override the APGD/FAB iteration count (None keeps the reference's 100).
        n_target_classes: override the targeted attacks' target count (None keeps 9).
        square_queries: override Square's query budget (None keeps 5,000).
    """

    requires = Capability.GRADIENTS

    def __init__(self, version: str = "standard", attacks: list[str] | None = None, n_iter: int | None = None,
                 n_target_classes: int | None = None, square_queries: int | None = None) -> None:
        if version not in VERSIONS:
            raise UserError(f"autoattack version={version!r} unknown; use one of: {', '.join(VERSIONS)}")
        attacks = list(attacks) if attacks else None
        if version == "custom" and not attacks:
            raise UserError("autoattack version=custom needs attacks=[...] from: " + ", ".join(COMPONENTS))
        if attacks and version != "custom":
            raise UserError(f"autoattack attacks={attacks} only applies to version=custom")
        for a in attacks or []:
            if a not in COMPONENTS:
                raise UserError(f"autoattack component {a!r} unknown; use: {', '.join(COMPONENTS)}")
        self.version = version
        self.attacks = attacks
        self.n_iter = n_iter
        self.n_target_classes = n_target_classes
        self.square_queries = square_queries

    def _build(self, model: torch.nn.Module, threat: ThreatModel, seed: int, device: torch.device, num_classes: int) -> Any:
        from pyautoattack import AutoAttack

        aa = AutoAttack(model, norm=threat.norm, eps=threat.eps, version=self.version, seed=seed,
                        attacks=self.attacks, device=device)
        aa.verbose = False
        aa.logger.setLevel(logging.WARNING)
        if self.n_iter is not None:
            aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = int(self.n_iter)
        n_targets = self.n_target_classes if self.n_target_classes is not None else 9
        n_targets = min(int(n_targets), num_classes - 1)
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = n_targets
        if self.square_queries is not None:
            aa.square.n_queries = int(self.square_queries)
        if self.version == "custom":  # the reference's custom defaults: one restart each
            aa.apgd.n_restarts = aa.fab.n_restarts = 1
        return aa

    def run(self, access: ModelAccess, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
            generator: torch.Generator) -> AttackResult:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).cpu())
        aa = self._build(access.model, threat, seed, x.device, access.num_classes)
        components = list(aa.attacks_to_run)
        x_adv = x.clone()
        stage = [""] * x.shape[0]
        robust = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for comp in components:
            idx = robust.nonzero().flatten()
            if idx.numel() == 0:
                break
            aa.attacks_to_run = [comp]
            out, _ = aa.run_standard_evaluation(x[idx], y[idx], batch_size=max(int(idx.numel()), 1))
            out = out.to(x.device)
            with torch.no_grad():  # judge with the true decision (hard votes), not a smoothed proxy
                fooled = (access.decision or access.model)(out).argmax(1) != y[idx]
            x_adv[idx[fooled]] = out[fooled]
            robust[idx[fooled]] = False
            for i in idx[fooled].tolist():
                stage[i] = comp
        return AttackResult(x_adv, stage=stage, extras={"components": components})

