"""The README's Python example, extracted and run as written on the shared ResNet-2B (slow tier)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, shared_path


def readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_the_api_example():
    (block,) = [b for b in readme_python_blocks() if "harness.evaluate(" in b]
    assert "harness.attack(" in block and "../shared/models/cifar10_resnet2b" in block


@pytest.mark.slow
@pytest.mark.shared
def test_the_readme_api_example_runs_on_the_shared_resnet2b(tmp_path):
    shared = shared_path("models", "cifar10_resnet2b", "model.py").parents[2]
    (block,) = [b for b in readme_python_blocks() if "harness.evaluate(" in b]
    (tmp_path / "shared").symlink_to(shared)  # the example's paths are relative: ../shared beside the checkout
    (tmp_path / "repo").mkdir()
    script = tmp_path / "example.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path / "repo", capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout.splitlines()[0]
    clean, robust = (float(v) for v in re.findall(r"(?:clean|robust)_acc=([0-9.]+)", first))
    assert clean == pytest.approx(0.70, abs=0.005)  # 140 of the first 200 (the shared README: 70.3 % on 1,000)
    assert 0.08 <= robust <= 0.25  # PGD at 8/255 on ResNet-2B: about 17-19 % on 1,000 (shared README)
    assert "n_samples=200" in first and "broken=" in first
