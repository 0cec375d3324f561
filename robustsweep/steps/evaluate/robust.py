"""The ``robust`` evaluator: clean accuracy, then the cell's attack (``attack`` group) on the
evaluation subset -> clean_acc, robust_acc, asr (definitions in robustsweep.steps.attacks).

It also says when the numbers describe a broken model rather than a robust one: a model whose
clean accuracy is within 1.5x of chance, or that predicts fewer than half of the classes, is
``collapsed`` (a pruned model predicting 2 of 10 digits has a tiny ASR because it is rarely right,
not because it is robust). Its asr/robust_acc are still logged; the tag and the summary's hatching
say how to read them, and the cliff search counts the cell as unsafe.

Per-image outcomes are kept (``outcomes.csv``: each evaluation image's test-split index, label,
clean and adversarial prediction, and for a worst-case ensemble the attack that broke it), so that
two cells on the same images compare as paired samples (McNemar, paired bootstrap:
``robustsweep.stats``). An ensemble's ``broken_by_<attack>`` metrics count the images each member
broke first.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from robustsweep.core.cost import Work
from robustsweep.core.device import attack_batch_size
from robustsweep.core.guards import attack_checked, frozen
from robustsweep.core.params import eps_label
from robustsweep.core.registry import TARGET
from robustsweep.steps.attacks import (
    FGSM,
    AttackFn,
    EvalResult,
    attack_norm,
    build_attack,
    check_attack_config,
    evaluate,
)
from robustsweep.steps.data import to_float
from robustsweep.steps.evaluate import (
    CellShape,
    EvalContext,
    Evaluator,
    Outcome,
    WorkItems,
    evaluators,
    register_evaluator,
)

log = logging.getLogger(__name__)

CHANCE_FACTOR = 1.5  # clean_acc <= 1.5 / n_classes: indistinguishable from guessing


@dataclass
class Robust:
    """What later evaluators read: the evaluation result and the attack that produced it."""

    res: EvalResult
    attack: AttackFn

    def adversarial(self, ctx: EvalContext, pos: torch.Tensor) -> torch.Tensor:
        """The adversarial images of evaluation positions ``pos`` (float, [0, 1]): what the
        attribution evaluators attribute as "adversarial inputs". Those the evaluation attacked
        (clean-correct, and declared by an evaluator's ``adversarial_of``) are its own adversarial
        examples, the ones the logged ASR counts; the rest (clean-wrong images, which the evaluation
        does not attack) get the cell's attack now: seeded, model frozen, through the guard."""
        x, y = to_float(ctx.ds.x_eval[pos]), ctx.ds.y_eval[pos]
        todo = [i for i, p in enumerate(pos.tolist()) if p not in self.res.kept]
        out = x.clone()
        for i, p in enumerate(pos.tolist()):
            if p in self.res.kept:
                out[i] = self.res.kept[p].to(out.dtype)
        if todo:
            t = torch.tensor(todo, device=x.device)
            torch.manual_seed(ctx.cfg.seed)
            with frozen(ctx.model):
                out[t] = attack_checked(self.attack, x[t], y[t], ctx.eps)[0].detach()
        return out


def is_collapsed(clean_acc: float, n_pred_classes: int, n_classes: int) -> bool:
    """Clean accuracy within ``CHANCE_FACTOR`` of chance, or fewer than half the classes predicted."""
    return clean_acc <= CHANCE_FACTOR / n_classes or n_pred_classes < n_classes / 2


def member_names(names: tuple[str, ...]) -> list[str]:
    """Metric-safe, unique names for an ensemble's members (``apgd-ce`` -> ``apgd_ce``; a second
    ``apgd`` -> ``apgd_2``)."""
    out: list[str] = []
    for n in names:
        base = "".join(ch if ch.isalnum() else "_" for ch in n.rsplit(".", 1)[-1].lower())
        name, k = base, 1
        while name in out:
            k += 1
            name = f"{base}_{k}"
        out.append(name)
    return out


def broken_by_counts(res: EvalResult) -> dict[str, float]:
    """``broken_by_<member>``: the images each ensemble member broke (first, in order)."""
    assert res.broken_by is not None
    return {f"broken_by_{n}": float((res.broken_by == i).sum())
            for i, n in enumerate(member_names(res.attack_names))}


def write_outcomes(path: Path, eval_idx: torch.Tensor, y: torch.Tensor, res: EvalResult) -> None:
    """One row per evaluation image: ``index`` (in the test split), ``label``, ``clean_pred``,
    ``adv_pred``, ``broken_by`` (the member's name; empty when none or not an ensemble)."""
    names = member_names(res.attack_names)
    cols = [t.detach().cpu().tolist() for t in (eval_idx, y, res.clean_pred, res.adv_pred)]
    broken = res.broken_by.cpu().tolist() if res.broken_by is not None else [-1] * len(y)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "clean_pred", "adv_pred", "broken_by"])
        for i, lab, c, a, b in zip(*cols, broken, strict=True):
            w.writerow([i, lab, c, a, names[b] if b >= 0 else ""])


