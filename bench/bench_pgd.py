"""PGD-50 throughput: the harness's evaluator vs a bare PyTorch loop vs torchattacks, on the same work.

Same model (../shared CIFAR-10 ResNet-2B), same eps (8/255) and steps (50), and the same images
in the same batches: the harness attacks only the clean-correct samples of each batch of
`--batch` evaluated images, so the bare loop and torchattacks get exactly those images, batched
the same way. The three run interleaved for `--rounds` rounds (the order rotates every round) in
one process with `--threads` torch threads; every round records wall and process CPU time. The
ratio is taken per round (harness time / bare time on the same round) and shown as min / median /
max, so machine drift hits both sides of a ratio alike. The harness's time includes everything a
user gets: building the checkpoint defense, the contract check, the clean pass, the counting
wrapper and the judge's tally, per-iterate success tracking, verification of every returned
example, records on disk.

A profile of one extra harness run (cProfile, not part of the timings) says where the harness's
time beyond the attack itself goes. The embedded default (`arena eval` in a fresh work dir,
training included) is timed once as a subprocess, wall and CPU time of the child.

    OMP_NUM_THREADS=1 python bench/bench_pgd.py --n 1000 --batch 250 --rounds 5
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import (interleaved, load_average, load_shared_model, machine, require_shared,  # noqa: E402
                           spread, write_results)

EPS, STEPS = 8 / 255, 50
ALPHA = 2.5 * EPS / STEPS  # the harness's default step (attack.step_size 2.5 / steps of eps)
# where the harness's time goes: (label, substrings of "file:function" in the profile)
PROFILE_PARTS = (
    ("attack (PGD.run)", ("attacks/pgd.py:run",)),
    ("clean pass + verification (correct_draws)", ("harness/evasion/cascade.py:correct_draws",)),
    ("judge: model snapshot checks", ("harness/evasion/judge.py:changes", "harness/evasion/judge.py:model_self_changes")),
    ("records to disk (write_batch, finish)", ("harness/results/store.py:write_batch", "harness/results/store.py:finish")),
    ("config composition (Hydra compose, override checks)", ("harness/api.py:compose_config",)),
    ("plan (data, config, hashing)", ("harness/evasion/plan.py:plan_evaluation",)),
    ("defense build + contract check (_Prepared.get)", ("harness/evasion/run.py:get",)),
)


def bare_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The plainest correct Linf PGD: random start, sign steps, projection; per-sample robust mask.

    The random start is drawn on the images' device (`gen` must live there); bench/bench_gpu.py
    times the same loop on a GPU."""
    x_adv = (x + (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * EPS).clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        g, = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + ALPHA * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def profile_parts(prof: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds of the PROFILE_PARTS functions in one profiled harness run."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = max(ct for (_, _, _, ct, _) in stats.values())
    out: dict[str, float] = {}
    for label, keys in PROFILE_PARTS:
        out[label] = sum(ct for (file, _, fn), (_, _, _, ct, _) in stats.items()
                         if any(f"{file.replace(chr(92), '/')}:{fn}".endswith(k) for k in keys))
    out["other (imports on first use, interpreter)"] = max(total - sum(out.values()), 0.0)
    out["total"] = total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="first N images of ../shared/data/cifar10_test_first1000.npz")
    ap.add_argument("--batch", type=int, default=250, help="evaluated images per batch (the harness's batch_size)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5 for a reported ratio)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every implementation")
    ap.add_argument("--skip-default", action="store_true", help="do not time the embedded default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_path = require_shared("data", "cifar10_test_first1000.npz")
    model_dir = require_shared("models", "cifar10_resnet2b")
    model = load_shared_model("cifar10_resnet2b")
    with np.load(data_path) as f:
        x = torch.from_numpy(f["x"][: args.n]).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(f["y"][: args.n]).long()
    with torch.no_grad():
        clean = torch.cat([model(x[i:i + args.batch]).argmax(1) == y[i:i + args.batch] for i in range(0, args.n, args.batch)])
    # the harness's work: in each batch of `batch` evaluated images, the clean-correct ones
    work = [(x[i:i + args.batch][clean[i:i + args.batch]], y[i:i + args.batch][clean[i:i + args.batch]])
            for i in range(0, args.n, args.batch)]
    attacked = int(clean.sum())

    import torchattacks

    from harness.api import run_eval

    robust: dict[str, Any] = {}

    def run_bare() -> None:
        robust["bare"] = torch.cat([bare_pgd(model, xb, yb, torch.Generator().manual_seed(0)) for xb, yb in work])

    def run_ta() -> None:
        atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
        masks = []
        for xb, yb in work:
            adv = atk(xb, yb)
            with torch.no_grad():
                masks.append(model(adv).argmax(1) == yb)
        robust["torchattacks"] = torch.cat(masks)

    overrides = ["dataset=npz", f"dataset.path={data_path}", f"n_samples={args.n}", f"batch_size={args.batch}",
                 "defense=checkpoint", f"defense.model_file={model_dir / 'model.py'}",
                 f"defense.weights={model_dir / 'weights.pth'}", f"threat.eps={EPS!r}", "attack=pgd",
                 f"attack.steps={STEPS}", "attack.restarts=1", "evaluator.cascade=false", "progress=false",
                 "leaderboard.update=false"]

    def run_harness() -> None:
        with tempfile.TemporaryDirectory() as wd:
            robust["harness"] = run_eval(overrides, wd)["robust_acc"]

    load_start = load_average()
    times = interleaved({"harness": run_harness, "bare": run_bare, "torchattacks": run_ta}, args.rounds)
    load_end = load_average()
    prof = cProfile.Profile()
    prof.enable()
    run_harness()
    prof.disable()
    parts = profile_parts(prof)

    wall = {k: [w for w, _ in v] for k, v in times.items()}
    cpu = {k: [c for _, c in v] for k, v in times.items()}
    ratio = {k: [wall["bare"][r] / wall[k][r] for r in range(args.rounds)] for k in wall}  # throughput vs bare, per round
    acc = {"harness": float(robust["harness"]) * args.n / attacked if attacked else 0.0,
           "bare": float(robust["bare"].float().mean()), "torchattacks": float(robust["torchattacks"].float().mean())}
    default: dict[str, float] | None = None
    if not args.skip_default:
        with tempfile.TemporaryDirectory() as wd:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "harness.cli", "eval", f"work_dir={wd}", "progress=false"], check=True,
                           cwd=wd, capture_output=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            default = {"wall_s": time.perf_counter() - t,
                       "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    command = f"OMP_NUM_THREADS={args.threads} python bench/bench_pgd.py --n {args.n} --batch {args.batch} --rounds {args.rounds}"
    payload = {"n": args.n, "batch": args.batch, "eps": EPS, "steps": STEPS, "rounds": args.rounds, "threads": args.threads,
               "attacked": attacked, "wall_s": wall, "cpu_s": cpu, "throughput_ratio_vs_bare": ratio,
               "robust_acc_of_attacked": acc, "harness_profile_s": parts, "embedded_default": default,
               "load_avg_start": load_start, "load_avg_end": load_end, "machine": machine(), "command": command}

    def mmm(values: list[float], fmt: str = "{:.2f}") -> str:
        s = spread(values)
        return " / ".join(fmt.format(s[k]) for k in ("min", "median", "max"))

    med_ratio = spread(ratio["harness"])["median"]
    md = [f"# PGD-50 throughput (ResNet-2B, CIFAR-10 first {args.n}, Linf 8/255)", "",
          f"`{command}`; {machine()['date']}, {machine()['platform']}, torch {torch.__version__}, {args.threads} "
          f"thread(s); {args.rounds} interleaved rounds (order rotating); load average {load_start} at the start, "
          f"{load_end} at the end. Every implementation attacks the same {attacked} clean-correct images of the first "
          f"{args.n}, in the harness's batches of {args.batch} evaluated images.", "",
          "| implementation | wall s (min / median / max) | CPU s (min / median / max) | throughput vs bare loop, per round (min / median / max) | robust acc of attacked |",
          "|---|---|---|---|---|"]
    for k in ("harness", "bare", "torchattacks"):
        md.append(f"| {k} | {mmm(wall[k])} | {mmm(cpu[k])} | {mmm(ratio[k], '{:.3f}')} | {100 * acc[k]:.1f} % |")
    target = "met" if med_ratio >= 0.95 else "**missed**"
    md += ["", f"Target (issue 18): harness >= 0.95x the bare loop at n = 1,000: median {med_ratio:.3f}x, {target}.", "",
           "Where one profiled harness run spends its time (cProfile cumulative seconds; profiling inflates Python-heavy parts):", "",
           "| part | s | share |", "|---|---|---|"]
    for label, seconds in parts.items():
        md.append(f"| {label} | {seconds:.2f} | {100 * seconds / parts['total']:.1f} % |")
    if default is not None:
        md += ["", f"Embedded default (`arena eval`, fresh work dir, training included), one run: "
                   f"{default['wall_s']:.1f} s wall, {default['cpu_s']:.1f} s CPU (child process)."]
    write_results("pgd", payload, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
