"""Run one evaluation: build the defense, check the contract, prepare the attacks, then the
cascade batch by batch (resuming finished batches), and finish the run directory.

`run_evaluation` is what `arena eval` calls; `execute` is the same path with the options the
Python API needs: in-memory data, a classifier the caller built, the verified adversarial
examples kept (`save_adv`, harness/evasion/adversarial.py).

The judge's snapshot of the model is taken right after the contract check (harness/evasion/judge.py).
The manifest is written just before the first batch is: a run that fails on its first batch
(a bad model output, a void attack) leaves nothing behind.

Nothing stored is taken on trust: a finished run whose files are damaged is reported and
recomputed, and a stored batch is resumed only when it was computed for exactly this plan
(`harness.evasion.records`); any other batch is recomputed, with one line saying why.
"""
from __future__ import annotations

import copy
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from harness.core.attack import PrepareContext
from harness.core.classifier import Classifier
from harness.core.contract import check_classifier
from harness.core.device import AUTO_BATCH_CAP, fit_batch_size
from harness.core.defense import BuildContext, build_defense
from harness.core.hashing import module_hash, tensor_hash
from harness.core import progress as progress_ui
from harness.data.datasets import DatasetSplits
from harness.data.training import to_unit
from harness.evasion import adversarial as adv
from harness.evasion.cascade import evaluate_batch, run_snapshot
from harness.evasion.judge import ModelSnapshot, model_self_changes, void
from harness.evasion.plan import DEFAULT_BATCH, EvalPlan, plan_evaluation
from harness.evasion.records import RECORD_COLUMNS, batch_meta, batch_problem, run_damage
from harness.results.store import base_manifest


def amp_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


@dataclass
class Outcome:
    """A finished (or skipped) run: its summary, its store, and the adversarial examples if kept."""

    summary: dict[str, Any]
    run: Any  # harness.results.store.RunDir | harness.results.memory.MemoryRun
    skipped: bool
    candidates: list[adv.Candidates] | None = None  # every verified candidate, per batch
    adversarial: dict[str, np.ndarray] | None = None  # ids, x_adv, attack of the broken samples

    def samples(self) -> pd.DataFrame:
        return self.run.samples()


