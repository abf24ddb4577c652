"""Randomised and voting models get the right verdict from every attack's own bookkeeping.

Two ways an attack's "best iterate so far" can be wrong, both measured on this project before:

- on a randomised model, freezing the first iterate that fooled *any* EOT draw (EOT-PGD then
  looked weaker than single-draw PGD);
- on a hard-vote ensemble, judging with the smoothed vote proxy the attack differentiates.

The models here are real and small (scikit-learn digits): a model switching at random, per
sample, between three logistic classifiers, and a hard-vote ensemble of three logistic members
(10 classes, so vote ties and proxy/vote disagreements are common). Every input an attack sends
through the model is recorded at the members, so the test can judge every iterate the attack
computed with the true decision, independently of the attack.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import attacks  # noqa: F401  (registers the attacks)
from attacks.autoattack import AutoAttackRef
from attacks.lafeat import Lafeat
from attacks.mora import MORA
from attacks.pgd import PGD
from harness.core.access import ModelAccess, PassCounter, make_model_access
from harness.core.attack import PrepareContext
from harness.core.classifier import Classifier
from harness.core.ensemble import (VoteStraightThrough, make_classifier, make_ensemble_access, sharpened_log_votes,
                                   voting_scores)
from harness.core.features import make_feature_access
from harness.core.hashing import module_hash
from harness.core.threat import ThreatModel
from harness.data.datasets import load_dataset
from harness.data.training import to_unit

CPU = torch.device("cpu")


# the same toy members and recorder as the benchmark that measured the judges (bench/bench_verdicts.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_verdicts import Recorder, logistic as _logistic  # noqa: E402


class Switch(nn.Module):
    """Random switching, per sample, among `members` (global torch RNG, so seeds replay it)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([m(x) for m in self.members])
        pick = torch.randint(len(self.members), (x.shape[0],), device=x.device)
        return z[pick, torch.arange(x.shape[0], device=x.device)]


@pytest.fixture(scope="module")
def digits():
    data = load_dataset({"name": "digits"})
    return data, to_unit(data.train_x, CPU), data.train_y, to_unit(data.test_x, CPU), data.test_y


@pytest.fixture(scope="module")
def members(digits):
    _, xtr, ytr, _, _ = digits
    return [_logistic(xtr, ytr, seed) for seed in range(3)]


def _true_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 200) -> torch.Tensor:
    """Per-sample fraction of `draws` fresh draws that classify `x` correctly (the test's own judge)."""
    torch.manual_seed(12345)
    with torch.no_grad():
        return torch.stack([(model(x).argmax(1) == y).float() for _ in range(draws)]).mean(0)


# ---------------------------------------------------------------------------------------------
# randomised: EOT helps, and the returned example is as fooled as the attack's later iterates
# ---------------------------------------------------------------------------------------------
def test_eot_pgd_is_no_weaker_than_single_draw_pgd_on_a_switched_model(digits, members):
    _, _, _, x, y = digits
    rec = Recorder(members[0])
    switch = Switch([rec, members[1], members[2]]).eval()
    threat = ThreatModel("Linf", 0.12)
    out = {}
    for eot in (1, 10):
        torch.manual_seed(0)
        rec.seen, rec.on = [], eot == 10
        access = ModelAccess(switch, 10, PassCounter(), randomized=True, eot=eot, draws=10)
        out[eot] = PGD(steps=20, eot=eot).run(access, x, y, threat, torch.Generator().manual_seed(0)).x_adv
        rec.on = False
    acc = {eot: float(_true_accuracy(switch, adv, y).mean()) for eot, adv in out.items()}
    clean = float(_true_accuracy(switch, x, y).mean())
    assert acc[10] <= acc[1], acc
    assert acc[10] < 0.5 * clean, (acc, clean)  # the attack does real work here
    # Every iterate EOT-PGD computed (the last one included), judged by 200 fresh draws: none is
    # on average more fooled than what it returned ("any draw" bookkeeping returned examples with
    # accuracy 0.30 against 0.17 for its own final iterate on this kind of model).
    iterates, prev = [], None
    for seen in rec.seen:
        if prev is None or not torch.equal(seen, prev):  # EOT draws and verdict calls repeat an iterate
            iterates.append(seen)
        prev = seen
    assert len(iterates) >= 21
    returned = float(_true_accuracy(switch, out[10], y).mean())
    worst_iterate = min(float(_true_accuracy(switch, it, y).mean()) for it in iterates if it.shape == x.shape)
    assert returned <= worst_iterate + 0.01, (returned, worst_iterate)


# ---------------------------------------------------------------------------------------------
# voting: every attack judges with the hard votes, pyautoattack through the straight-through model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voting(members):
    rec = Recorder(members[0])
    clf = make_classifier([rec, members[1], members[2]], "voting", 10, (1, 8, 8))
    return clf, rec


def _iterates_fooled(clf: Classifier, rec: Recorder, x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, int]:
    """Per sample: did any input the attack sent through the model fool the hard votes? And the
    number of recorded rows on which the smoothed proxy and the votes disagree."""
    rows = torch.cat(rec.seen)
    owner = torch.cdist(rows.flatten(1), x.flatten(1), p=float("inf")).argmin(1)  # digits are > 2 eps apart
    assert float((rows - x[owner]).flatten(1).abs().amax(1).max()) <= eps + 1e-5
    with torch.no_grad():
        wrong = clf.module(rows).argmax(1) != y[owner]
        disagree = int((clf.differentiable(rows).argmax(1) != clf.module(rows).argmax(1)).sum())
    fooled = torch.zeros(x.shape[0], dtype=torch.bool)
    fooled[owner[wrong]] = True
    return fooled, disagree


