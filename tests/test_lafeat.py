"""LAFEAT: the generic feature tap, the head, the attack and its accounting, on real data.

The embedded default model (small_cnn trained on mnist5k by defense=standard) is trained once per
session (cached with the other tests' defenses) and used for the head-agreement and the
LAFEAT-vs-PGD checks.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import attacks  # noqa: F401  (registers lafeat)
from harness.core.attack import PrepareContext, build_attack
from attacks.lafeat import REFERENCE_BETAS, Lafeat, merge_stage_curves
from harness.core.access import CountingModule, ModelAccess, PassCounter
from harness.core.classifier import Classifier
from harness.data.datasets import load_dataset
from harness.core.errors import UserError
from harness.core.features import FeatureTap, default_layer, list_layers, make_feature_access
from harness.core.hashing import module_hash
from harness.data.models import BUILDERS, build_model
from harness.core.threat import ThreatModel
from harness.data.training import to_unit

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _yaml(*parts: str) -> dict:
    return yaml.safe_load((REPO / "conf").joinpath(*parts).read_text())


@pytest.fixture(scope="module")
def mnist():
    return load_dataset({"name": "mnist5k"})


@pytest.fixture(scope="module")
def default_model(mnist, session_work):
    """small_cnn trained on mnist5k with the repository's defense=standard recipe (cached)."""
    import defenses  # noqa: F401
    from harness.core.defense import BuildContext, build_defense

    torch.manual_seed(0)
    defense = build_defense(_yaml("defense", "standard.yaml"))
    ctx = BuildContext(data=mnist, model_cfg=_yaml("model", "small_cnn.yaml"), device=CPU, seed=0,
                       cache_dir=session_work / "cache", progress=False)
    return defense.build(ctx)


# Head recipe for the tests: the reference optimiser and schedule, fewer epochs than the
# reference's 50 (CPU budget), no augmentation (it needs many epochs to pay off).
TEST_HEAD = {"head_epochs": 4, "head_batch_size": 32, "head_augment": "none"}


@pytest.fixture(scope="module")
def prepared(default_model, mnist, tmp_path_factory):
    """A LAFEAT attack with its head trained on the default model (facts, attack, cache dir)."""
    cache = tmp_path_factory.mktemp("lafeat-cache")
    attack = build_attack({"name": "lafeat", **TEST_HEAD})
    facts = attack.prepare(_ctx(default_model, mnist.train_x, mnist.test_x[:500], cache))
    return facts, attack, cache


def _ctx(clf: Classifier, train_x, eval_x, cache: Path, seed: int = 0) -> PrepareContext:
    return PrepareContext(classifier=clf, train_x=train_x, train_y=None, eval_x=eval_x, cache_dir=cache,
                          device=CPU, seed=seed, model_key=module_hash(clf.module))


# ---------------------------------------------------------------------------------------------
# The tap
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_tap_works_on_every_builtin_architecture(name):
    shape = (1, 28, 28) if name == "small_cnn" else (3, 16, 16)
    cfg = {"name": name, **({"depth": 10, "widen": 1} if name == "wrn" else {})}
    model = build_model(cfg, 10, shape).eval()
    layer = default_layer(model)
    assert layer in list_layers(model)
    x = torch.rand(3, *shape, requires_grad=True)
    counter = PassCounter()
    access = make_feature_access(Classifier(model, 10, shape), layer, counter)
    feat, logits = access.features(x)
    assert feat.shape[0] == 3 and feat.dim() in (2, 4)
    assert torch.allclose(logits, model(x), atol=1e-5)  # one forward gives both, unchanged logits
    (feat.square().mean() + logits.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (counter.forward, counter.backward) == (3, 3)


def test_default_layer_rule_for_residual_and_plain_networks():
    assert default_layer(build_model({"name": "resnet18"}, 10, (3, 32, 32))) == "layer4.0"  # 2nd-to-last of last stage
    assert default_layer(build_model({"name": "resnet20"}, 10, (3, 32, 32))) == "layer3.1"
    assert default_layer(build_model({"name": "wrn", "depth": 34, "widen": 1}, 10, (3, 32, 32))) == "block3.3"  # the reference's unit 4 of 5
    assert default_layer(build_model({"name": "small_cnn"}, 10, (1, 28, 28))) == "conv2"  # last convolution
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    assert default_layer(mlp) == "1"  # last hidden Linear


USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True),
                                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True))
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))

    def create():
        torch.manual_seed(0)
        return Net()
