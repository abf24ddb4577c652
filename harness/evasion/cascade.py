"""The evaluator: clean pass, then the suite in order on still-robust samples, every adversarial
example re-verified by the harness, per-sample records, resumable by batch.

Robust accuracy is a per-sample worst case: a sample counts as robust only if it is classified
correctly clean and no attack in the suite fooled it. For randomised classifiers each decision is
taken over R draws and a sample keeps the fewest correct draws seen across attacks; from that the
summary reports mean (expected), majority and worst-case (robust only if every draw is right)
accuracy. Attacks run in suite order on the samples not yet broken in every draw (the AutoAttack
cascade), which is exact for all three numbers.

The judge is out of the attacks' reach (`harness.evasion.judge`): an attack gets copies of its
images, labels and threat model; the model is compared with a private snapshot before and after
every stage; passes are counted at the attack's wrapper and independently at the model; black-box
queries are tallied in a ledger the evaluator holds; every model output the verdict uses is
checked (finite logits of shape (N, C)). A broken rule voids the stage: `AttackVoided`, one line
naming the attack, the batch is not recorded and the run stops; no sample ever counts as broken
by a void stage.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import pandas as pd
import torch

from harness.core import progress
from harness.core.access import Capability, PassCounter, make_model_access
from harness.core.classifier import Classifier
from harness.core.contract import output_problem
from harness.core.errors import UserError
from harness.core.hashing import stable_hash
from harness.core.oracle import QueryLedger, QueryOracle
from harness.core.threat import ThreatModel
from harness.data.training import to_unit
from harness.evasion.judge import (ModelSnapshot, PassTally, expected_passes, inputs_changed, model_self_changes,
                                   reachable_modules, tally_roots, void)
from harness.evasion.plan import AttackSlot, EvalPlan


def make_access(slot: AttackSlot, clf: Classifier, counter: PassCounter, batch_size: int, device: torch.device,
                ledger: QueryLedger | None = None, draws: int = 1) -> Any:
    """Hand the attack exactly the capability it declares, counted, with the harness's verdict
    (`ledger`: the evaluator's own query count for score-only attacks; `draws` = the evaluator's R
    decision draws for a randomised classifier)."""
    attack = slot.attack
    eot = int(getattr(attack, "eot", 1) or 1)
    needs = attack.requires
    if needs == Capability.SCORES:
        from harness.core.oracle import make_oracle

        return make_oracle(clf, attack, batch_size, device, ledger=ledger)
    if needs == Capability.FEATURES:
        from harness.core.features import make_feature_access

        return make_feature_access(clf, getattr(attack, "layer", None), counter, eot=eot, draws=draws)
    if needs == Capability.ENSEMBLE:
        if clf.ensemble is None:
            raise UserError(f"attack {slot.label!r} needs an ensemble defense (members); this defense has none")
        from harness.core.ensemble import make_ensemble_access

        return make_ensemble_access(clf, counter, eot=eot, draws=draws)
    if slot.view is not None and slot.view not in clf.views:
        raise UserError(f"attack {slot.label!r} asks for view={slot.view!r}; this defense offers: {sorted(clf.views) or 'none'}")
    return make_model_access(clf, counter, eot=eot, draws=draws, view=slot.view)


def _batch_seed(seed: int, batch: int, salt: str) -> int:
    return int(stable_hash({"seed": seed, "batch": batch, "salt": salt}, 15), 16)


@torch.no_grad()
def correct_draws(clf: Classifier, x: torch.Tensor, y: torch.Tensor, draws: int, seed: int,
                  where: str = "a decision") -> tuple[torch.Tensor, torch.Tensor]:
    """(number of correct draws per sample, prediction of the first draw): the harness's verdict.

    Every output is checked first (`output_problem`); a bad one is a one-line `UserError` that
    says `where` it happened, before anything of the batch is recorded.
    """
    torch.manual_seed(seed)
    n = draws if clf.randomized else 1
    count = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    first = None
    for _ in range(n):
        with torch.autocast(x.device.type, enabled=False):  # the verdict is float32, whatever the caller's autocast
            out = clf.module(x)
        problem = output_problem(out, x.shape[0], clf.num_classes)
        if problem is not None:
            raise UserError(f"{problem} ({where}); nothing of this batch is recorded and the run stops: "
                            f"the model must return finite logits of shape (N, C) on every batch")
        pred = out.argmax(1)
        first = pred if first is None else first
        count += (pred == y).long()
    assert first is not None
    return count, first


def attack_precision(plan: EvalPlan, slot: AttackSlot) -> contextlib.AbstractContextManager:
    """Autocast for the attack's own passes when `evaluator.amp` is on and the attack is safe under it
    (`Attack.supports_amp`); float32 otherwise. Never around the verdict (`correct_draws`)."""
    if plan.amp is None or not slot.attack.supports_amp():
        return contextlib.nullcontext()
    return torch.autocast(plan.device.type, dtype=plan.amp)


def run_snapshot(clf: Classifier) -> ModelSnapshot:
    """The judge's private copy of everything an attack could reach in the model."""
    return ModelSnapshot(reachable_modules(clf))


