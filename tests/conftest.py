"""Shared fixtures: paths to ../shared and one trained embedded-default model per session."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from harness.core.hashing import file_sha256

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one intra-op thread each instead of oversubscribing
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason when it is absent (a user's machine)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: ../shared (real CIFAR-10/MNIST files and models) is only beside CI checkouts")
    return path


@pytest.fixture(scope="session")
def session_work(tmp_path_factory) -> Path:
    """One work dir per test session, so trained defenses are cached across tests."""
    return tmp_path_factory.mktemp("arena-work")


# ------------------------------------------------------------------ submission bundles (arena submit)

BUNDLES = REPO / "tests" / "bundles"
HOSTILE = {"hostile_import", "forging", "caching"}  # their model.py must never run in the test process


def import_model_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def submit_cnn(tmp_path_factory) -> tuple[dict[str, torch.Tensor], float]:
    """A small CNN trained on the mnist5k training split: (state dict, test accuracy)."""
    from harness.data.datasets import load_dataset
    from harness.data.models import SmallCNN
    from harness.data.training import TrainConfig, accuracy, train

    data = load_dataset({"name": "mnist5k"})
    torch.manual_seed(0)  # the initial weights too: the same model on every run
    net = SmallCNN(1, 10, width=8, hidden=32)
    train(net, data.train_x, data.train_y, TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=0.003, weight_decay=0.0),
          device=torch.device("cpu"), seed=0, progress=False)
    acc = accuracy(net, data.test_x, data.test_y, device=torch.device("cpu"))
    assert acc > 0.75, f"the test CNN trained badly ({acc:.3f}); the verdicts below would mean little"
    return net.state_dict(), acc


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory, submit_cnn):
    """Copy a bundle from tests/bundles into a temp dir, write its trained weights and fill in the card."""
    root = tmp_path_factory.mktemp("bundles")
    state, acc = submit_cnn

    def make(example: str, replace: dict[str, str] | None = None, **card_changes) -> Path:
        dst = root / f"{example}-{len(list(root.iterdir()))}"
        shutil.copytree(BUNDLES / example, dst)
        for key, value in (replace or {}).items():
            (dst / "model.py").write_text((dst / "model.py").read_text().replace(key, value))
        arch = BUNDLES / ("clean" if example in HOSTILE else example) / "model.py"  # same Net as clean
        module = import_model_file(arch, f"bundle_{dst.name.replace('-', '_')}").create()
        for part in getattr(module, "members", None) or [module.net]:
            part.load_state_dict(state)
        torch.save(module.state_dict(), dst / "weights.pt")
        text = (dst / "defense.yaml").read_text()
        text = text.replace("FILLED_IN_BY_THE_TEST", file_sha256(dst / "weights.pt")).replace("CLEAN_ACCURACY", f"{100 * acc:.1f}")
        card = yaml.safe_load(text)
        card.update(card_changes)
        (dst / "defense.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
        return dst

    return make


