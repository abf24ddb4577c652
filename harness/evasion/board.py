"""The evasion leaderboard: a pure pandas function of finished run directories.

One row per (defense id, data, threat model, attack configuration): the data by its content hash
(`data_hash`: the dataset config, file hashes included, and the evaluated samples), the suite by a
hash of its full attack configuration (`attacks_hash`: every attack's parameters, views and the
evaluator's settings), so `-m attack.steps=5,10` gives two rows and two different npz files never
share one. Rows are recomputed from each run's per-sample records (never from the run's own
summary), so a rebuild is the same function of the same data: byte-identical. `best_known_acc` is
the union over every run of the same defense, dataset and threat model, per sample: a sample broken
by any attack in any run counts as broken, so a later, stronger attack lowers the row without
rerunning the others. Rows are ranked by `best_known_acc`; a randomised defense evaluated without
EOT is an `upper_bound` and ranks below every properly evaluated row. A finished run whose files
are damaged is skipped with a warning naming it (`arena board check` lists them all). Writes are
atomic and serialised by a file lock; a CSV read back is validated (`read`).
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from filelock import FileLock

from harness import __version__
from harness.core.atomic import atomic_write, ensure_dir, storage_error
from harness.core.errors import UserError
from harness.core.hashing import stable_hash
from harness.evasion.records import load_run
from harness.results.metrics import accuracies, per_sample_worst
from harness.results.store import RunDir, completed_runs

COLUMNS = [
    "defense", "defense_id", "model", "dataset", "data_hash", "threat", "norm", "eps", "suite", "attacks_hash",
    "n_samples", "clean_acc", "robust_acc", "robust_acc_mean", "robust_acc_majority", "best_known_acc", "certified_acc", "cascade",
    "forward_per_sample", "backward_per_sample", "queries_per_sample", "attack_time_s",
    "train_time_s", "train_passes", "params",
    "randomized", "ensemble", "upper_bound", "masking_suspected", "violations", "nonfinite_grad", "submission",
    "isolation", "stateful_model", "data", "transductive",
    "seed", "config_hash", "harness_version", "git", "finished", "command",
]
ROW_KEY = ["defense_id", "dataset", "data_hash", "threat", "suite", "attacks_hash"]
"""One row per key: the latest run of it (most samples first, for merged shard sets)."""
FLOAT_COLUMNS = ("eps", "clean_acc", "robust_acc", "robust_acc_mean", "robust_acc_majority", "best_known_acc", "certified_acc",
                 "forward_per_sample", "backward_per_sample", "queries_per_sample", "attack_time_s", "train_time_s")
INT_COLUMNS = ("n_samples", "train_passes", "params", "violations", "seed")
BOOL_COLUMNS = ("randomized", "ensemble", "upper_bound", "masking_suspected", "submission", "transductive")
REQUIRED = ("defense", "defense_id", "dataset", "data_hash", "threat", "norm", "eps", "suite", "attacks_hash",
            "n_samples", "config_hash")
"""Columns that are never empty in a row the harness wrote."""
EOT_VIEWS = ("expected",)  # a view that is the exact expectation over the defense's randomness


def _pct(x: float) -> float:
    return round(100.0 * x, 2) if x == x else float("nan")


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def uses_eot(spec: dict[str, Any], params: dict[str, Any] | None = None) -> bool:
    """Does this attack average over a randomised defense's draws (or attack their exact expectation)?

    EOT draws per step (`eot` > 1), AutoAttack's `rand` version (EOT-20), or a view that is the
    exact expectation. A fixed-path view or a single-draw attack is not.
    """
    merged = {**(params or {}), **spec}
    try:
        eot = int(merged.get("eot", 1) or 1)
    except (TypeError, ValueError):
        eot = 1
    return eot > 1 or (merged.get("name") == "autoattack" and merged.get("version") == "rand") \
        or merged.get("view") in EOT_VIEWS


def is_upper_bound(manifest: dict[str, Any]) -> bool:
    """A randomised defense evaluated by no EOT attack: its robust accuracy is only an upper bound."""
    info = manifest.get("defense_info") or {}
    if not info.get("randomized", False):
        return False
    described = manifest.get("attacks") or {}
    specs = manifest["config"].get("attacks") or []
    return not any(uses_eot(spec, (described.get(str(spec.get("label") or spec.get("name"))) or {}).get("params"))
                   for spec in specs)


def data_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The evaluated data by content: dataset config (files by their sha256) and the evaluated samples."""
    return {k: v for k, v in (cfg.get("dataset") or {}).items() if k != "label"}


