"""`arena board plot OUT_DIR`: PNG plots drawn from the stored runs and the leaderboard.

- `robust_acc_vs_eps.png`: robust accuracy against eps, one panel per (dataset, norm) and one
  line per sweep: the board rows of one (defense, suite) measured on the same samples (same n
  and seed) at different eps, e.g. from `arena eval -m threat.eps=0.05,0.1,0.2`. Points are only
  where something was measured and a line joins only the points of one sweep (a single eps is a
  single point); clean accuracy is a hollow marker at eps 0, never joined to the robust points.
  The health report's probe sweep (in `health.json`) adds a dashed line through its own eps;
- `queries_to_success.png`: for every score-based (black-box) attack in every run, the share of
  attacked samples broken within q queries (per-sample query counts from the records);
- `attack_convergence.png`: robust accuracy against iterations of the health report's probe PGD
  (N and 2N steps), per defense and threat model: a curve still falling at the end means the
  attacks were stopped too early.

A plot with nothing to draw is not written (no empty placeholder files): `write_plots` returns
the files it wrote and `skipped_plots` says why the others are missing. Accuracies are percent,
as on every human surface. All three are pure functions of the run directories, like the
leaderboard itself.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.atomic import atomic_write, ensure_dir

Run = tuple[Any, dict, dict, pd.DataFrame]  # (RunDir, manifest, summary, samples) from evasion.board.collect

SKIP_REASONS = {
    "robust_acc_vs_eps.png": "no leaderboard row with a robust accuracy (run `arena eval` first)",
    "queries_to_success.png": "no score-based (black-box) attack in the runs",
    "attack_convergence.png": "no health report in the runs (`arena submit` writes one)",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(manifest: dict[str, Any]) -> str:
    d = manifest["config"].get("defense") or {}
    return str(d.get("label") or d.get("name"))


def dataset_label(manifest: dict[str, Any]) -> str:
    """The dataset as the board names it (an npz file by its stem), so probe sweeps join their rows."""
    from harness.evasion.board import dataset_label as label

    return label(manifest)


def _runs(work_dirs: list[Path]) -> list[Run]:
    from harness.evasion.board import collect

    return collect([Path(w) for w in work_dirs])


def _health(run_path: Path) -> dict[str, Any] | None:
    path = Path(run_path) / "health.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


# ------------------------------------------------------------------------------ robust acc vs eps


@dataclass
class Series:
    """One line (or a single point) of the eps plot: the measured points of one sweep, eps ascending."""

    panel: tuple[str, str]  # (dataset, norm)
    label: str
    eps: list[float]
    robust: list[float]  # percent
    clean: float | None = None  # percent, drawn at eps 0 as a hollow marker
    probe: bool = False  # the health report's PGD probe sweep (dashed)
    defense: str = ""


def _sweep_key(row: dict[str, Any]) -> tuple:
    """Rows of one sweep: the same defended model, suite, sample count and seed; only eps differs."""
    return (str(row.get("defense_id", row.get("defense"))), str(row.get("suite")), row.get("n_samples"), row.get("seed"))


def eps_series(board: pd.DataFrame | None, runs: list[Run]) -> list[Series]:
    """What `robust_acc_vs_eps.png` draws: one `Series` per sweep, then the health probe sweeps."""
    out: list[Series] = []
    if board is not None and not board.empty and {"eps", "robust_acc", "dataset", "norm"} <= set(board.columns):
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in board.dropna(subset=["eps", "robust_acc"]).to_dict("records"):
            groups.setdefault((str(r["dataset"]), str(r["norm"]), *_sweep_key(r)), []).append(r)
        # a defense name shared by several sweeps in one panel gets its model id and n in the label
        shared: dict[tuple, int] = {}
        for key, members in groups.items():
            name = (key[0], key[1], str(members[0]["defense"]), key[3])
            shared[name] = shared.get(name, 0) + 1
        for key, members in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
            members.sort(key=lambda r: float(r["eps"]))
            first = members[0]
            label = f"{first['defense']} / {first['suite']}"
            if shared[(key[0], key[1], str(first["defense"]), key[3])] > 1:
                label += f" ({first.get('defense_id', '?')}, n={first.get('n_samples')})"
            clean = [float(r["clean_acc"]) for r in members if pd.notna(r.get("clean_acc"))]
            out.append(Series((key[0], key[1]), label, [float(r["eps"]) for r in members],
                              [float(r["robust_acc"]) for r in members], max(clean) if clean else None,
                              defense=str(first["defense"])))
    for run, manifest, _, _ in runs:
        sweep = (((_health(run.path) or {}).get("curves")) or {}).get("eps_sweep")
        if not sweep:
            continue
        cfg = manifest["config"]
        ds = dataset_label(manifest)
        pairs = sorted(zip(sweep["eps"], sweep["robust_acc"]))
        out.append(Series((str(ds), str(cfg["threat"]["norm"])), f"{_label(manifest)} (health probe PGD)",
                          [float(e) for e, _ in pairs], [100.0 * float(a) for _, a in pairs], probe=True,
                          defense=_label(manifest)))
    return out


def plot_acc_vs_eps(board: pd.DataFrame | None, runs: list[Run], out: Path) -> Path | None:
    """Robust accuracy (%) against eps, one line per sweep; None (no file) when nothing was measured."""
    series = eps_series(board, runs)
    if not series:
        return None
    plt = _plt()
    panels = sorted({s.panel for s in series})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [s for s in series if s.panel == panel]
        palette: dict[str, str] = {}
        by_defense: dict[str, str] = {}  # a probe sweep takes the colour of its defense's first line
        for s in mine:
            color = by_defense.get(s.defense) if s.probe else None
            color = color or palette.setdefault(s.label, f"C{len(palette) % 10}")
            by_defense.setdefault(s.defense, color)
            ax.plot(s.eps, s.robust, linestyle=("--" if s.probe else "-") if len(s.eps) > 1 else "none",
                    marker="s" if s.probe else "o", color=color, alpha=0.7 if s.probe else 1.0, label=s.label)
            if s.clean is not None:
                ax.plot([0.0], [s.clean], marker="o", markerfacecolor="none", linestyle="none", color=color)
        if any(s.clean is not None for s in mine):
            ax.plot([], [], marker="o", markerfacecolor="none", linestyle="none", color="#57606a",
                    label="clean accuracy (at eps 0)")
        top = max(max(s.eps) for s in mine)
        ax.set_xlim(-0.04 * top, 1.06 * top)
        ax.set_title(f"{panel[0]}, {panel[1]}")
        ax.set_xlabel("eps")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # a reader never sees half a PNG
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- queries to success


def query_curves(runs: list[Run]) -> list[tuple[str, list[int], list[float]]]:
    """(label, queries, % of attacked samples broken within that many) per score-based attack and run."""
    curves = []
    for _, manifest, _, samples in runs:
        ran = samples[(samples["attack"] != "clean") & samples["ran"]]
        for attack, rows in ran.groupby("attack", sort=False):
            attacked = len(rows)
            if attacked == 0 or int(rows["n_queries"].sum()) == 0:
                continue  # not a score-based attack
            q = rows.loc[rows["success"], "n_queries"].sort_values().to_numpy()
            xs = [1, *q.tolist(), max(int(rows["n_queries"].max()), 1)]
            ys = [0.0, *[100.0 * (i + 1) / attacked for i in range(len(q))], 100.0 * len(q) / attacked]
            threat = manifest["config"]["threat"]
            curves.append((f"{_label(manifest)} / {attack} ({threat['norm']} {threat['eps']:.3g}, n={attacked})", xs, ys))
    return curves


def plot_queries_to_success(runs: list[Run], out: Path) -> Path | None:
    """Share of attacked samples broken within q queries; None (no file) without a black-box attack."""
    curves = query_curves(runs)
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, xs, ys in curves:
        ax.step(xs, ys, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("queries per sample")
    ax.set_ylabel("attacked samples broken (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("black-box attacks: queries to success")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # a reader never sees half a PNG
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- attack convergence


def plot_convergence(runs: list[Run], out: Path) -> Path | None:
    """Robust accuracy per probe-PGD iteration (health report), N and 2N steps; None without a report."""
    reports = [(m, h) for r, m, _, _ in runs for h in [_health(r.path)] if "pgd_2x" in ((h or {}).get("curves") or {})]
    if not reports:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, (manifest, h) in enumerate(reports):
        color = f"C{k % 10}"
        name = f"{_label(manifest)} ({h.get('threat')})"
        for key, style in (("pgd_2x", "-"), ("pgd", ":")):
            acc = h["curves"][key]["acc"]
            ax.plot(range(1, len(acc) + 1), [100 * a for a in acc], style, color=color,
                    label=f"{name}, {h['curves'][key]['steps']} steps")
    ax.set_xlabel("iteration")
    ax.set_ylabel("robust accuracy, health subset (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("attack convergence (health-report PGD probe)")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # a reader never sees half a PNG
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------- entry


def write_plots(work_dirs: list[Path], out_dir: Path | str, board: pd.DataFrame | None = None) -> list[Path]:
    """Write the plots that have data into `out_dir` (created only then); returns the files written.

    `board` defaults to the leaderboard built from the runs.
    """
    from harness.evasion.board import build_table

    out = Path(out_dir)
    runs = _runs(work_dirs)
    board = build_table([Path(w) for w in work_dirs]) if board is None else board
    jobs = {"robust_acc_vs_eps.png": lambda p: plot_acc_vs_eps(board, runs, p),
            "queries_to_success.png": lambda p: plot_queries_to_success(runs, p),
            "attack_convergence.png": lambda p: plot_convergence(runs, p)}
    has_data = {"robust_acc_vs_eps.png": bool(eps_series(board, runs)), "queries_to_success.png": bool(query_curves(runs)),
                "attack_convergence.png": any("pgd_2x" in (((_health(r.path) or {}).get("curves")) or {}) for r, *_ in runs)}
    written = []
    for name, draw in jobs.items():
        if has_data[name]:
            ensure_dir(out, for_file=out / name)
            path = draw(out / name)
            if path is not None:
                written.append(path)
    return written


def skipped_plots(written: list[Path]) -> dict[str, str]:
    """The plots `write_plots` did not write, with the reason."""
    names = {Path(p).name for p in written}
    return {k: v for k, v in SKIP_REASONS.items() if k not in names}


def report(written: list[Path]) -> list[str]:
    """The lines the CLI prints: one per file written, one per plot skipped (with the reason)."""
    return [f"wrote {p}" for p in written] + [f"no {k}: {v}" for k, v in skipped_plots(written).items()]


def main(argv: list[str] | None = None) -> int:
    """`arena board plot OUT_DIR [--work-dir DIR ...]` (also `python -m harness.results.plots`)."""
    p = argparse.ArgumentParser(prog="arena board plot", description="Write PNG plots of the stored runs.")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--work-dir", action="append", type=Path, help="work dir(s) with runs/ (default ./arena-work)")
    args = p.parse_args(argv)
    for line in report(write_plots(args.work_dir or [Path("arena-work")], args.out)):
        print(line)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
