"""Which torch device a run uses: `device=auto|cpu|cuda[:N]`, and one GPU per sweep job.

With several GPUs visible, `auto` gives job k of a Hydra sweep GPU k mod #GPUs, so a joblib sweep
spreads over the GPUs without a scheduler of ours.
"""
from __future__ import annotations

import os

import torch

from harness.core.errors import UserError


def visible_gpus() -> int:
    """Number of CUDA devices this process may use (0 without torch.cuda)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip() in ("", "-1"):
        return 0
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop a CPU sweep
        return 0


def gpu_for_job(job_num: int, n_gpus: int) -> int:
    """The GPU index job `job_num` of a sweep uses when `n_gpus` are visible (round robin)."""
    return job_num % n_gpus if n_gpus > 0 else 0


def current_job_num() -> int:
    """Hydra's `hydra.job.num` of the running job (0 outside a Hydra multirun)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return int(HydraConfig.get().job.num or 0)
    except Exception:  # not under Hydra (api use, tests) or single run
        return 0


def auto_cuda_device() -> str:
    """`device=auto` on a CUDA machine: `cuda` with one GPU, `cuda:k` (k = job mod #GPUs) with several."""
    n = visible_gpus()
    return "cuda" if n <= 1 else f"cuda:{gpu_for_job(current_job_num(), n)}"


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an explicit `cuda` without a GPU is a user error."""
    if name in (None, "auto"):
        return torch.device(auto_cuda_device() if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA GPU is visible; use device=auto or device=cpu")
    return device
