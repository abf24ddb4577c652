"""One registry for every kind of plugin: attacks, defenses, poisons, datasets and architectures.

A plugin is a `@dataclass` registered under a name. Its fields are its parameters and their
defaults are the only defaults there are: `conf/<group>/<name>.yaml` mirrors them and
`tests/plugins/test_conformance.py` holds the two equal. `Registry.build(spec)` turns a config
mapping (`name`, optional `label`, parameters) into an instance, and every problem is one line:

- an unknown key names the valid parameters and the closest one ("did you mean 'steps'?");
- a value of the wrong type is refused (`steps='abc' must be an integer`), YAML's `1` is accepted
  where a float is wanted and `2.0` where an integer is wanted;
- a plugin's own checks (`Plugin.validate`: ranges, consistency) raise `UserError`, and any
  `TypeError`/`ValueError` escaping construction becomes one too.

Type coercion runs in `__post_init__`, so `PGD(steps=20.0)` in Python and `attack.steps=20.0` on
the command line take the same path.

Built-in plugins are found by package name on first use: a registry created with
`packages=("attacks",)` imports every module of that package (not its sub-packages) the first time
it is asked for a name, and each module registers its classes as it is imported. Nobody needs to
import a plugin module for its side effect, and the core never names a plugin module in an import:
the package names are data handed to the registry (the layer rule, docs/architecture.md).

A field can follow the evaluation's threat model (`follows("threat.eps")`): left unset (None) it
takes the run's value (`Registry.build(spec, context={"threat.eps": 0.3})`), and a value set on
purpose that differs is reported by `Registry.follow_notes`.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import math
import pkgutil
import types
import typing
from typing import Any, Callable, ClassVar, Generic, Iterator, Literal, Mapping, Sequence, TypeVar, Union

from harness.core.errors import UserError, choices_error, did_you_mean
from harness.core.numbers import as_number, is_fraction

T = TypeVar("T")
FOLLOWS = "follows"  # dataclass field metadata key: the context path a field follows when unset
KEY = "key"  # dataclass field metadata key: the config key of a field named otherwise (see `config_key`)


def follows(path: str) -> Any:
    """A field that takes the evaluation's value at `path` (e.g. "threat.eps") unless set (default None)."""
    return dataclasses.field(default=None, metadata={FOLLOWS: path})


def config_key(key: str, default: Any) -> Any:
    """A field whose config key is `key`: a zoo loader's `name:` (the zoo's model name) is field
    `model_name`, since `name` is the plugin's registered name (the config then says `plugin:`)."""
    return dataclasses.field(default=default, metadata={KEY: key})


def keys_of(cls: type) -> dict[str, str]:
    """Config key -> field name of a plugin class (the same, except fields made with `config_key`)."""
    return {f.metadata.get(KEY, f.name): f.name for f in dataclasses.fields(cls) if f.init}


