"""Which torch device a run uses: `device=auto|cpu|cuda[:N]`, and one GPU per sweep job.

With several GPUs visible, `auto` gives job k of a Hydra sweep GPU k mod #GPUs, so a joblib sweep
spreads over the GPUs without a scheduler of ours.
"""
from __future__ import annotations

import os
from typing import Any, Callable

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


SUPPORTED = ("cpu", "cuda")  # what the harness runs on and is tested on


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an explicit `cuda` without a GPU, an index past the visible
    GPUs, or a device type the harness does not run on (meta, mps, xla, ...) is a user error."""
    if name in (None, "auto"):
        return torch.device(auto_cuda_device() if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device={name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type not in SUPPORTED:
        raise UserError(f"device={name!r} is not supported (the harness runs on cpu and cuda); use device=auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA GPU is visible; use device=auto or device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= visible_gpus():
        raise UserError(f"device={name!r} but only {visible_gpus()} CUDA GPU(s) are visible (cuda:0..cuda:{visible_gpus() - 1}); "
                        f"use device=auto or a visible index")
    return device


# ---------------------------------------------------------------------------------- batch_size=auto
AUTO_BATCH_CAP = 4096  # batch_size=auto never goes above this (nor above the evaluation's size)
AUTO_MEMORY_FRACTION = 0.75  # a probe fits when its peak stays under this share of the GPU's memory


def largest_fitting(limit: int, fits: Callable[[int], bool], start: int = 16) -> int:
    """The largest of start, 2*start, 4*start, ... (the last one `limit`) for which `fits` holds,
    stopping at the first that does not; 0 when even the first does not fit."""
    size, best = min(start, limit), 0
    while size >= 1 and fits(size):
        best = size
        if size >= limit:
            break
        size = min(size * 2, limit)
    return best


def fit_batch_size(module: torch.nn.Module, example: torch.Tensor, limit: int, device: torch.device,
                   amp: torch.dtype | None = None, default: int = 250) -> tuple[int, dict[str, Any]]:
    """`batch_size=auto`: (the batch size, facts for the manifest).

    On CUDA: the largest doubling size up to `limit` whose probe (one forward and one backward pass
    to the input, what a gradient attack's step costs, on the evaluation's own images repeated, under
    the run's autocast) neither runs out of memory nor peaks above AUTO_MEMORY_FRACTION of the GPU's
    memory; the rest is headroom for the attack's own tensors and the verdict. Elsewhere: `default`.
    """
    if device.type != "cuda":
        return default, {"batch_size_rule": f"default on {device.type}"}
    total = torch.cuda.get_device_properties(device).total_memory
    peaks: dict[int, int] = {}

    def fits(size: int) -> bool:
        x = grad = out = None
        try:
            x = example[torch.arange(size) % example.shape[0]].to(device).requires_grad_(True)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = module(x)
            grad, = torch.autograd.grad(out.float().logsumexp(1).sum(), x)
            torch.cuda.synchronize(device)
            peaks[size] = int(torch.cuda.max_memory_allocated(device))
            return peaks[size] <= AUTO_MEMORY_FRACTION * total
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            x = grad = out = None
            torch.cuda.empty_cache()

    size = largest_fitting(max(int(limit), 1), fits)
    if size == 0:
        raise UserError(f"batch_size=auto: a batch of {min(16, limit)} images does not fit on {device} "
                        f"({total / 2**30:.1f} GiB); set batch_size to a smaller number, or free the GPU")
    return size, {"batch_size_rule": f"largest doubling up to {limit} whose forward+backward peaks under "
                                     f"{AUTO_MEMORY_FRACTION:.0%} of {total / 2**30:.1f} GiB",
                  "batch_size_probe_peak_bytes": {str(k): v for k, v in sorted(peaks.items())}}
