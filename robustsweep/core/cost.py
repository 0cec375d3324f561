"""What a step costs, in image passes, and what that comes to on this machine.

A component declares its work where it is registered (an attack's gradient passes per image, an
objective's passes per training image, an evaluator's passes per cell) as a ``Work``: counts of
images through the model, not seconds, so that one declaration holds on any machine. ``Rates``,
measured once per network on the device the sweep will use (``robustsweep.estimate``), turn work
into seconds. Work that depends on the data (an attack that stops at an image's first adversarial
example, IG that doubles its steps until completeness holds) is a range: ``grad`` when every image
stops at once, ``grad_hi`` when none does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Work:
    fwd: float = 0.0  # images through a forward pass, no gradient
    grad: float = 0.0  # images through forward + backward (input gradients)
    train: float = 0.0  # images through a training step (forward, backward, optimiser)
    seconds: float = 0.0  # time that is not image passes (e.g. latency timing's fixed repeats)
    # the most forward and gradient passes, when the step may stop early (None: as fwd, grad)
    fwd_hi: float | None = None
    grad_hi: float | None = None

    def hi(self) -> Work:
        """The work when nothing stops early."""
        return Work(self.fwd if self.fwd_hi is None else self.fwd_hi,
                    self.grad if self.grad_hi is None else self.grad_hi, self.train, self.seconds)

    def __add__(self, other: Work) -> Work:
        a, b = self.hi(), other.hi()
        return _ranged(self.fwd + other.fwd, self.grad + other.grad, self.train + other.train,
                       self.seconds + other.seconds, a.fwd + b.fwd, a.grad + b.grad)

    def __mul__(self, k: float) -> Work:
        h = self.hi()
        return _ranged(self.fwd * k, self.grad * k, self.train * k, self.seconds * k, h.fwd * k, h.grad * k)

    __rmul__ = __mul__

    def then(self, other: Work) -> Work:
        """``self`` and then ``other`` on what it leaves: none of ``other`` at the least (``self``
        finished every image), all of it at the most (an ensemble's next member)."""
        a, b = self.hi(), other.hi()
        return _ranged(self.fwd, self.grad, self.train + other.train, self.seconds + other.seconds,
                       a.fwd + b.fwd, a.grad + b.grad)


def _ranged(fwd: float, grad: float, train: float, seconds: float, fwd_hi: float, grad_hi: float) -> Work:
    return Work(fwd, grad, train, seconds, None if fwd_hi == fwd else fwd_hi,
                None if grad_hi == grad else grad_hi)


NONE = Work()


def grad_range(lo: float, hi: float | None = None) -> Work:
    """Gradient passes between ``lo`` and ``hi`` (one number: exactly that many)."""
    return _ranged(0.0, lo, 0.0, 0.0, 0.0, lo if hi is None else hi)


def doubling(n_steps: int, max_n_steps: int | None) -> Work:
    """Gradient passes of one image's attribution by a method of ``n_steps`` steps that doubles them
    (``n_steps``, 2 x, 4 x, ... up to ``max_n_steps``; None: no doubling) until its check holds."""
    hi, steps = n_steps, n_steps
    while max_n_steps is not None and steps * 2 <= max_n_steps:
        steps *= 2
        hi += steps
    return grad_range(n_steps, hi)


def fwd_range(lo: float, hi: float | None = None) -> Work:
    """Forward passes between ``lo`` and ``hi`` (one number: exactly that many)."""
    return _ranged(lo, 0.0, 0.0, 0.0, lo if hi is None else hi, 0.0)


@dataclass(frozen=True)
class Rates:
    """Images per second of one network on one device (``robustsweep.estimate.calibrate``)."""

    fwd: float
    grad: float
    train: float

    def seconds(self, w: Work) -> tuple[float, float]:
        """(least, most) seconds of ``w``."""
        h = w.hi()
        return tuple(x.fwd / self.fwd + x.grad / self.grad + x.train / self.train + x.seconds
                     for x in (w, h))  # type: ignore[return-value]


def duration(s: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def span(lo: float, hi: float) -> str:
    """``~3.5 min``, or ``~3.5 min (up to 2.1 h)`` when the most rounds differently."""
    a, b = duration(lo), duration(hi)
    return f"~{a}" if a == b else f"~{a} (up to {b})"
