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
    lines += ["", "`arena <command> --help` for details; `arena eval` alone runs the embedded default;",
              "`arena --version` prints the version."]
    return "\n".join(lines)


def version() -> str:
    """`robustarena 0.1.0 (git <sha>)`: what `arena --version` prints, for bug reports and provenance."""
    from harness import __version__
    from harness.results.store import git_revision

    rev = git_revision()
    return f"robustarena {__version__}" + (f" (git {rev[:12]}{'+dirty' if rev.endswith('+dirty') else ''})" if rev != "unknown" else "")


INTERRUPTED = {  # what survives Ctrl-C when nothing more precise was registered (harness.core.progress)
    "eval": "finished batches of the current run are kept; run the same command again to resume",
    "poison": "crafted poisons and finished trainings are cached; run the same command again to continue "
              "(an interrupted training starts over)",
    "submit": "nothing was scored yet; run the command again to start over",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except BrokenPipeError:  # `arena eval -h | head`: the reader left; stop quietly like coreutils
        _quiet_stdout()
        return 141
    except KeyboardInterrupt:
        from harness.core.progress import interrupt_hint, set_interrupt_hint

        name = argv[0] if argv else ""
        hint = interrupt_hint() or INTERRUPTED.get(name, "nothing was written that a rerun cannot redo")
        set_interrupt_hint(None)
        lead = "\n" if sys.stderr.isatty() else ""  # past the ^C the terminal echoed
        print(f"{lead}arena {name}: interrupted; {hint}", file=sys.stderr)
        return 130


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _main(argv: list[str]) -> int:
    from harness.core.progress import set_interrupt_hint

    set_interrupt_hint(None)  # a hint belongs to the command that registered it
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V", "version"):
        print(version())
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
