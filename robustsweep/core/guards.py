"""Guards: checks that stop a run with an error, so a robustness number is never silently wrong.

* ``check_unit_range``: float images outside [0, 1] (normalised tensors are the classic mistake).
* ``check_adversarial`` / ``attack_checked``: an adversarial batch outside the threat model (the
  eps-ball in the attack's norm + 1e-6, [0, 1], same shape and dtype, finite, labels untouched).
* ``unchanged``: a model whose weights or BatchNorm statistics changed while it was attacked or
  attributed (``state_hash`` before and after).
* ``frozen``: eval mode and no parameter gradients while a model is attacked.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from robustsweep.core.errors import AttackGuardError, InputRangeError, ModelChangedError

__all__ = ["EPS_TOL", "AttackGuardError", "InputRangeError", "ModelChangedError", "attack_checked",
           "check_adversarial", "check_unit_range", "frozen", "perturbation_norm", "state_hash",
           "state_tensors", "unchanged"]

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EPS_TOL = 1e-6


def check_unit_range(x: torch.Tensor, what: str = "images") -> None:
    """Raise ``InputRangeError`` unless float ``x`` lies in [0, 1] (uint8 is always fine)."""
    if x.dtype == torch.uint8 or x.numel() == 0:
        return
    lo, hi = x.min().item(), x.max().item()
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise InputRangeError(
            f"{what} lie in [{lo:.4g}, {hi:.4g}]; allowed: pixels in [0, 1] (or uint8 0..255). "
            f"Normalised tensors are the classic mistake: robustsweep models normalise inside "
            f"forward, so eps is in pixel units")


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor | object]]:
    """The state dict flattened: tensors (a quantized one as its integer values, its scales and
    zero points beside it), the tensors inside tuples (an int8 linear layer's packed weight and
    bias), anything else as itself."""

    def walk(name: str, v: object) -> Iterator[tuple[str, torch.Tensor | object]]:
        if isinstance(v, torch.Tensor):
            if v.is_quantized:
                yield name, v.int_repr()
                if v.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                    yield f"{name}.q_scales", v.q_per_channel_scales()
                    yield f"{name}.q_zero_points", v.q_per_channel_zero_points()
                else:
                    yield f"{name}.q_scale", torch.tensor(v.q_scale())
                    yield f"{name}.q_zero_point", torch.tensor(v.q_zero_point())
            else:
                yield name, v
        elif isinstance(v, tuple | list):
            for i, item in enumerate(v):
                yield from walk(f"{name}.{i}", item)
        else:
            yield name, v

    for name, v in sorted(model.state_dict().items()):
        yield from walk(name, v)


def state_hash(model: nn.Module) -> str:
    """SHA-256 of the state_dict (names, dtypes, shapes and bytes of every tensor; quantized
    tensors by their integer values and quantization parameters; other entries by ``repr``)."""
    h = hashlib.sha256()
    for name, v in state_tensors(model):
        if not isinstance(v, torch.Tensor):
            h.update(f"{name}|{v!r}|".encode())
            continue
        t = v.detach().cpu().contiguous().reshape(-1)  # 1-D: 0-dim tensors cannot be viewed as bytes
        h.update(f"{name}|{t.dtype}|{tuple(v.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def unchanged(model: nn.Module, what: str, before: str | None = None) -> Iterator[str]:
    """Yield the model's state hash (``before``, when the caller just computed it); raise
    ``ModelChangedError`` if it differs afterwards."""
    before = before or state_hash(model)
    yield before
    after = state_hash(model)
    if after != before:
        changed = [k for k, v in model.state_dict().items() if not torch.isfinite(v.float()).all()]
        raise ModelChangedError(f"{what} changed the model (state_dict SHA-256 {before[:12]} -> "
                                f"{after[:12]}){'; non-finite: ' + ', '.join(changed) if changed else ''}"
                                f": the numbers of this cell would not describe the pruned model")


# ------------------------------------------------------------------------------ sanity probe


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` for the duration; both restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def perturbation_norm(delta: torch.Tensor, norm: str) -> float:
    """Largest per-image norm of ``delta`` (N, ...): L-inf or L2, in pixel units."""
    if delta.numel() == 0:
        return 0.0
    flat = delta.flatten(1)
    if norm == "Linf":
        return flat.abs().amax().item()
    if norm == "L2":
        return flat.norm(dim=1).amax().item()
    raise AttackGuardError(f"unknown attack norm {norm!r}; allowed: Linf, L2")


def check_adversarial(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str = "Linf",
                      y_before: torch.Tensor | None = None, y_after: torch.Tensor | None = None) -> float:
    """Raise ``AttackGuardError`` unless ``x_adv`` is a valid attack on ``x``; return its distance.

    Valid: same shape and dtype, finite, inside the eps-ball (``norm``, +1e-6), inside [0, 1], and
    the labels the attack was given unchanged (``y_before`` is a copy taken before the call)."""
    if x_adv.shape != x.shape or x_adv.dtype != x.dtype:
        raise AttackGuardError(f"attack changed the batch {tuple(x.shape)} {x.dtype} -> "
                               f"{tuple(x_adv.shape)} {x_adv.dtype}")
    if y_before is not None and y_after is not None and not torch.equal(y_before, y_after):
        raise AttackGuardError("attack modified the labels it was given")
    if not torch.isfinite(x_adv).all():
        raise AttackGuardError("adversarial batch contains NaN or inf")
    dist = perturbation_norm(x_adv - x, norm)
    if dist > eps + EPS_TOL:
        raise AttackGuardError(f"adversarial batch leaves the eps-ball: {norm} {dist:.6g} > eps {eps:.6g}")
    lo, hi = (x_adv.min().item(), x_adv.max().item()) if x_adv.numel() else (0.0, 1.0)
    if lo < 0.0 or hi > 1.0:
        raise AttackGuardError(f"adversarial batch leaves [0, 1]: range [{lo:.4g}, {hi:.4g}]")
    return dist


def attack_checked(attack: AttackFn, x: torch.Tensor, y: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, float]:
    """``attack(x, y)`` put through ``check_adversarial`` (in the attack's norm, with the labels
    compared to a copy taken before the call); the adversarial batch and its distance."""
    y_before = y.clone()
    x_adv = attack(x, y)
    return x_adv, check_adversarial(x, x_adv, eps, getattr(attack, "norm", "Linf"), y_before, y)
