"""docs/extending.md's examples are real: the attack is attacks/fgsm.py verbatim, and the defense and
the poison, run from the page's text, conform to their YAML and work on digits."""
from __future__ import annotations

import re
import sys
import types

import pytest
import torch
import yaml

import harness
from harness.core.attack import ATTACKS
from harness.core.defense import DEFENSES, BuildContext
from harness.core.poison import POISONS, generate
from harness.data.datasets import load_dataset
from harness.data.training import to_unit
from helpers import CPU, REPO, mirror_problems, trained_small_cnn

DOC = REPO / "docs" / "extending.md"


def blocks() -> dict[str, str]:
    """Each code block of the page under the file name the paragraph before it gives (`path`:)."""
    text = DOC.read_text()
    found = re.findall(r"`([\w/.]+\.(?:py|yaml))`[^\n]*:\n\n```(?:python|yaml)\n(.*?)```", text, flags=re.S)
    return {path: code for path, code in found}


def run_module(path: str, code: str) -> types.ModuleType:
    """Execute a block as the module it says it is (registration included)."""
    name = path.removesuffix(".py").replace("/", ".") + "_doc"
    module = types.ModuleType(name)
    module.__file__ = str(REPO / path)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    exec(compile(code, str(REPO / path), "exec"), module.__dict__)
    return module


def test_the_page_shows_the_real_fgsm_files():
    found = blocks()
    assert set(found) >= {"attacks/fgsm.py", "conf/attack/fgsm.yaml", "defenses/noise_training.py",
                          "conf/defense/noise_training.yaml", "attacks/poisons/random_noise.py",
                          "conf/poison/random_noise.yaml"}
    assert found["attacks/fgsm.py"] == (REPO / "attacks" / "fgsm.py").read_text()
    assert found["conf/attack/fgsm.yaml"] == (REPO / "conf" / "attack" / "fgsm.yaml").read_text()


def test_the_example_attack_runs_through_the_api():
    data = load_dataset({"name": "digits"})
    model = trained_small_cnn(data, epochs=2, lr=0.005)
    x, y = to_unit(data.test_x[:64], CPU), data.test_y[:64]
    out = harness.attack(model, x, y, "fgsm", norm="Linf", eps=0.2)
    assert out.costs["n_backward_per_sample"] == 1.0 and out.costs["n_forward_per_sample"] == 1.0
    assert out.success[out.clean_correct].any()  # one step at 0.2 breaks some of the digits
    assert mirror_problems(ATTACKS, yaml.safe_load(blocks()["conf/attack/fgsm.yaml"])) == []


@pytest.fixture
def registered():
    """Run the page's defense and poison modules; unregister them afterwards."""
    found = blocks()
    run_module("defenses/noise_training.py", found["defenses/noise_training.py"])
    run_module("attacks/poisons/random_noise.py", found["attacks/poisons/random_noise.py"])
    yield found
    DEFENSES.unregister("noise_training")
    POISONS.unregister("random_noise")
    for name in ("defenses.noise_training_doc", "attacks.poisons.random_noise_doc"):
        sys.modules.pop(name, None)


def test_the_example_defense_and_poison_conform_and_work(registered, tmp_path):
    defense_yaml = yaml.safe_load(registered["conf/defense/noise_training.yaml"])
    poison_yaml = yaml.safe_load(registered["conf/poison/random_noise.yaml"])
    assert mirror_problems(DEFENSES, defense_yaml) == []
    assert mirror_problems(POISONS, poison_yaml) == []

    data = load_dataset({"name": "digits"})
    data = data.with_train(data.train_x[:400], data.train_y[:400])
    spec = {**defense_yaml, "train": {**defense_yaml["train"], "epochs": 2}}
    clf = DEFENSES.build(spec).build(BuildContext(data=data, model_cfg={"name": "small_cnn"}, device=CPU, seed=0,
                                                  cache_dir=tmp_path, progress=False))
    acc = float((clf.predict(to_unit(data.test_x, CPU)) == data.test_y).float().mean())
    assert acc > 0.5, acc

    poison = POISONS.build(poison_yaml)
    out = generate(poison, data.train_x[:64], data.train_y[:64], num_classes=10, seed=0, device=CPU)
    delta = (out.x.float() - data.train_x[:64].float()) / 255
    assert float(delta.abs().max()) <= 8 / 255 + 1e-6 and float(delta.abs().mean()) > 0.005
    with pytest.raises(harness.UserError, match="did you mean 'sigma'"):
        DEFENSES.build({"name": "noise_training", "sigmaa": 0.1})