# ----------------------------------------------------------------------------------------------
# types: coercion of config values to a field's annotation


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def type_name(tp: Any) -> str:
    """What a value of annotation `tp` looks like, for messages ("an integer", "a list of numbers")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_plural(type_name(args[0]))}" if args else "a list"
    if origin in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
        return "a mapping such as {k: v}"
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in simple:
        return simple[tp]
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _plural(name: str) -> str:
    return {"an integer": "integers", "a number": "numbers", "a string": "strings",
            "true or false": "booleans"}.get(name, name)


def _fail(where: str, value: Any, tp: Any) -> UserError:
    return UserError(f"{where}={_show(value)} must be {type_name(tp)}")


def coerce(value: Any, tp: Any, where: str, default: Any = dataclasses.MISSING) -> Any:
    """`value` as annotation `tp` wants it, or a one-line `UserError` naming `where`.

    `default` (a nested dataclass field's default instance) is what a partial mapping is merged
    onto, so `train: {epochs: 2}` keeps the rest of the plugin's own recipe.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _fail(where, value, tp)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where, default)
            except UserError:
                continue
        raise _fail(where, value, tp)
    if tp is type(None):
        if value is None:
            return None
        raise _fail(where, value, tp)
    if origin is Literal:
        for arg in args:
            if type(arg) is type(value) and arg == value:
                return value
        hint = did_you_mean(value, [str(a) for a in args])
        raise UserError(f"{where}={_show(value)} must be one of: {', '.join(str(a) for a in args)}" + (f"; {hint}" if hint else ""))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _fail(where, value, tp)
    if tp is float:
        if is_fraction(value):  # `attack.eps=8/255`, as papers write radii
            value = as_number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _fail(where, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(where, value, tp)
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(where, value, tp)
        item = args[0] if args else Any
        out = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, collections.abc.Mapping):
            raise _fail(where, value, tp)
        vt = args[1] if len(args) == 2 else Any
        return {k: coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, collections.abc.Mapping):
            raise _fail(where, value, tp)
        return build_nested(tp, value, where, default if isinstance(default, tp) else None)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _fail(where, value, tp)
    return value  # an annotation we do not check (Callable, TypeVar, ...)


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields (string annotations evaluated once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for `default_factory`), MISSING when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def build_nested(tp: type, mapping: Mapping[str, Any], where: str, base: Any = None) -> Any:
    """A nested dataclass (e.g. a training recipe) from a mapping: keys checked, values coerced,
    merged onto `base` (the field's default instance) when given."""
    names = [f.name for f in dataclasses.fields(tp) if f.init]
    for key in mapping:
        if key not in names:
            hint = did_you_mean(key, names)
            raise UserError(f"{where} has no field {key!r}; " + (f"{hint} " if hint else "") + f"valid fields: {', '.join(names)}")
    types_ = field_types(tp)
    values = {k: coerce(v, types_[k], f"{where}.{k}") for k, v in mapping.items()}
    return dataclasses.replace(base, **values) if base is not None else tp(**values)


def plain(value: Any) -> Any:
    """JSON-friendly copy: nested dataclasses as dicts, tuples as lists (manifests, cache keys)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------
# the plugin base and the registry


class Plugin:
    """Base of every registered class. Subclasses are `@dataclass`es; fields are the parameters.

    `__post_init__` coerces every field to its annotation, then calls `validate()` for the checks
    types cannot express. `label` is set by `Registry.build` from the spec (a display name on the
    leaderboard; it never changes behaviour).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "plugin"
    label: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        cls = type(self)
        types_ = field_types(cls)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = field_default(f)
            try:
                new = coerce(value, types_[f.name], f.name, default)
            except UserError as exc:
                shown = "" if dataclasses.is_dataclass(default) or default is dataclasses.MISSING else f" (default: {_show(plain(default))})"
                raise UserError(f"{self.kind} {self.name or cls.__name__!r}: {exc}{shown}") from None
            if new is not value:
                object.__setattr__(self, f.name, new)
        self.validate()

    def validate(self) -> None:
        """Checks beyond types (ranges, consistency); raise `UserError`. May normalise fields."""

    def describe(self) -> dict[str, Any]:
        """The parameters as plain data, for manifests, reprs and cache keys."""
        if dataclasses.is_dataclass(self):
            return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def _label(value: Any, kind: str, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{kind} {name!r}: label={_show(value)} must be a string (a display name) or null")


Extra = Callable[[Any, str, str], Any]


class Registry(Generic[T]):
    """Named plugin classes of one kind, discovered from `packages` on first use.

    Args:
        kind: what the plugins are, for messages ("attack", "defense", ...).
        base: the class every registered plugin must subclass.
        packages: built-in plugin packages imported (all their modules) on first use.
        extras: keys every spec of this kind may carry besides the fields (always `label`), each
            with a validator `(value, kind, name) -> value`; the value is set on the instance.
    """

    def __init__(self, kind: str, base: type, packages: Sequence[str] = (),
                 extras: Mapping[str, Extra] | None = None) -> None:
        self.kind = kind
        self.base = base
        self.packages = tuple(packages)
        self.extras: dict[str, Extra] = {"label": _label, **dict(extras or {})}
        self._classes: dict[str, type] = {}
        self._discovered = not self.packages

    # -- registration and lookup ---------------------------------------------------------------
    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator (above `@dataclass`): make `cls` available to configs as `name`."""

        def wrap(cls: type[T]) -> type[T]:
            where = f"{self.kind} {name!r} ({cls.__module__}.{cls.__qualname__})"
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{where} must subclass {self.base.__module__}.{self.base.__qualname__}")
            if "__dataclass_fields__" not in cls.__dict__:
                raise TypeError(f"{where} must be a @dataclass (put @register above @dataclass): its fields are its "
                                f"parameters and their defaults; see docs/extending.md")
            old = self._classes.get(name)
            if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise TypeError(f"{where}: the name is taken by {old.__module__}.{old.__qualname__}")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return wrap

    def unregister(self, name: str) -> None:
        """Remove `name` (tests that register throw-away plugins)."""
        self._classes.pop(name, None)

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # first: a plugin module may look something up while it is imported
        try:
            for package_name in self.packages:
                package = importlib.import_module(package_name)
                for info in pkgutil.iter_modules(package.__path__):
                    if not info.ispkg and not info.name.startswith("_"):
                        importlib.import_module(f"{package_name}.{info.name}")
        except BaseException:
            self._discovered = False
            raise

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._discover()
        return sorted(self._classes)

    def get(self, name: Any) -> type[T]:
        """The class registered as `name`, or a one-line `UserError` listing the valid names."""
        self._discover()
        if name not in self._classes:
            if name is None:
                raise UserError(f"no {self.kind} name given; add name: one of {', '.join(sorted(self._classes))}")
            raise choices_error(self.kind, name, list(self._classes))
        return self._classes[name]  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._classes

    def __getitem__(self, name: str) -> type[T]:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    # -- parameters ----------------------------------------------------------------------------
    def fields(self, name: str) -> list[dataclasses.Field]:
        """The parameters of `name` (its init fields, in declaration order)."""
        return [f for f in dataclasses.fields(self.get(name)) if f.init]

    def defaults(self, name: str) -> dict[str, Any]:
        """`name`'s parameters and their defaults as plain data (MISSING for a required field)."""
        return {f.name: plain(field_default(f)) for f in self.fields(name)}

    def build(self, spec: Mapping[str, Any] | str, context: Mapping[str, Any] | None = None) -> T:
        """An instance from a config mapping: `name`, optional extras (`label`, ...), parameters.

        `context` holds the run's values that fields declared with `follows(path)` take when the
        spec leaves them unset, e.g. {"threat.eps": 0.3, "threat.norm": "Linf"}.
        """
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, collections.abc.Mapping):
            raise UserError(f"a {self.kind} must be given as a mapping with a name: key (got {type(spec).__name__})")
        params = dict(spec)
        # `plugin:` names the plugin when `name` is one of its parameters (a zoo's model name)
        name = params.pop("plugin") if "plugin" in params else params.pop("name", None)
        cls = self.get(name)
        extras = {k: params.pop(k) for k in list(params) if k in self.extras}
        fields_ = {f.name: f for f in dataclasses.fields(cls) if f.init}
        keys = keys_of(cls)
        for key in params:
            if key not in keys:
                valid = [*keys, *self.extras]
                hint = did_you_mean(key, valid)
                raise UserError(f"{self.kind} {name!r} has no parameter {key!r}; " + (f"{hint} " if hint else "")
                                + f"valid parameters: {', '.join(valid)}")
        params = {keys[k]: v for k, v in params.items()}
        for fname, f in fields_.items():
            path = f.metadata.get(FOLLOWS)
            if path and params.get(fname) is None and context and context.get(path) is not None:
                params[fname] = context[path]
        try:
            obj = cls(**params)
        except UserError:
            raise
        except (TypeError, ValueError) as exc:
            msg = str(exc).replace(f"{cls.__qualname__}.__init__() ", "").replace("__init__() ", "")
            raise UserError(f"{self.kind} {name!r}: {msg}") from None
        for key, value in extras.items():
            setattr(obj, key, self.extras[key](value, self.kind, str(name)))
        return obj  # type: ignore[return-value]

    def follow_notes(self, obj: Any, context: Mapping[str, Any]) -> list[str]:
        """One line per `follows` field whose value differs from the run's (set on purpose)."""
        notes = []
        for f in dataclasses.fields(obj):
            path = f.metadata.get(FOLLOWS)
            if not path or context.get(path) is None:
                continue
            mine, theirs = getattr(obj, f.name), context[path]
            same = (math.isclose(float(mine), float(theirs), rel_tol=1e-9, abs_tol=1e-12)
                    if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) else mine == theirs)
            if not same:
                notes.append(f"{self.kind} {obj.name!r} trains with {f.name}={mine} but the evaluation's {path} is {theirs} "
                             f"(set on purpose; leave {self.kind}.{f.name} unset to follow {path})")
        return notes
