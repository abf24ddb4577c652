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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from attacks.base import Attack, PrepareContext, build_attack
from defenses.base import BuildContext, build_defense
from harness.access import Capability, CountingModule, ModelAccess, PassCounter
from harness.classifier import Classifier
from harness.contract import check_classifier
from harness.datasets import DatasetSplits, load_dataset, select_eval
from harness.errors import UserError
from harness.hashing import file_sha256, module_hash, stable_hash, tensor_hash
from harness.progress import progress_bar
from harness.store import RunDir, base_manifest
from harness.threat import ThreatModel
from harness.training import to_unit

PATH_KEYS = ("model_file", "weights", "path", "root")


@dataclass
class AttackSlot:
    """One entry of the suite: the attack, its label in records, and the model view it attacks."""

    label: str
    attack: Attack
    spec: dict[str, Any]
    view: str | None = None


@dataclass
class EvalPlan:
    """Everything decided before any work or any write: validated, hashed, ready to run."""

    cfg: dict[str, Any]
    data: DatasetSplits
    ids: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    threat: ThreatModel
    slots: list[AttackSlot]
    suite_name: str
    semantic: dict[str, Any]
    run: RunDir
    device: torch.device
    seed: int
    batch_size: int
    draws: int
    cascade: bool
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an explicit `cuda` without a GPU is a user error."""
    if name in (None, "auto"):
        from harness.launchers import auto_cuda_device  # several GPUs: job k of a sweep takes GPU k mod n

        return torch.device(auto_cuda_device() if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA GPU is visible; use device=auto or device=cpu")
    return device


def _semantic_value(key: str, value: Any) -> Any:
    """Replace file paths by content hashes so the run key survives moving files around."""
    if key in PATH_KEYS and isinstance(value, str) and value:
        path = Path(value).expanduser()
        return f"sha256:{file_sha256(path)}" if path.is_file() else value
    return value


def semantic_part(cfg: dict[str, Any] | None) -> dict[str, Any]:
    return {k: _semantic_value(k, v) for k, v in (cfg or {}).items() if k not in ("download",)}


def parse_shard(shard: Any, n: int, batch_size: int = 1) -> tuple[slice, str | None]:
    """`i/n` -> the i-th of n contiguous, deterministic slices of the evaluation samples.

    Slices are cut at batch boundaries (whole batches of `batch_size`), so a shard's batches are
    exactly the unsharded run's batches (same members, same per-batch seeds): merged shards equal
    the unsharded run sample for sample, costs included.
    """
    if shard in (None, "", "null"):
        return slice(0, n), None
    try:
        i, k = (int(v) for v in str(shard).split("/"))
    except ValueError:
        raise UserError(f"shard={shard!r} is not of the form i/n (e.g. shard=0/4)") from None
    if not (k >= 1 and 0 <= i < k):
        raise UserError(f"shard={shard!r} needs 0 <= i < n (e.g. shard=0/4 .. shard=3/4)")
    n_batches = -(-n // batch_size)
    if k > n_batches:
        raise UserError(f"shard={shard!r}: {n} samples make only {n_batches} batches of batch_size={batch_size}; "
                        f"use at most {n_batches} shards or a smaller batch_size")
    lo, hi = (n_batches * i) // k * batch_size, min(n, (n_batches * (i + 1)) // k * batch_size)
    return slice(lo, hi), f"{i}/{k}"


def suite_specs(cfg: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The ordered attack specs: the single `attack` if one is chosen, else the suite's list."""
    if cfg.get("attack"):
        spec = dict(cfg["attack"])
        return str(spec.get("label") or spec.get("name")), [spec]
    suite = cfg.get("suite") or {}
    specs = [dict(s) for s in suite.get("attacks") or []]
    if not specs:
        raise UserError("the suite has no attacks; choose suite=quick|standard|... or attack=NAME")
    return f"{suite.get('name', 'custom')}@v{suite.get('version', 1)}", specs


def build_slots(specs: list[dict[str, Any]]) -> list[AttackSlot]:
    slots, seen = [], set()
    for spec in specs:
        spec = dict(spec)
        view = spec.pop("view", None)
        label = str(spec.get("label") or spec.get("name"))
        if label in seen:
            raise UserError(f"two attacks in the suite share the label {label!r}; give one a distinct label:")
        seen.add(label)
        slots.append(AttackSlot(label, build_attack(spec), spec, view))
    return slots


