"""One job: validate -> data -> dense baseline -> prune -> attack -> attribute -> MLflow run.

``run(cfg)`` is a plain function (no Hydra needed: tests call it with a composed config) and
returns the metrics dict, so any Hydra sweeper can optimise any metric.

The MLflow run opens right after validation, so anything that fails later (data, training,
attack) leaves a FAILED run with the error as a tag. In a multirun the run is a child of the
sweep's parent run. A cell whose FINISHED run is already in the store is not computed again
(``tracking.resume=false`` forces it); its stored metrics are returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from robustsweep import checks, reuse, sweep, tracking
from robustsweep.attacks import (
    FGSM,
    AttackFn,
    attack_checked,
    attack_kwargs,
    build_attack,
    evaluate,
    frozen,
)
from robustsweep.attribution import Attributions, integrated_gradients, plot_attributions
from robustsweep.config import amp_name, attack_batch_size, resolve_device, resolve_path, validate
from robustsweep.data import Dataset, load_dataset, to_float
from robustsweep.models import with_amp
from robustsweep.prune import apply_pruning, make_permanent, measured_sparsity
from robustsweep.train import get_baseline, train_model

log = logging.getLogger(__name__)

METRIC_NAMES = ("clean_acc", "robust_acc", "asr", "n_eval", "n_correct", "sparsity_measured",
                "ig_delta")
SANITY_METRICS = ("sanity_n_probe", "sanity_asr_eps0", "sanity_asr_noise", "sanity_asr_fgsm",
                  "sanity_asr_pgd", "sanity_asr_unbounded")
# Everything run() returns (ig_* only with attribution on, sanity_* with checks.sanity): what a
# sweeper may optimise.
RETURNED_METRICS = (*METRIC_NAMES, "n_fooled", "baseline_test_acc", "n_pred_classes", "attack_s",
                    "attack_n_grad", "ig_s", "job_s", "mlflow_s", "guard_n_batches", "guard_max_dist",
                    "ig_n_steps", "ig_n_incomplete", *SANITY_METRICS, "sanity_s", "peak_rss_mb",
                    "cuda_peak_mb")


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process so far (MB), and peak CUDA memory allocated by torch."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@contextlib.contextmanager
def _artifact_dir() -> Iterator[Path]:
    """Where a job writes files before logging them: the Hydra job dir, else a temp dir."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        yield Path(HydraConfig.get().runtime.output_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="robustsweep-") as d:
            yield Path(d)


