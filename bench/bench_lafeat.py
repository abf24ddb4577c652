"""LAFEAT vs APGD-CE vs AutoAttack (standard): paired on the same images, with the head's cost.

Models (real pretrained, from ../shared/models) on the test images of ../shared/data:
  resnet2b-2  cifar10_resnet2b, L-inf 2/255      resnet2b-8  cifar10_resnet2b, L-inf 8/255
  lenet5      mnist_lenet5 (PGD-trained weights), L-inf 0.3
Methods: LAFEAT untargeted stage only (lafeat-u); LAFEAT with the multi-targeted stage (lafeat-ut);
optionally lafeat-ut-evaluated (the same, head trained transductively on the reported images, the
reference's practice, for comparison); APGD-CE alone and AutoAttack standard, both from the
reference implementation (pyautoattack), seeded. Every method attacks the SAME images (the first
--n of the file) and every adversarial example is re-verified here (ball, box, own forward pass).

The LAFEAT head is trained on images disjoint from the reported ones: the file's tail (images n..
end; these npz files have no train split), with the model's own predictions as labels. Its
training passes are reported beside the attack's (`head fwd/img`: the head's passes spread over the
n reported images) and included in the totals. No parameter is tuned on the reported images: the
LAFEAT configs below are fixed by a cost budget (arithmetic: at most ~380 gradient evaluations per
surviving image, about 20 % of AutoAttack's), not by accuracy on any image.

Comparisons are paired: LAFEAT's robust accuracy minus AutoAttack's on the same images, with
McNemar's exact interval and p-value (bench/_common.paired_difference).

    python bench/bench_lafeat.py --models resnet2b-2 --n 500     # report 0..499, head on 500..999
    python bench/bench_lafeat.py --models lenet5 --n 500 --methods lafeat-u,lafeat-ut
Results go to bench/results/lafeat.json and .md (entries are merged by (model, method); a pairing
is shown only between entries measured on the same images).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import attacks  # noqa: E402,F401  (registers lafeat)
from harness.core.attack import PrepareContext, build_attack  # noqa: E402
from harness.core.access import CountingModule, PassCounter  # noqa: E402
from harness.core.classifier import Classifier  # noqa: E402
from harness.core.features import make_feature_access  # noqa: E402
from harness.core.hashing import module_hash  # noqa: E402
from harness.core.threat import ThreatModel  # noqa: E402
from harness.data.training import to_unit  # noqa: E402
from harness.core.atomic import strict_dumps  # noqa: E402  (strict JSON: null, never NaN)
from _common import SHARED, format_paired, paired_difference  # noqa: E402

RESULTS = ROOT / "bench" / "results"

SETTINGS: dict[str, dict[str, Any]] = {
    "resnet2b-2": {"model": "cifar10_resnet2b", "weights": None, "data": "cifar10_test_first1000.npz", "eps": 2 / 255},
    "resnet2b-8": {"model": "cifar10_resnet2b", "weights": None, "data": "cifar10_test_first1000.npz", "eps": 8 / 255},
    "lenet5": {"model": "mnist_lenet5", "weights": "weights_pgd.pt", "data": "mnist_test_first1000.npz", "eps": 0.3},
}

# Budgeted LAFEAT configs (see docs/lafeat.md: chosen to stay within 25 % of AutoAttack's
# gradient evaluations on samples that survive everything).
LAFEAT_BASE: dict[str, Any] = {"name": "lafeat", "head": "conv", "head_epochs": 100, "head_augment": "auto"}
LAFEAT_U: dict[str, Any] = {"iterations": 20, "targets": 0}
LAFEAT_UT: dict[str, Any] = {"iterations": 20, "targets": 9, "targeted_betas": [0.4], "targeted_iterations": 20}


def _import(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"bench_model_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def load_setting(name: str) -> tuple[Classifier, torch.Tensor, torch.Tensor, float]:
    s = SETTINGS[name]
    folder = SHARED / "models" / s["model"]
    weights = str(folder / s["weights"]) if s["weights"] else None
    model = _import(folder / "model.py").load(weights).eval()
    with np.load(SHARED / "data" / s["data"]) as f:
        x, y = f["x"], f["y"]
    x_t = torch.from_numpy(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)).contiguous()
    return Classifier(model, 10, tuple(x_t.shape[1:])), x_t, torch.from_numpy(y.astype(np.int64)), float(s["eps"])


def verify(model: torch.nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
           threat: ThreatModel) -> torch.Tensor:
    """Per-sample robust flag by our own forward pass; candidates outside the threat model fail."""
    with torch.no_grad():
        correct = model(x_adv).argmax(1) == y
    return correct | threat.violations(x_adv, x)


def run_lafeat(clf: Classifier, x_u8: torch.Tensor, y: torch.Tensor, n: int, threat: ThreatModel,
               spec: dict[str, Any], seed: int, cache: Path, head_data: str = "holdout") -> dict[str, Any]:
    """LAFEAT on images 0..n-1; its head on the file's tail n..end (or, transductively, on 0..n-1)."""
    total = int(x_u8.shape[0])
    head = {"head_data": head_data, **({"head_holdout": total - n} if head_data == "holdout" else {})}
    attack = build_attack({**LAFEAT_BASE, **spec, **head})
    ctx = PrepareContext(classifier=clf, train_x=None, train_y=None, eval_x=x_u8[:n], cache_dir=cache,
                         device=torch.device("cpu"), seed=seed, model_key=module_hash(clf.module),
                         test_x=x_u8, eval_range=(0, n))
    t0 = time.perf_counter()
    facts = attack.prepare(ctx)
    head_s = time.perf_counter() - t0
    x = to_unit(x_u8[:n], torch.device("cpu"))
    counter = PassCounter()
    access = make_feature_access(clf, attack.layer, counter)
    with torch.no_grad():  # clean pass, counted like every method's
        clean = access.logits(x).argmax(1) == y[:n]
    idx = clean.nonzero().flatten()
    t0 = time.perf_counter()
    result = attack.run(access, x[idx], y[:n][idx], threat, torch.Generator().manual_seed(seed))
    wall = time.perf_counter() - t0
    robust = torch.zeros(n, dtype=torch.bool)
    robust[idx] = verify(clf.module, result.x_adv, x[idx], y[:n][idx], threat)
    return {
        "clean": float(clean.float().mean()), "robust": float(robust.float().mean()),
        "forward": counter.forward, "backward": counter.backward, "wall_s": wall,
        "prepare_forward": int(facts["prepare_forward"]), "prepare_backward": int(facts["prepare_backward"]),
        "robust_mask": robust.tolist(), "stages": result.extras["stages"],
        "head": {k: facts[k] for k in ("lafeat_layer", "head_kind", "head_data", "head_data_mode", "head_transductive",
                                       "head_data_n", "head_augment", "head_epochs", "head_agreement",
                                       "head_agreement_train", "head_train_forward", "head_cached")},
        "head_wall_s": head_s, "config": {**LAFEAT_BASE, **spec, **head},
    }


