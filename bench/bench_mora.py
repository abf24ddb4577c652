"""MORA vs APGD-CE vs AutoAttack (standard) on trained ensembles, in every aggregation mode.

Ensembles of 3 small CNNs (the `model=small_cnn` architecture) trained on mnist5k (real MNIST
digits, CPU-sized) with the repository's own recipes (conf/defense/{ensemble,adp,gal,dverge,trs}.yaml),
cached under --work-dir/cache/checkpoints exactly as `arena eval` caches them. Then, in one process,
for each ensemble and each mode (softmax, voting, logits), on the first N test images:

  MORA          the default schedule (conf/attack/mora.yaml: 5 untargeted stages + 9 targets, 100 its)
  MORA-quirks   the same with reference_quirks=true (lafeat/mora's code as is)
  MORA-1stage   (optional, --methods) the first untargeted stage only (s = 0.5, 100 iterations)
  APGD-CE       reference AutoAttack component (pyautoattack), 100 iterations, on the ensemble output
  AutoAttack    reference AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5,000): the APGD-CE
                run above is its first component, the others run on its survivors (the cascade)

Gradient attacks on a voting ensemble differentiate the sharpened-softmax proxy; every method's
success is judged here by the true rule (hard votes for voting), inside the ball and the box.
Cost: backward image-passes through the ensemble (gradient evaluations) and forward passes, counted
by harness.core.access wrappers; MORA's member passes are counted as ensemble-equivalent passes (all M
members at once = 1), the unit APGD and AutoAttack are counted in.

    python bench/bench_mora.py                    # n=60, eps=0.2, every ensemble, every mode
    python bench/bench_mora.py --n 30 --defenses ensemble,adp --modes softmax
    python bench/bench_mora.py --train-only       # train (and cache) the ensembles only
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import attacks  # noqa: E402,F401  (registry)
import defenses  # noqa: E402,F401
from _common import machine, write_results  # noqa: E402
from attacks.autoattack import AutoAttackRef  # noqa: E402
from attacks.mora import MORA  # noqa: E402
from harness.core.defense import BuildContext, build_defense  # noqa: E402
from harness.core.access import CountingModule, ModelAccess, PassCounter  # noqa: E402
from harness.core.classifier import Classifier  # noqa: E402
from harness.data.datasets import load_dataset  # noqa: E402
from harness.core.ensemble import make_classifier, make_ensemble_access  # noqa: E402
from harness.core.threat import ThreatModel  # noqa: E402
from harness.data.training import to_unit  # noqa: E402

DEFENSES = ("ensemble", "adp", "gal", "dverge", "trs")
MODES = ("softmax", "voting", "logits")
METHODS = ("mora", "mora-quirks", "apgd-ce", "autoattack")  # also available: mora-1stage


def conf(group: str, name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "conf" / group / f"{name}.yaml").read_text())


def train_ensemble(name: str, data: Any, work_dir: Path, seed: int) -> tuple[Classifier, float]:
    """The defense built from its repository config (trained once, then cached); its build time."""
    start = time.perf_counter()
    ctx = BuildContext(data=data, model_cfg=conf("model", "small_cnn"), device=torch.device("cpu"), seed=seed,
                       cache_dir=work_dir / "cache", progress=False)
    clf = build_defense(conf("defense", name)).build(ctx)
    return clf, time.perf_counter() - start


def run_method(method: str, clf: Classifier, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
               seed: int) -> dict[str, Any]:
    """Attack the clean-correct inputs x; judge by clf.module; count passes."""
    counter = PassCounter()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    if method.startswith("mora"):
        spec = {k: v for k, v in conf("attack", "mora").items() if k != "name"}
        spec["reference_quirks"] = method == "mora-quirks"
        if method == "mora-1stage":  # the first untargeted stage only (s = 0.5): the cheap end of the trade-off
            spec.update(scales=[0.5], targeted=False)
        out = MORA(**spec).run(make_ensemble_access(clf, counter), x, y, threat, gen)
    else:
        access = ModelAccess(CountingModule(clf.differentiable, counter), clf.num_classes, counter)
        components = ["apgd-ce"] if method == "apgd-ce" else ["apgd-t", "fab-t", "square"]
        out = AutoAttackRef(version="custom", attacks=components).run(access, x, y, threat, gen)
    wall = time.perf_counter() - start
    x_adv = out.x_adv.detach()
    bad = threat.violations(x_adv, x)
    with torch.no_grad():
        fooled = (clf.module(x_adv).argmax(1) != y) & ~bad  # the true rule; hard votes for voting
    return {"fooled": fooled, "violations": int(bad.sum()), "backward": counter.backward,
            "forward": counter.forward, "wall_s": wall}


def autoattack_standard(first: dict[str, Any], clf: Classifier, x: torch.Tensor, y: torch.Tensor,
                        threat: ThreatModel, seed: int) -> dict[str, Any]:
    """AutoAttack standard = its APGD-CE run (reused) + APGD-T, FAB-T, Square on the survivors.

    The reference cascade runs exactly these components in this order on the still-robust points,
    each seeded alike, with the standard version's settings (1 restart, 9 targets, 5,000 queries).
    """
    alive = (~first["fooled"]).nonzero().flatten()
    out = {k: first[k] for k in ("backward", "forward", "wall_s", "violations")}
    fooled = first["fooled"].clone()
    if alive.numel():
        rest = run_method("aa-rest", clf, x[alive], y[alive], threat, seed)
        fooled[alive] = rest["fooled"]
        for k in ("backward", "forward", "wall_s", "violations"):
            out[k] += rest[k]
    return {**out, "fooled": fooled}


def bench(defense_names: list[str], modes: list[str], methods: list[str], n: int, eps: float, seed: int,
          work_dir: Path) -> dict[str, Any]:
    data = load_dataset({"name": "mnist5k"})
    x_all = to_unit(data.test_x[:n], torch.device("cpu"))
    y_all = data.test_y[:n]
    threat = ThreatModel("Linf", eps)
    rows: list[dict[str, Any]] = []
    training: dict[str, Any] = {}
    for name in defense_names:
        trained, build_s = train_ensemble(name, data, work_dir, seed)
        training[name] = {"build_s": round(build_s, 1), "cache_hit": trained.info.get("cache_hit"),
                          "train_wall_s": trained.info.get("train", {}).get("wall_s")}
        print(f"[{name}] built in {build_s:.1f}s (cache hit: {trained.info.get('cache_hit')})", flush=True)
        for mode in modes:
            clf = make_classifier(trained.module, mode, data.num_classes, data.input_shape)
            with torch.no_grad():
                ok = clf.module(x_all).argmax(1) == y_all
            x, y = x_all[ok], y_all[ok]
            row: dict[str, Any] = {"defense": name, "mode": mode, "n": n, "eps": eps, "clean_acc": float(ok.float().mean())}
            robust_any = torch.ones(x.shape[0], dtype=torch.bool)
            done: dict[str, dict[str, Any]] = {}
            for method in methods:
                if method == "autoattack":
                    first = done.get("apgd-ce") or run_method("apgd-ce", clf, x, y, threat, seed)
                    r = autoattack_standard(first, clf, x, y, threat, seed)
                else:
                    r = run_method(method, clf, x, y, threat, seed)
                done[method] = r
                robust_any &= ~r["fooled"]
                m = max(x.shape[0], 1)
                row[method] = {"robust_acc": float((~r["fooled"]).sum()) / n,
                               "backward_per_sample": r["backward"] / m, "forward_per_sample": r["forward"] / m,
                               "wall_s": round(r["wall_s"], 2), "violations": r["violations"]}
                print(f"  {name:8s} {mode:7s} {method:11s} robust {row[method]['robust_acc']:.3f}  "
                      f"grads/sample {r['backward'] / m:8.1f}  fwd/sample {r['forward'] / m:8.1f}  "
                      f"{r['wall_s']:6.1f}s", flush=True)
            row["worst_case_robust_acc"] = float(robust_any.sum()) / n
            if "mora" in row and "autoattack" in row:
                row["aa_over_mora_grads"] = row["autoattack"]["backward_per_sample"] / max(row["mora"]["backward_per_sample"], 1e-9)
                row["mora_le_aa"] = row["mora"]["robust_acc"] <= row["autoattack"]["robust_acc"]
            rows.append(row)
    return {"rows": rows, "training": training}


def table(rows: list[dict[str, Any]], methods: list[str]) -> str:
    head = ["ensemble", "mode", "clean"]
    for m in methods:
        head += [f"{m} RA", f"{m} grads"]
    head += ["worst RA", "AA/MORA grads", "MORA <= AA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["defense"], r["mode"], f"{r['clean_acc']:.1%}"]
        for m in methods:
            cells += [f"{r[m]['robust_acc']:.1%}", f"{r[m]['backward_per_sample']:.1f}"]
        ratio = r.get("aa_over_mora_grads")
        cells += [f"{r['worst_case_robust_acc']:.1%}", f"{ratio:.1f}x" if ratio is not None else "-",
                  {True: "yes", False: "**no**"}.get(r.get("mora_le_aa"), "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=60, help="first N mnist5k test images (clean-correct ones are attacked)")
    p.add_argument("--eps", type=float, default=0.2, help="L-inf radius")
    p.add_argument("--defenses", default=",".join(DEFENSES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=str(ROOT / "arena-work"), help="trained ensembles are cached under WORK_DIR/cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--name", default="mora", help="results file stem under bench/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [d for d in args.defenses.split(",") if d]
    modes = [m for m in args.modes.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    work_dir = Path(args.work_dir)
    if args.train_only:
        data = load_dataset({"name": "mnist5k"})
        for name in names:
            clf, s = train_ensemble(name, data, work_dir, args.seed)
            x = to_unit(data.test_x, torch.device("cpu"))
            acc = float((clf.predict(x) == data.test_y).float().mean())
            print(f"[{name}] {s:.1f}s, clean test accuracy (softmax, 1,000 images) {acc:.3f}", flush=True)
        return 0
    start = time.perf_counter()
    out = bench(names, modes, methods, args.n, args.eps, args.seed, work_dir)
    wall = time.perf_counter() - start
    command = "python bench/bench_mora.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = table(out["rows"], methods)
    print(md)
    payload = {"command": command.strip(), "args": vars(args), "machine": machine(), "wall_s": round(wall, 1), **out}
    text = (f"# MORA vs APGD-CE vs AutoAttack on trained ensembles (mnist5k, L-inf eps={args.eps})\n\n"
            f"Command: `{command.strip()}` (n={args.n}, seed={args.seed}, {wall / 60:.1f} min on "
            f"{payload['machine']['platform']}, {args.threads} thread(s)).\n\n"
            "RA = robust accuracy over the n images (clean-correct and not fooled, judged by the true rule: hard votes "
            "for voting); grads = backward passes per attacked image through the ensemble (MORA: all members at once = 1). "
            "worst RA = per-sample minimum over every method.\n\n" + md + "\n")
    write_results(args.name, payload, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