def _run_recorded(attack_fn, clf, rec, x, y, threat):
    rec.seen, rec.on = [], True
    try:
        x_adv = attack_fn()
    finally:
        rec.on = False
    assert not threat.violations(x_adv, x).any()
    with torch.no_grad():
        returned = clf.module(x_adv).argmax(1) != y
    any_iterate, disagree = _iterates_fooled(clf, rec, x, y, threat.eps)
    return returned, any_iterate, disagree


@pytest.mark.parametrize("name", ["pgd", "lafeat", "mora", "apgd-ce"])
def test_no_attack_returns_a_less_fooled_iterate_than_it_computed_on_hard_votes(name, voting, digits, tmp_path):
    clf, rec = voting
    data, _, _, x_all, y_all = digits
    with torch.no_grad():
        ok = clf.module(x_all).argmax(1) == y_all
    x, y = x_all[ok], y_all[ok]
    # eps 0.15: the pre-fix bookkeeping (proxy judgement) lost 2 (PGD) and 2 (APGD-CE) of these samples
    threat = ThreatModel("Linf", 0.15)
    gen = torch.Generator().manual_seed(0)
    if name == "pgd":
        def run():
            return PGD(steps=10).run(make_model_access(clf, PassCounter()), x, y, threat, gen).x_adv
    elif name == "lafeat":
        attack = Lafeat(head_epochs=2, head_batch_size=64, head_augment="none", iterations=10, betas=[0.4, 0.0],
                        targets=2)
        attack.prepare(PrepareContext(classifier=clf, train_x=data.train_x, train_y=data.train_y, eval_x=data.test_x[:150],
                                      cache_dir=tmp_path, device=CPU, seed=0, model_key=module_hash(clf.module)))

        def run():
            return attack.run(make_feature_access(clf, attack.layer, PassCounter()), x, y, threat, gen).x_adv
    elif name == "mora":
        def run():
            return MORA(n_iter=10, n_target_classes=2).run(make_ensemble_access(clf, PassCounter()), x, y, threat, gen).x_adv
    else:
        def run():
            return AutoAttackRef(version="custom", attacks=["apgd-ce"], n_iter=20).run(
                make_model_access(clf, PassCounter()), x, y, threat, gen).x_adv
    returned, any_iterate, disagree = _run_recorded(run, clf, rec, x, y, threat)
    assert disagree > 0, "proxy and votes never disagreed: the test would not tell the judges apart"
    assert 0 < int(returned.sum()) < x.shape[0], "eps must leave the attack something to do"
    missed = (any_iterate & ~returned).nonzero().flatten().tolist()
    assert not missed, f"{name}: samples fooled by the votes at some iterate but not in what it returned: {missed}"


def test_straight_through_votes_judge_by_votes_and_backpropagate_the_proxy(voting, digits):
    clf, _ = voting
    _, _, _, x_all, _ = digits
    access = make_model_access(clf, PassCounter())
    assert access.judged_model is not None and access.decision is not None
    # points on the way from one digit to another cross the decision boundaries, where the
    # proxy and the votes disagree (vote ties, near-ties)
    t = torch.linspace(0, 1, 41).view(-1, 1, 1, 1, 1)
    x = ((1 - t) * x_all[:20] + t * x_all[20:40]).flatten(0, 1).requires_grad_(True)
    out = access.judged_model(x)
    z = clf.module.forward_members(x).detach()
    votes = voting_scores(z, clf.module.tie_break)
    proxy = sharpened_log_votes(clf.module.forward_members(x), clf.module.vote_sharpness)
    assert torch.equal(out.argmax(1), votes.argmax(1))  # the reference's checks see the votes exactly
    agree = proxy.argmax(1) == votes.argmax(1)
    assert 0 < int((~agree).sum()), "no disagreement between proxy and votes: nothing tested"
    assert torch.equal(out[agree].detach(), proxy[agree].detach())  # the proxy's value where it is right
    weights = torch.arange(10.0)
    g_st = torch.autograd.grad((out * weights).sum(), x, retain_graph=True)[0]
    g_proxy = torch.autograd.grad((proxy * weights).sum(), x)[0]
    assert torch.allclose(g_st, g_proxy, atol=1e-6) and float(g_st.abs().sum()) > 0
    literal = VoteStraightThrough(clf.module, value="votes")(x.detach())
    assert torch.equal(literal, votes)  # the literal variant: the vote scores bit for bit
    counter = access.counter
    before = counter.forward
    access.judged_model(x_all[:40])
    assert counter.forward - before == 40  # one counted pass of the members, not two


def test_verdict_uses_the_true_decision_and_the_harness_draws(voting, digits, members):
    clf, _ = voting
    _, _, _, x_all, y_all = digits
    x, y = x_all[:60], y_all[:60]
    counter = PassCounter()
    access = make_model_access(clf, counter)
    with torch.no_grad():
        votes_wrong = (clf.module(x).argmax(1) != y).float()
    assert torch.equal(access.verdict(x, y), votes_wrong) and counter.forward == 60
    switch = Switch(list(members)).eval()
    rand = make_model_access(Classifier(switch, 10, (1, 8, 8), randomized=True), PassCounter(), draws=7)
    torch.manual_seed(3)
    score = rand.verdict(x, y)
    torch.manual_seed(3)
    with torch.no_grad():
        expect = torch.stack([(switch(x).argmax(1) != y).float() for _ in range(7)]).mean(0)
    assert rand.draws == 7 and torch.equal(score, expect)
    assert rand.counter.forward == 7 * 60
