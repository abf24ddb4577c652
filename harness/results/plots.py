"""`arena board plot OUT_DIR`: PNG plots drawn from the stored runs and the leaderboard.

- `robust_acc_vs_eps.png`: robust accuracy against eps, one line per defense and one panel per
  (dataset, norm), starting from clean accuracy at eps 0; leaderboard rows give the points, and
  the health report's probe sweep (stored in `health.json`) adds a dashed line where present;
- `queries_to_success.png`: for every score-based (black-box) attack in every run, the fraction
  of attacked samples broken within q queries (per-sample query counts from the records);
- `attack_convergence.png`: robust accuracy against iterations of the health report's probe PGD
  (N and 2N steps), per defense and threat model: a curve still falling at the end means the
  attacks were stopped too early.

All three are pure functions of the run directories, like the leaderboard itself.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(manifest: dict[str, Any]) -> str:
    d = manifest["config"].get("defense") or {}
    return str(d.get("label") or d.get("name"))


def _runs(work_dirs: list[Path]) -> list[tuple[Any, dict, dict, pd.DataFrame]]:
    from harness.evasion.board import collect

    return collect([Path(w) for w in work_dirs])


def _health(run_path: Path) -> dict[str, Any] | None:
    path = Path(run_path) / "health.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#57606a")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_acc_vs_eps(board: pd.DataFrame, runs: list[tuple[Any, dict, dict, pd.DataFrame]], out: Path) -> Path:
    """Robust accuracy (%) against eps per defense; panels per (dataset, norm)."""
    plt = _plt()
    groups = sorted({(str(r.dataset), str(r.norm)) for r in board.itertuples()}) if len(board) else []
    sweeps: dict[tuple[str, str, str], dict[str, Any]] = {}
    for run, manifest, _, _ in runs:
        h = _health(run.path)
        if h and (h.get("curves") or {}).get("eps_sweep"):
            cfg = manifest["config"]
            ds = (cfg.get("dataset") or {}).get("label") or (cfg.get("dataset") or {}).get("name")
            sweeps[(str(ds), cfg["threat"]["norm"], _label(manifest))] = h["curves"]["eps_sweep"]
    n = max(len(groups), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False)
    if not groups:
        _no_data(axes[0][0], "no leaderboard rows")
    for ax, (ds, norm) in zip(axes[0], groups):
        part = board[(board["dataset"].astype(str) == ds) & (board["norm"].astype(str) == norm)]
        for k, (defense, rows) in enumerate(sorted(part.groupby("defense"), key=lambda kv: str(kv[0]))):
            rows = rows.sort_values("eps")
            color = f"C{k % 10}"
            xs = [0.0, *rows["eps"].astype(float)]
            ys = [float(rows["clean_acc"].max()), *rows["robust_acc"].astype(float)]
            ax.plot(xs, ys, "o-", color=color, label=str(defense))
            sweep = sweeps.get((ds, norm, str(defense)))
            if sweep:
                ax.plot([0.0, *sweep["eps"]], [ys[0], *[100 * a for a in sweep["robust_acc"]]], "--", color=color,
                        alpha=0.6, label=f"{defense} (health probe)")
        ax.set_title(f"{ds}, {norm}")
        ax.set_xlabel("eps")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_queries_to_success(runs: list[tuple[Any, dict, dict, pd.DataFrame]], out: Path) -> Path:
    """Fraction of attacked samples broken within q queries, per black-box attack and run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for run, manifest, _, samples in runs:
        ran = samples[(samples["attack"] != "clean") & samples["ran"]]
        for attack, rows in ran.groupby("attack", sort=False):
            if int(rows["n_queries"].sum()) == 0:
                continue  # not a score-based attack
            q = rows.loc[rows["success"], "n_queries"].sort_values().to_numpy()
            attacked = len(rows)
            if attacked == 0:
                continue
            xs = [1, *q.tolist(), max(int(rows["n_queries"].max()), 1)]
            ys = [0.0, *[(i + 1) / attacked for i in range(len(q))], len(q) / attacked]
            ax.step(xs, ys, where="post", label=f"{_label(manifest)} / {attack} ({manifest['config']['threat']['norm']} "
                                                f"{manifest['config']['threat']['eps']:.3g}, n={attacked})")
            drawn += 1
    if not drawn:
        _no_data(ax, "no score-based attack in the runs")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("queries per sample")
        ax.set_ylabel("fraction of attacked samples broken")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax.set_title("black-box attacks: queries to success")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_convergence(runs: list[tuple[Any, dict, dict, pd.DataFrame]], out: Path) -> Path:
    """Robust accuracy per probe-PGD iteration (health report), N and 2N steps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for run, manifest, _, _ in runs:
        h = _health(run.path)
        curves = (h or {}).get("curves") or {}
        if "pgd_2x" not in curves:
            continue
        color = f"C{drawn % 10}"
        name = f"{_label(manifest)} ({h.get('threat')})"
        for key, style in (("pgd_2x", "-"), ("pgd", ":")):
            acc = curves[key]["acc"]
            ax.plot(range(1, len(acc) + 1), [100 * a for a in acc], style, color=color,
                    label=f"{name}, {curves[key]['steps']} steps")
        drawn += 1
    if not drawn:
        _no_data(ax, "no health report in the runs")
    else:
        ax.set_xlabel("iteration")
        ax.set_ylabel("robust accuracy, health subset (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax.set_title("attack convergence (health-report PGD probe)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_plots(work_dirs: list[Path], out_dir: Path | str, board: pd.DataFrame | None = None) -> list[Path]:
    """Write the three PNGs into `out_dir`; `board` defaults to the leaderboard built from the runs."""
    from harness.evasion.board import build_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = _runs(work_dirs)
    board = build_table([Path(w) for w in work_dirs]) if board is None else board
    return [
        plot_acc_vs_eps(board, runs, out / "robust_acc_vs_eps.png"),
        plot_queries_to_success(runs, out / "queries_to_success.png"),
        plot_convergence(runs, out / "attack_convergence.png"),
    ]


def main(argv: list[str] | None = None) -> int:
    """`arena board plot OUT_DIR [--work-dir DIR ...]` (also `python -m harness.results.plots`)."""
    p = argparse.ArgumentParser(prog="arena board plot", description="Write PNG plots of the stored runs.")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--work-dir", action="append", type=Path, help="work dir(s) with runs/ (default ./arena-work)")
    args = p.parse_args(argv)
    for path in write_plots(args.work_dir or [Path("arena-work")], args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
