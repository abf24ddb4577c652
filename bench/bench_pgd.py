"""PGD-50 throughput: the harness's evaluator vs a bare PyTorch loop vs torchattacks, in one process.

Same model (../shared CIFAR-10 ResNet-2B), same images (first N of ../shared/data), same eps and
steps. The three run interleaved for `--repeats` rounds and the medians are compared, so machine
drift hits all three alike. The harness number includes everything a user gets: counting
wrapper, per-iterate success tracking, verification of every returned example, records.
Also times the embedded default (`arena eval`, fresh work dir: training included) as a subprocess.

    python bench/bench_pgd.py --n 500 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import REPO, load_shared_model, machine, require_shared, write_results  # noqa: E402

EPS, STEPS = 8 / 255, 50


def bare_pgd(model, x, y, gen):
    """The plainest correct Linf PGD: random start, sign steps, projection."""
    alpha = 2.5 * EPS / STEPS
    x_adv = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * EPS).clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        g, = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-default", action="store_true")
    args = ap.parse_args()
    data_path = require_shared("data", "cifar10_test_first1000.npz")
    model_dir = require_shared("models", "cifar10_resnet2b")
    model = load_shared_model("cifar10_resnet2b")
    with np.load(data_path) as f:
        x = torch.from_numpy(f["x"][: args.n]).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(f["y"][: args.n]).long()

    import torchattacks

    from harness.api import run_eval

    def run_bare():
        accs = [bare_pgd(model, x[i:i + args.batch], y[i:i + args.batch], torch.Generator().manual_seed(0))
                for i in range(0, args.n, args.batch)]
        return float(np.mean(accs))

    def run_ta():
        atk = torchattacks.PGD(model, eps=EPS, alpha=2.5 * EPS / STEPS, steps=STEPS, random_start=True)
        correct = 0
        for i in range(0, args.n, args.batch):
            adv = atk(x[i:i + args.batch], y[i:i + args.batch])
            with torch.no_grad():
                correct += (model(adv).argmax(1) == y[i:i + args.batch]).sum().item()
        return correct / args.n

    def run_harness():
        with tempfile.TemporaryDirectory() as wd:
            s = run_eval(["dataset=npz", f"dataset.path={data_path}", f"n_samples={args.n}", f"batch_size={args.batch}",
                          "defense=checkpoint", f"defense.model_file={model_dir / 'model.py'}",
                          f"defense.weights={model_dir / 'weights.pth'}", f"threat.eps={EPS}", "attack=pgd",
                          f"attack.steps={STEPS}", "evaluator.cascade=false"], wd)
            # the harness attacks only clean-correct samples; report on the same footing
            return s["robust_acc"], s["clean_acc"]

    times = {"harness": [], "bare": [], "torchattacks": []}
    accs = {}
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float()
    attacked = int(clean.sum())
    for r in range(args.repeats):
        for name, fn in (("harness", run_harness), ("bare", run_bare), ("torchattacks", run_ta)):
            t = time.perf_counter()
            accs[name] = fn()
            times[name].append(time.perf_counter() - t)
            print(f"round {r} {name}: {times[name][-1]:.2f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    # throughput in attacked images per second: the bare loop and torchattacks attack all N images,
    # the harness only the clean-correct ones (its cascade); compare per attacked image
    thr = {"harness": attacked / med["harness"], "bare": args.n / med["bare"], "torchattacks": args.n / med["torchattacks"]}
    ratio = {k: thr[k] / thr["bare"] for k in thr}
    default_s = None
    if not args.skip_default:
        with tempfile.TemporaryDirectory() as wd:
            t = time.perf_counter()
            subprocess.run(["arena", "eval", f"work_dir={wd}", "progress=false"], check=True, cwd=wd, capture_output=True)
            default_s = time.perf_counter() - t
    payload = {"n": args.n, "batch": args.batch, "eps": EPS, "steps": STEPS, "repeats": args.repeats,
               "attacked_by_harness": attacked, "median_s": med, "images_per_s": thr, "ratio_vs_bare": ratio,
               "robust_acc": accs, "embedded_default_wall_s": default_s, "machine": machine(),
               "command": f"python bench/bench_pgd.py --n {args.n} --batch {args.batch} --repeats {args.repeats}"}
    md = [f"# PGD-50 throughput (ResNet-2B, CIFAR-10 first {args.n}, Linf 8/255)", "",
          f"`{payload['command']}`; {machine()['date']}, {machine()['platform']}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} interleaved rounds.", "",
          "| implementation | median s | attacked images/s | ratio vs bare loop | robust acc |", "|---|---|---|---|---|"]
    for k in ("harness", "bare", "torchattacks"):
        acc = accs[k][0] if isinstance(accs[k], tuple) else accs[k]
        md.append(f"| {k} | {med[k]:.2f} | {thr[k]:.1f} | {ratio[k]:.3f} | {100 * acc:.1f} % |")
    if default_s is not None:
        md += ["", f"Embedded default (`arena eval`, fresh work dir, training included): {default_s:.1f} s wall."]
    write_results("pgd", payload, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
