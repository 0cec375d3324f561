"""What the jobs of a sweep share inside one process, so that each cell computes only its own part.

Hydra's basic launcher runs every job of a multirun in one process (the joblib launcher runs
several per worker), and most of a cell's work does not depend on the cell: a 4 sparsity x 4 eps
x {FGSM, PGD} grid has 4 pruned models, not 32; the clean predictions and FGSM's gradient sign of
a model are the same at every eps; so is the clean half of its IG maps. Decoded data is shared by
``data.load_dataset`` in the same way.

Every entry is keyed by content, never by job number: a compressed model by the cell's canonical
config (robustsweep.tracking.identity) minus what only evaluation reads (epsilon, the evaluators'
config groups, the evaluation subset), plus the device and a user checkpoint's file stamp; what is
computed from a model by the SHA-256 of its state_dict plus the identity of the images. A key is
derived, never listed by hand, so a new config group is part of it automatically. A hit therefore
returns exactly what recomputing would (tests run cells with ``perf.reuse`` on and off and compare). A cached
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

from omegaconf import DictConfig

from robustsweep.core.device import amp_name, resolve_device
from robustsweep.core.paths import resolve_path
from robustsweep.steps import compress, data
from robustsweep.steps.evaluate import evaluators
from robustsweep.tracking.identity import canonical

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


PRUNED: LRU[Any] = LRU("pruned_model", 4)  # (model, baseline info, measured metrics, state hash)
CLEAN_PRED: LRU[Any] = LRU("clean_pred", 16)  # (n_eval,) int64
FGSM_DIRECTION: LRU[Any] = LRU("fgsm_direction", 4)  # (n_correct, C, H, W) int8
IG_CLEAN: LRU[Any] = LRU("ig_clean", 8)  # attribution.IGPart
SANITY: LRU[float] = LRU("sanity", 256)  # one sanity-probe ASR (steps.evaluate.sanity.sanity_probe)
DRIFT_DENSE: LRU[Any] = LRU("drift_dense", 4)  # the dense model's attribution maps (N, C, H, W)
# The dense model's adversarial examples for transfer (steps.evaluate.transfer): float32, n_eval x C x H x W
# each (10k CIFAR images: 123 MB), so only a few (one per attack and eps in a sweep's order).
TRANSFER: LRU[Any] = LRU("transfer", 4)
CACHES = (PRUNED, CLEAN_PRED, FGSM_DIRECTION, IG_CLEAN, SANITY, DRIFT_DENSE, TRANSFER)


def clear() -> None:
    """Empty every cache (tests; a process that wants its memory back)."""
    for c in CACHES:
        c.clear()


def stats() -> dict[str, dict[str, int]]:
    return {c.name: {"hits": c.hits, "misses": c.misses, "size": len(c)} for c in CACHES}


def _blob(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def pruned_key(cfg: DictConfig, device: Any) -> str | None:
    """Identity of the compressed model a job would build; None when ``perf.reuse`` is off."""
    if not cfg.perf.reuse:
        return None
    c = canonical(cfg)
    c.pop("epsilon", None)
    built_by = {spec.group for spec in compress.stages()}  # an evaluator may read a compress group (quant)
    for ev in evaluators():  # what only evaluation reads
        if ev.group not in built_by:
            c.pop(ev.group, None)
    c["data"] = data.identity(cfg.data)  # the decoded images (absolute root), not the eval subset
    if cfg.model.get("checkpoint"):
        path = resolve_path(cfg.model.checkpoint)
        st = path.stat()
        c["checkpoint"] = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    c["device"] = str(device)
    return _blob(c)


def images_key(cfg: DictConfig, model_hash: str, *extra: Any) -> str | None:
    """Identity of (a model, the evaluation images, the arithmetic) for what is computed from them."""
    if not cfg.perf.reuse:
        return None
    return _blob({"model": model_hash, "data": data.identity(cfg.data), "n_eval": cfg.data.get("n_eval"),
                  "subset_seed": cfg.data.get("subset_seed", 0), "amp": amp_name(cfg),
                  "device": str(resolve_device(cfg.device)), "extra": list(extra)})


_BY_NAME = {c.name: c for c in CACHES}


class ImagesMemo:
    """The evaluators' memo (robustsweep.steps.evaluate.Memo) for one model and images: cache
    ``name`` of this module, keyed by ``images_key(cfg, model_hash, name, *key)``."""

    def __init__(self, cfg: DictConfig, model_hash: str) -> None:
        self.cfg, self.model_hash = cfg, model_hash

    def get(self, cache: str, *key: Any) -> Any:
        return _BY_NAME[cache].get(images_key(self.cfg, self.model_hash, cache, *key))

    def put(self, cache: str, value: Any, *key: Any) -> None:
        _BY_NAME[cache].put(images_key(self.cfg, self.model_hash, cache, *key), value)
