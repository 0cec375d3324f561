"""What the jobs of a sweep share inside one process, so that each cell computes only its own part.

Hydra's basic launcher runs every job of a multirun in one process (the joblib launcher runs
several per worker), and most of a cell's work does not depend on the cell: a 4 sparsity x 4 eps
x {FGSM, PGD} grid has 4 pruned models, not 32; the clean predictions and FGSM's gradient sign of
a model are the same at every eps; so is the clean half of its IG maps. Decoded data is shared by
``data.load_dataset`` in the same way.

Every entry is keyed by content, never by job number: a pruned model by everything that produced
it (baseline identity, prune config, sparsity, seed, device), and what is computed from a model by
the SHA-256 of its state_dict plus the identity of the images. A hit therefore returns exactly
what recomputing would (tests run cells with ``perf.reuse`` on and off and compare). A cached
model is re-hashed before reuse, and dropped if anything changed it.

``perf.reuse=false`` turns all of it off. Sizes are bounded (LRU), so a long sweep's memory does
not grow: for ResNet-18 on the full CIFAR-10 test set, one pruned model is 45 MB and one FGSM
direction 31 MB (int8).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any, Generic, TypeVar

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
V = TypeVar("V")


class LRU(Generic[V]):
    """A small least-recently-used map with hit/miss counts (shown in the benchmark)."""

    def __init__(self, name: str, maxsize: int) -> None:
        self.name, self.maxsize = name, maxsize
        self._d: OrderedDict[str, V] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str | None) -> V | None:
        if key is None or key not in self._d:
            self.misses += key is not None
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return self._d[key]

    def put(self, key: str | None, value: V) -> None:
        if key is None:
            return
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.maxsize:
            self._d.popitem(last=False)

    def drop(self, key: str | None) -> None:
        self._d.pop(key, None)  # type: ignore[arg-type]

    def clear(self) -> None:
        self._d.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)


PRUNED: LRU[Any] = LRU("pruned_model", 4)  # (model, baseline info, measured sparsity, state hash)
CLEAN_PRED: LRU[Any] = LRU("clean_pred", 16)  # (n_eval,) int64
FGSM_DIRECTION: LRU[Any] = LRU("fgsm_direction", 4)  # (n_correct, C, H, W) int8
IG_CLEAN: LRU[Any] = LRU("ig_clean", 8)  # attribution.IGPart
SANITY: LRU[float] = LRU("sanity", 256)  # one sanity-probe ASR (checks.sanity_probe)
CACHES = (PRUNED, CLEAN_PRED, FGSM_DIRECTION, IG_CLEAN, SANITY)


def clear() -> None:
    """Empty every cache (tests; a process that wants its memory back)."""
    for c in CACHES:
        c.clear()


def stats() -> dict[str, dict[str, int]]:
    return {c.name: {"hits": c.hits, "misses": c.misses, "size": len(c)} for c in CACHES}


def _blob(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def pruned_key(cfg: DictConfig, device: Any) -> str | None:
    """Identity of the pruned model a job would build; None when ``perf.reuse`` is off."""
    if not cfg.perf.reuse:
        return None
    from robustsweep.config import resolve_path
    from robustsweep.train import baseline_key

    base: dict[str, Any] = {"trained": baseline_key(cfg)}
    if cfg.model.get("checkpoint"):
        path = resolve_path(cfg.model.checkpoint)
        st = path.stat()
        base = {"checkpoint": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "model": OmegaConf.to_container(cfg.model, resolve=True)}
    return _blob({"base": base, "prune": OmegaConf.to_container(cfg.prune, resolve=True),
                  "sparsity": cfg.sparsity, "seed": cfg.seed, "device": str(device)})


def images_key(cfg: DictConfig, model_hash: str, *extra: Any) -> str | None:
    """Identity of (a model, the evaluation images, the arithmetic) for what is computed from them."""
    if not cfg.perf.reuse:
        return None
    from robustsweep import data
    from robustsweep.config import amp_name, resolve_device

    return _blob({"model": model_hash, "data": data.identity(cfg.data), "n_eval": cfg.data.get("n_eval"),
                  "subset_seed": cfg.data.get("subset_seed", 0), "amp": amp_name(cfg),
                  "device": str(resolve_device(cfg.device)), "extra": list(extra)})
