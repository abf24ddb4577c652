"""Benchmark: the poison x defense matrix of clean test accuracy (final epoch) in a converged recipe.

Every cell is a real `arena poison` run composed from conf/poison.yaml with `experiment=<name>`
(default `poisoning_converged`: real Fashion-MNIST, 10,000 class-balanced training images, the
full 10,000-image test split, a recipe that fits clean data to >= 99 % training accuracy) plus the
same overrides the CLI takes, stored under the work dir, so an interrupted benchmark resumes and
the leaderboard rows are rebuilt from the runs.

Plan: every (poison, defense) at the matrix seeds (default 0), then the extra seeds (default 1, 2)
for the extra defenses (default standard and ueraser, declared before any result was seen). The
report shows the matrix (mean ± std, training accuracy beside it), the best epoch, the issue's
targets (standard drop >= 40 points; best UEraser within 5 points of itself on clean data and
within 10 of clean standard training), each poison's effective perturbation after clipping and
quantisation, EM's surrogate trajectory, OPS's pixels, and the wall time per cell with the load.

    python bench/bench_poisoning.py                                   # the whole plan (CPU, a few hours)
    python bench/bench_poisoning.py --poisons none --defenses standard --extra-seeds ''   # one cell
    python bench/bench_poisoning.py --report-only --leaderboard leaderboard/poisoning.csv
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from harness.core.atomic import strict_dumps  # strict JSON: null, never NaN

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POISONS = ["none", "lsp", "ar", "ops", "em"]
DEFENSES = ["standard", "ueraser_lite", "iss_jpeg", "ueraser", "pgd_at"]  # run order: what the targets need first
EXTRA_DEFENSES = ["standard", "ueraser"]
# Per-defense settings of the track that are not in the defense's own config (APBench's AT:
# Madry PGD at L-inf 8/255 with steps of ~2/255; see conf/experiment/poisoning_converged.yaml).
DEFENSE_OVERRIDES = {"pgd_at": ["defense.eps=0.03137254901960784", "defense.steps=5", "defense.step_size=0.5"]}
TARGET_DROP, TARGET_SELF, TARGET_CLEAN = 40.0, 5.0, 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="poisoning_converged", help="conf/experiment/<name>.yaml overlay for every run")
    p.add_argument("--poisons", default=",".join(POISONS))
    p.add_argument("--defenses", default=",".join(DEFENSES))
    p.add_argument("--seeds", default="0", help="seeds of the whole matrix")
    p.add_argument("--extra-seeds", default="1,2", help="further seeds for --extra-defenses on every poison ('' = none)")
    p.add_argument("--extra-defenses", default=",".join(EXTRA_DEFENSES))
    p.add_argument("--extra", action="append", default=[], help="further Hydra overrides for every run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work-dir", type=Path, default=ROOT / "arena-work" / "bench-poisoning-converged")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--name", default="poisoning", help="results file stem: <out>/<name>.{json,md}")
    p.add_argument("--leaderboard", type=Path, default=None, help="also write the board CSV here (e.g. leaderboard/poisoning.csv)")
    p.add_argument("--report-only", action="store_true", help="no training: rebuild the report from the stored runs")
    p.add_argument("--no-report", action="store_true", help="run the cells, write nothing under --out")
    return p.parse_args(argv)


def csv_list(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def cells(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(poison, defense, seed) in run order: the whole matrix a defense at a time (in --defenses
    order, so an interrupted run has whole columns), then the extra seeds."""
    out = [(p, d, int(s)) for s in csv_list(args.seeds) for d in csv_list(args.defenses) for p in csv_list(args.poisons)]
    out += [(p, d, int(s)) for s in csv_list(args.extra_seeds) for d in csv_list(args.extra_defenses)
            for p in csv_list(args.poisons)]
    seen: set[tuple[str, str, int]] = set()
    return [c for c in out if not (c in seen or seen.add(c))]


def overrides_for(args: argparse.Namespace, poison: str, defense: str, seed: int) -> list[str]:
    return [f"experiment={args.experiment}", f"poison={poison}", f"defense={defense}", f"seed={seed}",
            f"device={args.device}", *DEFENSE_OVERRIDES.get(defense, []), *args.extra]


