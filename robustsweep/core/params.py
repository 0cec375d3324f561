"""Parsing and range checks of config values; every failure is a ``ConfigError`` naming the key."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustsweep.core.errors import ConfigError

_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*/\s*([0-9]*\.?[0-9]+)\s*$")


def parse_epsilon(value: float | int | str) -> float:
    """Return eps in [0, 1] pixel units from ``0.031``, ``"0.031"`` or ``"8/255"``."""
    allowed = "a number in [0, 1] (pixel units) or a fraction a/b such as 8/255"
    if isinstance(value, bool):
        raise ConfigError(f"epsilon={value!r} is not valid; allowed: {allowed}")
    if isinstance(value, int | float):
        eps = float(value)
    else:
        text = str(value).strip()
        match = _FRACTION.match(text)
        if match:
            num, den = float(match.group(1)), float(match.group(2))
            if den == 0:
                raise ConfigError(f"epsilon={text!r} divides by zero; allowed: {allowed}")
            eps = num / den
        else:
            try:
                eps = float(text)
            except ValueError:
                raise ConfigError(f"epsilon={text!r} is not a number; allowed: {allowed}") from None
    if not (0.0 <= eps <= 1.0) or eps != eps:
        raise ConfigError(f"epsilon={value!r} (= {eps:g}) is outside [0, 1]; allowed: {allowed}")
    return eps


def check(cond: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError("key=value is not valid; allowed: ...")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}={value!r} is not valid; allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(cfg: DictConfig, key: str) -> None:
    """``cfg.<key>`` is an integer > 0 (``key`` is a dotted path, reported as given)."""
    value = OmegaConf.select(cfg, key)
    check(_is_int(value) and value > 0, key, value, "an integer > 0")


def nonnegative_int(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    check(_is_int(value) and value >= 0, key, value, "an integer >= 0")


def number_in(cfg: DictConfig, key: str, lo: float, hi: float, allowed: str,
              low_open: bool = False, high_open: bool = False) -> None:
    """``cfg.<key>`` is a real number in the interval [lo, hi] (ends open as asked)."""
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    if ok:
        ok = (value > lo if low_open else value >= lo) and (value < hi if high_open else value <= hi)
    check(ok, key, value, allowed)


def positive_number(cfg: DictConfig, key: str) -> None:
    number_in(cfg, key, 0.0, math.inf, "a number > 0", low_open=True)


@contextlib.contextmanager
def unlocked(cfg: DictConfig) -> Iterator[DictConfig]:
    """Temporarily lift struct/readonly flags to write a normalised value."""
    struct, readonly = OmegaConf.is_struct(cfg), OmegaConf.is_readonly(cfg)
    OmegaConf.set_struct(cfg, False)
    OmegaConf.set_readonly(cfg, False)
    try:
        yield cfg
    finally:
        OmegaConf.set_struct(cfg, struct)
        OmegaConf.set_readonly(cfg, readonly)
