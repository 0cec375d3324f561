"""One cell, top to bottom: validate -> open its MLflow run -> data -> baseline -> compress ->
defend -> measure its efficiency -> evaluate -> log.

``run(cfg)`` is a plain function (no Hydra needed: tests call it with a composed config) and
returns the metrics dict, so any Hydra sweeper can optimise any metric the steps declare
(``returned_metrics()``). Resume, the sweep's parent run and Optuna's trial plumbing live in the
tracking layer (robustsweep.tracking.cellrun); what the jobs of one process share, in
robustsweep.tracking.reuse.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from robustsweep.config import validate
from robustsweep.core.device import amp_name, resolve_device
from robustsweep.core.guards import state_hash, unchanged
from robustsweep.core.params import eps_label
from robustsweep.steps import compress, efficiency, evaluate
from robustsweep.steps.attacks import attack_norm
from robustsweep.steps.data import Dataset, load_dataset
from robustsweep.steps.defend import defend
from robustsweep.steps.models import with_amp
from robustsweep.steps.train import baseline_cache_dir, get_baseline
from robustsweep.tracking import reuse
from robustsweep.tracking.cellrun import open_cell
from robustsweep.tracking.store import component, later_stages, prune_label
from robustsweep.tracking.sweep import SUSPECT_TAG

log = logging.getLogger(__name__)

# The pipeline's own metrics; the steps declare theirs (each compression stage's, each evaluator's).
PIPELINE_METRICS = ("baseline_test_acc", "job_s", "mlflow_s", "peak_rss_mb", "cuda_peak_mb")


def returned_metrics() -> tuple[str, ...]:
    """Every metric name ``run`` may return (what a sweeper may optimise, what cells.csv lists)."""
    return (*evaluate.declared_metrics(), *compress.stage_metrics(), *efficiency.METRICS, *PIPELINE_METRICS)


def run(cfg: DictConfig) -> dict[str, float]:
    """Run one cell (model, compression, defence, attack, eps) and log it as one MLflow run."""
    t_start = time.perf_counter()
    cfg = validate(cfg)
    with open_cell(cfg) as cell:
        if cell.stored is not None:  # FINISHED before (resume): its stored metrics
            return cell.stored
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(cfg.perf.cudnn_benchmark)
        ds = load_dataset(cfg.data, device)
        m = compressed_model(cfg, ds, device)  # baseline -> compress -> defend (shared per process)
        try:
            # Evaluating must leave the compressed model bit-identical (checked by hash).
            with unchanged(m.model, "attacking and attributing", before=m.model_hash):
                metrics, reasons = evaluate.run_evaluators(evaluate.EvalContext(
                    cfg=cfg, model=m.model, fast=with_amp(m.model, amp_name(cfg)), model_hash=m.model_hash,
                    ds=ds, eps=float(cfg.epsilon), stage=cell.stage, title=_title(cfg, m.measured),
                    memo=_memo(cfg, m.model_hash), dense=lambda: _baseline(cfg, ds, device)[0],
                    dense_memo=_memo(cfg, m.dense_hash), dense_hash=m.dense_hash))
        except BaseException:
            reuse.PRUNED.drop(reuse.pruned_key(cfg, device))  # whatever happened, rebuild next time
            raise
        metrics.update(m.measured, baseline_test_acc=float(m.baseline["test_acc"]),
                       job_s=time.perf_counter() - t_start, **peak_memory_mb(device))
        if m.measured.get("latency_noisy"):  # measured once per compressed model, judged per cell
            reasons = {*reasons, "latency_noisy"}
        cell.log(metrics, {**_tags(m, reasons), "robustsweep.data_sha256": data_fingerprint(ds)})
    return cell.metrics


@dataclass
class Compressed:
    model: torch.nn.Module  # eval mode
    baseline: dict[str, Any]  # where the dense baseline came from (source, test_acc)
    measured: dict[str, float]  # what compress and efficiency measured (sparsity_measured, flops, ...)
    model_hash: str  # SHA-256 of the state_dict
    dense_hash: str  # the same of the dense baseline it was compressed from


def compressed_model(cfg: DictConfig, ds: Dataset, device: torch.device) -> Compressed:
    """The dense baseline, compressed and (optionally) fine-tuned: from this process's cache
    (robustsweep.tracking.reuse) when an earlier job built the same one."""
    key = reuse.pruned_key(cfg, device)
    hit = reuse.PRUNED.get(key)
    if hit is not None:
        if state_hash(hit.model) == hit.model_hash:
            log.info("reusing the compressed model of an earlier job (%s)", _title(cfg, hit.measured))
            return Compressed(hit.model, {**hit.baseline, "source": f"{hit.baseline['source']}+reused"},
                              hit.measured, hit.model_hash, hit.dense_hash)
        log.warning("a cached compressed model has changed since it was built: rebuilding it")
        reuse.PRUNED.drop(key)
    model, base = _baseline(cfg, ds, device)
    dense_hash = state_hash(model)
    # gradual pruning fine-tunes between its steps with the same defend step
    stages = compress.compress(model, cfg, ds, finetune=lambda: defend(model, cfg, ds, changed=True))
    defend(model, cfg, ds, changed=any(s.changed for s in stages))
    measured = compress.finalize(stages)
    model.eval()
    # what the compression bought: parameters, bytes, FLOPs, latency (of this model, on this device)
    measured.update(efficiency.measure(model, tuple(ds.x_test.shape[1:]), device, cfg.efficiency))
    m = Compressed(model, {"source": base["source"], "test_acc": base["test_acc"]}, measured, state_hash(model),
                   dense_hash)
    reuse.PRUNED.put(key, m)
    return m


def _memo(cfg: DictConfig, model_hash: str) -> evaluate.Memo:
    """What the jobs of this process share about one model and the evaluation images."""
    return reuse.ImagesMemo(cfg, model_hash) if cfg.perf.reuse else evaluate.NoMemo()


def _baseline(cfg: DictConfig, ds: Dataset, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The dense baseline: a user checkpoint, the cached one, or trained now (and cached)."""
    return get_baseline(cfg, ds, device, baseline_cache_dir(cfg))