def run_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (or skip, when stored) every planned cell in this process; return what each took."""
    from hydra import compose, initialize_config_dir

    from harness.cli.hydra_app import CONF_DIR, to_plain
    from harness.poisoning.run import run_poison

    timings = []
    start = time.perf_counter()
    plan = cells(args)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for i, (poison, defense, seed) in enumerate(plan):
            ovs = overrides_for(args, poison, defense, seed)
            cfg = to_plain(compose(config_name="poison", overrides=ovs + [f"work_dir={args.work_dir}", "progress=false"]))
            t, load = time.perf_counter(), os.getloadavg()[0]
            print(f"[{i + 1}/{len(plan)}] {' '.join(ovs)}", flush=True)
            run_poison(cfg, overrides=ovs, log=lambda m: print("  " + m, flush=True))
            took = time.perf_counter() - t
            timings.append({"poison": poison, "defense": defense, "seed": seed, "wall_s": round(took, 1),
                            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)})
            print(f"  [{took:.1f}s, total {time.perf_counter() - start:.0f}s, load {os.getloadavg()[0]:.1f}]", flush=True)
    return timings


def run_facts(work_dir: Path, hashes: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(manifest, summary) of each run directory named in a board row's `config_hashes`."""
    out = []
    for key in str(hashes).split(";"):
        folder = work_dir / "poison-runs" / key
        out.append((json.loads((folder / "manifest.json").read_text()), json.loads((folder / "summary.json").read_text())))
    return out


def targets(board, poisons: list[str]) -> list[dict[str, Any]]:
    """The issue's targets per poison, from the board's seed means."""
    means = board.pivot_table(index="poison", columns="defense", values="final_acc_mean", aggfunc="first")
    seeds = board.pivot_table(index="poison", columns="defense", values="n_seeds", aggfunc="first")
    if "none" not in means.index or "standard" not in means.columns:
        return []
    clean = means.loc["none"]
    out = []
    for poison in [p for p in poisons if p != "none" and p in means.index]:
        row = means.loc[poison]
        drop = float(clean["standard"] - row["standard"]) if row.get("standard") == row.get("standard") else float("nan")
        variants = [d for d in means.columns if d.startswith("ueraser") and row[d] == row[d]]
        best = max(variants, key=lambda d: (row[d], seeds.loc[poison, d])) if variants else None
        self_gap = float(clean[best] - row[best]) if best and clean.get(best) == clean.get(best) else None
        clean_gap = float(clean["standard"] - row[best]) if best else None
        out.append({
            "poison": poison, "standard_acc": round(float(row["standard"]), 2), "standard_drop": round(drop, 2),
            "drop_target_met": bool(drop >= TARGET_DROP),
            "best_ueraser": best, "best_ueraser_acc": round(float(row[best]), 2) if best else None,
            "best_ueraser_seeds": int(seeds.loc[poison, best]) if best else 0,
            "gap_to_itself_clean": None if self_gap is None else round(self_gap, 2),
            "self_target_met": None if self_gap is None else bool(self_gap <= TARGET_SELF),
            "gap_to_clean_standard": None if clean_gap is None else round(clean_gap, 2),
            "clean_target_met": None if clean_gap is None else bool(clean_gap <= TARGET_CLEAN),
        })
    return out


def poison_evidence(board, work_dir: Path) -> list[dict[str, Any]]:
    """Per poison (standard training's runs): the perturbation that reached the images, EM's
    surrogate trajectory, OPS's pixels, and the standard model's fit of the poisoned data."""
    out = []
    for _, row in board[board["defense"] == "standard"].iterrows():
        for manifest, summary in run_facts(work_dir, row["config_hashes"]):
            facts = manifest.get("poison_facts") or {}
            item = {
                "poison": row["poison"], "seed": int(summary["seed"]),
                "budget": f"{facts.get('budget', {}).get('norm')} <= {facts.get('budget', {}).get('eps', 0):.4g}",
                "nominal_norm_mean": facts.get("nominal_norm_mean"), "effective_norm_mean": facts.get("norm_mean"),
                "effective_norm_fraction": facts.get("effective_norm_fraction"),
                "changed_fraction": facts.get("changed_fraction"), "poison_wall_s": facts.get("wall_s"),
                "train_acc_poisoned": summary.get("train_acc_poisoned_data"),
            }
            if "surrogate_acc" in facts:
                item.update(em_rounds=facts.get("rounds"), em_converged=facts.get("converged"),
                            em_surrogate_acc=facts.get("surrogate_acc"), em_max_rounds=(facts.get("params") or {}).get("max_rounds"))
            if "pixels" in facts:
                item["ops_pixels"] = facts["pixels"]
            out.append(item)
    return out


