"""The library's exception types: `ConfigError`, for an invalid config key, value or combination."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid config key, value or combination; the message names the dotted key and the fix."""
