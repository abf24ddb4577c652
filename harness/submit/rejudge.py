"""Fresh-process verdicts: every clean prediction and every verified example judged again.

At attack time the verdicts come from the worker the attacks talked to, which saw every clean
input and every query. A stateful model could answer those verdicts from memory. So after the
suite, each verdict is taken again by workers that start fresh:

- every sample's examples (its clean input and the example of each stage that attacked it) go to
  distinct judge workers, so no judge sees two inputs of the same sample; the judge of an
  adversarial example never saw that sample's clean input;
- each judge gets its examples in a shuffled order and in batches mixing samples and stages, so
  the batch composition differs from the attack-time batches;
- a randomised model gets as many draws as at attack time, with fresh seeds.

The records then carry the fresh verdict (`correct_draws`, `success`, `pred`: what the board
reads) and keep the attack-time one (`attack_correct_draws`, `attack_success`, `attack_pred`),
with `verdict_changed` per record. Disagreements raise the health report's `stateful_model`
check: for a deterministic model any disagreement beyond a floating-point tie (|margin| below
1e-4 of the logit scale) counts (warn up to `health.fail_min`, fail above); for a randomised one the disagreements must lean toward the
attack-time verdict being the more robust one beyond chance (one-sided sign test).
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from harness.health.report import MAX_IDS, Check, HealthConfig
from harness.submit.remote import Session

TIE_RTOL = 1e-4  # |margin| <= TIE_RTOL * (1 + max |logit|): a floating-point tie, not a disagreement
SIGN_TEST_P = 1e-3


@dataclass
class Example:
    sample_id: int
    attack: str
    x: np.ndarray  # float32 (C, H, W) in [0, 1]
    label: int


@dataclass
class Verdict:
    correct: int  # correct draws
    pred: int  # first draw's prediction
    margin: float  # first draw: logit of the label minus the best other logit
    scale: float  # first draw: largest |logit|


@dataclass
class Rejudged:
    records: pd.DataFrame
    facts: dict[str, Any] = field(default_factory=dict)


def examples_of(samples: pd.DataFrame, adv: dict[str, np.ndarray], clean: dict[int, np.ndarray],
                labels: dict[int, int]) -> list[Example]:
    """Every input a counted verdict was taken on: clean inputs and each stage's verified example."""
    out = []
    ran = samples[samples["ran"].astype(bool)]
    for sid in ran.loc[ran["attack"] == "clean", "sample_id"].tolist():
        out.append(Example(int(sid), "clean", clean[int(sid)], labels[int(sid)]))
    for sid, attack, x in zip(adv["sample_id"].tolist(), adv["attack"].tolist(), adv["x"]):
        out.append(Example(int(sid), str(attack), np.asarray(x, dtype=np.float32), labels[int(sid)]))
    return out


def assign(examples: list[Example], rng: np.random.Generator) -> list[list[Example]]:
    """Judge lists: each sample's examples spread over distinct judges, each list shuffled."""
    by_sample: dict[int, list[Example]] = {}
    for ex in examples:
        by_sample.setdefault(ex.sample_id, []).append(ex)
    n_judges = max((len(v) for v in by_sample.values()), default=0)
    judges: list[list[Example]] = [[] for _ in range(n_judges)]
    for sid in sorted(by_sample):
        exs = by_sample[sid]
        for ex, j in zip(exs, rng.permutation(n_judges)[: len(exs)]):
            judges[int(j)].append(ex)
    return [[lst[i] for i in rng.permutation(len(lst))] for lst in judges]


@torch.no_grad()
def judge(session: Session, examples: list[Example], draws: int, batch_size: int, seed: int,
          device: torch.device) -> list[Verdict]:
    """The harness's verdict (correct draws, first prediction, margin) on each example, in this worker."""
    clf = session.classifier
    n_draws = draws if clf.randomized else 1
    session.model.generator = torch.Generator().manual_seed(seed)  # this judge's draws, independent of other threads
    verdicts: list[Verdict] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        x = torch.from_numpy(np.stack([e.x for e in chunk])).to(device)
        y = torch.tensor([e.label for e in chunk], device=device)
        count = torch.zeros(len(chunk), dtype=torch.long, device=device)
        first = None
        for _ in range(n_draws):
            logits = clf.module(x).float()
            count += (logits.argmax(1) == y).long()
            first = logits if first is None else first
        assert first is not None
        own = first.gather(1, y.view(-1, 1)).squeeze(1)
        other = first.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
        margin = (own - other).cpu().tolist()
        scale = first.abs().nan_to_num(0.0, 0.0, 0.0).amax(1).cpu().tolist()
        pred = first.argmax(1).cpu().tolist()
        verdicts += [Verdict(int(c), int(p), float(m), float(s)) for c, p, m, s in zip(count.cpu().tolist(), pred, margin, scale)]
    return verdicts


def _success(count: int, draws: int) -> bool:
    return bool(count * 2 < draws) if draws > 1 else bool(count == 0)


def _sign_test(a: int, b: int) -> float:
    """P(X >= a) for X ~ Binomial(a + b, 1/2): chance of this many disagreements in one direction."""
    n = a + b
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, k) for k in range(a, n + 1)) / 2**n)


