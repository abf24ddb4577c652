"""`arena eval`: the Hydra task that runs one evaluation and updates the leaderboard."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from harness.cli.hydra_app import run_hydra_app, to_plain


def _task_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (api use)
        return []


def eval_task(cfg: DictConfig) -> dict[str, Any]:
    import attacks  # noqa: F401  (registers attacks)
    import defenses  # noqa: F401  (registers defenses)
    from harness.evasion import board as leaderboard
    from harness.evasion.run import run_evaluation
    from harness.results.terminal import print_summary
    from harness.cli.tracking import log_run

    plain = to_plain(cfg)
    summary = run_evaluation(plain, overrides=_task_overrides())
    print_summary(summary)
    log_run(plain.get("logger"), plain, summary)
    board = plain.get("leaderboard") or {}
    if board.get("update", True):
        out = Path(str(board.get("path")))
        leaderboard.build([Path(str(plain.get("work_dir")))], out)
        print(f"leaderboard: {out}")
    return summary


def main(argv: list[str]) -> int:
    return run_hydra_app("eval", eval_task, argv, prog="arena eval")
