"""The evaluator: clean pass, then the suite in order on still-robust samples, every adversarial
example re-verified by the harness, per-sample records, resumable by batch.

Robust accuracy is a per-sample worst case: a sample counts as robust only if it is classified
correctly clean and no attack in the suite fooled it. For randomised classifiers each decision is
taken over R draws and a sample keeps the fewest correct draws seen across attacks; from that the
summary reports mean (expected), majority and worst-case (robust only if every draw is right)
accuracy. Attacks run in suite order on the samples not yet broken in every draw (the AutoAttack
cascade), which is exact for all three numbers.
"""
from __future__ import annotations

import time
from typing import Any

import pandas as pd
import torch

from harness.core.access import Capability, CountingModule, ModelAccess, PassCounter
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.core.hashing import stable_hash
from harness.data.training import to_unit
from harness.evasion.plan import AttackSlot, EvalPlan


def make_access(slot: AttackSlot, clf: Classifier, counter: PassCounter, batch_size: int, device: torch.device) -> Any:
    """Hand the attack exactly the capability it declares, counted."""
    attack = slot.attack
    eot = int(getattr(attack, "eot", 1) or 1)
    needs = attack.requires
    if needs == Capability.SCORES:
        from harness.core.oracle import make_oracle

        return make_oracle(clf, attack, batch_size, device)
    if needs == Capability.FEATURES:
        from harness.core.features import make_feature_access

        return make_feature_access(clf, getattr(attack, "layer", None), counter)
    if needs == Capability.ENSEMBLE:
        if clf.ensemble is None:
            raise UserError(f"attack {slot.label!r} needs an ensemble defense (members); this defense has none")
        from harness.core.ensemble import make_ensemble_access

        return make_ensemble_access(clf, counter, eot=eot)
    if slot.view is not None:
        if slot.view not in clf.views:
            raise UserError(f"attack {slot.label!r} asks for view={slot.view!r}; this defense offers: {sorted(clf.views) or 'none'}")
        target, randomized = clf.views[slot.view], False  # views are deterministic stand-ins
    else:
        target, randomized = clf.differentiable, clf.randomized
    decision = CountingModule(clf.module, counter) if target is not clf.module else None
    return ModelAccess(CountingModule(target, counter), clf.num_classes, counter, randomized=randomized, eot=eot,
                       decision=decision)


def _batch_seed(seed: int, batch: int, salt: str) -> int:
    return int(stable_hash({"seed": seed, "batch": batch, "salt": salt}, 15), 16)


@torch.no_grad()
def correct_draws(clf: Classifier, x: torch.Tensor, y: torch.Tensor, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of correct draws per sample, prediction of the first draw): the harness's verdict."""
    torch.manual_seed(seed)
    n = draws if clf.randomized else 1
    count = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    first = None
    for _ in range(n):
        pred = clf.module(x).argmax(1)
        first = pred if first is None else first
        count += (pred == y).long()
    assert first is not None
    return count, first


def evaluate_batch(plan: EvalPlan, clf: Classifier, b: int, ids: torch.Tensor, x_u8: torch.Tensor,
                   y: torch.Tensor) -> pd.DataFrame:
    """Clean pass plus the cascade on one batch; returns its long-format records."""
    device, threat = plan.device, plan.threat
    x = to_unit(x_u8, device)
    y = y.to(device)
    n_draws = plan.draws if clf.randomized else 1
    clean_count, clean_pred = correct_draws(clf, x, y, plan.draws, _batch_seed(plan.seed, b, "clean"))
    worst = clean_count.clone()  # fewest correct draws seen so far, per sample
    rows: list[dict[str, Any]] = []
    ids_list, y_list = ids.tolist(), y.tolist()
    for i in range(x.shape[0]):
        rows.append({"sample_id": ids_list[i], "label": y_list[i], "attack": "clean", "order": 0, "ran": True,
                     "correct_draws": int(clean_count[i]), "draws": n_draws, "success": False,
                     "pred": int(clean_pred[i]), "linf": 0.0, "l2": 0.0, "n_forward": 0.0, "n_backward": 0.0,
                     "n_queries": 0, "time_s": 0.0, "violation": False, "stage": "",
                     "budget_exhausted": False, "certified": float("nan")})
    for k, slot in enumerate(plan.slots, start=1):
        pool = (worst > 0) if plan.cascade else (clean_count > 0)
        idx = pool.nonzero().flatten()
        results = {}
        if idx.numel() > 0:
            counter = PassCounter()
            seed = _batch_seed(plan.seed, b, slot.label)
            torch.manual_seed(seed)
            gen = torch.Generator(device=device).manual_seed(seed)
            access = make_access(slot, clf, counter, int(idx.numel()), device)
            xs, ys = x[idx], y[idx]
            start = time.perf_counter()
            out = slot.attack.run(access, xs, ys, threat, gen)
            elapsed = time.perf_counter() - start
            x_adv = out.x_adv.detach().to(device).reshape(xs.shape).float()
            bad = threat.violations(x_adv, xs)
            x_adv = torch.where(bad.view(-1, 1, 1, 1), xs, threat.project(x_adv, xs))  # float fix-ups only
            count, pred = correct_draws(clf, x_adv, ys, plan.draws, _batch_seed(plan.seed, b, slot.label + "/verify"))
            count = torch.where(bad, torch.full_like(count, n_draws), count)  # invalid example: not broken
            worst[idx] = torch.minimum(worst[idx], count)
            linf, l2 = threat.norms(x_adv, xs)
            queries = getattr(access, "queries", None)
            exhausted = getattr(access, "exhausted", None)
            if queries is not None and access.passes != access.total:
                raise RuntimeError(f"{slot.label}: oracle passes {access.passes} != queries {access.total}")
            m = idx.numel()
            stage = out.stage or [""] * m
            # proved robust by a complete verifier (attack=exact): 1/0; NaN for attacks that cannot prove it
            cert = out.certified.detach().cpu().float().tolist() if out.certified is not None else [float("nan")] * m
            for j, i in enumerate(idx.tolist()):
                results[i] = {"ran": True, "correct_draws": int(count[j]), "success": bool(count[j] * 2 < n_draws) if n_draws > 1 else bool(count[j] == 0),
                              "pred": int(pred[j]), "linf": float(linf[j]), "l2": float(l2[j]),
                              "n_forward": counter.forward / m, "n_backward": counter.backward / m,
                              "n_queries": int(queries[j]) if queries is not None else 0,
                              "time_s": elapsed / m, "violation": bool(bad[j]), "stage": str(stage[j]),
                              "budget_exhausted": bool(exhausted[j]) if exhausted is not None else False,
                              "certified": cert[j]}
        for i in range(x.shape[0]):
            r = results.get(i) or {"ran": False, "correct_draws": -1, "success": False, "pred": -1, "linf": float("nan"),
                                   "l2": float("nan"), "n_forward": 0.0, "n_backward": 0.0, "n_queries": 0, "time_s": 0.0,
                                   "violation": False, "stage": "", "budget_exhausted": False, "certified": float("nan")}
            rows.append({"sample_id": ids_list[i], "label": y_list[i], "attack": slot.label, "order": k, "draws": n_draws, **r})
    return pd.DataFrame(rows)


