"""The one config mechanism: dataclasses checked against their annotations at construction.

Every config class derives from `Config`. Constructing one (from code, or from plain data with
`parse`) checks each field against its type: a mapping becomes the nested config, a list of
mappings a list of configs, YAML's loose scalars (PyYAML reads `1e-3` as a string) the declared
number; a `Literal` names its choices. Then `validate()` checks what types cannot say. Every
error is a `ConfigError` naming the dotted key, the bad value and what would be valid:

    vlm.model.vision.backend: 'hff' is not one of ['hf', 'open_clip']
    train.max_stpes: unknown key; valid keys: ['backend', 'epochs', ..., 'max_steps', ...]

Keys are added as the error travels up through nested configs, so a config knows only its own
field names. `dump` is the inverse of `parse` (plain data, for YAML, JSON and `config.json`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid key or value; `path` is the dotted key ('train', 'max_steps'), `reason` the rest.
    `unknown`: the key itself is not valid (the message then leads with it)."""

    def __init__(self, reason: str, path: Sequence[str | int] = (), *, unknown: bool = False):
        self.reason = reason
        self.path = tuple(str(p) for p in path)
        self.unknown = unknown
        super().__init__(reason)

    def __str__(self) -> str:
        where = ".".join(self.path)
        if self.unknown:
            return f"unknown key {where!r}; {self.reason}"
        return f"{where}: {self.reason}" if where else self.reason

    def within(self, *prefix: str | int) -> ConfigError:
        """The same error seen from a config `prefix` levels up."""
        return ConfigError(self.reason, (*(str(p) for p in prefix), *self.path), unknown=self.unknown)


def invalid(key: str, reason: str) -> ConfigError:
    """An error about this config's field `key` (`validate()` raises these)."""
    return ConfigError(reason, (key,))


@dataclasses.dataclass
class Config:
    """Base of every config dataclass: typed fields checked and coerced, then `validate()`."""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = coerce(value, hints[f.name], (f.name,))
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        try:
            self.validate()
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # a helper's error, raised from validate()
            raise ConfigError(str(exc)) from exc

    def validate(self) -> None:
        """Checks across fields or on values; raise `invalid(field, reason)`."""

    def to_dict(self) -> dict[str, Any]:
        return dump(self)


def parse(cls: type[T], data: Any, path: Sequence[str | int] = ()) -> T:
    """Build config `cls` from a mapping (or return `data` if it already is one)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping, got {_show(data)}", path)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        also = f"; also unknown: {unknown[1:]}" if len(unknown) > 1 else ""
        raise ConfigError(f"valid keys: {sorted(fields)}{also}", (*path, unknown[0]), unknown=True)
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError("required key is missing", (*path, missing[0]))
    try:
        return cls(**data)
    except ConfigError as exc:
        raise exc.within(*path) from None


def dump(value: Any) -> Any:
    """Configs (and what they hold) as plain data: dicts, lists, str, numbers, None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: dump(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [dump(v) for v in value]
    return value


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, path: Sequence[str | int] = ()) -> Any:
    """`value` as type `tp`, or a ConfigError at `path`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is typing.Annotated:
        return coerce(value, args[0], path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(value, option, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(options) == 1:
            raise errors[0]
        deepest = max(errors, key=lambda e: len(e.path))
        if len(deepest.path) > len(path):  # it got inside one option: that option's error says more
            raise deepest
        raise ConfigError(f"{_show(value)} is not {' or '.join(describe(o) for o in options)}", path)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args if a == value):
            raise ConfigError(f"{_show(value)} is not one of {list(args)}", path)
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse(tp, value, path)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {_show(value)}", path)
        item = args[0] if args else Any
        out = [coerce(v, item, (*path, i)) for i, v in enumerate(value)]
        return value if isinstance(value, list) and all(a is b for a, b in zip(out, value)) else out
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {_show(value)}", path)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], (*path, i)) for i, v in enumerate(value))
        if args and len(value) != len(args):
            raise ConfigError(f"expected {len(args)} values, got {_show(value)}", path)
        return tuple(coerce(v, a, (*path, i)) for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {_show(value)}", path)
        vt = args[1] if len(args) == 2 else Any
        out = {k: coerce(v, vt, (*path, k)) for k, v in value.items()}
        return value if isinstance(value, dict) and all(out[k] is value[k] for k in out) else out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {_show(value)}", path)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {_show(value)}", path)
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {_show(value)}", path)
        if isinstance(value, float):
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected a number, got {_show(value)}", path) from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_show(value)}", path)
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"expected {describe(tp)}, got {_show(value)}", path)
    return value


def describe(tp: Any) -> str:
    """A type as an error message says it: 'an integer', 'one of [...]', 'a list of integers'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, Sequence):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    if tp in names:
        return names[tp]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, describe(tp))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
