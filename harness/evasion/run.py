"""Run one evaluation: build the defense, check the contract, prepare the attacks, then the
cascade batch by batch (resuming finished batches), and finish the run directory.

The manifest is written just before the first batch is: a run that fails on its first batch
(a bad model output, a void attack) leaves nothing behind.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from harness.core.attack import PrepareContext
from harness.core.contract import check_classifier
from harness.core.defense import BuildContext, build_defense
from harness.core.hashing import module_hash, tensor_hash
from harness.core import progress as progress_ui
from harness.data.training import to_unit
from harness.evasion.cascade import evaluate_batch, run_snapshot
from harness.evasion.judge import model_self_changes, void
from harness.evasion.plan import EvalPlan, plan_evaluation
from harness.results.store import base_manifest


def summarize(samples: pd.DataFrame, plan: EvalPlan, clf_info: dict[str, Any], prep: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Aggregates from the per-sample records (the leaderboard recomputes the same way)."""
    from harness.results.metrics import accuracies

    acc = accuracies(samples)
    return {
        **acc,
        "n_samples": int(samples["sample_id"].nunique()),
        "suite": plan.suite_name,
        "threat": plan.threat.name,
        "randomized": bool(clf_info.get("randomized", False)),
        "wall_s": wall_s,
        "prepare": prep,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _record_copy(clf: Any) -> Any:
    """A shallow copy of the classifier record (same modules, own views/info dicts), made without
    `__post_init__` so that no module's mode is touched: prepare() cannot rebind the judge's."""
    out = copy.copy(clf)
    out.views, out.info = dict(clf.views), dict(clf.info)
    return out


def run_evaluation(cfg: dict[str, Any], overrides: list[str] | None = None, log=print,
                   manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan, build the defense, check the contract, run (or resume, or skip) and finish a run.

    `manifest_extra` adds provenance fields (e.g. `submission: true` and the bundle's card).
    """
    plan = plan_evaluation(cfg)
    run = plan.run
    if run.is_done():
        log(f"[arena] run {run.key} already complete; skipping ({run.path})")
        summary = run.read_json("summary.json") or {}
        return {**summary, "run_dir": str(run.path), "skipped": True}
    cache_dir = Path(str(cfg.get("work_dir", "arena-work"))) / "cache"
    progress = bool(cfg.get("progress", True))
    defense = build_defense(dict(cfg.get("defense") or {}))
    torch.manual_seed(plan.seed)  # model initialisation inside build(): a rerun (resume) builds the same model
    clf = defense.build(BuildContext(data=plan.data, model_cfg=dict(cfg.get("model") or {}), device=plan.device,
                                     seed=plan.seed, cache_dir=cache_dir, progress=progress)).to(plan.device)
    probe = to_unit(plan.x[: min(8, plan.x.shape[0])], plan.device)
    check_classifier(clf, probe)
    snapshot = run_snapshot(clf)  # the judge's private copy: compared before and after every attack stage
    with torch.no_grad():
        clf.module(probe)
    err = model_self_changes(snapshot, "a forward pass on the contract probe")
    if err is not None:
        raise err
    model_key = module_hash(clf.module)
    start = time.perf_counter()
    prep: dict[str, Any] = {}
    for slot in plan.slots:
        # copies: prepare() may read the classifier and the evaluation images, never rebind or rewrite them
        facts = slot.attack.prepare(PrepareContext(
            classifier=_record_copy(clf),
            train_x=plan.data.train_x, train_y=plan.data.train_y, eval_x=plan.x.clone(),
            cache_dir=cache_dir, device=plan.device, seed=plan.seed, model_key=model_key, progress=progress))
        problem = snapshot.changes()
        if problem is not None:
            raise void(slot.label, "in prepare()", problem)
        if facts:
            prep[slot.label] = facts
    manifest = {
        **base_manifest(plan.semantic, plan.seed),
        "overrides": list(overrides or []),
        "device": str(plan.device),
        "model_hash": model_key,
        "defense_info": {**clf.info, "randomized": clf.randomized, "ensemble": clf.ensemble is not None},
        "sample_ids_hash": tensor_hash(plan.ids),
        "prepare": prep,  # e.g. LAFEAT head facts: data source, agreement, training passes
        "attacks": {s.label: {"class": type(s.attack).__name__, "params": s.attack.describe(), "view": s.view} for s in plan.slots},
        **plan.extra,
        **(manifest_extra or {}),
    }
    manifest_written = False
    n = plan.x.shape[0]
    batches = []
    n_batches = (n + plan.batch_size - 1) // plan.batch_size
    finished = sum(run.batch_path(b).is_file() for b in range(n_batches))
    if finished:
        progress_ui.say(f"resuming run {run.key[:6]}…: {finished} of {n_batches} batches done ({run.path})", progress)
    again = f"`{manifest_extra['submit_command']}`" if (manifest_extra or {}).get("submit_command") else "the same command"
    progress_ui.set_interrupt_hint(lambda: f"run {run.key[:6]}… keeps {len(batches)} of {n_batches} finished batches "
                                           f"({run.path}); run {again} again to resume")
    title = f"eval {plan.suite_name}, {plan.threat.name}, n={n}, run {run.key[:6]}…"
    from harness.results.metrics import stage_counts

    with progress_ui.eval_progress([s.label for s in plan.slots], n, title, enabled=progress) as shown:
        for b in range(n_batches):
            sl = slice(b * plan.batch_size, (b + 1) * plan.batch_size)
            records = run.read_batch(b)
            if records is None:
                first = int(plan.extra.get("first_batch", 0))  # global batch index: a shard seeds as the whole run
                shown.batch(b, int(plan.ids[sl].shape[0]), n_batches)
                records = evaluate_batch(plan, clf, first + b, plan.ids[sl], plan.x[sl], plan.y[sl], snapshot=snapshot)
                if not manifest_written:
                    run.write_manifest(manifest)
                    manifest_written = True
                run.write_batch(b, records)
            else:
                shown.resumed(int(plan.ids[sl].shape[0]), stage_counts(records), n_batches)
            batches.append(records)
    if not manifest_written:
        run.write_manifest(manifest)
    samples = pd.concat(batches, ignore_index=True)
    if "nonfinite_grad" not in samples:  # batches resumed from before the column existed
        samples["nonfinite_grad"] = False
    samples["nonfinite_grad"] = [bool(v) if pd.notna(v) else False for v in samples["nonfinite_grad"]]
    summary = summarize(samples, plan, manifest["defense_info"], prep, time.perf_counter() - start)
    run.finish(samples, summary)
    progress_ui.set_interrupt_hint(None)
    return {**summary, "run_dir": str(run.path), "skipped": False}
