"""Launcher presets (`launcher=local|joblib|submitit_local|slurm|ray`, files in conf/launcher/).

Each preset is a `# @package _global_` overlay that picks a Hydra launcher plugin and sets its
parameters; the harness itself is launcher-agnostic because a run is content-addressed and
resumes from its last finished batch, so any launcher that re-runs a job with the same config
(submitit requeue, Ray task retry, a human re-running the command) continues where it stopped.

This module holds the little glue the presets need:
- the OmegaConf resolver `${arena_n_jobs:}` (joblib's default parallelism: one job per visible
  GPU, else a quarter of the CPU cores), registered when `harness.cli.hydra_app` is imported;
- `auto_cuda_device()`: with several GPUs visible, job k of a sweep takes GPU k mod #GPUs;
- `check_launcher(name)`: a one-line error naming the package to install when a preset's plugin
  is missing (e.g. hydra-ray-launcher), instead of Hydra's multi-line "Could not find" message.
"""
from __future__ import annotations

import importlib.util
import os

from omegaconf import OmegaConf

from harness.core.device import visible_gpus
from harness.core.errors import UserError

# preset -> (module of the Hydra plugin it needs, how to install it)
PLUGINS: dict[str, tuple[str | None, str]] = {
    "local": (None, ""),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "pip install hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "pip install hydra-submitit-launcher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "pip install hydra-submitit-launcher"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "pip install 'robustarena[ray]' (hydra-ray-launcher and ray)"),
}


def default_n_jobs() -> int:
    """joblib parallelism: one job per visible GPU, else a quarter of the cores (torch uses several)."""
    gpus = visible_gpus()
    return gpus if gpus > 0 else max(1, (os.cpu_count() or 1) // 4)


def check_launcher(name: str) -> None:
    """Raise a one-line `UserError` when the plugin behind preset `name` is not installed."""
    module, hint = PLUGINS.get(name, (None, ""))
    if module is not None and importlib.util.find_spec(module) is None:
        raise UserError(f"launcher={name} needs the Hydra plugin {module.split('.')[-1]!r}, which is not installed; {hint}")


def register_resolvers() -> None:
    """Register the OmegaConf resolvers the presets use (idempotent)."""
    if not OmegaConf.has_resolver("arena_n_jobs"):
        OmegaConf.register_new_resolver("arena_n_jobs", default_n_jobs)
