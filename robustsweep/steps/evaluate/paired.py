"""The ``paired`` evaluator: every cell against its reference, image by image.

A cell's *reference* is the same condition uncompressed: the dense baseline it was compressed from
(sparsity 0, no quantization, no defend fine-tune; same training objective, seed and checkpoint),
attacked with the cell's attack, eps and seed on the cell's evaluation images. Comparing levels of
two cells mixes the effect with the images each model happens to get right (``asr`` is over a
model's own correctly classified images, so a pruned model that lost the hard images is scored on
the easy ones); the differences here are paired:

* ``delta_clean_acc``, ``delta_robust_acc``: cell minus reference, per image (0/1), with a paired
  bootstrap 95 % interval (``_lo``/``_hi``) and the exact McNemar p (``_mcnemar_p``);
* ``asr_common``: the cell's ASR on the images *both* models classify correctly (``n_common``), beside
  the reference's on the same images (``asr_common_ref``), and ``delta_asr_common`` with its interval
  and McNemar p over those images.

The reference's per-image outcome is computed once per (dense model, images, attack, eps, seed,
arithmetic) and cached on disk under ``<output_dir>/cache/reference/`` (content-keyed, written
atomically), so a sweep's cells -- in one process, in joblib or SLURM workers, or in a later
command -- attack the dense model once, never relying on the order in which cells run. The
uncompressed cell writes its own outcome there and logs differences of exactly 0. Its rows are
also written to ``outcomes.csv`` (``ref_clean_pred``, ``ref_adv_pred``), so that the report can
aggregate replicates (seeds, then images) from the cells' artifacts alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from robustsweep.core.checkpoint import atomic_write_bytes
from robustsweep.core.cost import Work
from robustsweep.core.device import amp_name, attack_batch_size
from robustsweep.core.params import eps_label
from robustsweep.core.paths import resolve_path
from robustsweep.core.stats import paired_deltas
from robustsweep.steps import data
from robustsweep.steps.attacks import attack_kwargs, attack_norm, build_attack, evaluate
from robustsweep.steps.evaluate import CellShape, EvalContext, Evaluator, Outcome, WorkItems, register_evaluator
from robustsweep.steps.models import with_amp

log = logging.getLogger(__name__)

N_BOOT = 2000  # bootstrap resamples per interval (seeded with the cell's seed)
DELTAS = ("delta_clean_acc", "delta_robust_acc", "delta_asr_common")
METRICS = ("ref_clean_acc", "ref_robust_acc", "ref_asr", "n_common", "asr_common", "asr_common_ref",
           *(f"{d}{s}" for d in DELTAS for s in ("", "_lo", "_hi", "_mcnemar_p")), "reference_s")


@dataclass
class Reference:
    """The reference's predictions on the evaluation images (int64, n_eval each)."""

    clean_pred: torch.Tensor
    adv_pred: torch.Tensor