def _title(cfg: DictConfig, measured: dict[str, float]) -> str:
    sparsity = measured.get("sparsity_measured", cfg.sparsity)
    # the stages after pruning that are on: " int8 8 bits"
    later = "".join(f" {component(node)}" + (f" {node.bits} bits" if node.get("bits") is not None else "")
                    for _, node in later_stages(cfg))
    return (f"{component(cfg.model)} {prune_label(cfg)} sparsity {sparsity:.2f}{later} | "
            f"{component(cfg.attack)} eps {eps_label(float(cfg.epsilon), attack_norm(cfg.attack))}")


def _tags(m: Compressed, reasons: set[str]) -> dict[str, str]:
    """Where the baseline came from, the model's hash, and ``suspect`` with the reasons."""
    tags = {"robustsweep.baseline": m.baseline["source"], "robustsweep.model_sha256": m.model_hash,
            "robustsweep.dense_sha256": m.dense_hash,
            "robustsweep.checks": "guards passed: input range, adversarial batches, model unchanged"}
    if reasons:
        tags[SUSPECT_TAG] = ",".join(sorted(reasons))
        words = {**evaluate.declared_reasons(), **efficiency.REASONS}
        for r in sorted(reasons):
            log.warning("suspect cell (%s): %s", r, words[r])
    return tags


def data_fingerprint(ds: Dataset) -> str:
    """SHA-256 (first 16 hex digits) of the evaluation images and labels as decoded: two cells with
    the same fingerprint were evaluated on the same pixels."""
    h = hashlib.sha256(ds.x_eval.cpu().numpy().tobytes())
    h.update(ds.y_eval.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process so far (MB), and peak CUDA memory allocated by torch."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out

