"""What we check on every run, so that a robustness number is never silently wrong.

Two kinds of check (README "What we check on every run" lists them for users):

* **Guards** stop the run with an error: an input outside [0, 1] (normalised tensors are the
  classic mistake), an adversarial batch outside the threat model (see
  ``attacks.check_adversarial``), a model whose weights or BatchNorm statistics changed while it
  was attacked or attributed (``unchanged``).
* **Sanity checks** of the attack result (Carlini et al. 2019, "On Evaluating Adversarial
  Robustness", arXiv:1902.06705, section 5) do not stop anything. A failure tags the cell's
  MLflow run ``suspect=<reasons>`` and logs a warning; the numbers are kept for a person to judge.
  ``sanity_probe`` runs them per cell on a few correctly classified images; ``eps_monotonicity``
  runs across the cells of a sweep.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

SUSPECT_TAG = "suspect"

# Why a sanity check fails, in words a reviewer recognises (the value of the `suspect` tag lists keys).
REASONS = {
    "eps0_fools": "the attack changes predictions at eps=0: the model is stochastic or the attack "
                  "ignores eps",
    "unbounded_fails": "an unbounded attack (eps=1) fools fewer than 99 % of images: possible "
                       "gradient masking",
    "pgd_below_fgsm": "PGD is weaker than FGSM: possible gradient masking or a broken PGD",
    "pgd_below_noise": "PGD fools fewer images than random noise of the same L-inf norm: possible "
                       "gradient masking",
    "asr_falls_with_eps": "ASR falls as eps grows (within the sweep): possible gradient masking",
    "ig_incomplete": "Integrated Gradients did not reach completeness at the n_steps cap",
}


class InputRangeError(ValueError):
    """Images outside [0, 1] reached a model that expects pixels (normalisation is inside it)."""


class ModelChangedError(RuntimeError):
    """Attacking or attributing changed the model's state_dict."""


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


def state_hash(model: nn.Module) -> str:
    """SHA-256 of the state_dict (names, dtypes, shapes and bytes of every tensor)."""
    h = hashlib.sha256()
    for name, v in sorted(model.state_dict().items()):
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
@dataclass
class SanityResult:
    n_probe: int = 0
    asr: dict[str, float] = field(default_factory=dict)  # eps0, noise, fgsm, pgd, unbounded
    reasons: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {"sanity_n_probe": float(self.n_probe),
                **{f"sanity_asr_{k}": v for k, v in self.asr.items()}}