def recipe(board, work_dir: Path) -> dict[str, Any]:
    """The training recipe and model of the clean standard run (from its manifest)."""
    rows = board[(board["poison"] == "none") & (board["defense"] == "standard")]
    if rows.empty:
        return {}
    manifest, _ = run_facts(work_dir, rows.iloc[0]["config_hashes"])[0]
    semantic = manifest["config"]
    return {"dataset": semantic.get("dataset"), "model": semantic.get("model"), "train_n": semantic.get("train_n"),
            "test_n": semantic.get("test_n"), "train": (semantic.get("defense") or {}).get("train")}


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import platform

    import torch

    from harness.poisoning.board import build_table, matrix, matrix_markdown

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    poisons, defenses = csv_list(args.poisons), sorted(set(csv_list(args.defenses)) | set(csv_list(args.extra_defenses)))
    start = time.perf_counter()
    timings: list[dict[str, Any]] = []
    if not args.report_only:
        timings = run_cells(args)
    wall = time.perf_counter() - start
    if args.no_report:
        return 0

    board = build_table(args.work_dir)
    board = board[board["poison"].isin(poisons) & board["defense"].isin(defenses)].reset_index(drop=True)
    if board["setting"].nunique() > 1:
        raise SystemExit(f"{args.work_dir} holds runs of {board['setting'].nunique()} settings; use one work dir per experiment")
    if args.leaderboard is not None:
        from harness.evasion.board import write_csv

        write_csv(board, args.leaderboard)
    checks = targets(board, poisons)
    evidence = poison_evidence(board, args.work_dir)
    setup = recipe(board, args.work_dir)
    per_cell = []
    for _, row in board.iterrows():
        for _, summary in run_facts(args.work_dir, row["config_hashes"]):
            per_cell.append({"poison": row["poison"], "defense": row["defense"], "seed": int(summary["seed"]),
                             "train_wall_s": round(float(summary.get("train_wall_s", 0.0)), 1),
                             "run_wall_s": round(float(summary.get("run_wall_s", 0.0)), 1),
                             "poison_wall_s": round(float(summary.get("poison_wall_s", 0.0)), 1),
                             "poison_cache_hit": bool(summary.get("poison_cache_hit"))})
    done = {(c["poison"], c["defense"], c["seed"]) for c in per_cell}
    missing = [c for c in cells(args) if c not in done]
    keep = ("--report-only", "--no-report", "--leaderboard")
    kept = [a for i, a in enumerate(argv) if not a.startswith(keep) and not (i > 0 and argv[i - 1] == "--leaderboard")]
    command = " ".join(["python bench/bench_poisoning.py", *(shlex.quote(a) for a in kept)]).strip()
    run_wall = sum(c["run_wall_s"] for c in per_cell)
    load = os.getloadavg()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "load_avg_at_report": [round(v, 2) for v in load]}

    print("\nclean test accuracy (%), final epoch, mean ± std over seeds [training accuracy]")
    print(matrix(board, "final_acc", beside="train_acc").to_string())
    print(f"\ntargets: standard drop >= {TARGET_DROP}; best UEraser within {TARGET_SELF} of itself on clean data "
          f"and within {TARGET_CLEAN} of clean standard training")
    verdict = {True: "met", False: "MISSED", None: "not run"}
    for c in checks:
        print(f"  {c['poison']:>5}: standard {c['standard_acc']} (drop {c['standard_drop']}, {verdict[c['drop_target_met']]}); "
              f"best UEraser {c['best_ueraser'] or '(not run)'} {c['best_ueraser_acc']} ({c['best_ueraser_seeds']} seeds): "
              f"gap to itself clean {c['gap_to_itself_clean']} ({verdict[c['self_target_met']]}), "
              f"to clean standard {c['gap_to_clean_standard']} ({verdict[c['clean_target_met']]})")
    print(f"\nthis invocation {wall:.0f}s; the stored runs' wall times sum to {run_wall:.0f}s")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": command, "setting": {k: (os.path.relpath(v, ROOT) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "recipe": setup, "defense_overrides": DEFENSE_OVERRIDES, "machine": machine,
        "runs": int(board["n_seeds"].sum()), "sum_of_run_wall_s": round(run_wall, 1),
        "matrix_final_acc": json.loads(matrix(board, "final_acc").to_json(orient="index")),
        "matrix_best_acc": json.loads(matrix(board, "best_acc").to_json(orient="index")),
        "matrix_train_acc": json.loads(matrix(board, "train_acc").to_json(orient="index")),
        "targets": checks, "poison_evidence": evidence, "cells": per_cell, "this_invocation": timings,
        "planned_cells_not_run": [{"poison": p, "defense": d, "seed": s} for p, d, s in missing],
        "rows": json.loads(board.drop(columns=["git"]).to_json(orient="records")),
    }
    (args.out / f"{args.name}.json").write_text(strict_dumps(result) + "\n")

    yes = {True: "yes", False: "**no**", None: "not run"}
    train_cfg = setup.get("train") or {}
    md = [
        "# Poisoning benchmark: poison x defense, clean test accuracy (%), converged recipe", "",
        f"Command: `{command}` (resumable: finished runs are skipped).  ",
        f"Recipe (`experiment={args.experiment}`): dataset {strict_dumps(setup.get('dataset'), indent=None)}, "
        f"train_n {setup.get('train_n')} (class-balanced), test_n {setup.get('test_n') or 'all (10,000)'}, "
        f"model {strict_dumps(setup.get('model'), indent=None)}, training {strict_dumps(train_cfg, indent=None)}; "
        f"per-defense overrides {strict_dumps(DEFENSE_OVERRIDES, indent=None, sort_keys=False)}.  ",
        f"{int(board['n_seeds'].sum())} runs on {machine['platform']}, {machine['cpus']} CPUs shared with other jobs, "
        f"one torch thread; the runs' wall times sum to {run_wall:.0f} s (**measured under load**; "
        f"load average at report time {machine['load_avg_at_report']}).", "",
        "## Final epoch: clean test accuracy, mean ± std over seeds [training accuracy on the data the defender got]", "",
        "Cells with one number are seed 0 only; `±` cells are seeds 0, 1, 2.", "",
        matrix_markdown(board, "final_acc", beside="train_acc"),
        "## Best epoch (optimistic: picks the epoch by test accuracy)", "", matrix_markdown(board, "best_acc"),
        "## Targets", "",
        f"Standard training's drop (clean standard - poisoned standard) should be >= {TARGET_DROP:g} points; the best UEraser "
        f"variant (highest mean on that poison) within {TARGET_SELF:g} points of itself trained on clean data and within "
        f"{TARGET_CLEAN:g} of clean standard training.", "",
        "| poison | standard | drop | >= 40? | best UEraser (seeds) | its acc | gap to itself, clean | <= 5? | gap to clean standard | <= 10? |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {c['poison']} | {c['standard_acc']} | {c['standard_drop']} | {yes[c['drop_target_met']]} | "
          f"{c['best_ueraser'] or 'not run'} ({c['best_ueraser_seeds']}) | {fmt(c['best_ueraser_acc'], 2)} | "
          f"{fmt(c['gap_to_itself_clean'], 2)} | {yes[c['self_target_met']]} | "
          f"{fmt(c['gap_to_clean_standard'], 2)} | {yes[c['clean_target_met']]} |" for c in checks], "",
        "## What reached the images (standard training's runs)", "",
        "`nominal` is the poison's own float perturbation (its budget); `effective` what is left in the uint8 "
        "images after clipping to [0, 1] and quantisation, in the budget's norm (mean over poisoned samples).", "",
        "| poison | seed | budget | nominal | effective | effective / nominal | images changed | standard train acc | poison time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {e['poison']} | {e['seed']} | {e['budget']} | {fmt(e['nominal_norm_mean'])} | {fmt(e['effective_norm_mean'])} | "
          f"{fmt(e['effective_norm_fraction'])} | {fmt(e['changed_fraction'])} | {fmt(e['train_acc_poisoned'], 4)} | "
          f"{fmt(e['poison_wall_s'], 1)} |" for e in evidence], "",
    ]
    for e in evidence:
        if "em_rounds" in e:
            md.append(f"EM seed {e['seed']}: {e['em_rounds']} rounds (cap {e['em_max_rounds']}), "
                      f"stop criterion (> 99 % surrogate accuracy on the poisoned data) {'reached' if e['em_converged'] else '**not reached**'}; "
                      f"surrogate accuracy per round: {e['em_surrogate_acc']}.  ")
    for e in evidence:
        if "ops_pixels" in e:
            md.append(f"OPS seed {e['seed']} pixels (class, row, col, colour): "
                      + ", ".join(f"{p['class']}:({p['row']},{p['col']})={p['colour']}" for p in e["ops_pixels"]) + ".  ")
    md += [
        "", "## Wall time per cell (measured under load: other jobs shared the 2 cores)", "",
        "| poison | defense | seed | training (s) | whole run (s) | poison generation (s) |", "|---|---|---|---|---|---|",
        *[f"| {c['poison']} | {c['defense']} | {c['seed']} | {c['train_wall_s']} | {c['run_wall_s']} | "
          f"{c['poison_wall_s'] if not c['poison_cache_hit'] else 'cached'} |" for c in per_cell], "",
    ]
    if missing:
        md += [f"## Planned cells not run yet ({len(missing)} of {len(cells(args))})", "",
               "The benchmark is resumable: the same command runs only these.", "",
               ", ".join(f"{p}/{d}/seed {s}" for p, d, s in missing), ""]
    (args.out / f"{args.name}.md").write_text("\n".join(md))
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
