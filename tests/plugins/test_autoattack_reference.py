"""`suite=standard` equals the reference AutoAttack sample for sample (issue 12, item 4).

Both sides see the same model, images and eps: the harness through `arena eval suite=standard`
(its cascade, its judge, its verification), the reference through
`AutoAttack(model, version="standard", seed=0).run_standard_evaluation(x, y)` with a pass-counting
wrapper around the model. The per-sample robust masks must be identical and the forward and
backward passes within 2 %. A small CNN trained here on scikit-learn's digits in the fast tier
(the standard components with fewer iterations, targets and queries on both sides, so that it
takes seconds); the shared CIFAR-10 ResNet-2B at 2/255 on the first 100 test images, full
standard version, in the slow tier.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch

from harness.api import compose_config, run_eval
from harness.core.access import CountingModule, PassCounter
from harness.data.datasets import load_dataset, select_eval
from harness.data.models import build_model
from harness.data.training import TrainConfig, to_unit, train
from harness.results.metrics import per_sample_worst
from helpers import shared_path


REDUCED = {"n_iter": 10, "n_target_classes": 3, "square_queries": 200}


def reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
              reduced: dict[str, int] | None = None) -> tuple[torch.Tensor, PassCounter]:
    """The reference's per-sample robust mask and its model passes."""
    from pyautoattack import AutoAttack

    counter = PassCounter()
    aa = AutoAttack(CountingModule(model, counter), norm="Linf", eps=eps, version="standard", seed=0, device="cpu")
    aa.verbose = False
    if reduced:
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = reduced["n_iter"]
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = reduced["n_target_classes"]
        aa.square.n_queries = reduced["square_queries"]
    _, y_adv = aa.run_standard_evaluation(x, y)  # the reference's default batch_size (250)
    return (y_adv == y).cpu(), counter


def harness(overrides: list[str], work: Path, ids: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """The harness's per-sample robust mask (in the order of `ids`) and its total forward/backward passes."""
    s = run_eval(["suite=standard", *overrides], work)
    df = pd.read_parquet(f"{s['run_dir']}/samples.parquet")
    ps = per_sample_worst(df).reindex(ids.tolist())
    attacked = df[(df.attack != "clean") & df.ran]
    assert not attacked.violation.any() and not attacked.nonfinite_grad.any()
    return torch.tensor((ps["worst"] == ps["draws"]).to_numpy()), float(attacked.n_forward.sum()), float(attacked.n_backward.sum())


def assert_equal_to_reference(mask: torch.Tensor, fwd: float, bwd: float, ref_mask: torch.Tensor, ref: PassCounter) -> None:
    print(f"robust: harness {int(mask.sum())}, reference {int(ref_mask.sum())} of {mask.numel()}; forward {fwd:.0f} vs "
          f"{ref.forward} ({100 * (fwd / ref.forward - 1):+.2f} %), backward {bwd:.0f} vs {ref.backward} "
          f"({100 * (bwd / ref.backward - 1):+.2f} %)")
    differ = (mask != ref_mask).nonzero().flatten().tolist()
    assert not differ, f"samples {differ} differ (harness robust: {mask[differ].tolist()})"
    assert abs(fwd / ref.forward - 1) <= 0.02, (fwd, ref.forward)
    assert abs(bwd / ref.backward - 1) <= 0.02, (bwd, ref.backward)


def test_small_cnn_on_digits_equals_the_reference(tmp_path):
    torch.manual_seed(0)
    data = load_dataset({"name": "digits"})
    model = build_model(compose_config(["dataset=digits", "model.width=16"])["model"], 10, data.input_shape)
    train(model, data.train_x, data.train_y, TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=0.002),
          device=torch.device("cpu"), seed=0, progress=False)
    model.eval()
    weights = tmp_path / "cnn.pt"
    torch.save(model.state_dict(), weights)
    n, eps = 40, 0.12
    ids, x_u8, y = select_eval(data, n, 0)
    ref_mask, ref = reference(model, to_unit(x_u8, torch.device("cpu")), y, eps, REDUCED)
    assert 0 < int(ref_mask.sum()) < n  # some samples survive everything, some do not: the masks can differ
    mask, fwd, bwd = harness([*(f"+suite.attacks.0.{k}={v}" for k, v in REDUCED.items()), "dataset=digits", f"n_samples={n}", f"batch_size={n}", "defense=checkpoint",
                              "model=small_cnn", "model.width=16", f"defense.weights={weights}", f"threat.eps={eps}"],
                             tmp_path / "w", ids)
    assert_equal_to_reference(mask, fwd, bwd, ref_mask, ref)


@pytest.mark.slow
@pytest.mark.shared
def test_resnet2b_on_cifar10_equals_the_reference(tmp_path):
    folder = shared_path("models", "cifar10_resnet2b")
    data_file = shared_path("data", "cifar10_test_first1000.npz")
    spec = importlib.util.spec_from_file_location("resnet2b_model", folder / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.load(str(folder / "weights.pth")).eval()
    n, eps = 100, 2 / 255
    data = load_dataset({"name": "npz", "path": str(data_file)})
    ids, x_u8, y = select_eval(data, n, 0)
    ref_mask, ref = reference(model, to_unit(x_u8, torch.device("cpu")), y, eps)
    mask, fwd, bwd = harness(["dataset=npz", f"dataset.path={data_file}", f"n_samples={n}", f"batch_size={n}",
                              "defense=checkpoint", f"defense.model_file={folder / 'model.py'}",
                              f"defense.weights={folder / 'weights.pth'}", f"threat.eps={eps}"], tmp_path / "w", ids)
    assert_equal_to_reference(mask, fwd, bwd, ref_mask, ref)
