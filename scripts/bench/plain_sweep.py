"""The plain way: what a careful notebook user does for each cell of a sparsity x eps x attack grid.

This is the reference the benchmark (scripts/bench/bench.py) times robustsweep against; it is not part
of the tool. Per cell, as a notebook would: read the evaluation images through a DataLoader
(decoding the JPEGs), rebuild the model from the baseline checkpoint, prune it with
torch.nn.utils.prune (masks left in place), attack every batch with torchattacks, Integrated
Gradients (captum) on a few images, and log params, metrics and the IG figure to MLflow. One
Python process runs the whole grid (a notebook kernel stays alive), so imports are paid once.

    python scripts/bench/plain_sweep.py --checkpoint outputs/cache/baselines/resnet_small-....safetensors \
        --data-root ../shared/data/cifar10-jpg --n-eval 500 --model resnet_small

Prints one line per cell and writes ``--out`` (JSON: wall time and the cells' numbers).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import torch
import torchattacks
from captum.attr import IntegratedGradients
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.nn.utils import prune
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm import tqdm

from robustsweep.core.params import parse_epsilon
from robustsweep.steps.models import build_model

log = logging.getLogger("plain_sweep")


def eval_subset(n_test: int, n_eval: int, seed: int = 0) -> list[int]:
    """The same seeded evaluation subset robustsweep uses (data.subset_seed=0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_test, generator=g)[:n_eval].sort().values.tolist()


def load_data(args: argparse.Namespace) -> tuple[torch.utils.data.Dataset, int, int, int]:
    """The evaluation images as a Dataset of float [0, 1] tensors: (dataset, channels, size, classes)."""
    if args.data == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        perm = np.random.default_rng(0).permutation(len(d.images))
        test = perm[:round(len(perm) * 0.2)]
        x = torch.tensor(np.rint(d.images[test] * (255.0 / 16.0)) / 255.0, dtype=torch.float32)[:, None]
        full = TensorDataset(x, torch.tensor(d.target[test]))
        n_test, c, size, k = len(test), 1, 8, 10
    else:
        from torchvision import datasets, transforms

        full = datasets.ImageFolder(str(Path(args.data_root) / "test"), transform=transforms.ToTensor())
        n_test, c, size, k = len(full), 3, 32, len(full.classes)
    n_eval = args.n_eval or n_test
    return Subset(full, eval_subset(n_test, n_eval)), c, size, k


def one_cell(args: argparse.Namespace, sparsity: float, eps: float, attack_name: str) -> dict:
    data, c, size, k = load_data(args)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False, num_workers=0)

    model = build_model(OmegaConf.create({"name": args.model}), in_channels=c, num_classes=k, image_size=size,
                        mean=(0.5,) * c, std=(0.25,) * c)  # real statistics come with the checkpoint
    model.load_state_dict(load_file(args.checkpoint))
    model.to(args.device)
    if sparsity > 0:
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                prune.l1_unstructured(m, "weight", amount=sparsity)
    model.eval()

    if attack_name == "fgsm":
        atk = torchattacks.FGSM(model, eps=eps)
    else:
        atk = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=True)
    n = correct = fooled = 0
    for x, y in loader:
        x, y = x.to(args.device), y.to(args.device)
        with torch.no_grad():
            clean = model(x).argmax(1)
        x_adv = atk(x, y)
        with torch.no_grad():
            adv = model(x_adv).argmax(1)
        ok = clean == y
        n += len(y)
        correct += int(ok.sum())
        fooled += int((ok & (adv != y)).sum())

    # Integrated Gradients on the first images, clean and adversarial
    x, y = next(iter(DataLoader(data, batch_size=args.ig_images)))
    x, y = x.to(args.device), y.to(args.device)
    x_adv = atk(x, y)
    ig = IntegratedGradients(model)
    maps = [ig.attribute(inp, target=y, n_steps=args.ig_steps, internal_batch_size=128)
            for inp in (x, x_adv)]
    fig, axes = plt.subplots(len(y), 2, figsize=(4, 2 * len(y)), squeeze=False)
    for r in range(len(y)):
        for j in range(2):
            axes[r, j].imshow(maps[j][r].sum(0).detach().cpu().numpy(), cmap="RdBu_r")
            axes[r, j].axis("off")

    metrics = {"clean_acc": correct / n, "asr": fooled / max(correct, 1),
               "robust_acc": (correct - fooled) / n, "n_eval": n}
    with mlflow.start_run(run_name=f"s{sparsity}-{attack_name}-eps{eps:.4f}"):
        mlflow.log_params({"sparsity": sparsity, "epsilon": eps, "attack": attack_name,
                           "model": args.model})
        mlflow.log_metrics(metrics)
        mlflow.log_figure(fig, "ig_maps.png")
    plt.close(fig)
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="baseline weights (.safetensors)")
    ap.add_argument("--model", default="resnet_small")
    ap.add_argument("--data", default="imagefolder", choices=["imagefolder", "digits"])
    ap.add_argument("--data-root", default="../shared/data/cifar10-jpg")
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--sparsity", default="0,0.25,0.5,0.75")
    ap.add_argument("--epsilon", default="1/255,2/255,4/255,8/255")
    ap.add_argument("--attack", default="fgsm,pgd")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ig-images", type=int, default=6)
    ap.add_argument("--ig-steps", type=int, default=64)
    ap.add_argument("--tracking-uri", default="sqlite:///outputs/bench/plain-mlflow.db")
    ap.add_argument("--out", default="outputs/bench/plain.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("plain")
    grid = [(float(s), parse_epsilon(e), a) for s in args.sparsity.split(",")
            for e in args.epsilon.split(",") for a in args.attack.split(",")]
    t0 = time.perf_counter()
    cells = []
    for s, e, a in tqdm(grid, desc="plain cells", unit="cell"):
        t = time.perf_counter()
        m = one_cell(args, s, e, a)
        cells.append({"sparsity": s, "epsilon": e, "attack": a, **m, "cell_s": time.perf_counter() - t})
        log.info("sparsity %.2f %s eps %.4f: clean %.3f asr %.3f (%.1f s)", s, a, e, m["clean_acc"],
                 m["asr"], cells[-1]["cell_s"])
    wall = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps({"wall_s": wall, "n_cells": len(cells), "cells": cells}, indent=1))
    log.info("%d cells in %.1f s", len(cells), wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