''')


def test_tap_on_user_module_file_is_safe_against_inplace_relu(tmp_path):
    from defenses.checkpoint import import_model_file

    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    model = import_model_file(path).create().eval()
    x = torch.rand(4, 1, 12, 12)
    feat, logits = FeatureTap(model, "features.2")(x)  # conv output, overwritten in place by ReLU(inplace)
    with torch.no_grad():
        expected = model.features[2](torch.relu(model.features[0](x)))
    assert torch.equal(feat, expected)
    assert (feat < 0).any()  # the pre-activation values survived the in-place ReLU
    assert torch.allclose(logits, model(x))
    feat_fx, logits_fx = FeatureTap(model, "relu")(x)  # an fx node (functional op), not a module
    assert torch.allclose(feat_fx, torch.relu(model.features(x))) and torch.allclose(logits_fx, logits)
    assert default_layer(model) == "features.2"


def test_bad_layer_name_is_a_one_line_user_error_listing_valid_names():
    model = build_model({"name": "small_cnn"}, 10, (1, 28, 28))
    with pytest.raises(UserError) as err:
        FeatureTap(model, "layer9")
    msg = str(err.value)
    assert "\n" not in msg and "'layer9'" in msg
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert name in msg
    with pytest.raises(UserError):  # the evaluator's path too
        make_feature_access(Classifier(model, 10, (1, 28, 28)), "nope", PassCounter())


def test_layers_cli_lists_layers_and_marks_default(tmp_path, capsys):
    from harness.cli.layers import main

    assert main(["model=small_cnn", "dataset=mnist5k"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("* conv2") and "64x14x14" in line for line in out.splitlines())
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    assert main(["--model-file", str(path), "shape=1,12,12"]) == 0
    out = capsys.readouterr().out
    assert "* features.2" in out and "8x12x12" in out
    with pytest.raises(UserError):
        main(["model=no_such_net"])


# ---------------------------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------------------------
def test_head_training_keeps_the_model_frozen_and_uses_eval_inputs_without_train_split(tmp_path):
    data = load_dataset({"name": "digits"})
    model = build_model({"name": "resnet20"}, 10, data.input_shape)  # batch norm: must stay in eval mode
    clf = Classifier(model, 10, data.input_shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = build_attack({"name": "lafeat", "head_epochs": 1, "head": "linear"})
    facts = attack.prepare(_ctx(clf, None, data.test_x[:64], tmp_path))
    assert facts["head_data"] == "evaluation inputs" and facts["head_data_n"] == 64
    assert facts["head_train_forward"] == 64 + 64  # one epoch + the agreement pass; no backward through the model
    assert facts["head_train_backward"] == 0 and attack.layer == "layer3.1"
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during head training"


@pytest.mark.slow
def test_head_agrees_with_default_model_and_is_cached(prepared, default_model, mnist):
    facts, attack, cache = prepared
    assert facts["head_data"] == "train split" and facts["lafeat_layer"] == "conv2"
    assert facts["head_agreement"] >= 0.90, facts
    assert facts["head_train_forward"] == TEST_HEAD["head_epochs"] * 4000 + 4000
    assert not facts["head_cached"]
    again = build_attack({"name": "lafeat", **TEST_HEAD})
    facts2 = again.prepare(_ctx(default_model, mnist.train_x, mnist.test_x[:500], cache))
    assert facts2["head_cached"] and facts2["head_agreement"] == facts["head_agreement"]
    assert len(list((cache / "lafeat_heads").glob("*.pt"))) == 1


# ---------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------
def _attack_setup(default_model, mnist, n: int = 100):
    x = to_unit(mnist.test_x[:n], CPU)
    y = mnist.test_y[:n]
    with torch.no_grad():
        correct = default_model.module(x).argmax(1) == y
    return x[correct], y[correct]


def _run(attack: Lafeat, clf: Classifier, x, y, threat, seed: int = 0):
    counter = PassCounter()
    access = make_feature_access(clf, attack.layer, counter)
    result = attack.run(access, x, y, threat, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fooled = clf.module(result.x_adv).argmax(1) != y
    assert not threat.violations(result.x_adv, x).any()
    return result, fooled, counter


def _with_head(prepared, **params) -> Lafeat:
    """A LAFEAT attack with other run parameters sharing the prepared head (same layer and head)."""
    _, base, _ = prepared
    attack = build_attack({"name": "lafeat", **TEST_HEAD, **params})
    attack.layer, attack._head = base.layer, base._head
    return attack


@pytest.mark.slow
def test_lafeat_is_at_least_as_strong_as_pgd_at_equal_gradient_evaluations(prepared, default_model, mnist):
    x, y = _attack_setup(default_model, mnist, n=300)
    threat = ThreatModel("Linf", 0.15)
    lafeat = _with_head(prepared, iterations=20, betas=[0.4, 0.5], targets=3, targeted_betas=[0.4])
    result, fooled, counter = _run(lafeat, default_model, x, y, threat)
    budget = counter.backward
    # PGD-20 (CE, random start) with as many restarts as it takes to spend at least that budget
    restarts = math.ceil(budget / (20 * x.shape[0]))
    pgd = build_attack({"name": "pgd", "steps": 20, "restarts": restarts})
    pc = PassCounter()
    out = pgd.run(ModelAccess(CountingModule(default_model.module, pc), 10, pc), x, y, threat, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pgd_fooled = default_model.module(out.x_adv).argmax(1) != y
    assert pc.backward >= budget
    lafeat_robust, pgd_robust = 1 - fooled.float().mean(), 1 - pgd_fooled.float().mean()
    assert 0 < pgd_robust < 1, "eps must leave PGD something to do for the comparison to mean anything"
    assert lafeat_robust <= pgd_robust, (float(lafeat_robust), float(pgd_robust), budget, pc.backward)


@pytest.mark.slow
def test_same_seed_same_per_sample_result_and_accounting(prepared, default_model, mnist):
    x, y = _attack_setup(default_model, mnist, n=60)
    threat = ThreatModel("Linf", 0.1)
    attack = _with_head(prepared, iterations=5, betas=[0.4, 0.0], targets=2, targeted_betas=[0.4], batch_size=16)
    r1, f1, c1 = _run(attack, default_model, x, y, threat, seed=3)
    r2, f2, c2 = _run(attack, default_model, x, y, threat, seed=3)
    assert torch.equal(r1.x_adv, r2.x_adv) and r1.stage == r2.stage and torch.equal(f1, f2)
    assert (c1.forward, c1.backward) == (c2.forward, c2.backward)
    # stage labels are the attack's own verdicts; they agree with our forward pass
    assert [s != "" for s in r1.stage] == f1.tolist()
    curve = r1.extras["stages"]
    assert curve[0]["stage"] == "clean" and curve[0]["robust"] == x.shape[0]
    labels = [c["stage"] for c in curve[1:]]
    assert labels == [s[0] for s in attack.stages(10)][: len(labels)] and labels[0] == "untargeted beta=0.4"
    robust = [c["robust"] for c in curve]
    backward = [c["backward"] for c in curve]
    assert robust == sorted(robust, reverse=True) and backward == sorted(backward)
    assert robust[-1] == int((~f1).sum()) and backward[-1] == c1.backward == r1.extras["backward"]
    for s in set(r1.stage) - {""}:
        assert s in labels
    merged = merge_stage_curves([curve, curve[:2]], n_total=2 * x.shape[0])
    assert merged[-1]["robust"] == robust[-1] + robust[1] and merged[-1]["backward"] == backward[-1] + backward[1]


def test_beta_schedule_and_configs_build():
    assert REFERENCE_BETAS == [0.4, 0.5, 0.3, 0.6, 0.2, 0.7, 0.1, 0.8, 0.0, 0.9]
    attack = build_attack(_yaml("attack", "lafeat.yaml"))
    assert isinstance(attack, Lafeat) and attack.betas == REFERENCE_BETAS
    stages = attack.stages(10)
    assert len(stages) == 10 + 9 and stages[10] == ("targeted beta=0.4 t=2", 0.4, 2)
    assert len(attack.stages(3)) == 10 + 2  # targets capped at C - 1
    for suite in ("lafeat.yaml", "standard_plus.yaml"):
        spec = _yaml("suite", suite)
        built = [build_attack(a) for a in spec["attacks"]]
        assert built[-1].name == "lafeat"
    assert _yaml("suite", "standard_plus.yaml")["attacks"][0] == {"name": "autoattack", "label": "aa-standard", "version": "standard"}
    with pytest.raises(UserError):
        build_attack({"name": "lafeat", "head": "transformer"})
    with pytest.raises(UserError):
        build_attack({"name": "lafeat", "betas": [1.5]})


def test_end_to_end_eval_records_stages_and_head_facts(tmp_path):
    """`arena eval attack=lafeat`: the evaluator hands LAFEAT a feature tap at the resolved layer,
    verifies its examples, and keeps the head facts and per-sample stages."""
    import pandas as pd

    from harness.api import run_eval

    summary = run_eval(["dataset=digits", "n_samples=60", "batch_size=30", "defense.train.epochs=3", "attack=lafeat",
                        "attack.head_epochs=2", "attack.iterations=5", "attack.betas=[0.4,0.0]", "attack.targets=1",
                        "threat.eps=0.2"], tmp_path)
    facts = summary["prepare"]["lafeat"]
    assert facts["head_data"] == "train split" and facts["lafeat_layer"] == "conv2"
    assert 0.0 <= facts["head_agreement"] <= 1.0 and facts["head_train_forward"] > 0
    records = pd.read_parquet(f"{summary['run_dir']}/samples.parquet")
    rows = records[(records["attack"] == "lafeat") & records["ran"]]
    assert len(rows) > 0 and rows["success"].any()
    assert set(rows.loc[rows["success"], "stage"]) <= {"untargeted beta=0.4", "untargeted beta=0", "targeted beta=0.4 t=2"}
    assert (rows.loc[rows["success"], "stage"] != "").all()  # every verified success has the stage that found it
    assert summary["attacks"]["lafeat"]["n_backward"] > 0