def rejudge(samples: pd.DataFrame, adv: dict[str, np.ndarray], clean: dict[int, np.ndarray], labels: dict[int, int],
            fresh: Callable[[str], Session], *, draws: int, randomized: bool, batch_size: int, seed: int,
            device: torch.device, parallel: int | None = None) -> Rejudged:
    """Re-judge every verdict in fresh workers; the records returned carry the fresh verdict."""
    start = time.perf_counter()
    parallel = parallel or os.cpu_count() or 1
    rng = np.random.default_rng([int(seed), 13])
    examples = examples_of(samples, adv, clean, labels)
    judges = assign(examples, rng)
    found: dict[tuple[int, str], Verdict] = {}
    seeds = [int(rng.integers(2**31)) for _ in judges]

    def run_judge(j: int) -> list[tuple[Example, Verdict]]:
        session = fresh(f"judge-{j}")
        try:
            return list(zip(judges[j], judge(session, judges[j], draws, batch_size, seeds[j], device), strict=True))
        finally:
            session.close()

    # Judges are independent processes: start and run as many at once as there are cores (the
    # harness threads only wait on pipes), each with its own seeds, so the result does not depend on it.
    todo = [j for j, lst in enumerate(judges) if lst]
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), parallel))) as pool:
        for pairs in pool.map(run_judge, todo):
            for ex, v in pairs:
                found[(ex.sample_id, ex.attack)] = v
    out = samples.copy()
    out["attack_correct_draws"] = out["correct_draws"]
    out["attack_success"] = out["success"]
    out["attack_pred"] = out["pred"]
    out["fresh_margin"] = float("nan")
    out["verdict_changed"] = False
    out["verdict_tie"] = False
    for i in out.index[out["ran"].astype(bool)]:
        key = (int(out.at[i, "sample_id"]), str(out.at[i, "attack"]))
        v = found.get(key)
        if v is None:  # a verdict without its example: never counted as robust
            raise RuntimeError(f"no stored example for sample {key[0]} attack {key[1]!r}; the run is incomplete")
        if bool(out.at[i, "violation"]):  # an invalid example is never a success; the evaluator already decided
            continue
        n_draws = int(out.at[i, "draws"])
        before = int(out.at[i, "correct_draws"])
        out.at[i, "correct_draws"] = v.correct
        out.at[i, "pred"] = v.pred
        out.at[i, "fresh_margin"] = v.margin
        if key[1] != "clean":
            out.at[i, "success"] = _success(v.correct, n_draws)
        ok_before = before * 2 > n_draws if n_draws > 1 else before == 1
        ok_now = v.correct * 2 > n_draws if n_draws > 1 else v.correct == 1
        if ok_before != ok_now:
            out.at[i, "verdict_changed"] = True
            out.at[i, "verdict_tie"] = bool(not randomized and abs(v.margin) <= TIE_RTOL * (1.0 + v.scale))
    changed = out[out["verdict_changed"]]
    real = changed[~changed["verdict_tie"]]
    toward_robust = real[real["attack_correct_draws"] * 2 > real["draws"]] if randomized else \
        real[real["attack_correct_draws"] == real["draws"]]
    facts = {
        "judges": len([j for j in judges if j]), "examples": len(examples), "records": int(out["ran"].astype(bool).sum()),
        "disagreements": int(len(real)), "numerical_ties": int(changed["verdict_tie"].sum()),
        "attack_correct_fresh_wrong": int(len(toward_robust)), "attack_wrong_fresh_correct": int(len(real) - len(toward_robust)),
        "disagreeing_ids": sorted({int(s) for s in real["sample_id"]})[:MAX_IDS],
        "per_attack": {str(k): int(v) for k, v in real.groupby("attack").size().items()},
        "randomized": bool(randomized), "wall_s": round(time.perf_counter() - start, 2),
    }
    return Rejudged(out, facts)


def stateful_check(verdicts: dict[str, Any], audit: dict[str, Any] | None, cfg: HealthConfig) -> Check:
    """Check 20 of the health report: does the model answer like a function of its input (and seed)?"""
    k, n = verdicts["disagreements"], verdicts["records"]
    evidence = {"verdicts": verdicts, "audit": audit or {"skipped": True}}
    if verdicts["randomized"]:
        a, b = verdicts["attack_correct_fresh_wrong"], verdicts["attack_wrong_fresh_correct"]
        p = _sign_test(a, b)
        evidence["sign_test_p"] = p
        status = "fail" if p < SIGN_TEST_P else ("warn" if p < 0.05 else "pass")
        text = (f"fresh workers re-judged {n} verdicts: {a} were right at attack time but wrong fresh, {b} the reverse "
                f"(one-sided sign test p={p:.2g})")
    else:
        status = "pass" if k == 0 else ("warn" if k <= cfg.fail_min else "fail")
        text = (f"fresh workers re-judged {n} verdicts: {k} disagree with the attack-time verdict"
                + (f" (plus {verdicts['numerical_ties']} floating-point ties)" if verdicts["numerical_ties"] else ""))
    if audit and audit.get("mismatched_requests"):
        status = "fail"
        text += f"; {audit['mismatched_requests']} of {audit['replayed_requests']} replayed requests answered differently"
    elif audit and audit.get("replayed_requests"):
        text += f"; {audit['replayed_requests']} replayed attack requests reproduced"
    text += "; the board uses the fresh verdicts"
    return Check(20, "stateful_model", status, text, evidence, masking=True)
