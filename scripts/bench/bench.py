"""robustsweep's benchmark: how close a sweep runs to the hardware's limit, measured in one run.

    python scripts/bench/bench.py                 # CPU: ResNet-20 on ../shared/data/cifar10-jpg, 500 images
    python scripts/bench/bench.py --device cuda   # CUDA: ResNet-18, the full 10k test set
    python scripts/bench/bench.py --small         # CI: digits + small CNN, 4 cells, ~1.5 min; checks it runs

Prints a table and writes ``outputs/bench/bench.json``. What it measures, on the current device:

1. Ceiling: plain PyTorch images/s of the model, forward under ``inference_mode`` and forward +
   input-gradient with parameters frozen, each at its best batch size. No attack can beat these.
2. Ours: robustsweep's clean evaluation, FGSM and PGD-10 (``attacks.evaluate``) on the same model
   and images, each as a ratio to the ceiling-equivalent work (the same number of forward and
   forward+gradient image passes at ceiling speed). Then the work-saving paths: FGSM with a reused
   direction, PGD with early stop, bf16 autocast (CUDA; its ASR gap to fp32 on the same images).
3. The sweep: ``python -m robustsweep -m`` on 4 sparsity x 4 eps x {FGSM, PGD-10} against
   scripts/bench/plain_sweep.py (a careful notebook user's loop) on the same grid, model and images;
   and the fixed per-job overhead (Hydra + MLflow, no compute): the slope of wall time over jobs
   that compute nothing.
4. Growth: sweep wall time against n_eval and against the number of cells, with the line fits.
5. Peak memory: RSS of every process (and CUDA memory of the in-process part).

Measured on a 2-core CPU box (no GPU) the full CPU run takes about 16 minutes (4 of them the plain
way; ``--skip plain,lean,growth`` takes ~4); README "Performance" has its table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from robustsweep.config import compose, validate
from robustsweep.core.device import attack_batch_size, resolve_device
from robustsweep.steps.attacks import FGSM, PGD, evaluate, predict
from robustsweep.steps.data import load_dataset, to_float
from robustsweep.steps.models import with_amp
from robustsweep.steps.train import get_baseline
from robustsweep.tracking import reuse

log = logging.getLogger("bench")
GRID = {"sparsity": "0,0.25,0.5,0.75", "epsilon": "1/255,2/255,4/255,8/255", "attack": "fgsm,pgd"}


# ------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def rate(fn: Callable[[], Any], n_per_call: int, device: torch.device, seconds: float) -> float:
    """Images/s of ``fn`` run repeatedly for about ``seconds`` (after one warm-up call)."""
    fn()
    sync(device)
    t, n = time.perf_counter(), 0
    while True:
        fn()
        n += n_per_call
        sync(device)
        if time.perf_counter() - t >= seconds:
            return n / (time.perf_counter() - t)


def ceiling(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batches: list[int],
            device: torch.device, seconds: float) -> dict[str, Any]:
    """Plain PyTorch throughput: forward (inference_mode) and forward + input-gradient, per batch."""
    for p in model.parameters():
        p.requires_grad_(False)
    fwd, grad = {}, {}
    for bs in batches:
        xb, yb = x[:bs], y[:bs]
        if len(xb) < bs:
            break

        def forward(xb: torch.Tensor = xb) -> None:
            with torch.inference_mode():
                model(xb)

        def forward_grad(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> None:
            xi = xb.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xi), yb), xi)

        # best of two: a shared machine's noise only ever slows a measurement down
        fwd[bs] = max(rate(forward, bs, device, seconds) for _ in range(2))
        grad[bs] = max(rate(forward_grad, bs, device, seconds) for _ in range(2))
        log.info("ceiling batch %5d: forward %8.0f img/s, forward+input-grad %8.0f img/s",
                 bs, fwd[bs], grad[bs])
    best_f, best_g = max(fwd, key=fwd.get), max(grad, key=grad.get)
    return {"forward_img_s": fwd[best_f], "forward_batch": best_f, "grad_img_s": grad[best_g],
            "grad_batch": best_g, "by_batch": {"forward": fwd, "grad": grad}}


# --------------------------------------------------------------------------------- the engine
def engine(model: torch.nn.Module, ds: Any, cfg: Any, device: torch.device, ceil: dict[str, Any],
           repeat: int, amp: bool) -> dict[str, Any]:
    """robustsweep's evaluation paths against the ceiling-equivalent of the same work."""
    x, y, bs = ds.x_eval, ds.y_eval, int(cfg.attack.batch_size)  # the sweep's attack.batch_size
    eps = 8 / 255
    n = len(y)
    fwd_s, grad_s = 1 / ceil["forward_img_s"], 1 / ceil["grad_img_s"]  # seconds per image pass
    rows: dict[str, Any] = {}

    def row(name: str, seconds: float, ceil_s: float, res: Any = None, **extra: Any) -> None:
        rows[name] = {"s": seconds, "img_s": n / seconds, "ceiling_s": ceil_s,
                      "ratio": ceil_s / seconds, **extra}
        if res is not None:
            rows[name].update(asr=res.asr, n_correct=res.n_correct, n_grad=res.n_grad)
        log.info("%-28s %7.2f s  %8.0f img/s  ratio to ceiling %.3f", name, seconds, n / seconds,
                 ceil_s / seconds)

    def fgsm(m: torch.nn.Module, e: float = eps, **reuse_kw: Any) -> Any:
        return evaluate(m, FGSM(m, e), x, y, e, bs, desc="fgsm", **reuse_kw)

    def pgd(m: torch.nn.Module, early: bool = False) -> Any:
        torch.manual_seed(0)  # the same random start in every run
        return evaluate(m, PGD(m, eps, 2.5 * eps / 10, 10, early_stop=early), x, y, eps, bs, desc="pgd")

    s, pred = timed(lambda: predict(model, x, bs), device, repeat)
    row("clean", s, n * fwd_s)
    n_c = int((pred == y).sum())
    # Ceiling-equivalent work: clean forward of all n, then n_c attacked (k forward+grad, 1 forward).
    ceil_fgsm = n * fwd_s + n_c * (grad_s + fwd_s)
    ceil_pgd = n * fwd_s + n_c * (10 * grad_s + fwd_s)
    s, fg = timed(lambda: fgsm(model), device, repeat)
    row("fgsm", s, ceil_fgsm, fg)
    s, pg = timed(lambda: pgd(model), device, repeat)
    row("pgd10", s, ceil_pgd, pg)
    # The work-saving paths (ratio > 1 = less work than the full attack, at the same answer).
    s, fr = timed(lambda: fgsm(model, 4 / 255, clean_pred=pred, direction=fg.direction), device, repeat)
    row("fgsm, reused direction+clean", s, ceil_fgsm, fr)
    s, pe = timed(lambda: pgd(model, early=True), device, repeat)
    row("pgd10, early stop", s, ceil_pgd, pe, asr_last_iterate=pg.asr)
    if amp:
        fast = with_amp(model, "bf16")
        for name, ceil_s, fp32, fn in (("fgsm bf16", ceil_fgsm, fg, lambda: fgsm(fast)),
                                       ("pgd10 bf16", ceil_pgd, pg, lambda: pgd(fast))):
            s, r = timed(fn, device, repeat)
            row(name, s, ceil_s, r, asr_fp32=fp32.asr, asr_diff_points=100 * (r.asr - fp32.asr))
    return rows


