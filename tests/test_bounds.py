"""Certified bounds (robustsweep.steps.bounds) are sound: no sampled input of the ball beats them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustsweep.steps.bounds import (
    BoundError,
    check_supported,
    crown_margins,
    ibp_margins,
    input_box,
    spec_matrix,
)
from robustsweep.steps.models import Normalized, _Block

K = 5  # classes


def _randomise_bn(net: nn.Module, gen: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))  # negative scales too
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.2)


def plain_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, K))
    _randomise_bn(net, torch.Generator().manual_seed(seed))
    return Normalized(net, (0.4, 0.5), (0.2, 0.3)).eval()


def residual_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        _Block(4, 4, 1), _Block(4, 6, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, K))
    _randomise_bn(net, torch.Generator().manual_seed(seed))
    return Normalized(net, (0.4, 0.5), (0.2, 0.3)).eval()


def sampled_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                    n: int = 400) -> torch.Tensor:
    """The smallest margin logit_y - logit_j seen over random points and corners of the ball ∩ [0, 1]."""
    lo, hi = input_box(x, eps)
    c = spec_matrix(y, K)
    worst = torch.full((len(x), K - 1), float("inf"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(n):
            u = torch.rand(x.shape, generator=gen)
            if i % 2:  # a corner
                u = (u > 0.5).float()
            pt = lo + u * (hi - lo)
            margins = (c @ model(pt).unsqueeze(-1)).squeeze(-1)
            worst = torch.min(worst, margins)
    return worst


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.01, 0.05])
def test_ibp_and_crown_are_sound_and_crown_is_tighter_on_a_plain_stack(seed, eps):
    model = plain_net(seed)
    x = torch.rand(6, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(6) % K
    seen = sampled_margins(model, x, y, eps)
    ibp = ibp_margins(model, x, y, eps, K)
    crown = crown_margins(model, x, y, eps, K, method="crown")
    crown_ibp = crown_margins(model, x, y, eps, K, method="crown-ibp")
    for name, bound in (("ibp", ibp), ("crown", crown), ("crown-ibp", crown_ibp)):
        assert (bound <= seen + 1e-4).all(), (name, (bound - seen).max())
    assert (crown >= ibp - 1e-4).all(), (crown - ibp).min()
    assert crown.mean() > ibp.mean()  # strictly tighter somewhere: not a copy of IBP


@pytest.mark.parametrize("seed", [0, 1])
def test_bounds_are_sound_through_residual_blocks(seed):
    model = residual_net(seed)
    x = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(4) % K
    seen = sampled_margins(model, x, y, 0.02)
    for bound in (ibp_margins(model, x, y, 0.02, K), crown_margins(model, x, y, 0.02, K, method="crown-ibp")):
        assert (bound <= seen + 1e-4).all()
    with pytest.raises(BoundError, match="residual blocks: use crown-ibp or ibp"):
        crown_margins(model, x, y, 0.02, K, method="crown")


def test_at_eps_zero_the_bounds_are_the_margins():
    model = plain_net(0)
    x = torch.rand(3, 2, 8, 8)
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        exact = (spec_matrix(y, K) @ model(x).unsqueeze(-1)).squeeze(-1)
    for bound in (ibp_margins(model, x, y, 0.0, K), crown_margins(model, x, y, 0.0, K)):
        assert torch.allclose(bound, exact, atol=1e-4)


def test_pruned_weights_are_bounded_as_zeros():
    from torch.nn.utils import prune

    model = plain_net(3)
    prune.l1_unstructured(model.net[0], "weight", amount=0.5)
    x = torch.rand(4, 2, 8, 8)
    y = torch.arange(4) % K
    seen = sampled_margins(model, x, y, 0.03)
    assert (crown_margins(model, x, y, 0.03, K) <= seen + 1e-4).all()


def test_a_layer_the_bounds_cannot_handle_is_named():
    net = Normalized(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2)),
                     (0.5,), (0.5,)).eval()
    with pytest.raises(BoundError, match=r"net\.1 \(MaxPool2d\) is not a layer the bounds can handle"):
        check_supported(net)
    train_bn = Normalized(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), (0.5,), (0.5,))
    with pytest.raises(BoundError, match="training mode"):
        check_supported(train_bn)
