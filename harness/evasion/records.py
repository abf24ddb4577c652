"""The per-sample record schema of an evaluation and the checks that stored records are what they
claim to be.

A resumed batch is taken only when its file says it was computed for this run, this batch, this
seed, these sample ids and these attacks, and its rows agree (`batch_problem`); a finished run is
read by a leaderboard only when its records agree with its manifest (`run_damage`). Anything else
is reported and recomputed, never guessed around: a batch of 45 rows where 60 belong, or another
seed's file, would otherwise end as a silently wrong row.
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from harness.core.hashing import tensor_hash
from harness.results.store import RunDir

RECORD_COLUMNS = ("sample_id", "label", "attack", "order", "ran", "correct_draws", "draws", "success", "pred",
                  "linf", "l2", "n_forward", "n_backward", "prepare_forward", "prepare_backward", "n_queries", "time_s",
                  "violation", "stage", "budget_exhausted", "nonfinite_grad", "certified")
"""Columns of `samples.parquet` and of every batch file (`harness.evasion.cascade.evaluate_batch`)."""
CORE_COLUMNS = ("sample_id", "label", "attack", "order", "ran", "correct_draws", "draws")
"""What the metrics need: a finished run without these cannot give a row."""
FORMAT = 2  # 2: nonfinite_grad, the prepare-pass shares and certified joined the records


def ids_hash(ids: Any) -> str:
    """The hash of a sequence of sample ids, as the manifest's `sample_ids_hash` (int64 tensor)."""
    return tensor_hash(torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids, dtype=torch.int64))


def batch_meta(run_key: str, index: int, seed: int, ids: torch.Tensor, labels: list[str], draws: int,
               rows: int) -> dict[str, Any]:
    """What a batch file records about itself (stored in its Parquet metadata)."""
    return {"format": FORMAT, "run": run_key, "batch": index, "seed": seed, "sample_ids_hash": ids_hash(ids),
            "n_samples": int(ids.shape[0]), "attacks": list(labels), "draws": int(draws), "rows": int(rows)}


def batch_problem(records: pd.DataFrame, meta: dict[str, Any], want: dict[str, Any], ids: list[int],
                  y: list[int]) -> str | None:
    """Why a stored batch does not belong to the plan (None when it does).

    `want` is the `batch_meta` the plan would write (with the plan's draws: a deterministic model's
    batches record 1); `ids` and `y` the batch's sample ids and labels.
    """
    if meta.get("format") != FORMAT:
        return f"it has record format {meta.get('format')!r}, not {FORMAT}"
    checks = (
        ("seed", lambda got, exp: f"it was computed with seed={got}; the plan has seed={exp}"),
        ("n_samples", lambda got, exp: f"it holds {got} samples; the plan's batch has {exp}"),
        ("sample_ids_hash", lambda got, exp: "its sample ids differ from the plan's"),
        ("attacks", lambda got, exp: f"its attacks {got} differ from the plan's {exp}"),
        ("batch", lambda got, exp: f"it is batch {got}, not {exp}"),
        ("run", lambda got, exp: f"it belongs to run {got}"),
    )
    for key, say in checks:
        if meta.get(key) != want[key]:
            return say(meta.get(key), want[key])
    if meta.get("draws") not in (1, want["draws"]):  # 1 for a deterministic defense, the plan's draws otherwise
        return f"it was decided over {meta.get('draws')!r} draws; the plan takes {want['draws']} (or 1 for a deterministic model)"
    if set(records.columns) != set(RECORD_COLUMNS):
        extra, missing = sorted(set(records.columns) - set(RECORD_COLUMNS)), sorted(set(RECORD_COLUMNS) - set(records.columns))
        return f"its columns differ from the record schema (missing {missing}, unexpected {extra})"
    n, labels = len(ids), want["attacks"]
    if len(records) != n * len(labels) or meta.get("rows") != len(records):
        return f"it holds {len(records)} rows; the plan needs {n * len(labels)} ({n} samples x {len(labels)} stages)"
    for order, label in enumerate(labels):
        part = records.iloc[order * n:(order + 1) * n]
        if (part["attack"] != label).any() or (part["order"] != order).any():
            return f"rows {order * n}..{(order + 1) * n - 1} are not stage {order} ({label!r})"
        if part["sample_id"].tolist() != ids:
            return f"the sample ids of stage {label!r} differ from the plan's"
        if part["label"].tolist() != y:
            return f"the labels of stage {label!r} differ from the dataset's"
    if (records["draws"] != meta["draws"]).any():
        return f"its rows' draws per decision differ from its metadata ({meta['draws']})"
    ran = records["ran"].astype(bool)
    cd = records["correct_draws"]
    if cd.isna().any() or (ran & ((cd < 0) | (cd > records["draws"]))).any() or (~ran & (cd != -1)).any():
        return "its correct-draw counts are out of range"
    return None


def load_run(run: RunDir) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame] | str:
    """(manifest, summary, samples) of a finished evaluation run, or what is wrong with it (a str).

    Beyond `RunDir.load_checked` (files present, parseable, the manifest is this run's): the records
    hold exactly the manifest's samples (by their ids hash) and one row per sample for the clean pass
    and each of the manifest's attacks.
    """
    loaded = run.load_checked(CORE_COLUMNS)
    if isinstance(loaded, str):
        return loaded
    manifest, _, samples = loaded
    labels = ["clean", *(manifest.get("attacks") or {})]
    clean = samples[samples["attack"] == "clean"]
    if "sample_ids_hash" in manifest and ids_hash(clean["sample_id"].tolist()) != manifest["sample_ids_hash"]:
        return f"samples.parquet holds other samples than the manifest's ({len(clean)} clean records)"
    counts = samples["attack"].value_counts()
    if set(counts.index) != set(labels) or (counts != len(clean)).any():
        return (f"samples.parquet holds {len(samples)} records; the manifest needs {len(clean)} samples x "
                f"{len(labels)} stages ({', '.join(labels)})")
    if samples["correct_draws"].isna().any():
        return "samples.parquet has missing correct-draw counts"
    return loaded


def run_damage(run: RunDir) -> str | None:
    """What is wrong with a finished evaluation run (None when its files are whole and consistent)."""
    loaded = load_run(run)
    return loaded if isinstance(loaded, str) else None