# ------------------------------------------------------------------------------- subprocesses
def run_proc(cmd: list[str], log_path: Path, timeout: float) -> dict[str, float]:
    """Run ``cmd``; its wall time and peak RSS (MB, from wait4: this child alone). Output to a log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with log_path.open("w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
        deadline = t + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                raise TimeoutError(f"{' '.join(cmd[:6])} ... ran past {timeout:.0f} s; see {log_path}")
            time.sleep(0.05)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {code}; log {log_path}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024}


def sweep_cmd(base: list[str], bench_dir: Path, name: str, **grid: str) -> list[str]:
    over = [f"{k}={v}" for k, v in grid.items()]
    return [sys.executable, "-m", "robustsweep", "-m", *base, *over, "tracking.resume=false",
            f"tracking.uri=sqlite:///{bench_dir / 'mlflow.db'}",
            f"hydra.sweep.dir={bench_dir / 'multiruns' / name}"]


def n_cells(grid: dict[str, str]) -> int:
    return int(np.prod([len(v.split(",")) for v in grid.values()]))


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return {"slope": float(slope), "intercept": float(intercept)}


# --------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--model", default=None, help="default: resnet_small on CPU, resnet18 on CUDA")
    ap.add_argument("--data-root", default="../shared/data/cifar10-jpg")
    ap.add_argument("--n-eval", type=int, default=None, help="default: 500 on CPU, 10000 on CUDA")
    ap.add_argument("--small", action="store_true", help="CI mode: digits + small CNN, tiny grid")
    ap.add_argument("--skip", default="", help="comma list of: plain, lean, growth, overhead, sweep")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="attack.batch_size for ours and the plain way; default: ours' default (auto)")
    ap.add_argument("--amp-on-cpu", action="store_true", help="also time bf16 autocast on CPU")
    ap.add_argument("--experiment", default="cifar_small", help="the overlay the CIFAR workload starts from")
    ap.add_argument("--override", action="append", default=[],
                    help="an extra Hydra override for every job (repeatable), e.g. model.width=32")
    ap.add_argument("--out", default="outputs/bench/bench.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    skip = set(filter(None, args.skip.split(",")))
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    bench_dir = out.parent
    bench_dir.mkdir(parents=True, exist_ok=True)
    t_bench = time.perf_counter()

    # ---- the workload
    if args.small:
        skip.add("lean")
        base = ["data=digits", "model=small_cnn", "train=digits"]
        n_eval = args.n_eval or 200
        # every section at its least: 4 cells (dense and pruned, FGSM and PGD), 2 points per line fit
        grid = {"sparsity": "0,0.5", "epsilon": "8/255", "attack": "fgsm,pgd"}
        batches, seconds, repeat = [64, 128], 0.2, 1
        growth_n, growth_cells = [100, 200], [("sparsity", "0")]  # + the main grid (n_eval 200): 2 points each
        overhead_jobs = [1, 2]
    else:
        model_name = args.model or ("resnet18" if cuda else "resnet_small")
        base = [f"experiment={args.experiment}", "data=imagefolder",  # our JPEG copy (quality 75)
                f"data.root={Path(args.data_root).resolve()}", f"model={model_name}"]
        n_eval = args.n_eval or (10000 if cuda else 500)
        grid = dict(GRID)
        batches = [256, 512, 1024, 2048, 4096] if cuda else [64, 128, 256, 512]
        seconds, repeat = (1.0, 3) if cuda else (2.0, 3)
        growth_n = [n_eval // 2, n_eval, 2 * n_eval] if not cuda else [2500, 5000, 10000]
        growth_cells = [("sparsity", "0,0.25"), ("sparsity", "0,0.25,0.5")]
        overhead_jobs = [1, 5, 10]
    base = [*base, f"data.n_eval={n_eval}", f"device={device.type}", *args.override]
    cfg = validate(compose(base))
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(), "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if cuda else None,
                    "threads": torch.get_num_threads()},
        "workload": {"model": cfg.model.name, "data": cfg.data.name, "n_eval": n_eval, "small": args.small,
                     "grid": grid, "overrides": base},
    }

    # ---- 1+2: ceiling and engine, in this process
    ds = load_dataset(cfg.data, device)
    t = time.perf_counter()
    model, info = get_baseline(cfg, ds, device, Path(cfg.paths.output_dir) / "cache" / "baselines")
    result["baseline"] = {"source": info["source"], "test_acc": info["test_acc"],
                          "train_s": info.get("train_s"), "load_s": time.perf_counter() - t,
                          "path": info.get("path")}
    log.info("baseline %s (%s): clean test acc %.4f", cfg.model.name, info["source"], info["test_acc"])
    model.eval()
    xf = to_float(ds.x_eval[:max(batches)]).to(device)
    yf = ds.y_eval[:max(batches)]
    result["ceiling"] = ceiling(model, xf, yf, [b for b in batches if b <= len(ds.y_eval)], device, seconds)
    # Ours runs at its default attack.batch_size (auto: 128 on CPU, 1024 on CUDA) or --batch-size;
    # the plain way gets the same number.
    batch = args.batch_size or attack_batch_size(cfg, device)
    cfg.attack.batch_size = batch
    if args.batch_size:
        base.append(f"attack.batch_size={batch}")
    result["workload"]["attack_batch_size"] = batch
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result["engine"] = engine(model, ds, cfg, device, result["ceiling"], repeat, amp=cuda or args.amp_on_cpu)
    result["memory"] = {"bench_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda:
        result["memory"]["bench_cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    reuse.clear()

    # ---- 3: our sweep vs the plain way on the same grid
    if "sweep" not in skip:
        ours = run_proc(sweep_cmd(base, bench_dir, "grid", **grid), bench_dir / "logs" / "ours.log", 3600)
        ours["n_cells"] = n_cells(grid)
        result["sweep"] = {"ours": ours}
        log.info("ours: %d cells in %.1f s (peak RSS %.0f MB)", ours["n_cells"], ours["wall_s"],
                 ours["peak_rss_mb"])
        if "lean" not in skip:  # without the checks the plain way does not do
            lean = run_proc(sweep_cmd([*base, "checks.sanity=false", "attribution.max_n_steps=null"],
                                      bench_dir, "grid-lean", **grid), bench_dir / "logs" / "lean.log", 3600)
            lean["n_cells"] = n_cells(grid)
            result["sweep"]["ours_lean"] = lean
            log.info("ours without sanity probe and IG doubling: %.1f s", lean["wall_s"])
        if "plain" not in skip:
            plain_cmd = [sys.executable, str(Path(__file__).with_name("plain_sweep.py")),
                         "--checkpoint", info["path"], "--model", cfg.model.name,
                         "--data", "digits" if args.small else "imagefolder",
                         "--data-root", str(Path(args.data_root).resolve()), "--n-eval", str(n_eval),
                         "--tracking-uri", f"sqlite:///{bench_dir / 'plain-mlflow.db'}",
                         "--out", str(bench_dir / "plain.json"), "--device", str(device),
                         "--batch-size", str(cfg.attack.batch_size),
                         *[f"--{k}={v}" for k, v in grid.items()]]
            plain = run_proc(plain_cmd, bench_dir / "logs" / "plain.log", 7200)
            plain["n_cells"] = n_cells(grid)
            result["sweep"]["plain"] = plain
            result["sweep"]["speedup"] = plain["wall_s"] / ours["wall_s"]
            if "ours_lean" in result["sweep"]:
                result["sweep"]["speedup_lean"] = plain["wall_s"] / result["sweep"]["ours_lean"]["wall_s"]
            log.info("plain: %d cells in %.1f s: ours is %.2fx faster", plain["n_cells"], plain["wall_s"],
                     result["sweep"]["speedup"])

    # ---- fixed per-job overhead: jobs that compute nothing (cached data and model, no attack)
    if "overhead" not in skip:
        nothing = ["data=digits", "model=small_cnn", "train=digits", "prune=none", "attack=none",
                   "attribution=none", "checks.sanity=false", "device=cpu"]
        eps = lambda k: ",".join(f"{i / 1000:g}" for i in range(k))  # noqa: E731  k distinct cells
        if not args.small:  # --small: the digits model is the workload's, trained and cached above
            run_proc(sweep_cmd(nothing, bench_dir, "overhead-warm", epsilon="0"),
                     bench_dir / "logs" / "overhead-warm.log", 600)  # trains/caches the digits model
        walls = [run_proc(sweep_cmd(nothing, bench_dir, f"overhead-{k}", epsilon=eps(k)),
                          bench_dir / "logs" / f"overhead-{k}.log", 600)["wall_s"] for k in overhead_jobs]
        f = fit(overhead_jobs, walls)
        result["overhead"] = {"jobs": overhead_jobs, "wall_s": walls, "per_job_s": f["slope"],
                              "startup_s": f["intercept"]}
        log.info("fixed overhead: %.2f s per job (+ %.1f s start-up)", f["slope"], f["intercept"])

    # ---- 4: growth
    if "growth" not in skip:
        small_grid = {"sparsity": grid["sparsity"].split(",")[0] + "," + grid["sparsity"].split(",")[-1],
                      "epsilon": "8/255" if args.small else "2/255,8/255", "attack": "fgsm,pgd"}
        by_n = []
        for k in growth_n:
            if k == n_eval and small_grid == grid and "sweep" in result:  # the same sweep as "ours"
                by_n.append(result["sweep"]["ours"]["wall_s"])
                continue
            cmd = sweep_cmd([*[b for b in base if not b.startswith("data.n_eval")], f"data.n_eval={k}"],
                            bench_dir, f"growth-n{k}", **small_grid)
            by_n.append(run_proc(cmd, bench_dir / "logs" / f"growth-n{k}.log", 3600)["wall_s"])
            log.info("growth: n_eval %d, %d cells: %.1f s", k, n_cells(small_grid), by_n[-1])
        cells_x, cells_y = [], []
        for key, values in growth_cells:
            g = {**grid, key: values}
            cells_x.append(n_cells(g))
            cells_y.append(run_proc(sweep_cmd(base, bench_dir, f"growth-c{cells_x[-1]}", **g),
                                    bench_dir / "logs" / f"growth-c{cells_x[-1]}.log", 3600)["wall_s"])
            log.info("growth: %d cells at n_eval %d: %.1f s", cells_x[-1], n_eval, cells_y[-1])
        if "sweep" in result:
            cells_x.append(result["sweep"]["ours"]["n_cells"])
            cells_y.append(result["sweep"]["ours"]["wall_s"])
        result["growth"] = {
            "n_eval": {"x": growth_n, "wall_s": by_n, "cells": n_cells(small_grid), **fit(growth_n, by_n)},
            "cells": {"x": cells_x, "wall_s": cells_y, "n_eval": n_eval, **fit(cells_x, cells_y)},
        }
    result["bench_s"] = time.perf_counter() - t_bench
    out.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)
    log.info("wrote %s", out)
    return 0


def print_table(r: dict[str, Any]) -> None:
    """The human summary (what README "Performance" shows)."""
    c = r["ceiling"]
    w = r["workload"]
    lines = [f"robustsweep bench | {r['machine']['device']} {r['machine']['gpu'] or ''} "
             f"{r['machine']['cpu_count']} CPUs | {w['model']} on {w['data']}, n_eval {w['n_eval']}",
             "",
             "| path | s | images/s | ratio to ceiling | ASR |",
             "|---|---:|---:|---:|---:|",
             f"| ceiling forward (batch {c['forward_batch']}) | | {c['forward_img_s']:.0f} | 1 | |",
             f"| ceiling forward+input-grad (batch {c['grad_batch']}) | | {c['grad_img_s']:.0f} | 1 | |"]
    for name, e in r["engine"].items():
        asr = f"{e['asr']:.3f}" if "asr" in e else ""
        lines.append(f"| ours: {name} | {e['s']:.2f} | {e['img_s']:.0f} | {e['ratio']:.2f} | {asr} |")
    if "sweep" in r:
        s = r["sweep"]
        lines += ["", "| sweep | cells | wall s | s/cell | peak RSS MB |", "|---|---:|---:|---:|---:|"]
        names = {"ours": "ours (defaults)", "ours_lean": "ours, checks.sanity=false, no IG doubling",
                 "plain": "plain way (scripts/bench/plain_sweep.py)"}
        for k in ("ours", "ours_lean", "plain"):
            if k in s:
                lines.append(f"| {names[k]} | {s[k]['n_cells']} | {s[k]['wall_s']:.1f} | "
                             f"{s[k]['wall_s'] / s[k]['n_cells']:.2f} | {s[k]['peak_rss_mb']:.0f} |")
        if "speedup" in s:
            lean = f", {s['speedup_lean']:.2f}x without the extra checks" if "speedup_lean" in s else ""
            lines.append(f"\nspeedup over the plain way: {s['speedup']:.2f}x{lean}")
    if "overhead" in r:
        o = r["overhead"]
        lines.append(f"\nfixed overhead per job (Hydra + MLflow, no compute): {o['per_job_s']:.2f} s "
                     f"(fit over {o['jobs']} jobs; start-up {o['startup_s']:.1f} s)")
    if "growth" in r:
        g = r["growth"]
        pts = lambda d: ", ".join(f"{x}: {y:.1f} s" for x, y in zip(d["x"], d["wall_s"], strict=True))  # noqa: E731
        n, c = g["n_eval"], g["cells"]
        lines.append(f"growth vs n_eval ({n['cells']} cells): {n['slope'] * 1000:.1f} s per 1000 images "
                     f"+ {n['intercept']:.1f} s  ({pts(n)})")
        lines.append(f"growth vs cells (n_eval {c['n_eval']}): {c['slope']:.2f} s per cell "
                     f"+ {c['intercept']:.1f} s  ({pts(c)})")
    m = r["memory"]
    lines.append(f"peak RSS: bench process {m['bench_peak_rss_mb']:.0f} MB"
                 + (f", CUDA {m['bench_cuda_peak_mb']:.0f} MB" if "bench_cuda_peak_mb" in m else ""))
    lines.append(f"baseline: {r['baseline']['source']}, clean test acc {r['baseline']['test_acc']:.4f}"
                 + (f", trained in {r['baseline']['train_s']:.0f} s" if r['baseline'].get('train_s') else ""))
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
