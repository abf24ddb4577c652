"""Run one evaluation: build the defense, check the contract, prepare the attacks, then the
cascade batch by batch (resuming finished batches), and finish the run directory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import pandas as pd
import torch

from harness.core.atomic import atomic_write
from harness.core.attack import PrepareContext
from harness.core.classifier import Classifier
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


ADVERSARIAL = "adversarial.npz"


@dataclass
class RunHooks:
    """What `arena submit` changes in a run (the defaults are a plain `arena eval`).

    classifier: an already built classifier (or a function building it, called only if the run is
        not complete), e.g. a sandboxed submission's proxy, instead of building the configured
        defense in this process.
    keep_adversarial: store every verified example per batch and, at the end, `adversarial.npz`
        (sample_id, attack, x) in the run directory.
    before_batch: called with each batch index before that batch is evaluated.
    finalize: (records, examples) -> (records, summary fields), called before the run is finished;
        a submission re-judges every verdict in fresh workers here.
    """

    classifier: Classifier | Callable[[], Classifier] | None = None
    keep_adversarial: bool = False
    before_batch: Callable[[int], None] | None = None
    finalize: Callable[[pd.DataFrame, dict[str, np.ndarray]], tuple[pd.DataFrame, dict[str, Any]]] | None = None


def _adv_path(run: Any, b: int) -> Path:
    return run.batch_path(b).with_suffix(".adv.npz")


def _pack_examples(examples: list[tuple[str, torch.Tensor, torch.Tensor]], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One batch's verified examples as arrays: sample_id (K,), attack label (K,), x (K, C, H, W)."""
    if not examples:
        return {"sample_id": np.zeros(0, np.int64), "attack": np.zeros(0, "U1"), "x": np.zeros((0, *shape), np.float32)}
    return {"sample_id": np.concatenate([e[1].numpy().astype(np.int64) for e in examples]),
            "attack": np.concatenate([np.full(len(e[1]), e[0]) for e in examples]).astype(str),
            "x": np.concatenate([e[2].numpy().astype(np.float32) for e in examples])}


def _save_npz(path: Path, arrays: dict[str, np.ndarray], compressed: bool = False) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            (np.savez_compressed if compressed else np.savez)(fh, **arrays)

    atomic_write(path, write)


def _read_examples(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("sample_id", "attack", "x")}
    except Exception:  # damaged: recompute the batch
        return None


def run_evaluation(cfg: dict[str, Any], overrides: list[str] | None = None, log=print,
                   manifest_extra: dict[str, Any] | None = None, hooks: RunHooks | None = None) -> dict[str, Any]:
    """Plan, build the defense, check the contract, run (or resume, or skip) and finish a run.

    `manifest_extra` adds provenance fields (e.g. `submission: true` and the bundle's card);
    `hooks` are the submission's changes (see `RunHooks`).
    """
    hooks = hooks or RunHooks()
    plan = plan_evaluation(cfg)
    run = plan.run
    if run.is_done():
        log(f"[arena] run {run.key} already complete; skipping ({run.path})")
        summary = run.read_json("summary.json") or {}
        return {**summary, "run_dir": str(run.path), "skipped": True}
    cache_dir = Path(str(cfg.get("work_dir", "arena-work"))) / "cache"
    progress = bool(cfg.get("progress", True))
    if hooks.classifier is not None:
        clf = hooks.classifier() if callable(hooks.classifier) else hooks.classifier
    else:
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
    batches, examples = [], []
    n_batches = (n + plan.batch_size - 1) // plan.batch_size
    with progress_bar(n_batches, desc=f"eval {plan.suite_name}", enabled=progress) as bar:
        for b in range(n_batches):
            sl = slice(b * plan.batch_size, (b + 1) * plan.batch_size)
            records = run.read_batch(b)
            kept = _read_examples(_adv_path(run, b)) if hooks.keep_adversarial else None
            if records is None or (hooks.keep_adversarial and kept is None):
                if hooks.before_batch is not None:
                    hooks.before_batch(b)
                first = int(plan.extra.get("first_batch", 0))  # global batch index: a shard seeds as the whole run
                out: list[tuple[str, torch.Tensor, torch.Tensor]] | None = [] if hooks.keep_adversarial else None
                records = evaluate_batch(plan, clf, first + b, plan.ids[sl], plan.x[sl], plan.y[sl], adv_out=out)
                if out is not None:
                    kept = _pack_examples(out, tuple(plan.x.shape[1:]))
                    _save_npz(_adv_path(run, b), kept)
                run.write_batch(b, records)
            batches.append(records)
            if kept is not None:
                examples.append(kept)
            bar.advance()
    samples = pd.concat(batches, ignore_index=True)
    extra: dict[str, Any] = {}
    if hooks.keep_adversarial:
        adv = {k: np.concatenate([e[k] for e in examples]) for k in ("sample_id", "attack", "x")}
        _save_npz(run.path / ADVERSARIAL, adv, compressed=True)
        if hooks.finalize is not None:
            samples, extra = hooks.finalize(samples, adv)
    summary = {**summarize(samples, plan, manifest["defense_info"], prep, time.perf_counter() - start), **extra}
    run.finish(samples, summary)
    return {**summary, "run_dir": str(run.path), "skipped": False}
