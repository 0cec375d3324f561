"""Training, and the dense baseline: trained once, cached under outputs/cache/baselines.

The train-objective seam: ``OBJECTIVES`` maps ``objective.name`` to a loss. One registry serves the
dense baseline (group ``objective``, default ``clean``) and fine-tuning after compression (group
``defend``, robustsweep.steps.defend). Each objective is one function
``loss(model, x, y, node, train_cfg) -> (loss, logits)``; ``clean`` is here, the defences
(``pgd_at``, ``fast_at``, ``trades``, ``noise``, ``distill``) in robustsweep.steps.objectives, which
registers itself on the first lookup. An objective that needs something built once before training
(distillation's teacher) carries ``loss.prepare(model, ds, train_cfg, node, seed=, epochs=, lr=)``,
which returns the per-batch loss to use.

The cache key is a SHA-256 of everything that determines the weights (model config, the data's
identity, training config, objective, seed, code version of this recipe), so a sweep over
sparsity/eps trains exactly once, and changing e.g. ``train.epochs`` trains a new one. (The
``clean`` objective is left out of the key, so baselines cached before objectives existed are
still found.) A cache entry is trusted only after it is verified: its sidecar must carry the
file's SHA-256 and clean test accuracy, and the loaded weights must score that accuracy; anything
else is retrained and overwritten (``_verified_cache``).

Training data stays on the device as uint8; augmentation (random crop with zero padding and
horizontal flip) is done for the whole batch at once with tensor indexing, as in airbench.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustsweep.core import cost
from robustsweep.core.checkpoint import (
    CheckpointError,
    load_into,
    load_state,
    read_meta,
    save_checkpoint,
)
from robustsweep.core.errors import ConfigError
from robustsweep.core.params import check, nonnegative_int, number_in, positive_int, positive_number
from robustsweep.core.paths import resolve_path
from robustsweep.core.progress import heartbeat, progress
from robustsweep.core.registry import Registry
from robustsweep.steps import data as data_mod
from robustsweep.steps.data import Dataset, to_float
from robustsweep.steps.models import Normalized, build_model, count_parameters

log = logging.getLogger(__name__)
RECIPE_VERSION = 1  # bump when the training code changes what a given config produces

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, DictConfig, DictConfig],
                tuple[torch.Tensor, torch.Tensor]]
OBJECTIVES: Registry[Loss] = Registry("objective", plugins=("robustsweep.steps.objectives",))
register_objective = OBJECTIVES.register
CLEAN = OmegaConf.create({"name": "clean"})


# Work per training image (robustsweep.core.cost), declared with each objective: one training step,
# plus the inner attack's gradient passes for the adversarial ones.
@register_objective("clean", work=lambda node: cost.Work(train=1))
def clean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, node: DictConfig,
               train: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy with the recipe's label smoothing (empirical risk minimisation)."""
    out = model(x)
    return F.cross_entropy(out, y, label_smoothing=train.label_smoothing), out


def check_train_config(cfg: DictConfig) -> None:
    """``train.*`` and ``objective.*`` before anything runs."""
    positive_int(cfg.train, "epochs")
    positive_int(cfg.train, "batch_size")
    positive_number(cfg.train, "lr")
    number_in(cfg.train, "weight_decay", 0.0, math.inf, "a number >= 0")
    number_in(cfg.train, "warmup_fraction", 0.0, 1.0, "a number in (0, 1)", low_open=True, high_open=True)
    number_in(cfg.train, "label_smoothing", 0.0, 1.0, "a number in [0, 1)", high_open=True)
    nonnegative_int(cfg.train, "crop_pad")
    check(isinstance(cfg.train.flip, bool), "train.flip", cfg.train.flip, "true or false")
    # Optional (absent from the CPU recipes, so their baseline cache keys are unchanged).
    amp = cfg.train.get("amp", "none")
    check(amp in ("none", "bf16"), "train.amp", amp, "none or bf16")
    OBJECTIVES.validate(cfg.objective, cfg)


def augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random-crop (zero padding ``pad`` px) and horizontal flip, per image, whole batch at once."""
    n, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device="cpu").to(dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device="cpu").to(dev)
        rows = (torch.arange(h, device=dev)[None] + dy[:, None])[:, None, :, None]
        cols = (torch.arange(w, device=dev)[None] + dx[:, None])[:, None, None, :]
        x = padded[torch.arange(n, device=dev)[:, None, None, None],
                   torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    if flip:
        mask = (torch.rand(n, generator=gen, device="cpu") < 0.5).to(dev)[:, None, None, None]
        x = torch.where(mask, x.flip(3), x)
    return x


@torch.inference_mode()
def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Per image (uint8 or [0, 1] ``x``), whether ``model`` in eval mode classifies it right: bool
    (N,). The model's mode is restored."""
    was_training = model.training
    model.eval()
    # no autograd graph: the same forward numbers (checked against the cached baselines' sidecars,
    # which are exact on the CPU), less time and memory; a line every 10 s on a long test split
    with torch.inference_mode(), heartbeat(f"accuracy on {len(x)} images"):
        out = [(model(to_float(x[i:i + batch_size])).argmax(1) == y[i:i + batch_size]).cpu().numpy()
               for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, bool)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    return int(correct(model, x, y, batch_size).sum()) / max(len(x), 1)


def train_model(model: nn.Module, ds: Dataset, cfg: DictConfig, seed: int, epochs: int | None = None,
                lr: float | None = None, desc: str = "train",
                objective: DictConfig | None = None, loss_fn: Loss | None = None) -> list[dict[str, float]]:
    """SGD + Nesterov with a one-cycle schedule, minimising ``objective`` (default ``clean``; or
    ``loss_fn`` given directly); returns per-epoch history. ``cfg`` is the ``train`` node (the recipe)."""
    objective = objective if objective is not None else CLEAN
    loss_fn = loss_fn if loss_fn is not None else OBJECTIVES.resolve(objective)
    epochs = epochs if epochs is not None else cfg.epochs
    lr = lr if lr is not None else cfg.lr
    prepare = getattr(loss_fn, "prepare", None)
    if prepare is not None:  # e.g. distillation trains its teacher here (same seed, epochs, lr)
        loss_fn = prepare(model, ds, cfg, objective, seed=seed, epochs=epochs, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # bf16 autocast (train.amp=bf16): the GPU recipe's matmuls and convolutions in bfloat16; the
    # weights, the optimiser and the loss stay float32.
    amp = torch.autocast(ds.x_train.device.type, dtype=torch.bfloat16,
                         enabled=cfg.get("amp", "none") == "bf16")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    n = len(ds.x_train)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=cfg.warmup_fraction,
        anneal_strategy="linear")
    history = []
    model.train()
    bar = progress(total=epochs * steps_per_epoch, desc=desc, unit="step")
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(ds.x_train.device)
        x_all = augment(ds.x_train[perm], cfg.crop_pad, cfg.flip, gen)
        y_all = ds.y_train[perm]
        loss_sum, correct = 0.0, 0
        for i in range(0, n, cfg.batch_size):
            x, y = to_float(x_all[i:i + cfg.batch_size]), y_all[i:i + cfg.batch_size]
            with amp:
                loss, out = loss_fn(model, x, y, objective, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            bar.update(1)
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / n, "train_acc": correct / n,
               "epoch_s": time.perf_counter() - t0}
        history.append(rec)
        log.info("%s epoch %d/%d: loss %.4f, train acc %.4f, %.1f s", desc, epoch + 1, epochs,
                 rec["train_loss"], rec["train_acc"], rec["epoch_s"])
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec['train_acc']:.3f}", refresh=False)
    bar.close()
    model.eval()
    return history


def baseline_key(cfg: DictConfig) -> str:
    """SHA-256 (16 hex) of everything that determines the dense baseline's weights."""
    model_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                 if k != "checkpoint"}
    blob = {"model": model_cfg, "data": data_mod.identity(cfg.data),
            "train": OmegaConf.to_container(cfg.train, resolve=True), "seed": cfg.seed,
            "recipe": RECIPE_VERSION}
    objective = OmegaConf.to_container(cfg.objective, resolve=True) if cfg.get("objective") else None
    if objective not in (None, {"name": "clean"}):
        blob["objective"] = objective
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def new_model(cfg: DictConfig, ds: Dataset, stats: bool = True) -> Normalized:
    """A freshly initialised model. ``stats=False``: placeholder normalisation buffers, for a model
    about to load a checkpoint that carries its own (so the training split is not decoded)."""
    c, h, _ = ds.shape
    mean, std = (ds.mean, ds.std) if stats else ((0.0,) * c, (1.0,) * c)
    model = build_model(cfg.model, in_channels=c, num_classes=len(ds.classes), image_size=h,
                        mean=mean, std=std)
    # channels_last: ~1.5x faster convolutions on CPU (measured 685 vs 469 img/s training
    # ResNet-20) and the fast path for cuDNN; inputs stay NCHW, the first conv converts them.
    return model.to(memory_format=torch.channels_last)