def run_autoattack(clf: Classifier, x_u8: torch.Tensor, y: torch.Tensor, n: int, threat: ThreatModel,
                   version: str, seed: int) -> dict[str, Any]:
    from pyautoattack import AutoAttack

    counter = PassCounter()
    model = CountingModule(clf.module, counter).eval()
    attacks_ = ["apgd-ce"] if version == "custom" else None
    aa = AutoAttack(model, norm=threat.norm, eps=threat.eps, version=version, seed=seed, attacks=attacks_, device="cpu")
    aa.logger.setLevel(logging.WARNING)
    if version == "custom":
        aa.apgd.n_restarts = 1
    x = to_unit(x_u8[:n], torch.device("cpu"))
    with torch.no_grad():
        clean = clf.module(x).argmax(1) == y[:n]
    t0 = time.perf_counter()
    x_adv = aa.run_standard_evaluation(x, y[:n], batch_size=500)
    wall = time.perf_counter() - t0
    x_adv = x_adv[0] if isinstance(x_adv, tuple) else x_adv
    robust = clean & verify(clf.module, x_adv, x, y[:n], threat)
    return {"clean": float(clean.float().mean()), "robust": float(robust.float().mean()),
            "forward": counter.forward, "backward": counter.backward, "wall_s": wall,
            "prepare_forward": 0, "prepare_backward": 0,
            "robust_mask": robust.tolist(), "config": {"version": version, "attacks": attacks_, "seed": seed}}


METHODS = ("lafeat-u", "lafeat-ut", "apgd-ce", "autoattack")
OPTIONAL = ("lafeat-ut-evaluated",)