def _fooled(model: nn.Module, attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    from robustsweep.attacks import attack_checked

    x_adv, _ = attack_checked(attack, x, y, eps)
    with torch.inference_mode():
        return float((model(x_adv).argmax(1) != y).float().mean())


def sign_noise(eps: float, gen: torch.Generator) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Random corners of the L-inf ball: x + eps * (+-1), clipped to [0, 1]. The strongest
    gradient-free perturbation of that norm; an attack using gradients must do better."""
    def noise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = torch.randint(0, 2, x.shape, generator=gen).to(x.device, x.dtype) * 2 - 1
        return (x + eps * s).clamp_(0, 1)
    return noise


def sanity_probe(model: nn.Module, build: Callable[[float, dict[str, Any]], Callable[..., torch.Tensor]],
                 attack_name: str, x: torch.Tensor, y: torch.Tensor, eps: float, tol: float,
                 pgd_steps: int = 10, seed: int = 0, known: dict[str, float] | None = None,
                 memo: Callable[[str, float, dict[str, Any], Callable[[], float]], float] | None = None,
                 ) -> SanityResult:
    """Carlini et al.'s checks on ``x`` (float [0, 1], all correctly classified).

    ``build(eps, overrides)`` returns an attack of the cell's kind; ``overrides`` may set
    ``name`` (fgsm/pgd) and PGD's ``steps``/``step_size``. ASRs are fractions of the probe images.
    ``known`` holds ASRs the cell's own evaluation already measured on these images (its ``fgsm``
    or ``pgd``), which are then not recomputed. ``memo(check, eps, overrides, compute)`` may
    return a value an earlier cell computed for the same model, images, check, eps and attack
    settings (robustsweep.reuse): every check is seeded on its own, so a memoised value is the
    one ``compute()`` would give.
    """
    res = SanityResult(n_probe=len(y))
    if len(y) == 0 or attack_name == "none":
        return res
    known = known or {}

    def measure(check: str, e: float, overrides: dict[str, Any], attack: Callable[[], Any]) -> float:
        if check in known:
            return known[check]

        def compute() -> float:
            torch.manual_seed(seed)  # PGD's random start: each check seeded alone
            return _fooled(model, attack(), x, y, e)
        return memo(check, e, overrides, compute) if memo else compute()

    a = res.asr
    # At eps = 0 one PGD step exercises the same projection as ten, at a tenth of the cost.
    zero = {"steps": 1} if attack_name == "pgd" else {}
    a["eps0"] = measure("eps0", 0.0, zero, lambda: build(0.0, zero))
    a["noise"] = measure("noise", eps, {}, lambda: sign_noise(eps, torch.Generator().manual_seed(seed)))
    a["fgsm"] = measure("fgsm", eps, {"name": "fgsm"}, lambda: build(eps, {"name": "fgsm"}))
    # early_stop: these checks ask whether an adversarial example was found, and PGD that stops
    # at the first one costs a fraction of the full steps.
    pgd = {"name": "pgd"} if attack_name == "pgd" else {"name": "pgd", "steps": pgd_steps,
                                                          "step_size": None, "random_start": True,
                                                          "early_stop": True}
    a["pgd"] = measure("pgd", eps, pgd, lambda: build(eps, pgd))
    # Unbounded: every image can be turned into any other, so only masked gradients stop PGD.
    unb = {"name": "pgd", "steps": max(pgd_steps, 10), "step_size": 0.1, "random_start": True,
           "early_stop": True}
    a["unbounded"] = measure("unbounded", 1.0, unb, lambda: build(1.0, unb))
    if a["eps0"] > 0:
        res.reasons.append("eps0_fools")
    if a["unbounded"] < 0.99:
        res.reasons.append("unbounded_fails")
    if a["pgd"] < a["fgsm"] - tol:
        res.reasons.append("pgd_below_fgsm")
    # A gradient attack must do at least as well as random corners of the same ball. (Not
    # "strictly better": at small eps both fool the same one or two fragile images.)
    if a["pgd"] < a["noise"]:
        res.reasons.append("pgd_below_noise")
    return res


# ------------------------------------------------------------------------- across a sweep


def eps_monotonicity(runs: Iterable[Any], tol: float) -> dict[str, str]:
    """Runs (MLflow) whose ASR is more than ``tol`` below that of a smaller eps with otherwise the
    same config: run_id -> message. Cells differing only in epsilon attack the same images of the
    same model, so a larger ball can only contain more adversarial examples."""
    from robustsweep.sweep import NOT_RESULTS

    result_free = tuple(f"{k}." for k in NOT_RESULTS)  # params of the same cell identity
    groups: dict[tuple, list[tuple[float, float, str]]] = {}
    for r in runs:
        p, m = r.data.params, r.data.metrics
        if "epsilon" not in p or "asr" not in m or math.isnan(m["asr"]):
            continue
        key = tuple(sorted((k, v) for k, v in p.items() if k != "epsilon" and not k.startswith(result_free)))
        groups.setdefault(key, []).append((float(p["epsilon"]), m["asr"], r.info.run_id))
    flagged: dict[str, str] = {}
    for cells in groups.values():
        cells.sort()
        best_eps, best = -1.0, -math.inf
        for eps, asr, run_id in cells:
            if asr < best - tol:
                flagged[run_id] = (f"asr {asr:.4f} at eps {eps * 255:.3g}/255 is below asr {best:.4f} "
                                   f"at eps {best_eps * 255:.3g}/255 (tolerance {tol})")
            if asr > best:
                best_eps, best = eps, asr
    return flagged


def check_sweep(client: Any, parent_run_id: str, tol: float) -> dict[str, str]:
    """Cross-cell checks over a sweep's FINISHED children; tags and returns the suspects."""
    from robustsweep.sweep import finished_children

    flagged = eps_monotonicity(finished_children(client, parent_run_id), tol)
    for run_id, why in flagged.items():
        add_suspect(client, run_id, ["asr_falls_with_eps"])
        log.warning("suspect cell %s (asr_falls_with_eps): %s", run_id, why)
    return flagged


def add_suspect(client: Any, run_id: str, reasons: Iterable[str]) -> str:
    """Append reasons to a run's ``suspect`` tag (kept sorted, without duplicates)."""
    run = client.get_run(run_id)
    old = [r for r in run.data.tags.get(SUSPECT_TAG, "").split(",") if r]
    value = ",".join(sorted(set(old) | set(reasons)))
    client.set_tag(run_id, SUSPECT_TAG, value)
    return value
