"""``attack=autoattack`` against the reference implementation of AutoAttack, on the same model and images.

    pip install pyautoattack    # the authors' code (fra31/auto-attack) on PyPI; NOT a robustsweep dependency
    python scripts/crosscheck/crosscheck_autoattack.py --small            # digits + small CNN, 200 images
    python scripts/crosscheck/crosscheck_autoattack.py --data-root ../shared/data/cifar10-jpg --n-eval 100 \
        --override train.epochs=4                                       # ResNet-20, 100 CIFAR images
    python scripts/crosscheck/crosscheck_autoattack.py ... --eps 2/255             # where some images survive

Claim checked: robustsweep's ``attack=autoattack`` (the standard version at the reference's 100
iterations: APGD-CE, APGD-T and FAB-T with 9 targets, Square at 5000 queries, from torchattacks'
components) leaves the same robust accuracy as ``pyautoattack.AutoAttack(version="standard")``
(Croce & Hein 2020) within 1 image, and what it costs per 1000 images beside
``attack=autoattack_fast`` (10 iterations). Both are seeded; the images are the cell's evaluation
subset. Without ``pyautoattack`` installed the script says so and exits 0 (a research cross-check,
not part of the test suite). Prints the figures and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from robustsweep.config import compose, validate
from robustsweep.core.device import resolve_device
from robustsweep.core.guards import frozen
from robustsweep.core.params import parse_epsilon
from robustsweep.core.paths import resolve_path
from robustsweep.steps.attacks import build_attack, evaluate, predict
from robustsweep.steps.data import load_dataset, to_float
from robustsweep.steps.train import get_baseline

log = logging.getLogger("crosscheck_autoattack")


def ours(model: torch.nn.Module, steps: int, eps: float, ds: Any, clean: torch.Tensor, batch: int,
         seed: int) -> tuple[float, int]:
    """Seconds and images fooled by robustsweep's AutoAttack at ``steps`` iterations."""
    acfg = OmegaConf.create({"name": "autoattack", "version": "standard", "norm": "linf", "steps": steps})
    attack = build_attack(model, eps, acfg, n_classes=len(ds.classes), seed=seed)
    t = time.perf_counter()
    res = evaluate(model, attack, ds.x_eval, ds.y_eval, eps, batch, desc=f"autoattack-{steps}",
                   clean_pred=clean)
    return time.perf_counter() - t, res.n_fooled


def reference(model: torch.nn.Module, eps: float, ds: Any, clean: torch.Tensor, batch: int,
              seed: int) -> tuple[float, int]:
    """Seconds and images fooled by the authors' AutoAttack on the correctly classified images."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device="cpu")
    idx = (clean == ds.y_eval).nonzero().flatten()
    x, y = to_float(ds.x_eval[idx]), ds.y_eval[idx]
    t = time.perf_counter()
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch)
    seconds = time.perf_counter() - t
    assert (x_adv - x).abs().max() <= eps + 1e-6
    with torch.inference_mode():
        fooled = int((model(x_adv).argmax(1) != y).sum())
    return seconds, fooled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="digits + small CNN")
    ap.add_argument("--data-root", default="../shared/data/cifar10-jpg")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--eps", default="", help="e.g. 2/255 or 0.1 (default: 8/255 on CIFAR, 0.1 on digits)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--override", action="append", default=[], help="more config overrides (repeatable)")
    ap.add_argument("--out", default="outputs/bench/crosscheck_autoattack.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if importlib.util.find_spec("pyautoattack") is None:
        log.warning("pyautoattack is not installed (pip install pyautoattack): nothing to compare against; "
                    "skipped")
        return 0
    device = resolve_device("cpu")
    base = (["data=digits", "model=small_cnn", "train=digits"] if args.small else
            ["experiment=cifar_small", "data=imagefolder", f"data.root={Path(args.data_root).resolve()}"])
    cfg = validate(compose([*base, f"data.n_eval={args.n_eval}", "device=cpu", *args.override]))
    eps = parse_epsilon(args.eps) if args.eps else (0.1 if args.small else 8 / 255)
    ds = load_dataset(cfg.data, device)
    model, info = get_baseline(cfg, ds, device, resolve_path(cfg.paths.output_dir) / "cache" / "baselines")
    model.eval()
    with frozen(model):
        clean = predict(model, ds.x_eval, args.batch_size)
        n_correct = int((clean == ds.y_eval).sum())
        s_ref, f_ref = reference(model, eps, ds, clean, args.batch_size, int(cfg.seed))
        s_100, f_100 = ours(model, 100, eps, ds, clean, args.batch_size, int(cfg.seed))
        s_10, f_10 = ours(model, 10, eps, ds, clean, args.batch_size, int(cfg.seed))
    n = args.n_eval
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(),
              "torch": torch.__version__,
              "model": cfg.model.name, "data": cfg.data.name, "baseline_test_acc": info["test_acc"], "eps": eps,
              "n_eval": n, "n_correct": n_correct,
              "robust_acc": {"reference": (n_correct - f_ref) / n, "ours_100": (n_correct - f_100) / n,
                             "ours_10": (n_correct - f_10) / n},
              "images_apart": abs(f_100 - f_ref),
              "s_per_1000": {"reference": s_ref * 1000 / n, "ours_100": s_100 * 1000 / n,
                             "ours_10": s_10 * 1000 / n}}
    log.info("%s on %s, %d images (%d correct), eps %.4g", cfg.model.name, cfg.data.name, n, n_correct, eps)
    for k in ("reference", "ours_100", "ours_10"):
        log.info("  %-10s robust acc %.4f   %8.1f s per 1000 images", k, result["robust_acc"][k],
                 result["s_per_1000"][k])
    log.info("ours (100 iterations) vs the reference: %d image(s) apart (claim: <= 1)", result["images_apart"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log.info("wrote %s", out)
    return 0 if result["images_apart"] <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