def reference_key(ctx: EvalContext) -> str:
    """What determines the reference's outcome: the dense model's hash, the images, the attack as
    built, eps, seed, arithmetic and device (hex SHA-256)."""
    cfg = ctx.cfg
    blob = {"dense": ctx.dense_hash, "data": data.identity(cfg.data), "n_eval": cfg.data.get("n_eval"),
            "subset_seed": cfg.data.get("subset_seed", 0), "attack": attack_kwargs(cfg.attack),
            "eps": float(ctx.eps), "seed": int(cfg.seed), "amp": amp_name(cfg),
            "device": str(ctx.ds.x_eval.device.type)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cache_path(ctx: EvalContext):  # -> Path
    return resolve_path(ctx.cfg.paths.output_dir) / "cache" / "reference" / f"{reference_key(ctx)}.pt"


def _load(ctx: EvalContext) -> Reference | None:
    path = _cache_path(ctx)
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: recompute rather than trust it
        log.warning("reference outcome %s unreadable (%s): attacking the dense model again", path, e)
        return None
    if not torch.equal(saved["eval_idx"], ctx.ds.eval_idx.cpu()):
        log.warning("reference outcome %s was made on other images: attacking the dense model again", path)
        return None
    return Reference(saved["clean_pred"], saved["adv_pred"])


def _save(ctx: EvalContext, ref: Reference) -> None:
    buf = io.BytesIO()
    torch.save({"eval_idx": ctx.ds.eval_idx.cpu(), "clean_pred": ref.clean_pred.cpu(),
                "adv_pred": ref.adv_pred.cpu()}, buf)
    path = _cache_path(ctx)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def _attack_dense(ctx: EvalContext) -> Reference:
    """The cell's attack on the dense baseline, seeded as the robust evaluator seeds it."""
    cfg, ds = ctx.cfg, ctx.ds
    dense = ctx.dense()
    fast = with_amp(dense, amp_name(cfg))
    torch.manual_seed(cfg.seed)
    attack = build_attack(fast, ctx.eps, cfg.attack, n_classes=len(ds.classes), seed=cfg.seed)
    res = evaluate(fast, attack, ds.x_eval, ds.y_eval, ctx.eps, attack_batch_size(cfg, ds.x_eval.device),
                   desc=f"reference: {cfg.attack.get('name') or 'attack'} "
                        f"eps={eps_label(ctx.eps, attack_norm(cfg.attack))} on the dense model")
    return Reference(res.clean_pred.cpu(), res.adv_pred.cpu())


def compare(y: np.ndarray, cell: Reference, ref: Reference, seed: int = 0,
            n_boot: int = N_BOOT) -> dict[str, float]:
    """The paired metrics of a cell against its reference on the same images (labels ``y``)."""
    c_ok, r_ok = cell.clean_pred.numpy() == y, ref.clean_pred.numpy() == y
    return paired_deltas(r_ok, r_ok & (ref.adv_pred.numpy() == y), c_ok, c_ok & (cell.adv_pred.numpy() == y),
                         n_boot=n_boot, seed=seed)


def run(ctx: EvalContext) -> Outcome:
    t0 = time.perf_counter()
    res = ctx.results["robust"].res
    cell = Reference(res.clean_pred.cpu(), res.adv_pred.cpu())
    if ctx.model_hash == ctx.dense_hash:  # this cell is its own reference: share it
        ref, stored = cell, _load(ctx)
        if stored is not None and not (torch.equal(stored.clean_pred, cell.clean_pred)
                                       and torch.equal(stored.adv_pred, cell.adv_pred)):
            log.warning("the cached reference outcome differs from this uncompressed cell's own on %d "
                        "images (a nondeterministic attack or arithmetic): replacing it with this one",
                        int((stored.adv_pred != cell.adv_pred).sum()))
            stored = None
        if stored is None:
            _save(ctx, ref)
    else:
        ref = _load(ctx)
        if ref is None:
            log.info("reference: the cell's attack on the dense baseline, same images (cached for every "
                     "cell compressed from it)")
            ref = _attack_dense(ctx)
            _save(ctx, ref)
    metrics = compare(ctx.ds.y_eval.cpu().numpy(), cell, ref, seed=int(ctx.cfg.seed))
    metrics["reference_s"] = time.perf_counter() - t0
    _append_reference(ctx, ref)
    log.info("against the dense reference (same images): clean %+.4f [%+.4f, %+.4f], robust %+.4f "
             "[%+.4f, %+.4f], asr on the %d images both classify %+.4f [%+.4f, %+.4f]",
             metrics["delta_clean_acc"], metrics["delta_clean_acc_lo"], metrics["delta_clean_acc_hi"],
             metrics["delta_robust_acc"], metrics["delta_robust_acc_lo"], metrics["delta_robust_acc_hi"],
             int(metrics["n_common"]), metrics["delta_asr_common"], metrics["delta_asr_common_lo"],
             metrics["delta_asr_common_hi"])
    return Outcome(metrics)


def _append_reference(ctx: EvalContext, ref: Reference) -> None:
    """Add ``ref_clean_pred``/``ref_adv_pred`` columns to the robust evaluator's outcomes.csv."""
    path = ctx.stage / "outcomes.csv"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    rows = [f"{lines[0]},ref_clean_pred,ref_adv_pred"]
    for line, c, a in zip(lines[1:], ref.clean_pred.tolist(), ref.adv_pred.tolist(), strict=True):
        rows.append(f"{line},{c},{a}")
    path.write_text("\n".join(rows) + "\n")


def _work(cfg: DictConfig, cell: CellShape) -> WorkItems | None:
    """The cell's attack on the dense baseline, once per attack and eps (cached on disk); nothing for
    an uncompressed cell, its own reference."""
    if cell.model == cell.dense:
        return []
    if cell.attack_work is None:
        return None
    n = cell.n_eval
    return [(("reference", cell.dense, cell.attack), cell.attack_work * n + Work(fwd=2 * n))]


register_evaluator(Evaluator(name="paired", group="attack", optional=False, run=run, reads=("robust",),
                             metrics=METRICS,
                             work=_work))
