"""The poisoning leaderboard: a pure pandas function of the finished poisoning runs.

One row per (poison, defense, dataset, model, ratio) and training setting, aggregated over seeds
(mean and sample standard deviation). The clean test accuracy of every run is recomputed from its
per-sample records (`samples.parquet`), never copied from its summary; best-epoch and training
accuracy come from the run's summary (they have no per-sample record). Rows are sorted and floats
formatted deterministically, so rebuilding from the same runs gives a byte-identical file, written
atomically. `matrix(df)` is the poison x defense view papers print.

`setting` is the shared experimental setting: a hash of the dataset config, model, training
recipe (the defense's `train:`), train/test subsets and device type. Poison and defense parameters
belong to the poison and defense: a non-default variant shows as `name#hash` (or its `label:`),
so rows are never averaged across different configurations. `clean_acc` is the same defense in the
same setting trained on clean data (poison=none), and `acc_drop` = clean_acc - final_acc_mean,
the poison's damage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from harness import __version__
from harness.core.hashing import stable_hash
from harness.results.store import completed_runs

RUN_KIND = "poison-runs"
KEY = ["poison", "defense", "dataset", "model", "ratio"]
COLUMNS = [
    *KEY, "setting", "n_seeds", "seeds",
    "final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std",
    "train_acc_mean", "train_acc_std", "clean_acc", "acc_drop",
    "epochs", "n_train", "n_poisoned", "n_test",
    "train_time_s", "train_forward_per_sample", "train_backward_per_sample", "poison_time_s",
    "device_type", "config_hashes", "harness_version", "git", "finished", "command",
]
# The columns `arena board --track poisoning` shows by default (the CSV has all of COLUMNS).
VIEW_COLUMNS = ["poison", "defense", "dataset", "model", "ratio", "n_seeds", "final_acc_mean", "final_acc_std",
                "best_acc_mean", "train_acc_mean", "clean_acc", "acc_drop", "epochs", "n_train", "train_time_s"]
POISON_ORDER = ["none", "lsp", "ar", "ops", "em"]
DEFENSE_ORDER = ["standard", "ueraser_lite", "ueraser", "ueraser_max", "pgd_at", "iss_jpeg", "iss_gray", "iss_bdr",
                 "cutout", "mixup", "cutmix"]


def _pct(x: float) -> float:
    return round(100.0 * float(x), 2) if x == x else float("nan")


def _setting(semantic: dict[str, Any]) -> str:
    """Hash of the shared setting: data, model, training recipe, subsets, device type."""
    shared = {k: v for k, v in semantic.items() if k not in ("seed", "poison", "defense")}
    shared["train"] = dict((semantic.get("defense") or {}).get("train") or {})
    return stable_hash(shared, 10)


def _params(spec: dict[str, Any], drop: tuple[str, ...]) -> str:
    return stable_hash({k: v for k, v in spec.items() if k not in drop}, 4)


def _labels(runs: pd.DataFrame, kind: str) -> pd.Series:
    """Names, with `#<params hash>` where one name appears with different parameters."""
    unlabelled = runs[runs[f"{kind}_label"] == ""]
    variants = unlabelled.groupby(f"{kind}_name")[f"{kind}_params"].nunique()
    return runs.apply(lambda r: r[f"{kind}_label"] or (r[f"{kind}_name"] + (
        f"#{r[f'{kind}_params']}" if variants.get(r[f'{kind}_name'], 0) > 1 else "")), axis=1)


def _command(manifest: dict[str, Any], seeds: list[int]) -> str:
    overrides = [o for o in manifest.get("overrides") or [] if not o.startswith("seed=")]
    seed_part = f"seed={','.join(str(s) for s in seeds)}"
    flag = ["-m"] if len(seeds) > 1 else []
    return " ".join(["arena poison", *flag, *overrides, seed_part])


def collect_runs(work_dir: Path) -> pd.DataFrame:
    """One row per finished poisoning run (the board's input), in a deterministic order."""
    rows = []
    for run in completed_runs(Path(work_dir), RUN_KIND):
        manifest, summary = run.read_json("manifest.json"), run.read_json("summary.json")
        if manifest is None or summary is None:
            continue
        samples = run.samples()
        semantic = manifest["config"]
        poison = dict(semantic.get("poison") or {})
        defense = dict(semantic.get("defense") or {})
        dataset = dict(semantic.get("dataset") or {})
        n_train = int(summary.get("n_train", 0)) or 1
        rows.append({
            "poison_name": str(poison.get("name")), "poison_label": str(poison.get("label") or ""),
            "poison_params": _params(poison, ("name", "label", "ratio")),
            "defense_name": str(defense.get("name")), "defense_label": str(defense.get("label") or ""),
            "defense_params": _params(defense, ("name", "label", "train")),
            "dataset": str(dataset.get("label") or dataset.get("name")),
            "model": str((semantic.get("model") or {}).get("name")),
            "ratio": float(poison.get("ratio", 1.0)),
            "setting": _setting(semantic),
            "seed": int(semantic.get("seed", 0)),
            "final_acc": float(samples["correct"].mean()) if len(samples) else float("nan"),
            "best_acc": float(summary.get("best_test_acc", float("nan"))),
            "train_acc": float(summary.get("train_acc_poisoned_data", float("nan"))),
            "epochs": int(summary.get("epochs", 0)),
            "n_train": int(summary.get("n_train", 0)),
            "n_poisoned": int(summary.get("n_poisoned", 0)),
            "n_test": int(len(samples)),
            "train_time_s": float(summary.get("train_wall_s", 0.0)),
            "train_forward_per_sample": float(summary.get("train_forward_passes", 0)) / n_train,
            "train_backward_per_sample": float(summary.get("train_backward_passes", 0)) / n_train,
            "poison_time_s": float((manifest.get("poison_facts") or {}).get("wall_s", 0.0)),
            "device_type": str(semantic.get("device_type", "")),
            "config_hash": run.key,
            "harness_version": str((manifest.get("versions") or {}).get("robustarena", __version__)),
            "git": str(manifest.get("git", "unknown")),
            "finished": str(summary.get("finished", "")),
            "manifest": manifest,
        })
    return pd.DataFrame(rows)


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def build_table(work_dir: Path) -> pd.DataFrame:
    """The poisoning board as a DataFrame (pure function of the finished runs)."""
    runs = collect_runs(work_dir)
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    runs["poison"] = _labels(runs, "poison")
    runs["defense"] = _labels(runs, "defense")
    # clean reference: the same defense, data and setting trained on clean data (poison=none)
    clean = runs[runs["poison_name"] == "none"].groupby(["defense", "dataset", "model", "setting"])["final_acc"].mean()
    rows = []
    for _, group in runs.groupby(KEY + ["setting"], sort=True, dropna=False):
        group = group.sort_values(["seed", "config_hash"], kind="stable")
        first = group.iloc[0]
        seeds = [int(s) for s in group["seed"]]
        ref = clean.get((first["defense"], first["dataset"], first["model"], first["setting"]), float("nan"))
        final_mean = float(group["final_acc"].mean())
        rows.append({
            **{k: first[k] for k in KEY}, "setting": first["setting"],
            "n_seeds": len(set(seeds)), "seeds": ";".join(str(s) for s in seeds),
            "final_acc_mean": _pct(final_mean), "final_acc_std": _pct(_std(group["final_acc"])),
            "best_acc_mean": _pct(group["best_acc"].mean()), "best_acc_std": _pct(_std(group["best_acc"])),
            "train_acc_mean": _pct(group["train_acc"].mean()), "train_acc_std": _pct(_std(group["train_acc"])),
            "clean_acc": _pct(ref), "acc_drop": _pct(ref - final_mean) if ref == ref else float("nan"),
            "epochs": int(first["epochs"]), "n_train": int(first["n_train"]), "n_poisoned": int(first["n_poisoned"]),
            "n_test": int(first["n_test"]),
            "train_time_s": round(float(group["train_time_s"].mean()), 1),
            "train_forward_per_sample": round(float(group["train_forward_per_sample"].mean()), 1),
            "train_backward_per_sample": round(float(group["train_backward_per_sample"].mean()), 1),
            "poison_time_s": round(float(group["poison_time_s"].mean()), 2),
            "device_type": first["device_type"],
            "config_hashes": ";".join(group["config_hash"]),
            "harness_version": ";".join(sorted(set(group["harness_version"]))),
            "git": ";".join(sorted(set(group["git"]))),
            "finished": max(group["finished"]),
            "command": _command(first["manifest"], seeds),
        })
    df = pd.DataFrame(rows, columns=COLUMNS)
    return sort_board(df)


def _order(values: pd.Series, known: list[str]) -> pd.Series:
    rank = {name: i for i, name in enumerate(known)}
    return values.map(lambda v: (rank.get(v, len(known)), v))


def sort_board(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in reading order: dataset, model, ratio, poison (none first), defense (standard first)."""
    if df.empty:
        return df.reset_index(drop=True)
    keys = pd.DataFrame({
        "d": df["dataset"], "m": df["model"], "r": df["ratio"],
        "p": _order(df["poison"], POISON_ORDER), "f": _order(df["defense"], DEFENSE_ORDER), "s": df["setting"],
    })
    idx = sorted(range(len(df)), key=lambda i: tuple(keys.iloc[i]))
    return df.iloc[idx].reset_index(drop=True)


def build_poisoning_board(work_dir: Path, out_csv: Path) -> pd.DataFrame:
    """Rebuild the poisoning leaderboard CSV from `<work_dir>/poison-runs/` (atomic write)."""
    from harness.evasion.board import write_csv

    df = build_table(Path(work_dir))
    write_csv(df, Path(out_csv))
    return df


def matrix(df: pd.DataFrame, value: str = "final_acc") -> pd.DataFrame:
    """Poison x defense matrix of `<value>_mean ± <value>_std` (percent) from a board DataFrame.

    With several (dataset, model, ratio) combinations in `df` the rows carry them too. Cells with a
    single seed show the mean alone.
    """
    mean_col, std_col = f"{value}_mean", f"{value}_std"
    if df.empty:
        return pd.DataFrame()
    cells = df.copy()

    def cell(row: pd.Series) -> str:
        mean, std = row[mean_col], row[std_col]
        if mean != mean:
            return ""
        return f"{mean:.2f} ± {std:.2f}" if std == std else f"{mean:.2f}"

    cells["cell"] = cells.apply(cell, axis=1)
    context = [c for c in ("dataset", "model", "ratio", "setting") if cells[c].nunique() > 1]
    table = cells.pivot_table(index=context + ["poison"], columns="defense", values="cell", aggfunc="first")
    poisons = sorted(cells["poison"].unique(), key=lambda p: (POISON_ORDER.index(p) if p in POISON_ORDER else 99, p))
    defenses = sorted(cells["defense"].unique(), key=lambda d: (DEFENSE_ORDER.index(d) if d in DEFENSE_ORDER else 99, d))
    if context:
        table = table.reindex(sorted(table.index, key=lambda ix: (*ix[:-1], poisons.index(ix[-1]))))
    else:
        table = table.reindex(poisons)
    table = table.reindex(columns=defenses).fillna("")
    table.columns.name = "poison \\ defense"
    return table


def matrix_markdown(df: pd.DataFrame, value: str = "final_acc") -> str:
    """The matrix as a Markdown table (for bench results and docs)."""
    table = matrix(df, value)
    if table.empty:
        return "(no runs)\n"
    index_names = [n or "poison" for n in (table.index.names or ["poison"])]
    header = "| " + " | ".join(index_names + [str(c) for c in table.columns]) + " |"
    sep = "|" + "---|" * (len(index_names) + len(table.columns))
    lines = [header, sep]
    for ix, row in table.iterrows():
        ix = ix if isinstance(ix, tuple) else (ix,)
        lines.append("| " + " | ".join([str(v) for v in ix] + [str(v) for v in row]) + " |")
    return "\n".join(lines) + "\n"
