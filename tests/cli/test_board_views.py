"""What people read off the leaderboard (issue 17, items 5 and 6), from real runs on digits.

- one number format: accuracies as percent with one decimal in the terminal and on the page,
  fractions in summary.json, percent in the CSV (leaderboard/README.md, "Number formats");
- the HTML board's compact default view fits 1400 px in headless Chromium (measured by the page's
  own script and checked on a screenshot), column groups expand and live in the URL;
- `arena board plot`: points only where measured, one line through the points of an
  `arena eval -m threat.eps=...` sweep, no file when there is nothing to plot;
- `arena board export --format robustbench`: RobustBench model_info JSON with their field names.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from harness.cli.dispatch import main

from helpers import REPO
BASE = ["dataset=digits", "model.width=8", "model.hidden=32", "n_samples=40", "progress=false"]
EPS = (0.05, 0.1, 0.2)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """An eps sweep (one model), a single-eps run of another model, a black-box run."""
    work = tmp_path_factory.mktemp("arena-work")
    common = [*BASE, f"work_dir={work}"]
    assert main(["eval", "-m", "threat.eps=" + ",".join(map(str, EPS)), *common, "defense.train.epochs=3"]) == 0
    assert main(["eval", *common, "defense.train.epochs=1", "threat.eps=0.1"]) == 0
    assert main(["eval", *common, "defense.train.epochs=3", "threat.eps=0.1", "attack=square", "attack.budget=50",
                 "n_samples=20"]) == 0
    return work


def _board(work: Path) -> pd.DataFrame:
    return pd.read_csv(work / "leaderboard" / "evasion.csv")


# ------------------------------------------------------------------------------ number formats


def test_one_number_format_for_people_and_the_machine_formats(work, capsys):
    board = _board(work)
    for run in (work / "runs").iterdir():  # summary.json: fractions at full precision
        summary = json.loads((run / "summary.json").read_text())
        row = board[board["config_hash"] == run.name].iloc[0]
        assert 0.0 <= summary["robust_acc"] <= 1.0
        assert row["robust_acc"] == pytest.approx(round(100 * summary["robust_acc"], 2))  # CSV: percent
    capsys.readouterr()
    assert main(["board", "--work-dir", str(work), "--columns", "defense,suite,clean_acc,robust_acc,best_known_acc"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("│")]
    cells = [[c.strip() for c in r.strip("│").split("│")] for r in rows]
    assert len(cells) == len(board)
    for c in cells:
        assert all(re.fullmatch(r"\d{1,3}\.\d", v) for v in c[2:]), c  # 48.0 and 48.5, never 48


def test_committed_board_shows_one_decimal(capsys):
    assert main(["board", "--csv", str(REPO / "leaderboard" / "evasion.csv")]) == 0
    out = capsys.readouterr().out
    header = next(l for l in out.splitlines() if "robust_acc" in l)
    cols = [c.strip() for c in header.strip("┃").split("┃")]
    rows = [[c.strip() for c in l.strip("│").split("│")] for l in out.splitlines() if l.startswith("│")]
    for name in ("clean_acc", "robust_acc", "best_known_acc"):
        i = cols.index(name)
        assert all(re.fullmatch(r"\d{1,3}\.\d", r[i]) for r in rows), name


# ------------------------------------------------------------------------------------- plots


def test_eps_sweep_is_one_line_through_measured_points(work, tmp_path):
    from harness.results.plots import eps_series, write_plots

    board = _board(work)
    series = [s for s in eps_series(board, []) if s.label.startswith("standard / quick@v1")]
    sweep = [s for s in series if len(s.eps) > 1]
    single = [s for s in series if len(s.eps) == 1]
    assert len(sweep) == 1 and len(single) == 1  # other model: its own point, not on the sweep's line
    (line,) = sweep
    assert line.eps == sorted(EPS)
    swept = board.loc[board["eps"] == 0.2, "defense_id"].iloc[0]
    measured = board[(board["defense_id"] == swept) & (board["suite"] == "quick@v1")].sort_values("eps")
    assert line.robust == list(measured["robust_acc"])  # exactly the measured points, nothing at eps 0
    assert 0.0 not in line.eps and line.clean == measured["clean_acc"].max()
    paths = write_plots([work], tmp_path / "plots")
    assert [p.name for p in paths] == ["robust_acc_vs_eps.png", "queries_to_success.png"]
    assert not (tmp_path / "plots" / "attack_convergence.png").exists()  # no health report: no placeholder
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_no_plot_files_when_there_is_nothing_to_plot(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    assert main(["board", "build", "--work-dir", str(empty)]) == 0  # a board with no rows, as the harness writes it
    capsys.readouterr()
    assert main(["board", "plot", str(tmp_path / "out"), "--work-dir", str(empty)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not (tmp_path / "out").exists()
    assert out == ["no robust_acc_vs_eps.png: no leaderboard row with a robust accuracy (run `arena eval` first)",
                   "no queries_to_success.png: no score-based (black-box) attack in the runs",
                   "no attack_convergence.png: no health report in the runs (`arena submit` writes one)"]


# ------------------------------------------------------------------------------------ export


def test_export_robustbench_model_info(work, tmp_path, capsys):
    assert main(["board", "export", "--format", "robustbench", str(tmp_path / "rb"), "--work-dir", str(work)]) == 0
    lines = capsys.readouterr().out.splitlines()
    files = sorted((tmp_path / "rb" / "digits" / "Linf").glob("*.json"))
    board = _board(work)
    assert len(files) == len(board) == len(lines)
    assert all("not a RobustBench track yet: RobustBench has no digits Linf leaderboard" in l for l in lines)
    fields = ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
              "architecture", "eps", "clean_acc", "reported"]
    for f in files:
        info = json.loads(f.read_text())
        assert list(info)[:len(fields)] == fields  # RobustBench's ModelInfo field order
        row = board[board["config_hash"] == re.search(r"run ([0-9a-f]{16})", info["footnote"]).group(1)].iloc[0]
        assert info["clean_acc"] == f"{row['clean_acc']:.2f}"  # strings of percentages, two decimals
        assert info["external"] == f"{min(row['robust_acc'], row['best_known_acc']):.2f}"  # not AutoAttack standard
        assert "autoattack_acc" not in info and info["unreliable"] is False
        assert info["eps"] == {0.05: "0.05", 0.1: "0.1", 0.2: "0.2"}[row["eps"]]
        assert row["command"] in info["footnote"]
    from harness.results.export import eps_text

    assert [eps_text(e) for e in (8 / 255, 0.0313725, 0.03137, 2 / 255, 0.5, 0.3)] == ["8/255"] * 3 + ["2/255", "0.5", "0.3"]


# ------------------------------------------------------------------------ HTML in a browser


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1400,900", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _body(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def test_compact_view_fits_1400px_in_headless_chromium(work, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium found (apt-get install -y chromium); the width check needs a real browser")
    from harness.results.html import COMPACT, write_html

    # the committed leaderboard (25 real rows, long threat names) plus this module's runs
    df = pd.concat([pd.read_csv(REPO / "leaderboard" / "evasion.csv"), _board(work)], ignore_index=True)
    page = write_html(df, tmp_path / "board.html", title="RobustArena evasion leaderboard")
    profile = tmp_path / "profile"
    dom = _chromium(browser, profile, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-1500:]
    body = _body(dom.stdout)
    assert body.get("data-ready") == "1", "the page's script did not run"
    assert int(body["data-table-right"]) <= 1400 and int(body["data-page-width"]) <= 1400, body
    wide = _body(_chromium(browser, profile, "--virtual-time-budget=5000", "--dump-dom",
                           page.as_uri() + "#show=attacks,cost,details,provenance").stdout)
    assert int(wide["data-table-right"]) > int(body["data-table-right"])  # the groups add columns
    # the default view holds exactly the compact columns
    heads = re.findall(r'<th data-col="([^"]+)"[^>]*data-group="main"', dom.stdout)
    assert heads == list(COMPACT)
    # and a screenshot of it: nothing drawn in the right margin (no column cut at the window edge)
    shot = tmp_path / "board.png"
    done = _chromium(browser, profile, "--virtual-time-budget=5000", f"--screenshot={shot}", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-1500:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))
    assert pixels.shape[1] == 1400
    margin = pixels[:, -24:, :3]
    assert (margin > 0.97).all(), "something is drawn in the rightmost 24 px"
