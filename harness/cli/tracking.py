"""Optional experiment tracking. The run directory stays the source of truth; wandb mirrors it."""
from __future__ import annotations

import os
from typing import Any

from harness.core.errors import UserError


def log_run(logger_cfg: dict[str, Any] | None, config: dict[str, Any], summary: dict[str, Any]) -> None:
    """Log config, summary and per-attack results to the configured tracker (none by default)."""
    kind = (logger_cfg or {}).get("kind", "none")
    if kind == "none":
        return
    if kind != "wandb":
        raise UserError(f"logger.kind={kind!r} unknown; use logger=none or logger=wandb")
    try:
        import wandb
    except ImportError:
        raise UserError("logger=wandb needs the wandb package; pip install 'robustarena[wandb]'") from None
    mode = os.environ.get("WANDB_MODE") or logger_cfg.get("mode", "offline")
    run = wandb.init(project=logger_cfg.get("project", "robustarena"), mode=mode, config=config,
                     dir=str(config.get("work_dir", ".")), reinit=True)
    try:
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
        run.summary.update(flat)
        attacks = summary.get("attacks") or {}
        if attacks:
            cols = ["attack", "robust_acc_after", "broken", "n_forward", "n_backward", "n_queries", "time_s"]
            table = wandb.Table(columns=cols, data=[[k] + [v.get(c) for c in cols[1:]] for k, v in attacks.items()])
            run.log({"attacks": table})
    finally:
        run.finish()
