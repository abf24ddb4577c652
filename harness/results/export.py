"""`arena board export --format robustbench OUT_DIR`: leaderboard rows as RobustBench `model_info` JSON.

RobustBench keeps one small JSON per model and leaderboard, `model_info/<dataset>/<threat>/<Id>.json`,
with the fields of its `ModelInfo` dataclass (`robustbench/utils.py`): `link`, `name` (paper title),
`authors`, `additional_data`, `number_forward_passes`, `dataset`, `venue`, `architecture`, `eps`
(a string such as "8/255"), `clean_acc`, `reported`, and for the Lp tracks `autoattack_acc`, plus
the optional `external` (best known robust accuracy from other attacks), `unreliable` and
`footnote`. Accuracies are strings of percentages with two decimals ("59.53"), as RobustBench
writes them (`update_json`). The export writes the same layout under OUT_DIR, one file per row:

- `autoattack_acc`: the row's robust accuracy when its suite is AutoAttack standard (`standard@v*`,
  the reference `pyautoattack`); otherwise absent and the row's robust accuracy goes to `external`
  (RobustBench ranks by `external` when present), with the footnote naming the suite;
- `external`: also set when this harness's best-known accuracy (the union of every run's
  successes on the same model) is below the AutoAttack number;
- `unreliable`: true when the health report suspects gradient masking;
- `link`, `name`, `authors`, `additional_data`, `number_forward_passes` come from a submission's
  card (`arena submit`) when the run has one; what the harness cannot know (`venue`, `reported`,
  a paper title) is null, for the author to fill in as RobustBench's own `update_json` leaves it;
- `footnote`: the protocol (harness version, suite, n, seed, run hash) and the reproducing command.

RobustBench's leaderboards are CIFAR-10 (Linf 8/255, L2 0.5), CIFAR-100 (Linf 8/255) and ImageNet
(Linf 4/255) on their test sets (10,000 / 10,000 / 5,000 images); `track_notes` says what keeps a
row from matching one, so it can be rerun before submission.
"""
from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.atomic import atomic_write_text, strict_dumps

TRACKS = {("cifar10", "Linf"): 8 / 255, ("cifar10", "L2"): 0.5, ("cifar100", "Linf"): 8 / 255, ("imagenet", "Linf"): 4 / 255}
FULL_TEST = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}
FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
          "eps", "clean_acc", "reported", "autoattack_acc", "external", "unreliable", "footnote")


def eps_text(eps: float) -> str:
    """RobustBench's eps string: `8/255` when eps is k/255 (to the CSV's four digits), else the number.

    A radius written as a short decimal (0.2, 0.05, 0.5) stays that decimal even when it is also
    some k/255 (0.2 is 51/255): people wrote the decimal.
    """
    text = repr(float(eps))
    if len(text.split(".")[-1]) <= 3 and "e" not in text:
        return text
    k = round(float(eps) * 255)
    if 0 < k <= 64 and abs(float(eps) * 255 - k) <= 1e-3 * k:  # Linf radii such as 2/255, 8/255, 16/255
        return f"{k}/255"
    frac = Fraction(float(eps)).limit_denominator(1000)
    return str(float(frac)) if abs(float(frac) - float(eps)) < 1e-9 else f"{float(eps):.6g}"


def acc_text(percent: Any) -> str | None:
    """A percentage as RobustBench stores it: a string with two decimals."""
    try:
        value = float(percent)
    except (TypeError, ValueError):
        return None
    return None if value != value else f"{value:.2f}"


def rb_dataset(name: str) -> str:
    """RobustBench's dataset name for ours (an npz labelled `cifar10_test_first1000` is cifar10)."""
    low = str(name).lower()
    for candidate in ("cifar100", "cifar10", "imagenet"):
        if low.startswith(candidate):
            return candidate
    return str(name)


def dataset_of(row: dict[str, Any], manifest: dict[str, Any] | None) -> str:
    """RobustBench's dataset of a row: the submission card's, the zoo model's, else from the row's name."""
    manifest = manifest or {}
    for declared in ((manifest.get("card") or {}).get("dataset"),
                     ((manifest.get("defense_info") or {}).get("robustbench") or {}).get("dataset")):
        if isinstance(declared, dict):
            declared = declared.get("name")
        if declared and rb_dataset(str(declared)) in FULL_TEST:
            return rb_dataset(str(declared))
    return rb_dataset(row["dataset"])


