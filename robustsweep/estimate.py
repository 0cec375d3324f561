"""How long a sweep will take on this machine, said before it starts (issue 32).

A sweep of 3 seeds x the reference AutoAttack can be hours on a CPU; a user should read that before
starting it, not after. Each component declares its work in image passes where it is registered
(robustsweep.core.cost): an attack per attacked image, a training objective per training image, an
evaluator per cell (and what of it is shared by the cells of one model, through the per-process
memo). Here the validated cells are added up, with

* each baseline counted once, and only when its cache file does not exist yet (then one process
  trains it and the others wait: robustsweep.steps.train);
* work shared through a memo counted once per key and worker process;
* passes turned into seconds by a **calibration**: each network (random weights) timed here, on the
  sweep's device, for a forward pass, a forward+input-gradient pass and a training step, the way
  ``scripts/bench/bench.py`` measures its ceiling (1.8-6 s per sweep on the 2-core CPU box, small CNN to
  ResNet-20, much of it torch's first calls that the first cell would make anyway);
* a fixed cost per cell (Hydra's job, the MLflow run, artifacts, figures) and per worker start.

What depends on the data is a range: an attack that stops at an image's first adversarial example
(PGD with ``early_stop``, AutoAttack behind its PGD prefilter, an ensemble's later members) costs the
least when every image breaks at once and the most when none does; so does IG's step doubling. The
attacks run on the correctly classified images only: counted here as all of them. A component that
declares no work (a ``_target_`` attack, the certificates) is named as not estimated.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from robustsweep.core.cost import Rates, Work, duration, span
from robustsweep.core.device import attack_batch_size, resolve_device
from robustsweep.steps import data as data_mod
from robustsweep.steps.attacks import ATTACKS
from robustsweep.steps.evaluate import CellShape, evaluators
from robustsweep.steps.models import build_net
from robustsweep.steps.train import CLEAN, OBJECTIVES, baseline_cache_dir, baseline_key, baseline_path
from robustsweep.tracking import reuse

log = logging.getLogger(__name__)

# Seconds beyond image passes, measured on the 2-core CPU box (2026-12-07): Hydra's job, the MLflow
# run, outcomes and figures per cell (bench.py's "fixed overhead per job", no compute: 1.0 s; the
# 12-cell quickstart grid: 1.3 s per cell beyond its baseline and model passes); a worker's imports.
CELL_S = 1.3
START_S = 8.0
LATENCY_BATCHES = (1, 64)  # robustsweep.steps.efficiency times these


def _timed(fn: Any, min_s: float = 0.1, max_reps: int = 9) -> float:
    """Seconds per call of ``fn``: the fastest of at least 3 calls and ``min_s`` seconds (at most
    ``max_reps`` calls), after two untimed ones (thread pools, kernel selection). The fastest, as
    ``timeit`` advises: the first calls of a small network take up to 100x longer (measured)."""
    fn()
    fn()
    times: list[float] = []
    while len(times) < max_reps and (len(times) < 3 or sum(times) < min_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def calibrate(net: torch.nn.Module, shape: tuple[int, int, int], n_classes: int, device: torch.device,
              batch: int, train_batch: int) -> Rates:
    """Images per second of ``net`` on ``device``: forward (inference mode), forward + input
    gradient (what attacks and IG do), and a training step (forward, backward, SGD)."""
    net = net.to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, n_classes, (batch,), generator=gen).to(device)
    net.eval()

    def fwd() -> None:
        with torch.inference_mode():
            net(x)

    def grad() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(net(xg), y), xg)

    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    xt = torch.rand(train_batch, *shape, generator=gen).to(device)
    yt = torch.randint(0, n_classes, (train_batch,), generator=gen).to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_fwd = _timed(lambda: (fwd(), sync()))
    t_grad = _timed(lambda: (grad(), sync()))
    net.train()
    t_train = _timed(lambda: (step(), sync()))
    return Rates(fwd=batch / t_fwd, grad=batch / t_grad, train=len(xt) / t_train)


@dataclass
class Estimate:
    n_cells: int
    device: str
    at_once: int
    rates: dict[str, Rates] = field(default_factory=dict)  # network label -> its rates
    calibrate_s: float = 0.0
    train: list[tuple[str, str, float]] = field(default_factory=list)  # (network, what, seconds)
    n_cached: int = 0  # baselines found in the cache
    cells: tuple[float, float] = (0.0, 0.0)  # image passes of the cells (least, most), seconds
    fixed_s: float = 0.0  # per cell and per worker start
    not_estimated: set[str] = field(default_factory=set)

    @property
    def total(self) -> tuple[float, float]:
        train = sum(s for _, _, s in self.train)
        return train + self.cells[0] + self.fixed_s, train + self.cells[1] + self.fixed_s

    def lines(self) -> list[str]:
        rates = "; ".join(f"{k}: {r.fwd:.0f} forward, {r.grad:.0f} gradient, {r.train:.0f} training images/s"
                          for k, r in self.rates.items())
        out = [f"estimate for the {self.n_cells} cell{'s' if self.n_cells != 1 else ''} to run on {self.device}"
               f"{f', {self.at_once} at a time' if self.at_once > 1 else ''} (calibrated in "
               f"{self.calibrate_s:.1f} s: {rates})"]
        trained = ", ".join(f"{net} ({what}): ~{duration(s)}" for net, what, s in self.train)
        out.append(f"  baselines: {len(self.train)} to train{': ' + trained if trained else ''}; "
                   f"{self.n_cached} cached")
        out.append(f"  cells: {span(*self.cells)} of model passes + ~{duration(self.fixed_s)} fixed costs"
                   + ("; ~ when attacks and IG stop at once on most images (undefended models), up to "
                      "when they run every step on every image" if self.cells[1] > 1.2 * self.cells[0] else ""))
        missing = f"; not estimated: {', '.join(sorted(self.not_estimated))}" if self.not_estimated else ""
        out.append(f"  in all: {span(*self.total)}{missing}")
        return out


def _attack_id(cfg: DictConfig) -> str:
    return repr((OmegaConf.to_container(cfg.attack, resolve=True), str(cfg.epsilon)))


def _compress_work(cfg: DictConfig, n_train: int, notes: set[str]) -> Work:
    """Fine-tuning after compression (``defend``, after each step of a gradual schedule) and HYDRA's
    score training, on a model compression changed (sparsity > 0)."""
    if float(cfg.sparsity) <= 0:
        return Work()
    d = cfg.get("defend")
    per, tune = Work(train=1), Work()  # per training image of the defend objective (clean: one step)
    if d is not None and d.get("name", "none") != "none":
        if (declared := OBJECTIVES.work(d)) is None:
            notes.add(f"defend={OBJECTIVES.name_of(d)}")
        else:
            per = declared
            tune = per * (int(d.epochs) * n_train)
    p = cfg.prune
    if p.get("method") == "hydra":
        return tune + per * (int(p.score_epochs) * n_train)
    if p.get("schedule") == "gradual":
        return tune * int(p.steps)
    return tune


def _latency(cfg: DictConfig) -> Work:
    e = cfg.efficiency
    if not e.latency:
        return Work()
    reps = int(e.warmup) + int(e.min_repeats)
    return Work(fwd=reps * sum(LATENCY_BATCHES), seconds=len(LATENCY_BATCHES) * float(e.min_seconds))


def estimate(cfgs: list[DictConfig], at_once: int = 1, worker_starts: int = 0) -> Estimate:
    """The work of the validated ``cfgs`` (the cells still to run) and its seconds on this machine.
    ``at_once``: cells run together (worker processes); ``worker_starts``: processes started for them."""
    device = resolve_device(str(cfgs[0].device))
    est = Estimate(n_cells=len(cfgs), device=str(device), at_once=at_once)
    nets: dict[str, tuple[DictConfig, tuple[int, int, int], int, int, int]] = {}
    work: dict[str, Work] = {}  # network label -> cell work on it
    shared: Counter = Counter()  # (network, share key) -> cells with it
    shared_work: dict[tuple[str, Any], Work] = {}
    baselines: dict[str, tuple[str, str, Work]] = {}  # cache path -> (network, what, work)
    cached: set[str] = set()
    # data identity -> (channels, size, classes), test and training images, seconds to decode one:
    # once per dataset (an image tree's splits are listed, tens of thousands of files)
    facts: dict[str, tuple[tuple[int, int, int], int | None, int | None, float]] = {}
    for cfg in cfgs:
        data_id = repr(data_mod.identity(cfg.data))
        if data_id not in facts:
            facts[data_id] = (data_mod.shape_hint(cfg.data), data_mod.test_size(cfg.data),
                              data_mod.train_size(cfg.data), data_mod.decode_seconds(cfg.data))
        (c, size, k), n_test, n_train, decode = facts[data_id]
        if n_test is None or n_train is None:
            est.not_estimated.add(f"data {cfg.data.get('_target_') or cfg.data.get('name')}")
            continue
        n_eval = min(int(cfg.data.get("n_eval") or n_test), n_test)
        name = str(cfg.model.get("name") or cfg.model.get("_target_"))
        net = f"{name} {c}x{size}x{size}"
        nets.setdefault(net, (cfg.model, (c, size, size), k, attack_batch_size(cfg, device),
                              int(cfg.train.batch_size)))
        w = work.setdefault(net, Work())
        train_data = Work(seconds=n_train * decode)  # decoded once per process, to train

        # the baseline: trained once (one process trains, the others wait), else verified on load
        if not cfg.model.get("checkpoint"):
            path = baseline_path(cfg, baseline_cache_dir(cfg))
            if path.is_file():
                cached.add(str(path))
            elif str(path) not in baselines:
                obj = cfg.get("objective") or CLEAN
                per = OBJECTIVES.work(obj)
                if per is None:
                    est.not_estimated.add(f"objective={OBJECTIVES.name_of(obj)}")
                    per = Work(train=1)
                what = f"{int(cfg.train.epochs)} epochs x {n_train} images, {OBJECTIVES.name_of(obj)}"
                baselines[str(path)] = (net, what, per * (int(cfg.train.epochs) * n_train) + Work(fwd=n_test)
                                        + train_data)
        model = str(reuse.pruned_key(cfg, device) or id(cfg))
        dense = str(baseline_key(cfg) if not cfg.model.get("checkpoint") else cfg.model.checkpoint)
        tune = _compress_work(cfg, n_train, est.not_estimated)
        items = [(("verify", dense), Work(fwd=n_test, seconds=n_test * decode)),
                 (("model", model), tune + _latency(cfg))]
        if tune != Work():  # a fine-tune decodes the training split too
            items.append((("train data", data_id), train_data))
        for key, item in items:
            shared[(net, key)] += 1
            shared_work[(net, key)] = item

        cell = CellShape(n_eval=n_eval, model=model, dense=dense, attack=_attack_id(cfg),
                         attack_work=ATTACKS.work(cfg.attack))
        for ev in evaluators():
            if not ev.on(cfg):
                continue
            items = ev.work(cfg, cell) if ev.work is not None else None
            if items is None:
                est.not_estimated.add(ev.name if ev.work is None else f"{ev.name} with attack="
                                      f"{cfg.attack.get('name') or cfg.attack.get('_target_')}")
                continue
            for key, item in items:
                if key is None:
                    w = w + item
                else:
                    shared[(net, key)] += 1
                    shared_work[(net, key)] = item
        work[net] = w
    for (net, key), n in shared.items():  # once per worker process that gets a cell with it
        work[net] = work[net] + shared_work[(net, key)] * min(n, at_once)

    t0 = time.perf_counter()
    for net, (node, shape, k, batch, train_batch) in nets.items():
        # at the batch sizes the cells use: ResNet-20 trained 1.7x faster per image at batch 128 than
        # a calibration at 64 said (2-core box)
        est.rates[net] = calibrate(build_net(node, shape[0], k, shape[1]), shape, k, device, batch, train_batch)
    est.calibrate_s = time.perf_counter() - t0
    lo = hi = 0.0
    for net, w in work.items():
        a, b = est.rates[net].seconds(w)
        lo, hi = lo + a, hi + b
    # CPU: parallel workers share the cores, so the passes take as long as one at a time; GPUs: one each
    n_dev = min(at_once, torch.cuda.device_count()) if device.type == "cuda" else 1
    est.cells = (lo / max(n_dev, 1), hi / max(n_dev, 1))
    est.train = [(net, what, est.rates[net].seconds(w)[0]) for net, what, w in baselines.values()]
    est.n_cached = len(cached)
    est.fixed_s = math.ceil(len(cfgs) / at_once) * CELL_S + worker_starts * START_S / at_once
    return est
