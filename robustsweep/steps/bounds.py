"""Certified bounds on a network's logits over an L-inf ball: IBP and CROWN, written here.

Why by hand: no PyPI package bounds our networks today (auto-LiRPA 0.3 on PyPI needs torch < 1.13
and fails to import under numpy 2; ``bound-propagation`` 0.4.7 handles only Linear/ReLU
Sequentials). This module is small and tested for soundness against sampled inputs.

- **IBP** (interval bound propagation; Gowal et al. 2018, arXiv:1810.12715): a box through every
  layer, centre and radius through affine layers (radius through |W|), ReLU elementwise. The last
  linear layer is merged with the specification (their "elision"): the margin logit_y - logit_j
  is bounded as one linear function of the penultimate box, not as a difference of two intervals.
- **CROWN** (Zhang et al. 2018, arXiv:1811.00866): the specification propagated backwards as a
  linear function of the input; each unstable ReLU (l < 0 < u) is relaxed by the chord above and
  the line of slope 1 (u > -l) or 0 below (their adaptive lower bound); the linear function is
  then minimised over the input box in closed form. Intermediate pre-activation bounds come from
  CROWN itself, one backward pass per layer with every neuron as a specification, for plain stacks
  (``method="crown"``), or from IBP (``method="crown-ibp"``, Zhang et al. 2020, arXiv:1906.06316),
  which also handles residual blocks.

The bound is for the model as scored: the normalising wrapper is an affine layer like any other,
and the ball is intersected with [0, 1] before propagation. Layers handled: Conv2d, Linear,
BatchNorm (eval mode: an affine map), ReLU, Flatten, average pooling, Identity, Sequential, the
residual blocks of ``resnet_small`` and torchvision's BasicBlock; anything else is refused with its
name (``check_supported``) before any run. Pruning masks are part of ``module.weight``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

Bounds = tuple[torch.Tensor, torch.Tensor]
# An affine layer (Conv2d, Linear, BatchNorm in eval, Flatten, pooling, normalisation): x -> W x + b.
AFFINE = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten, nn.AdaptiveAvgPool2d,
          nn.AvgPool2d, nn.Identity)


class BoundError(ValueError):
    """The network has a layer this module cannot bound (the message names it)."""


# ---- the network as a list of nodes ----------------------------------------------------------

@dataclass
class Affine:
    """An affine layer: ``fn`` is the module (or the normalisation), applied as is."""
    fn: Callable[[torch.Tensor], torch.Tensor]
    name: str
    weight_abs: Callable[[torch.Tensor], torch.Tensor] | None = None  # |W| r, for IBP's radius
    # A W for a batch of specifications a (N, *out) -> (N, *in), where written out (conv, linear);
    # else autograd's vector-Jacobian product of ``fn``
    transpose: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor] | None = None


@dataclass
class Relu:
    name: str


@dataclass
class Residual:
    """relu(main(x) + shortcut(x)) when ``relu`` (ResNet basic blocks), else the sum."""
    main: list
    shortcut: list
    name: str
    relu: bool = True


def _abs_linear(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """r -> |W| r for the linear part of ``m`` (None: monotone maps, where |W| = W)."""
    if isinstance(m, nn.Conv2d):
        return lambda r: F.conv2d(r, m.weight.abs(), None, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, nn.Linear):
        return lambda r: F.linear(r, m.weight.abs())
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        scale = _bn_scale(m)
        shape = (1, -1) + (1,) * (2 if isinstance(m, nn.BatchNorm2d) else 0)
        return lambda r: r * scale.abs().view(shape)
    return None  # pooling, flatten, identity: nonnegative weights


def _transpose(m: nn.Module) -> Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor] | None:
    """a -> a W for the linear part of a Conv2d / Linear (CROWN's backward step without a forward)."""
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
        return lambda a, in_shape: torch.nn.grad.conv2d_input((len(a), *in_shape), m.weight, a, m.stride,
                                                              m.padding, m.dilation, m.groups)
    if isinstance(m, nn.Linear):
        return lambda a, in_shape: a @ m.weight
    return None


def _bn_scale(m: nn.Module) -> torch.Tensor:
    var = m.running_var
    scale = torch.rsqrt(var + m.eps)
    return scale * m.weight if m.weight is not None else scale


def _bn_with(m: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> Affine:
    """A BatchNorm as the affine map of the given statistics (a training batch's)."""
    scale = torch.rsqrt(var + m.eps) * (m.weight if m.weight is not None else 1.0)
    shift = (m.bias if m.bias is not None else 0.0) - mean * scale
    shape = (1, -1) + (1,) * (2 if isinstance(m, nn.BatchNorm2d) else 0)
    return Affine(lambda z: z * scale.view(shape) + (shift.view(shape) if torch.is_tensor(shift) else shift),
                  "bn", lambda r: r * scale.abs().view(shape))


def flatten(model: nn.Module, prefix: str = "", bn_stats: dict | None = None) -> list:
    """The network as nodes (Affine, Relu, Residual), or BoundError naming the first layer it
    cannot bound. ``bn_stats`` (module -> (mean, var)): a training-mode BatchNorm is the affine map
    of those batch statistics (certified training; see ``batch_stats``)."""
    from robustsweep.steps.models import Normalized, _Block

    name = prefix or "model"
    if isinstance(model, Normalized):
        mean, std = model.mean, model.std
        if (std <= 0).any():
            raise BoundError(f"{name}: the normalisation has a std <= 0")
        return [Affine(lambda x: (x - mean) / std, f"{name}.normalize", lambda r: r / std,
                       lambda a, in_shape: a / std),
                *flatten(model.net, f"{prefix}.net" if prefix else "net", bn_stats)]
    if isinstance(model, nn.Sequential):
        return [n for i, m in enumerate(model)
                for n in flatten(m, f"{prefix}.{i}" if prefix else str(i), bn_stats)]
    if isinstance(model, nn.ReLU):
        return [Relu(name)]
    if isinstance(model, nn.BatchNorm1d | nn.BatchNorm2d):
        if bn_stats is not None and model in bn_stats:
            return [_bn_with(model, *bn_stats[model])]
        if model.training or model.running_var is None:
            raise BoundError(f"{name} ({type(model).__name__}) is in training mode or has no running "
                             f"statistics: only an evaluation-mode BatchNorm is an affine map")
        scale = _bn_scale(model)
        shape = (1, -1) + (1,) * (2 if isinstance(model, nn.BatchNorm2d) else 0)
        return [Affine(model, name, _abs_linear(model), lambda a, in_shape: a * scale.view(shape))]
    if isinstance(model, AFFINE):
        return [Affine(model, name, _abs_linear(model), _transpose(model))]
    from torchvision.models.resnet import BasicBlock

    if isinstance(model, _Block | BasicBlock):  # relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))
        main = [*flatten(model.conv1, f"{name}.conv1", bn_stats), *flatten(model.bn1, f"{name}.bn1", bn_stats),
                Relu(f"{name}.relu"), *flatten(model.conv2, f"{name}.conv2", bn_stats),
                *flatten(model.bn2, f"{name}.bn2", bn_stats)]
        short = model.shortcut if isinstance(model, _Block) else model.downsample
        return [Residual(main, flatten(short, f"{name}.shortcut", bn_stats) if short is not None else [], name)]
    raise BoundError(f"{name} ({type(model).__name__}) is not a layer the bounds can handle; allowed: "
                     f"Conv2d, Linear, BatchNorm (eval), ReLU, Flatten, average pooling, Identity, "
                     f"Sequential, residual basic blocks")


def network_for_checks(cfg: DictConfig) -> tuple[nn.Module, tuple[int, int, int], int]:
    """The cell's network as built (untrained, eval mode), its image shape and class count: what
    validation inspects before any run (layers the bounds handle, CROWN's memory)."""
    from robustsweep.steps.data import shape_hint
    from robustsweep.steps.models import build_model

    c, size, classes = shape_hint(cfg.data)
    net = build_model(cfg.model, c, classes, size, mean=(0.0,) * c, std=(1.0,) * c).eval()
    return net, (c, size, size), classes


@contextlib.contextmanager
def batch_stats(model: nn.Module) -> Iterator[dict]:
    """Record each training-mode BatchNorm's batch statistics (mean, biased var) during the
    forward passes inside the block: IBP training bounds the network its clean batch trains."""
    stats: dict = {}

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if m.training:
            dims = [0, *range(2, inp[0].dim())]
            stats[m] = (inp[0].mean(dims), inp[0].var(dims, unbiased=False))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def check_supported(model: nn.Module) -> None:
    """BoundError naming the first layer of ``model`` the bounds cannot handle."""
    flatten(model)


def has_residual(nodes: list) -> bool:
    return any(isinstance(n, Residual) for n in nodes)


# ---- IBP -----------------------------------------------------------------------------------------

def _ibp_affine(node: Affine, lo: torch.Tensor, hi: torch.Tensor) -> Bounds:
    if node.weight_abs is None:  # monotone nondecreasing: the box maps to the box
        return node.fn(lo), node.fn(hi)
    c, r = (hi + lo) / 2, (hi - lo) / 2
    c, r = node.fn(c), node.weight_abs(r)
    return c - r, c + r


def ibp_nodes(nodes: list, lo: torch.Tensor, hi: torch.Tensor, record: dict | None = None) -> Bounds:
    """Interval bounds through ``nodes``; ``record[id(relu)] = (l, u)`` of every ReLU's input."""
    for n in nodes:
        if isinstance(n, Affine):
            lo, hi = _ibp_affine(n, lo, hi)
        elif isinstance(n, Relu):
            if record is not None:
                record[id(n)] = (lo, hi)
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        else:
            ml, mh = ibp_nodes(n.main, lo, hi, record)
            sl, sh = ibp_nodes(n.shortcut, lo, hi, record)
            lo, hi = ml + sl, mh + sh
            if n.relu:
                if record is not None:
                    record[id(n)] = (lo, hi)
                lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    return lo, hi


def input_box(x: torch.Tensor, eps: float) -> Bounds:
    """The L-inf ball of radius ``eps`` around ``x``, intersected with [0, 1]."""
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def spec_matrix(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """C (B, K-1, K): row j is e_y - e_j over the K-1 classes j != y."""
    eye = torch.eye(n_classes, device=y.device)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): e_y - e_j for every j
    keep = ~torch.eye(n_classes, dtype=torch.bool, device=y.device)[y]  # drop j == y
    return c[keep].view(len(y), n_classes - 1, n_classes)


def ibp_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_classes: int,
                bn_stats: dict | None = None) -> torch.Tensor:
    """Lower bounds (B, K-1) on logit_y - logit_j over the ball, by IBP with the last linear layer
    merged into the specification (``bn_stats``: see ``flatten``)."""
    nodes = flatten(model, bn_stats=bn_stats)
    lo, hi = input_box(x, eps)
    last = nodes[-1]
    if isinstance(last, Affine) and isinstance(last.fn, nn.Linear):
        lo, hi = ibp_nodes(nodes[:-1], lo, hi)
        c = spec_matrix(y, n_classes)                          # (B, K-1, K)
        w = c @ last.fn.weight                                 # (B, K-1, d)
        b = c @ last.fn.bias if last.fn.bias is not None else 0.0
        centre, radius = (hi + lo) / 2, (hi - lo) / 2
        return (w @ centre.unsqueeze(-1)).squeeze(-1) - (w.abs() @ radius.unsqueeze(-1)).squeeze(-1) + b
    lo, hi = ibp_nodes(nodes, lo, hi)
    c = spec_matrix(y, n_classes)
    return (c.clamp(min=0) @ lo.unsqueeze(-1) + c.clamp(max=0) @ hi.unsqueeze(-1)).squeeze(-1)


# ---- CROWN: backward linear relaxation -------------------------------------------------------------

def _vjp(fn: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor,
         in_shape: tuple[int, ...]) -> torch.Tensor:
    """A W for the linear part of affine ``fn``: ``a`` (B, S, *out) -> (B, S, *in)."""
    b, s = a.shape[:2]
    with torch.enable_grad():
        z = torch.zeros((b * s, *in_shape), device=a.device, dtype=a.dtype, requires_grad=True)
        out = fn(z)
        (g,) = torch.autograd.grad(out, z, grad_outputs=a.reshape(b * s, *out.shape[1:]))
    return g.view(b, s, *in_shape)


def _relax(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CROWN's ReLU relaxation per neuron: (lower slope, upper slope, upper intercept)."""
    unstable = (lo < 0) & (hi > 0)
    active = lo >= 0
    denom = torch.where(unstable, hi - lo, torch.ones_like(hi))
    up_slope = torch.where(unstable, hi / denom, active.to(hi.dtype))
    up_icpt = torch.where(unstable, -lo * hi / denom, torch.zeros_like(hi))
    low_slope = torch.where(unstable, (hi >= -lo).to(hi.dtype), active.to(hi.dtype))
    return low_slope, up_slope, up_icpt


@dataclass
class _Pass:
    """State of one backward pass: the linear function A x + const of the current node's input."""
    a: torch.Tensor      # (B, S, *shape)
    const: torch.Tensor  # (B, S)


def _back(nodes: list, p: _Pass, shapes: dict, relu_bounds: dict) -> _Pass:
    """Propagate a lower-bounding linear function backwards through ``nodes``."""
    for n in reversed(nodes):
        if isinstance(n, Affine):
            in_shape = shapes[id(n)]
            bias = n.fn(torch.zeros((1, *in_shape), device=p.a.device, dtype=p.a.dtype))  # W 0 + b = b
            p.const = p.const + (p.a * bias.unsqueeze(1)).flatten(2).sum(-1)
            if n.transpose is not None:
                b, k = p.a.shape[:2]
                p.a = n.transpose(p.a.reshape(b * k, *p.a.shape[2:]), in_shape).view(b, k, *in_shape)
            else:
                p.a = _vjp(lambda z, f=n.fn, b0=bias: f(z) - b0, p.a, in_shape)
        elif isinstance(n, Relu):
            p = _back_relu(p, *relu_bounds[id(n)])
        else:
            if n.relu:
                p = _back_relu(p, *relu_bounds[id(n)])
            pm = _back(n.main, _Pass(p.a, p.const), shapes, relu_bounds)
            ps = _back(n.shortcut, _Pass(p.a, torch.zeros_like(p.const)), shapes, relu_bounds)
            p = _Pass(pm.a + ps.a, pm.const + ps.const)
    return p


def _back_relu(p: _Pass, lo: torch.Tensor, hi: torch.Tensor) -> _Pass:
    low_slope, up_slope, up_icpt = (t.unsqueeze(1) for t in _relax(lo, hi))
    a_pos, a_neg = p.a.clamp(min=0), p.a.clamp(max=0)
    const = p.const + (a_neg * up_icpt).flatten(2).sum(-1)
    return _Pass(a_pos * low_slope + a_neg * up_slope, const)


def _shapes(nodes: list, x: torch.Tensor, shapes: dict) -> torch.Tensor:
    """Record every affine node's input shape (one forward pass)."""
    for n in nodes:
        if isinstance(n, Affine):
            shapes[id(n)] = tuple(x.shape[1:])
            x = n.fn(x)
        elif isinstance(n, Relu):
            x = torch.relu(x)
        else:
            x = _shapes(n.main, x, shapes) + _shapes(n.shortcut, x, shapes)
            x = torch.relu(x) if n.relu else x
    return x


def _concretize(p: _Pass, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """min over the input box of A x + const: (B, S)."""
    a = p.a.flatten(2)
    return (a.clamp(min=0) @ lo.flatten(1).unsqueeze(-1) + a.clamp(max=0) @ hi.flatten(1).unsqueeze(-1)
            ).squeeze(-1) + p.const


def _lower(nodes: list, spec: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, shapes: dict,
           relu_bounds: dict) -> torch.Tensor:
    """Lower bound of spec · nodes(x) over the box; ``spec`` (B, S, *out)."""
    p = _back(nodes, _Pass(spec, torch.zeros(spec.shape[:2], device=spec.device, dtype=spec.dtype)), shapes,
              relu_bounds)
    return _concretize(p, lo, hi)


def _crown_intermediate(nodes: list, lo: torch.Tensor, hi: torch.Tensor, shapes: dict,
                        relu_bounds: dict, chunk: int) -> None:
    """Full CROWN's intermediate bounds for a plain stack: each ReLU's input bounded by a backward
    pass from there, one specification per neuron, ``chunk`` neurons at a time. Only neurons that
    IBP leaves unstable in some image are bounded again: a stable ReLU is exactly linear, and a
    tighter bound on its input changes nothing."""
    for k, n in enumerate(nodes):
        if not isinstance(n, Relu):
            continue
        prefix = nodes[:k]
        ib_lo, ib_hi = relu_bounds[id(n)]
        b, size = len(lo), ib_lo[0].numel()
        unstable = ((ib_lo < 0) & (ib_hi > 0)).reshape(b, size).any(0).nonzero().flatten()
        new_lo, new_hi = ib_lo.reshape(b, size).clone(), ib_hi.reshape(b, size).clone()
        for s in range(0, len(unstable), chunk):
            idx = unstable[s:s + chunk]
            spec = torch.zeros((len(idx), size), device=lo.device, dtype=lo.dtype)
            spec[torch.arange(len(idx)), idx] = 1
            spec = spec.view(1, len(idx), *ib_lo.shape[1:]).expand(b, -1, *ib_lo.shape[1:])
            low = _lower(prefix, spec, lo, hi, shapes, relu_bounds)
            high = -_lower(prefix, -spec, lo, hi, shapes, relu_bounds)
            # keep the tighter of IBP's and CROWN's bound per neuron (both are sound)
            new_lo[:, idx] = torch.max(new_lo[:, idx], low)
            new_hi[:, idx] = torch.min(new_hi[:, idx], high)
        relu_bounds[id(n)] = (new_lo.view(ib_lo.shape), new_hi.view(ib_hi.shape))


def _out_shape(nodes: list, lo: torch.Tensor) -> tuple[int, ...]:
    return tuple(_shapes(nodes, lo[:1], {}).shape[1:])


def crown_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_classes: int,
                  method: str = "crown", chunk: int = 512) -> torch.Tensor:
    """Lower bounds (B, K-1) on logit_y - logit_j over the ball by CROWN (``crown``: intermediate
    bounds by CROWN, plain stacks only) or CROWN-IBP (``crown-ibp``: intermediate bounds by IBP),
    never below IBP's bound on any specification (the per-specification maximum of the two)."""
    nodes = flatten(model)
    lo, hi = input_box(x, eps)
    shapes: dict = {}
    with torch.no_grad():
        _shapes(nodes, lo[:1], shapes)
        relu_bounds: dict = {}
        ibp_nodes(nodes, lo, hi, relu_bounds)
        if method == "crown":
            if has_residual(nodes):
                raise BoundError("certify.method=crown bounds plain stacks (conv-BN-ReLU-linear); this "
                                 "network has residual blocks: use crown-ibp or ibp")
            _crown_intermediate(nodes, lo, hi, shapes, relu_bounds, chunk)
        elif method != "crown-ibp":
            raise ValueError(f"method={method!r}; allowed: crown, crown-ibp")
        spec = spec_matrix(y, n_classes)
        crown = _lower(nodes, spec, lo, hi, shapes, relu_bounds)
    # CROWN's linear relaxation is not always tighter than interval arithmetic: on IBP-trained
    # networks it fell below IBP on up to 365 of 1,800 specifications (by up to 1.14; issue 28). Both are
    # sound lower bounds, so their per-specification maximum is sound and at least IBP's.
    return torch.max(crown, ibp_margins(model, x, y, eps, n_classes))


def crown_memory_bytes(model: nn.Module, image_shape: tuple[int, ...], batch: int, chunk: int,
                       n_classes: int) -> int:
    """Peak size of full CROWN's linear functions, float32: the backward pass of ``chunk`` neuron
    specifications through the widest layer, for ``batch`` images (the estimate checked before a run)."""
    nodes = flatten(model)
    shapes: dict = {}
    with torch.no_grad():
        _shapes(nodes, torch.zeros((1, *image_shape)), shapes)
    widest = max(math.prod(s) for s in shapes.values())
    return 4 * batch * max(chunk, n_classes) * widest * 3  # A, its positive/negative parts
