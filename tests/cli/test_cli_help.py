"""Help that matches the command (issue 17, item 8): `arena poison --help` and `arena eval --help`
list the groups that command composes, `--cfg job` with `attack=NAME` shows what will run, and
`arena layers` takes the input shape from the dataset or `--input-shape` and says which it used.
"""
from __future__ import annotations

import re

import yaml

from harness.cli.dispatch import main
from harness.cli.hydra_app import group_options


def _groups(text: str) -> dict[str, list[str]]:
    block = text.split("== Configuration groups (group=option) ==", 1)[1].split("== Config", 1)[0]
    out = {}
    for line in filter(None, (l.strip() for l in block.splitlines())):
        group, _, rest = line.partition(": ")
        out[group] = rest.split("   (default")[0].split(", ")
    return out


def test_poison_help_is_about_poison(capsys):
    assert main(["poison", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("arena poison: the poisoning track.")
    assert "powered by Hydra" not in out and "hydra_app" not in out
    groups = _groups(out)
    assert list(groups) == ["dataset", "model", "poison", "defense"]  # conf/poison.yaml's defaults, nothing else
    assert groups["poison"] == group_options("poison")
    assert "arena poison -m poison=lsp,ar,ops,em" in out  # examples of this command


def test_eval_help_lists_eval_groups_only(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    groups = _groups(out)
    assert "poison" not in groups and {"suite", "attack", "threat", "defense"} <= set(groups)
    assert groups["suite"] == group_options("suite")


def test_cfg_job_shows_what_will_run(capsys):
    assert main(["eval", "--cfg", "job", "attack=pgd", "attack.steps=7"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first == "# attack=pgd runs alone; the suite (quick@v1) is not used"
    cfg = yaml.safe_load(rest)
    assert "suite" not in cfg and cfg["attack"]["name"] == "pgd" and cfg["attack"]["steps"] == 7
    assert main(["eval", "--cfg", "job"]) == 0  # no attack chosen: the suite is what runs, and is shown
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["suite"]["name"] == "quick" and cfg.get("attack") is None
    assert main(["eval", "--cfg", "job", "attack=nope"]) == 2  # bad input: still one line
    assert capsys.readouterr().err.strip().startswith("arena eval: error: unknown attack 'nope'")


def test_layers_input_shape_from_dataset_or_flag(capsys):
    assert main(["layers", "model=resnet18"]) == 0
    head, first = capsys.readouterr().out.splitlines()[:2]
    assert "input 1x28x28, from dataset=mnist5k, the eval default" in head and first.split()[-1] == "64x28x28"
    assert main(["layers", "model=resnet18", "dataset=cifar10"]) == 0
    head, first = capsys.readouterr().out.splitlines()[:2]
    assert "input 3x32x32, from dataset=cifar10" in head and first.split()[-1] == "64x32x32"
    assert main(["layers", "model=resnet18", "--input-shape", "3,64,64"]) == 0
    head, first = capsys.readouterr().out.splitlines()[:2]
    assert "input 3x64x64, as given" in head and first.split()[-1] == "64x64x64"
    assert main(["layers", "model=resnet18", "--input-shape", "3,64"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"arena layers: error: --input-shape '3,64' must be C,H,W, e\.g\. --input-shape 3,32,32", err)