def source_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The dataset by content, whatever subset was evaluated: samples are matched by their ids."""
    return {k: v for k, v in data_identity(cfg).items() if k not in ("eval_ids", "eval_data")}


def dataset_label(manifest: dict[str, Any]) -> str:
    """The dataset as the board names it: `dataset.label`, else the npz file's stem, else the name."""
    d = manifest["config"].get("dataset") or {}
    return str(d.get("label") or manifest.get("dataset_name") or d.get("name"))


def attacks_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The suite's full attack configuration: every attack's parameters and view, and the evaluator."""
    return {"attacks": cfg.get("attacks"), "evaluator": cfg.get("evaluator")}


def defense_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies the defended model: defense config, architecture, training data, weights."""
    cfg = manifest["config"]
    return {"defense": cfg.get("defense"), "model": cfg.get("model"), "model_hash": manifest.get("model_hash")}


def _command(manifest: dict[str, Any]) -> str:
    overrides = manifest.get("overrides") or []
    return "arena eval " + " ".join(overrides) if overrides else "arena eval"


def isolation_of(manifest: dict[str, Any]) -> str:
    """How the model ran: `full` / `reduced` (a sandboxed submission), `in-process` (harness code)."""
    return str((manifest.get("isolation") or {}).get("level") or "in-process")


def data_source(manifest: dict[str, Any]) -> str:
    """A local npz's stem and content hash (the operator's --data, or dataset=npz), else ''."""
    facts = (manifest.get("scoring") or {}).get("data")
    if facts:
        return f"{facts['stem']}:{str(facts['x_sha256'])[:16]}"
    ds = (manifest.get("config") or {}).get("dataset") or {}
    if ds.get("name") == "npz":
        return f"npz:{ds.get('eval_data', '')}"  # the semantic config keeps the content hash, not the file name
    return ""


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
        "dataset": dataset_label(manifest),
        "data_hash": stable_hash(data_identity(cfg), 8),
        "threat": f"{threat['norm']}-{threat['eps']:.4g}",
        "norm": threat["norm"], "eps": threat["eps"],
        "suite": cfg.get("suite"),
        "attacks_hash": stable_hash(attacks_identity(cfg), 8),
        "n_samples": int(len(per_sample_worst(samples))),
        "clean_acc": _pct(acc["clean_acc"]),
        "robust_acc": _pct(acc["robust_acc"]),
        "robust_acc_mean": _pct(acc["robust_acc_mean"]),
        "robust_acc_majority": _pct(acc["robust_acc_majority"]),
        "best_known_acc": _pct(best_known),
        "certified_acc": _pct(acc["certified_acc"]) if acc.get("certified_acc") is not None else float("nan"),
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
        "upper_bound": is_upper_bound(manifest),
        "masking_suspected": bool(summary.get("masking_suspected", False)),
        "violations": int(acc["violations"]),
        "nonfinite_grad": int(acc.get("nonfinite_grad", 0)),  # samples whose attack saw non-finite gradients
        "submission": bool(manifest.get("submission", False)),
        "isolation": isolation_of(manifest),
        "stateful_model": bool(summary.get("stateful_model", False)),
        "data": data_source(manifest),
        # an attack prepared on the evaluated images themselves (a LAFEAT head with head_data=evaluated)
        "transductive": any(bool((f or {}).get("head_transductive")) for f in (manifest.get("prepare") or {}).values()),
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


