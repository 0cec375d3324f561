"""What a compressed model buys: parameters, bytes, FLOPs and latency, measured on the model itself.

Claim: these are the numbers a deployer would measure, not ones derived from the config. An
unstructured-pruned model keeps every weight tensor at full shape (zeros included), so its
``params_total``, ``size_mb``, ``flops`` and latency stay those of the dense model; only
``params_nonzero`` and the deflate-compressed size (``size_mb_zipped``) show the zeros. A model
whose channels were removed is smaller in every column.

* ``params_total`` / ``params_nonzero``: elements of the model's parameters (not batch-norm
  running statistics), plus the integer elements of quantized weight tensors, which are not
  ``nn.Parameter``s.
* ``size_mb``: bytes of the state dict as safetensors (what ``robustsweep.core.checkpoint`` writes),
  in MB = 10^6 bytes; ``size_mb_zipped``: the same bytes through zlib at level 6 (a zip on disk).
* ``flops``: floating-point operations of one forward pass on one image
  (``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add of convolutions and matmuls;
  elementwise ops are not counted, as in most papers' FLOP tables; an int8 model: the same
  multiply-adds counted on its float twin).
* ``latency_ms_b1`` / ``latency_ms_b64``: median wall time of one forward pass at batch 1 and 64 on
  the run's device, after ``warmup`` passes, over at least ``min_repeats`` passes and
  ``min_seconds`` (CUDA: synchronised before each clock read). It measures the machine as it is:
  cells run in parallel on the same cores slow each other (README "Compression").
"""

from __future__ import annotations

import io
import logging
import math
import os
import statistics
import time
import zlib

import torch
from omegaconf import DictConfig
from torch import nn

from robustsweep.core.device import cpu_cores
from robustsweep.core.guards import state_tensors
from robustsweep.core.progress import heartbeat
from robustsweep.steps.attacks import modes_kept
from robustsweep.steps.quantize import twin_mode

log = logging.getLogger(__name__)

METRICS = ("params_total", "params_nonzero", "size_mb", "size_mb_zipped", "flops", "latency_ms_b1",
           "latency_ms_b64", "latency_spread_b1", "latency_spread_b64", "load_per_core", "latency_noisy")
LATENCY_BATCHES = (1, 64)
# When is a latency figure noise? The same model measured 0.097 ms to 121 ms at batch 1 on a loaded
# 2-core machine, and pareto.png then drew pruning as 200x faster than dense. A median is kept, but
# flagged when its repeats scatter (interquartile range over the median) or the machine is busy
# (1-minute load average per core): the cell is tagged suspect=latency_noisy and pareto.png leaves
# it off the latency fronts.
NOISY_SPREAD = 0.25
NOISY_LOAD_PER_CORE = 1.0
REASONS = {"latency_noisy": "its latency repeats scattered or the machine was busy: latency_ms_* is noise "
                            "(kept, left off pareto.png's latency fronts); measure on an idle machine"}


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """The parameters; for a model without them (an int8 model, whose weights are quantized
    tensors and packed parameters), the weight and bias tensors of its state dict."""
    params = [p.detach() for p in model.parameters()]
    quantized = [t for name, t in state_tensors(model) if isinstance(t, torch.Tensor)
                 and not name.rsplit(".", 1)[-1].startswith("q_") and (t.dtype in (torch.int8, torch.uint8)
                                                                        or name.endswith(("bias", ".1")))]
    return params + ([] if params else quantized)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all weight elements, nonzero ones)."""
    ws = _weights(model)
    return sum(w.numel() for w in ws), sum(int(torch.count_nonzero(w)) for w in ws)


def size_bytes(model: nn.Module) -> tuple[int, int]:
    """(safetensors bytes of the state dict, the same through zlib level 6). Quantized tensors are
    stored as their integer values plus scales (safetensors has no quantized dtype)."""
    from safetensors.torch import save

    state = {k: t.detach().cpu().contiguous() for k, t in state_tensors(model) if isinstance(t, torch.Tensor)}
    try:
        blob = save(state)
    except (ValueError, RuntimeError):  # shared storage (tied weights): torch.save's bytes instead
        buf = io.BytesIO()
        torch.save(state, buf)
        blob = buf.getvalue()
    return len(blob), len(zlib.compress(blob, 6))


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (one image, shape (1, C, H, W))."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # int8 kernels are invisible to the counter: an int8 model's FLOPs are its twin's (the same
    # multiply-adds, in int8)
    with torch.inference_mode(), twin_mode(model), counter:
        model(example)
    return int(counter.get_total_flops())


def latency_ms(model: nn.Module, x: torch.Tensor, warmup: int = 3, min_repeats: int = 10,
               min_seconds: float = 0.2, max_repeats: int = 1000) -> float:
    """Median milliseconds of ``model(x)``: ``warmup`` passes, then at least ``min_repeats`` timed
    passes and at least ``min_seconds`` of them (at most ``max_repeats``)."""
    return latency_stats(model, x, warmup, min_repeats, min_seconds, max_repeats)[0]


def latency_stats(model: nn.Module, x: torch.Tensor, warmup: int = 3, min_repeats: int = 10,
                  min_seconds: float = 0.2, max_repeats: int = 1000) -> tuple[float, float]:
    """``latency_ms``'s median and the spread of its repeats: interquartile range / median."""
    cuda = x.device.type == "cuda"
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        if cuda:
            torch.cuda.synchronize(x.device)
        total = 0.0
        while len(times) < max_repeats and (len(times) < min_repeats or total < min_seconds):
            t = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(x.device)
            dt = time.perf_counter() - t
            times.append(dt)
            total += dt
    median = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (median, median, median)
    return 1000 * median, (q3 - q1) / median if median > 0 else math.inf