def model_id(name: str) -> str:
    """A file name in RobustBench's style (letters, digits, `_` and `-`)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_") or "model"


def _manifest(work_dirs: list[Path], config_hash: str) -> dict[str, Any]:
    for wd in work_dirs:
        path = Path(wd) / "runs" / str(config_hash) / "manifest.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                return {}
    return {}


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def track_notes(row: dict[str, Any], manifest: dict[str, Any] | None = None) -> list[str]:
    """Why the row does not (yet) match a RobustBench leaderboard's protocol; empty when it does."""
    dataset, norm, eps = dataset_of(row, manifest), str(row["norm"]), float(row["eps"])
    notes = []
    if (dataset, norm) not in TRACKS:
        tracks = ", ".join(f"{d} {n} {eps_text(e)}" for (d, n), e in TRACKS.items())
        notes.append(f"RobustBench has no {dataset} {norm} leaderboard (it has {tracks})")
    elif abs(TRACKS[(dataset, norm)] - eps) > 1e-6:
        notes.append(f"RobustBench's {dataset} {norm} leaderboard is at eps {eps_text(TRACKS[(dataset, norm)])}, this row at {eps_text(eps)}")
    if not str(row.get("suite", "")).startswith("standard@"):
        notes.append(f"suite {row.get('suite')} is not AutoAttack standard (run suite=standard for autoattack_acc)")
    full = FULL_TEST.get(dataset)
    if full and int(row.get("n_samples") or 0) < full:
        notes.append(f"n={int(row.get('n_samples') or 0)} of the {full} test images RobustBench evaluates")
    return notes


def model_info(row: dict[str, Any], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """One RobustBench model_info entry (their field names and value types) for a leaderboard row."""
    card = (manifest or {}).get("card") or {}
    zoo = ((manifest or {}).get("defense_info") or {}).get("robustbench") or {}
    aa = str(row.get("suite", "")).startswith("standard@")
    robust, best = acc_text(row.get("robust_acc")), acc_text(row.get("best_known_acc"))
    paper = card.get("paper")
    authors = card.get("authors")
    training = card.get("training_data") or {}
    entry: dict[str, Any] = {
        "link": paper if isinstance(paper, str) and paper.startswith("http") else None,
        "name": None,  # the paper's title: RobustBench shows it as the method name
        "authors": ", ".join(authors) if isinstance(authors, list) else authors,
        "additional_data": training.get("extra_data") if isinstance(training, dict) else None,
        "number_forward_passes": int(card.get("number_forward_passes") or 1),
        "dataset": dataset_of(row, manifest),
        "venue": None,
        "architecture": card.get("architecture") or zoo.get("architecture") or row.get("model"),
        "eps": eps_text(float((((manifest or {}).get("config") or {}).get("threat") or {}).get("eps", row["eps"]))),
        "clean_acc": acc_text(row.get("clean_acc")),
        "reported": None,
    }
    if aa:
        entry["autoattack_acc"] = robust
        if best is not None and robust is not None and float(best) < float(robust):
            entry["external"] = best
    else:
        entry["external"] = best if best is not None and robust is not None and float(best) < float(robust) else robust
    entry["unreliable"] = _truthy(row.get("masking_suspected"))
    how = (f"evaluated with RobustArena {row.get('harness_version')} (suite {row.get('suite')}, n={row.get('n_samples')}, "
           f"seed {row.get('seed')}, run {row.get('config_hash')}; robust accuracy is the per-sample worst case over the "
           f"suite, every adversarial example verified by the harness)")
    if not aa:
        how += "; the robust accuracy is under `external` because the suite is not AutoAttack standard"
    entry["footnote"] = f"{how}. Reproduce: {row.get('command')}"
    return {k: entry[k] for k in FIELDS if k in entry}


def export_robustbench(df: pd.DataFrame, out_dir: Path | str, work_dirs: list[Path] | None = None) -> list[tuple[Path, list[str]]]:
    """Write one model_info JSON per row under OUT_DIR/<dataset>/<norm>/; returns (path, notes) per file."""
    out = Path(out_dir)
    written: list[tuple[Path, list[str]]] = []
    taken: set[Path] = set()
    for row in df.to_dict("records"):
        manifest = _manifest(list(work_dirs or []), str(row.get("config_hash")))
        entry = model_info(row, manifest)
        folder = out / entry["dataset"] / str(row["norm"])
        stem = model_id(row.get("defense"))
        path = folder / f"{stem}.json"
        if path in taken:  # several rows of one defense (suites, eps, models): keep them apart
            path = folder / f"{stem}_{model_id(str(row.get('suite')).split('@')[0])}_{str(row.get('config_hash'))[:8]}.json"
        taken.add(path)
        atomic_write_text(path, strict_dumps(entry, indent=2, sort_keys=False) + "\n")
        written.append((path, track_notes(row, manifest)))
    return written
