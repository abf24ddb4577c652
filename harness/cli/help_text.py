"""Help that matches the command: `arena eval --help` and `arena poison --help` list only the
config groups that command composes, and `arena eval --cfg job` shows what will run.

Both commands share one `conf/` directory, so Hydra's own help (`$APP_CONFIG_GROUPS`) lists every
group there, `poison` under eval and `attack`/`suite`/`threat` under poison, and its header says
"hydra_app is powered by Hydra". The help templates in conf/eval.yaml and conf/poison.yaml call
the resolver `${arena_help_groups:CONFIG}` instead, which reads that config's defaults list.

`--cfg job` prints the composed config; with `attack=NAME` the suite is still in it although
only the attack runs (the suite is what runs when no attack is chosen). `show_job_config` prints
the config without the unused suite and says so in a comment line.
"""
from __future__ import annotations

import sys
from typing import Any

import yaml
from omegaconf import OmegaConf


def config_groups(config_name: str) -> str:
    """`group: option, option, ...   (default: X)` for each group in conf/<config_name>.yaml's defaults."""
    from harness.cli.hydra_app import CONF_DIR, group_options

    defaults = (yaml.safe_load((CONF_DIR / f"{config_name}.yaml").read_text()) or {}).get("defaults") or []
    lines = []
    for entry in defaults:
        if not isinstance(entry, dict):
            continue
        for group, default in entry.items():
            group = str(group).replace("optional ", "").strip()
            if group.startswith("override") or not (CONF_DIR / group).is_dir():
                continue
            shown = "none" if default is None else str(default)
            lines.append(f"{group}: {', '.join(group_options(group))}   (default: {shown})")
    return "\n".join(lines)


def register() -> None:
    """The resolver the help templates use (idempotent; also registered in sweep workers)."""
    if not OmegaConf.has_resolver("arena_help_groups"):
        OmegaConf.register_new_resolver("arena_help_groups", config_groups)


def _job_cfg_request(argv: list[str]) -> tuple[list[str], bool] | None:
    """(overrides, resolve) when argv is exactly `--cfg job [--resolve] overrides...`, else None."""
    flags, overrides, resolve, i = [], [], False, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--cfg", "-c"):
            if i + 1 >= len(argv):
                return None
            flags.append(argv[i + 1])
            i += 2
            continue
        if arg == "--resolve":
            resolve = True
        elif arg.startswith("-"):
            return None  # -m, --package, ...: Hydra's own handling
        else:
            overrides.append(arg)
        i += 1
    return (overrides, resolve) if flags == ["job"] else None


def show_job_config(config_name: str, argv: list[str], prog: str) -> int | None:
    """Print `--cfg job` without the unused suite when an attack is chosen; None: leave it to Hydra."""
    request = _job_cfg_request(argv)
    if request is None:
        return None
    overrides, resolve = request
    from hydra import compose, initialize_config_dir

    from harness.core.errors import UserError
    from harness.cli.hydra_app import CONF_DIR, validate_overrides

    try:
        validate_overrides(config_name, overrides, multirun=False)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg: Any = compose(config_name=config_name, overrides=overrides)
    if OmegaConf.select(cfg, "attack") is None or "suite" not in cfg:
        return None
    suite = cfg.suite
    OmegaConf.set_struct(cfg, False)
    del cfg["suite"]
    attack = OmegaConf.select(cfg, "attack.label") or OmegaConf.select(cfg, "attack.name")
    print(f"# attack={attack} runs alone; the suite ({suite.get('name')}@v{suite.get('version', 1)}) is not used")
    print(OmegaConf.to_yaml(cfg, resolve=resolve), end="")
    return 0
