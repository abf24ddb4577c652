"""Shared fixtures: paths to ../shared and one trained embedded-default model per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one intra-op thread each instead of oversubscribing
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARENA_SHARED") or REPO.parent / "shared")  # ARENA_SHARED: a checkout elsewhere


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
