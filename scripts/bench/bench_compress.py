"""What each compression buys on this machine: parameters, size, FLOPs and latency, interleaved.

    python scripts/bench/bench_compress.py                  # ResNet-20 (cached baseline), CIFAR-10 copy
    python scripts/bench/bench_compress.py --small          # digits + small CNN (seconds; CI-sized)

Claim checked: removing channels (``prune=channel``) at 50 % makes ResNet-20 measurably faster on
this CPU; unstructured pruning at 50 % (``global_l1``) does not (same shapes, same dense kernels);
fake quantization changes neither; int8 (``quantize=int8``, x86 kernels) is ~4x smaller on disk and
its latency is measured, not assumed. Each variant is built exactly as a cell builds it (the compress
stages of robustsweep.steps.compress, no fine-tune), measured with robustsweep.steps.efficiency,
then its latency is timed again in ``--rounds`` interleaved rounds (dense, A, B, ..., dense, A, B,
...) so that a busy machine slows every variant alike; the table gives the median over rounds and
the ratio to the dense model. Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from robustsweep.config import compose, validate
from robustsweep.core.device import resolve_device
from robustsweep.steps import compress
from robustsweep.steps.data import load_dataset
from robustsweep.steps.efficiency import latency_ms, measure
from robustsweep.steps.train import get_baseline

log = logging.getLogger("bench_compress")

VARIANTS: list[tuple[str, list[str]]] = [
    ("dense", ["prune=none", "sparsity=0"]),
    ("global_l1 0.25", ["prune=global_l1", "sparsity=0.25"]),
    ("global_l1 0.50", ["prune=global_l1", "sparsity=0.5"]),
    ("global_l1 0.75", ["prune=global_l1", "sparsity=0.75"]),
    ("channel 0.25", ["prune=channel", "sparsity=0.25"]),
    ("channel 0.50", ["prune=channel", "sparsity=0.5"]),
    ("channel 0.75", ["prune=channel", "sparsity=0.75"]),
    ("fake 8b", ["prune=none", "sparsity=0", "quantize=fake", "quantize.bits=8"]),
    ("fake 6b", ["prune=none", "sparsity=0", "quantize=fake", "quantize.bits=6"]),
    ("fake 4b", ["prune=none", "sparsity=0", "quantize=fake", "quantize.bits=4"]),
    ("int8", ["prune=none", "sparsity=0", "quantize=int8"]),
    ("global_l1 0.50 + int8", ["prune=global_l1", "sparsity=0.5", "quantize=int8"]),
    ("channel 0.50 + int8", ["prune=channel", "sparsity=0.5", "quantize=int8"]),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="digits + small CNN (CI-sized)")
    ap.add_argument("--data-root", default="../shared/data/cifar10-jpg")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--out", default="outputs/bench/compress.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = resolve_device("cpu")
    base = (["data=digits", "model=small_cnn", "train=digits"] if args.small else
            ["experiment=cifar_small", "data=imagefolder", f"data.root={Path(args.data_root).resolve()}"])
    cfg0 = validate(compose([*base, "device=cpu", "defend=none"]))
    ds = load_dataset(cfg0.data, device)
    dense, info = get_baseline(cfg0, ds, device, Path(cfg0.paths.output_dir) / "cache" / "baselines")
    shape = tuple(ds.x_test.shape[1:])
    models: dict[str, torch.nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, overrides in VARIANTS:
        cfg = validate(compose([*base, "device=cpu", "defend=none", *overrides]))
        m = copy.deepcopy(dense)
        measured = compress.finalize(compress.compress(m, cfg, ds))
        m.eval()
        models[name] = m
        rows[name] = {**measured, **measure(m, shape, device)}
    gen = torch.Generator().manual_seed(0)
    x = {b: torch.rand((b, *shape), generator=gen) for b in (1, 64)}
    times: dict[str, dict[int, list[float]]] = {n: {1: [], 64: []} for n in models}
    for r in range(args.rounds):
        for n, m in models.items():
            for b in (1, 64):
                times[n][b].append(latency_ms(m, x[b], min_repeats=10, min_seconds=0.3))
        log.info("round %d/%d done", r + 1, args.rounds)
    ref = {b: statistics.median(times["dense"][b]) for b in (1, 64)}
    log.info("%-22s %10s %10s %8s %8s %10s %9s %9s %7s %7s", "variant", "params", "nonzero", "MB", "MB zip",
             "MFLOPs", "ms b1", "ms b64", "x b1", "x b64")
    for n, row in rows.items():
        for b in (1, 64):
            row[f"latency_ms_b{b}_interleaved"] = statistics.median(times[n][b])
            row[f"speedup_b{b}"] = ref[b] / row[f"latency_ms_b{b}_interleaved"]
        log.info("%-22s %10d %10d %8.3f %8.3f %10.2f %9.2f %9.2f %7.2f %7.2f", n, row["params_total"],
                 row["params_nonzero"], row["size_mb"], row["size_mb_zipped"], row["flops"] / 1e6,
                 row["latency_ms_b1_interleaved"], row["latency_ms_b64_interleaved"], row["speedup_b1"],
                 row["speedup_b64"])
    result = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                          "date": time.strftime("%Y-%m-%d %H:%M")},
              "workload": {"model": cfg0.model.name, "baseline_test_acc": info["test_acc"],
                           "rounds": args.rounds},
              "variants": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log.info("x = dense latency / variant latency (> 1: faster). wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
