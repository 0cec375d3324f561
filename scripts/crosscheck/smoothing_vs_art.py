"""Cross-check: our randomized-smoothing CERTIFY (robustsweep.steps.smoothing) against ART's
``PyTorchRandomizedSmoothing.certify`` on the same model, images, n0, n, sigma and alpha.

    pip install adversarial-robustness-toolbox==1.20.1 statsmodels   # not a dependency of robustsweep
    python scripts/crosscheck/smoothing_vs_art.py objective=noise data.n_eval=200 [--radius 0.25] [any override]

The overrides compose a cell's config (as ``python -m robustsweep``); the cell's baseline comes from the
cache under ``paths.output_dir`` (trained there if missing). Both algorithms draw their own noise (ART
from numpy's global generator, seeded here; ours from a torch generator), so they cannot agree image
for image where p_A is near the threshold. The yardstick is Monte-Carlo noise itself: ours run twice
with different seeds. Agreement of ours vs ART should match ours vs ours.

Prints, per pair: same prediction (abstain included), same certified-at-radius decision, mean
|radius difference|, and each run's certified accuracy at the radius. Without ART installed the
script says so and exits 0 (a research cross-check, not a test of robustsweep).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time

import numpy as np
import torch

from robustsweep.config import compose, validate
from robustsweep.core.paths import resolve_path
from robustsweep.core.progress import progress
from robustsweep.steps.attacks import as_pixels
from robustsweep.steps.data import load_dataset
from robustsweep.steps.smoothing import certify
from robustsweep.steps.train import get_baseline

log = logging.getLogger("smoothing_vs_art")


def ours(model: torch.nn.Module, x: torch.Tensor, node, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    out = [certify(model, xi, float(node.sigma), int(node.n0), int(node.n), float(node.alpha), k,
                   int(node.batch_size), gen) for xi in progress(x, desc=f"ours seed {seed}", unit="img")]
    return np.array([c.pred for c in out]), np.array([c.radius for c in out])


def art(model: torch.nn.Module, x: torch.Tensor, node, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing
    except ImportError:
        sys.exit("ART is not installed: pip install adversarial-robustness-toolbox==1.20.1 statsmodels")
    np.random.seed(seed)
    rs = PyTorchRandomizedSmoothing(model=model, loss=torch.nn.CrossEntropyLoss(),
                                    input_shape=tuple(x.shape[1:]), nb_classes=k, device_type="cpu",
                                    sample_size=int(node.n0),
                                    scale=float(node.sigma), alpha=float(node.alpha))
    preds, radii = [], []
    for xi in progress(x, desc="ART", unit="img"):
        p, r = rs.certify(xi.unsqueeze(0).numpy(), n=int(node.n), batch_size=int(node.batch_size))
        preds.append(int(p[0]))
        radii.append(float(r[0]))
    return np.array(preds), np.array(radii)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--radius", type=float, default=0.25, help="L2 radius for the certified-or-not decision")
    ap.add_argument("overrides", nargs="*", help="config overrides, as for python -m robustsweep")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if importlib.util.find_spec("art") is None:
        log.warning("ART is not installed (pip install adversarial-robustness-toolbox==1.20.1 statsmodels): "
                    "nothing to compare against; skipped")
        return 0
    cfg = validate(compose(["certify=smoothing", *args.overrides]))
    ds = load_dataset(cfg.data)
    cache = resolve_path(cfg.paths.output_dir) / "cache" / "baselines"
    model, _ = get_baseline(cfg, ds, torch.device("cpu"), cache)
    model.eval()
    x, y = as_pixels(ds.x_eval).cpu(), ds.y_eval.cpu().numpy()
    k, node = len(ds.classes), cfg.certify
    runs, seconds = {}, {}
    for name, fn, seed in (("ours#0", ours, 0), ("ours#1", ours, 1), ("ART", art, 0)):
        t0 = time.perf_counter()
        runs[name] = fn(model, x, node, k, seed)
        seconds[name] = time.perf_counter() - t0
    log.info("%d images, sigma %s, n0 %s, n %s, alpha %s; certified at r = %g", len(y), node.sigma, node.n0,
             node.n, node.alpha, args.radius)
    for name, (pred, rad) in runs.items():
        cert = ((pred == y) & (rad >= args.radius)).mean()
        log.info("  %-7s certified acc %.3f, abstain %.3f, %.1f s per 1000 images", name, cert,
                 (pred == -1).mean(), 1000 * seconds[name] / len(y))
    for a, b in (("ours#0", "ours#1"), ("ours#0", "ART"), ("ours#1", "ART")):
        (pa, ra), (pb, rb) = runs[a], runs[b]
        ca, cb = (pa == y) & (ra >= args.radius), (pb == y) & (rb >= args.radius)
        log.info("  %s vs %s: same prediction %.3f, same certified decision %.3f, mean |radius diff| %.4f",
                 a, b, (pa == pb).mean(), (ca == cb).mean(), np.abs(ra - rb).mean())
    return 0


if __name__ == "__main__":
    sys.exit(main())
