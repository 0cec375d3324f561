"""Cell identity: which config determines a cell's numbers, as one canonical dict.

``canonical(cfg)`` is the resolved config minus what cannot change a result (``NOT_RESULTS``: paths,
tracking, Hydra, search, checks, efficiency, perf except ``perf.amp``; ``attack.norm`` when it is
``linf``, the only norm before the key existed; ``LATER_KEYS`` at their neutral value; an optional
group that is not chosen, ``core.schema.OPTIONAL_GROUPS``) and minus every step at its neutral default (a
group node whose ``name``/``method`` is ``none``). So a new config group whose default is ``none``
leaves every existing ``cell_id`` unchanged, and a user's store keeps resuming. ``cell_id`` hashes
it; the per-process reuse keys (robustsweep.tracking.reuse) derive from it too, so a key can never
silently leave a field out.

Identity v1 (until commit c37dc28) hashed the same config with the fine-tune keys inside ``prune``
(``prune.finetune_epochs``/``finetune_lr``) and no ``objective``/``defend`` groups.
``legacy_ids`` recomputes it for configs that existed then, so resume finds cells stored by v1.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustsweep.core.device import amp_name
from robustsweep.core.params import parse_epsilon
from robustsweep.core.registry import is_off
from robustsweep.core.schema import OPTIONAL_GROUPS

# config nodes that cannot change a cell's numbers (checks only add sanity metrics and tags;
# perf.* changes how fast, not what: only perf.amp, bf16 arithmetic, can change a result;
# efficiency.* says how latency is timed, a property of the machine)
NOT_RESULTS = ("paths", "tracking", "hydra", "search", "checks", "efficiency", "perf")
NEUTRAL = "none"
TARGET = "_target_"
# Keys added after identity v2, dropped at their neutral value (which computes the cell exactly as
# it was computed before they existed), so stores made before them keep resuming:
# (node, key, neutral value, keys that matter only when key is not neutral)
LATER_KEYS = (("compress", "bn_recalibrate", 0, ()), ("prune", "schedule", "oneshot", ("steps",)),
              ("attack", "prefilter", "none", ("prefilter_steps",)))


def _is_neutral(node: Any) -> bool:
    return isinstance(node, dict) and is_off(node)


def _base(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus NOT_RESULTS, eps as a float, ``perf.amp`` only when not none."""
    c = OmegaConf.to_container(cfg, resolve=False)
    for k in NOT_RESULTS:
        c.pop(k, None)
    for k in OPTIONAL_GROUPS:  # a group not chosen (None): as if it did not exist
        if c.get(k, 0) is None:
            c.pop(k)
    norm = (c.get("attack") or {}).get("norm") if isinstance(c.get("attack"), dict) else None
    c["epsilon"] = parse_epsilon(c["epsilon"], norm or "linf")  # "8/255" and 0.0313725... are the same cell
    if (amp := amp_name(cfg)) != "none":
        c["perf"] = {"amp": amp}
    for node, key, neutral, companions in LATER_KEYS:
        d = c.get(node)
        if isinstance(d, dict) and d.get(key, neutral) == neutral:
            for k in (key, *companions):
                d.pop(k, None)
            if not d:
                c.pop(node)
    if isinstance(c.get("attack"), dict) and c["attack"].get("norm") == "linf":
        c["attack"] = {k: v for k, v in c["attack"].items() if k != "norm"}  # the default before attack.norm
    return json.loads(json.dumps(OmegaConf.to_container(OmegaConf.create(c), resolve=True), default=str))


def canonical(cfg: DictConfig) -> dict[str, Any]:
    """What determines a cell's numbers: the base config minus steps at their neutral default."""
    return {k: v for k, v in _base(cfg).items() if not _is_neutral(v)}


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_id(cfg: DictConfig) -> str:
    """The cell's identity (identity v2): ``digest(canonical(cfg))``."""
    return digest(canonical(cfg))


V1_GROUPS = ("data", "model", "train", "prune", "attack", "attribution")  # the groups v1 hashed


def legacy_ids(cfg: DictConfig) -> list[str]:
    """The cell's id under identity v1, if the cell could be expressed then (else [])."""
    c = _base(cfg)
    objective, defend, prune = c.pop("objective", None), c.pop("defend", None), c.get("prune")
    if objective not in (None, {"name": "clean"}) or not isinstance(prune, dict):
        return []
    if any(isinstance(v, dict) and v.get(TARGET) for v in c.values()):
        return []
    for k in [k for k, v in c.items() if isinstance(v, dict) and k not in V1_GROUPS and k != "perf"]:
        if not _is_neutral(c.pop(k)):  # a group v1 did not have: only its `none` existed then
            return []
    if defend is None or defend.get("name") == NEUTRAL:
        ft = {"finetune_epochs": 0, "finetune_lr": 0.01}  # v1's defaults in every prune YAML
    elif defend.get("name") == "clean" and set(defend) == {"name", "epochs", "lr"}:
        ft = {"finetune_epochs": defend["epochs"], "finetune_lr": defend["lr"]}
    else:
        return []
    c["prune"] = {**prune, **ft}
    return [digest(c)]


def lookup_ids(cfg: DictConfig) -> list[str]:
    """Every id under which a FINISHED run of this cell may be stored, current first."""
    return [cell_id(cfg), *legacy_ids(cfg)]
