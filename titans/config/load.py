"""Reading and writing run configs: YAML parsing, dotted `key=value` overrides, load_config and save_config.

    cfg = load_config("config.yaml", ["training.learning_rate=3e-4", "model.memory.chunk_size=8"])
    save_config(cfg, "runs/x/config.yaml")  # load_config of that file gives back an equal RunConfig

The loader is strict: an unknown key, a value of the wrong type or an impossible combination raises `ConfigError`
naming the full dotted key and what to change. `ConfigError` is the only exception `load_config` lets escape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from titans.config.coerce import _close, _hints, _show
from titans.config.run import RunConfig
from titans.errors import ConfigError


def all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted config key, sections included (e.g. "model", "model.memory.chunk_size"), in source order."""
    keys = []
    for f in fields(cls):
        hint = _hints(cls)[f.name]
        keys.append(prefix + f.name)
        if is_dataclass(hint):
            keys.extend(all_keys(hint, f"{prefix}{f.name}."))
    return keys


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    """The error for an unknown key, with the closest sibling or, failing that, the closest key anywhere."""
    dotted = prefix + key
    sibling = _close(key, [f.name for f in fields(cls)])
    if sibling is not None:
        guess = prefix + sibling
    else:
        everywhere = all_keys()
        same_leaf = [k for k in everywhere if k.rsplit(".", 1)[-1] == key]
        guess = same_leaf[0] if same_leaf else _close(dotted, everywhere, cutoff=0.75)
    hint = f" (did you mean {guess!r}?)" if guess else ""
    section = prefix.rstrip(".") or "the top level"
    return ConfigError(
        f"unknown config key {dotted!r}{hint}; {section} accepts: {', '.join(f.name for f in fields(cls))}"
    )


def _from_mapping(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a parsed YAML mapping; nested sections recurse, values are coerced by the class."""
    if raw is None:
        raw = {}  # a section whose keys are all commented out
    if not isinstance(raw, Mapping):
        where = prefix.rstrip(".") or "the config document"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {_show(raw)}")
    kwargs = {}
    names = {f.name for f in fields(cls)}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"config keys must be strings, got {_show(key)} in {prefix.rstrip('.') or 'the top level'}"
            )
        if key not in names:
            raise _unknown_key(cls, key, prefix)
        hint = _hints(cls)[key]
        kwargs[key] = _from_mapping(hint, value, f"{prefix}{key}.") if is_dataclass(hint) else value
    return cls(**kwargs)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    # PyYAML raises YAMLError for syntax, but plain ValueError/AttributeError/... for malformed tagged scalars
    # (`!!int x`, an impossible timestamp), so everything it raises is reported as a config error.
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{source} is not valid YAML: {first_line}") from error


def _apply_override(raw: dict[str, Any], override: Any) -> None:
    """Set one dotted `key=value` override in the raw mapping; the value is parsed as YAML and coerced later."""
    if not isinstance(override, str):
        raise ConfigError(f"overrides must be strings like 'training.learning_rate=3e-4', got {_show(override)}")
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or any(not part.strip() or part != part.strip() for part in parts):
        raise ConfigError(f"override {_show(override)} must look like dotted.key=value, e.g. model.memory.chunk_size=8")
    value = _parse_yaml(text, f"the value of override {key!r}")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            raise ConfigError(f"cannot apply override {key!r}: {section!r} is {_show(child)}, not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config (None = all defaults), apply dotted `key=value` overrides, validate, return it.

    Raises ConfigError (only) for unreadable files, bad YAML, unknown keys, wrong types or impossible combinations.
    """
    if path is None:
        raw: Any = {}
    elif isinstance(path, str | Path):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ConfigError(f"cannot read config file {str(path)!r}: {error}") from error
        raw = _parse_yaml(text, f"config file {str(path)!r}")
        if raw is None:
            raw = {}  # an empty file means defaults
    else:
        raise ConfigError(f"path must be a str, a Path or None, got {_show(path)}")
    if not isinstance(raw, dict):
        raise ConfigError(f"the config document must be a mapping with model/data/training sections, got {_show(raw)}")
    if isinstance(overrides, str) or not isinstance(overrides, Sequence):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got {_show(overrides)}")
    for override in overrides:
        _apply_override(raw, override)
    return _from_mapping(RunConfig, raw, "")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A plain nested dict of cfg (tuples as lists) that yaml.safe_dump can write and load_config reads back."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"config_to_dict expects a RunConfig, got {type(cfg).__name__}")

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(asdict(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write cfg as YAML to path (parents created); load_config(path) returns a config equal to cfg."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
