"""Value coercion for the config dataclasses: YAML's loose types checked and converted, did-you-mean suggestions.

YAML gives ints, floats, strings ("3e-4" is a string to PyYAML), bools, lists and None; `_coerce_fields` turns
them into each field's declared type or raises `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from titans.errors import ConfigError

# Integers must fit in int64: torch stores sizes and seeds as int64, and bigger ones would overflow float maths.
_INT64_MAX = 2**63 - 1


def _show(value: Any) -> str:
    """A short repr for error messages (YAML can hand us arbitrarily large structures)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _close(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str | None:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return match[0] if match else None


def _to_int(value: Any, key: str) -> int:
    # bool is a subclass of int: `true` must not silently become 1.
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be an int, got the bool {value!r}")
    result: int | None = None
    if isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)  # 1.0e+3 written for 1000
    elif isinstance(value, str):
        text = value.strip()
        try:
            result = int(text)
        except ValueError:
            try:
                number = float(text)  # "1e4" reaches us as a string
            except ValueError:
                number = math.nan
            if number.is_integer():
                result = int(number)
    if result is None:
        raise ConfigError(f"{key} must be an int, got {_show(value)} ({type(value).__name__})")
    if abs(result) > _INT64_MAX:
        raise ConfigError(f"{key} = {result} does not fit in int64; use a value below 2**63")
    return result


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a float, got the bool {value!r}")
    if not isinstance(value, int | float | str):
        raise ConfigError(f"{key} must be a float, got {_show(value)} ({type(value).__name__})")
    try:
        result = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{key} must be a float such as 3e-4, got {_show(value)}") from None
    if not math.isfinite(result):
        raise ConfigError(f"{key} must be a finite float, got {_show(value)}")
    return result


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the field type `hint` and convert it where YAML's types are looser than Python's."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        if value is None:
            raise ConfigError(f"{key} must not be null")
        return _coerce(value, inner, key)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        choices = ", ".join(repr(arg) for arg in args)
        guess = _close(value, args) if isinstance(value, str) else None
        hint_text = f" (did you mean {guess!r}?)" if guess else ""
        raise ConfigError(f"{key} must be one of {choices}, got {_show(value)}{hint_text}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: a list of any length
        if isinstance(value, list | tuple):
            return tuple(_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
        raise ConfigError(f"{key} must be a list, e.g. [400, 600], got {_show(value)}")
    if origin is tuple:
        if isinstance(value, list | tuple) and len(value) == len(args):
            return tuple(
                _coerce(item, arg, f"{key}[{i}]") for i, (item, arg) in enumerate(zip(value, args, strict=True))
            )
        raise ConfigError(f"{key} must be a list of {len(args)} values, e.g. [0.9, 0.95], got {_show(value)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {_show(value)} ({type(value).__name__})")
    if hint is int:
        return _to_int(value, key)
    if hint is float:
        return _to_float(value, key)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {_show(value)} ({type(value).__name__}); quote it in YAML")
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        raise ConfigError(f"{key} must be a {hint.__name__} (a mapping in YAML), got {_show(value)}")
    raise TypeError(f"internal: config field {key} has unsupported type {hint!r}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce_fields(obj: Any) -> None:
    """Coerce every field of a config dataclass in place; `obj._path` is its dotted prefix, e.g. "model.memory."."""
    hints = _hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], obj._path + f.name))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