def _check_counts(access: Any, tally: PassTally, unit: int, ledger: QueryLedger | None) -> str | None:
    """Why the independent counts disagree with the attack's own, or None (syncs once for oracles)."""
    if isinstance(access, QueryOracle):
        assert ledger is not None
        if not (ledger.rows == access.passes == access.total and unit * ledger.rows == tally.forward):
            return (f"query counts disagree: ledger {ledger.rows} rows, oracle {access.total} queries and "
                    f"{access.passes} model calls, {tally.forward // max(unit, 1)} passes seen at the model "
                    f"(the oracle was bypassed or its tally rewritten)")
        if tally.backward:
            return f"{tally.backward} backward passes reached the model through a score-only oracle"
        tallied = access.queries.to(ledger.queries.device)
        differs, most = torch.stack([(tallied != ledger.queries).any().long(), ledger.queries.max() if ledger.queries.numel() else
                                     torch.zeros((), dtype=torch.long, device=ledger.queries.device)]).tolist()
        if differs:
            return "the oracle's per-sample query tally no longer matches the evaluator's ledger (the tally was rewritten)"
        if most > access.budget:
            return f"a sample used {most} queries, over the budget of {access.budget}"
        return None
    fwd, bwd = expected_passes(access, unit)
    if (fwd, bwd) != (tally.forward, tally.backward):
        return (f"its counting wrapper saw {fwd} forward / {bwd} backward image-passes but the model saw "
                f"{tally.forward} / {tally.backward} (a call bypassed the wrapper, e.g. access.model.module(x), "
                f"or the counter was rewritten)")
    return None


