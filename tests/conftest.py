"""Shared fixtures: paths to ../shared and one trained embedded-default model per session.

Shared helpers (paths, forked CLI runs, records, small models) live in tests/helpers.py; this
directory is on sys.path for every test (pytest inserts a rootdir conftest's folder), so tests in
tests/unit, tests/plugins, tests/tracks and tests/cli import them with `from helpers import ...`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import REPO, SHARED, shared_path  # noqa: F401  (re-exported for older imports)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one intra-op thread each instead of oversubscribing
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` (device=cuda variants) are skipped where no CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def session_work(tmp_path_factory) -> Path:
    """One work dir per test session, so trained defenses are cached across tests."""
    return tmp_path_factory.mktemp("arena-work")


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits as DatasetSplits (read-only: tests slice it, never write into it)."""
    from harness.data.datasets import load_dataset

    return load_dataset({"name": "digits"})


# ------------------------------------------------------------------ submission bundles (arena submit)

HOSTILE = {"hostile_import", "forging", "caching"}  # their model.py must never run in the test process


def import_model_file(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def submit_cnn() -> tuple[dict[str, torch.Tensor], float]:
    """A small CNN trained on the mnist5k training split: (state dict, test accuracy)."""
    from harness.data.datasets import load_dataset
    from harness.data.training import accuracy

    from helpers import trained_small_cnn

    data = load_dataset({"name": "mnist5k"})
    net = trained_small_cnn(data, epochs=3)
    acc = accuracy(net, data.test_x, data.test_y, device=torch.device("cpu"))
    assert acc > 0.75, f"the test CNN trained badly ({acc:.3f}); the verdicts below would mean little"
    return net.state_dict(), acc


@pytest.fixture(scope="session")
def submit_bundle(tmp_path_factory, submit_cnn):
    """Copy a bundle from tests/bundles into a temp dir, write its trained weights and fill in the card.

    `replace` substitutes placeholders in model.py; a hostile bundle's model.py is never imported
    here (its weights come from the clean bundle's architecture, which it shares).
    """
    import shutil

    import yaml

    from harness.core.hashing import file_sha256
    from helpers import BUNDLES

    root = tmp_path_factory.mktemp("submit-bundles")
    state, acc = submit_cnn

    def make(example: str, replace: dict[str, str] | None = None, **card_changes) -> Path:
        dst = root / f"{example}-{len(list(root.iterdir()))}"
        shutil.copytree(BUNDLES / example, dst)
        if not (dst / "model.py").exists():  # a bundle that differs from `clean` only in its card
            shutil.copy(BUNDLES / "clean" / "model.py", dst / "model.py")
        for key, value in (replace or {}).items():
            (dst / "model.py").write_text((dst / "model.py").read_text().replace(key, value))
        arch = BUNDLES / "clean" / "model.py" if example in HOSTILE else dst / "model.py"
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


@pytest.fixture(scope="module")
def full_isolation():
    """The bubblewrap sandbox, or a skip naming why it is not usable here (CI installs bubblewrap)."""
    from harness.submit.sandbox import detect_isolation

    iso = detect_isolation("auto")
    if iso.level != "full":
        pytest.skip(f"bubblewrap is not usable here ({iso.reason}); these checks need full isolation")
    return iso
