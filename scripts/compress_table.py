"""The README's compression table: what each compression buys and what it costs in robustness.

    python scripts/compress_table.py --experiment compress_cifar [--tracking-uri sqlite:///outputs/mlflow.db]

Reads the FINISHED cell runs of the experiment (the newest per cell id), groups them by
compression (prune method and sparsity, quantization, fine-tune epochs) and prints one Markdown row
each: parameters, zipped size, MFLOPs per image, clean accuracy, the ASR of every attack@eps in the
experiment (an int8 cell also on its twin), the int8 twin's agreement, and the `suspect` tags.
``--latency`` adds the latency each cell measured at batch 1 and 64: cells that ran beside other
jobs measured a busy machine, so the README's latency comes from scripts/bench_compress.py, which
times every variant interleaved.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from robustsweep.core.params import eps_label
from robustsweep.tracking.sweep import newest_cell_runs

log = logging.getLogger("compress_table")


def _f(v: float, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def newest_runs(client: MlflowClient, experiment: str) -> list[Any]:
    """The experiment's FINISHED cell runs, the newest per cell id."""
    runs = newest_cell_runs(client, experiment)
    if runs is None:
        raise SystemExit(f"no experiment {experiment!r}")
    return runs


def rows(runs: list[Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    out: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(lambda: {"asr": {}, "suspect": set()})
    for r in runs:
        p, m = r.data.params, r.data.metrics
        method = p.get("prune.method", "none")
        sparsity = float(p.get("sparsity", 0)) if method != "none" else 0.0
        quant = p.get("quantize.name") or "none"
        bits = p.get("quantize.bits", "") if quant == "fake" else ""
        epochs = int(p.get("defend.epochs", 0) or 0) if p.get("defend.name", "none") != "none" else 0
        if sparsity == 0:
            method = "none"
        key = (method, sparsity, quant, bits, epochs)
        row = out[key]
        for k in ("params_total", "params_nonzero", "size_mb_zipped", "flops", "latency_ms_b1",
                  "latency_ms_b64", "clean_acc", "quant_agreement"):
            row.setdefault(k, m.get(k, math.nan))
        label = f"{p['attack.name']} {eps_label(float(p['epsilon']), p.get('attack.norm') or 'linf')}"
        row["asr"].setdefault(label, m.get("asr", math.nan))
        if quant == "int8":
            row["asr"].setdefault(label + " (twin)", m.get("asr_twin", math.nan))
        row["suspect"] |= set(filter(None, r.data.tags.get("suspect", "").split(",")))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    ap.add_argument("--experiment", default="compress_cifar")
    ap.add_argument("--latency", action="store_true", help="add the latency columns the cells measured")
    ap.add_argument("--figure", default="", help="also write the Pareto figure of every cell here (PNG)")
    ap.add_argument("--latency-json", default="",
                    help="scripts/bench_compress.py's JSON: the figure's latency from its interleaved timings "
                         "(matched by compression; a fine-tune does not change the architecture)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = newest_runs(MlflowClient(args.tracking_uri), args.experiment)
    table = rows(runs)
    attacks = sorted({a for r in table.values() for a in r["asr"]})
    lat = ["ms b1", "ms b64"] if args.latency else []
    head = ["compression", "fine-tune", "params", "nonzero", "MB zipped", "MFLOPs", *lat, "clean",
            *[f"ASR {a}" for a in attacks], "twin agrees", "suspect"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def order(k: tuple[Any, ...]) -> tuple[Any, ...]:  # dense first; a method's float rows before its quantized
        method, sparsity, quant, bits, epochs = k
        return (method != "none", method, sparsity, epochs, quant != "none", quant, -int(bits or 0))

    for (method, sparsity, quant, bits, epochs), r in sorted(table.items(), key=lambda kv: order(kv[0])):
        name = " + ".join(filter(None, [f"{method} {sparsity:.2f}" if method != "none" else "",
                                        f"{quant} {bits}b" if bits else (quant if quant != "none" else "")]))
        cols = [name or "dense", f"{epochs} ep" if epochs else "–", _f(r["params_total"], ".0f"),
                _f(r["params_nonzero"], ".0f"), _f(r["size_mb_zipped"], ".3f"), _f(r["flops"] / 1e6, ".1f"),
                *([_f(r["latency_ms_b1"], ".2f"), _f(r["latency_ms_b64"], ".1f")] if args.latency else []),
                _f(r["clean_acc"], ".3f"),
                *[_f(r["asr"].get(a, math.nan), ".3f") for a in attacks], _f(r["quant_agreement"], ".3f"),
                ", ".join(sorted(r["suspect"])) or "–"]
        lines.append("| " + " | ".join(cols) + " |")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.figure:
        figure(runs, args.figure, args.latency_json)
    return 0


def figure(runs: list[Any], path: str, latency_json: str) -> None:
    """summary.pareto over ``runs`` (the experiment's newest run per cell id)."""
    import json

    import matplotlib.pyplot as plt

    from robustsweep.summary import KEY_PARAMS, compression_label, pareto

    bench = json.loads(Path(latency_json).read_text())["variants"] if latency_json else {}
    cells = []
    for r in runs:
        c: dict[str, Any] = {k: r.data.params.get(k, "") for k in KEY_PARAMS}
        c["sparsity"], c["epsilon"] = float(c["sparsity"] or 0), float(c["epsilon"])
        c.update(r.data.metrics, suspect=r.data.tags.get("suspect", ""))
        arch = compression_label({**c, "defend.name": "none"})  # latency depends on the architecture only
        if arch in bench:
            c["latency_ms_b64"] = bench[arch]["latency_ms_b64_interleaved"]
        elif bench:
            log.warning("%s: not in %s, its own (possibly busy) latency is plotted", arch, latency_json)
        cells.append(c)
    fig = pareto(cells)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s (%d cells)", path, len(cells))


if __name__ == "__main__":
    sys.exit(main())
