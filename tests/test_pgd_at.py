"""PGD adversarial training: the in-training attack (ball, mode, no parameter gradients), exact
cost accounting, determinism, and a real mnist5k run where PGD-AT beats standard training under
the harness's PGD attack."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attacks.pgd import PGD
from defenses.adv_examples import pgd_examples, trades_examples
from harness.core.defense import BuildContext, build_defense
from defenses.pgd_at import PGDAT, at_loss
from defenses.standard import Standard
from harness.core.access import ModelAccess, PassCounter
from harness.data.datasets import load_dataset
from harness.core.errors import UserError
from harness.data.models import build_model
from harness.core.threat import ThreatModel
from harness.data.training import TrainConfig, train

CNN = {"name": "small_cnn", "width": 16, "hidden": 64}


@pytest.fixture(scope="module")
def digits():
    return load_dataset({"name": "digits"})


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN briefly trained on digits (an untrained net's loss barely moves under attack)."""
    torch.manual_seed(0)
    net = build_model(CNN, 10, (1, 8, 8))
    train(net, digits.train_x, digits.train_y, TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=0.005),
          device=torch.device("cpu"), seed=0, progress=False)
    return net


def _model(trained: torch.nn.Module | None = None, dropout: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    net = copy.deepcopy(trained) if trained is not None else build_model(CNN, 10, (1, 8, 8))
    return torch.nn.Sequential(net, torch.nn.Dropout(0.5)) if dropout else net


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 1.0)])
def test_pgd_examples_stay_in_the_ball_raise_the_loss_and_leave_the_model_alone(digits, trained, norm, eps):
    model = _model(trained, dropout=True).train()
    x, y = digits.test_x[:64].float() / 255, digits.test_y[:64]
    threat = ThreatModel(norm, eps)
    torch.manual_seed(1)
    x_adv = pgd_examples(model, x, y, threat, steps=5, step_size=0.4)
    assert model.training  # previous mode restored
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient accumulated
    assert not threat.violations(x_adv, x).any()
    model.eval()  # eval mode during the attack: deterministic outputs, comparable losses
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.05
    torch.manual_seed(1)
    again = pgd_examples(model.train(), x, y, threat, steps=5, step_size=0.4)
    assert torch.equal(again, x_adv)  # seeded: dropout is off during the attack, the start is seeded
    assert torch.equal(pgd_examples(model, x, y, threat, steps=0, step_size=0.4), x)


def test_trades_examples_raise_the_kl_inside_the_ball(digits, trained):
    model = _model(trained).eval()
    x = digits.test_x[:64].float() / 255
    threat = ThreatModel("Linf", 0.1)
    x_adv = trades_examples(model, x, threat, steps=5, step_size=0.25)
    assert not threat.violations(x_adv, x).any()
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="batchmean")
    assert kl > 1e-3


def test_trades_loss_is_ce_plus_beta_kl(digits):
    model = _model().train()
    x, y = digits.test_x[:32].float() / 255, digits.test_y[:32]
    threat = ThreatModel("Linf", 0.1)
    torch.manual_seed(3)
    loss = at_loss(threat, steps=3, step_size=0.25, method="trades", beta=2.0)(model, x, y, 0)
    torch.manual_seed(3)
    x_adv = trades_examples(model, x, threat, steps=3, step_size=0.25)
    logits = model(x)
    ref = F.cross_entropy(logits, y) + 2.0 * F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    assert torch.allclose(loss, ref)


def test_pgd_at_is_deterministic_and_counts_its_passes(digits, tmp_path):
    data = digits.with_train(digits.train_x[:300], digits.train_y[:300])
    spec = {"name": "pgd_at", "eps": 0.1, "steps": 2, "train": {"epochs": 1, "batch_size": 64}}
    built = []
    for d in ("a", "b"):
        ctx = BuildContext(data=data, model_cfg=CNN, device=torch.device("cpu"), seed=4, cache_dir=tmp_path / d, progress=False)
        built.append(build_defense(spec).build(ctx))
    for p, q in zip(built[0].module.parameters(), built[1].module.parameters()):
        assert torch.equal(p, q)
    train = built[0].info["train"]
    assert train["forward_passes"] == 300 * (2 + 1)
    assert train["input_grad_passes"] == 300 * 2 and train["backward_passes"] == 300 * 3
    assert built[0].info["adversarial_training"]["method"] == "madry"
    trades = PGDAT(eps=0.1, steps=2, method="trades", train={"epochs": 1, "batch_size": 64}).build(
        BuildContext(data=data, model_cfg=CNN, device=torch.device("cpu"), seed=4, cache_dir=tmp_path / "t", progress=False))
    assert trades.info["train"]["backward_passes"] == 300 * (2 + 2)  # KL and CE terms: two graphs


def test_bad_configs_are_user_errors():
    with pytest.raises(UserError, match="method"):
        PGDAT(method="fast")
    with pytest.raises(UserError, match="eps"):
        PGDAT(eps=2.0)
    with pytest.raises(UserError, match="step_size"):
        PGDAT(step_size=0)


def test_pgd_at_beats_standard_training_under_pgd(tmp_path):
    data = load_dataset({"name": "mnist5k"})
    data = data.with_train(data.train_x[::2], data.train_y[::2])  # 2,000 images, 200 per class
    ctx = BuildContext(data=data, model_cfg=CNN, device=torch.device("cpu"), seed=0, cache_dir=tmp_path, progress=False)
    recipe = {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.003}
    torch.manual_seed(0)
    std = Standard(train=recipe).build(ctx)
    at = PGDAT(eps=0.1, steps=3, step_size=0.5, train=recipe).build(ctx)
    x, y = data.test_x[:200].float() / 255, data.test_y[:200]
    threat = ThreatModel("Linf", 0.1)

    def robust(clf) -> float:
        x_adv = PGD(steps=20).run(ModelAccess(clf.module, 10, PassCounter()), x, y, threat, torch.Generator().manual_seed(0)).x_adv
        with torch.no_grad():
            ok = (clf.module(x).argmax(1) == y) & (clf.module(x_adv).argmax(1) == y)
        return float(ok.float().mean())

    r_std, r_at = robust(std), robust(at)
    assert r_at > r_std + 0.15, (r_std, r_at)
