"""Run one evaluation: build the defense, check the contract, prepare the attacks, then the
cascade batch by batch (resuming finished batches), and finish the run directory.

Nothing stored is taken on trust: a finished run whose files are damaged is reported and
recomputed, and a stored batch is resumed only when it was computed for exactly this plan
(`harness.evasion.records`); any other batch is recomputed, with one line saying why.
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
from harness.evasion.records import RECORD_COLUMNS, batch_meta, batch_problem, run_damage
from harness.results.store import RunDir, base_manifest


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


def _resumable_batch(run: RunDir, b: int, want: dict[str, Any], ids: list[int], y: list[int], log) -> pd.DataFrame | None:
    """The stored records of batch `b` when they were computed for exactly this plan, else None
    (with one line saying why a stored file is not taken)."""
    stored = run.read_batch(b)
    if stored is None:
        return None
    problem = stored if isinstance(stored, str) else batch_problem(stored[0], stored[1], want, ids, y)
    if problem is None:
        return stored[0]  # type: ignore[index]
    log(f"[arena] run {run.key}: batch file {run.batch_path(b)} does not match the plan ({problem}); recomputing it")
    return None


def run_evaluation(cfg: dict[str, Any], overrides: list[str] | None = None, log=print,
                   manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan, build the defense, check the contract, run (or resume, or skip) and finish a run.

    `manifest_extra` adds provenance fields (e.g. `submission: true` and the bundle's card).
    """
    plan = plan_evaluation(cfg)
    run = plan.run
    if run.is_done():
        problem = run_damage(run)
        if problem is None:
            log(f"[arena] run {run.key} already complete; skipping ({run.path})")
            summary = run.read_json("summary.json") or {}
            return {**summary, "run_dir": str(run.path), "skipped": True}
        log(f"[arena] run {run.key} ({run.path}) is marked complete but {problem}; recomputing it")
        run.reopen()
    cache_dir = Path(str(cfg.get("work_dir", "arena-work"))) / "cache"
    progress = bool(cfg.get("progress", True))
    defense = build_defense(dict(cfg.get("defense") or {}))
    torch.manual_seed(plan.seed)  # model initialisation inside build(): a rerun (resume) builds the same model
    clf = defense.build(BuildContext(data=plan.data, model_cfg=dict(cfg.get("model") or {}), device=plan.device,
                                     seed=plan.seed, cache_dir=cache_dir, progress=progress)).to(plan.device)
    check_classifier(clf, to_unit(plan.x[: min(8, plan.x.shape[0])], plan.device), dataset=plan.data.name,
                     max_label=int(plan.data.test_y.max()))
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
        "dataset_name": plan.data.name,  # the npz file's stem (or label): the semantic config has its hash
        "prepare": prep,  # e.g. LAFEAT head facts: data source, agreement, training passes
        "attacks": {s.label: {"class": type(s.attack).__name__, "params": s.attack.describe(), "view": s.view} for s in plan.slots},
        **plan.extra,
        **(manifest_extra or {}),
    }
    run.write_manifest(manifest, log=log)
    n = plan.x.shape[0]
    batches = []
    n_batches = (n + plan.batch_size - 1) // plan.batch_size
    n_draws = plan.draws if clf.randomized else 1
    labels = ["clean", *(s.label for s in plan.slots)]
    first = int(plan.extra.get("first_batch", 0))  # global batch index: a shard seeds as the whole run
    with progress_bar(n_batches, desc=f"eval {plan.suite_name}", enabled=progress) as bar:
        for b in range(n_batches):
            sl = slice(b * plan.batch_size, (b + 1) * plan.batch_size)
            ids = plan.ids[sl]
            want = batch_meta(run.key, b, plan.seed, ids, labels, n_draws, rows=ids.shape[0] * len(labels))
            records = _resumable_batch(run, b, want, ids.tolist(), plan.y[sl].tolist(), log)
            if records is None:
                records = evaluate_batch(plan, clf, first + b, ids, plan.x[sl], plan.y[sl])
                if set(records.columns) != set(RECORD_COLUMNS):  # a bug: the schema drifted from records.py
                    raise RuntimeError(f"evaluate_batch wrote columns {sorted(records.columns)}; keep "
                                       f"harness.evasion.records.RECORD_COLUMNS equal to them")
                run.write_batch(b, records, {**want, "rows": len(records)})
            batches.append(records)
            bar.advance()
    samples = pd.concat(batches, ignore_index=True)
    summary = summarize(samples, plan, manifest["defense_info"], prep, time.perf_counter() - start)
    run.finish(samples, summary)
    return {**summary, "run_dir": str(run.path), "skipped": False}