def run(cfg: DictConfig) -> dict[str, float]:
    """Run one (model, prune, sparsity, attack, eps) cell and log it as one MLflow run."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    t_start = time.perf_counter()
    cfg = validate(cfg)
    out_dir = resolve_path(cfg.paths.output_dir)
    tracking.preflight(cfg)  # writable, with room: a clear error now, not a traceback later

    experiment_id = tracking.setup(cfg)
    client = tracking.Client()
    cid = sweep.cell_id(cfg)
    tags = {sweep.CELL_TAG: cid, sweep.ROLE_TAG: "cell", **tracking.hydra_tags()}
    parent = sweep.parent_run_id()
    if parent and "hydra.sweep.dir" in tags:  # a single run has no parent
        tags["mlflow.parentRunId"] = parent
        if os.environ.get(sweep.TRIAL_ENV):  # a trial of an Optuna study
            tags["optuna.trial_number"] = os.environ[sweep.TRIAL_ENV]
            tags["optuna.study_name"] = os.environ.get(sweep.STUDY_ENV, "")
    if cfg.tracking.get("resume", True):
        done = sweep.finished_cells(client, experiment_id, [cid])
        if done:
            log.info("cell %s already FINISHED in run %s: skipped (tracking.resume=false re-runs it)",
                     cid, done[cid])
            prev = client.get_run(done[cid])
            if "optuna.trial_number" in tags and prev.data.tags.get("mlflow.parentRunId") != parent:
                _reuse_as_child(client, experiment_id, prev, tags, cfg)
            return dict(prev.data.metrics)
    sweep.fail_stale_runs(client, experiment_id, cid)
    t_mlflow = time.perf_counter()
    active = tracking.retry_locked(mlflow.start_run, experiment_id=experiment_id,
                                   run_name=tracking.run_name(cfg), tags=tags)
    # Params first, so that a cell which fails later still shows what it was.
    client.log_batch(active.info.run_id, params=tracking.param_entities(cfg))
    mlflow_s = time.perf_counter() - t_mlflow
    with _artifact_dir() as job_dir, active:
        try:
            metrics, run_tags = _compute(cfg, job_dir / "mlflow", out_dir)
        except BaseException as e:
            client.set_tag(active.info.run_id, sweep.ERROR_TAG, f"{type(e).__name__}: {e}"[:4000])
            raise
        # One batched call for metrics + tags, one for the artifact folder.
        t_mlflow = time.perf_counter()
        metrics["job_s"] = time.perf_counter() - t_start
        metrics.update(peak_memory_mb(resolve_device(cfg.device)))
        now = int(time.time() * 1000)
        client.log_batch(
            active.info.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in run_tags.items()])
        mlflow.log_artifacts(str(job_dir / "mlflow"))
        mlflow_s += time.perf_counter() - t_mlflow
        client.log_metric(active.info.run_id, "mlflow_s", mlflow_s, now)
    metrics["mlflow_s"] = mlflow_s
    return metrics


def _reuse_as_child(client: Any, experiment_id: str, prev: Any, tags: dict[str, str],
                    cfg: DictConfig) -> None:
    """A study trial whose cell another sweep already computed: a FINISHED child run under the
    study's parent with the stored metrics and a pointer to the original, so that every trial
    is a child run without computing anything twice."""
    from mlflow.entities import Metric

    run = client.create_run(experiment_id, run_name=tracking.run_name(cfg),
                            tags={**tags, "robustsweep.reused_from": prev.info.run_id})
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id,
                     metrics=[Metric(k, v, now, 0) for k, v in prev.data.metrics.items()],
                     params=tracking.param_entities(cfg))
    client.set_terminated(run.info.run_id, "FINISHED")


def _compute(cfg: DictConfig, stage: Path, out_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """The numbers and files of one cell (staged in ``stage`` for one upload), and its tags:
    where the dense baseline came from (trained / cache / checkpoint), the model's hash, and
    ``suspect`` when a sanity check failed (robustsweep.checks)."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.perf.cudnn_benchmark)
    eps = float(cfg.epsilon)
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    ds = load_dataset(cfg.data, device)
    model, base, sparsity, model_hash = _pruned_model(cfg, ds, device, out_dir)

    # Attacking and attributing must leave the pruned model bit-identical (checked by hash).
    with checks.unchanged(model, "attacking and attributing", before=model_hash):
        try:
            metrics, suspect = _attack_and_attribute(model, model_hash, ds, cfg, eps, sparsity, stage)
        except BaseException:
            reuse.PRUNED.drop(reuse.pruned_key(cfg, device))  # whatever happened, rebuild next time
            raise
    metrics["baseline_test_acc"] = float(base["test_acc"])
    tags = {"robustsweep.baseline": base["source"], "robustsweep.model_sha256": model_hash,
            "robustsweep.checks": "guards passed: input range, adversarial batches, model unchanged"}
    if suspect:
        tags[checks.SUSPECT_TAG] = ",".join(sorted(suspect))
        for r in sorted(suspect):
            log.warning("suspect cell (%s): %s", r, checks.REASONS[r])
    return metrics, tags