def collect(work_dirs: list[Path], warn: Callable[[str], None] = _warn) -> list[tuple[RunDir, dict, dict, pd.DataFrame]]:
    """Every finished run under the work dirs, with manifest, summary and records (shards merged).

    A finished run whose files are damaged (`harness.evasion.records.load_run`) is left out,
    with one warning line naming its hash, path and what is wrong.
    """
    runs = []
    for wd in work_dirs:
        for run in completed_runs(wd, "runs"):
            loaded = load_run(run)
            if isinstance(loaded, str):
                warn(damaged_line(run, loaded))
                continue
            runs.append((run, *loaded))
    return _merge_shards(runs)


def recompute_hint(run: RunDir, command: str = "arena eval") -> str:
    """How to recompute a damaged run: its own command when its manifest still says it."""
    manifest = run.read_json("manifest.json") or {}
    overrides = manifest.get("overrides")
    if isinstance(overrides, list) and manifest.get("config_hash") == run.key:
        return f"`{' '.join([command, *map(str, overrides)])}` recomputes it"
    return "rerun the command that made it to recompute it (or delete the directory)"


def damaged_line(run: RunDir, problem: str, command: str = "arena eval") -> str:
    """One warning line for a damaged finished run: hash, path, what is wrong, how to recompute it."""
    return f"warning: skipped damaged run {run.key} ({run.path}): {problem}; {recompute_hint(run, command)}"


def build_table(work_dirs: list[Path], warn: Callable[[str], None] = _warn) -> pd.DataFrame:
    """The leaderboard as a DataFrame (pure function of the finished runs).

    `df.attrs["damaged"]` lists the warning lines of the damaged runs left out."""
    damaged: list[str] = []

    def note(line: str) -> None:
        damaged.append(line)
        warn(line)

    df = _table(collect(work_dirs, note))
    df.attrs["damaged"] = damaged
    return df


def _table(runs: list[tuple[RunDir, dict, dict, pd.DataFrame]]) -> pd.DataFrame:
    # best known: per (defense identity, dataset, threat), union of breaks over all runs, per sample id
    worst: dict[str, pd.Series] = {}
    keys = []
    for run, manifest, _, samples in runs:
        cfg = manifest["config"]
        key = stable_hash([defense_identity(manifest), source_identity(cfg), cfg["threat"]])
        keys.append(key)
        ps = per_sample_worst(samples)
        robust = ps["worst"] == ps["draws"]
        if key in worst:
            union = robust.index.union(worst[key].index)
            robust = worst[key].reindex(union, fill_value=True) & robust.reindex(union, fill_value=True)
        worst[key] = robust
    rows = []
    for (run, manifest, summary, samples), key in zip(runs, keys):
        ids = per_sample_worst(samples).index
        best = float(worst[key].reindex(ids).mean()) if len(ids) else float("nan")
        rows.append(_row(run, manifest, summary, samples, best))
    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.empty:
        return df
    # one row per key: keep the run with most samples, then the latest
    df = df.sort_values([*ROW_KEY, "n_samples", "finished", "config_hash"])
    df = df.drop_duplicates(ROW_KEY, keep="last")
    return rank(df)


def rank(df: pd.DataFrame) -> pd.DataFrame:
    """The board's order: per dataset and threat, properly evaluated rows first, each group by
    best known accuracy (the strongest evidence), then robust accuracy, descending."""
    return df.sort_values(["dataset", "threat", "upper_bound", "best_known_acc", "robust_acc", "defense", "suite", "config_hash"],
                          ascending=[True, True, True, False, False, True, True, True], kind="stable").reset_index(drop=True)


def _to_csv(df: pd.DataFrame, out: Path) -> None:
    atomic_write(out, lambda p: df.to_csv(p, index=False, float_format="%.4g", lineterminator="\n"))


