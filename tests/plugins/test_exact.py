"""attack=exact: a MIP (HiGHS) that finds an adversarial example or proves there is none (issue 19).

Real runs: a small ConvSmall-family network (two stride-2 convolutions, one hidden layer) trained
by the harness on scikit-learn's real 8x8 digits, evaluated through `arena eval`'s own code path.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from attacks.relu_bounds import crown_bounds, extract, input_box, interval_bounds
from harness.core.errors import UserError
from harness.data.models import build_model

pytest.importorskip("highspy")

EPS = 0.08
TINY = ["dataset=digits", "model=conv_small", "model.channels=[4,8]", "model.hidden=32", "defense.train.epochs=6",
        "n_samples=20", "batch_size=20", f"threat.eps={EPS}"]


@pytest.fixture(scope="module")
def verified_run(tmp_path_factory):
    """exact, then a strong PGD on every clean-correct sample (no cascade), on the tiny digits net."""
    from harness.api import run_eval

    work = tmp_path_factory.mktemp("exact")
    summary = run_eval([*TINY, "suite=verified", "evaluator.cascade=false",
                        "suite.attacks=[{name: exact, label: exact, time_limit: 20.0, pgd_steps: 0},"
                        "{name: pgd, label: pgd-100x3, steps: 100, restarts: 3, loss: margin}]"], work, update_board=True)
    records = pd.read_parquet(f"{summary['run_dir']}/samples.parquet")
    board = pd.read_csv(work / "leaderboard" / "evasion.csv")
    return summary, records, board


def test_exact_breaks_some_proves_others_and_certified_below_robust(verified_run):
    summary, records, board = verified_run
    exact = records[(records.attack == "exact") & records.ran]
    assert exact.success.any(), "exact should find adversarial examples at this eps on this net"
    assert set(exact.stage[exact.success]) <= {"mip", "mip+polish"}, "without the PGD pre-screen, the MIP found them"
    assert (exact.certified == 1).any(), "exact should prove some samples robust"
    assert set(exact.certified.unique()) <= {0.0, 1.0}
    assert not (exact.success & (exact.certified == 1)).any(), "a sample cannot be both broken and certified"
    assert (exact.violation == 0).all()  # the harness re-verified the MIP's points in float32
    assert summary["certified_broken"] == 0
    assert 0 < summary["certified_acc"] <= summary["robust_acc"]
    row = board.iloc[0]
    assert row.certified_acc <= row.robust_acc
    assert row.certified_acc == pytest.approx(100 * summary["certified_acc"], abs=0.01)
    # non-verifying attacks leave the column empty (NaN), not 0
    pgd = records[(records.attack == "pgd-100x3") & records.ran]
    assert pgd.certified.isna().all()


def test_certified_samples_are_never_broken_by_pgd(verified_run):
    _, records, _ = verified_run
    cert = set(records[(records.attack == "exact") & (records.certified == 1)].sample_id)
    pgd = records[(records.attack == "pgd-100x3") & records.ran].set_index("sample_id")
    assert cert and cert <= set(pgd.index)
    assert not pgd.loc[sorted(cert), "success"].any(), "PGD broke a sample the MIP proved robust"
    # and exact is complete where PGD succeeds: every PGD success is an exact success too
    exact = records[(records.attack == "exact") & records.ran].set_index("sample_id")
    broken_by_pgd = pgd.index[pgd.success]
    assert exact.loc[broken_by_pgd, "success"].all()


def test_bounds_contain_every_reachable_value():
    torch.manual_seed(0)
    model = build_model({"name": "conv_small", "channels": [4, 8], "hidden": 32, "mean": [0.13], "std": [0.31]}, 10, (1, 8, 8)).eval()
    net = extract(model, (1, 8, 8))
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net.forward(x), model(x).double(), atol=1e-5)
    bounds = crown_bounds(net, x[0], 0.1, label=3)
    lo, up = input_box(x[0], 0.1)
    corners = lo + (up - lo) * torch.randint(0, 2, (2000, lo.numel())).double()
    inside = lo + (up - lo) * torch.rand(2000, lo.numel(), dtype=torch.float64)
    pts = torch.cat([corners, inside])
    a = pts
    for k in range(net.hidden):
        z = a @ net.weights[k].T + net.biases[k]
        assert bool(((z >= bounds.lower[k]) & (z <= bounds.upper[k])).all()), f"layer {k} bound violated"
        a = z.clamp_min(0)
    logits = net.forward(pts)
    margin = logits[:, 3:4] - logits
    margin[:, 3] = float("inf")
    assert bool((margin >= bounds.margin_lower).all())
    # CROWN is never looser than interval arithmetic (it is intersected with it)
    i_lo, i_up = interval_bounds(net, lo, up)
    for k in range(net.hidden):
        assert bool((bounds.lower[k] >= i_lo[k]).all() and (bounds.upper[k] <= i_up[k]).all())


@pytest.mark.parametrize("model, what", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 10)), "max-pooling"),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Sigmoid(), nn.Linear(10, 10)), "not affine"),
], ids=["maxpool", "sigmoid"])
def test_unsupported_networks_are_one_line_user_errors(model, what):
    with pytest.raises(UserError, match=what) as err:
        extract(model.eval(), (1, 8, 8))
    assert "\n" not in str(err.value)


def test_exact_refuses_l2_and_randomised_access():
    from harness.core.attack import build_attack
    from harness.core.access import ModelAccess, PassCounter
    from harness.core.threat import ThreatModel

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    attack = build_attack({"name": "exact"})
    with pytest.raises(UserError, match="L-inf"):
        attack.run(ModelAccess(model, 10, PassCounter()), x, y, ThreatModel("L2", 0.5), torch.Generator())
    with pytest.raises(UserError, match="randomised"):
        attack.run(ModelAccess(model, 10, PassCounter(), randomized=True), x, y, ThreatModel("Linf", 0.1), torch.Generator())


def test_certified_accuracy_from_records():
    """certified_acc counts clean-correct samples some attack proved robust; NaN without a verifier;
    a certified sample that an attack broke is counted as a soundness failure, not hidden."""
    from harness.results.metrics import accuracies

    def rows(sample, attack, order, correct, success, cert):
        return {"sample_id": sample, "attack": attack, "order": order, "ran": True, "correct_draws": correct, "draws": 1,
                "success": success, "n_forward": 0.0, "n_backward": 0.0, "n_queries": 0, "time_s": 0.0,
                "violation": False, "budget_exhausted": False, "certified": cert}

    nan = float("nan")
    recs = pd.DataFrame([
        rows(0, "clean", 0, 1, False, nan), rows(0, "pgd", 1, 1, False, nan), rows(0, "exact", 2, 1, False, 1.0),
        rows(1, "clean", 0, 1, False, nan), rows(1, "pgd", 1, 0, True, nan), rows(1, "exact", 2, 0, True, 0.0),
        rows(2, "clean", 0, 1, False, nan), rows(2, "pgd", 1, 1, False, nan), rows(2, "exact", 2, 1, False, 0.0),
        rows(3, "clean", 0, 0, False, nan), rows(3, "pgd", 1, 0, False, nan), rows(3, "exact", 2, 0, False, 0.0),
    ])
    acc = accuracies(recs)
    assert acc["robust_acc"] == 0.5 and acc["certified_acc"] == 0.25 and acc["certified_broken"] == 0
    assert acc["attacks"]["exact"]["certified"] == 1 and "certified" not in acc["attacks"]["pgd"]
    assert acc["certified_acc"] <= acc["robust_acc"]
    no_verifier = recs[recs.attack != "exact"]
    assert accuracies(no_verifier)["certified_acc"] is None  # no verifier ran: null in summary.json
    assert accuracies(no_verifier.drop(columns="certified"))["certified_acc"] is None  # records from before the column
    broken = recs.copy()
    broken.loc[(broken.sample_id == 0) & (broken.attack == "pgd"), ["correct_draws", "success"]] = [0, True]
    assert accuracies(broken)["certified_broken"] == 1
