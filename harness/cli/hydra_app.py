"""Running a Hydra app from the `arena` CLI with one-line errors for bad overrides.

Hydra's own messages for an unknown group option or key are multi-line and exit with status 1;
here every override is checked first (parse, group options, composition) and a problem becomes a
`UserError`: one line naming the value and the valid choices, exit status 2, nothing written.
Everything else (`--help`, `--cfg job`, `-m` sweeps, launchers) is plain Hydra.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from harness.core.errors import UserError, did_you_mean
from harness.core.numbers import is_fraction
from harness.cli.launchers import check_launcher, register_resolvers

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
register_resolvers()  # ${arena_n_jobs:} in conf/launcher/joblib.yaml (also in joblib/submitit workers)
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                          "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def group_options(group: str) -> list[str]:
    """Options of a config group (YAML files under conf/<group>/), e.g. dataset -> [cifar10, ...]."""
    root = CONF_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")) if root.is_dir() else []


def split_args(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun?, hydra-introspection flag present?)"""
    overrides, multirun, introspect, skip = [], False, False, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            introspect = True
            skip = arg not in ("--info", "-i") or (i + 1 < len(argv) and not "=" in argv[i + 1] and not argv[i + 1].startswith("-"))
        elif arg.startswith("-"):
            introspect = True
        else:
            overrides.append(arg)
    return overrides, multirun, introspect


def _override_values(override: Any) -> list[Any]:
    if override.is_sweep_override():
        try:
            return list(override.sweep_iterator())
        except Exception:  # interval(): only an optimising sweeper (Optuna, Nevergrad) can draw from it
            raise UserError(f"{override.input_line} cannot be listed; give the values (a,b,c or range(0,10,2)) "
                            f"or use a sweeper that samples intervals") from None
    return [override.value()]


