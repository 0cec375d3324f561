"""The ``quantize`` compress stage: post-training quantization after pruning (and its fine-tune).

Methods (``quantize.name``):
  none   the float model
  fake   weight-only fake quantization at ``quantize.bits`` (2..8): each selected weight tensor is
         rounded to 2^(bits-1)-1 symmetric levels per output channel (scale = max|w| of the channel
         / (2^(bits-1)-1), zero point 0, so pruned zeros stay zero) with
         ``torch.fake_quantize_per_channel_affine``. The model stays a float model: what bits cost
         in accuracy and robustness, not what int8 kernels run like.

Each method measures what it did: ``quant_bits`` (asked) and ``quant_levels_max`` (the most distinct
values any output channel of a quantized tensor holds, counted on the weights: at most
2^bits - 1).

Adding a method: one YAML in conf/quantize/ with ``name: <yours>`` and one function here decorated
with ``@register_quantizer("<yours>")``: ``fn(model, node, calib) -> dict`` that quantizes
``model`` in place and returns its measured metrics (``calib()``: training images in [0, 1],
decoded only when called).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from robustsweep.core.params import check
from robustsweep.core.registry import Registry
from robustsweep.steps.prune import LAYER_TYPES

log = logging.getLogger(__name__)

Calib = Callable[[], torch.Tensor]
Quantizer = Callable[[nn.Module, DictConfig, Calib], dict[str, float]]
QUANTIZERS: Registry[Quantizer] = Registry("quantize", key="name")
register_quantizer = QUANTIZERS.register
BITS = range(2, 9)  # fake quantization: 2..8 bits
METRICS = ("quant_bits", "quant_levels_max")


def is_none(node: DictConfig | None) -> bool:
    return node is None or (node.get("name") in (None, "none") and not node.get("_target_"))


@register_quantizer("none")
def _none(model: nn.Module, node: DictConfig, calib: Calib) -> dict[str, float]:
    return {}


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel fake quantization of ``w`` (dim 0 = output channels) to
    ``bits``: levels -(2^(bits-1)-1) .. 2^(bits-1)-1 times the channel's scale."""
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().reshape(w.shape[0], -1)
    scale = (flat.abs().amax(1) / qmax).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel stays zero
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w.detach().float(), scale, zero, 0, -qmax, qmax).to(w.dtype)


def levels_per_channel(w: torch.Tensor) -> int:
    """The most distinct values in any output channel of ``w``."""
    return max(int(torch.unique(c).numel()) for c in w.detach().reshape(w.shape[0], -1))


def _targets(model: nn.Module, layers: Sequence[str], exclude: Sequence[str]) -> list[tuple[str, nn.Module]]:
    types = tuple(t for layer in layers for t in LAYER_TYPES[layer])
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, types) and not any(fnmatch.fnmatch(n, p) for p in exclude)]


def _check_fake(node: DictConfig, cfg: DictConfig) -> None:
    bits = node.get("bits")
    check(isinstance(bits, int) and not isinstance(bits, bool) and bits in BITS, "quantize.bits", bits,
          f"an integer in {{{BITS.start}..{BITS.stop - 1}}}")
    layers = list(node.get("layers") or [])
    check(bool(layers) and set(layers) <= set(LAYER_TYPES), "quantize.layers", layers,
          f"a non-empty subset of [{', '.join(LAYER_TYPES)}]")


@register_quantizer("fake", check=_check_fake)
def _fake(model: nn.Module, node: DictConfig, calib: Calib) -> dict[str, float]:
    targets = _targets(model, node.layers, node.get("exclude") or ())
    with torch.no_grad():
        for _, m in targets:
            m.weight.copy_(quantize_weight(m.weight, int(node.bits)))
    levels = max((levels_per_channel(m.weight) for _, m in targets), default=0)
    log.info("quantize=fake: %d weight tensors at %d bits (at most %d levels per channel measured)",
             len(targets), node.bits, levels)
    return {"quant_bits": float(node.bits), "quant_levels_max": float(levels)}


def check_quantize_config(node: DictConfig | None, cfg: DictConfig) -> None:
    """``quantize.*``: a known method and its own checks (called by validate())."""
    if node is None:
        return
    QUANTIZERS.validate(node, cfg)