# A cached baseline's clean test accuracy is recomputed on load and compared with its sidecar's.
# Both are ``accuracy()`` over the whole test split in the same batches. On the CPU they agree bit
# for bit in practice: the same kernels, and a flip would need two logits within ~1e-6 of each
# other (ACC_TOL, far below one image of 10k, only guards the float comparison). On a GPU they
# need not: PyTorch runs cuDNN convolutions in TF32 by default and ``perf.cudnn_benchmark`` picks
# kernels per process, and across device types (a CUDA-trained entry read on a CPU) rounding
# differs too, so an image whose two top logits nearly tie may flip: there up to 0.5 % of the split
# is accepted. Either way the recomputed number is what is reported; the tolerance only decides
# between keeping the entry and retraining it. A sidecar without ``test_acc_device`` (written
# before it was recorded) is taken as written on this device type.
ACC_TOL = 1e-6
ACC_TOL_GPU = 0.005
# (cache file, its verified SHA-256, device type) -> recomputed test accuracy: every cell of a
# sweep reloads the baseline, and one forward pass per cell over CIFAR-10's test split (29.5 s for
# ResNet-20 on the 2-core CPU box shared with other work, load ~3, 2026-12-07) would add minutes
# to a sweep. The file's hash is still checked on every load.
_VERIFIED: dict[tuple[str, str, str], float] = {}


def _verified_cache(cfg: DictConfig, ds: Dataset, device: torch.device, path: Path,
                    key: str) -> tuple[Normalized, dict[str, Any]] | None:
    """The cached baseline at ``path`` if it can be trusted, else None (with a warning naming the
    file; the caller retrains and overwrites it).

    Nothing in the cache is taken on trust: anyone who can write the folder can plant a valid
    safetensors file with a matching sidecar. So the sidecar must carry the file's ``sha256``
    (checked against the bytes) and ``test_acc``, its ``key`` (when present) must be this config's,
    and the loaded weights must score the sidecar's ``test_acc`` on the test split (recomputed:
    one forward pass over the split, once per file and process: 360 digits in milliseconds,
    CIFAR-10's 10k images in 29.5 s for ResNet-20 on a busy 2-core CPU, see _VERIFIED)."""
    if not path.is_file():
        return None

    def distrust(why: str) -> None:
        log.warning("cached baseline %s not trusted (%s): retraining and overwriting it", path, why)

    meta = read_meta(path)
    if meta is None or not isinstance(meta, dict):
        distrust(f"its sidecar {path.with_suffix('.json').name} is missing or not a JSON object")
        return None
    digest, claimed = meta.get("sha256"), meta.get("test_acc")
    missing = [k for k, ok in (("sha256", isinstance(digest, str) and len(digest) == 64),
                               ("test_acc", isinstance(claimed, int | float) and not isinstance(claimed, bool)))
               if not ok]
    if missing:
        distrust(f"its sidecar lacks a valid {' and '.join(missing)}")
        return None
    if meta.get("key", key) != key:
        distrust(f"its sidecar is for baseline key {meta.get('key')!r}, not {key!r}")
        return None
    try:
        model = new_model(cfg, ds, stats=False).to(device)  # the cache carries mean/std buffers
        load_into(model, load_state(path, digest), str(path))
    except CheckpointError as e:
        log.warning("cached baseline unusable, retraining: %s", e)
        return None
    model.eval()
    memo = (str(path), digest, device.type)
    acc = _VERIFIED.get(memo)
    if acc is None:
        acc = accuracy(model, ds.x_test, ds.y_test)  # as get_baseline computed it when training
    exact = meta.get("test_acc_device", device.type) == device.type == "cpu"
    tol = ACC_TOL if exact else ACC_TOL_GPU
    if abs(acc - claimed) > tol:
        distrust(f"its sidecar claims test_acc {claimed:.6g} but the weights score {acc:.6g} on the "
                 f"test split ({len(ds.y_test)} images)")
        return None
    _VERIFIED[memo] = acc
    log.info("reusing cached baseline %s (clean test acc %.4f, recomputed)", path.name, acc)
    # the recomputed number is reported (identical to the sidecar's on the writing device)
    return model, {**meta, "test_acc": acc, "source": "cache", "path": str(path), "trained": False}


def baseline_cache_dir(cfg: DictConfig) -> Path:
    """Where a cell caches its dense baseline: ``<paths.output_dir>/cache/baselines``."""
    return resolve_path(cfg.paths.output_dir) / "cache" / "baselines"


