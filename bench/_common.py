"""Helpers shared by the benchmarks: locating ../shared, loading its models, writing results."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout; ROBUSTARENA_SHARED points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("ROBUSTARENA_SHARED") or REPO.parent / "shared")
RESULTS = REPO / "bench" / "results"


def require_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        sys.exit(f"{path} not found: this benchmark needs ../shared beside the checkout")
    return path


def load_shared_model(folder: str, weights: str | None = None) -> torch.nn.Module:
    """Import ../shared/models/<folder>/model.py and load its weights (weights_only inside)."""
    path = require_shared("models", folder, "model.py")
    spec = importlib.util.spec_from_file_location(f"shared_{folder}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    w = str(path.with_name(weights)) if weights else None
    return module.load(w).eval()


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(f"wrote {RESULTS / name}.json and .md")
