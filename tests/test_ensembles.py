"""Ensembles as first-class models (harness.core.ensemble) and the ensemble defenses (defenses.ensembles).

Aggregation rules and their tie rule on constructed member outputs; counted member access; and a
real epoch of every trainer on scikit-learn's digits, each diversity term compared with independent
members trained from the same initialisation on the same batches.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import defenses  # noqa: F401  (registers the defenses)
from harness.core.defense import BuildContext, build_defense
from defenses.ensembles import cross_distilled_accuracy, diversity_summary
from harness.core.access import PassCounter
from harness.core.contract import check_classifier
from harness.data.datasets import load_dataset
from harness.core.ensemble import Ensemble, forward_members, make_classifier, make_ensemble_access
from harness.core.errors import UserError
from harness.core.classifier import Classifier
from harness.data.training import to_unit

CPU = torch.device("cpu")
MODEL = {"name": "small_cnn", "width": 16, "hidden": 32}
EPOCH = {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.005, "weight_decay": 0.0}


class Fixed(nn.Module):
    """A member whose logits are a fixed vector plus a tiny input-dependent term (so gradients exist)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1) + 1e-3 * x.flatten(1).mean(1, keepdim=True)


def _x(n: int = 2) -> torch.Tensor:
    return torch.full((n, 1, 4, 4), 0.5)


@pytest.fixture(scope="module")
def digits():
    return load_dataset({"name": "digits"})


def _build(digits, tmp_path, name: str, **params):
    spec = {"name": name, "train": dict(EPOCH), **params}
    ctx = BuildContext(data=digits, model_cfg=dict(MODEL), device=CPU, seed=0, cache_dir=tmp_path, progress=False)
    return build_defense(spec).build(ctx)


# ---------------------------------------------------------------------------------------------
# aggregation, tie rule, classifier facts, access counting
# ---------------------------------------------------------------------------------------------


def test_aggregation_rules_and_tie_break():
    a, b, c = [4.0, 0.0, 3.9], [0.0, 4.0, 3.9], [0.0, 3.0, 0.1]
    ens = Ensemble([Fixed(a), Fixed(b), Fixed(c)], "softmax")
    x = _x()
    z = ens.forward_members(x)
    assert z.shape == (3, 2, 3)
    probs = torch.softmax(z, -1).mean(0)
    torch.testing.assert_close(ens(x), probs.log())  # log of the average distribution
    # the rules disagree here: mean logits favour class 2 (2.63 vs 2.33), the hard votes are 0, 1, 1
    assert Ensemble(ens.members, "logits")(x).argmax(1).tolist() == [2, 2]
    assert Ensemble(ens.members, "voting")(x).argmax(1).tolist() == [1, 1]
    # a 1-1-1 tie goes by the documented rule
    tie = [Fixed([0.0, 0.0, 5.0]), Fixed([0.0, 5.0, 4.9]), Fixed([5.0, 0.0, 4.9])]
    assert Ensemble(tie, "voting", tie_break="lowest")(x).argmax(1).tolist() == [0, 0]
    assert Ensemble(tie, "voting", tie_break="mean_prob")(x).argmax(1).tolist() == [2, 2]  # 2 has the most mean mass
    with pytest.raises(UserError):
        Ensemble(tie, "median")


def test_classifier_flags_voting_and_counts_passes():
    members = [Fixed([1.0, 0.0, 0.0]), Fixed([0.0, 1.0, 0.0]), Fixed([1.0, 0.5, 0.0])]
    for mode in ("softmax", "logits", "voting"):
        clf = make_classifier(members, mode, 3, (1, 4, 4))
        check_classifier(clf, _x(4))  # the harness's contract holds in every mode
        assert clf.info["passes_per_prediction"] == 3 and clf.info["members"] == 3
        assert clf.info["differentiable"] is (mode != "voting")
        assert (clf.differentiable is clf.module) is (mode != "voting")
        assert clf.ensemble is clf.module
    clf = make_classifier(members, "voting", 3, (1, 4, 4))
    counter = PassCounter()
    access = make_ensemble_access(clf, counter)
    x = _x(5).requires_grad_(True)
    z = forward_members(access, x)
    z.sum().backward()
    assert (counter.forward, counter.backward) == (5, 5)  # ensemble-equivalent passes
    assert (access.member_counter.forward, access.member_counter.backward) == (15, 15)  # member passes
    access.model(_x(5))  # the counted proxy: 5 more ensemble passes, 15 more member passes
    assert counter.forward == 10 and access.member_counter.forward == 30
    plain = Classifier(nn.Linear(16, 3), 3, (1, 4, 4))
    with pytest.raises(UserError, match="ensemble"):
        make_ensemble_access(plain, PassCounter())