def bench_setting(name: str, n: int, methods: list[str], seed: int, cache: Path) -> dict[str, Any]:
    clf, x_u8, y, eps = load_setting(name)
    if not 0 < n < x_u8.shape[0]:
        sys.exit(f"--n {n}: the head needs images outside the reported ones; use 0 < n < {x_u8.shape[0]}")
    threat = ThreatModel("Linf", eps)
    out: dict[str, Any] = {}
    for method in methods:
        print(f"[{name}] {method} ...", flush=True)
        if method == "lafeat-u":
            r = run_lafeat(clf, x_u8, y, n, threat, LAFEAT_U, seed, cache)
        elif method == "lafeat-ut":
            r = run_lafeat(clf, x_u8, y, n, threat, LAFEAT_UT, seed, cache)
        elif method == "lafeat-ut-evaluated":
            r = run_lafeat(clf, x_u8, y, n, threat, LAFEAT_UT, seed, cache, head_data="evaluated")
        elif method == "apgd-ce":
            r = run_autoattack(clf, x_u8, y, n, threat, "custom", seed)
        else:
            r = run_autoattack(clf, x_u8, y, n, threat, "standard", seed)
        r["n"] = n
        r["images"] = [0, n]
        r["eps"] = eps
        print(f"   robust {r['robust']:.3f}  fwd {r['forward']}  bwd {r['backward']}  head fwd {r['prepare_forward']}  "
              f"{r['wall_s']:.0f}s", flush=True)
        out[method] = r
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table; ratios and paired differences are against AutoAttack on the same images."""
    lines = ["| model | eps | method | images | clean | robust acc | fwd/img | head fwd/img | grad evals (bwd)/img | "
             "bwd vs AA | robust - AA, paired (95% CI; discordant; McNemar p) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        aa = res.get("autoattack")
        for method in (*METHODS, *OPTIONAL):
            r = res.get(method)
            if r is None:
                continue
            same = aa is not None and aa.get("images") is not None and aa.get("images") == r.get("images")
            fwd, bwd, head = r["forward"] / r["n"], r["backward"] / r["n"], r.get("prepare_forward", 0) / r["n"]
            ratio = f"{bwd / (aa['backward'] / aa['n']):.1%}" if same else "-"
            diff = format_paired(paired_difference(r["robust_mask"], aa["robust_mask"])) if same and method != "autoattack" else "-"
            lo, hi = r.get("images", [0, r["n"]])
            lines.append(f"| {name} | {r['eps']:.4g} | {method} | {lo}..{hi - 1} | {r['clean']:.1%} | {r['robust']:.1%} | "
                         f"{fwd:.0f} | {head:.0f} | {bwd:.0f} | {ratio} | {diff} | {r['wall_s']:.0f} |")
    lines += ["", "| model | method | LAFEAT layer | head | head data | augment | epochs | agreement (reported images) | "
              "agreement (head's own images) | head training fwd passes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for method in ("lafeat-u", "lafeat-ut", "lafeat-ut-evaluated"):
            r = res.get(method)
            if r:
                h = r["head"]
                lines.append(f"| {name} | {method} | {h['lafeat_layer']} | {h['head_kind']} | {h['head_data']} | "
                             f"{h['head_augment']} | {h['head_epochs']} | {h['head_agreement']:.1%} | "
                             f"{h['head_agreement_train']:.1%} | {h['head_train_forward']} |")
    return "\n".join(lines)


def findings(results: dict[str, dict[str, Any]]) -> str:
    """Target check per model, computed from the stored entries (never typed in): robust accuracy
    <= AutoAttack's with <= 25 % of its gradient evaluations, judged by the paired interval."""
    out = ["", "Against the target (robust accuracy <= AutoAttack's at <= 25 % of its gradient evaluations, "
           "paired on the same images):", ""]
    for name, res in results.items():
        aa = res.get("autoattack")
        if aa is None:
            continue
        for method in ("lafeat-u", "lafeat-ut"):
            r = res.get(method)
            if r is None or r.get("images") != aa.get("images"):
                continue
            d = paired_difference(r["robust_mask"], aa["robust_mask"])
            share = (r["backward"] / r["n"]) / (aa["backward"] / aa["n"])
            total_fwd = (r["forward"] + r.get("prepare_forward", 0)) / (aa["forward"])
            verdict = ("met" if d["diff"] <= 0 and share <= 0.25 else
                       "missed (not significant)" if d["p_value"] >= 0.05 and share <= 0.25 else "missed")
            out.append(f"- {name} {method}: {verdict}: {format_paired(d)} at {share:.1%} of AutoAttack's gradient "
                       f"evaluations; forward passes including the head's training: {total_fwd:.1%} of AutoAttack's.")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="report on images 0..n-1 (every method); the head trains on n..end")
    p.add_argument("--models", default=",".join(SETTINGS), help="comma list of " + ", ".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join((*METHODS, *OPTIONAL)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(ROOT / "arena-work" / "cache"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="drop the stored entries instead of merging into them")
    p.add_argument("--render-only", action="store_true", help="rewrite lafeat.md from lafeat.json, run nothing")
    args = p.parse_args(argv)
    if args.render_only:
        stored = json.loads((RESULTS / "lafeat.json").read_text())
        drop_old_protocol(stored)
        (RESULTS / "lafeat.json").write_text(strict_dumps(stored, indent=1) + "\n")
        _render(stored)
        print(table(stored["results"]))
        return 0
    if not (SHARED / "models").is_dir():
        print(f"skipped: {SHARED} (pretrained models and test images) is absent")
        return 0
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "lafeat.json"
    load_start = os.getloadavg()
    start = time.perf_counter()
    fresh = {name: bench_setting(name, args.n, args.methods.split(","), args.seed, Path(args.cache))
             for name in args.models.split(",")}
    from filelock import FileLock

    Path(args.cache).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(args.cache) / "bench_lafeat.lock")):  # merge into what other (partial) runs stored meanwhile
        stored = json.loads(json_path.read_text()) if json_path.is_file() and not args.fresh else {"results": {}, "runs": []}
        for name, res in fresh.items():
            stored["results"].setdefault(name, {}).update(res)
        drop_old_protocol(stored)
        _store(stored, json_path, args, argv, load_start, os.getloadavg(), time.perf_counter() - start)
    md = table(stored["results"])
    print(md)
    return 0


