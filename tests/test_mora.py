"""MORA (attacks.mora): the surrogate against a restatement of the reference, the intended weights
against autograd, the quirks flag, hard-vote success, and MORA vs APGD-CE at equal gradient
evaluations on a trained ensemble of small CNNs (scikit-learn digits) in every mode.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attacks  # noqa: F401  (registers the attacks)
import defenses  # noqa: F401
from attacks.autoattack import AutoAttackRef
from harness.core.attack import build_attack
from attacks.mora import MORA, member_weights, surrogate_logits
from harness.core.defense import BuildContext, build_defense
from harness.core.access import CountingModule, ModelAccess, PassCounter
from harness.data.datasets import load_dataset
from harness.core.ensemble import make_classifier, make_ensemble_access, scale_scores
from harness.core.errors import UserError
from harness.core.threat import ThreatModel
from harness.data.training import to_unit

CPU = torch.device("cpu")
MODES = ("softmax", "voting", "logits")


def reference_surrogate(z: torch.Tensor, y: torch.Tensor, mode: str, s: float, tau: float) -> torch.Tensor:
    """Our member-by-member restatement of lafeat/mora's per-iteration surrogate, quirks included."""
    outs = list(z) + [scale_scores(z, mode)]  # the reference's list: M members, then f_s as one more
    n_v = len(outs)
    gaps = torch.stack([o.topk(2, -1).values[:, 0] - o.topk(2, -1).values[:, 1] for o in outs]).amax(0)
    rho = torch.where(gaps > 10, gaps / 10, torch.ones_like(gaps)).unsqueeze(-1)
    scaled = [o / rho for o in outs]
    avg = sum(F.softmax(scaled[i], -1) for i in range(n_v - 1)) / n_v  # M summed, divided by M + 1
    order = avg.argsort(-1)
    top, second = order[:, -1], order[:, -2]
    right = (top == y).float()
    rows = torch.arange(len(y))
    fs = outs[-1]
    gap_fs = fs.topk(2, -1).values
    out = (1 - s) * fs / (gap_fs[:, :1] - gap_fs[:, 1:])
    num, den = 0.0, 1e-8
    for i in range(n_v):
        p = F.softmax(tau * outs[i], -1)
        p_zmax = p[rows, top] * (1 - right) - p[rows, second] * right
        z_max = avg[rows, top] * (1 - right) - avg[rows, second] * right
        w = (p_zmax * (p[rows, y] / avg[rows, y] + (1 - p_zmax) / z_max)).unsqueeze(-1)
        mask = torch.ones_like(w) if mode == "logits" else (scaled[i].argmax(-1) == y).float().unsqueeze(-1)
        num = num + scaled[i] * w * mask
        den = den + w * mask
    return out + s * num / den


def test_quirks_surrogate_matches_the_reference_restatement():
    gen = torch.Generator().manual_seed(0)
    for mode, tau in (("softmax", 0.2), ("voting", 0.8), ("logits", 0.0)):
        z = torch.randn(3, 64, 10, generator=gen) * 6
        y = torch.randint(0, 10, (64,), generator=gen)
        y[:32] = z[:, :32].mean(0).argmax(-1)  # half the rows have a correct ensemble (sigma = -1)
        for s in (0.0, 0.5, 1.0):
            ours = surrogate_logits(z, y, mode, s, tau, quirks=True)
            torch.testing.assert_close(ours, reference_surrogate(z, y, mode, s, tau), rtol=1e-4, atol=1e-4)


def test_intended_weights_are_the_ensemble_margin_sensitivities():
    """w_i = M * d(log p_bar_k - log p_bar_y) / d v_i[k] when p_i is the member's own distribution."""
    gen = torch.Generator().manual_seed(1)
    v = (torch.randn(4, 16, 10, generator=gen) * 3).requires_grad_(True)
    y = torch.randint(0, 10, (16,), generator=gen)
    k = (y + 1 + torch.randint(0, 9, (16,), generator=gen)) % 10
    p = F.softmax(v, -1)
    p_bar = p.mean(0)
    rows = torch.arange(16)
    margin = (p_bar[rows, k].log() - p_bar[rows, y].log()).sum()
    (grad,) = torch.autograd.grad(margin, v)
    w = member_weights(p.detach(), p_bar.detach(), y, k)
    torch.testing.assert_close(4 * grad[:, rows, k], w, rtol=1e-4, atol=1e-6)
    # the reference's sign trick (ensemble still right, sigma = -1) is a different function
    wq = member_weights(p.detach(), p_bar.detach(), y, k, sigma=-torch.ones(16))
    pk, py = p.detach()[:, rows, k], p.detach()[:, rows, y]
    torch.testing.assert_close(wq, pk * ((1 + pk) / p_bar[rows, k] - py / p_bar[rows, y]).detach())
    assert not torch.allclose(w, wq)


