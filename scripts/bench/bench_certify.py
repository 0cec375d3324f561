"""What a certificate costs on this machine: seconds per 1000 images for IBP, CROWN-IBP, full CROWN and
randomized smoothing, on the networks of the README's tables.

    python scripts/bench/bench_certify.py [--out bench_certify.json]            # both networks
    python scripts/bench/bench_certify.py --small                               # digits only (seconds)

Claim checked (README "Certified robustness"): IBP costs about one forward pass, CROWN-IBP a backward
pass per specification, full CROWN a backward pass per hidden neuron (the slow one), smoothing n + n0
forward passes per image. Each method runs the functions the ``certify`` evaluator calls
(robustsweep.steps.bounds, robustsweep.steps.smoothing) on the first evaluation images of each
network's cached baseline (trained on first use; how many per method: ``NETWORKS``), and is timed
once after a warm-up; the time is scaled to 1000 images. Batches: IBP all images at once, CROWN-IBP
64 per pass (as the evaluator), full CROWN 8 (the evaluator takes as many as its memory estimate
allows, up to 256), smoothing 500 noisy copies per pass. Run it on an idle machine: the
figures are wall-clock.
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

import torch

from robustsweep.config import compose, validate
from robustsweep.core.paths import resolve_path
from robustsweep.steps.attacks import as_pixels
from robustsweep.steps.bounds import crown_margins, ibp_margins
from robustsweep.steps.data import load_dataset
from robustsweep.steps.smoothing import certify
from robustsweep.steps.train import get_baseline

log = logging.getLogger("bench_certify")

# (label, overrides of the baseline, eps, methods with the number of images each is timed on)
NETWORKS = {
    "digits small CNN (objective=ibp)": (["objective=ibp", "objective.eps=0.1", "data.n_eval=200"], 0.05,
                                         {"ibp": 200, "crown-ibp": 200, "crown": 20, "smoothing": 50}),
    "CIFAR-10 ResNet-20 (objective=noise)": (
        ["experiment=cifar_small", "data=imagefolder", "data.root=../shared/data/cifar10-jpg",
         "objective=noise", "objective.sigma=0.25", "data.n_eval=200"], 2 / 255,
        {"ibp": 200, "crown-ibp": 50, "smoothing": 10}),
}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(label: str, overrides: list[str], eps: float, methods: dict[str, int], output_dir: str) -> list[dict]:
    cfg = validate(compose([*overrides, f"paths.output_dir={output_dir}"]))
    ds = load_dataset(cfg.data)
    model, info = get_baseline(cfg, ds, torch.device("cpu"), resolve_path(output_dir) / "cache" / "baselines")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x_all, y_all, k = as_pixels(ds.x_eval).cpu(), ds.y_eval.cpu(), len(ds.classes)
    with torch.no_grad():
        model(x_all[:8])  # warm-up: first-call allocations are not the method's cost
    rows = []
    for method, n in methods.items():
        x, y = x_all[:n], y_all[:n]
        if method == "ibp":
            def run(x=x, y=y):
                with torch.no_grad():
                    ibp_margins(model, x, y, eps, k)
        elif method in ("crown", "crown-ibp"):
            batch = 64 if method == "crown-ibp" else 8

            def run(x=x, y=y, method=method, batch=batch):
                for i in range(0, len(y), batch):
                    crown_margins(model, x[i:i + batch], y[i:i + batch], eps, k, method=method, chunk=512)
        else:
            gen = torch.Generator().manual_seed(0)

            def run(x=x, gen=gen):
                for xi in x:
                    certify(model, xi, 0.25, 100, 1000, 0.001, k, 500, gen)
        seconds = _time(run)
        per_1000 = 1000 * seconds / n
        log.info("%-40s %-10s %4d images: %8.2f s  -> %9.1f s per 1000 images", label, method, n, seconds,
                 per_1000)
        rows.append({"network": label, "method": method, "n_images": n, "seconds": seconds,
                     "s_per_1000": per_1000, "eps": eps, "baseline_test_acc": info.get("test_acc")})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="digits only")
    ap.add_argument("--output-dir", default="outputs", help="paths.output_dir (the baseline cache)")
    ap.add_argument("--out", type=Path, default=Path("bench_certify.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for label, (overrides, eps, methods) in NETWORKS.items():
        if args.small and "CIFAR" in label:
            continue
        rows += bench(label, overrides, eps, methods, args.output_dir)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    log.info("| network | method | s per 1000 images |\n|---|---|---|\n%s",
             "\n".join(f"| {r['network']} | {r['method']} | {r['s_per_1000']:.1f} |" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
