"""Models take [0, 1] images and normalise inside ``forward`` (as RobustBench models do).

So eps is always in pixel units, attacks clip to [0, 1], and nobody can feed normalised tensors
to an attack by mistake. ``mean``/``std`` are buffers: they travel with every checkpoint.

Adding a model: ``model=custom model._target_=mypkg.nets.wide_resnet +model.depth=28`` (any
importable callable returning an ``nn.Module``; it receives whichever of ``in_channels``,
``num_classes``, ``image_size`` it accepts, plus the node's other keys), or one YAML in
conf/model/ with ``name: <yours>`` and one function here decorated with ``@register_model("<yours>")``
taking ``(in_channels, num_classes, image_size, **cfg)``. Either way the network gets the same
normalising wrapper, guards and checks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustsweep.core.checkpoint import CheckpointError, check_checkpoint
from robustsweep.core.errors import ConfigError
from robustsweep.core.params import check
from robustsweep.core.paths import resolve_path
from robustsweep.core.registry import TARGET, Registry
from robustsweep.steps.data import exact_shape, shape_hint

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = MODELS.register


class Normalized(nn.Module):
    """Wraps a network: ``forward(x in [0,1]) = net((x - mean) / std)``."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class Autocast(nn.Module):
    """``forward`` under ``torch.autocast(dtype)``, float32 logits out (perf.amp=bf16).

    Convolutions and matmuls run in bfloat16; the input, the loss and the input-gradient an
    attack takes stay float32, so eps, clipping and the guards are unchanged. The wrapped model's
    parameters are shared, not copied.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


def with_amp(model: nn.Module, amp: str) -> nn.Module:
    """``model`` itself for amp="none", an ``Autocast`` wrapper for "bf16"."""
    if amp == "none":
        return model
    if amp == "bf16":
        return Autocast(model, torch.bfloat16)
    raise ValueError(f"perf.amp={amp!r} is not valid; allowed: none, bf16")


@register_model("small_cnn")
def small_cnn(in_channels: int, num_classes: int, image_size: int, width: int = 32,
              **_: object) -> nn.Module:
    """Two conv blocks and a linear head (~25k parameters at width 32): digits in seconds."""
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * w, num_classes),
    )


class _Block(nn.Module):
    """Pre-activation-free basic block (He et al. 2016) with a 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_model("resnet_small")