def evaluate_batch(plan: EvalPlan, clf: Classifier, b: int, ids: torch.Tensor, x_u8: torch.Tensor,
                   y: torch.Tensor, snapshot: ModelSnapshot | None = None,
                   on_verified: Callable[..., None] | None = None) -> pd.DataFrame:
    """Clean pass plus the cascade on one batch; returns its long-format records.

    `snapshot`: the run's `run_snapshot(clf)` (taken here when not given).
    `on_verified(label, sample_ids, x_adv, success)`, when given, receives every attack's verified
    examples (the projected inputs the harness judged) and its verdict (harness.evaluate, save_adv).
    """
    device, threat = plan.device, plan.threat
    snapshot = snapshot if snapshot is not None else run_snapshot(clf)
    x = to_unit(x_u8, device)
    y = y.to(device)
    n_draws = plan.draws if clf.randomized else 1
    clean_count, clean_pred = correct_draws(clf, x, y, plan.draws, _batch_seed(plan.seed, b, "clean"),
                                            where=f"clean pass on batch {b}")
    worst = clean_count.clone()  # fewest correct draws seen so far, per sample
    rows: list[dict[str, Any]] = []
    ids_list, y_list = ids.tolist(), y.tolist()
    clean_list, pred_list = clean_count.tolist(), clean_pred.tolist()
    for i in range(x.shape[0]):
        rows.append({"sample_id": ids_list[i], "label": y_list[i], "attack": "clean", "order": 0, "ran": True,
                     "correct_draws": clean_list[i], "draws": n_draws, "success": False,
                     "pred": pred_list[i], "linf": 0.0, "l2": 0.0, "n_forward": 0.0, "n_backward": 0.0,
                     "prepare_forward": 0.0, "prepare_backward": 0.0,
                     "n_queries": 0, "time_s": 0.0, "violation": False, "stage": "",
                     "budget_exhausted": False, "nonfinite_grad": False, "certified": float("nan")})
    progress.stage_done("clean", x.shape[0], float(clean_count.sum()) / n_draws)
    for k, slot in enumerate(plan.slots, start=1):
        pool = (worst > 0) if plan.cascade else (clean_count > 0)
        idx = pool.nonzero().flatten()
        results = {}
        if idx.numel() > 0:
            results = _run_stage(plan, clf, snapshot, slot, b, idx, x, y, worst, n_draws, ids, on_verified)
        for i in range(x.shape[0]):
            r = results.get(i) or {"ran": False, "correct_draws": -1, "success": False, "pred": -1, "linf": float("nan"),
                                   "l2": float("nan"), "n_forward": slot.prepare_forward, "n_backward": slot.prepare_backward,
                                   "n_queries": 0, "time_s": 0.0, "violation": False, "stage": "", "budget_exhausted": False,
                                   "nonfinite_grad": False, "certified": float("nan")}
            # every evaluated sample carries its even share of what the attack's prepare() spent
            r = {**r, "prepare_forward": slot.prepare_forward, "prepare_backward": slot.prepare_backward}
            rows.append({"sample_id": ids_list[i], "label": y_list[i], "attack": slot.label, "order": k, "draws": n_draws, **r})
        progress.stage_done(slot.label, x.shape[0], int((worst == n_draws).sum()))
    return pd.DataFrame(rows)


