"""`arena poison`: the Hydra task that runs one poisoning-track configuration (or a `-m` sweep) and
rebuilds the poisoning leaderboard.

    arena poison                                      # mnist5k, small_cnn, poison=lsp, defense=standard
    arena poison -m poison=lsp,ar,ops,em defense=standard,ueraser_lite,ueraser_max seed=0,1,2
    arena poison poison=em poison.ratio=0.5 train.epochs=10 dataset=fashion_mnist train_n=5000
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.cli.hydra_app import run_hydra_app, to_plain


def _task_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (api use)
        return []


def poison_task(cfg: DictConfig) -> dict[str, Any]:
    """Run one configuration; rebuild `<work_dir>/leaderboard/poisoning.csv` unless disabled."""
    from harness.poisoning.board import build_poisoning_board
    from harness.poisoning.run import run_poison

    plain = to_plain(cfg)
    summary = run_poison(plain, overrides=_task_overrides())
    board = plain.get("leaderboard") or {}
    if board.get("update", True):
        out = Path(str(board.get("path") or Path(str(plain.get("work_dir"))) / "leaderboard" / "poisoning.csv"))
        build_poisoning_board(Path(str(plain.get("work_dir"))), out)
        print(f"leaderboard: {out}")
    return summary


def main(argv: list[str]) -> int:
    return run_hydra_app("poison", poison_task, argv, prog="arena poison")
