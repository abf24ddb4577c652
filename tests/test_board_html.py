"""`arena board html OUT`: one self-contained page, opened in a real headless Chromium.

The leaderboard comes from real runs on the digits dataset (two training budgets, two eps, one
black-box run). The page must hold exactly the leaderboard's rows and load nothing from a
network; in Chromium, sorting by a column (the page's own click handler, triggered through the
URL fragment) must change the row order to the sorted one, and the filters must hide rows. The
browser test skips with the reason when no Chromium is installed (`apt-get install -y chromium`).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from harness.results.html import expand_cascade, write_html

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """A leaderboard CSV built from four real runs; returns (table as read back, work dir)."""
    from harness.evasion import board as leaderboard
    from harness.api import run_eval

    work = tmp_path_factory.mktemp("arena-work")
    base = ["dataset=digits", "model=small_cnn", "model.width=8", "model.hidden=32", "n_samples=40"]
    for extra in (["defense.train.epochs=1", "threat.eps=0.1"], ["defense.train.epochs=1", "threat.eps=0.3"],
                  ["defense.train.epochs=4", "threat.eps=0.1"],
                  ["defense.train.epochs=4", "threat.eps=0.1", "attack=square", "attack.budget=50", "n_samples=20"]):
        run_eval(base + extra, work)
    csv = work / "leaderboard" / "evasion.csv"
    leaderboard.build([work], csv)
    df = pd.read_csv(csv)
    assert len(df) == 4
    return df, work


class _Rows(HTMLParser):
    """Collects tbody rows: (data-row, hidden?, {column: data-v}) in document order, and resource links."""

    def __init__(self) -> None:
        super().__init__()
        self.cols: list[str] = []
        self.rows: list[dict] = []
        self.body_attrs: dict[str, str] = {}
        self.resources: list[str] = []
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body_attrs = {k: v or "" for k, v in a.items()}
        if tag == "th" and "data-col" in a:
            self.cols.append(a["data-col"])
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self.rows.append({"row": int(a["data-row"]), "hidden": "hidden" in a, "cells": []})
        if tag == "td" and self._in_body:
            self.rows[-1]["cells"].append(a.get("data-v", ""))
        if tag in ("script", "img", "iframe", "link", "source") and (a.get("src") or a.get("href")):
            self.resources.append(a.get("src") or a.get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False

    def column(self, name: str, visible_only: bool = False) -> list[str]:
        i = self.cols.index(name)
        return [r["cells"][i] for r in self.rows if not (visible_only and r["hidden"])]


def _parse(text: str) -> _Rows:
    p = _Rows()
    p.feed(text)
    return p


def test_page_is_self_contained_and_holds_the_rows(board, tmp_path):
    df, _ = board
    out = write_html(df, tmp_path / "sub" / "board.html", title="RobustArena evasion leaderboard")
    text = out.read_text()
    page = _parse(text)
    assert not page.resources, page.resources  # no script/img/link pulled from anywhere
    assert not re.search(r"@import|url\(|https?://[^\"' ]*\.(js|css|woff2?)", text)
    assert sorted(page.column("config_hash")) == sorted(df["config_hash"])
    assert [r["row"] for r in page.rows] == list(range(len(df)))  # the leaderboard's order
    assert page.column("config_hash") == list(df["config_hash"])
    # per-attack columns from the cascade, flags as columns
    assert "after pgd-ce" in page.cols and "after pgd-margin" in page.cols and "after square" in page.cols
    assert "masking_suspected" in page.cols and "cascade" not in page.cols


def test_expand_cascade_gives_numeric_per_attack_columns(board):
    df, _ = board
    wide = expand_cascade(df)
    quick = wide[wide["suite"] == "quick@v1"]
    assert quick["after pgd-ce"].notna().all() and quick["after square"].isna().all()
    assert (quick["after pgd-margin"] <= quick["after pgd-ce"]).all()  # a cascade only goes down
    assert (wide.loc[wide["suite"] == "quick@v1", "after pgd-margin"] == wide.loc[wide["suite"] == "quick@v1", "robust_acc"]).all()


def test_cli_writes_the_page_and_plots(board, tmp_path):
    from harness.cli.dispatch import main
    from harness.results.plots import write_plots

    df, work = board
    out = tmp_path / "board.html"
    assert main(["board", "html", str(out), "--work-dir", str(work)]) == 0
    assert sorted(_parse(out.read_text()).column("config_hash")) == sorted(df["config_hash"])
    paths = write_plots([work], tmp_path / "plots")
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths)


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _dump(browser: str, page: Path, fragment: str, profile: Path) -> _Rows:
    """The DOM after load (scripts run) of `page#fragment` in headless Chromium."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri() + fragment]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "<tbody" in done.stdout, done.stderr[-2000:]
    dom = _parse(done.stdout)
    assert dom.body_attrs.get("data-ready") == "1", "the page's script did not run"
    return dom


def _expected(df: pd.DataFrame, col: str, asc: bool) -> list[str]:
    """The order the page promises: by value, missing last, ties in leaderboard order."""
    key = df[col]
    present, missing = df[key.notna()], df[key.isna()]
    order = present.assign(_i=range(len(present))).sort_values([col, "_i"], ascending=[asc, True], kind="stable")
    return list(order["config_hash"]) + list(missing["config_hash"])


def test_sorting_and_filtering_in_headless_chromium(board, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium found (apt-get install -y chromium); the page's sorting needs a real browser to test")
    df, _ = board
    page = write_html(df, tmp_path / "board.html", title="board")
    profile = tmp_path / "profile"
    default = _dump(browser, page, "", profile).column("config_hash")
    assert default == list(df["config_hash"])  # scripts ran, nothing reordered
    # a column whose sorted order differs from the leaderboard's
    candidates = [(c, asc) for c in ("eps", "clean_acc", "robust_acc", "queries_per_sample") for asc in (True, False)]
    col, asc = next((c, a) for c, a in candidates if _expected(df, c, a) != default)
    dom = _dump(browser, page, f"#sort={col}&dir={'asc' if asc else 'desc'}", profile)
    assert dom.body_attrs.get("data-sorted") == f"{col}:{'asc' if asc else 'desc'}"
    assert dom.column("config_hash") == _expected(df, col, asc) != default
    other = _dump(browser, page, f"#sort={col}&dir={'desc' if asc else 'asc'}", profile)
    assert other.column("config_hash") == _expected(df, col, not asc)
    # filters: free text, a select, and the flag check box
    one = df["config_hash"].iloc[1]
    dom = _dump(browser, page, f"#q={one}", profile)
    assert dom.column("config_hash", visible_only=True) == [one] and dom.body_attrs.get("data-shown") == "1"
    dom = _dump(browser, page, "#threat=Linf-0.3", profile)
    assert dom.column("config_hash", visible_only=True) == list(df.loc[df["threat"] == "Linf-0.3", "config_hash"])
    dom = _dump(browser, page, "#flagged=1", profile)
    assert dom.column("config_hash", visible_only=True) == list(df.loc[df["masking_suspected"].astype(bool), "config_hash"])
