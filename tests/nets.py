"""A network robustsweep does not know, for ``model._target_`` tests (as a user's package would)."""

from __future__ import annotations

from torch import nn


def tiny_mlp(num_classes: int, image_size: int, hidden: int = 32) -> nn.Module:
    """Flatten -> Linear -> ReLU -> Linear. Takes no ``in_channels``: the builder passes only the
    dimensions a callable accepts. Grey images only (1 channel)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def pooled_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """A CNN with max-pooling: a layer the certified bounds do not handle."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 16, num_classes))


def not_a_network(num_classes: int) -> str:
    return f"{num_classes} classes"


NOT_CALLABLE = 3


def prune_first_half_rows(targets: list, amount: float) -> None:
    """A user's pruning rule (``prune._target_``): zero the first ``amount`` share of each weight's
    output rows, through torch's pruning API like the built-in methods."""
    import torch
    from torch.nn.utils import prune

    for _, m in targets:
        mask = torch.ones_like(m.weight)
        mask[: int(amount * m.weight.shape[0])] = 0
        prune.custom_from_mask(m, "weight", mask)


def small_digits(cfg) -> tuple:
    """A user's dataset loader (``data._target_``): 600 of scikit-learn's digits, uint8 NCHW."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images[:600] * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target[:600].astype(np.int64)
    return x[:480], y[:480], x[480:], y[480:], [str(i) for i in range(10)]
