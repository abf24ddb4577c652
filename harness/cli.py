"""The `arena` command: dispatches to subcommands.

- `arena eval [overrides] [-m]`   evaluate defenses against attacks (Hydra; see conf/eval.yaml)
- `arena poison [overrides] [-m]` the poisoning track (Hydra; see conf/poison.yaml)
- `arena board [build|show|html]` build or browse the leaderboards
- `arena layers ...`              list a model's feature layers (LAFEAT taps)
- `arena submit BUNDLE`           check, attack and score a submitted defense
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from harness.errors import UserError

SUBCOMMANDS = {
    "eval": ("harness.eval_cli", "main", "evaluate a defense against a suite of attacks (Hydra overrides)"),
    "poison": ("harness.poison_cli", "main", "train on poisoned data under a training-time defense (Hydra overrides)"),
    "board": ("harness.cli", "board_main", "build or browse the leaderboards"),
    "layers": ("harness.layers_cli", "main", "list a model's feature layers for LAFEAT"),
    "submit": ("harness.submit", "main", "check, attack and score a defense bundle"),
}


def usage() -> str:
    lines = ["usage: arena <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {desc}" for name, (_, _, desc) in SUBCOMMANDS.items()]
    lines += ["", "`arena <command> --help` for details; `arena eval` alone runs the embedded default."]
    return "\n".join(lines)


BOARD_VIEW = ["defense", "model", "dataset", "threat", "suite", "n_samples", "clean_acc", "robust_acc",
              "best_known_acc", "forward_per_sample", "queries_per_sample", "randomized", "masking_suspected"]


def board_main(argv: list[str]) -> int:
    """`arena board` (show), `arena board build`, `arena board html OUT`."""
    from harness import leaderboard
    from harness.report import print_board

    p = argparse.ArgumentParser(prog="arena board", description="Build or browse the leaderboards.")
    p.add_argument("action", nargs="?", default="show", choices=["show", "build", "html", "plot"])
    p.add_argument("out", nargs="?", help="output file for `html`, output directory for `plot`")
    p.add_argument("--track", default="evasion", choices=["evasion", "poisoning"])
    p.add_argument("--work-dir", action="append", type=Path, help="work dir(s) with runs/ (default ./arena-work)")
    p.add_argument("--csv", type=Path, help="leaderboard CSV (default <work-dir>/leaderboard/<track>.csv)")
    p.add_argument("--dataset"); p.add_argument("--threat"); p.add_argument("--defense"); p.add_argument("--suite")
    p.add_argument("--sort", default=None, help="column to sort by (default robust_acc, descending)")
    p.add_argument("--ascending", action="store_true")
    p.add_argument("--columns", help="comma-separated columns to show")
    p.add_argument("--matrix", action="store_true", help="poisoning: show the poison x defense matrix")
    p.add_argument("--attacks", action="store_true", help="evasion: add a robust-accuracy column after each attack")
    args = p.parse_args(argv)
    work_dirs = args.work_dir or [Path("arena-work")]
    csv = args.csv or work_dirs[0] / "leaderboard" / f"{args.track}.csv"
    if args.track == "poisoning":
        board = importlib.import_module("harness.poison_board")
        if args.action == "build":
            df = board.build_poisoning_board(work_dirs[0], csv)
            print(f"wrote {csv} ({len(df)} rows)")
            return 0
        df = leaderboard.read(csv)
        if args.matrix:
            print("clean test accuracy (%), final epoch, mean ± std over seeds [training accuracy on the data the defender got]")
            print(board.matrix(df, beside="train_acc").to_string())
            return 0
        if args.action == "show" and not args.columns:
            for col in ("dataset", "defense"):
                if getattr(args, col) is not None:
                    df = df[df[col].astype(str) == getattr(args, col)]
            if args.sort:
                if args.sort not in df.columns:
                    raise UserError(f"--sort {args.sort!r} is not a column; choose one of: {', '.join(df.columns)}")
                df = df.sort_values(args.sort, ascending=args.ascending, kind="stable")
            print_board(df, [c for c in board.VIEW_COLUMNS if c in df.columns], title=f"poisoning leaderboard ({csv})")
            return 0
    else:
        if args.action == "build":
            df = leaderboard.build(work_dirs, csv)
            print(f"wrote {csv} ({len(df)} rows)")
            return 0
        df = leaderboard.read(csv)
    for col in ("dataset", "threat", "defense", "suite"):
        value = getattr(args, col)
        if value is not None:
            if col not in df.columns:
                raise UserError(f"--{col} does not apply to the {args.track} leaderboard")
            df = df[df[col].astype(str) == value]
    if args.action == "plot":
        if not args.out:
            raise UserError("arena board plot needs an output directory: arena board plot OUT_DIR")
        plots = importlib.import_module("harness.plots")
        for path in plots.write_plots(work_dirs, Path(args.out), board=df):
            print(f"wrote {path}")
        return 0
    if args.action == "html":
        if not args.out:
            raise UserError("arena board html needs an output file: arena board html OUT.html")
        html = importlib.import_module("harness.board_html")
        html.write_html(df, Path(args.out), title=f"RobustArena {args.track} leaderboard")
        print(f"wrote {args.out}")
        return 0
    sort = args.sort or ("robust_acc" if "robust_acc" in df.columns else df.columns[0])
    if sort not in df.columns:
        raise UserError(f"--sort {sort!r} is not a column; choose one of: {', '.join(df.columns)}")
    df = df.sort_values(sort, ascending=args.ascending, kind="stable")
    cols = args.columns.split(",") if args.columns else [c for c in BOARD_VIEW if c in df.columns] or list(df.columns)
    if args.track == "evasion" and not args.columns:
        board_html = importlib.import_module("harness.board_html")
        df = df.assign(flags=df.apply(board_html.flags_text, axis=1))
        cols = [c for c in cols if c not in ("randomized", "masking_suspected")] + ["flags"]
        if args.attacks:
            before = set(df.columns)
            df = board_html.expand_cascade(df)
            cols += [c for c in df.columns if c not in before]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(f"--columns {missing} not in the leaderboard; choose from: {', '.join(df.columns)}")
    print_board(df, cols, title=f"{args.track} leaderboard ({csv})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"arena: error: unknown command {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module_name, func, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"arena: error: command {name!r} is not available in this installation", file=sys.stderr)
            return 2
        raise
    try:
        return int(getattr(module, func)(rest) or 0)
    except UserError as exc:
        print(f"arena {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