def run(ctx: EvalContext) -> Outcome:
    cfg, ds, eps = ctx.cfg, ctx.ds, ctx.eps
    torch.manual_seed(cfg.seed)  # PGD's random start
    t0 = time.perf_counter()
    attack = build_attack(ctx.fast, eps, cfg.attack, n_classes=len(ds.classes), seed=cfg.seed)
    batch = attack_batch_size(cfg, ds.x_eval.device)
    # FGSM's loss is a batch mean: the sign is the same at any batch size, short of underflow to 0
    direction = ctx.memo.get("fgsm_direction", "fgsm", batch) if isinstance(attack, FGSM) else None
    # the adversarial examples later evaluators will attribute, kept rather than attacked again
    wanted = [ev.adversarial_of(ctx) for ev in evaluators()
              if ev.adversarial_of is not None and ev.on(cfg)]
    keep = torch.cat(wanted).unique() if wanted else None
    res = evaluate(ctx.fast, attack, ds.x_eval, ds.y_eval, eps, batch,
                   desc=f"{cfg.attack.get('name') or 'attack'} eps={eps_label(eps, attack_norm(cfg.attack))}",
                   clean_pred=ctx.memo.get("clean_pred"), direction=direction, keep=keep)
    ctx.memo.put("clean_pred", res.clean_pred)
    if res.direction is not None:
        ctx.memo.put("fgsm_direction", res.direction, "fgsm", batch)
    n_classes = len(ds.classes)
    n_pred = int(res.clean_pred.unique().numel())
    collapsed = is_collapsed(res.clean_acc, n_pred, n_classes)
    metrics: dict[str, float] = {
        "clean_acc": res.clean_acc, "robust_acc": res.robust_acc, "asr": res.asr,
        "n_eval": res.n_eval, "n_correct": res.n_correct, "n_fooled": res.n_fooled,
        "attack_s": time.perf_counter() - t0,
        # Work done: images through forward + input-gradient (0 for FGSM with a reused direction;
        # below n_correct * steps for PGD with early_stop).
        "attack_n_grad": res.n_grad,
        "guard_n_batches": res.n_batches_checked, "guard_max_dist": res.max_dist,
        "n_pred_classes": n_pred, "collapsed": float(collapsed),
    }
    if res.attack_names:
        metrics.update(broken_by_counts(res))
    write_outcomes(ctx.stage / "outcomes.csv", ds.eval_idx, ds.y_eval, res)
    if collapsed:
        log.warning("collapsed model: clean_acc %.3f (chance %.3f), %d of %d classes predicted: "
                    "asr/robust_acc of this cell describe a broken model", res.clean_acc,
                    1 / n_classes, n_pred, n_classes)
    log.info("clean_acc %.4f  robust_acc %.4f  asr %.4f  (n_eval %d, n_correct %d)",
             res.clean_acc, res.robust_acc, res.asr, res.n_eval, res.n_correct)
    return Outcome(metrics, {"collapsed"} if collapsed else set(), Robust(res, attack))


def _work(cfg: DictConfig, cell: CellShape) -> WorkItems | None:
    """Clean predictions once per model; the attack on every image (the correct ones, at most all)
    and the adversarial predictions per cell; FGSM's direction once per model (the memo)."""
    if cell.attack_work is None:
        return None
    n = cell.n_eval
    fgsm = cfg.attack.get("name") == "fgsm" and not cfg.attack.get(TARGET)
    return [(("clean", cell.model), Work(fwd=n)),
            (("fgsm", cell.model) if fgsm else None, cell.attack_work * n), (None, Work(fwd=n))]


register_evaluator(Evaluator(
    name="robust", work=_work, group="attack", optional=False, run=run,
    check=lambda cfg: check_attack_config(cfg.attack, cfg),
    metrics=("clean_acc", "robust_acc", "asr", "n_eval", "n_correct", "n_fooled", "attack_s",
             "attack_n_grad", "guard_n_batches", "guard_max_dist", "n_pred_classes", "collapsed"),
    metric_prefixes=("broken_by_",),
    reasons={"collapsed": "the compressed model is degenerate (clean accuracy within 1.5x of chance, "
                          "or fewer than half of the classes predicted): its asr/robust_acc describe "
                          "a broken model, not a robust one"},
))
