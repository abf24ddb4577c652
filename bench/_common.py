"""Helpers shared by the benchmarks: locating ../shared, loading its models, writing results."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.core.atomic import strict_dumps  # strict JSON: null, never NaN

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARENA_SHARED") or REPO.parent / "shared")  # ARENA_SHARED: a checkout elsewhere
RESULTS = REPO / "bench" / "results"


def require_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        sys.exit(f"{path} not found: this benchmark needs ../shared beside the checkout")
    return path


def load_shared_model(folder: str, weights: str | None = None) -> torch.nn.Module:
    """Import ../shared/models/<folder>/model.py and load its weights (weights_only inside)."""
    path = require_shared("models", folder, "model.py")
    spec = importlib.util.spec_from_file_location(f"shared_{folder}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    w = str(path.with_name(weights)) if weights else None
    return module.load(w).eval()


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(strict_dumps(payload) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(f"wrote {RESULTS / name}.json and .md")


def paired_difference(robust_a: Any, robust_b: Any, confidence: float = 0.95) -> dict[str, Any]:
    """Paired difference of robust accuracy, A minus B, on the same samples, with McNemar's exact test.

    `robust_a`, `robust_b`: per-sample bools (robust under A, under B) over the same images.
    Only the discordant samples carry information: b = robust under A only, c = under B only;
    diff = (b - c) / n. The interval is the exact conditional one: the Clopper-Pearson interval
    of b / (b + c), mapped to (b + c) / n * (2 p - 1). p_value: two-sided exact binomial test of
    b against (b + c) / 2 (McNemar exact). With no discordant sample the difference is exactly 0.
    """
    from scipy.stats import binomtest

    a = [bool(v) for v in robust_a]
    b_ = [bool(v) for v in robust_b]
    if len(a) != len(b_):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b_)}")
    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b_))
    only_b = sum(y and not x for x, y in zip(a, b_))
    disc = only_a + only_b
    out: dict[str, Any] = {"n": n, "only_a": only_a, "only_b": only_b, "diff": (only_a - only_b) / n if n else 0.0,
                           "confidence": confidence}
    if disc == 0:
        return {**out, "ci": [0.0, 0.0], "p_value": 1.0}
    test = binomtest(only_a, disc, 0.5)
    ci = test.proportion_ci(confidence_level=confidence, method="exact")
    scale = disc / n
    return {**out, "ci": [scale * (2 * ci.low - 1), scale * (2 * ci.high - 1)], "p_value": float(test.pvalue)}


def format_paired(d: dict[str, Any]) -> str:
    """`-0.4 pp [-1.2, +0.4] (2 vs 4, p=0.69)`: A minus B in points, CI, discordant counts, p."""
    lo, hi = d["ci"]
    return (f"{100 * d['diff']:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}] "
            f"({d['only_a']} vs {d['only_b']}, p={d['p_value']:.2g})")


def interleaved(runs: dict[str, Any], rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Time each callable `rounds` times, interleaved (the order rotates every round, so drift and
    warm caches hit every variant alike): per variant a list of (wall s, process CPU s)."""
    names = list(runs)
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            w0, c0 = time.perf_counter(), time.process_time()
            runs[k]()
            out[k].append((time.perf_counter() - w0, time.process_time() - c0))
    return out


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max of a list of measurements."""
    import statistics

    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (benchmarks record them: a timing is only as good as the quiet)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []
