"""AutoAttack through the reference implementation (`pyautoattack`), always seeded.

One call of the reference's `run_standard_evaluation` on the batch's still-robust samples, as a
user of the reference makes it (same verdicts, same passes); which component first fooled each
sample is read off the reference's own loop into `AttackResult.stage`. Where `access.model` is only
a differentiable stand-in (`access.decision` set: voting ensembles) or the model is randomised,
the components run one call each instead, and each component's output is judged by the harness's
verdict (the true decision; on a randomised model its R draws); per sample the most fooled output
is kept. A hard-vote ensemble is handed to the reference straight-through
(`ModelAccess.judged_model`: the votes' scores forward, the smoothed proxy's gradient backward),
so the reference's own checks judge the votes too. On a randomised model the reference's internal
checks stay single-draw (its code; documented). `version=custom` with
`attacks=[...]` selects components (e.g. `[apgd-ce]` = APGD-CE alone).

Seeding: `seed: 0` (the suites' setting) is the reference's documented `AutoAttack(..., seed=0)`:
every component reseeds with it, as the reference does, so on the same images the harness returns
the reference's per-sample verdicts exactly (tested, `tests/plugins/test_autoattack_reference.py`, when the
evaluation is one harness batch: the reference's chunks of `batch_size` then hold the same
samples). `seed: null` draws a seed per batch from the harness's generator instead. Never the
reference's own default (`seed=None`), which reseeds from the clock.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from harness.core import progress
from harness.core.attack import Attack, AttackResult, register
from harness.core.access import Capability, ModelAccess
from harness.core.errors import UserError
from harness.core.threat import ThreatModel
from harness.core.verdict import BestIterate, fully_fooled, is_fooled

VERSIONS = ("standard", "plus", "rand", "custom")
COMPONENTS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


@register("autoattack")
@dataclass
class AutoAttackRef(Attack):
    """Reference AutoAttack (Croce & Hein 2020).

    Args:
        version: standard | plus | rand | custom.
        attacks: components for `custom` (subset of apgd-ce, apgd-dlr, fab, square, apgd-t, fab-t).
        n_iter: override the APGD/FAB iteration count (None keeps the reference's 100).
        n_target_classes: override the targeted attacks' target count (None keeps 9).
        square_queries: override Square's query budget (None keeps 5,000).
        seed: the reference's seed (0 as in its documented use); None derives one per batch from
            the harness seed.
        batch_size: the reference's chunk size inside a component (its default is 250); None runs
            each component on the whole still-robust pool in one call.
    """

    requires = Capability.GRADIENTS

    version: str = "standard"
    attacks: list[str] | None = None
    n_iter: int | None = None
    n_target_classes: int | None = None
    square_queries: int | None = None
    seed: int | None = None
    batch_size: int | None = None

    def validate(self) -> None:
        version = self.version
        if version not in VERSIONS:
            raise UserError(f"autoattack version={version!r} unknown; use one of: {', '.join(VERSIONS)}")
        attacks = list(self.attacks) if self.attacks else None
        if version == "custom" and not attacks:
            raise UserError("autoattack version=custom needs attacks=[...] from: " + ", ".join(COMPONENTS))
        if attacks and version != "custom":
            raise UserError(f"autoattack attacks={attacks} only applies to version=custom")
        for a in attacks or []:
            if a not in COMPONENTS:
                raise UserError(f"autoattack component {a!r} unknown; use: {', '.join(COMPONENTS)}")
        self.attacks = attacks
        seed, chunk = self.seed, self.batch_size
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
            raise UserError(f"autoattack seed={seed!r} must be an integer in 0..2^31-1 or null (derived from the run's seed)")
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise UserError(f"autoattack batch_size={chunk!r} must be a positive integer (the reference uses 250) or null")

    def supports_amp(self) -> bool:
        """Under autocast only when every component is an APGD (gradient steps); FAB's projections and
        Square's score differences stay in float32."""
        return all(c.startswith("apgd") for c in self.components())

    def components(self) -> list[str]:
        """The reference's components this configuration runs, in order."""
        if self.version == "custom":
            return list(self.attacks or [])
        return {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"], "rand": ["apgd-ce", "apgd-dlr"],
                "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]}[self.version]

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
        seed = self.seed if self.seed is not None else int(
            torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).cpu())
        if access.decision is None and access.draws <= 1:  # the model is its own deterministic decision
            aa = self._build(access.model, threat, seed, x.device, access.num_classes)
            return self._run_reference(aa, x, y, list(aa.attacks_to_run))
        # A deterministic stand-in (hard votes) goes in straight-through: forward value = the true
        # decision's scores, gradient = the proxy's, so the reference's internal checks (which
        # samples it still attacks, which iterate it keeps) judge as the harness does.
        model = access.judged_model if access.judged_model is not None else access.model
        aa = self._build(model, threat, seed, x.device, access.num_classes)
        return self._run_judged(aa, access, x, y, list(aa.attacks_to_run))

    def _run_reference(self, aa: Any, x: torch.Tensor, y: torch.Tensor, components: list[str]) -> AttackResult:
        """One `run_standard_evaluation` call, exactly as a user of the reference makes it: the same
        verdicts and the same passes. `_ReferenceLog` reads which component fooled each sample."""
        log = _ReferenceLog(aa, x, y)
        out, _ = aa.run_standard_evaluation(x, y, batch_size=self.batch_size or max(int(x.shape[0]), 1))
        log.finish()
        return AttackResult(out.to(x.device), stage=log.stage, extras={"components": components})

    def _run_judged(self, aa: Any, access: ModelAccess, x: torch.Tensor, y: torch.Tensor,
                    components: list[str]) -> AttackResult:
        """Component by component, each output judged by the harness's verdict (`access.verdict`:
        the true decision, R draws on a randomised model); per sample the most fooled output is kept."""
        best = BestIterate(x)  # score -1: the first component's output is always kept
        stage = [""] * x.shape[0]
        for comp in components:
            idx = (~fully_fooled(best.score)).nonzero().flatten()  # not yet fooled in every decision draw
            if idx.numel() == 0:
                break
            aa.attacks_to_run = [comp]
            chunk = self.batch_size or max(int(idx.numel()), 1)
            out, _ = aa.run_standard_evaluation(x[idx], y[idx], batch_size=chunk)
            out = out.to(x.device)
            # judge with the harness's verdict (the true decision, its R draws on a randomised model)
            score = access.verdict(out, y[idx])
            replaced = best.offer(out, score, torch.zeros_like(score), idx=idx)
            for i in idx[replaced & is_fooled(score)].tolist():
                stage[i] = comp
            progress.substage(comp, int((~is_fooled(best.score)).sum()), int(x.shape[0]))  # robust accuracy per component, as it goes
        return AttackResult(best.x, stage=stage, extras={"components": components})


class _ReferenceLog:
    """Which component of one reference `run_standard_evaluation` call first fooled each sample.

    The reference keeps that to itself. Its loop hands each component a chunk of clean rows of the
    still-robust samples, in index order, and then judges the chunk's result with `get_logits`;
    this log wraps both calls on the instance, locates the chunk's rows among the still-robust
    samples (exact equality, in order) and reads the verdict from the reference's own output, so it
    adds no model pass. Informational only: the harness verifies every returned example itself,
    and a reference whose loop differs leaves stages empty, never a wrong verdict.
    """

    def __init__(self, aa: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.labels = x, y, y.tolist()
        self.robust = [True] * x.shape[0]
        self.stage = [""] * x.shape[0]
        self.pending: tuple[str, list[int] | None] | None = None
        self.current, self.cursor = "", 0
        names = {"apgd": lambda: f"apgd-{aa.apgd.loss}", "apgd_targeted": lambda: "apgd-t",
                 "fab": lambda: "fab-t" if aa.fab.targeted else "fab", "square": lambda: "square"}
        for attr, name in names.items():
            self._wrap_perturb(getattr(aa, attr), name)
        get_logits = aa.get_logits

        def judged(x_in: torch.Tensor) -> torch.Tensor:
            out = get_logits(x_in)
            if self.pending is not None:
                comp, ids = self.pending
                self.pending = None
                if ids is not None and out.shape[0] == len(ids):
                    for i, f in zip(ids, (out.argmax(1) != self.y[ids]).tolist()):
                        if f:
                            self.robust[i], self.stage[i] = False, comp
            return out

        aa.get_logits = judged

    def _wrap_perturb(self, component: Any, name: Any) -> None:
        perturb = component.perturb

        def logged(x_in: torch.Tensor, y_in: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            comp = name()  # the reference sets the loss / targeted flag before it calls perturb
            if comp != self.current:
                self.finish()
                self.current, self.cursor = comp, 0
            adv = perturb(x_in, y_in, *args, **kwargs)
            self.pending = (comp, self._locate(x_in, y_in))
            return adv

        component.perturb = logged

    def finish(self) -> None:
        """Report the component that just ended (robust accuracy per component, as it goes)."""
        if self.current:
            progress.substage(self.current, sum(self.robust), len(self.robust))

    def _locate(self, x_in: torch.Tensor, y_in: torch.Tensor) -> list[int] | None:
        """Indices of the chunk's rows: the next still-robust samples with equal image and label.

        The reference hands the still-robust samples in index order, so the next `len(x_in)` of
        them are checked at once (one host sync per chunk); only if they differ is the chunk
        located row by row.
        """
        rows = int(x_in.shape[0])
        nxt = [p for p in range(self.cursor, len(self.labels)) if self.robust[p]][:rows]
        if rows and len(nxt) == rows:
            want = torch.as_tensor(nxt, device=self.x.device)
            same = (x_in.reshape(rows, -1) == self.x[want].reshape(rows, -1)).all(1) & (y_in.to(self.y.device) == self.y[want])
            if bool(same.all()):
                self.cursor = nxt[-1] + 1
                return nxt
        return self._locate_rows(x_in, y_in)

    def _locate_rows(self, x_in: torch.Tensor, y_in: torch.Tensor) -> list[int] | None:
        """`_locate` row by row: each row matched to the next still-robust sample equal to it."""
        ids, p, n = [], self.cursor, len(self.labels)
        for row, label in zip(x_in, y_in.tolist()):
            while p < n and not (self.robust[p] and self.labels[p] == label and torch.equal(row, self.x[p])):
                p += 1
            if p == n:
                return None
            ids.append(p)
            p += 1
        self.cursor = p
        return ids