def measure(model: nn.Module, image_shape: tuple[int, ...], device: torch.device,
            cfg: DictConfig | None = None) -> dict[str, float]:
    """Every METRICS figure for ``model`` (eval mode, inputs in [0, 1] of ``image_shape`` = C, H, W)."""
    cfg = cfg or DictConfig({})
    total, nonzero = count_params(model)
    size, zipped = size_bytes(model)
    # each module's own mode back afterwards: model.train(was_training) would give all of them
    # the root's (a model fine-tuned with BatchNorm held in eval came back with it in train mode)
    # timing ~2x(3 warm-up + >= 10 repeats, >= 0.2 s) passes: seconds, longer for a big model on a CPU
    with modes_kept(model), heartbeat("efficiency (params, FLOPs, latency)"):
        model.eval()
        gen = torch.Generator().manual_seed(0)
        x = {b: torch.rand((b, *image_shape), generator=gen).to(device) for b in LATENCY_BATCHES}
        out = {"params_total": float(total), "params_nonzero": float(nonzero), "size_mb": size / 1e6,
               "size_mb_zipped": zipped / 1e6, "flops": float(count_flops(model, x[1]))}
        if cfg.get("latency", True):
            for b in LATENCY_BATCHES:
                out[f"latency_ms_b{b}"], out[f"latency_spread_b{b}"] = latency_stats(
                    model, x[b], int(cfg.get("warmup", 3)), int(cfg.get("min_repeats", 10)),
                    float(cfg.get("min_seconds", 0.2)))
            out["load_per_core"] = os.getloadavg()[0] / cpu_cores()
            noisy = max(out[f"latency_spread_b{b}"] for b in LATENCY_BATCHES) > NOISY_SPREAD \
                or out["load_per_core"] > NOISY_LOAD_PER_CORE
            out["latency_noisy"] = float(noisy)
            if noisy:
                spreads = ", ".join(f"{out[f'latency_spread_b{b}']:.2f} at batch {b}" for b in LATENCY_BATCHES)
                log.warning("latency is noise here: repeats spread %s (IQR/median; > %g is noise), load %.2f "
                            "per core (> %g is busy); kept, cell tagged suspect=latency_noisy", spreads,
                            NOISY_SPREAD, out["load_per_core"], NOISY_LOAD_PER_CORE)
    log.info("efficiency: %d params (%d nonzero), %.3f MB (%.3f MB zipped), %.3g FLOPs/image%s",
             total, nonzero, out["size_mb"], out["size_mb_zipped"], out["flops"],
             "".join(f", {out[f'latency_ms_b{b}']:.2f} ms at batch {b}" for b in LATENCY_BATCHES
                     if f"latency_ms_b{b}" in out))
    return out
