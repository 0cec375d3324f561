"""What each attack costs, and what our AutoAttack call costs over the library's own.

    python scripts/bench/bench_attacks.py                       # ResNet-20, CIFAR-10 copy, 200 test images
    python scripts/bench/bench_attacks.py --small               # digits + small CNN (seconds; CI-sized)

Claim checked: ``attack=autoattack`` (torchattacks' four components, run by our Ensemble so each
image records which component broke it, every batch through the ball guard) costs at most 1.2x
``torchattacks.AutoAttack`` called directly on the same correctly classified images in the same
batches, and finds exactly the same robust accuracy.

For every attack config: seconds per 1000 evaluation images on this machine (the attack phase
of ``evaluate``: the correctly classified images, in batches, through the guard; the clean
predictions are given), and its robust accuracy. Prints a table and writes JSON (``--out``).
Timings are wall-clock on a busy or idle machine alike: run it alone for absolute figures; the
ours/library ratio is measured interleaved (ours, theirs, ours, theirs), so it is fair either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchattacks
from omegaconf import OmegaConf

from robustsweep.config import compose, validate
from robustsweep.core.device import resolve_device
from robustsweep.core.guards import frozen
from robustsweep.core.params import eps_label
from robustsweep.steps.attacks import build_attack, evaluate, predict
from robustsweep.steps.data import load_dataset, to_float
from robustsweep.steps.train import get_baseline

log = logging.getLogger("bench_attacks")

# (attack config, eps): the table, one row each
ATTACKS: list[tuple[dict[str, Any], float]] = [
    ({"name": "fgsm", "norm": "linf"}, 8 / 255),
    ({"name": "pgd", "norm": "linf", "steps": 10, "early_stop": True}, 8 / 255),
    ({"name": "pgd", "norm": "linf", "steps": 10, "early_stop": True}, 2 / 255),
    ({"name": "apgd", "norm": "linf", "loss": "ce", "steps": 100}, 2 / 255),
    ({"name": "square", "norm": "linf", "n_queries": 5000}, 2 / 255),
    ({"name": "autoattack", "norm": "linf", "version": "standard", "steps": 10}, 8 / 255),
    ({"name": "autoattack", "norm": "linf", "version": "standard", "steps": 10}, 2 / 255),
    ({"name": "pgd", "norm": "l2", "steps": 10, "early_stop": True}, 0.5),
    ({"name": "autoattack", "norm": "l2", "version": "standard", "steps": 10}, 0.5),
    ({"name": "cw", "norm": "l2", "c": 10, "kappa": 0, "steps": 100, "lr": 0.01}, 0.5),
]


def ours(model: torch.nn.Module, acfg: dict[str, Any], eps: float, ds: Any, clean: torch.Tensor,
         batch: int, seed: int) -> tuple[float, Any]:
    torch.manual_seed(seed)
    attack = build_attack(model, eps, OmegaConf.create(acfg), n_classes=len(ds.classes), seed=seed)
    t = time.perf_counter()
    res = evaluate(model, attack, ds.x_eval, ds.y_eval, eps, batch, desc=acfg["name"], clean_pred=clean)
    return time.perf_counter() - t, res


def library_autoattack(model: torch.nn.Module, norm: str, eps: float, ds: Any, clean: torch.Tensor,
                       batch: int, seed: int, n_classes: int) -> tuple[float, int]:
    """torchattacks.AutoAttack on the same correctly classified images, in the same batches."""
    lib = torchattacks.AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard",
                                  n_classes=n_classes, seed=seed)
    idx = (clean == ds.y_eval).nonzero().flatten()
    fooled = 0
    t = time.perf_counter()
    for i in range(0, len(idx), batch):
        j = idx[i:i + batch]
        x_adv = lib(to_float(ds.x_eval[j]), ds.y_eval[j])
        with torch.inference_mode():
            fooled += int((model(x_adv).argmax(1) != ds.y_eval[j]).sum())
    return time.perf_counter() - t, fooled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="digits + small CNN (CI-sized)")
    ap.add_argument("--data-root", default="../shared/data/cifar10-jpg")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--only", default="", help="comma list of attack names to run (default: all)")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved ours/library pairs for the ratio")
    ap.add_argument("--out", default="outputs/bench/attacks.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = resolve_device("cpu")
    base = (["data=digits", "model=small_cnn", "train=digits"] if args.small else
            ["experiment=cifar_small", "data=imagefolder", f"data.root={Path(args.data_root).resolve()}"])
    cfg = validate(compose([*base, f"data.n_eval={args.n_eval}", "device=cpu"]))
    ds = load_dataset(cfg.data, device)
    model, info = get_baseline(cfg, ds, device, Path(cfg.paths.output_dir) / "cache" / "baselines")
    model.eval()
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torchattacks": torchattacks.__version__,
                    "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                    "date": time.strftime("%Y-%m-%d %H:%M")},
        "workload": {"model": cfg.model.name, "baseline_test_acc": info["test_acc"], "n_eval": args.n_eval,
                     "batch_size": args.batch_size},
        "attacks": [], "autoattack_ratio": [],
    }
    only = set(filter(None, args.only.split(",")))
    with frozen(model):
        clean = predict(model, ds.x_eval, args.batch_size)
        n_correct = int((clean == ds.y_eval).sum())
        log.info("%s: %d of %d evaluation images correct", cfg.model.name, n_correct, args.n_eval)
        for acfg, eps in ATTACKS:
            if only and acfg["name"] not in only:
                continue
            s, res = ours(model, acfg, eps, ds, clean, args.batch_size, cfg.seed)
            row = {"attack": acfg["name"], "norm": acfg["norm"], "eps": eps, "seconds": s,
                   "s_per_1000": s * 1000 / args.n_eval, "robust_acc": res.robust_acc, "asr": res.asr}
            result["attacks"].append(row)
            log.info("%-11s %-4s eps %-9s %8.1f s per 1000 images   robust acc %.4f", acfg["name"],
                     acfg["norm"], eps_label(eps, acfg["norm"]), row["s_per_1000"], res.robust_acc)
        for acfg, eps in ATTACKS:
            if acfg["name"] != "autoattack" or (only and "autoattack" not in only):
                continue
            t_ours, t_lib = [], []
            for _ in range(args.repeat):
                s, res = ours(model, acfg, eps, ds, clean, args.batch_size, cfg.seed)
                t_ours.append(s)
                s_lib, fooled = library_autoattack(model, acfg["norm"], eps, ds, clean, args.batch_size,
                                                   cfg.seed, len(ds.classes))
                t_lib.append(s_lib)
                if fooled != res.n_fooled:
                    log.error("AutoAttack through robustsweep fooled %d images, the library %d", res.n_fooled,
                              fooled)
                    return 1
            ratio = min(t_ours) / min(t_lib)
            result["autoattack_ratio"].append({"norm": acfg["norm"], "eps": eps, "ours_s": min(t_ours),
                                               "library_s": min(t_lib), "ratio": ratio,
                                               "n_fooled": res.n_fooled, "robust_acc": res.robust_acc})
            log.info("AutoAttack %s eps %s: ours %.1f s, library %.1f s (best of %d): ratio %.3f (goal <= "
                     "1.2); robust acc %.4f both", acfg["norm"], eps_label(eps, acfg["norm"]), min(t_ours),
                     min(t_lib), args.repeat, ratio, res.robust_acc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