def resnet_small(in_channels: int, num_classes: int, image_size: int, width: int = 16,
                 blocks_per_stage: int = 3, **_: object) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2): 3 stages of 16/32/64 channels, 0.27M params.

    torchvision has no CIFAR-style ResNet-20, hence this small hand-written one.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    cin = width
    for stage in range(3):
        cout = width * 2**stage
        for b in range(blocks_per_stage):
            layers.append(_Block(cin, cout, 2 if (b == 0 and stage > 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


@register_model("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int, width: int = 64,
             **_: object) -> nn.Module:
    """torchvision's ResNet-18 in its CIFAR form: 3x3 stride-1 stem, no max-pool.

    ``width`` is the first stage's channel count (stages: w, 2w, 4w, 8w). 64 is torchvision's
    network exactly (11.2M parameters); 32 has ~2.8M, a CPU-trainable net with the same depth.
    The module names are torchvision's at every width, so its state dicts load.
    """
    from torchvision.models import resnet18 as tv_resnet18
    from torchvision.models.resnet import BasicBlock

    net = tv_resnet18(weights=None, num_classes=num_classes)
    net.maxpool = nn.Identity()
    net.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    if width != 64:  # rebuild the stages torchvision hard-codes at 64/128/256/512
        net.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i in range(4):
            cout, stride = width * 2**i, (1 if i == 0 else 2)
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            setattr(net, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, cout, stride, down),
                                                        BasicBlock(cout, cout)))
            cin = cout
        net.fc = nn.Linear(cin, num_classes)
        for m in net.modules():  # torchvision's own initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def build_net(node: DictConfig, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The bare network ``node`` describes (a registered name or a ``_target_``), unwrapped."""
    fn = MODELS.resolve(node)
    kwargs: dict[str, Any] = MODELS.kwargs(node, "checkpoint")
    dims = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    try:
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
        dims = {k: v for k, v in dims.items() if takes_all or k in params}
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        pass
    try:
        net = fn(**dims, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model={MODELS.name_of(node)!r} cannot be built with {sorted({**dims, **kwargs})} "
                          f"({e}); allowed: a callable taking those keyword arguments") from e
    if not isinstance(net, nn.Module):
        key = f"model.{TARGET}" if node.get(TARGET) else "model.name"
        raise ConfigError(f"{key}={MODELS.name_of(node)!r} returned a {type(net).__name__}, not a "
                          f"torch.nn.Module; allowed: a callable that builds the network")
    return net


def build_model(node: DictConfig, in_channels: int, num_classes: int, image_size: int,
                mean: tuple[float, ...], std: tuple[float, ...]) -> Normalized:
    """Build the network ``node`` describes, wrapped with in-model normalisation."""
    return Normalized(build_net(node, in_channels, num_classes, image_size), mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_PROBED: set[str] = set()  # _target_ models already built once by check_model_config
_META: dict[str, Normalized] = {}  # config probe -> the wrapped network on the meta device


def meta_model(cfg: DictConfig) -> Normalized:
    """The cell's network as the run builds it, wrapped (module names ``net.*``, as
    ``prune.exclude`` patterns match them at run time), on PyTorch's ``meta`` device: names and
    shapes for validation, no memory and no time. Built for the data's shape hint, once per process."""
    c, size, k = shape_hint(cfg.data)
    probe = repr((OmegaConf.to_container(cfg.model, resolve=True), c, size, k))
    if probe not in _META:
        with torch.device("meta"):
            _META[probe] = build_model(cfg.model, c, k, size, mean=(0.0,) * c, std=(1.0,) * c)
    return _META[probe]


def check_model_config(node: DictConfig, cfg: DictConfig) -> None:
    """``model.*`` before anything runs: a known name or an importable ``_target_`` that really
    builds an ``nn.Module`` (built once per process, on the meta device, for the data's shape)
    whose output is one logit per class, and a ``model.checkpoint`` that exists and is loadable."""
    MODELS.validate(node, cfg)
    ckpt = node.get("checkpoint")
    if ckpt:
        path = resolve_path(ckpt)
        check(path.is_file(), "model.checkpoint", str(ckpt),
              f"an existing .safetensors/.pt file (looked for {path})")
        try:
            check_checkpoint(path)
        except CheckpointError as e:
            raise ConfigError(f"model.checkpoint={str(ckpt)!r} is not a loadable checkpoint ({e}); allowed: "
                              f"a safetensors file or a weights-only .pt state dict") from e
    if node.get(TARGET):
        c, size, k = shape_hint(cfg.data)
        probe = repr((MODELS.kwargs(node), c, size, k, node.get(TARGET), exact_shape(cfg.data)))
        if probe not in _PROBED:
            try:
                with torch.device("meta"):  # shapes only: no memory, no time for big networks
                    net = build_net(node, c, k, size)
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(f"model.{TARGET}={node.get(TARGET)!r} failed to build the network "
                                  f"({type(e).__name__}: {e}); allowed: a callable that returns an "
                                  f"nn.Module") from e
            if exact_shape(cfg.data) is not None:
                _check_logits(node, net, c, size, k)
            _PROBED.add(probe)


def _check_logits(node: DictConfig, net: nn.Module, c: int, size: int, k: int) -> None:
    """A ``_target_`` network maps a batch of the data's images to one logit per class.

    Checked by a forward pass of two images on the meta device (shapes only). An operation with no
    meta kernel (data-dependent shapes, ``.item()``) fails there: then the network is built on the
    CPU and run on two black images (with the RNG state restored, so validation draws nothing)."""
    def forward(net: nn.Module, device: str) -> Any:
        with torch.inference_mode():
            return net.eval()(torch.zeros(2, c, size, size, device=device))

    target = node.get(TARGET)
    try:
        out = forward(net, "meta")
    except Exception:
        try:
            with torch.random.fork_rng(devices=[]):
                out = forward(build_net(node, c, k, size), "cpu")
        except Exception as e:
            raise ConfigError(f"model.{TARGET}={target!r} fails on a batch of the data's images of shape "
                              f"(2, {c}, {size}, {size}) ({type(e).__name__}: {e}); allowed: a network "
                              f"that maps (N, {c}, {size}, {size}) images in [0, 1] to (N, {k}) logits") from e
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, k):
        raise ConfigError(f"model.{TARGET}={target!r} returns {shape} for a batch of the data's images "
                          f"of shape (2, {c}, {size}, {size}), the data has {k} classes; allowed: a "
                          f"network that returns (N, {k}) logits, one per class")
