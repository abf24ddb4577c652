"""`arena board html OUT`: the leaderboard as one self-contained, sortable and filterable HTML page.

Everything is inline (CSS, JavaScript, data): no network asset, no external font, so the page
opens from a file, an e-mail attachment or an offline mirror. The rows are rendered into the
table server-side (a reader without JavaScript still sees every row); the script adds

- a compact default view that fits a 1400 px screen: defense, model, dataset, threat, suite,
  clean, robust and best-known accuracy, cost (model passes per sample: forward + backward +
  queries) and flags; check boxes expand column groups: per-attack robust accuracy (from the
  `cascade` column: `pgd-ce=57.2;square=55.0` becomes `after pgd-ce`, `after square`), cost
  details, details of the measurement (n, eps, randomised accuracies, flags one by one) and
  provenance (config hash, versions, command);
- sorting: click a column header (numbers numerically, missing values last; a second click
  reverses); ties keep the leaderboard's order;
- filtering: a text box over every cell, one menu per dataset / threat / suite, and check boxes
  for flagged rows (masking suspected) and submissions;
- state in the URL fragment (`#sort=robust_acc&dir=asc&q=resnet&dataset=cifar10&flagged=1&show=attacks,cost`),
  so a view can be linked; opening such a link applies it through the same click and input
  handlers a user triggers (sorting by a column of a hidden group opens the group).

Accuracies are percent with one decimal (`harness.core.formats`), as in the terminal and plots.
After loading, the script records the table's right edge and the page's scroll width in
`data-table-right` / `data-page-width` on <body>, which the headless-Chromium test reads.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.atomic import atomic_write_text, strict_dumps
from harness.core.formats import ATTACK_PREFIX, cell as format_cell

FLAG_COLUMNS = ("masking_suspected", "upper_bound", "randomized", "ensemble", "submission")
FILTER_COLUMNS = ("dataset", "threat", "suite")
COMPACT = ("defense", "model", "dataset", "threat", "suite", "clean_acc", "robust_acc", "best_known_acc", "certified_acc", "cost",
           "flags")
COST_COLUMNS = ("forward_per_sample", "backward_per_sample", "queries_per_sample", "attack_time_s", "train_time_s",
                "train_passes", "params")
PROVENANCE_COLUMNS = ("config_hash", "defense_id", "seed", "harness_version", "git", "finished", "command")
# (group id, check-box label); the compact columns are always shown
GROUPS = (("attacks", "per-attack accuracy"), ("cost", "cost details"), ("details", "details"), ("provenance", "provenance"))
LABELS = {"clean_acc": "clean %", "robust_acc": "robust %", "best_known_acc": "best known %", "certified_acc": "certified %", "cost": "passes / sample",
          "robust_acc_mean": "robust mean %", "robust_acc_majority": "robust majority %", "n_samples": "n"}
TITLES = {"cost": "model passes per evaluated sample spent by the attacks: forward + backward + black-box queries",
          "robust_acc": "worst case per sample over the suite's attacks (and over draws for randomised defenses)",
          "best_known_acc": "union of the successes of every run on the same model, data and threat model",
          "clean_acc": "clean accuracy (mean over draws for randomised defenses)"}
LEAD_COLUMNS = COMPACT  # kept for callers of the earlier name


def expand_cascade(df: pd.DataFrame) -> pd.DataFrame:
    """Per-attack columns `after <attack>` (robust accuracy after that stage) parsed from `cascade`."""
    if "cascade" not in df.columns:
        return df
    parsed: list[dict[str, float]] = []
    labels: list[str] = []
    for text in df["cascade"].fillna("").astype(str):
        entry: dict[str, float] = {}
        for part in filter(None, text.split(";")):
            label, _, value = part.rpartition("=")
            try:
                entry[label] = float(value)
            except ValueError:
                continue
            if label not in labels:
                labels.append(label)
        parsed.append(entry)
    out = df.copy()
    for label in labels:
        out[ATTACK_PREFIX + label] = [p.get(label, float("nan")) for p in parsed]
    return out


def flags_text(row: pd.Series) -> str:
    """Short flag summary of a row, e.g. `masking? randomized submission`."""
    names = {"masking_suspected": "masking?", "upper_bound": "upper-bound", "randomized": "randomized",
             "ensemble": "ensemble", "submission": "submission"}
    return " ".join(names[c] for c in FLAG_COLUMNS if c in row.index and _truthy(row[c]))


def cost_per_sample(df: pd.DataFrame) -> pd.Series:
    """Model passes per evaluated sample: forward + backward image-passes + queries (one forward each)."""
    parts = [pd.to_numeric(df[c], errors="coerce").fillna(0.0) for c in
             ("forward_per_sample", "backward_per_sample", "queries_per_sample") if c in df.columns]
    if not parts:
        return pd.Series([float("nan")] * len(df), index=df.index)
    return sum(parts[1:], parts[0]).round(1)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    try:
        return bool(value) and not (isinstance(value, float) and math.isnan(value))
    except (TypeError, ValueError):
        return False


def column_group(column: str) -> str:
    """`main` (the compact view) or the id of the group that expands to show the column."""
    if column in COMPACT:
        return "main"
    if column.startswith(ATTACK_PREFIX):
        return "attacks"
    if column in COST_COLUMNS:
        return "cost"
    if column in PROVENANCE_COLUMNS:
        return "provenance"
    return "details"


def _ordered_columns(df: pd.DataFrame) -> list[str]:
    order = {g: i for i, g in enumerate(["main", *(g for g, _ in GROUPS)])}
    lead = [c for c in COMPACT if c in df.columns]
    rest = [c for c in df.columns if c not in lead and c != "cascade"]
    first = {"details": ["n_samples", "norm", "eps", "robust_acc_mean", "robust_acc_majority"], "cost": list(COST_COLUMNS),
             "provenance": list(PROVENANCE_COLUMNS)}
    def key(c: str) -> tuple[int, int]:
        g = column_group(c)
        pref = first.get(g, [])
        return order[g], pref.index(c) if c in pref else len(pref)
    return [*lead, *sorted(rest, key=key)]


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _format(column: str, value: Any) -> tuple[str, str]:
    """(display text, sort value) of one cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", ""
    if isinstance(value, float):
        if column == "cost":  # passes per sample: the fraction says nothing
            return f"{value:.0f}", repr(value)
        return format_cell(column, value), repr(value)
    return format_cell(column, value), str(value)


CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2em;color:#1b1f24;background:#fff}
h1{font-size:1.35em;margin:0 0 .3em}
.meta{color:#57606a;margin:0 0 .8em;max-width:80em}
#controls,#groups{display:flex;flex-wrap:wrap;gap:.6em;align-items:center;margin-bottom:.6em}
#controls input[type=search]{min-width:18em;padding:.3em .5em}
#controls select{padding:.25em}
#groups{color:#57606a}
#count{color:#57606a}
.wrap{overflow-x:auto;border:1px solid #d0d7de;border-radius:6px;width:fit-content;max-width:100%}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;white-space:nowrap}
th,td{padding:.3em .6em;border-bottom:1px solid #eaeef2;text-align:left}
td.num{text-align:right}
th{position:sticky;top:0;background:#f6f8fa;z-index:1}
th button{all:unset;cursor:pointer;font-weight:600}
th[aria-sort=ascending] button::after{content:" \\25B2"}
th[aria-sort=descending] button::after{content:" \\25BC"}
tbody tr:hover{background:#f6f8fa}
tr.flagged td:first-child{box-shadow:inset 4px 0 #cf222e}
.badge{display:inline-block;padding:0 .45em;border-radius:1em;font-size:.85em;background:#ddf4ff;color:#0969da;margin-right:.2em}
.badge.warn{background:#ffebe9;color:#cf222e;font-weight:600}
td.long{max-width:28em;overflow:hidden;text-overflow:ellipsis}
td.clip{max-width:14em;overflow:hidden;text-overflow:ellipsis}
th.g-attacks,td.g-attacks{background:#fbfdff}
#board .g-attacks,#board .g-cost,#board .g-details,#board .g-provenance{display:none}
#board.show-attacks .g-attacks,#board.show-cost .g-cost,#board.show-details .g-details,#board.show-provenance .g-provenance{display:table-cell}
"""

SCRIPT = r"""
(function(){
  var table=document.getElementById('board'), tbody=table.tBodies[0];
  var heads=[].slice.call(table.tHead.rows[0].cells);
  var state={sort:'',dir:''};
  var groups=[].slice.call(document.querySelectorAll('input[type=checkbox][data-group]'));
  function cellValue(row,i){var c=row.cells[i];return c?c.getAttribute('data-v'):'';}
  function showGroup(g,on){
    groups.forEach(function(c){if(c.getAttribute('data-group')===g)c.checked=on;});
    if(on){table.classList.add('show-'+g);}else{table.classList.remove('show-'+g);}
  }
  function sortBy(i,dir){
    var numeric=heads[i].getAttribute('data-type')==='num', sign=dir==='desc'?-1:1;
    var rows=[].slice.call(tbody.rows);
    rows.sort(function(a,b){
      var x=cellValue(a,i), y=cellValue(b,i), r=0;
      if(x===''&&y!=='') return 1; if(y===''&&x!=='') return -1;
      if(numeric){r=parseFloat(x)-parseFloat(y);} else {r=x.localeCompare(y);}
      if(r!==0) return sign*r;
      return parseInt(a.getAttribute('data-row'),10)-parseInt(b.getAttribute('data-row'),10);
    });
    rows.forEach(function(r){tbody.appendChild(r);});
    heads.forEach(function(h){h.setAttribute('aria-sort','none');});
    heads[i].setAttribute('aria-sort',dir==='desc'?'descending':'ascending');
    state.sort=heads[i].getAttribute('data-col'); state.dir=dir;
    var g=heads[i].getAttribute('data-group');
    if(g&&g!=='main'&&!table.classList.contains('show-'+g)) showGroup(g,true);
    document.body.setAttribute('data-sorted',state.sort+':'+dir);
    saveHash();
  }
  heads.forEach(function(h,i){
    h.querySelector('button').addEventListener('click',function(){
      var cur=h.getAttribute('aria-sort');
      var first=h.getAttribute('data-type')==='num'?'desc':'asc';
      var dir=cur==='ascending'?'desc':(cur==='descending'?'asc':first);
      sortBy(i,dir);
    });
  });
  var q=document.getElementById('q'), selects=[].slice.call(document.querySelectorAll('select[data-col]'));
  var checks=[].slice.call(document.querySelectorAll('input[type=checkbox][data-col]'));
  function colIndex(name){for(var i=0;i<heads.length;i++){if(heads[i].getAttribute('data-col')===name)return i;}return -1;}
  function applyFilter(){
    var text=q.value.trim().toLowerCase(), shown=0;
    [].slice.call(tbody.rows).forEach(function(r){
      var ok=!text||r.textContent.toLowerCase().indexOf(text)>=0;
      selects.forEach(function(s){var i=colIndex(s.getAttribute('data-col'));if(ok&&s.value&&i>=0&&cellValue(r,i)!==s.value)ok=false;});
      checks.forEach(function(c){var i=colIndex(c.getAttribute('data-col'));if(ok&&c.checked&&i>=0&&cellValue(r,i)!=='True')ok=false;});
      if(ok){r.removeAttribute('hidden');shown++;}else{r.setAttribute('hidden','');}
    });
    document.getElementById('count').textContent=shown+' of '+tbody.rows.length+' rows';
    document.body.setAttribute('data-shown',String(shown));
    saveHash();
  }
  q.addEventListener('input',applyFilter);
  selects.forEach(function(s){s.addEventListener('change',applyFilter);});
  checks.forEach(function(c){c.addEventListener('change',applyFilter);});
  groups.forEach(function(c){c.addEventListener('change',function(){showGroup(c.getAttribute('data-group'),c.checked);measure();saveHash();});});
  var loading=true;
  function saveHash(){
    if(loading||!window.history||!history.replaceState) return;
    var parts=[];
    if(state.sort){parts.push('sort='+encodeURIComponent(state.sort));parts.push('dir='+state.dir);}
    if(q.value) parts.push('q='+encodeURIComponent(q.value));
    selects.forEach(function(s){if(s.value)parts.push(s.getAttribute('data-col')+'='+encodeURIComponent(s.value));});
    checks.forEach(function(c){if(c.checked)parts.push(c.getAttribute('data-key')+'=1');});
    var shownGroups=groups.filter(function(c){return c.checked;}).map(function(c){return c.getAttribute('data-group');});
    if(shownGroups.length) parts.push('show='+shownGroups.join(','));
    history.replaceState(null,'',parts.length?'#'+parts.join('&'):location.pathname+location.search);
  }
  function measure(){
    document.body.setAttribute('data-table-right',String(Math.ceil(table.getBoundingClientRect().right)));
    document.body.setAttribute('data-page-width',String(document.documentElement.scrollWidth));
  }
  function applyHash(){
    loading=true;
    var params={};
    location.hash.replace(/^#/,'').split('&').forEach(function(p){if(!p)return;var kv=p.split('=');params[decodeURIComponent(kv[0])]=decodeURIComponent(kv.slice(1).join('=')||'');});
    if(params.q!==undefined){q.value=params.q;}
    selects.forEach(function(s){var v=params[s.getAttribute('data-col')];if(v!==undefined)s.value=v;});
    checks.forEach(function(c){c.checked=params[c.getAttribute('data-key')]==='1';});
    var wanted=(params.show||'').split(',');
    groups.forEach(function(c){var g=c.getAttribute('data-group');showGroup(g,wanted.indexOf(g)>=0);});
    q.dispatchEvent(new Event('input'));
    if(params.sort){
      var i=colIndex(params.sort), want=params.dir==='desc'?'descending':'ascending';
      if(i>=0){var b=heads[i].querySelector('button');for(var k=0;k<3&&heads[i].getAttribute('aria-sort')!==want;k++){b.click();}}
    }
    loading=false;
    measure();
    document.body.setAttribute('data-ready','1');
  }
  window.addEventListener('hashchange',applyHash);
  applyHash();
})();
"""


def _flags_cell(row: pd.Series) -> tuple[str, str]:
    """(html, data-v) of the compact flags cell: one badge per flag that is set."""
    badges = []
    for c in FLAG_COLUMNS:
        if c in row.index and _truthy(row[c]):
            badges.append('<span class="badge warn">masking suspected</span>' if c == "masking_suspected"
                          else f'<span class="badge">{html.escape(c)}</span>')
    return "".join(badges), flags_text(row)


def render_html(df: pd.DataFrame, title: str) -> str:
    """The page as a string (see module doc)."""
    df = expand_cascade(df.reset_index(drop=True))
    if "cost" not in df.columns:
        df = df.assign(cost=cost_per_sample(df))
    if "flags" in df.columns:
        df = df.drop(columns=["flags"])
    df = df.assign(flags="")
    cols = _ordered_columns(df)
    numeric = {c: _is_numeric(df[c]) for c in cols}
    head = []
    for c in cols:
        label = LABELS.get(c, c.replace("_", " "))
        kind = "num" if numeric[c] else "text"
        group = column_group(c)
        tip = TITLES.get(c, c)
        head.append(f'<th data-col="{html.escape(c)}" data-type="{kind}" data-group="{group}" class="g-{group}" '
                    f'aria-sort="none" scope="col" title="{html.escape(tip, quote=True)}">'
                    f'<button type="button">{html.escape(label)}</button></th>')
    body = []
    for i, row in df.iterrows():
        cells = []
        for c in cols:
            group = column_group(c)
            cls = [f"g-{group}"]
            if c == "flags":
                shown, value = _flags_cell(row)
                cells.append(f'<td data-v="{html.escape(value, quote=True)}" class="{" ".join(cls)}">{shown}</td>')
                continue
            if c in FLAG_COLUMNS:
                value = "True" if _truthy(row[c]) else "False"
                cells.append(f'<td data-v="{value}" class="{" ".join(cls)}">{"yes" if value == "True" else ""}</td>')
                continue
            text, value = _format(c, row[c])
            if numeric[c]:
                cls.append("num")
            if c in ("command", "git") or len(text) > 60:
                cls.append("long")
            elif c in ("defense", "model", "suite", "dataset"):
                cls.append("clip")
            cells.append(f'<td data-v="{html.escape(value, quote=True)}" class="{" ".join(cls)}" '
                         f'title="{html.escape(text, quote=True)}">{html.escape(text)}</td>')
        flagged = ' class="flagged"' if "masking_suspected" in df.columns and _truthy(row["masking_suspected"]) else ""
        body.append(f'<tr data-row="{i}"{flagged}>{"".join(cells)}</tr>')
    controls = ['<input id="q" type="search" placeholder="filter: text in any cell" aria-label="filter rows">']
    for c in FILTER_COLUMNS:
        if c not in df.columns:
            continue
        values = sorted({str(v) for v in df[c].dropna()})
        opts = "".join(f'<option value="{html.escape(v, quote=True)}">{html.escape(v)}</option>' for v in values)
        controls.append(f'<select data-col="{c}" aria-label="{c}"><option value="">all {c}s</option>{opts}</select>')
    if "masking_suspected" in df.columns:
        controls.append('<label><input type="checkbox" data-col="masking_suspected" data-key="flagged"> masking suspected only</label>')
    if "submission" in df.columns:
        controls.append('<label><input type="checkbox" data-col="submission" data-key="submissions"> submissions only</label>')
    controls.append(f'<span id="count">{len(df)} of {len(df)} rows</span>')
    present = {column_group(c) for c in cols}
    toggles = ["<span>show columns:</span>"] + [
        f'<label><input type="checkbox" data-group="{g}"> {html.escape(label)}</label>' for g, label in GROUPS if g in present]
    meta_json = strict_dumps({"rows": len(df), "columns": cols, "groups": {c: column_group(c) for c in cols}},
                             indent=None).replace("</", "<\\/")
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f"<p class=\"meta\">{len(df)} rows. Accuracies in percent; robust accuracy is the worst case per sample over "
        f"the suite, best known the union of every run's successes on the same model. Click a column header to sort; "
        f"a red edge marks rows whose health report suspects gradient masking.</p>\n"
        f"<div id=\"controls\">{''.join(controls)}</div>\n"
        f"<div id=\"groups\">{''.join(toggles)}</div>\n"
        f"<div class=\"wrap\"><table id=\"board\"><thead><tr>{''.join(head)}</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + "\n</tbody></table></div>\n"
        f"<script type=\"application/json\" id=\"board-meta\">{meta_json}</script>\n"
        f"<script>{SCRIPT}</script>\n</body></html>\n"
    )


def write_html(df: pd.DataFrame, out_path: Path | str, title: str = "RobustArena leaderboard") -> Path:
    """Write the page atomically to `out_path` (parent directories created)."""
    out = Path(out_path)
    atomic_write_text(out, render_html(df, title))
    return out
