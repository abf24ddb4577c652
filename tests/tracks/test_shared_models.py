"""Real models trained by others, on the real CIFAR-10 test images in ../shared (skipped when absent)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from harness.api import run_eval
from helpers import shared_path

CIFAR_X_SHA = "da362006b99671213d1a5d856cab2bedf64d40bad4501630ee60f4ceb2d3ec7f"
CIFAR_Y_SHA = "6327b0e49549c8cf6ad65317a0fb463ec49ade30d02f63daec6b149052db4922"


def test_cifar10_file_content_is_pinned():
    path = shared_path("data", "cifar10_test_first1000.npz")
    with np.load(path) as f:
        assert hashlib.sha256(f["x"].tobytes()).hexdigest() == CIFAR_X_SHA
        assert hashlib.sha256(f["y"].astype(np.int64).tobytes()).hexdigest() == CIFAR_Y_SHA


@pytest.mark.slow
def test_resnet2b_clean_and_pgd(session_work):
    """Published: clean 70.3 % on the first 1,000 images; CE-PGD-20 at 2/255 gives 57.0 % (an upper bound)."""
    data = shared_path("data", "cifar10_test_first1000.npz")
    model = shared_path("models", "cifar10_resnet2b", "model.py")
    weights = shared_path("models", "cifar10_resnet2b", "weights.pth")
    s = run_eval(["dataset=npz", f"dataset.path={data}", "defense=checkpoint", f"defense.model_file={model}",
                  f"defense.weights={weights}", "threat.eps=0.00784313725", "attack=pgd", "attack.steps=20"], session_work)
    assert s["n_samples"] == 1000
    assert s["clean_acc"] == pytest.approx(0.703, abs=1e-9)
    assert s["robust_acc"] <= 0.570
    assert s["robust_acc"] >= 0.45  # far lower than AutoAttack's 55.0 % would mean a broken threat model