def _locked(out: Path) -> FileLock:
    ensure_dir(out.parent, for_file=out)
    lock = str(out) + ".lock"
    return FileLock(lock)


def write_csv(df: pd.DataFrame, out: Path) -> None:
    """Atomic, locked write; a reader sees the old or the new file, never a partial one."""
    out = Path(out)
    try:
        with _locked(out):
            _to_csv(df, out)
    except OSError as exc:  # the lock file itself (read-only directory, full disk)
        err = storage_error(exc, Path(str(out) + ".lock"))
        if err is None:
            raise
        raise err from None


def build(work_dirs: list[Path], out: Path) -> pd.DataFrame:
    """Rebuild and write under one lock: reading the runs inside the lock means the last writer
    has seen every run finished before it, so concurrent builds never leave a stale board.
    Damaged runs are left out with a warning each (listed in `df.attrs["damaged"]`)."""
    out = Path(out)
    try:
        with _locked(out):
            df = build_table(work_dirs)
            _to_csv(df, out)
    except OSError as exc:
        err = storage_error(exc, Path(str(out) + ".lock"))
        if err is None:
            raise
        raise err from None
    return df


def csv_problem(path: Path, columns: list[str], floats: tuple[str, ...] = (), ints: tuple[str, ...] = (),
                bools: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a leaderboard CSV (None when it has exactly `columns`, every row has every
    field, and the typed columns parse): a truncated or hand-edited file is never shown silently."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            text = fh.read()
        rows = list(csv.reader(text.splitlines(keepends=True), strict=True))
    except UnicodeDecodeError as exc:
        return f"is not a readable CSV ({type(exc).__name__})"
    except csv.Error as exc:
        return f"is not a readable CSV ({' '.join(str(exc).split())})"
    if not rows:
        return "is empty"
    if not text.endswith("\n"):
        return "is truncated (its last line is incomplete)"
    header = rows[0]
    if header != list(columns):
        missing = [c for c in columns if c not in header]
        extra = [c for c in header if c not in columns]
        if missing or extra:
            return (f"has other columns than this harness writes (missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                    f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''})")
        return "has its columns in another order than this harness writes"
    index = {c: i for i, c in enumerate(header)}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            return f"line {n} has {len(row)} fields, not {len(header)} (a truncated or hand-edited file)"
        for c in required:
            if row[index[c]] == "":
                return f"line {n} has no {c}"
        for c in floats:
            value = row[index[c]]
            if value != "":
                try:
                    float(value)
                except ValueError:
                    return f"line {n}: {c}={value!r} is not a number"
        for c in ints:
            value = row[index[c]]
            if value != "":
                try:
                    number = float(value)
                except ValueError:
                    number = math.nan
                if not (math.isfinite(number) and number.is_integer()):
                    return f"line {n}: {c}={value!r} is not an integer"
        for c in bools:
            if row[index[c]] not in ("True", "False"):
                return f"line {n}: {c}={row[index[c]]!r} is not True or False"
    return None


def read(path: Path, columns: list[str] | None = None, floats: tuple[str, ...] = FLOAT_COLUMNS,
         ints: tuple[str, ...] = INT_COLUMNS, bools: tuple[str, ...] = BOOL_COLUMNS,
         required: tuple[str, ...] = REQUIRED) -> pd.DataFrame:
    """Read a leaderboard CSV after validating it (columns, field counts, types); a bad file is one
    line naming the fix. Defaults are the evasion board's schema."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no leaderboard at {str(path)!r}; run `arena eval` or `arena board build` first")
    problem = csv_problem(path, list(columns or COLUMNS), floats, ints, bools, required)
    if problem is None:
        try:
            return pd.read_csv(path)
        except Exception as exc:
            problem = f"is not a readable CSV ({type(exc).__name__})"
    raise UserError(f"leaderboard {str(path)!r} {problem}; rebuild it with `arena board build`")
