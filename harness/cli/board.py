"""`arena board`: build, check and browse the leaderboards (terminal table, HTML page, plots)."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from harness.core.errors import UserError

BOARD_VIEW = ["defense", "model", "dataset", "threat", "suite", "n_samples", "clean_acc", "robust_acc",
              "best_known_acc", "certified_acc", "forward_per_sample", "queries_per_sample", "randomized", "masking_suspected"]


def board_main(argv: list[str]) -> int:
    """`arena board` (show), `arena board build`, `arena board html OUT`."""
    from harness.evasion import board as leaderboard
    from harness.results.terminal import print_board

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
        board = importlib.import_module("harness.poisoning.board")
        if args.action == "build":
            df = board.build_poisoning_board(work_dirs[0], csv)
            print(f"wrote {csv} ({len(df)} rows)")
            return 0
        df = leaderboard.read(csv)
        if args.matrix:
            print(board.matrix(df).to_string())
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
        plots = importlib.import_module("harness.results.plots")
        for path in plots.write_plots(work_dirs, Path(args.out), board=df):
            print(f"wrote {path}")
        return 0
    if args.action == "html":
        if not args.out:
            raise UserError("arena board html needs an output file: arena board html OUT.html")
        html = importlib.import_module("harness.results.html")
        html.write_html(df, Path(args.out), title=f"RobustArena {args.track} leaderboard")
        print(f"wrote {args.out}")
        return 0
    sort = args.sort or ("robust_acc" if "robust_acc" in df.columns else df.columns[0])
    if sort not in df.columns:
        raise UserError(f"--sort {sort!r} is not a column; choose one of: {', '.join(df.columns)}")
    df = df.sort_values(sort, ascending=args.ascending, kind="stable")
    cols = args.columns.split(",") if args.columns else [c for c in BOARD_VIEW if c in df.columns] or list(df.columns)
    if args.track == "evasion" and not args.columns:
        board_html = importlib.import_module("harness.results.html")
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


def main(argv: list[str]) -> int:
    return board_main(argv)
