"""One job: validate -> data -> dense baseline -> prune -> attack -> attribute -> MLflow run.

``run(cfg)`` is a plain function (no Hydra needed: tests call it with a composed config) and
returns the metrics dict, so any Hydra sweeper can optimise any metric.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from robustsweep import tracking
from robustsweep.attacks import AttackFn, build_attack, check_adversarial, evaluate, frozen
from robustsweep.attribution import integrated_gradients, plot_attributions
from robustsweep.config import ConfigError, resolve_device, resolve_path, validate
from robustsweep.data import Dataset, load_dataset, to_float
from robustsweep.prune import apply_pruning, make_permanent, measured_sparsity
from robustsweep.train import get_baseline, train_model

log = logging.getLogger(__name__)

METRIC_NAMES = ("clean_acc", "robust_acc", "asr", "n_eval", "n_correct", "sparsity_measured",
                "ig_delta")


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

    t_start = time.perf_counter()
    cfg = validate(cfg)
    device = resolve_device(cfg.device)
    out_dir = resolve_path(cfg.paths.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"paths.output_dir={cfg.paths.output_dir!r} cannot be created: {e}") from e
    eps = float(cfg.epsilon)

    ds = load_dataset(cfg.data, device)
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

    # ---- MLflow run: everything from here on is recorded (a failure marks it FAILED)
    experiment_id = tracking.setup(cfg)
    tags = {"robustsweep.baseline": base["source"], **tracking.hydra_tags()}
    with (_artifact_dir() as job_dir,
          mlflow.start_run(experiment_id=experiment_id, run_name=tracking.run_name(cfg), tags=tags)):
        mlflow.log_params(tracking.params_of(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

        torch.manual_seed(cfg.seed)  # PGD's random start
        t0 = time.perf_counter()
        attack = build_attack(model, eps, cfg.attack)
        res = evaluate(model, attack, ds.x_eval, ds.y_eval, eps, cfg.attack.batch_size,
                       desc=f"{cfg.attack.name} eps={eps * 255:.3g}/255")
        attack_s = time.perf_counter() - t0

        metrics: dict[str, float] = {
            "clean_acc": res.clean_acc, "robust_acc": res.robust_acc, "asr": res.asr,
            "n_eval": res.n_eval, "n_correct": res.n_correct, "n_fooled": res.n_fooled,
            "sparsity_measured": sparsity, "baseline_test_acc": float(base["test_acc"]),
            "attack_s": attack_s,
            # A collapsed model predicts one class: its ASR says nothing about robustness.
            "n_pred_classes": int(res.clean_pred.unique().numel()),
        }
        if res.clean_acc <= 1.5 / len(ds.classes):
            log.warning("clean_acc %.3f is near chance (1/%d classes, %d distinct predictions): "
                        "asr/robust_acc of this cell describe a broken model",
                        res.clean_acc, len(ds.classes), metrics["n_pred_classes"])

        k = min(cfg.attribution.n_images, res.n_eval)
        if k > 0:
            t0 = time.perf_counter()
            metrics["ig_delta"] = _attribute(model, attack, ds, k, cfg, eps, sparsity, job_dir)
            metrics["ig_s"] = time.perf_counter() - t0

        metrics["job_s"] = time.perf_counter() - t_start
        mlflow.log_metrics(metrics)

    log.info("clean_acc %.4f  robust_acc %.4f  asr %.4f  (n_eval %d, n_correct %d)  sparsity %.4f",
             res.clean_acc, res.robust_acc, res.asr, res.n_eval, res.n_correct, sparsity)
    return metrics


def _attribute(model: torch.nn.Module, attack: AttackFn, ds: Dataset, k: int, cfg: DictConfig,
               eps: float, sparsity: float, job_dir: Path) -> float:
    """IG on k fixed images, clean and attacked; log figure + raw arrays; return mean |delta|."""
    import matplotlib.pyplot as plt
    import mlflow

    idx = ds.showcase_idx(k)
    x, y = to_float(ds.x_test[idx]), ds.y_test[idx]
    torch.manual_seed(cfg.seed)
    with frozen(model):
        x_adv = attack(x, y).detach()
    check_adversarial(x, x_adv, eps)
    a = cfg.attribution
    attr = integrated_gradients(model, x, x_adv, y, idx, a.n_steps, a.baseline, a.internal_batch_size)
    fig = plot_attributions(
        attr, ds.classes,
        f"{cfg.model.name} {cfg.prune.method} sparsity {sparsity:.2f} | {cfg.attack.name} "
        f"eps {eps * 255:.3g}/255 | IG {a.n_steps} steps, {a.baseline} baseline")
    png, npz = job_dir / "ig_maps.png", job_dir / "attributions.npz"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    attr.save_npz(str(npz))
    mlflow.log_artifact(str(png), "ig")
    mlflow.log_artifact(str(npz), "ig")
    return attr.mean_abs_delta