def int_setting(value: Any, name: str, example: int) -> int:
    """An integer from the config (null or text -> one-line UserError, not a TypeError deep inside)."""
    ok = isinstance(value, (int, float, str)) and not isinstance(value, bool)
    if ok:
        try:
            number = float(value)
            ok = number.is_integer()  # False for 2.5, nan and inf
        except (ValueError, OverflowError):
            ok = False
    if not ok:
        raise UserError(f"{name}={_show(value)} must be an integer (e.g. {name}={example})")
    return int(number)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def plan_evaluation(cfg: dict[str, Any]) -> EvalPlan:
    """Validate the whole config and decide the run directory; writes nothing."""
    seed = int_setting(cfg.get("seed", 0), "seed", 0)
    batch_size = int_setting(cfg.get("batch_size", 250), "batch_size", 250)
    if batch_size <= 0:
        raise UserError(f"batch_size={batch_size} must be > 0 (e.g. batch_size=250)")
    device = resolve_device(str(cfg.get("device", "auto")))
    threat_cfg = dict(cfg.get("threat") or {})
    threat = ThreatModel(norm=str(threat_cfg.get("norm", "Linf")), eps=threat_cfg.get("eps", 0.3))
    suite_name, specs = suite_specs(cfg)
    slots = build_slots(specs)
    build_defense(dict(cfg.get("defense") or {}))  # name and parameters checked before any data work
    data = load_dataset(dict(cfg.get("dataset") or {}))
    ids, x, y = select_eval(data, cfg.get("n_samples"), int(cfg.get("offset", 0) or 0))
    eval_ids, eval_data = tensor_hash(ids), tensor_hash(x)  # the whole evaluation set: all shards share it
    sl, shard = parse_shard(cfg.get("shard"), ids.shape[0], batch_size)
    ids, x, y = ids[sl], x[sl], y[sl]
    ev = dict(cfg.get("evaluator") or {})
    draws = int_setting(ev.get("draws", 10), "evaluator.draws", 10)
    if draws < 1:
        raise UserError(f"evaluator.draws={draws} must be >= 1")
    cascade = bool(ev.get("cascade", True))
    semantic = {
        "dataset": {**semantic_part(cfg.get("dataset")), "eval_ids": eval_ids, "eval_data": eval_data},
        "model": semantic_part(cfg.get("model")),
        "defense": semantic_part(cfg.get("defense")),
        "suite": suite_name,
        "attacks": [dict(s.spec, view=s.view) for s in slots],
        "threat": {"norm": threat.norm, "eps": threat.eps},
        "n_samples": cfg.get("n_samples"), "offset": int(cfg.get("offset", 0) or 0),
        "seed": seed, "batch_size": batch_size, "evaluator": {"draws": draws, "cascade": cascade},
        "shard": shard,
    }
    unsharded = {**semantic, "shard": None}
    run = RunDir.for_config(Path(str(cfg.get("work_dir", "arena-work"))), "runs", semantic)
    return EvalPlan(cfg, data, ids, x, y, threat, slots, suite_name, semantic, run, device, seed, batch_size,
                    draws, cascade, extra={"unsharded_hash": stable_hash(unsharded), "shard": shard,
                                           "first_batch": sl.start // batch_size})


def make_access(slot: AttackSlot, clf: Classifier, counter: PassCounter, batch_size: int, device: torch.device) -> Any:
    """Hand the attack exactly the capability it declares, counted."""
    attack = slot.attack
    eot = int(getattr(attack, "eot", 1) or 1)
    needs = attack.requires
    if needs == Capability.SCORES:
        from harness.oracle import make_oracle

        return make_oracle(clf, attack, batch_size, device)
    if needs == Capability.FEATURES:
        from harness.features import make_feature_access

        return make_feature_access(clf, getattr(attack, "layer", None), counter)
    if needs == Capability.ENSEMBLE:
        if clf.ensemble is None:
            raise UserError(f"attack {slot.label!r} needs an ensemble defense (members); this defense has none")
        from harness.ensemble import make_ensemble_access

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
    linf0, l20 = torch.zeros(x.shape[0]), torch.zeros(x.shape[0])
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


def summarize(samples: pd.DataFrame, plan: EvalPlan, clf_info: dict[str, Any], prep: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Aggregates from the per-sample records (the leaderboard recomputes the same way)."""
    from harness.metrics import accuracies

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
