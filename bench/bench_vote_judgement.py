"""How the reference AutoAttack judges a hard-vote ensemble: proxy, literal votes, or lifted proxy.

The reference code judges success from the logits it differentiates. On a hard-vote ensemble the
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

    python bench/bench_vote_judgement.py                  # APGD-CE and APGD-T, eps 0.05 / 0.1 / 0.15
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
    rows = []
    for comp in args.components.split(","):
        for eps in (float(e) for e in args.eps.split(",")):
            res = {v: run(v, comp, clf, rec, x, y, eps, args.seed) for v in VARIANTS}
            row = {"component": comp, "eps": eps, "n": int(x.shape[0]), **res,
                   "lifted_minus_proxy": paired_difference(res["lifted"]["robust_mask"], res["proxy"]["robust_mask"]),
                   "lifted_minus_votes": paired_difference(res["lifted"]["robust_mask"], res["votes"]["robust_mask"])}
            rows.append(row)
            print(comp, eps, {v: (r["broken"], r["lost"]) for v, r in res.items()}, flush=True)
    head = ["component", "eps", "n", *[f"{v}: broken / lost" for v in VARIANTS], "lifted - proxy (robust acc)",
            "lifted - votes (robust acc)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["component"], f"{r['eps']:g}", str(r["n"])] + [f"{r[v]['broken']} / {r[v]['lost']}" for v in VARIANTS]
        cells += [format_paired(r["lifted_minus_proxy"]), format_paired(r["lifted_minus_votes"])]
        lines.append("| " + " | ".join(cells) + " |")
    command = "python bench/bench_vote_judgement.py " + " ".join(argv if argv is not None else sys.argv[1:])
    wall = time.perf_counter() - start
    payload = {"command": command.strip(), "args": vars(args), "machine": machine(), "wall_s": round(wall, 1), "rows": rows}
    text = ("# Reference AutoAttack on a hard-vote ensemble: which stand-in judges\n\n"
            f"Command: `{command.strip()}` ({wall:.0f} s, {payload['machine']['platform']}, 1 thread, a shared machine).\n\n"
            "3 logistic members on scikit-learn digits (each on a random half of the training split), hard votes, "
            f"lowest-index tie-break; the {rows[0]['n'] if rows else 0} clean-correct test images; reference components "
            "with their default 100 iterations, seed 0. broken = images whose returned example the votes misclassify; "
            "lost = images that some input the attack sent through the model fooled (hard votes) but whose returned "
            "example does not. Differences: robust accuracy, paired on the same images (McNemar exact 95 % interval, "
            "discordant counts, p).\n\n" + "\n".join(lines) + "\n")
    write_results("vote_judgement", payload, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
