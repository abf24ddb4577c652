"""`arena board`: build, check and browse the leaderboards (terminal table, HTML page, plots).

`arena board check` verifies the store: every finished run's files (present, parseable, this
run's, records matching the manifest) and the leaderboard CSVs (columns, types), one line per
problem, exit status 1 when any is found.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from harness.core.errors import UserError

BOARD_VIEW = ["defense", "model", "dataset", "data_hash", "threat", "suite", "attacks_hash", "n_samples", "clean_acc",
              "robust_acc", "best_known_acc", "certified_acc", "forward_per_sample", "queries_per_sample", "randomized", "upper_bound",
              "masking_suspected"]


def match_rows(df: Any, column: str, value: str) -> Any:
    """The rows whose `column` matches `value` the way a researcher types it.

    Case-insensitive; an exact match wins, then a version-free one (`quick` for `quick@v1`), then a
    prefix (`linf` for `Linf-0.1`, `mnist` for `mnist5k`). A miss is one line listing the values
    the board has, never a silently empty table.
    """
    want = str(value).strip().lower()
    cells = df[column].astype(str)
    lower = cells.str.lower()
    for hit in (lower == want, lower.str.split("@").str[0] == want, lower.str.startswith(want)):
        if hit.any():
            return df[hit.to_numpy()]
    have = sorted(set(cells))
    raise UserError(f"--{column} {value!r} matches no row of this leaderboard; it has: {', '.join(have) or 'no rows'}")


def poisoning_schema() -> dict:
    """`harness.evasion.board.read` arguments for the poisoning board's CSV."""
    board = importlib.import_module("harness.poisoning.board")
    cols = list(board.COLUMNS)
    floats = tuple(c for c in cols if c.endswith(("_mean", "_std", "_s", "_per_sample")) or c in ("ratio", "clean_acc", "acc_drop"))
    ints = tuple(c for c in ("n_seeds", "epochs", "n_train", "n_poisoned", "n_test") if c in cols)
    return {"columns": cols, "floats": floats, "ints": ints, "bools": (), "required": tuple(c for c in board.KEY if c in cols)}


def check_store(work_dirs: list[Path], csvs: list[Path]) -> int:
    """`arena board check`: one line per damaged run or bad CSV; 0 when all is well, else 1."""
    from harness.evasion import board as leaderboard
    from harness.evasion.records import run_damage
    from harness.poisoning.board import RUN_KIND, SAMPLE_COLUMNS
    from harness.results.store import all_runs

    problems = ok = unfinished = 0
    for wd in work_dirs:
        for kind, command, damage in (("runs", "arena eval", run_damage),
                                      (RUN_KIND, "arena poison", lambda r: r.damage(SAMPLE_COLUMNS))):
            for run in all_runs(wd, kind):
                if not run.is_done():
                    unfinished += 1
                    continue
                problem = damage(run)
                if problem is None:
                    ok += 1
                else:
                    problems += 1
                    print(f"damaged run {run.key} ({run.path}): {problem}; {leaderboard.recompute_hint(run, command)}")
    for csv in csvs:
        if not csv.is_file():
            continue
        schema = poisoning_schema() if csv.name.startswith("poisoning") else {}
        try:
            leaderboard.read(csv, **schema)
        except UserError as exc:
            problems += 1
            print(f"bad {exc}")
    print(f"{ok} finished run(s) whole, {problems} problem(s), {unfinished} unfinished run(s) (resumed by their next `arena eval`)")
    return 1 if problems else 0


def export_main(argv: list[str]) -> int:
    """`arena board export --format robustbench OUT_DIR`: rows as RobustBench model_info JSON files."""
    from harness.evasion import board as leaderboard
    from harness.results.export import export_robustbench

    p = argparse.ArgumentParser(prog="arena board export", description="Write leaderboard rows in another benchmark's format.")
    p.add_argument("out", help="output directory (model_info/<dataset>/<threat>/<model>.json layout)")
    p.add_argument("--format", required=True, choices=["robustbench"], help="robustbench: one model_info JSON per row")
    p.add_argument("--work-dir", action="append", type=Path, help="work dir(s) with runs/ (default ./arena-work)")
    p.add_argument("--csv", type=Path, help="leaderboard CSV (default <work-dir>/leaderboard/evasion.csv)")
    for col in ("dataset", "threat", "defense", "suite"):
        p.add_argument(f"--{col}", help=f"only rows whose {col} is exactly this")
    args = p.parse_args(argv)
    work_dirs = args.work_dir or [Path("arena-work")]
    df = leaderboard.read(args.csv or work_dirs[0] / "leaderboard" / "evasion.csv")
    for col in ("dataset", "threat", "defense", "suite"):
        if getattr(args, col) is not None:
            df = df[df[col].astype(str) == getattr(args, col)]
    if df.empty:
        raise UserError("no leaderboard row to export; check the filters or run `arena board build`")
    for path, notes in export_robustbench(df, Path(args.out), work_dirs):
        print(f"wrote {path}" + (f"  (not a RobustBench track yet: {'; '.join(notes)})" if notes else ""))
    return 0