def _run_stage(plan: EvalPlan, clf: Classifier, snapshot: ModelSnapshot, slot: AttackSlot, b: int, idx: torch.Tensor,
               x: torch.Tensor, y: torch.Tensor, worst: torch.Tensor, n_draws: int, ids: torch.Tensor,
               on_verified: Callable[..., None] | None) -> dict[int, dict[str, Any]]:
    """One attack on the batch's pool `idx`, judged; updates `worst` and returns records by position."""
    device, threat, label = plan.device, plan.threat, slot.label
    where = f"on batch {b}"
    err = model_self_changes(snapshot, f"the harness's own forward passes before attack {label!r} on batch {b}")
    if err is not None:
        raise err
    xs, ys = x[idx], y[idx]  # the judge's own copies (advanced indexing copies); the attack never sees them
    m = int(idx.numel())
    counter = PassCounter()
    seed = _batch_seed(plan.seed, b, label)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    ledger = QueryLedger(m, device) if slot.attack.requires == Capability.SCORES else None
    access = make_access(slot, clf, counter, m, device, ledger, draws=plan.draws)
    xa, ya, threat_given = xs.clone(), ys.clone(), ThreatModel(threat.norm, threat.eps)
    roots, unit = tally_roots(clf, access)
    with PassTally(roots, m, device) as tally, attack_precision(plan, slot):
        start = time.perf_counter()
        out = slot.attack.run(access, xa, ya, threat_given, gen)
        elapsed = time.perf_counter() - start
    if (threat_given.norm, threat_given.eps) != (threat.norm, threat.eps):
        raise void(label, where, f"it changed the threat model to {threat_given.norm} eps={threat_given.eps}")
    problem = snapshot.changes([("it wrote into its input images x", inputs_changed(xa, xs)),
                                ("it wrote into its labels y", inputs_changed(ya, ys))])
    if problem is None:
        problem = _check_counts(access, tally, unit, ledger)
    if problem is not None:
        raise void(label, where, problem)
    x_adv = out.x_adv.detach().to(device).float() if torch.is_tensor(out.x_adv) else None
    if x_adv is None or x_adv.numel() != xs.numel():
        shape = tuple(x_adv.shape) if x_adv is not None else type(out.x_adv).__name__
        raise void(label, where, f"it returned x_adv of shape {shape} for inputs of shape {tuple(xs.shape)}")
    x_adv = x_adv.reshape(xs.shape)
    bad = threat.violations(x_adv, xs)
    # float fix-ups only where needed: an example already inside the ball and box is judged exactly as returned
    linf0, l20 = threat.norms(x_adv, xs)
    flat = x_adv.flatten(1)
    inside = ((linf0 if threat.norm == "Linf" else l20) <= threat.eps) & (flat.amin(1) >= 0) & (flat.amax(1) <= 1)
    x_adv = torch.where(bad.view(-1, 1, 1, 1), xs, torch.where(inside.view(-1, 1, 1, 1), x_adv, threat.project(x_adv, xs)))
    count, pred = correct_draws(clf, x_adv, ys, plan.draws, _batch_seed(plan.seed, b, label + "/verify"),
                                where=f"verifying attack {label!r} on batch {b}")
    count = torch.where(bad, torch.full_like(count, n_draws), count)  # invalid example: not broken
    worst[idx] = torch.minimum(worst[idx], count)
    if on_verified is not None:
        on_verified(label, ids[idx.cpu()], x_adv, (count * 2 < n_draws) if n_draws > 1 else (count == 0))
    linf, l2 = threat.norms(x_adv, xs)
    if ledger is not None:
        queries, exhausted = ledger.queries, access.exhausted
        n_fwd = n_bwd = 0.0
    else:
        queries = exhausted = None
        n_fwd, n_bwd = tally.forward / unit / m, tally.backward / unit / m  # the judge's own count
    # the attack's even share of what its prepare() spent (e.g. LAFEAT's head training) joins its cost
    n_fwd, n_bwd = n_fwd + slot.prepare_forward, n_bwd + slot.prepare_backward
    stage = list(out.stage or [])
    stage += [""] * (m - len(stage))
    cols = [count, pred, linf, l2, bad, tally.nonfinite_mask()]
    if queries is not None:
        cols += [queries, exhausted]
    values = [c.tolist() for c in cols]
    count_l, pred_l, linf_l, l2_l, bad_l, nonfinite_l = values[:6]
    queries_l, exhausted_l = (values[6], values[7]) if queries is not None else ([0] * m, [False] * m)
    # proved robust by a complete verifier (attack=exact): 1/0; NaN for attacks that cannot prove it
    cert = out.certified.detach().cpu().float().tolist() if out.certified is not None else [float("nan")] * m
    results = {}
    for j, i in enumerate(idx.tolist()):
        c = int(count_l[j])
        results[i] = {"ran": True, "correct_draws": c, "success": bool(c * 2 < n_draws) if n_draws > 1 else bool(c == 0),
                      "pred": int(pred_l[j]), "linf": float(linf_l[j]), "l2": float(l2_l[j]),
                      "n_forward": n_fwd, "n_backward": n_bwd, "n_queries": int(queries_l[j]),
                      "time_s": elapsed / m, "violation": bool(bad_l[j]), "stage": str(stage[j]),
                      "budget_exhausted": bool(exhausted_l[j]), "nonfinite_grad": bool(nonfinite_l[j]),
                      "certified": cert[j]}
    return results
