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


@pytest.fixture(scope="session")
def session_work(tmp_path_factory) -> Path:
    """One work dir per test session, so trained defenses are cached across tests."""
    return tmp_path_factory.mktemp("arena-work")


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits as DatasetSplits (read-only: tests slice it, never write into it)."""
    from harness.data.datasets import load_dataset

    return load_dataset({"name": "digits"})