def _pruned_model(cfg: DictConfig, ds: Dataset, device: torch.device,
                  out_dir: Path) -> tuple[torch.nn.Module, dict[str, Any], float, str]:
    """The pruned model in eval mode, its baseline's info, measured sparsity and state hash:
    from this process's cache (robustsweep.reuse) when an earlier job built the same one."""
    key = reuse.pruned_key(cfg, device)
    hit = reuse.PRUNED.get(key)
    if hit is not None:
        model, base, sparsity, model_hash = hit
        if checks.state_hash(model) == model_hash:
            log.info("reusing the pruned model of an earlier job (%s, sparsity %.4f)",
                     cfg.prune.method, sparsity)
            return model, {**base, "source": f"{base['source']}+reused"}, sparsity, model_hash
        log.warning("a cached pruned model has changed since it was built: rebuilding it")
        reuse.PRUNED.drop(key)

    model, base = get_baseline(cfg, ds, device, out_dir / "cache" / "baselines")
    # ---- prune (optionally fine-tune with the masks in place), then make it permanent
    targets = apply_pruning(model, cfg.prune.method, cfg.sparsity, cfg.prune.layers,
                            cfg.prune.get("exclude") or (), seed=cfg.seed)
    if cfg.prune.method != "none" and cfg.sparsity > 0 and cfg.prune.finetune_epochs > 0:
        train_model(model, ds, cfg.train, seed=cfg.seed, epochs=cfg.prune.finetune_epochs,
                    lr=cfg.prune.finetune_lr, desc="finetune")
    make_permanent(targets)
    model.eval()
    sparsity = measured_sparsity(targets)
    if cfg.prune.method == "none" and cfg.sparsity > 0:
        log.warning("prune.method=none: sparsity=%s is ignored (measured %.4f)", cfg.sparsity, sparsity)
    log.info("pruned %d tensors with %s to measured sparsity %.4f (asked %.4f)",
             len(targets), cfg.prune.method, sparsity, cfg.sparsity)
    model_hash = checks.state_hash(model)
    info = {"source": base["source"], "test_acc": base["test_acc"]}
    reuse.PRUNED.put(key, (model, info, sparsity, model_hash))
    return model, base, sparsity, model_hash


