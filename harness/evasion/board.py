"""The evasion leaderboard: a pure pandas function of finished run directories.

One row per (defense id, dataset, threat model, suite). Rows are recomputed from each run's
per-sample records (never from the run's own summary), so a rebuild is the same function of the
same data: byte-identical. `best_known_acc` is the union over every run of the same defense, data
and threat model: a sample broken by any attack in any run counts as broken, so a later, stronger
attack lowers the row without rerunning the others. Writes are atomic and serialised by a file lock.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from harness import __version__
from harness.core.atomic import atomic_write
from harness.core.hashing import stable_hash
from harness.results.metrics import accuracies, per_sample_worst
from harness.results.store import RunDir, completed_runs

COLUMNS = [
    "defense", "defense_id", "model", "dataset", "threat", "norm", "eps", "suite", "n_samples",
    "clean_acc", "robust_acc", "robust_acc_mean", "robust_acc_majority", "best_known_acc", "certified_acc", "cascade",
    "forward_per_sample", "backward_per_sample", "queries_per_sample", "attack_time_s",
    "train_time_s", "train_passes", "params",
    "randomized", "ensemble", "masking_suspected", "violations", "submission",
    "seed", "config_hash", "harness_version", "git", "finished", "command",
]


def _pct(x: float) -> float:
    return round(100.0 * x, 2) if x == x else float("nan")


def defense_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies the defended model: defense config, architecture, training data, weights."""
    cfg = manifest["config"]
    return {"defense": cfg.get("defense"), "model": cfg.get("model"), "model_hash": manifest.get("model_hash")}


def _command(manifest: dict[str, Any]) -> str:
    overrides = manifest.get("overrides") or []
    return "arena eval " + " ".join(overrides) if overrides else "arena eval"


def _row(run: RunDir, manifest: dict[str, Any], summary: dict[str, Any], samples: pd.DataFrame,
         best_known: float) -> dict[str, Any]:
    cfg = manifest["config"]
    acc = accuracies(samples)
    info = manifest.get("defense_info") or {}
    train = info.get("train") or {}
    threat = cfg["threat"]
    defense_cfg = cfg.get("defense") or {}
    name = str(defense_cfg.get("label") or defense_cfg.get("name"))
    return {
        "defense": name,
        "defense_id": f"{defense_cfg.get('name')}-{stable_hash(defense_identity(manifest), 8)}",
        "model": ((manifest.get("card") or {}).get("architecture")
                  or ((cfg.get("model") or {}).get("name") if not defense_cfg.get("model_file") else "model_file")),
        "dataset": (cfg.get("dataset") or {}).get("label") or (cfg.get("dataset") or {}).get("name"),
        "threat": f"{threat['norm']}-{threat['eps']:.4g}",
        "norm": threat["norm"], "eps": threat["eps"],
        "suite": cfg.get("suite"),
        "n_samples": int(len(per_sample_worst(samples))),
        "clean_acc": _pct(acc["clean_acc"]),
        "robust_acc": _pct(acc["robust_acc"]),
        "robust_acc_mean": _pct(acc["robust_acc_mean"]),
        "robust_acc_majority": _pct(acc["robust_acc_majority"]),
        "best_known_acc": _pct(best_known),
        "certified_acc": _pct(acc["certified_acc"]),
        "cascade": ";".join(f"{k}={_pct(v['robust_acc_after'])}" for k, v in acc["attacks"].items()),
        "forward_per_sample": round(acc["forward_per_sample"], 1),
        "backward_per_sample": round(acc["backward_per_sample"], 1),
        "queries_per_sample": round(acc["queries_per_sample"], 1),
        "attack_time_s": round(acc["attack_time_s"], 2),
        "train_time_s": round(float(train.get("wall_s", 0.0)), 1),
        "train_passes": int(train.get("forward_passes", 0)),
        "params": int(info.get("parameters", 0) or 0),
        "randomized": bool(info.get("randomized", False)),
        "ensemble": bool(info.get("ensemble", False)),
        "masking_suspected": bool(summary.get("masking_suspected", False)),
        "violations": int(acc["violations"]),
        "submission": bool(manifest.get("submission", False)),
        "seed": manifest.get("seed"),
        "config_hash": run.key,
        "harness_version": (manifest.get("versions") or {}).get("robustarena", __version__),
        "git": manifest.get("git", "unknown"),
        "finished": summary.get("finished", ""),
        "command": manifest.get("submit_command") or _command(manifest),
    }


