"""In-process entry points (tests, notebooks): the same code path as the CLI, minus the process."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from harness.cli.hydra_app import CONF_DIR, to_plain, validate_overrides


def compose_config(overrides: list[str], config_name: str = "eval") -> dict[str, Any]:
    """The resolved config `arena <config_name> overrides...` would run with."""
    validate_overrides(config_name, overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_plain(compose(config_name=config_name, overrides=overrides))


def run_eval(overrides: list[str], work_dir: Path | str, update_board: bool = False) -> dict[str, Any]:
    """Run `arena eval` in-process with `work_dir=...` and return the summary (+ `run_dir`)."""
    import attacks  # noqa: F401
    import defenses  # noqa: F401
    from harness.evasion import board as leaderboard
    from harness.evasion.run import run_evaluation

    overrides = [*overrides, f"work_dir={work_dir}", "progress=false"]
    cfg = compose_config(overrides)
    summary = run_evaluation(cfg, overrides=[o for o in overrides if not o.startswith(("work_dir=", "progress="))], log=lambda *_: None)
    if update_board:
        leaderboard.build([Path(work_dir)], Path(cfg["leaderboard"]["path"]))
    return summary