# ---------------------------------------------------------------------------------------------
# trainers: one real epoch each on digits; diversity moves the intended way vs independent members
# ---------------------------------------------------------------------------------------------


def test_trainers_run_an_epoch_and_diversify(digits, tmp_path):
    x = to_unit(digits.test_x[:200], CPU)
    y = digits.test_y[:200]
    base = _build(digits, tmp_path, "ensemble")
    acc = (base.predict(x) == y).float().mean().item()
    assert acc > 0.5, acc  # one real epoch of independent members learns (chance = 0.1)
    assert base.info["train"]["steps"] == math.ceil(digits.train_x.shape[0] / EPOCH["batch_size"])
    ref = diversity_summary(base.module, x, y)

    adp = diversity_summary(_build(digits, tmp_path, "adp").module, x, y)
    assert adp["log_det"] > ref["log_det"] + 0.5  # non-true-class predictions less aligned
    assert adp["entropy"] > ref["entropy"]  # ensemble entropy promoted

    gal = diversity_summary(_build(digits, tmp_path, "gal").module, x, y)
    assert gal["grad_cos"] < ref["grad_cos"] - 0.1  # member input gradients less aligned

    trs = diversity_summary(_build(digits, tmp_path, "trs").module, x, y)
    assert trs["grad_abs_cos"] < ref["grad_abs_cos"] - 0.1
    assert trs["grad_sq_norm"] < ref["grad_sq_norm"]  # smoother members

    dv = _build(digits, tmp_path, "dverge", layer=2)
    kw = dict(layer=2, eps=0.07, alpha=0.007, steps=10)
    assert cross_distilled_accuracy(dv.module, x, y, **kw) > cross_distilled_accuracy(base.module, x, y, **kw)


def test_training_is_cached_across_modes_and_members_differ(digits, tmp_path):
    soft = _build(digits, tmp_path, "ensemble", members=2)
    vote = _build(digits, tmp_path, "ensemble", members=2, mode="voting")
    assert not soft.info["cache_hit"] and vote.info["cache_hit"]  # the mode does not retrain
    assert vote.info["mode"] == "voting" and vote.info["differentiable"] is False
    w0, w1 = (m.conv1.weight for m in soft.module.members)
    assert not torch.equal(w0, w1)  # members start from different initialisations
    with pytest.raises(UserError, match="members"):
        build_defense({"name": "ensemble", "members": 0})


def test_ensemble_checkpoint_assembles_given_files(digits, tmp_path):
    trained = _build(digits, tmp_path, "ensemble", members=2)
    files = []
    for i, m in enumerate(trained.module.members):
        path = tmp_path / f"member{i}.pt"
        torch.save(m.state_dict(), path)
        files.append({"weights": str(path)})
    ctx = BuildContext(data=digits, model_cfg=dict(MODEL), device=CPU, seed=0, cache_dir=tmp_path, progress=False)
    clf = build_defense({"name": "ensemble_checkpoint", "members": files, "mode": "logits"}).build(ctx)
    x = to_unit(digits.test_x[:50], CPU)
    torch.testing.assert_close(clf.module(x), trained.module.forward_members(x).mean(0))
    assert len(clf.info["member_files"]) == 2 and clf.info["mode"] == "logits"
    with pytest.raises(UserError, match="members"):
        build_defense({"name": "ensemble_checkpoint"}).build(ctx)
    with pytest.raises(UserError, match="unknown keys"):
        build_defense({"name": "ensemble_checkpoint", "members": [{"weight": "a.pt"}]}).build(ctx)