def baseline_path(cfg: DictConfig, cache_dir: Path) -> Path:
    """The cache file of ``cfg``'s dense baseline in ``cache_dir`` (its model's name and key)."""
    return cache_dir / f"{cfg.model.get('name') or 'custom'}-{baseline_key(cfg)}.safetensors"


def get_baseline(cfg: DictConfig, ds: Dataset, device: torch.device,
                 cache_dir: Path) -> tuple[Normalized, dict[str, Any]]:
    """Return the dense model (user checkpoint, cached baseline, or freshly trained) and its info.

    ``info["trained"]`` tells whether this call trained (False on a cache hit).
    """
    torch.manual_seed(cfg.seed)  # weight initialisation
    if cfg.model.get("checkpoint"):
        model = new_model(cfg, ds).to(device)  # a bare network's weights keep our statistics
        path = resolve_path(cfg.model.checkpoint)
        try:
            load_into(model, {k: v.to(device) for k, v in load_state(path).items()}, str(path))
        except CheckpointError as e:
            raise ConfigError(f"model.checkpoint={str(cfg.model.checkpoint)!r}: {e}; allowed: a "
                              f"safetensors or weights-only .pt state dict for model.name="
                              f"{cfg.model.get('name') or cfg.model.get('_target_')}") from e
        model.eval()
        info = {"source": "checkpoint", "path": str(path), "trained": False,
                "test_acc": accuracy(model, ds.x_test, ds.y_test)}
        log.info("loaded user checkpoint %s (clean test acc %.4f)", path, info["test_acc"])
        return model, info

    key = baseline_key(cfg)
    name = cfg.model.get("name") or "custom"
    path = baseline_path(cfg, cache_dir)
    seen = _stamp(path)
    hit = _verified_cache(cfg, ds, device, path, key)
    if hit is not None:
        return hit
    # One trainer per cache key across processes: parallel workers (joblib, submitit, SLURM on a
    # shared disk) that all miss the cache wait for the first, then load what it saved.
    with _training_lock(path, name):
        if _stamp(path) != seen:  # saved by another process while this one waited
            hit = _verified_cache(cfg, ds, device, path, key)
            if hit is not None:
                return hit
        return _train_baseline(cfg, ds, device, path, key, name)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def _training_lock(path: Path, name: str) -> Iterator[None]:
    """``<cache>.lock`` held while training; a waiter says so every ~10 s (never silent for long)."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    t0, wait_s = time.perf_counter(), 0.0  # first a try without waiting, then 10 s at a time
    while True:
        try:
            lock.acquire(timeout=wait_s)
            break
        except Timeout:
            log.info("waiting for another process training baseline %s (%s): %.0f s so far",
                     name, path.name, time.perf_counter() - t0)
            wait_s = 10.0
    try:
        yield
    finally:
        lock.release()


def _train_baseline(cfg: DictConfig, ds: Dataset, device: torch.device, path: Path, key: str,
                    name: str) -> tuple[Normalized, dict[str, Any]]:
    torch.manual_seed(cfg.seed)  # again: building the model for a cache load above drew random numbers
    model = new_model(cfg, ds).to(device)

    log.info("training baseline %s (%d parameters) for %d epochs on %s -> %s",
             name, count_parameters(model), cfg.train.epochs, device, path.name)
    t0 = time.perf_counter()
    history = train_model(model, ds, cfg.train, seed=cfg.seed, desc=f"baseline {name}",
                          objective=cfg.get("objective"))
    train_s = time.perf_counter() - t0
    test_acc = accuracy(model, ds.x_test, ds.y_test)
    log.info("baseline trained in %.1f s: clean test acc %.4f", train_s, test_acc)
    meta = {"key": key, "model": name, "test_acc": test_acc, "test_acc_device": device.type, "train_s": train_s,
            "n_params": count_parameters(model), "history": history,
            "config": {"model": OmegaConf.to_container(cfg.model, resolve=True),
                       "train": OmegaConf.to_container(cfg.train, resolve=True),
                       "data": data_mod.identity(cfg.data), "seed": cfg.seed,
                       "objective": (OmegaConf.to_container(cfg.objective, resolve=True)
                                     if cfg.get("objective") else {"name": "clean"})}}
    meta["sha256"] = save_checkpoint(model, path, meta)
    _VERIFIED[(str(path), meta["sha256"], device.type)] = test_acc
    return model, {**meta, "source": "trained", "path": str(path), "trained": True}
