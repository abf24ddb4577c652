"""Attacks judged by the harness's verdict: a randomised model, and the reference AutoAttack on hard votes.

Part 1, randomised. A model switching at random, per sample, between three logistic classifiers
(scikit-learn digits). PGD-20 (CE) with one draw per step and with EOT over 10 draws, Linf 0.12,
the verdict bookkeeping of attacks/pgd.py (most fooled iterate, harness draws R = 10). Reported:
mean accuracy of the returned examples and of each run's own final iterate, both over 200 fresh
draws (the final iterate is recorded at the model), so an attack that returns a less fooled
example than its last iterate shows.

Part 2, hard votes. The reference code judges success from the logits it differentiates. On a hard-vote ensemble the
harness hands it one of three stand-ins (the evaluator uses `lifted`):

  proxy    the smoothed vote proxy itself: internal judgement by the proxy (the pre-fix setting;
           the wrapper still re-judges every component's output with the votes)
  votes    straight-through, forward value = the vote scores (piecewise constant)
  lifted   straight-through, the proxy's scores with the voted class lifted above the others where
           they disagree (argmax = the votes, loss values = the proxy's where they agree)

Model: 3 logistic-regression members, each trained on a random half of scikit-learn's digits
(real data, seconds on a CPU), hard votes, lowest-index tie-break. Every input the attack sends
through the members is recorded, so "lost" counts the images that some iterate fooled (hard votes)
but whose returned example the votes classify correctly. Paired differences are on the same
images (McNemar exact). Nothing is tuned.

    python bench/bench_verdicts.py                  # both parts (APGD-CE and APGD-T at eps 0.05 / 0.1 / 0.15)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import format_paired, machine, paired_difference, write_results  # noqa: E402
from attacks.autoattack import AutoAttackRef  # noqa: E402
from harness.core.access import CountingModule, PassCounter, make_model_access  # noqa: E402
from harness.core.ensemble import VoteStraightThrough, make_classifier  # noqa: E402
from harness.core.threat import ThreatModel  # noqa: E402
from harness.data.datasets import load_dataset  # noqa: E402
from attacks.pgd import PGD  # noqa: E402
from harness.core.access import ModelAccess  # noqa: E402
from harness.data.training import to_unit  # noqa: E402

VARIANTS = ("proxy", "votes", "lifted")


class Recorder(nn.Module):
    """Passes through `inner`; while `on`, keeps every input it sees (the attack's iterates)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.on, self.seen = inner, False, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            self.seen.append(x.detach().clone())
        return self.inner(x)


def logistic(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 100) -> nn.Module:
    """A logistic-regression classifier (Adam, full batch) on a random half of the training images."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[: x.shape[0] // 2]
    lin = nn.Linear(x[0].numel(), 10)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(x[idx].flatten(1)), y[idx]).backward()
        opt.step()
    return nn.Sequential(nn.Flatten(), lin).requires_grad_(False).eval()


class Switch(nn.Module):
    """Random switching, per sample, among `members` (global torch RNG, so seeds replay it)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([m(x) for m in self.members])
        pick = torch.randint(len(self.members), (x.shape[0],), device=x.device)
        return z[pick, torch.arange(x.shape[0], device=x.device)]


def accuracy_over_draws(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 200) -> float:
    """Mean over samples and `draws` fresh draws of correct classification."""
    torch.manual_seed(12345)
    with torch.no_grad():
        return float(torch.stack([(model(x).argmax(1) == y).float() for _ in range(draws)]).mean())


def randomised_part(members: list[nn.Module], x: torch.Tensor, y: torch.Tensor, seed: int) -> list[dict[str, Any]]:
    """PGD-20 with one draw vs EOT-10 on the switched model: returned vs own final iterate."""
    rec = Recorder(members[0])
    switch = Switch([rec, members[1], members[2]]).eval()
    threat = ThreatModel("Linf", 0.12)
    rows = [{"attack": "clean", "returned": accuracy_over_draws(switch, x, y), "final_iterate": None}]
    for eot in (1, 10):
        torch.manual_seed(seed)
        counter = PassCounter()
        access = ModelAccess(CountingModule(switch, counter), 10, counter, randomized=True, eot=eot, draws=10)
        rec.seen, rec.on = [], True
        try:
            out = PGD(steps=20, eot=eot).run(access, x, y, threat, torch.Generator().manual_seed(seed)).x_adv
        finally:
            rec.on = False
        final = rec.seen[-1]  # the last input PGD judges is its final iterate (confirm()'s last verdict)
        rows.append({"attack": f"pgd-20 eot={eot}", "returned": accuracy_over_draws(switch, out, y),
                     "final_iterate": accuracy_over_draws(switch, final, y),
                     "forward": counter.forward, "backward": counter.backward})
        print(rows[-1], flush=True)
    return rows


def run(variant: str, component: str, clf, rec: Recorder, x: torch.Tensor, y: torch.Tensor, eps: float,
        seed: int) -> dict[str, Any]:
    counter = PassCounter()
    access = make_model_access(clf, counter)
    if variant == "proxy":
        access.judged_model = None  # the reference then judges with the proxy it differentiates
    elif variant == "votes":
        access.judged_model = CountingModule(VoteStraightThrough(clf.module, value="votes"), counter)
    threat = ThreatModel("Linf", eps)
    rec.seen, rec.on = [], True
    try:
        out = AutoAttackRef(version="custom", attacks=[component]).run(access, x, y, threat,
                                                                      torch.Generator().manual_seed(seed))
    finally:
        rec.on = False
    rows = torch.cat(rec.seen)
    owner = torch.cdist(rows.flatten(1), x.flatten(1), p=float("inf")).argmin(1)
    with torch.no_grad():
        returned = clf.module(out.x_adv).argmax(1) != y
        wrong = clf.module(rows).argmax(1) != y[owner]
    any_iterate = torch.zeros(x.shape[0], dtype=torch.bool)
    any_iterate[owner[wrong]] = True
    return {"robust_mask": (~returned).tolist(), "broken": int(returned.sum()),
            "lost": int((any_iterate & ~returned).sum()), "backward": counter.backward, "forward": counter.forward}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eps", default="0.05,0.1,0.15")
    p.add_argument("--components", default="apgd-ce,apgd-t")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_dataset({"name": "digits"})
    xtr, ytr = to_unit(data.train_x, torch.device("cpu")), data.train_y
    x_all, y_all = to_unit(data.test_x, torch.device("cpu")), data.test_y
    members = [logistic(xtr, ytr, s) for s in range(3)]
    rec = Recorder(members[0])
    clf = make_classifier([rec, members[1], members[2]], "voting", 10, (1, 8, 8))
    with torch.no_grad():
        ok = clf.module(x_all).argmax(1) == y_all
    x, y = x_all[ok], y_all[ok]
    random_rows = randomised_part(members, x_all, y_all, args.seed)
    rows = []
    for comp in args.components.split(","):
        for eps in (float(e) for e in args.eps.split(",")):
            res = {v: run(v, comp, clf, rec, x, y, eps, args.seed) for v in VARIANTS}
            row = {"component": comp, "eps": eps, "n": int(x.shape[0]), **res,
                   "lifted_minus_proxy": paired_difference(res["lifted"]["robust_mask"], res["proxy"]["robust_mask"]),
                   "lifted_minus_votes": paired_difference(res["lifted"]["robust_mask"], res["votes"]["robust_mask"])}
            rows.append(row)
            print(comp, eps, {v: (r["broken"], r["lost"]) for v, r in res.items()}, flush=True)
    part1 = ["| attack | mean accuracy of the returned examples | of its own final iterate | forward / backward passes |",
             "|---|---|---|---|"]
    for r in random_rows:
        final = "-" if r["final_iterate"] is None else f"{r['final_iterate']:.3f}"
        passes = f"{r['forward']} / {r['backward']}" if "forward" in r else "-"
        part1.append(f"| {r['attack']} | {r['returned']:.3f} | {final} | {passes} |")
    head = ["component", "eps", "n", *[f"{v}: broken / lost" for v in VARIANTS], "lifted - proxy (robust acc)",
            "lifted - votes (robust acc)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["component"], f"{r['eps']:g}", str(r["n"])] + [f"{r[v]['broken']} / {r[v]['lost']}" for v in VARIANTS]
        cells += [format_paired(r["lifted_minus_proxy"]), format_paired(r["lifted_minus_votes"])]
        lines.append("| " + " | ".join(cells) + " |")
    command = "python bench/bench_verdicts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    wall = time.perf_counter() - start
    payload = {"command": command.strip(), "args": vars(args), "machine": machine(), "wall_s": round(wall, 1),
               "randomised": random_rows, "rows": rows}
    text = ("# Attacks judged by the harness's verdict\n\n"
            f"Command: `{command.strip()}` ({wall:.0f} s, {payload['machine']['platform']}, 1 thread, a shared machine). "
            "Nothing is tuned; seed 0.\n\n"
            "## 1. A randomised model: EOT-PGD against single-draw PGD\n\n"
            "Per-sample random switching among 3 logistic classifiers on scikit-learn digits (each trained on a random "
            f"half of the training split); all {x_all.shape[0]} test images; Linf 0.12; accuracy = mean over samples and "
            "200 fresh draws.\n\n" + "\n".join(part1) + "\n\n"
            "## 2. The reference AutoAttack on a hard-vote ensemble: which stand-in judges\n\n"
            "The same 3 logistic members as a hard-vote ensemble, lowest-index tie-break; the "
            f"{rows[0]['n'] if rows else 0} clean-correct test images; reference components "
            "with their default 100 iterations. proxy = the smoothed vote proxy (the reference judges by it; the "
            "wrapper re-judges each component's output by the votes); votes = straight-through, forward value = the vote "
            "scores; lifted = straight-through, the proxy's scores with the voted class lifted above the others where "
            "they disagree (what the evaluator hands). broken = images whose returned example the votes misclassify; "
            "lost = images that some input the attack sent through the model fooled (hard votes) but whose returned "
            "example does not. Differences: robust accuracy, paired on the same images (McNemar exact 95 % interval, "
            "discordant counts, p).\n\n" + "\n".join(lines) + "\n")
    write_results("verdicts", payload, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
