"""Why ZO-NGD at the reference MNIST settings fails on the shared standard LeNet-5: the evidence.

Run from the repository root (one process; black-box queries plus white-box gradients that only
this diagnosis takes, never the attack):

    OMP_NUM_THREADS=1 python bench/diag_zo_ngd.py --n 60

Images: the correctly classified among MNIST test images 500.. (disjoint from the images the
benchmark reports, 0..499). Four pieces of evidence, written to bench/results/zo_diagnosis.{json,md}:

1. The two-class solve is the reference's: our rank-2 (Woodbury, float64) solve against the
   reference's dense `np.linalg.inv(F + lam*I) @ g` on the estimates met along real trajectories.
2. What one ZO-NGD step is, per iteration: is p_y exactly 1.0 in float32 (underflow), how large
   the Fisher is against lam, how much the Fisher changes the step (|lam*n - g| / |g|: 0 means inert),
   the raw step's L-inf size against eps, the share of pixels the projection leaves at the box
   corner, and the cosine of the step actually taken with the true (white-box) hinge gradient.
   The same for ZO-SGD at its reference MNIST settings.
3. Success against eps for both at the reference settings (the reference code's MNIST command-line
   default is eps = 0.4; its module constant, and the issue's measurement, 0.2).
4. The same run with the old probability log (log p_y rounding to 0 above a margin of ~17) and the
   new one (log1p of minus the others' sum), paired, and ZO-NGD with eta lowered so that
   eta/lam equals ZO-SGD's step (the Fisher then acts on top of a ZO-SGD-sized step).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import attacks.zo_ngd as zo_ngd_module  # noqa: E402
from harness.core.attack import build_attack  # noqa: E402
from attacks.zo_ngd import damped_solve, hinge_loss, zo_gradient  # noqa: E402
from bench._common import load_shared_model, require_shared  # noqa: E402
from harness.core.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from harness.core.oracle import QueryOracle, log_scores  # noqa: E402
from harness.core.threat import ThreatModel  # noqa: E402

RESULTS = REPO / "bench" / "results"
REF_NGD = dict(name="zo_ngd", q=40, mu=1.0, eta=4e-4, lam=5e-6, fisher="two_class", iterations=100)
REF_SGD = dict(name="zo_sgd", q=40, mu=1.0, eta=0.01, iterations=100)
BUDGET = 1 + 100 * 41  # the initial query plus T = 100 iterations of q + 1 = 41


def old_log_scores(scores: torch.Tensor, output: str) -> torch.Tensor:
    """The log before the fix: log of float32 probabilities clamped at 1e-30."""
    if output == "logits":
        return torch.log_softmax(scores, dim=1)
    return scores.clamp_min(1e-30).log()


def load_images(start: int, n: int, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    data = np.load(require_shared("data", "mnist_test_first1000.npz"))
    x = torch.from_numpy(data["x"][start:]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(data["y"][start:]).long()
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    idx = ok.nonzero().flatten()[:n]
    return x[idx].contiguous(), y[idx], [start + int(i) for i in idx]


class Recorder:
    """Collects per-step statistics; the attack's step and the threat's projection feed it."""

    def __init__(self, model: torch.nn.Module, threat: ThreatModel, dense_checks: int) -> None:
        self.model, self.threat = model, threat
        self.rows: list[dict[str, np.ndarray]] = []
        self.dense: list[float] = []
        self.dense_checks = dense_checks
        self.pending: dict[str, torch.Tensor] | None = None

    @property
    def eps(self) -> float:
        return self.threat.eps

    @property
    def norm(self) -> str:
        return self.threat.norm

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.threat.project(x_adv, x)
        if self.pending is None:
            return out
        p, self.pending = self.pending, None
        a = x.shape[0]
        upd = p["upd"].view(a, -1)
        cur = x_adv.reshape(a, -1) + upd  # the point the step was taken from
        with torch.enable_grad():
            xc = cur.view_as(x).clone().requires_grad_(True)
            logits = self.model(xc)
            loss = hinge_loss(torch.log_softmax(logits, 1), p["y"]).sum()
            (grad,) = torch.autograd.grad(loss, xc)
        grad = grad.reshape(a, -1)
        step = out.reshape(a, -1) - cur
        delta = (out - x).reshape(a, -1)
        cos = lambda u, v: ((u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1)).clamp_min(1e-30))  # noqa: E731
        at_corner = (delta.abs() >= self.eps - 1e-6) | ((out.reshape(a, -1) <= 1e-6) | (out.reshape(a, -1) >= 1 - 1e-6)) & (delta != 0)
        row = {
            "p_y": p["p_y"], "py_is_one": p["py_is_one"], "fisher_over_lam": p["fisher_over_lam"],
            "fisher_change": p["fisher_change"], "raw_step_over_eps": upd.abs().amax(1) / self.eps,
            "corner_frac": at_corner.float().mean(1), "cos_step_true": cos(step, -grad),
            "cos_zo_true": cos(-p["g"], -grad),
        }
        self.rows.append({k: v.detach().double().cpu().numpy() for k, v in row.items()})
        return out

    def summary(self) -> dict[str, Any]:
        if not self.rows:
            return {}
        cat = {k: np.concatenate([r[k] for r in self.rows]) for k in self.rows[0]}
        near = cat["p_y"] < 0.9
        out: dict[str, Any] = {"steps": int(cat["p_y"].size), "near_boundary_steps": int(near.sum())}
        for k, v in cat.items():
            out[k] = {"median": float(np.nanmedian(v)), "near_median": float(np.nanmedian(v[near])) if near.any() else float("nan")}
        out["py_is_one"]["mean"] = float(cat["py_is_one"].mean())
        out["dense_solve_max_rel_diff"] = max(self.dense) if self.dense else float("nan")
        out["dense_checks"] = len(self.dense)
        return out


def instrumented(spec: dict[str, Any], rec: Recorder):
    """The attack of `spec`, with a step that reports to `rec` (the update itself is unchanged)."""
    attack = build_attack(dict(spec, budget=BUDGET))
    base_step = attack.step

    def step(logp0, logp, dirs, y, state, act, threat):
        upd = base_step(logp0, logp, dirs, y, state, act, threat)
        f0, fj = hinge_loss(logp0, y, attack.kappa), hinge_loss(logp, y, attack.kappa)
        g = zo_gradient(fj, f0, dirs, attack.mu)
        p_y = logp0.gather(1, y.view(-1, 1)).squeeze(1).exp()
        stats = {"upd": upd, "y": y, "p_y": p_y, "g": g, "py_is_one": (p_y == 1.0).float(),
                 "fisher_over_lam": torch.full_like(p_y, float("nan")), "fisher_change": torch.zeros_like(p_y)}
        if hasattr(attack, "fisher_factor"):
            h = attack.fisher_factor(logp0, logp, dirs, y)
            n = upd / attack.eta
            stats["fisher_over_lam"] = (h.double() ** 2).sum((1, 2)).float() / attack.lam
            stats["fisher_change"] = (attack.lam * n - g).norm(dim=1) / g.norm(dim=1).clamp_min(1e-30)
            for i in range(h.shape[0]):  # the reference's dense inverse, float64, on real estimates
                if len(rec.dense) >= rec.dense_checks or float(stats["fisher_over_lam"][i]) < 1.0:
                    continue
                hh = h[i].double().numpy()
                dense_f = hh @ hh.T
                ref = np.linalg.inv(dense_f + attack.lam * np.eye(dense_f.shape[0])) @ g[i].double().numpy()
                ours = damped_solve(h[i:i + 1], g[i:i + 1].double(), attack.lam)[0].numpy()
                rec.dense.append(float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)))
        rec.pending = stats
        return upd

    attack.step = step  # type: ignore[method-assign]
    return attack


def run(model, spec, x, y, threat, seed: int, rec: Recorder | None = None, batch: int = 30) -> dict[str, Any]:
    """Success and queries of one attack over the images, in batches, verified by our forward pass."""
    success, queries = [], []
    for b0 in range(0, x.shape[0], batch):
        xb, yb = x[b0:b0 + batch], y[b0:b0 + batch]
        attack = instrumented(spec, rec) if rec is not None else build_attack(dict(spec, budget=BUDGET))
        oracle = QueryOracle(model, n=xb.shape[0], budget=BUDGET, num_classes=10, input_shape=(1, 28, 28), max_rows=2048)
        res = attack.run(oracle, xb, yb, rec if rec is not None else threat, torch.Generator().manual_seed(seed + b0))
        assert not threat.violations(res.x_adv, xb).any()
        with torch.no_grad():
            success += (model(res.x_adv).argmax(1) != yb).tolist()
        queries += oracle.queries.tolist()
    s, q = np.array(success, bool), np.array(queries)
    return {"success": s.tolist(), "queries": q.tolist(), "rate": float(s.mean()),
            "median_q": float(np.median(q[s])) if s.any() else float("nan")}


def margins(model, x, y) -> dict[str, float]:
    with torch.no_grad():
        z = model(x)
        zy = z.gather(1, y.view(-1, 1)).squeeze(1)
        other = z.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
        p = torch.softmax(z, 1).gather(1, y.view(-1, 1)).squeeze(1)
    m = (zy - other).numpy()
    return {"median_margin": float(np.median(m)), "frac_margin_gt_17": float((m > 17).mean()),
            "frac_py_float32_one": float((p == 1.0).float().mean())}


def fmt(v: float, d: int = 3) -> str:
    return "-" if v != v else f"{v:.{d}g}"


def markdown(res: dict[str, Any]) -> str:
    lines = ["# ZO-NGD diagnosis: reference MNIST settings on the shared standard LeNet-5 (bench/diag_zo_ngd.py)", "",
             f"{res['n']} correctly classified MNIST test images from index 500 on (ids {res['ids'][0]}..{res['ids'][-1]}; "
             f"disjoint from the reported 0..499); budget {BUDGET:,} = 1 + 100 x 41 queries; seed {res['seed']}.", "",
             f"Clean logit margins: median {res['margins']['median_margin']:.1f}; margin > 17 on "
             f"{res['margins']['frac_margin_gt_17']:.0%} of the images; float32 softmax p_y exactly 1.0 on "
             f"{res['margins']['frac_py_float32_one']:.0%}.", "",
             "## Per-step statistics at eps = 0.2 (medians over all steps; in brackets: steps with p_y < 0.9)", "",
             "| attack | steps | p_y == 1.0 in float32 | Fisher energy / lam | Fisher change of the step | raw step L-inf / eps "
             "| pixels at the box corner after projection | cos(step taken, true descent direction) | cos(ZO estimate, true) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, st in res["steps"].items():
        def cell(key: str, d: int = 3) -> str:
            return f"{fmt(st[key]['median'], d)} ({fmt(st[key]['near_median'], d)})"
        lines.append(f"| {label} | {st['steps']} ({st['near_boundary_steps']}) | {st['py_is_one']['mean']:.0%} of steps "
                     f"| {cell('fisher_over_lam')} | {cell('fisher_change')} | {cell('raw_step_over_eps')} "
                     f"| {cell('corner_frac')} | {cell('cos_step_true')} | {cell('cos_zo_true')} |")
    ngd = res["steps"].get("zo_ngd (reference)", {})
    lines += ["", f"Two-class solve against the reference's dense inverse (float64) at {ngd.get('dense_checks', 0)} "
              f"steps where the Fisher exceeds lam: max relative difference {fmt(ngd.get('dense_solve_max_rel_diff', float('nan')))}.", "",
              "## Success against eps (reference settings, same images, paired)", "",
              "| attack | " + " | ".join(f"eps {e}" for e in res["eps_grid"]) + " |", "|---|" + "---|" * len(res["eps_grid"])]
    for label, by_eps in res["by_eps"].items():
        lines.append(f"| {label} | " + " | ".join(f"{by_eps[str(e)]['rate']:.0%} (median q {fmt(by_eps[str(e)]['median_q'], 4)})"
                                                   for e in res["eps_grid"]) + " |")
    lines += ["", "## Variants at eps = 0.2 (same images)", "", "| variant | success | median queries | same outcome as the reference run |",
              "|---|---|---|---|"]
    base = np.array(res["by_eps"]["zo_ngd (reference)"]["0.2"]["success"])
    for label, r in res["variants"].items():
        same = float((np.array(r["success"]) == base).mean())
        lines.append(f"| {label} | {r['rate']:.0%} | {fmt(r['median_q'], 4)} | {same:.0%} |")
    lines += ["", f"Command: `{res['command']}`; {res['machine']}; wall {res['wall_s']:.0f} s (measured under load).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", type=float, nargs="*", default=[0.2, 0.3, 0.4])
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_shared_model("mnist_lenet5", "weights_standard.pt")
    x, y, ids = load_images(500, args.n, model)
    threat = ThreatModel("Linf", 0.2)
    res: dict[str, Any] = {"n": len(ids), "ids": ids, "seed": args.seed, "eps_grid": args.eps, "margins": margins(model, x, y),
                           "steps": {}, "by_eps": {}, "variants": {}}
    for label, spec in (("zo_ngd (reference)", REF_NGD), ("zo_sgd (reference)", REF_SGD)):
        rec = Recorder(model, threat, dense_checks=20)
        run(model, spec, x, y, threat, args.seed, rec)
        res["steps"][label] = rec.summary()
        print(label, res["steps"][label], flush=True)
        res["by_eps"][label] = {}
        for eps in args.eps:
            r = run(model, spec, x, y, ThreatModel("Linf", eps), args.seed)
            res["by_eps"][label][str(eps)] = r
            print(label, eps, r["rate"], r["median_q"], flush=True)
    zo_ngd_module.log_scores = old_log_scores  # the attack module's reference to the log, before the fix
    try:
        res["variants"]["zo_ngd (reference), old log of probabilities"] = run(model, REF_NGD, x, y, threat, args.seed)
    finally:
        zo_ngd_module.log_scores = log_scores
    for eta in (4e-6, 5e-8):
        label = f"zo_ngd two_class lam 5e-6, eta {eta:g} (eta/lam = {eta / 5e-6:g})"
        rec = Recorder(model, threat, dense_checks=0)
        res["variants"][label] = run(model, dict(REF_NGD, eta=eta), x, y, threat, args.seed, rec)
        res["variants"][label]["fisher_change_median"] = rec.summary().get("fisher_change", {})
        print(label, res["variants"][label]["rate"], flush=True)
    res["wall_s"] = time.perf_counter() - start
    res["command"] = f"OMP_NUM_THREADS={threads} python bench/diag_zo_ngd.py " + " ".join(sys.argv[1:])
    res["machine"] = f"{platform.machine()} CPU, {threads} thread(s), torch {torch.__version__}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "zo_diagnosis.json", res)
    atomic_write_text(RESULTS / "zo_diagnosis.md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
