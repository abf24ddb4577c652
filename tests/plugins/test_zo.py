"""Black-box track: the query oracle, ZO-NGD and the score-based baselines (issue 5).

Real runs on the embedded real MNIST digits (mnist5k) against a small CNN trained here for two
epochs; no mocks of the oracle or the attacks. Independent pass counts come from
`harness.core.access.CountingModule`, which sits between the oracle and the model.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from harness.core.attack import build_attack
from attacks.zo_ngd import damped_solve, hinge_loss
from harness.core.access import Capability, CountingModule, PassCounter
from harness.core.classifier import Classifier
from harness.data.datasets import load_dataset
from harness.core.oracle import (
    OracleAccessError,
    QueryBudgetExceeded,
    QueryOracle,
    log_scores,
    make_oracle,
    query_summary,
)
from harness.core.threat import ThreatModel
from harness.data.training import TrainConfig, train

from helpers import REPO
N_EVAL = 24
# ZO-NGD settings for MNIST-size inputs (see docs/zo_ngd.md for the tuning behind them)
NGD_MNIST = dict(name="zo_ngd", q=20, mu=1.0, eta=200.0, lam=1e4, iterations=None)
NGD_NLL_MNIST = dict(name="zo_ngd", q=20, mu=1.0, eta=5.0, lam=1e-3, loss="nll", iterations=None)


class TinyCNN(nn.Module):
    """A small MNIST CNN: fast enough for thousands of queries per test on a shared CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def mnist():
    """A standard-trained tiny CNN on mnist5k and N_EVAL correctly classified test digits."""
    torch.manual_seed(0)
    data = load_dataset({"name": "mnist5k"})
    model = TinyCNN()
    train(model, data.train_x, data.train_y, TrainConfig(epochs=2, batch_size=64, lr=0.05),
          device=torch.device("cpu"), seed=0, progress=False)
    x = data.test_x[:200].float() / 255
    y = data.test_y[:200]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    assert ok.float().mean() > 0.85, "the tiny CNN should train to >85% in two epochs"
    return model, x[ok][:N_EVAL], y[ok][:N_EVAL]


def _oracle(model: nn.Module, n: int, budget: int, counter: PassCounter | None = None, **kw) -> QueryOracle:
    module = CountingModule(model, counter) if counter is not None else model
    return QueryOracle(module, n=n, budget=budget, num_classes=10, input_shape=(1, 28, 28), **kw)


def _run(spec: dict, model, x, y, eps: float = 0.2, seed: int = 0, counter: PassCounter | None = None):
    attack = build_attack(spec)
    oracle = _oracle(model, x.shape[0], attack.budget, counter)
    result = attack.run(oracle, x, y, ThreatModel("Linf", eps), torch.Generator().manual_seed(seed))
    return attack, oracle, result


# ------------------------------------------------------------------------------------ oracle
def test_oracle_hides_model_and_gradients(mnist):
    model, x, y = mnist
    oracle = _oracle(model, 4, budget=10)
    for name in ("model", "module", "parameters", "state_dict", "forward", "grad", "classifier"):
        with pytest.raises(OracleAccessError):
            getattr(oracle, name)
    with pytest.raises(OracleAccessError):
        oracle.model = model
    with pytest.raises(OracleAccessError):
        pickle.dumps(oracle)
    xq = x[:4].clone().requires_grad_(True)
    scores = oracle(xq, torch.arange(4))
    assert not scores.requires_grad and scores.grad_fn is None
    with pytest.raises(RuntimeError):
        scores.sum().backward()
    assert xq.grad is None
    # probabilities by default, logits when configured; both are the model's own scores
    assert torch.allclose(scores.sum(1), torch.ones(4), atol=1e-5)
    logit_oracle = _oracle(model, 4, budget=10, output="logits")
    with torch.no_grad():
        assert torch.allclose(logit_oracle(x[:4], torch.arange(4)), model(x[:4]), atol=1e-5)


def test_oracle_budget_is_per_sample_and_atomic(mnist):
    model, x, _ = mnist
    counter = PassCounter()
    oracle = _oracle(model, 3, budget=5, counter=counter)
    oracle(x[[0, 0, 0, 1]], torch.tensor([0, 0, 0, 1]))
    assert oracle.queries.tolist() == [3, 1, 0]
    with pytest.raises(QueryBudgetExceeded):  # sample 0 would reach 6 > 5; sample 2 is fine
        oracle(x[[0, 0, 0, 2]], torch.tensor([0, 0, 0, 2]))
    assert oracle.queries.tolist() == [3, 1, 0], "a refused call must count nothing"
    assert counter.forward == 4, "a refused call must not reach the model"
    oracle(x[[0, 0, 2, 2, 2, 2, 2]], torch.tensor([0, 0, 2, 2, 2, 2, 2]))  # exactly at the budget
    assert oracle.queries.tolist() == [5, 1, 5]
    assert oracle.affordable(1).tolist() == [False, True, False]
    assert oracle.exhausted.tolist() == [True, False, True]
    q = oracle.queries
    q.zero_()  # the tally handed out is a copy
    assert oracle.queries.tolist() == [5, 1, 5]
    assert oracle.total == 11 == oracle.passes == counter.forward
    with pytest.raises(ValueError):
        oracle(x[:1], torch.tensor([3]))  # not a sample of this batch


