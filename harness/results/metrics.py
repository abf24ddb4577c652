"""Accuracies and costs as pure functions of per-sample records.

The run summary and the leaderboard both call these, so a leaderboard rebuilt from stored
records always agrees with what the run printed.
"""
from __future__ import annotations

from typing import Any

import pandas as pd


def per_sample_worst(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per sample: draws, clean correct draws and the fewest correct draws over attacks."""
    ran = samples[samples["ran"]]
    clean = ran[ran["attack"] == "clean"].set_index("sample_id")
    worst = ran.groupby("sample_id")["correct_draws"].min()
    out = pd.DataFrame({"draws": clean["draws"], "clean": clean["correct_draws"], "worst": worst.reindex(clean.index)})
    return out.sort_index()


def _col_sum(rows: pd.DataFrame, column: str) -> float:
    """Sum of a column that records written before it existed lack (then 0)."""
    return float(rows[column].sum()) if column in rows else 0.0


def _three(correct: pd.Series, draws: pd.Series) -> dict[str, float]:
    if len(correct) == 0:
        return {"mean": float("nan"), "majority": float("nan"), "worst": float("nan")}
    return {
        "mean": float((correct / draws).mean()),
        "majority": float((correct * 2 > draws).mean()),
        "worst": float((correct == draws).mean()),
    }


def certified(samples: pd.DataFrame, ps: pd.DataFrame) -> tuple[float | None, int]:
    """(certified accuracy, certified samples that some attack nevertheless broke).

    A sample is certified if it is classified correctly (every draw) and some attack in the run
    proved that no adversarial example exists in the ball (records' `certified` == 1; NaN rows come
    from attacks that cannot prove robustness). None when no such attack ran (null in summary.json). Since a proof holds
    for every attack, certified <= robust; a certified sample that was broken is a soundness
    failure, counted rather than hidden.
    """
    if "certified" not in samples or not samples["certified"].notna().any():
        return None, 0
    proved = samples.loc[samples["ran"] & (samples["certified"] == 1), "sample_id"].unique()
    cert = ps.index.isin(proved) & (ps["clean"] == ps["draws"]).to_numpy()
    robust = (ps["worst"] == ps["draws"]).to_numpy()
    return (float(cert.mean()) if len(ps) else None), int((cert & ~robust).sum())


def accuracies(samples: pd.DataFrame) -> dict[str, Any]:
    """Clean and robust accuracy (mean / majority / worst over draws), per-attack cascade, costs.

    `robust_acc` is the worst case over attacks per sample and, for randomised models, over draws
    (robust only if every draw is right); deterministic models have one draw, so all three agree.
    """
    ps = per_sample_worst(samples)
    clean, robust = _three(ps["clean"], ps["draws"]), _three(ps["worst"], ps["draws"])
    order = samples[samples["attack"] != "clean"].groupby("attack")["order"].first().sort_values()
    attacks: dict[str, Any] = {}
    running = ps["clean"].copy()
    for label in order.index:
        rows = samples[samples["attack"] == label].set_index("sample_id")
        ran = rows[rows["ran"]]
        before_broken = running == 0
        running = pd.concat([running, ran["correct_draws"].reindex(running.index).fillna(running)], axis=1).min(axis=1)
        attacks[label] = {
            "robust_acc_after": float((running == ps["draws"]).mean()),
            "robust_acc_mean_after": float((running / ps["draws"]).mean()),
            "attacked": int(len(ran)),
            "broken": int(((running == 0) & ~before_broken).sum()),
            "success_rate": float(ran["success"].mean()) if len(ran) else float("nan"),
            # every row, not only `ran`: a row the cascade skipped still carries its share of the
            # attack's prepare-time passes (also listed on their own below)
            "n_forward": float(rows["n_forward"].sum()),
            "n_backward": float(rows["n_backward"].sum()),
            "prepare_forward": _col_sum(rows, "prepare_forward"),
            "prepare_backward": _col_sum(rows, "prepare_backward"),
            "n_queries": int(ran["n_queries"].sum()),
            "median_queries_success": float(ran.loc[ran["success"], "n_queries"].median()) if ran["success"].any() else float("nan"),
            "time_s": float(ran["time_s"].sum()),
            "violations": int(ran["violation"].sum()),
            "failures_at_budget": int((ran["budget_exhausted"] & ~ran["success"]).sum()) if "budget_exhausted" in ran else 0,
            # attacked samples whose attack saw a non-finite input gradient (older records lack the column)
            "nonfinite_grad": int(ran["nonfinite_grad"].fillna(False).astype(bool).sum()) if "nonfinite_grad" in ran else 0,
        }
        if "certified" in ran and ran["certified"].notna().any():  # a complete verifier (attack=exact)
            attacks[label]["certified"] = int((ran["certified"] == 1).sum())
    certified_acc, certified_broken = certified(samples, ps)
    n = max(len(ps), 1)
    total_fwd = sum(a["n_forward"] for a in attacks.values())
    total_bwd = sum(a["n_backward"] for a in attacks.values())
    return {
        "clean_acc": clean["mean"], "clean_acc_majority": clean["majority"], "clean_acc_worst": clean["worst"],
        "robust_acc": robust["worst"], "robust_acc_mean": robust["mean"], "robust_acc_majority": robust["majority"],
        "certified_acc": certified_acc, "certified_broken": certified_broken,
        "attacks": attacks,
        "forward_per_sample": total_fwd / n,
        "backward_per_sample": total_bwd / n,
        "queries_per_sample": sum(a["n_queries"] for a in attacks.values()) / n,
        "prepare_forward": sum(a["prepare_forward"] for a in attacks.values()),
        "prepare_backward": sum(a["prepare_backward"] for a in attacks.values()),
        "attack_time_s": sum(a["time_s"] for a in attacks.values()),
        "violations": sum(a["violations"] for a in attacks.values()),
        "nonfinite_grad": sum(a["nonfinite_grad"] for a in attacks.values()),
    }


def stage_counts(samples: pd.DataFrame) -> dict[str, float]:
    """Per stage, how many samples remain: clean correct (mean over draws), then robust after each attack.

    The same numbers the cascade reports live (`harness.core.progress.stage_done`), recomputed from
    stored records, e.g. for the batches a resumed run reads back.
    """
    acc = accuracies(samples)
    n = len(per_sample_worst(samples))
    return {"clean": acc["clean_acc"] * n, **{k: v["robust_acc_after"] * n for k, v in acc["attacks"].items()}}