def _merge_shards(runs: list[tuple[RunDir, dict, dict, pd.DataFrame]]) -> list[tuple[RunDir, dict, dict, pd.DataFrame]]:
    """Combine the shards of one configuration (same `unsharded_hash`) into one entry once all are there."""
    out, groups = [], {}
    for entry in runs:
        shard = entry[1].get("shard")
        if not shard:
            out.append(entry)
        else:
            # keyed by shard count too: a 0/2 run never completes (or spoils) a 0/3, 1/3, 2/3 set
            groups.setdefault((entry[1]["unsharded_hash"], int(str(shard).split("/")[1])), []).append(entry)
    for (key, total), entries in sorted(groups.items()):
        if len({e[1]["shard"] for e in entries}) != total:
            continue  # incomplete: not on the board until every shard has finished
        entries.sort(key=lambda e: int(str(e[1]["shard"]).split("/")[0]))
        manifest = dict(entries[0][1])
        manifest["config"] = {**manifest["config"], "shard": None}
        manifest["shard"] = None
        manifest["overrides"] = [o for o in manifest.get("overrides") or [] if not str(o).startswith("shard=")]
        samples = pd.concat([e[3] for e in entries], ignore_index=True)
        summary = dict(entries[-1][2])
        summary["finished"] = max(e[2].get("finished", "") for e in entries)
        out.append((RunDir(entries[0][0].path.parent / key), manifest, summary, samples))
    return out


def collect(work_dirs: list[Path]) -> list[tuple[RunDir, dict, dict, pd.DataFrame]]:
    """Every finished run under the work dirs, with manifest, summary and records (shards merged)."""
    runs = []
    for wd in work_dirs:
        for run in completed_runs(wd, "runs"):
            manifest, summary = run.read_json("manifest.json"), run.read_json("summary.json")
            if manifest is None or summary is None:
                continue
            runs.append((run, manifest, summary, run.samples()))
    return _merge_shards(runs)


def build_table(work_dirs: list[Path]) -> pd.DataFrame:
    """The leaderboard as a DataFrame (pure function of the finished runs)."""
    runs = collect(work_dirs)
    # best known: per (defense identity, dataset, threat), union of breaks over all runs, per sample
    worst: dict[str, pd.Series] = {}
    for run, manifest, _, samples in runs:
        cfg = manifest["config"]
        key = stable_hash([defense_identity(manifest), cfg["dataset"].get("name"), cfg["dataset"].get("eval_data"), cfg["threat"]])
        ps = per_sample_worst(samples)
        robust = ps["worst"] == ps["draws"]
        worst[key] = robust if key not in worst else (worst[key].reindex(robust.index.union(worst[key].index), fill_value=True)
                                                     & robust.reindex(robust.index.union(worst[key].index), fill_value=True))
    rows = []
    for run, manifest, summary, samples in runs:
        cfg = manifest["config"]
        key = stable_hash([defense_identity(manifest), cfg["dataset"].get("name"), cfg["dataset"].get("eval_data"), cfg["threat"]])
        ids = per_sample_worst(samples).index
        best = float(worst[key].reindex(ids).mean()) if len(ids) else float("nan")
        rows.append(_row(run, manifest, summary, samples, best))
    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.empty:
        return df
    # one row per (defense id, dataset, threat, suite): keep the run with most samples, then latest
    df = df.sort_values(["defense_id", "dataset", "threat", "suite", "n_samples", "finished", "config_hash"])
    df = df.drop_duplicates(["defense_id", "dataset", "threat", "suite"], keep="last")
    return df.sort_values(["dataset", "threat", "robust_acc", "defense", "suite"], ascending=[True, True, False, True, True]).reset_index(drop=True)


def write_csv(df: pd.DataFrame, out: Path) -> None:
    """Atomic, locked write; a reader sees the old or the new file, never a partial one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        atomic_write(out, lambda p: df.to_csv(p, index=False, float_format="%.4g", lineterminator="\n"))


def build(work_dirs: list[Path], out: Path) -> pd.DataFrame:
    """Rebuild and write under one lock: reading the runs inside the lock means the last writer
    has seen every run finished before it, so concurrent builds never leave a stale board."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        df = build_table(work_dirs)
        atomic_write(out, lambda p: df.to_csv(p, index=False, float_format="%.4g", lineterminator="\n"))
    return df


def read(path: Path) -> pd.DataFrame:
    from harness.core.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"no leaderboard at {str(path)!r}; run `arena eval` or `arena board build` first")
    try:
        return pd.read_csv(path)
    except Exception as exc:
        raise UserError(f"leaderboard {str(path)!r} is not a readable CSV ({type(exc).__name__}); rebuild it with `arena board build`") from None