def test_make_oracle_reads_budget_and_output(mnist):
    model, x, y = mnist
    clf = Classifier(module=model, num_classes=10, input_shape=(1, 28, 28))
    attack = build_attack({"name": "zo_ngd", "budget": 77, "output": "logits"})
    assert attack.requires is Capability.SCORES
    oracle = make_oracle(clf, attack, batch_size=5, device="cpu")
    assert (oracle.budget, oracle.n, oracle.output) == (77, 5, "logits")


# ------------------------------------------------------------------------------- the attacks
@pytest.mark.parametrize("spec", [
    dict(NGD_MNIST, budget=400),
    dict(name="zo_ngd", q=10, mu=1.0, eta=4e-4, lam=5e-6, fisher="two_class", iterations=None, budget=400),
    dict(name="zo_ngd", q=10, mu=1.0, eta=20.0, lam=1e4, fisher="kclass", iterations=None, budget=400),
    dict(name="zo_sgd", q=10, mu=1.0, eta=0.01, iterations=None, budget=400),
    dict(name="nes", q=10, iterations=None, budget=400),
    dict(name="square", budget=400),
], ids=["zo_ngd", "zo_ngd-two_class", "zo_ngd-kclass", "zo_sgd", "nes", "square"])
def test_query_counts_equal_model_passes_and_respect_budget(mnist, spec):
    model, x, y = mnist
    counter = PassCounter()
    attack, oracle, result = _run(spec, model, x, y, eps=0.15, counter=counter)
    queries = oracle.queries
    assert oracle.total == int(queries.sum()) == counter.forward == oracle.passes
    assert int(queries.max()) <= attack.budget
    assert bool((queries >= 1).all())
    threat = ThreatModel("Linf", 0.15)
    assert not threat.violations(result.x_adv, x).any()
    with torch.no_grad():
        fooled = model(result.x_adv).argmax(1) != y
    # stop at success: every unfooled sample ran until it could not pay for another step
    assert bool((oracle.exhausted | fooled).all())
    if spec["name"] != "square":
        step = attack.probes_per_step + 1
        assert bool(((queries - 1) % step == 0).all()), "q+1 queries per iteration plus the first"
        assert bool((queries[~fooled] > attack.budget - step).all())


@pytest.mark.parametrize("spec", [NGD_MNIST, NGD_NLL_MNIST], ids=["hinge", "nll"])
def test_zo_ngd_breaks_standard_model(mnist, spec):
    model, x, y = mnist
    eps = 0.2
    attack, oracle, result = _run(dict(spec, budget=3000), model, x, y, eps=eps)
    threat = ThreatModel("Linf", eps)
    assert not threat.violations(result.x_adv, x).any()
    with torch.no_grad():
        fooled = model(result.x_adv).argmax(1) != y
    summary = query_summary(oracle.queries, fooled, oracle.exhausted)
    assert summary["success_rate"] >= 0.7, summary
    assert summary["median_queries"] < 1500, summary
    # the attack's own stage labels agree with the harness's verdict (deterministic model)
    assert [s == "zo_ngd" for s in result.stage] == fooled.tolist()


@pytest.mark.parametrize("name", ["zo_ngd", "square"])
def test_same_seed_same_queries_and_result(mnist, name):
    model, x, y = mnist
    spec = dict(NGD_MNIST, budget=300) if name == "zo_ngd" else dict(name="square", budget=300)
    rng_before = torch.get_rng_state()
    _, o1, r1 = _run(spec, model, x[:8], y[:8], eps=0.15, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before), "attacks must not consume the global RNG"
    _, o2, r2 = _run(spec, model, x[:8], y[:8], eps=0.15, seed=3)
    assert torch.equal(o1.queries, o2.queries)
    assert torch.equal(r1.x_adv, r2.x_adv)
    _, o3, r3 = _run(spec, model, x[:8], y[:8], eps=0.15, seed=4)
    assert not torch.equal(r1.x_adv, r3.x_adv), "the seed must drive the random directions"


# --------------------------------------------------------------------------------- the maths
def test_fisher_solves_match_dense_inverse():
    gen = torch.Generator().manual_seed(0)
    a, d, lam = 3, 50, 1e-2
    b = torch.randn(a, d, generator=gen, dtype=torch.float64)
    for r in (1, 2, 5):
        h = torch.randn(a, d, r, generator=gen, dtype=torch.float64)
        dense = torch.linalg.solve(lam * torch.eye(d, dtype=torch.float64) + h @ h.transpose(1, 2), b.unsqueeze(-1))
        assert torch.allclose(damped_solve(h, b, lam), dense.squeeze(-1), rtol=1e-8, atol=1e-8)
    # rank one: the reference's Sherman-Morrison form, n = g/lam + (1/(s^2+lam) - 1/lam) v v^T g
    g, gl = b[0], torch.randn(d, generator=gen, dtype=torch.float64)
    s = gl.norm()
    v = gl / s
    ref = g / lam + (1 / (s * s + lam) - 1 / lam) * v * (v @ g)
    assert torch.allclose(damped_solve(gl.view(1, d, 1), g.view(1, d), lam)[0], ref, rtol=1e-8)


