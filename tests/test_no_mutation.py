"""Nothing that is handed a model hands it back changed (issue 32).

The pipeline builds one compressed model per process and hands it, and a bf16 ``Autocast`` wrapper
of it (``ctx.fast``), to every evaluator of every cell that shares it. A function that leaves it
changed changes the numbers of the evaluators and cells after it, silently: the pipeline's hash
guard sees weights and BatchNorm statistics, not a module left in train mode (BatchNorm then
normalises with batch statistics), a hook, ``requires_grad`` or a flag. Issue 32: ``attacks.evaluate``
handed the bf16 wrapper left the wrapped model in train mode, and a later Integrated Gradients
check in the same process was off by 0.92.

"The same" is ``tests.conftest.model_snapshot``: every state tensor, each module's type, train/eval
flag, hooks and plain attributes, each parameter's ``requires_grad`` and ``.grad``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustsweep.config import compose, validate
from robustsweep.steps.attacks import ATTACKS, build_attack, evaluate
from robustsweep.steps.data import to_float
from robustsweep.steps.efficiency import measure
from robustsweep.steps.models import with_amp
from tests.conftest import FAST, isolated_overrides, model_snapshot, snapshot_diff

CONF = Path(__file__).resolve().parents[1] / "conf"


# ------------------------------------------------------------------------ how a model may arrive
def _arrivals(trained: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(how, the model to inspect, what the function is handed), each a copy of ``trained``:
    eval; train; train mode with BatchNorm frozen in eval (fine-tuning on top of fixed statistics:
    a module's mode differs from its children's); and the perf.amp=bf16 wrapper the pipeline hands
    the attacks (a new ``Autocast`` is in train mode around an eval model: the modes differ again)."""
    m = copy.deepcopy(trained).eval()
    yield "eval", m, m
    m = copy.deepcopy(trained).train()
    yield "train", m, m
    m = copy.deepcopy(trained).train()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.eval()
    yield "train, BatchNorm eval", m, m
    m = copy.deepcopy(trained).eval()
    yield "bf16 wrapper", m, with_amp(m, "bf16")


def _assert_same(before: dict[str, Any], model: nn.Module, what: str) -> None:
    diff = snapshot_diff(before, model_snapshot(model))
    assert not diff, f"{what} changed the model it was handed:\n  " + "\n  ".join(diff[:20])


# ------------------------------------------------------------------------------------- attacks
def _attack_cfg(name: str) -> DictConfig:
    """conf/attack/<name>.yaml with its costs cut to a smoke test (2 steps, 20 queries): the
    question is what the attack leaves behind, not how strong it is."""
    node = OmegaConf.load(CONF / "attack" / f"{name}.yaml")
    cut = {"steps": 2, "n_queries": 20, "n_restarts": 1}
    for k, v in cut.items():
        if k in node:
            node[k] = v
    for member in node.get("attacks") or []:
        for k, v in cut.items():
            if k in member:
                member[k] = v
    node.batch_size = 4
    return node


ATTACK_CONFIGS = sorted(p.stem for p in (CONF / "attack").glob("*.yaml"))


def test_every_registered_attack_has_a_config_here():
    """So that the test below covers each one (a new attack needs its conf/attack YAML anyway)."""
    assert set(ATTACKS) <= set(ATTACK_CONFIGS), set(ATTACKS) - set(ATTACK_CONFIGS)