class Fixed(nn.Module):
    """Fixed logits plus a tiny class-independent input term (gradients exist, decisions never move)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1) + 1e-3 * x.flatten(1).mean(1, keepdim=True)


def test_voting_success_is_counted_with_hard_votes():
    """A 1-1-1 vote tie: hard votes (lowest index) say class 0, the sharpened-softmax proxy says 2.

    (Class 2 is every member's first or second choice, so it collects the proxy's residual mass.)
    """
    members = [Fixed([0.0, -100.0, 5.0]), Fixed([-100.0, 5.0, 4.9]), Fixed([5.0, -100.0, 4.9])]
    clf = make_classifier(members, "voting", 3, (1, 4, 4))
    x = torch.full((4, 1, 4, 4), 0.5)
    assert clf.module(x).argmax(1).tolist() == [0] * 4
    assert clf.differentiable(x).argmax(1).tolist() == [2] * 4  # the proxy disagrees
    mora = MORA(n_iter=5, scales=[0.5, 1.0], targeted=True, n_target_classes=2)
    threat = ThreatModel("Linf", 0.01)
    # y = 0: the proxy calls it fooled, the hard vote does not -> MORA must not stop or claim it
    out = mora.run(make_ensemble_access(clf, PassCounter()), x, torch.zeros(4, dtype=torch.long), threat,
                   torch.Generator().manual_seed(0))
    assert out.stage == [""] * 4 and out.extras["fooled_per_stage"] == [0, 0, 0, 0]
    assert clf.predict(out.x_adv).tolist() == [0] * 4
    # y = 2: the proxy says correct, the hard vote says 0 -> fooled at once, in the first stage
    counter = PassCounter()
    out = mora.run(make_ensemble_access(clf, counter), x, torch.full((4,), 2), threat, torch.Generator().manual_seed(0))
    assert out.stage == ["s=0.5"] * 4
    assert counter.backward == 0  # per-sample early exit before the first gradient


def test_mora_needs_an_ensemble():
    plain = make_classifier([Fixed([1.0, 0.0])], "softmax", 2, (1, 4, 4))
    plain.module = plain.module.members[0]  # a single model, no members
    with pytest.raises(UserError, match="ensemble"):
        make_ensemble_access(plain, PassCounter())
    with pytest.raises(UserError, match="decay"):
        build_attack({"name": "mora", "decay": "exp"})


# ---------------------------------------------------------------------------------------------
# on a trained ensemble of small CNNs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three independent small CNNs trained 3 epochs on digits, the test images and labels."""
    data = load_dataset({"name": "digits"})
    spec = {"name": "ensemble", "members": 3,
            "train": {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.005, "weight_decay": 0.0}}
    ctx = BuildContext(data=data, model_cfg={"name": "small_cnn", "width": 16, "hidden": 32}, device=CPU, seed=0,
                       cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    clf = build_defense(spec).build(ctx)
    return clf, to_unit(data.test_x[:150], CPU), data.test_y[:150]


def _correct(clf, x, y):
    ok = clf.predict(x) == y
    return x[ok], y[ok]


@pytest.mark.parametrize("mode", MODES)
def test_mora_beats_apgd_ce_at_equal_gradient_evaluations(trained, mode):
    base, x, y = trained
    clf = make_classifier(base.module, mode, 10, (1, 8, 8))
    xs, ys = _correct(clf, x, y)
    assert xs.shape[0] > 100
    threat = ThreatModel("Linf", 0.1)
    counter = PassCounter()
    out = MORA(n_iter=20, scales=[0.5], targeted=False).run(make_ensemble_access(clf, counter), xs, ys, threat,
                                                             torch.Generator().manual_seed(0))
    assert not threat.violations(out.x_adv, xs).any()
    mora_robust = int((clf.predict(out.x_adv) == ys).sum())  # judged by the true rule (hard votes)
    # APGD-CE on the ensemble output (the vote proxy for voting) with at least MORA's gradient budget
    n_iter = math.ceil(counter.backward / xs.shape[0])
    apgd_counter = PassCounter()
    access = ModelAccess(CountingModule(clf.differentiable, apgd_counter), 10, apgd_counter)
    apgd = AutoAttackRef(version="custom", attacks=["apgd-ce"], n_iter=n_iter)
    x_apgd = apgd.run(access, xs, ys, threat, torch.Generator().manual_seed(0)).x_adv
    apgd_robust = int((clf.predict(x_apgd) == ys).sum())
    assert apgd_counter.backward >= counter.backward
    assert mora_robust <= apgd_robust, (mode, mora_robust, apgd_robust)
    assert mora_robust < xs.shape[0]


def test_mora_is_seeded_and_exit_interval_does_not_change_results(trained):
    base, x, y = trained
    clf = make_classifier(base.module, "softmax", 10, (1, 8, 8))
    xs, ys = _correct(clf, x[:60], y[:60])
    threat = ThreatModel("Linf", 0.1)

    def attack(seed: int, **kw):
        counter = PassCounter()
        out = MORA(n_iter=10, scales=[0.5, 1.0], targeted=True, n_target_classes=2, **kw).run(
            make_ensemble_access(clf, counter), xs, ys, threat, torch.Generator().manual_seed(seed))
        return out, counter

    a, ca = attack(0)
    b, _ = attack(0)
    c, cc = attack(0, exit_every=5)
    assert torch.equal(a.x_adv, b.x_adv) and a.stage == b.stage
    assert torch.equal(a.x_adv, c.x_adv) and a.stage == c.stage  # frozen samples are the same samples
    assert cc.backward >= ca.backward  # ... only the counted work differs
    d, _ = attack(1)
    assert not torch.equal(a.x_adv, d.x_adv)
    # early exit: samples fooled early stop consuming gradients
    n_stages = 4
    assert ca.backward < xs.shape[0] * 10 * n_stages


def test_quirks_flag_changes_the_attack_as_documented(trained):
    base, x, y = trained
    clf = make_classifier(base.module, "softmax", 10, (1, 8, 8))
    xs, ys = _correct(clf, x[:40], y[:40])
    access = make_ensemble_access(clf, PassCounter())
    # the targeted stage: the reference drops the reweighing, so s has no effect there
    z = torch.stack([m(xs) for m in base.module.members])
    t = (ys + 1) % 10
    intended = [MORA()._objective(z, ys, t, s, "softmax", 0.2, 10.0) for s in (0.0, 1.0)]
    quirky = [MORA(reference_quirks=True)._objective(z, ys, t, s, "softmax", 0.2, 10.0) for s in (0.0, 1.0)]
    assert torch.equal(quirky[0], quirky[1]) and not torch.allclose(intended[0], intended[1])
    # untargeted: f_s joins the members and the weights flip sign terms -> a different surrogate and path
    assert not torch.allclose(surrogate_logits(z, ys, "softmax", 1.0, 0.2),
                              surrogate_logits(z, ys, "softmax", 1.0, 0.2, quirks=True))
    threat = ThreatModel("Linf", 0.1)
    runs = [MORA(n_iter=10, scales=[1.0], targeted=False, reference_quirks=q).run(
        access, xs, ys, threat, torch.Generator().manual_seed(0)).x_adv for q in (False, True)]
    assert not torch.equal(runs[0], runs[1])


@pytest.mark.slow
def test_ensemble_suite_end_to_end_in_voting_mode(tmp_path):
    """`arena eval defense=ensemble defense.mode=voting suite=ensemble`: MORA, APGD-CE, APGD-T, verified by hard votes."""
    from harness.api import run_eval

    summary = run_eval(["dataset=digits", "n_samples=40", "batch_size=40", "defense=ensemble", "defense.mode=voting",
                        "defense.train.epochs=2", "model.width=16", "model.hidden=32", "suite=ensemble",
                        "threat.eps=0.1", "+suite.attacks.0.n_iter=10", "+suite.attacks.1.n_iter=10",
                        "+suite.attacks.2.n_iter=10"], tmp_path)
    per = summary["attacks"]
    assert list(per) == ["mora", "apgd-ce", "apgd-t"]
    assert summary["clean_acc"] > 0.5
    assert summary["robust_acc"] <= min(a["robust_acc_after"] for a in per.values())
    assert per["mora"]["broken"] > 0 and per["mora"]["violations"] == 0
    assert per["mora"]["n_backward"] > 0  # MORA's member passes reach the records, in ensemble units
