"""The poisoning track's runner: one (dataset, model, poison, defense, seed) training run.

    load the dataset -> optional deterministic subsets (train_n, test_n)
      -> poison the training split (cached by config hash; the test split stays clean)
      -> defense.build(BuildContext(data=poisoned, on_epoch_end=clean test accuracy))
      -> per-run records -> <work_dir>/poison-runs/<hash>/ (manifest, samples, summary, DONE)

Per run: clean test accuracy at the final epoch (the headline: no clean validation set exists in
the threat model, and models drift back to the shortcut late in training) and at the best epoch,
training accuracy on the poisoned data the defender received (all of it, and the poisoned part),
and the training cost (wall time, forward/backward image-passes), plus the poison's own cost.
`samples.parquet` holds the final model's prediction for every clean test image; `history.csv`
the per-epoch curve. A finished run (DONE) is skipped; the leaderboard is rebuilt from these
directories by `harness.poisoning.board`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from harness.core.errors import UserError
from harness.core.device import resolve_device
from harness.core.hashing import tensor_hash
from harness.results.store import RunDir, base_manifest
from harness.data.training import accuracy, to_unit

RUN_KIND = "poison-runs"
DEFAULT_DEFENSE = {"name": "standard"}


def stratified_subset(y: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """Indices of a class-balanced subset of `n` samples, fixed for a dataset (seed-independent).

    Classes take turns (round-robin over each class's samples in a fixed shuffled order), so the
    subset is balanced up to one sample per class and a larger `n` contains every smaller one.
    """
    if n >= len(y):
        return torch.arange(len(y))
    gen = torch.Generator().manual_seed(12345)
    order = torch.randperm(len(y), generator=gen)
    ys = y[order]
    rank = torch.zeros(len(y), dtype=torch.long)
    for c in range(num_classes):  # loop over classes: position of each sample within its class
        members = torch.nonzero(ys == c).flatten()
        rank[members] = torch.arange(len(members))
    key = rank * num_classes + ys  # round-robin over classes
    chosen = order[torch.argsort(key, stable=True)[:n]]
    return torch.sort(chosen).values


def _semantic(cfg: dict[str, Any], defense_spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    dataset = {k: v for k, v in dict(cfg.get("dataset") or {}).items() if k not in ("root", "download")}
    return {
        "track": "poisoning",
        "dataset": dataset,
        "model": dict(cfg.get("model") or {}),
        "poison": dict(cfg.get("poison") or {"name": "none"}),
        "defense": defense_spec,
        "seed": int(cfg.get("seed", 0)),
        "train_n": cfg.get("train_n"),
        "test_n": cfg.get("test_n"),
        "device_type": device.type,
    }


def defense_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    """The defense config with the top-level `train:` overrides merged into its training recipe.

    The poisoning track compares defenses under one recipe, so `train.epochs=...` on the command
    line reaches every defense (defenses without a `train:` section are left alone).
    """
    spec = dict(cfg.get("defense") or DEFAULT_DEFENSE)
    overrides = {k: v for k, v in dict(cfg.get("train") or {}).items() if v is not None}
    if overrides:
        spec["train"] = {**dict(spec.get("train") or {}), **overrides}
    return spec


def plan(cfg: dict[str, Any]) -> tuple[RunDir, dict[str, Any], torch.device]:
    """The run directory and semantic config of `cfg` (validates cheap things, writes nothing)."""
    device = resolve_device(cfg.get("device", "auto"))
    spec = defense_spec(cfg)
    for key in ("train_n", "test_n"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise UserError(f"{key}={v!r} must be a positive integer or null (all)")
    semantic = _semantic(cfg, spec, device)
    work_dir = Path(str(cfg.get("work_dir", "arena-work")))
    return RunDir.for_config(work_dir, RUN_KIND, semantic), semantic, device


@lru_cache(maxsize=2)
def _load(cfg_json: str):
    from harness.data.datasets import load_dataset

    return load_dataset(json.loads(cfg_json))


def load_splits(cfg: dict[str, Any]):
    """The dataset with the configured deterministic train/test subsets (never mutated: cached)."""
    data = _load(json.dumps(dict(cfg.get("dataset") or {"name": "mnist5k"}), sort_keys=True, default=str))
    if data.train_x is None:
        raise UserError(f"dataset {data.name!r} has no training split; the poisoning track needs one (mnist5k, fashion_mnist, cifar10, ...)")
    train_n, test_n = cfg.get("train_n"), cfg.get("test_n")
    if train_n is not None and train_n < len(data.train_y):
        idx = stratified_subset(data.train_y, int(train_n), data.num_classes)
        data = data.with_train(data.train_x[idx], data.train_y[idx], train_n=int(train_n))
    if test_n is not None and test_n < len(data.test_y):
        n = int(test_n)
        assert data.test_ids is not None
        data = dataclasses.replace(data, test_x=data.test_x[:n], test_y=data.test_y[:n], test_ids=data.test_ids[:n])
    return data


@torch.no_grad()
def predictions(model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (CPU) of `model` in eval mode on uint8 images."""
    model.eval()
    out = [model(to_unit(x[i:i + batch_size], device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def run_poison(cfg: dict[str, Any], overrides: list[str] | None = None, log=print) -> dict[str, Any]:
    """Run (or skip, when finished) one poisoning-track configuration; return its summary."""
    import attacks.poisons  # noqa: F401  (registers poisons)
    import defenses  # noqa: F401  (registers defenses)
    import defenses.augment_baselines  # noqa: F401  (the poisoning track's training defenses)
    import defenses.iss  # noqa: F401
    import defenses.ueraser  # noqa: F401
    from attacks.poisons import apply_poison, build_poison
    from harness.core.defense import BuildContext, build_defense

    run, semantic, device = plan(cfg)
    if run.is_done():
        summary = run.read_json("summary.json") or {}
        log(f"poison run {run.key} already finished: final clean test acc {summary.get('final_test_acc')}")
        return summary
    seed = int(semantic["seed"])
    poison = build_poison(semantic["poison"])
    defense = build_defense(dict(semantic["defense"]))
    work_dir = Path(str(cfg.get("work_dir", "arena-work")))
    cache_dir = work_dir / "cache"
    progress = bool(cfg.get("progress", True))
    data = load_splits(cfg)

    started = time.perf_counter()
    poisoned, mask, poison_facts = apply_poison(poison, data, seed=seed, device=device, cache_dir=cache_dir, progress=progress)
    test_x, test_y = data.test_x, data.test_y

    def on_epoch_end(epoch: int, model: torch.nn.Module) -> dict[str, float]:
        return {"test_acc": accuracy(model, test_x, test_y, device=device), "test_n": float(len(test_y))}

    ctx = BuildContext(data=poisoned, model_cfg=dict(semantic["model"]), device=device, seed=seed,
                       cache_dir=cache_dir, progress=progress, on_epoch_end=on_epoch_end)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # model initialisation inside build() is then a function of the seed
        classifier = defense.build(ctx)
    model = classifier.module.to(device).eval()
    info = dict(classifier.info or {})
    train = dict(info.get("train") or {})

    pred = predictions(model, test_x, device)
    final_acc = int((pred == test_y).sum()) / len(test_y) if len(test_y) else float("nan")
    history = [dict(h) for h in train.get("history") or []]
    curve_ok = bool(history) and all(h.get("test_n") == float(len(test_y)) and "test_acc" in h for h in history)
    if curve_ok and abs(history[-1]["test_acc"] - final_acc) > 1e-9:
        curve_ok = False  # a cached checkpoint whose curve was measured on another test set
    if curve_ok:
        accs = np.array([h["test_acc"] for h in history])
        best_epoch = int(np.argmax(accs))
        best_acc = float(accs[best_epoch])
    else:
        best_epoch, best_acc = len(history) - 1 if history else -1, final_acc

    train_acc = accuracy(model, poisoned.train_x, poisoned.train_y, device=device)
    poisoned_acc = (accuracy(model, poisoned.train_x[mask], poisoned.train_y[mask], device=device)
                    if bool(mask.any()) else float("nan"))
    ids = data.test_ids if data.test_ids is not None else torch.arange(len(test_y))
    samples = pd.DataFrame({
        "sample_id": ids.numpy().astype(np.int64),
        "label": test_y.numpy().astype(np.int64),
        "pred": pred.numpy().astype(np.int64),
        "correct": (pred == test_y).numpy(),
    })
    summary = {
        "poison": poison.name, "defense": defense.name,
        "dataset": data.name, "model": semantic["model"].get("name"), "ratio": poison.ratio, "seed": seed,
        "final_test_acc": final_acc, "best_test_acc": best_acc, "best_epoch": best_epoch,
        "best_from_curve": curve_ok,
        "train_acc_poisoned_data": train_acc, "train_acc_poisoned_part": poisoned_acc,
        "n_train": int(len(poisoned.train_y)), "n_poisoned": int(mask.sum()), "n_test": int(len(test_y)),
        "epochs": int(train.get("epochs", len(history))),
        "train_wall_s": float(train.get("wall_s", 0.0)),
        "train_forward_passes": int(train.get("forward_passes", 0)),
        "train_backward_passes": int(train.get("backward_passes", 0)),
        "poison_wall_s": float(poison_facts.get("wall_s", 0.0)),
        "poison_cache_hit": bool(poison_facts.get("cache_hit", False)),
        "checkpoint_cache_hit": bool(info.get("cache_hit", False)),
        "run_wall_s": round(time.perf_counter() - started, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest = {
        **base_manifest(semantic, seed),
        "overrides": list(overrides or []),
        "poison_facts": poison_facts,
        "defense_info": {k: v for k, v in info.items() if k != "train"},
        "train": {k: v for k, v in train.items() if k != "history"},
        "test_ids_hash": tensor_hash(ids), "test_data_hash": tensor_hash(test_x),
        "train_data_hash": poisoned.fingerprint(),
    }
    run.write_manifest(manifest)
    curve = pd.DataFrame(history)
    run.finish(samples, summary, extra_files={"history.csv": curve.to_csv(index=False, lineterminator="\n")})
    log(f"poison={poison.name} defense={defense.name} seed={seed}: final clean test acc {100 * final_acc:.2f}% "
        f"(best {100 * best_acc:.2f}% at epoch {best_epoch}), train acc on poisoned data {100 * train_acc:.2f}% -> {run.path}")
    return summary
