"""A network robustsweep does not know, for ``model._target_`` tests (as a user's package would)."""

from __future__ import annotations

from torch import nn


def tiny_mlp(num_classes: int, image_size: int, hidden: int = 32) -> nn.Module:
    """Flatten -> Linear -> ReLU -> Linear. Takes no ``in_channels``: the builder passes only the
    dimensions a callable accepts. Grey images only (1 channel)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def not_a_network(num_classes: int) -> str:
    return f"{num_classes} classes"


NOT_CALLABLE = 3
