"""Errors every layer raises. Messages name the key (or input), the value and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid. The message names key, value and what is allowed."""


class InputRangeError(ValueError):
    """Images outside [0, 1] reached a model that expects pixels (normalisation is inside it)."""


class ModelChangedError(RuntimeError):
    """Attacking or attributing changed the model's state_dict."""


class AttackGuardError(RuntimeError):
    """An attack produced an input outside the threat model."""
