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


# The largest L2 distance between two images in [0, 1] of 3x224x224 pixels: no L2 budget is larger.
L2_MAX = math.sqrt(3 * 224 * 224)


def parse_epsilon(value: float | int | str, norm: str = "linf") -> float:
    """Return eps in pixel units from ``0.031``, ``"0.031"`` or ``"8/255"``: in [0, 1] for
    ``norm="linf"``, in [0, L2_MAX] for ``norm="l2"`` (the perturbation's norm over the image)."""
    hi = L2_MAX if norm == "l2" else 1.0
    allowed = ("a number in [0, 1] (pixel units) or a fraction a/b such as 8/255" if norm != "l2" else
               f"a number in [0, {hi:.0f}] (attack.norm=l2: the perturbation's L2 norm over the image "
               f"in pixel units, e.g. 0.5 on CIFAR-10)")
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
    if not (0.0 <= eps <= hi) or eps != eps:
        raise ConfigError(f"epsilon={value!r} (= {eps:g}) is outside [0, {hi:.4g}]; allowed: {allowed}")
    return eps


def eps_label(eps: float, norm: str = "linf") -> str:
    """How eps is written in names and plots: ``8/255`` (L-inf, a whole number of 255ths that is not
    a short decimal), ``0.05`` and ``0.2`` (L-inf as typed: 0.2 is 51/255 but nobody wrote it so),
    ``L2 0.5``."""
    if norm == "l2":
        return f"L2 {eps:.3g}"
    k = eps * 255
    return f"{round(k)}/255" if float(f"{eps:.3g}") != eps and abs(k - round(k)) < 1e-6 else f"{eps:.3g}"


def check(cond: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError("key=value is not valid; allowed: ...")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}={value!r} is not valid; allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def key_of(node: DictConfig, key: str) -> str:
    """``key`` of ``node`` as the user writes it on the command line: its full dotted path in the
    config the node is part of (``attack.steps``; ``attack.attacks[1].steps`` for an ensemble's
    member; ``defend.epochs``), so a component checks its own node and the error names the key the
    framework knows. A node outside any config: ``key`` itself."""
    try:
        return str(node._get_full_key(key)) or key  # OmegaConf's own path of the node (no public API)
    except Exception:
        return key


def positive_int(node: DictConfig, key: str) -> None:
    """``node.<key>`` is an integer > 0 (``key`` relative to ``node``, or dotted from the root;
    reported by its full path, ``key_of``)."""
    value = OmegaConf.select(node, key)
    check(_is_int(value) and value > 0, key_of(node, key), value, "an integer > 0")


def nonnegative_int(node: DictConfig, key: str) -> None:
    value = OmegaConf.select(node, key)
    check(_is_int(value) and value >= 0, key_of(node, key), value, "an integer >= 0")


def number_in(node: DictConfig, key: str, lo: float, hi: float, allowed: str,
              low_open: bool = False, high_open: bool = False) -> None:
    """``node.<key>`` is a real number in the interval [lo, hi] (ends open as asked)."""
    value = OmegaConf.select(node, key)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    if ok:
        ok = (value > lo if low_open else value >= lo) and (value < hi if high_open else value <= hi)
    check(ok, key_of(node, key), value, allowed)


def positive_number(node: DictConfig, key: str) -> None:
    number_in(node, key, 0.0, math.inf, "a number > 0", low_open=True)


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