def drop_old_protocol(stored: dict[str, Any]) -> None:
    """Entries without `images` were measured before this bench paired its methods (head on the
    evaluated images, AutoAttack on fewer images): they cannot be paired with anything, so they go."""
    for name in list(stored["results"]):
        old = [m for m, r in stored["results"][name].items() if r.get("images") is None]
        for m in old:
            print(f"dropping {name}/{m}: measured under the earlier, unpaired protocol (no image range recorded)")
            del stored["results"][name][m]
        if not stored["results"][name]:
            del stored["results"][name]


def _store(stored: dict[str, Any], json_path: Path, args: argparse.Namespace, argv: list[str] | None,
           load_start: tuple[float, ...], load_end: tuple[float, ...], wall: float) -> None:
    stored["runs"].append({"command": "python bench/bench_lafeat.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                           "threads": args.threads, "platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_avg_start": [round(v, 2) for v in load_start],
                           "load_avg_end": [round(v, 2) for v in load_end], "wall_s": round(wall, 1)})
    json_path.write_text(strict_dumps(stored, indent=1) + "\n")
    _render(stored)


NOTES = """
Columns: passes are image-passes through the model (a batch of B counts B), per reported image
(clean pass included). "head fwd/img" is the LAFEAT head's training (forward passes through the
frozen model, no gradient reaches it) spread over the reported images; it is part of LAFEAT's
cost and is not in "fwd/img". "bwd vs AA" divides per-image gradient evaluations by AutoAttack's
on the same images; "robust - AA" is LAFEAT's robust accuracy minus AutoAttack's, paired on the
same images (McNemar exact 95 % interval; "b vs c" = images robust under the method only vs
under AutoAttack only). LAFEAT configs: lafeat-u = 10 betas x 20 iterations, untargeted;
lafeat-ut = the same plus the multi-targeted stage (9 targets x 20 iterations at beta=0.4);
lafeat-ut-evaluated = lafeat-ut with its head trained on the reported images themselves
(transductive, for comparison only). The head of lafeat-u/-ut trains on the file's images after
the reported ones. Nothing was tuned on the reported images. Wall seconds were measured on a
shared machine (load averages per run below): indicative only.
"""


def _render(stored: dict[str, Any]) -> None:
    runs = stored["runs"]
    (RESULTS / "lafeat.md").write_text(
        "# LAFEAT vs APGD-CE vs AutoAttack (standard), paired on the same images\n\n" + table(stored["results"]) + "\n"
        + findings(stored["results"]) + NOTES
        + "\nCommands (one model at a time, OMP_NUM_THREADS=1; entries merge by model and method):\n\n"
        + "\n".join(f"- `{r['command']}` ({r['date']}, {r.get('platform', '?')}, {r.get('cpus', '?')} CPUs, "
                     f"{r['threads']} thread(s), load average {r.get('load_avg_start', '?')} -> {r.get('load_avg_end', '?')}, "
                     f"{r.get('wall_s', '?')} s)" for r in runs) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
