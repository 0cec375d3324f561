"""The ``quantize`` compress stage: post-training quantization after pruning (and its fine-tune).

Methods (``quantize.name``):
  none   the float model
  int8   post-training static int8 (torch.ao FX graph mode, ``quantize.backend``: x86 = fbgemm +
         oneDNN): per-channel symmetric int8 weights, per-tensor affine uint8 activations
         calibrated on ``quantize.n_calib`` training images; conv-bn-relu fused. What a user would
         deploy on a CPU. int8 kernels have no input gradient, so the model becomes an
         ``Int8Pair``: white-box attacks (and attributions) take gradients through a
         differentiable twin -- the reference FX graph with every quantize/dequantize pair replaced
         by ``torch.fake_quantize_per_tensor_affine`` (straight-through rounding) -- while every
         prediction robustsweep scores comes from the int8 model. The twin's agreement with the int8
         model is measured per cell (``quant_agreement``, the ``quant`` evaluator).
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

import contextlib
import copy
import fnmatch
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from robustsweep.core.device import amp_name, device_type
from robustsweep.core.errors import ConfigError
from robustsweep.core.params import check, positive_int
from robustsweep.core.registry import Registry
from robustsweep.steps.prune import LAYER_TYPES

log = logging.getLogger(__name__)

Calib = Callable[[], torch.Tensor]
Quantizer = Callable[[nn.Module, DictConfig, Calib], dict[str, float]]
QUANTIZERS: Registry[Quantizer] = Registry("quantize", key="name")
register_quantizer = QUANTIZERS.register
BITS = range(2, 9)  # fake quantization: 2..8 bits
METRICS = ("quant_bits", "quant_levels_max", "quant_calib_s")
BACKENDS = ("x86", "fbgemm", "onednn", "qnnpack")


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


class Int8Pair(nn.Module):
    """The int8 network a user would deploy, with its differentiable twin beside it.

    ``forward`` runs the twin while autograd records (an attack's gradient step, an attribution) or
    inside ``twin_mode``, and the int8 network otherwise (every prediction under ``no_grad`` /
    ``inference_mode``: clean accuracy, the adversarial predictions ``attacks.evaluate`` scores,
    latency). Only the int8 network is a submodule, so ``state_dict``, the size and the
    unchanged-guard see what would be shipped."""

    def __init__(self, int8: nn.Module, twin: nn.Module) -> None:
        super().__init__()
        self.int8 = int8
        self._twin = (twin,)  # a tuple: not registered, not in state_dict
        self.force_twin = False

    @property
    def twin(self) -> nn.Module:
        return self._twin[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.force_twin or torch.is_grad_enabled():
            return self.twin(x)
        return self.int8(x)


def pairs(model: nn.Module) -> list[Int8Pair]:
    return [m for m in model.modules() if isinstance(m, Int8Pair)]


@contextlib.contextmanager
def twin_mode(model: nn.Module) -> Iterator[bool]:
    """Inside: every ``Int8Pair`` of ``model`` runs its twin, gradients or not. Yields whether
    ``model`` has any (a float model is unaffected)."""
    ps = pairs(model)
    for p in ps:
        p.force_twin = True
    try:
        yield bool(ps)
    finally:
        for p in ps:
            p.force_twin = False


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """``quantize_per_tensor`` + ``dequantize`` with a straight-through gradient (same rounding
    and clamping to the dtype's range)."""
    lo, hi = (0, 255) if dtype == torch.quint8 else (-128, 127)
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(())
    zero_point = torch.as_tensor(zero_point).to(torch.int32).reshape(())
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, lo, hi)


def make_twin(reference: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The reference FX graph (``convert_to_reference_fx``) with each activation
    quantize_per_tensor -> dequantize pair replaced by ``_fake_quant``; raises if any remain."""
    g = reference.graph
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_method" and users[0].target == "dequantize":
                with g.inserting_before(node):
                    fq = g.call_function(_fake_quant, args=node.args)
                users[0].replace_all_uses_with(fq)
                g.erase_node(users[0])
                g.erase_node(node)
    left = [n.name for n in g.nodes if n.op == "call_function" and n.target is torch.quantize_per_tensor]
    if left:
        raise RuntimeError(f"quantize=int8: the twin still quantizes at {left} (no input gradient there)")
    g.lint()
    reference.recompile()
    return reference


def _check_int8(node: DictConfig, cfg: DictConfig) -> None:
    supported = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    check(node.get("backend") in BACKENDS and node.get("backend") in supported, "quantize.backend",
          node.get("backend"), f"a quantized backend of this torch build: {', '.join(supported)}")
    positive_int(cfg.quantize, "n_calib")
    number = node.get("min_agreement")
    check(isinstance(number, int | float) and not isinstance(number, bool) and 0 <= number <= 1,
          "quantize.min_agreement", number, "a share in [0, 1]")
    check(amp_name(cfg) == "none", "perf.amp", amp_name(cfg),
          "none with quantize=int8 (the int8 model computes in int8; bf16 autocast would change only the "
          "twin the attacks differentiate)")
    kind = device_type(cfg.device)
    check(kind == "cpu", "device", cfg.device,
          f"cpu for quantize=int8: PyTorch's int8 kernels ({', '.join(supported)}) "
          f"run on the CPU only; {kind} has none (quantize=fake runs anywhere)")


@contextlib.contextmanager
def _torch_ao_quiet() -> Iterator[None]:
    """torch.ao's FX quantization warns about its own defaults (``reduce_range`` in the x86 qconfig,
    quantized-tensor creation being deprecated) on every int8 cell: nothing a user can act on, and it
    buried the run's own lines. Only these messages are silenced, only while we quantize."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        yield


@register_quantizer("int8", check=_check_int8)
def _int8(model: nn.Module, node: DictConfig, calib: Calib) -> dict[str, float]:
    import time

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

    net = getattr(model, "net", None)
    if not isinstance(net, nn.Module):
        raise ConfigError("quantize=int8 quantizes the network inside robustsweep's normalising wrapper "
                          f"(model.net); {type(model).__name__} has none")
    torch.backends.quantized.engine = str(node.backend)
    t = time.perf_counter()
    images = calib()
    seen: list[torch.Tensor] = []  # the network's own inputs: the normalised calibration images
    hook = net.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    try:
        with torch.inference_mode():
            for i in range(0, len(images), 128):
                model(images[i:i + 128])
    finally:
        hook.remove()
    float_net = copy.deepcopy(net).eval()
    with _torch_ao_quiet():
        try:
            prepared = prepare_fx(float_net, get_default_qconfig_mapping(str(node.backend)),
                                  example_inputs=(seen[0][:1],))
        except Exception as e:  # torch.fx cannot trace data-dependent control flow
            why = f"{type(e).__name__}: {e}"
            raise ConfigError(f"quantize=int8: torch.fx cannot trace model={type(net).__name__} ({why}); "
                              f"allowed: a traceable network, or quantize=fake") from e
        with torch.inference_mode():
            for x in seen:
                prepared(x)  # the observers record activation ranges
        int8 = convert_fx(copy.deepcopy(prepared)).eval()
        twin = make_twin(convert_to_reference_fx(prepared)).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    model.net = Int8Pair(int8, twin)
    s = time.perf_counter() - t
    log.info("quantize=int8 (%s): calibrated on %d training images, int8 model and its twin built in %.1f s",
             node.backend, len(images), s)
    return {"quant_bits": 8.0, "quant_calib_s": s}


def check_quantize_config(node: DictConfig | None, cfg: DictConfig) -> None:
    """``quantize.*``: a known method and its own checks (called by validate())."""
    if node is None:
        return
    QUANTIZERS.validate(node, cfg)
