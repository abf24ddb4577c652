"""Every plugin against its config, and every plugin run once on real data.

The rule (docs/extending.md): a plugin's dataclass fields are its parameters and defaults.
`conf/<group>/<name>.yaml` for a registered `<name>` *mirrors* it: every field is listed and every
value equals the field's default (a field that follows the evaluation's threat is written
`${threat.eps}` / `${threat.norm}`; nested recipes such as `train:` may leave out fields that keep
their default). Any other file in the group is a *preset* of the plugin its `name:` names
(`apgd_ce` = autoattack, `wrn34_10` = wrn): its keys must be fields, its values may differ, like a
suite's attack entries. Every resolved YAML and every suite entry must build.

Then one batch of every attack (every conf/attack file, through `arena eval`'s code path), one
build of every defense (tiny training) and one generation of every poison, all on `digits`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.api import run_eval
from harness.cli.hydra_app import CONF_DIR
from harness.core.attack import ATTACKS
from harness.core.contract import check_classifier
from harness.core.defense import DEFENSES, BuildContext
from harness.core.poison import POISONS, generate
from harness.core.registry import Registry, keys_of
from harness.core.threat import ThreatModel
from harness.data.datasets import DATASETS, load_dataset
from harness.data.models import MODELS
from harness.data.training import to_unit
from helpers import mirror_problems, plugin_of

GROUPS: dict[str, tuple[str, Registry]] = {  # group -> (the config that has it, its registry)
    "attack": ("eval", ATTACKS), "defense": ("eval", DEFENSES), "poison": ("poison", POISONS),
    "dataset": ("eval", DATASETS), "model": ("eval", MODELS),
}
FILES = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.fixture(scope="module")
def composed() -> dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]]:
    """(group, option) -> (the group's node unresolved, resolved), composed by Hydra as `arena` does."""
    out = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for group, option in FILES:
            cfg = compose(config_name=GROUPS[group][0], overrides=[f"{group}={option}"])
            out[(group, option)] = (OmegaConf.to_container(cfg[group], resolve=False),
                                    OmegaConf.to_container(cfg[group], resolve=True))
    return out


@pytest.mark.parametrize("group, option", FILES, ids=[f"{g}/{o}" for g, o in FILES])
def test_yaml_keys_are_fields_and_mirrors_equal_the_defaults(composed, group, option):
    raw, resolved = composed[(group, option)]
    registry = GROUPS[group][1]
    plugin = plugin_of(raw)
    assert plugin in registry, f"conf/{group}/{option}.yaml names no registered {group}"
    keys = set(keys_of(registry.get(plugin)))
    unknown = set(raw) - keys - set(registry.extras) - ({"plugin"} if "plugin" in raw else {"name"})
    assert not unknown, f"conf/{group}/{option}.yaml: keys {sorted(unknown)} are not fields of {plugin}"
    if option == plugin:
        assert not mirror_problems(GROUPS[group][1], raw), f"conf/{group}/{option}.yaml vs its dataclass: {mirror_problems(GROUPS[group][1], raw)}"
    context = {"threat.eps": 0.3, "threat.norm": "Linf"}
    registry.build(resolved, context=context)  # every value type-checks and passes the plugin's checks


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_registered_plugin_has_its_mirror_yaml(group):
    registry = GROUPS[group][1]
    built_in = [n for n in registry.names() if registry.get(n).__module__.split(".")[0] in ("attacks", "defenses", "harness")]
    missing = [n for n in built_in if not (CONF_DIR / group / f"{n}.yaml").is_file()]
    presets = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    missing = [n for n in missing if not (group == "model" and n == "wrn" and {"wrn28_10", "wrn34_10"} <= presets)]
    assert not missing, f"registered {group}s without conf/{group}/<name>.yaml: {missing}"


def test_every_suite_entry_builds():
    for path in sorted((CONF_DIR / "suite").glob("*.yaml")):
        suite = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        for spec in suite["attacks"]:
            ATTACKS.build({k: v for k, v in spec.items() if k != "view"})


def test_python_defaults_build_the_yaml_defense():
    """The drift that issue 15 found: PGDAT() in Python and `defense=pgd_at` must be one defense."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name in ("pgd_at", "advms", "dverge"):
            cfg = OmegaConf.to_container(compose(config_name="eval", overrides=[f"defense={name}"]), resolve=True)
            from_yaml = DEFENSES.build(cfg["defense"]).describe()
            threat = ThreatModel(cfg["threat"]["norm"], cfg["threat"]["eps"])
            from_python = DEFENSES.build({"name": name}, context={"threat.eps": threat.eps, "threat.norm": threat.norm})
            assert from_python.describe() == from_yaml, name


# ---------------------------------------------------------------------------------------- runs

FAST_ATTACK = {  # small budgets: one batch, a few seconds each
    "pgd": {"steps": 5}, "fgsm": {}, "apgd_ce": {"n_iter": 5}, "autoattack": {"n_iter": 3, "n_target_classes": 2, "square_queries": 30},
    "lafeat": {"head_epochs": 1, "iterations": 3, "targets": 1}, "mora": {"n_iter": 3, "n_target_classes": 2},
    "exact": {"time_limit": 5.0}, "square": {"budget": 50}, "zo_ngd": {"budget": 100}, "zo_sgd": {"budget": 100}, "nes": {"budget": 102},
}
ENSEMBLE_ONLY = {"mora"}
MODEL_FOR = {"exact": ["model=conv_small", "model.channels=[4,8]", "model.hidden=16"]}  # a MIP needs a plain ReLU net
ATTACK_FILES = sorted(p.stem for p in (CONF_DIR / "attack").glob("*.yaml"))


@pytest.mark.parametrize("option", ATTACK_FILES)
def test_every_attack_runs_one_batch_on_digits(session_work, option):
    assert option in FAST_ATTACK, f"give conf/attack/{option}.yaml a small budget in FAST_ATTACK"
    defense = (["defense=ensemble", "defense.members=2"] if option in ENSEMBLE_ONLY else []) + ["defense.train.epochs=2"]
    defense += MODEL_FOR.get(option, [])
    overrides = ["dataset=digits", "n_samples=12", "batch_size=12", "threat.eps=0.2", f"attack={option}", *defense,
                 *[f"attack.{k}={v}" for k, v in FAST_ATTACK[option].items()]]
    summary = run_eval(overrides, session_work)
    (label, stats), = summary["attacks"].items()
    assert stats["attacked"] > 0 and stats["violations"] == 0, stats
    assert stats["n_forward"] + stats["n_queries"] > 0  # the cost was counted
    assert 0.0 <= summary["robust_acc"] <= summary["clean_acc"]


FAST_DEFENSE = {"*": {"train": {"epochs": 1}}, "advms": {"channels": 2, "steps": 1}, "pgd_at": {"steps": 1},
                "ensemble": {"members": 2}, "adp": {"members": 2}, "gal": {"members": 2}, "trs": {"members": 2},
                "dverge": {"members": 2, "steps": 1, "warmup_epochs": 0}, "ueraser": {"k": 2}, "ueraser_max": {"k": 2}}


@pytest.fixture(scope="module")
def digits_small():
    data = load_dataset({"name": "digits"})
    return data.with_train(data.train_x[:384], data.train_y[:384])


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, digits_small) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "w.pt"
    torch.save(MODELS.build({"name": "small_cnn"}).create(digits_small.input_shape, 10).state_dict(), path)
    return path


NOT_ON_DIGITS = {"robustbench": "a CIFAR zoo model: tests/plugins/test_robustbench_zoo.py runs it on CIFAR-10 images"}


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_builds_on_digits(tmp_path, digits_small, weights_file, name):
    if name in NOT_ON_DIGITS:
        pytest.skip(NOT_ON_DIGITS[name])
    spec: dict[str, Any] = {"name": name, **FAST_DEFENSE.get(name, {})}
    if any(f.name == "train" for f in DEFENSES.fields(name)):
        spec["train"] = {**FAST_DEFENSE["*"]["train"], "batch_size": 32, "optimizer": "adam", "lr": 0.005}
    if name == "checkpoint":
        spec["weights"] = str(weights_file)
    if name == "ensemble_checkpoint":
        spec["members"] = [{"weights": str(weights_file)}, {"weights": str(weights_file)}]
    threat = ThreatModel("Linf", 0.2)
    defense = DEFENSES.build(spec, context={"threat.eps": threat.eps, "threat.norm": threat.norm})
    ctx = BuildContext(data=digits_small, model_cfg={"name": "small_cnn"}, device=torch.device("cpu"), seed=0,
                       cache_dir=tmp_path, progress=False, threat=threat)
    clf = defense.build(ctx)
    check_classifier(clf, to_unit(digits_small.test_x[:8], torch.device("cpu")))
    with torch.no_grad():
        acc = float((clf.predict(to_unit(digits_small.test_x, torch.device("cpu"))) == digits_small.test_y).float().mean())
    assert acc > 0.1 or name in ("checkpoint", "ensemble_checkpoint")  # trained at least a little (untrained weights aside)


FAST_POISON = {"em": {"train_steps": 2, "max_rounds": 1, "batch_size": 64}}


@pytest.mark.parametrize("name", POISONS.names())
def test_every_poison_generates_on_digits(digits_small, name):
    poison = POISONS.build({"name": name, **FAST_POISON.get(name, {})})
    x, y = digits_small.train_x[:64], digits_small.train_y[:64]
    out = generate(poison, x, y, num_classes=10, seed=0, device=torch.device("cpu"))
    assert out.x.shape == x.shape and out.x.dtype == torch.uint8
