"""The `arena` command: dispatches to subcommands.

- `arena eval [overrides] [-m]`   evaluate defenses against attacks (Hydra; see conf/eval.yaml)
- `arena poison [overrides] [-m]` the poisoning track (Hydra; see conf/poison.yaml)
- `arena board [build|show|html]` build or browse the leaderboards
- `arena layers ...`              list a model's feature layers (LAFEAT taps)
- `arena submit BUNDLE`           check, attack and score a submitted defense
"""
from __future__ import annotations

import importlib
import sys

from harness.core.errors import UserError

SUBCOMMANDS = {
    "eval": ("harness.cli.eval", "main", "evaluate a defense against a suite of attacks (Hydra overrides)"),
    "poison": ("harness.cli.poison", "main", "train on poisoned data under a training-time defense (Hydra overrides)"),
    "board": ("harness.cli.board", "main", "build or browse the leaderboards"),
    "layers": ("harness.cli.layers", "main", "list a model's feature layers for LAFEAT"),
    "submit": ("harness.submit.score", "main", "check, attack and score a defense bundle"),
}


def usage() -> str:
    lines = ["usage: arena <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {desc}" for name, (_, _, desc) in SUBCOMMANDS.items()]
    lines += ["", "`arena <command> --help` for details; `arena eval` alone runs the embedded default."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"arena: error: unknown command {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module_name, func, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"arena: error: command {name!r} is not available in this installation", file=sys.stderr)
            return 2
        raise
    try:
        return int(getattr(module, func)(rest) or 0)
    except UserError as exc:
        print(f"arena {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