def validate_overrides(config_name: str, overrides: list[str], multirun: bool = True,
                       precheck: Callable[[DictConfig], None] | None = None) -> list[DictConfig]:
    """Raise `UserError` for any override Hydra would reject, one line each (`multirun`: -m given).

    Returns the composed config of every combination checked (the first is the overrides' own
    config when nothing is swept), so a caller need not compose it again.

    `precheck(cfg)` (e.g. planning the evaluation) runs on every composed combination as well, so
    a bad value anywhere in a sweep is refused before Hydra writes its sweep directory.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"cannot parse the overrides {' '.join(overrides)!r}: {first}; write key=value (lists as a,b for -m)") from None
    singles: list[str] = []
    for ov in parsed:
        key = ov.key_or_group
        values = _override_values(ov)
        if (CONF_DIR / key).is_dir() and ov.package is None:
            valid = group_options(key)
            for v in values:
                if v is not None and str(v) != "null" and str(v) not in valid:
                    raise UserError(f"unknown {key} {str(v)!r}; choose one of: {', '.join(valid)}")
                if key == "launcher" and v is not None:
                    check_launcher(str(v))
        singles.append(ov)
    # compose once per swept value (others at their first value) to catch unknown keys and bad types
    bases = [ov.input_line for ov in parsed if not ov.is_sweep_override()]
    sweeps = [ov for ov in parsed if ov.is_sweep_override()]
    if sweeps and not multirun:
        s = sweeps[0]
        raise UserError(f"{s.input_line} sweeps over several values; add -m to run one job per value "
                        f"(or write a list as {s.get_key_element()}=[a,b], a string as {s.get_key_element()}='a,b')")
    combos = [bases + [f"{s.get_key_element()}={_fmt(_override_values(s)[0])}" for s in sweeps]]
    for i, s in enumerate(sweeps):
        for v in _override_values(s)[1:]:
            combo = list(combos[0])
            combo[len(bases) + i] = f"{s.get_key_element()}={_fmt(v)}"
            combos.append(combo)
    defaults_cache: dict[tuple[str, ...], Any] = {}
    composed: list[DictConfig] = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combo in combos:
            try:
                items = OverridesParser.create().parse_overrides(combo)
                groups = tuple(o.input_line for o in items if (CONF_DIR / o.key_or_group).is_dir())
                if groups not in defaults_cache:
                    defaults_cache[groups] = _group_defaults(config_name, groups, compose)
                _check_keys(defaults_cache[groups], items)  # our line (with "did you mean"), before Hydra's `+key` advice
                composed.append(compose(config_name=config_name, overrides=combo))
                # values must have the type of the default they replace (no traceback deep in a job)
            except UserError:
                raise
            except (HydraException, ValueError, KeyError) as exc:
                msg = " ".join(str(exc).split())
                raise UserError(f"bad override in {' '.join(combo)!r}: {msg[:300]}") from None
            _check_types(defaults_cache[groups], items)
        if precheck is not None:
            for cfg in composed:
                precheck(cfg)
    return composed


_DEFAULTS_CACHE: dict[tuple[str, tuple[str, ...], float], DictConfig] = {}


def _conf_stamp() -> float:
    """The newest modification time under conf/: a cached composition is stale once a YAML changes."""
    return max((p.stat().st_mtime for p in CONF_DIR.rglob("*.yaml")), default=0.0)


def _group_defaults(config_name: str, groups: tuple[str, ...], compose: Callable[..., DictConfig]) -> DictConfig:
    """The config composed from the group choices alone (what a `key=value` override replaces), read
    only: kept across calls in one process (notebooks, benchmarks and sweeps plan many runs with the
    same groups), recomputed when a file under conf/ changes."""
    key = (config_name, groups, _conf_stamp())
    if key not in _DEFAULTS_CACHE:
        if len(_DEFAULTS_CACHE) > 64:
            _DEFAULTS_CACHE.clear()
        _DEFAULTS_CACHE[key] = compose(config_name=config_name, overrides=list(groups))
    return _DEFAULTS_CACHE[key]


_UNSET = object()


def _check_keys(defaults: DictConfig, items: list[Any]) -> None:
    """A key the composed config does not have -> one `UserError` naming the settings that exist.

    Hydra's own message for `attack.stepz=5` suggests `+attack.stepz=5`, which only adds a key
    nothing reads; `+foo=1` at the top level is refused for the same reason (a `+` inside a plugin
    group, e.g. `+attack.x=1`, is checked by the plugin's registry, which lists its parameters).
    """
    for ov in items:
        key = ov.key_or_group
        if ov.is_delete() or key.startswith("hydra") or (CONF_DIR / key).is_dir() or ov.package is not None:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(defaults, parent, default=_UNSET, throw_on_missing=False) if parent else defaults
        if OmegaConf.is_dict(node) and leaf in list(node.keys()):  # present (a mandatory `???` value too: `in` says no)
            continue
        if ov.is_add() and parent and OmegaConf.is_dict(node):
            continue  # +group.param=...: the plugin's own check decides
        if not OmegaConf.is_dict(node):
            if ov.is_add():
                continue
            why = f"there is no {parent}" if node is _UNSET else f"{parent} has no sub-keys"
            raise UserError(f"{key} is not a setting: {why} in this config; `--cfg job` shows the settings")
        names = sorted(str(k) for k in node.keys() if not str(k).startswith("_") and str(k) != "hydra")
        hint = did_you_mean(leaf, names)
        where = f"{parent} {node.get('name')!r}" if parent and node.get("name") else (parent or "the config")
        if ov.is_add():
            raise UserError(f"+{key} adds a key nothing reads; {where} has: {', '.join(names)}" + (f"; {hint}" if hint else ""))
        raise UserError(f"{key} is not a setting of {where}; it has: {', '.join(names)}" + (f"; {hint}" if hint else ""))


# settings that take a word besides their default's type (checked in full by the plan)
ALSO_ACCEPTS = {"batch_size": ("auto",), "evaluator.amp": ("bfloat16", "float16", "bf16", "fp16", "half")}


def _check_types(defaults: DictConfig, items: list[Any]) -> None:
    """`key=value` whose value cannot stand for the key's default (e.g. batch_size=abc) -> UserError.

    null is accepted (it means "none/all" for several keys; consumers check it), as are added
    keys (+key=...), keys whose default is null or missing, strings for string defaults and
    interpolations (typed only once resolved).
    """
    for ov in items:
        key = ov.key_or_group
        if ov.is_add() or ov.is_delete() or key.startswith("hydra") or (CONF_DIR / key).is_dir():
            continue
        value = ov.value()
        default = OmegaConf.select(defaults, key, default=_UNSET, throw_on_missing=False)
        if value is None or default is None or default is _UNSET or (isinstance(value, str) and "${" in value):
            continue
        words = ALSO_ACCEPTS.get(key, ())
        if isinstance(value, str) and value.strip().lower() in words:
            continue
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or is_fraction(value)
            want = "a number or a fraction such as 8/255"
        elif OmegaConf.is_list(default):
            ok, want = isinstance(value, list), "a list such as [a,b]"
        elif OmegaConf.is_dict(default):
            ok, want = isinstance(value, dict), "a mapping such as {k:v}"
        else:
            ok, want = not isinstance(value, (list, dict)), "a single value"
        if not ok:
            if words:
                want += f" or {', '.join(words[:2]) if len(words) > 1 else words[0]}"
            shown = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
            raise UserError(f"{key}={_fmt(value)} must be {want} (default: {_fmt(shown)})")


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return "null" if value is None else str(value)


SWEEP_USER_ERRORS: list[str] = []


class SweepJobError(CompactHydraException):
    """A sweep job stopped on bad input (a `UserError`).

    Sweeps continue past a failed job (every launcher: basic, joblib, submitit, Ray record the
    job as failed and run the rest); Hydra then re-raises the first failure, printed as this one
    line, and `arena` exits with status 2 (1 if only bugs failed). Re-running the same command
    skips the finished jobs. Constructing the error (also when a launcher unpickles it from a
    worker) records it, which is how the launching process knows a job failed on bad input.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        SWEEP_USER_ERRORS.append(message)


def _multirun_job() -> str | None:
    """`#num (overrides)` of the running job in a Hydra multirun, None in a single run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return f"#{hc.job.num} ({' '.join(hc.overrides.task)})"
    except Exception:
        return None


def run_hydra_app(config_name: str, task: Callable[[DictConfig], Any], argv: list[str], prog: str,
                  precheck: Callable[[DictConfig], None] | None = None) -> int:
    """Validate `argv`, then run `task` under Hydra (`@hydra.main` semantics, incl. -m and --help).

    For a `-m` sweep, `precheck` (planning, no work, no writes) runs on every swept value first:
    a bad value is one line and exit status 2 before Hydra creates the sweep directory. A single
    run plans inside `task`, and Hydra itself writes nothing for it (conf/eval.yaml's hydra: section).
    """
    import hydra

    overrides, multirun, introspect = split_args(argv)
    try:
        if not introspect or "--cfg" in argv or "-c" in argv:
            validate_overrides(config_name, overrides, multirun=multirun,
                               precheck=precheck if multirun and not introspect else None)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except UserError as exc:
            job = _multirun_job()
            if job is None:
                print(f"{prog}: error: {exc}", file=sys.stderr)
                sys.exit(2)
            # in a sweep: this job fails, the others go on (with every launcher); see SweepJobError
            message = f"{prog}: error: job {job}: {exc}"
            print(message, file=sys.stderr)
            raise SweepJobError(message) from None

    main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(wrapped)
    saved = sys.argv
    sys.argv = [prog] + list(argv)
    SWEEP_USER_ERRORS.clear()
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0) if not isinstance(exc.code, str) else 2
        return 2 if code == 1 and SWEEP_USER_ERRORS else code
    finally:
        sys.argv = saved
    return 0


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain-dict copy of a Hydra config (a broken ${...} reference is a `UserError`).

    `threat.eps=8/255` arrives as the string "8/255": it becomes its float before interpolations
    (a defense's `eps: ${threat.eps}`) resolve, so every spelling of a radius hashes alike, and the
    fraction as written is kept in `threat.eps_text` (recorded in the manifest).
    """
    from omegaconf.errors import OmegaConfBaseException

    from harness.core.numbers import as_number

    try:
        threat = cfg.get("threat") if isinstance(cfg, DictConfig) else None
        eps = threat.get("eps") if isinstance(threat, DictConfig) else None
        if isinstance(eps, str) and as_number(eps) is not eps:
            cfg = cfg.copy()
            with open_dict(cfg):
                cfg.threat.eps = float(as_number(eps))
                if is_fraction(eps):
                    cfg.threat.eps_text = eps.replace(" ", "")
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        key = getattr(exc, "full_key", None)
        raise UserError(f"cannot resolve {key or 'the config'}: {first}; fix or remove the ${{...}} reference") from None