@pytest.mark.parametrize("name", ATTACK_CONFIGS)
def test_evaluate_gives_back_the_model_as_it_came(digits_model, name):
    """``attacks.evaluate`` with every attack config, on a model however it arrives: unchanged.
    (The trained digits model, copied: an untrained one predicts one class everywhere, so that
    AutoAttack's Square would spend all its 5000 queries on every image.)"""
    trained, ds, _ = digits_model
    node = _attack_cfg(name)
    eps = 1.0 if node.get("norm") == "l2" else 0.2
    x, y = to_float(ds.x_eval[:6]), ds.y_eval[:6]
    failures = []
    for how, model, handed in _arrivals(trained):
        before = model_snapshot(model)
        torch.manual_seed(0)
        attack = build_attack(handed, eps, node, n_classes=10, seed=0)
        evaluate(handed, attack, x, y, eps, int(node.batch_size))
        if diff := snapshot_diff(before, model_snapshot(model)):
            failures.append(f"{how}: " + "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else ""))
    assert not failures, f"evaluate with attack={name} changed the model it was handed:\n  " + \
        "\n  ".join(failures)


def test_measure_gives_back_the_model_as_it_came(digits_model):
    for how, model, handed in _arrivals(digits_model[0]):
        if handed is not model:
            continue  # efficiency measures the compressed model itself, never the wrapper
        before = model_snapshot(model)
        measure(handed, (1, 8, 8), torch.device("cpu"), DictConfig({"latency": False}))
        _assert_same(before, model, f"efficiency.measure ({how})")


# ---------------------------------------------------------------------------------- evaluators
def _every_evaluator_cfg(tmp: Path, *extra: str) -> DictConfig:
    """Every evaluator on, each as cheap as it goes (quant needs quantize=int8: see ``extra``)."""
    return validate(compose([
        *isolated_overrides(tmp), *FAST, "device=cpu", "epsilon=0.1",
        "attribution.n_images=2", "attribution.n_steps=8", "attribution.max_n_steps=16",
        "checks.n_probe=8", "transfer=dense", "certify=ibp", "min_norm=bisect", "min_norm.n_bisect=2",
        "min_norm.steps=2", "drift=ig", "drift.n_images=4", "drift.n_steps=8", "drift.max_n_steps=8",
        "drift.n_boot=20", "drift.n_random=4", *extra]))


@pytest.mark.parametrize("variant", ["float", "bf16 wrapper, torchattacks attack", "int8"])
def test_every_evaluator_gives_back_the_model_as_it_came(digits_model_copy, tmp_path, variant):
    """``run_evaluators`` with every registered evaluator on, as the pipeline calls it (one model,
    its ``fast`` twin, the dense baseline beside it): the model and the dense baseline unchanged.
    A new evaluator that this config does not switch on fails the coverage assert: add its
    overrides above."""
    from robustsweep.core.device import amp_name
    from robustsweep.core.guards import state_hash
    from robustsweep.steps import compress
    from robustsweep.steps.evaluate import EvalContext, evaluators, run_evaluators

    model, ds, _ = digits_model_copy
    dense = copy.deepcopy(model)
    # the int8 model has no certificate (its kernels are not what the bounds model): no certify there
    extra, off = {"float": (("attack=pgd", "attack.steps=2"), {"quant"}),
                  "bf16 wrapper, torchattacks attack": (("attack=mifgsm", "attack.steps=2", "perf.amp=bf16"),
                                                        {"quant"}),
                  "int8": (("attack=pgd", "attack.steps=2", "prune=global_l1", "quantize=int8", "certify=none"),
                           {"certify"})}[variant]
    cfg = _every_evaluator_cfg(tmp_path, *extra)
    if variant == "int8":
        compress.finalize(compress.compress(model, cfg, ds))
    model.eval()
    ds = dataclasses.replace(ds, eval_idx=ds.eval_idx[:48])  # 48 images: the checks, not the numbers
    enabled = {ev.name for ev in evaluators() if ev.on(cfg)}
    wanted = {ev.name for ev in evaluators()} - off
    assert enabled == wanted, f"evaluators this test does not switch on: {sorted(wanted - enabled)}"

    before, before_dense = model_snapshot(model), model_snapshot(dense)
    ctx = EvalContext(cfg=cfg, model=model, fast=with_amp(model, amp_name(cfg)), model_hash=state_hash(model),
                      ds=ds, eps=0.1, stage=tmp_path / "stage", title="test", dense=lambda: dense)
    metrics, _ = run_evaluators(ctx)
    assert set(ctx.results) == enabled and metrics
    _assert_same(before, model, f"run_evaluators ({variant})")
    _assert_same(before_dense, dense, f"run_evaluators ({variant}), on the dense baseline")


# ------------------------------------------------------------------------------- the guard itself
def test_the_fixture_guard_names_what_a_test_left_changed(digits_model_copy):
    """``model_snapshot``/``snapshot_diff`` (what conftest's autouse guard compares after each test
    that uses ``digits_model``) see each kind of change that leaves the hash alone."""
    model = digits_model_copy[0]
    base = model_snapshot(model)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    p = next(model.parameters())
    saved = bn.running_mean.clone()
    changes: list[tuple[str, Callable[[], Any], Callable[[Any], Any]]] = [
        ("training", lambda: model.train(), lambda _: model.eval()),
        ("training", lambda: bn.train(), lambda _: bn.eval()),
        ("_forward_hooks", lambda: bn.register_forward_hook(lambda *_: None), lambda h: h.remove()),
        ("_forward_pre_hooks", lambda: model.register_forward_pre_hook(lambda *_: None), lambda h: h.remove()),
        ("requires_grad", lambda: p.requires_grad_(not p.requires_grad),
         lambda _: p.requires_grad_(not p.requires_grad)),
        ("attribute", lambda: setattr(bn, "momentum", 0.5), lambda _: setattr(bn, "momentum", 0.1)),
        ("state", lambda: bn.running_mean.add_(1e-3), lambda _: bn.running_mean.copy_(saved)),
    ]
    for kind, do, undo in changes:
        token = do()
        diff = snapshot_diff(base, model_snapshot(model))
        assert diff and all(line.startswith(kind) for line in diff), (kind, diff)
        undo(token)
    assert not snapshot_diff(base, model_snapshot(model))