def _attack_and_attribute(model: torch.nn.Module, model_hash: str, ds: Dataset, cfg: DictConfig,
                          eps: float, sparsity: float, stage: Path) -> tuple[dict[str, float], set[str]]:
    """Attack the eval subset, run the sanity probe, attribute; the metrics and suspect reasons."""
    # ---- attack (bf16 autocast when perf.amp says so; the hash guard watches the shared weights)
    fast = with_amp(model, amp_name(cfg))
    torch.manual_seed(cfg.seed)  # PGD's random start
    t0 = time.perf_counter()
    attack = build_attack(fast, eps, cfg.attack)
    batch = attack_batch_size(cfg, ds.x_eval.device)
    key = reuse.images_key(cfg, model_hash)
    # FGSM's loss is a batch mean: the sign is the same at any batch size, short of underflow to 0
    dkey = reuse.images_key(cfg, model_hash, "fgsm", batch)
    clean_pred = reuse.CLEAN_PRED.get(key)
    direction = reuse.FGSM_DIRECTION.get(dkey) if isinstance(attack, FGSM) else None
    res = evaluate(fast, attack, ds.x_eval, ds.y_eval, eps, batch,
                   desc=f"{cfg.attack.name} eps={eps * 255:.3g}/255", clean_pred=clean_pred,
                   direction=direction)
    reuse.CLEAN_PRED.put(key, res.clean_pred)
    if res.direction is not None:
        reuse.FGSM_DIRECTION.put(dkey, res.direction)
    metrics: dict[str, float] = {
        "clean_acc": res.clean_acc, "robust_acc": res.robust_acc, "asr": res.asr,
        "n_eval": res.n_eval, "n_correct": res.n_correct, "n_fooled": res.n_fooled,
        "sparsity_measured": sparsity, "attack_s": time.perf_counter() - t0,
        # Work done: images through forward + input-gradient (0 for FGSM with a reused direction;
        # below n_correct * steps for PGD with early_stop).
        "attack_n_grad": res.n_grad,
        "guard_n_batches": res.n_batches_checked, "guard_max_dist": res.max_dist,
        # A collapsed model predicts one class: its ASR says nothing about robustness.
        "n_pred_classes": int(res.clean_pred.unique().numel()),
    }
    if res.clean_acc <= 1.5 / len(ds.classes):
        log.warning("clean_acc %.3f is near chance (1/%d classes, %d distinct predictions): "
                    "asr/robust_acc of this cell describe a broken model",
                    res.clean_acc, len(ds.classes), metrics["n_pred_classes"])

    log.info("clean_acc %.4f  robust_acc %.4f  asr %.4f  (n_eval %d, n_correct %d)  sparsity %.4f",
             res.clean_acc, res.robust_acc, res.asr, res.n_eval, res.n_correct, sparsity)
    suspect: set[str] = set()

    # ---- sanity of the attack result (Carlini et al. 2019) on the first correct images
    if cfg.checks.sanity and cfg.attack.name != "none" and cfg.checks.n_probe > 0:
        t0 = time.perf_counter()
        idx = (res.clean_pred == ds.y_eval).nonzero().flatten()[:cfg.checks.n_probe]
        y_probe = ds.y_eval[idx]
        # The cell's own attack already ran on these images: reuse its result.
        own = {cfg.attack.name: float((res.adv_pred[idx] != y_probe).float().mean())} \
            if cfg.attack.name in ("fgsm", "pgd") else {}
        def memo(check: str, e: float, overrides: dict[str, Any], compute: Any) -> float:
            # What this check attacks with: the cell's attack settings under the overrides.
            key = reuse.images_key(cfg, model_hash, "sanity", check, e, cfg.seed, len(idx),
                                   attack_kwargs(cfg.attack, **overrides) if check != "noise" else {})
            if (v := reuse.SANITY.get(key)) is None:
                reuse.SANITY.put(key, v := compute())
            return v

        with frozen(model):
            sanity = checks.sanity_probe(
                fast, lambda e, o: build_attack(fast, e, cfg.attack, **o), cfg.attack.name,
                to_float(ds.x_eval[idx]), y_probe, eps, cfg.checks.tol, seed=cfg.seed, known=own,
                memo=memo)
        metrics.update(sanity.metrics())
        metrics["sanity_s"] = time.perf_counter() - t0
        suspect.update(sanity.reasons)

    # ---- attribute
    k = min(cfg.attribution.n_images, res.n_eval)
    if k > 0:
        t0 = time.perf_counter()
        attr = _attribute(model, model_hash, attack, ds, k, cfg, eps, sparsity, stage / "ig")
        metrics.update(ig_delta=attr.mean_abs_delta, ig_n_steps=attr.n_steps,
                       ig_n_incomplete=attr.n_incomplete, ig_s=time.perf_counter() - t0)
        if attr.n_incomplete:
            suspect.add("ig_incomplete")
    return metrics, suspect


def _attribute(model: torch.nn.Module, model_hash: str, attack: AttackFn, ds: Dataset, k: int,
               cfg: DictConfig, eps: float, sparsity: float, out: Path) -> Attributions:
    """IG on k fixed images, clean and attacked; write figure + raw arrays."""
    idx = ds.showcase_idx(k)
    x, y = to_float(ds.x_test[idx]), ds.y_test[idx]
    torch.manual_seed(cfg.seed)
    with frozen(model):
        x_adv = attack_checked(attack, x, y, eps)[0].detach()
    a = cfg.attribution
    # The clean half does not depend on the attack or eps: one per model and images.
    key = reuse.images_key(cfg, model_hash, "ig", OmegaConf.to_container(a, resolve=True),
                           idx.tolist())
    attr, clean = integrated_gradients(model, x, x_adv, y, idx, a.n_steps, a.baseline,
                                       a.internal_batch_size, max_n_steps=a.get("max_n_steps"),
                                       clean=reuse.IG_CLEAN.get(key))
    reuse.IG_CLEAN.put(key, clean)
    fig = plot_attributions(
        attr, ds.classes,
        f"{cfg.model.name} {cfg.prune.method} sparsity {sparsity:.2f} | {cfg.attack.name} "
        f"eps {eps * 255:.3g}/255 | IG {attr.n_steps} steps, {a.baseline} baseline")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "ig_maps.png", dpi=110)
    attr.save_npz(str(out / "attributions.npz"))
    return attr