def run_evaluation(cfg: dict[str, Any], overrides: list[str] | None = None, log=print,
                   manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan, build the defense, check the contract, run (or resume, or skip) and finish a run.

    `manifest_extra` adds provenance fields (e.g. `submission: true` and the bundle's card).
    """
    out = execute(cfg, overrides, log, manifest_extra)
    return {**out.summary, "run_dir": None if out.run.path is None else str(out.run.path), "skipped": out.skipped}


def _record_copy(clf: Classifier) -> Classifier:
    """A shallow copy of the classifier record (same modules, own views/info dicts), made without
    `__post_init__` so that no module's mode is touched: prepare() cannot rebind the judge's."""
    out = copy.copy(clf)
    out.views, out.info = dict(clf.views), dict(clf.info)
    return out


@contextmanager
def _cache_dir(cfg: dict[str, Any]) -> Iterator[Path]:
    """<work_dir>/cache, or a temporary directory removed afterwards when the run is in memory."""
    work_dir = cfg.get("work_dir", "arena-work")
    if work_dir is not None:
        yield Path(str(work_dir)) / "cache"
        return
    with tempfile.TemporaryDirectory(prefix="arena-cache-") as tmp:
        yield Path(tmp)


class _Prepared:
    """The defended classifier, prepared attacks and manifest, made on first need (a finished run
    whose adversarial examples are all on disk needs none of it)."""

    def __init__(self, plan: EvalPlan, cfg: dict[str, Any], cache_dir: Path, log: Callable[[str], None],
                 classifier: Classifier | None, overrides: list[str] | None, manifest_extra: dict[str, Any] | None,
                 write_manifest: bool) -> None:
        self.plan, self.cfg, self.cache_dir, self.log = plan, cfg, cache_dir, log
        self.clf, self.overrides, self.manifest_extra, self.write_manifest = classifier, overrides, manifest_extra, write_manifest
        self.ready = False
        self.snapshot: ModelSnapshot | None = None
        self.manifest: dict[str, Any] | None = None
        self.prep: dict[str, Any] = {}
        self.defense_info: dict[str, Any] = {}
        self.start = time.perf_counter()

    def get(self) -> Classifier:
        if self.ready:
            assert self.clf is not None
            return self.clf
        plan, cfg = self.plan, self.cfg
        progress = bool(cfg.get("progress", True))
        if self.clf is not None and not isinstance(self.clf, Classifier):
            self.clf = self.clf()  # a factory: e.g. a sandboxed submission's worker, started only when needed
        if self.clf is None:
            defense = build_defense(dict(cfg.get("defense") or {}), plan.threat)
            torch.manual_seed(plan.seed)  # model initialisation inside build(): a rerun (resume) builds the same model
            self.clf = defense.build(BuildContext(data=plan.data, model_cfg=dict(cfg.get("model") or {}), device=plan.device,
                                                  seed=plan.seed, cache_dir=self.cache_dir, progress=progress,
                                                  threat=plan.threat, log=lambda line: self.log(f"[arena] {line}")))
        clf = self.clf.to(plan.device)
        probe = to_unit(plan.x[: min(8, plan.x.shape[0])], plan.device)
        check_classifier(clf, probe, dataset=plan.data.name, max_label=int(plan.data.test_y.max()))
        snapshot = run_snapshot(clf)  # the judge's private copy: compared before and after every attack stage
        probed = plan.batch_auto and "batch_size_resolved" not in plan.extra
        if probed:  # batch_size=auto on CUDA: probed now, on the device
            size, facts = fit_batch_size(clf.differentiable, to_unit(plan.x[:64], plan.device),
                                         min(int(plan.x.shape[0]), AUTO_BATCH_CAP), plan.device, plan.amp, DEFAULT_BATCH)
            plan.batch_size = size
            plan.extra.update(batch_size_resolved=size, **facts)
        with torch.no_grad():
            clf.module(probe)
        err = model_self_changes(snapshot, "a forward pass on the contract probe" + (" and the batch_size=auto probe" if probed else ""))
        if err is not None:
            raise err
        model_key = module_hash(clf.module)
        self.start = time.perf_counter()
        lo, hi = plan.eval_range  # the whole evaluation (all shards): what prepare() sees never depends on the shard
        n_total = max(hi - lo, 1)
        for slot in plan.slots:
            # copies: prepare() may read the classifier and the evaluation images, never rebind or rewrite them
            facts = slot.attack.prepare(PrepareContext(
                classifier=_record_copy(clf), train_x=plan.data.train_x, train_y=plan.data.train_y,
                eval_x=plan.data.test_x[lo:hi].clone(), cache_dir=self.cache_dir, device=plan.device, seed=plan.seed,
                model_key=model_key, progress=progress, test_x=plan.data.test_x.clone(), eval_range=(lo, hi)))
            problem = snapshot.changes()
            if problem is not None:
                raise void(slot.label, "in prepare()", problem)
            if facts:
                self.prep[slot.label] = facts
                # prepare-time passes are the attack's cost, spread evenly over the whole evaluation
                slot.prepare_forward = float(facts.get("prepare_forward", 0)) / n_total
                slot.prepare_backward = float(facts.get("prepare_backward", 0)) / n_total
        self.snapshot = snapshot
        self.defense_info = {**clf.info, "randomized": clf.randomized, "ensemble": clf.ensemble is not None}
        if self.write_manifest:
            self.manifest = {
                **base_manifest(plan.semantic, plan.seed),
                "overrides": list(self.overrides or []),
                "device": str(plan.device),
                "model_hash": model_key,
                "defense_info": self.defense_info,
                "sample_ids_hash": tensor_hash(plan.ids),
                "dataset_name": plan.data.name,  # the npz file's stem (or label): the semantic config has its hash
                "prepare": self.prep,  # e.g. LAFEAT head facts: data source, agreement, training passes
                "attacks": {s.label: {"class": type(s.attack).__name__, "params": s.attack.describe(), "view": s.view,
                                      "amp": amp_name(plan.amp) if plan.amp is not None and s.attack.supports_amp() else None}
                            for s in plan.slots},
                # mixed precision: which attacks ran their passes under autocast; the verdict is float32 always
                "amp": None if plan.amp is None else {
                    "dtype": amp_name(plan.amp), "verdict": "float32",
                    "autocast": [s.label for s in plan.slots if s.attack.supports_amp()],
                    "float32": [s.label for s in plan.slots if not s.attack.supports_amp()]},
                **plan.extra,
                **(self.manifest_extra or {}),
            }
        self.ready = True
        return clf

    def write_manifest_once(self) -> None:
        """Write the manifest (once), just before the first thing of the run is written."""
        if self.manifest is not None:
            self.plan.run.write_manifest(self.manifest, log=self.log)
            self.manifest = None


def resolve_stored_batch_size(plan: EvalPlan, run: Any) -> None:
    """batch_size=auto: take the size this run resolved when it started (its manifest), so a resumed
    run cuts the same batches on any machine; on a CPU a fresh run takes the default (250); on CUDA
    a fresh run probes the GPU once the model is built (`_Prepared.get`)."""
    if not plan.batch_auto:
        return
    stored = run.read_json("manifest.json") if run.path is not None else None
    size = stored.get("batch_size_resolved") if isinstance(stored, dict) and stored.get("config_hash") == run.key else None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        plan.batch_size = size
        plan.extra.update(batch_size_resolved=size, batch_size_rule="as recorded when the run started (resumed)")
    elif plan.device.type != "cuda":
        plan.batch_size = DEFAULT_BATCH
        plan.extra.update(batch_size_resolved=DEFAULT_BATCH, batch_size_rule=f"default on {plan.device.type}")


def _resumable_batch(run: Any, b: int, want: dict[str, Any], ids: list[int], y: list[int],
                     log: Callable[[str], None]) -> pd.DataFrame | None:
    """The stored records of batch `b` when they were computed for exactly this plan, else None
    (with one line saying why a stored file is not taken)."""
    stored = run.read_batch(b)
    if stored is None:
        return None
    problem = stored if isinstance(stored, str) else batch_problem(stored[0], stored[1], want, ids, y)
    if problem is None:
        return stored[0]
    log(f"[arena] run {run.key}: batch file {run.batch_path(b)} does not match the plan ({problem}); recomputing it")
    return None


def _check_schema(records: pd.DataFrame) -> pd.DataFrame:
    if set(records.columns) != set(RECORD_COLUMNS):  # a bug: the schema drifted from records.py
        raise RuntimeError(f"evaluate_batch wrote columns {sorted(records.columns)}; keep "
                           f"harness.evasion.records.RECORD_COLUMNS equal to them")
    return records


def _same_verdicts(stored: pd.DataFrame, fresh: pd.DataFrame) -> bool:
    cols = ["sample_id", "attack", "ran", "correct_draws", "success"]
    return stored[cols].reset_index(drop=True).equals(fresh[cols].reset_index(drop=True))


Finalize = Callable[[pd.DataFrame, list[adv.Candidates]], tuple[pd.DataFrame, dict[str, Any]]]


def execute(cfg: dict[str, Any], overrides: list[str] | None = None, log: Callable[[str], None] = print,
            manifest_extra: dict[str, Any] | None = None, *, data: DatasetSplits | None = None,
            classifier: Classifier | Callable[[], Classifier] | None = None, keep_adversarial: bool | None = None,
            before_batch: Callable[[int], None] | None = None, finalize: Finalize | None = None) -> Outcome:
    """`run_evaluation` with its options: `data` and `classifier` replace the configured dataset and
    defense (`classifier` may be a function that builds it, called only if a batch must be computed);
    `keep_adversarial` (default: the config's `save_adv`) keeps the verified examples.

    For `arena submit`: `before_batch(b)` runs before batch b is computed (the statelessness audit
    groups requests by batch), and `finalize(records, candidates)` runs before the run is finished
    and returns the records to store plus summary fields (fresh-process verdicts replace the
    attack-time ones there, so a run is never marked done with verdicts the board must not use)."""
    plan = plan_evaluation(cfg, data=data, check_defense=classifier is None)
    run = plan.run
    for note in plan.notes:
        log(f"[arena] note: {note}")
    keep = bool(cfg.get("save_adv", False)) if keep_adversarial is None else bool(keep_adversarial)
    done = run.is_done()
    if done:
        problem = run_damage(run)
        if problem is not None:
            log(f"[arena] run {run.key} ({run.path}) is marked complete but {problem}; recomputing it")
            run.reopen()
            done = False
    if done and not keep:
        log(f"[arena] run {run.key} already complete; skipping ({run.path})")
        return Outcome(run.read_json("summary.json") or {}, run, skipped=True)
    progress = bool(cfg.get("progress", True))
    n = plan.x.shape[0]
    resolve_stored_batch_size(plan, run)
    first = int(plan.extra.get("first_batch", 0))  # global batch index: a shard seeds as the whole run
    labels = ["clean", *(s.label for s in plan.slots)]
    batches: list[pd.DataFrame] = []
    cands: list[adv.Candidates] = []
    with _cache_dir(cfg) as cache_dir:
        state = _Prepared(plan, cfg, cache_dir, log, classifier, overrides, manifest_extra, write_manifest=not done)
        if not done:
            state.get()  # resolves batch_size=auto on CUDA
        elif keep:
            log(f"[arena] run {run.key} already complete; reading its adversarial examples ({run.path})")
        n_batches = (n + plan.batch_size - 1) // plan.batch_size
        if run.path is not None and not done:
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
                ids = plan.ids[sl]
                # draws per decision: the plan's for a randomised defense, 1 otherwise (known once built;
                # a stored batch may carry either, checked against its own rows)
                want = batch_meta(run.key, b, plan.seed, ids, labels, plan.draws, rows=ids.shape[0] * len(labels))
                records = _resumable_batch(run, b, want, ids.tolist(), plan.y[sl].tolist(), log)
                cand = adv.Candidates.load(adv.batch_path(run.path, b)) if keep and run.path is not None else None
                if records is None or (keep and cand is None):
                    shown.batch(b, int(plan.ids[sl].shape[0]), n_batches)
                    fresh_cand = adv.Candidates() if keep else None
                    if before_batch is not None:
                        before_batch(b)
                    clf = state.get()
                    fresh = _check_schema(evaluate_batch(plan, clf, first + b, ids, plan.x[sl], plan.y[sl],
                                                         snapshot=state.snapshot,
                                                         on_verified=fresh_cand.add if fresh_cand is not None else None))
                    if records is None:
                        state.write_manifest_once()
                        run.write_batch(b, fresh, {**want, "draws": plan.draws if clf.randomized else 1, "rows": len(fresh)})
                        records = fresh
                    elif not _same_verdicts(records, fresh):
                        raise RuntimeError(f"batch {b} of run {run.key}, recomputed for its adversarial examples, differs "
                                           f"from its stored records: the evaluation is not deterministic on {plan.device}")
                    cand = fresh_cand
                    if cand is not None and run.path is not None:
                        cand.save(adv.batch_path(run.path, b))
                else:
                    shown.resumed(int(plan.ids[sl].shape[0]), stage_counts(records), n_batches)
                batches.append(records)
                if cand is not None:
                    cands.append(cand)
    if done:
        summary = run.read_json("summary.json") or {}
    else:
        state.write_manifest_once()
        samples = pd.concat(batches, ignore_index=True)
        if "nonfinite_grad" not in samples:  # batches resumed from before the column existed
            samples["nonfinite_grad"] = False
        samples["nonfinite_grad"] = [bool(v) if pd.notna(v) else False for v in samples["nonfinite_grad"]]
        extra: dict[str, Any] = {}
        if finalize is not None:
            samples, extra = finalize(samples, cands)
        summary = {**summarize(samples, plan, state.defense_info, state.prep, time.perf_counter() - state.start), **extra}
        run.finish(samples, summary)
    progress_ui.set_interrupt_hint(None)
    adversarial = adv.broken(cands, [s.label for s in plan.slots]) if keep else None
    if adversarial is not None and run.path is not None:
        adv.save(run.path, adversarial)
    return Outcome(summary, run, skipped=done, candidates=cands if keep else None, adversarial=adversarial)
