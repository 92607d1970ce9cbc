"""The checked-config machinery: plain dataclasses whose values are checked against their declared types and their
own rules, with errors that name the key, the value and where it came from (a file, the command line).

`apply_overrides` is the one way a config changes: a copy with the given keys replaced, each value judged by its
field's declared type (`float | None` takes a number or None, `tuple[int, ...]` a list of integers) and then by the
config's `problems()`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import fields
from typing import Any

__all__ = ["Checked", "apply_overrides", "config_to_dict"]


class Checked:
    """A config whose `problems()` lists what is wrong with its values; `check(where)` raises on the first."""

    WHERE = "config"

    def problems(self) -> list[str]:
        return []

    def check(self, where: str | None = None):
        """self, or a ValueError naming `where` and the first problem."""
        problems = self.problems()
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(f"{where or self.WHERE}: {problems[0]}{more}")
        return self


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML/JSON-ready values (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def apply_overrides(config: Any, overrides: dict[str, Any], where: str = "config") -> Any:
    """A copy of dataclass `config` with `overrides` applied. A key that is not a field, a value of the wrong kind
    (judged by the field's declared type: `float | None` takes a number or None, `tuple[int, ...]` a list of
    integers), and (for configs that have `problems()`) a value outside its choices raise a ValueError naming
    `where` and the key. Lists become tuples where the field is a tuple."""
    names = {f.name for f in fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    hints = _field_types(type(config))
    values = {}
    for k, v in overrides.items():
        if isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        values[k] = _checked(where, k, v, hints[k], _default(config, k))
    out = dataclasses.replace(config, **values)
    if hasattr(out, "check"):
        out.check(where)
    return out


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(config: Any, key: str) -> Any:
    """The declared default of field `key` of dataclass `config` (not the value a config file gave it), or
    dataclasses.MISSING where it has none."""
    field = next(f for f in fields(config) if f.name == key)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _checked(where: str, key: str, value: Any, hint: Any, default: Any) -> Any:
    """`value` (integers made floats where the field is a float) if it is of the field's type `hint`, else a
    ValueError naming the key, the value, the kind expected and the field's declared default."""
    ok, value = _of_type(value, hint)
    if not ok:
        shown = list(value) if isinstance(value, tuple) else value
        default = list(default) if isinstance(default, tuple) else default
        said = "" if default is dataclasses.MISSING else f" (the default is {default!r})"
        raise ValueError(f"{where}: {key} = {shown!r} is not {_kind(hint)}{said}")
    return value


def _of_type(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether `value` is of type `hint`, the value with an integer made a float where a float is declared)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _of_type(value, arg)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, tuple):
            return False, value
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            return False, value
        return all(_of_type(v, k)[0] for v, k in zip(value, kinds)), value  # elements as given: 800 stays 800
    return True, value  # a type this check does not know: the config's problems() judge it


def _kind(hint: Any) -> str:
    """The type `hint` in words: 'a number or null', 'a list of integers'."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            inner = _kind(args[0])
            return "a list of " + (inner.split(" ", 1)[1] + "s" if inner.startswith(("a ", "an ")) else inner)
        return f"a list of {len(args)} values ({', '.join(_kind(a) for a in args)})"
    return names.get(hint, getattr(hint, "__name__", str(hint)))