def board_main(argv: list[str]) -> int:
    """`arena board` (show), `arena board build`, `arena board html OUT`, `arena board export ...`."""
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    from harness.evasion import board as leaderboard
    from harness.results.terminal import print_board

    p = argparse.ArgumentParser(prog="arena board", description="Build or browse the leaderboards.")
    p.add_argument("action", nargs="?", default="show", choices=["show", "build", "check", "html", "plot"])
    p.add_argument("out", nargs="?", help="output file for `html`, output directory for `plot`")
    p.add_argument("--track", default="evasion", choices=["evasion", "poisoning"])
    p.add_argument("--work-dir", action="append", type=Path, help="work dir(s) with runs/ (default ./arena-work)")
    p.add_argument("--csv", type=Path, help="leaderboard CSV (default <work-dir>/leaderboard/<track>.csv)")
    p.add_argument("--dataset"); p.add_argument("--threat"); p.add_argument("--defense"); p.add_argument("--suite")
    p.add_argument("--sort", default=None, help="column to sort by, descending (default: the board's ranking by "
                                                 "best_known_acc; upper-bound rows always after the others)")
    p.add_argument("--ascending", action="store_true")
    p.add_argument("--columns", help="comma-separated columns to show")
    p.add_argument("--matrix", action="store_true", help="poisoning: show the poison x defense matrix")
    p.add_argument("--attacks", action="store_true", help="evasion: add a robust-accuracy column after each attack")
    args = p.parse_args(argv)
    work_dirs = args.work_dir or [Path("arena-work")]
    csv = args.csv or work_dirs[0] / "leaderboard" / f"{args.track}.csv"
    if args.action == "check":
        csvs = [args.csv] if args.csv else [work_dirs[0] / "leaderboard" / f"{t}.csv" for t in ("evasion", "poisoning")]
        return check_store(work_dirs, csvs)
    if args.track == "poisoning":
        board = importlib.import_module("harness.poisoning.board")
        for col in ("threat", "suite"):
            if getattr(args, col) is not None:
                raise UserError(f"--{col} does not apply to the poisoning leaderboard (filters: --dataset, --defense)")
        if args.action == "build":
            df = board.build_poisoning_board(work_dirs[0], csv)
            print(f"wrote {csv} ({len(df)} rows)")
            return 0
        df = leaderboard.read(csv, **poisoning_schema())
        for col in ("dataset", "defense"):
            if getattr(args, col) is not None:
                df = match_rows(df, col, getattr(args, col))
        if args.attacks:
            raise UserError("--attacks applies to the evasion leaderboard (per-attack accuracy); the poisoning board has none")
        if args.matrix:
            print("clean test accuracy (%), final epoch, mean ± std over seeds [training accuracy on the data the defender got]")
            print(board.matrix(df, beside="train_acc").to_string())
            return 0
        if args.action == "show" and not args.columns:
            if args.sort:
                if args.sort not in df.columns:
                    raise UserError(f"--sort {args.sort!r} is not a column; choose one of: {', '.join(df.columns)}")
                df = df.sort_values(args.sort, ascending=args.ascending, kind="stable")
            print_board(df, [c for c in board.VIEW_COLUMNS if c in df.columns], title=f"poisoning leaderboard ({csv})")
            return 0
    else:
        if args.action == "build":
            df = leaderboard.build(work_dirs, csv)
            skipped = df.attrs.get("damaged") or []
            note = f", {len(skipped)} damaged run(s) skipped: `arena board check` lists them" if skipped else ""
            if not any((Path(wd) / "runs").is_dir() for wd in work_dirs):
                note += f"; no runs/ under {', '.join(str(wd) for wd in work_dirs)} yet"
            print(f"wrote {csv} ({len(df)} rows{note})")
            return 0
        if args.matrix:
            raise UserError("--matrix shows the poisoning board's poison x defense matrix; use it with --track poisoning")
        df = leaderboard.read(csv)
        for col in ("dataset", "threat", "defense", "suite"):
            if getattr(args, col) is not None:
                df = match_rows(df, col, getattr(args, col))
    if args.action == "plot":
        if not args.out:
            raise UserError("arena board plot needs an output directory: arena board plot OUT_DIR")
        plots = importlib.import_module("harness.results.plots")
        for line in plots.report(plots.write_plots(work_dirs, Path(args.out), board=df)):
            print(line)  # one line per file written, one per plot skipped and why
        return 0
    if args.action == "html":
        if not args.out:
            raise UserError("arena board html needs an output file: arena board html OUT.html")
        html = importlib.import_module("harness.results.html")
        html.write_html(df, Path(args.out), title=f"RobustArena {args.track} leaderboard")
        print(f"wrote {args.out}")
        return 0
    if args.sort is not None:
        if args.sort not in df.columns:
            raise UserError(f"--sort {args.sort!r} is not a column; choose one of: {', '.join(df.columns)}")
        keys = (["upper_bound"] if "upper_bound" in df.columns and args.sort != "upper_bound" else []) + [args.sort]
        df = df.sort_values(keys, ascending=[True] * (len(keys) - 1) + [args.ascending], kind="stable")
    elif args.ascending:
        raise UserError("--ascending needs --sort COLUMN")
    cols = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else \
        [c for c in BOARD_VIEW if c in df.columns] or list(df.columns)
    if args.track == "evasion":
        board_html = importlib.import_module("harness.results.html")
        df = df.assign(flags=df.apply(board_html.flags_text, axis=1) if len(df) else "")  # shown by default, asked for by name
    if args.track == "evasion" and not args.columns:
        cols = [c for c in cols if c not in ("randomized", "upper_bound", "masking_suspected")] + ["flags"]
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