def test_log_of_probabilities_survives_float32_rounding_of_p_y():
    """log p_y from float32 probabilities: p_y rounds to exactly 1.0 once the margin exceeds ~17,
    so log(p_y) would be 0; log1p(-sum of the others) keeps it (and its finite differences)."""
    logits = torch.tensor([[30.0, 5.0, 2.0], [25.0, 24.0, 0.0], [1.0, 2.0, 3.0]])
    probs = torch.softmax(logits, 1)
    assert probs[0, 0] == 1.0, "the premise: float32 rounds p_y to 1"
    ours = log_scores(probs, "probs")
    exact = torch.log_softmax(logits.double(), 1)
    assert torch.allclose(ours.double(), exact, rtol=1e-4, atol=1e-30)
    assert ours[0, 0] < 0 and probs.clamp_min(1e-30).log()[0, 0] == 0
    # a finite difference of log p_y along a direction that moves only the runner-up is seen
    nudged = torch.softmax(logits + torch.tensor([[0.0, 0.5, 0.0]]), 1)
    assert log_scores(nudged, "probs")[0, 0] < ours[0, 0]


def test_fisher_change_reports_whether_the_fisher_acts(mnist):
    """At the reference MNIST damping the Fisher rewrites the step; at lambda=1e4 it is inert."""
    model, x, y = mnist
    ref = dict(name="zo_ngd", q=10, mu=1.0, eta=4e-4, lam=5e-6, fisher="two_class", iterations=3, budget=40)
    inert = dict(name="zo_ngd", q=10, mu=1.0, eta=20.0, lam=1e4, fisher="rank1", iterations=3, budget=40)
    _, _, r_ref = _run(ref, model, x[:6], y[:6])
    _, _, r_inert = _run(inert, model, x[:6], y[:6])
    ref_change = torch.tensor(r_ref.extras["fisher_change"])
    inert_change = torch.tensor(r_inert.extras["fisher_change"])
    assert float(ref_change.nanmedian()) > 0.5
    assert float(inert_change.nanmedian()) < 0.05


def test_hinge_is_cw_margin_on_log_probs():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    logp = torch.log_softmax(logits, 1)
    y = torch.tensor([0, 0])
    assert torch.allclose(hinge_loss(logp, y), torch.tensor([1.0, 0.0]), atol=1e-6)
    assert torch.allclose(hinge_loss(logp, y, kappa=0.5), torch.tensor([1.5, 0.0]), atol=1e-6)


# -------------------------------------------------------------------------------- the configs
@pytest.mark.parametrize("name", ["zo_ngd", "zo_sgd", "nes", "square"])
def test_attack_configs_build(name):
    cfg = yaml.safe_load((REPO / "conf" / "attack" / f"{name}.yaml").read_text())
    attack = build_attack(cfg)
    assert attack.name == name and attack.requires is Capability.SCORES
    assert attack.budget == 10_000


def test_blackbox_suite_builds():
    cfg = yaml.safe_load((REPO / "conf" / "suite" / "blackbox.yaml").read_text())
    assert cfg["name"] == "blackbox"
    attacks = [build_attack(spec) for spec in cfg["attacks"]]
    assert all(a.requires is Capability.SCORES for a in attacks)


# ------------------------------------------------------------------------------ end to end
def test_blackbox_attack_through_the_evaluator(tmp_path):
    """`arena eval attack=zo_ngd` on real digits: per-sample query records from the oracle's tally."""
    import pandas as pd

    from harness.api import run_eval

    summary = run_eval([
        "dataset=digits", "n_samples=30", "batch_size=30", "defense.train.epochs=3", "threat.eps=0.2",
        "attack=zo_ngd", "attack.q=10", "attack.mu=1.0", "attack.eta=20.0", "attack.lam=10000.0",
        "attack.iterations=null", "attack.budget=600",
    ], tmp_path)
    (label, stats), = summary["attacks"].items()
    records = pd.read_parquet(f"{summary['run_dir']}/samples.parquet")
    rec = records[(records.attack == label) & records.ran]
    assert len(rec) == stats["attacked"] > 0
    assert rec.n_queries.between(1, 600).all()
    assert int(rec.n_queries.sum()) == stats["n_queries"]
    assert stats["broken"] > 0 and stats["violations"] == 0
    # stop at success: a broken sample used 1 + t*(q+1) queries, an unbroken one ran out of budget
    assert ((rec.n_queries - 1) % 11 == 0).all()
    assert (rec[~rec.success].n_queries > 600 - 11).all()
