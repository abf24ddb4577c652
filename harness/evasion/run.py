"""Run one evaluation: build the defense, check the contract, prepare the attacks, then the
cascade batch by batch (resuming finished batches), and finish the run directory.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from harness.core.attack import PrepareContext
from harness.core.contract import check_classifier
from harness.core.defense import BuildContext, build_defense
from harness.core.hashing import module_hash, tensor_hash
from harness.core.progress import progress_bar
from harness.data.training import to_unit
from harness.evasion.cascade import evaluate_batch
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
    check_classifier(clf, to_unit(plan.x[: min(8, plan.x.shape[0])], plan.device))
    model_key = module_hash(clf.module)
    start = time.perf_counter()
    prep: dict[str, Any] = {}
    for slot in plan.slots:
        facts = slot.attack.prepare(PrepareContext(
            classifier=clf, train_x=plan.data.train_x, train_y=plan.data.train_y, eval_x=plan.x,
            cache_dir=cache_dir, device=plan.device, seed=plan.seed, model_key=model_key, progress=progress))
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
    run.write_manifest(manifest)
    n = plan.x.shape[0]
    batches = []
    n_batches = (n + plan.batch_size - 1) // plan.batch_size
    with progress_bar(n_batches, desc=f"eval {plan.suite_name}", enabled=progress) as bar:
        for b in range(n_batches):
            sl = slice(b * plan.batch_size, (b + 1) * plan.batch_size)
            records = run.read_batch(b)
            if records is None:
                first = int(plan.extra.get("first_batch", 0))  # global batch index: a shard seeds as the whole run
                records = evaluate_batch(plan, clf, first + b, plan.ids[sl], plan.x[sl], plan.y[sl])
                run.write_batch(b, records)
            batches.append(records)
            bar.advance()
    samples = pd.concat(batches, ignore_index=True)
    summary = summarize(samples, plan, manifest["defense_info"], prep, time.perf_counter() - start)
    run.finish(samples, summary)
    return {**summary, "run_dir": str(run.path), "skipped": False}
