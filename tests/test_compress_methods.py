"""Compression as the literature does it (issue 30): BatchNorm recalibration after compression,
layer exclusion by role (first/last), gradual pruning on Zhu & Gupta's cubic schedule."""

from __future__ import annotations

import itertools

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from robustsweep import compose, run
from robustsweep.config import ConfigError, validate
from robustsweep.steps.compress import recalibrate_bn
from robustsweep.steps.models import build_model
from robustsweep.steps.prune import (
    expand_exclude,
    make_permanent,
    measured_sparsity,
    prune_targets,
    schedule,
    select_targets,
)
from robustsweep.tracking.identity import cell_id

FAST = ["attribution=none", "checks.sanity=false", "efficiency.latency=false"]  # with make_cfg's own


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model(OmegaConf.create({"name": "resnet_small"}), in_channels=3, num_classes=10, image_size=32,
                       mean=(0.5,) * 3, std=(0.25,) * 3)


# ---------------------------------------------------------------------------- BN recalibration
def test_recalibrate_bn_matches_the_batch_statistics_by_hand():
    """One batch: the running mean and (unbiased) variance become exactly that batch's, per channel;
    two batches of equal size: their average (momentum None = cumulative average)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(5.0)  # stale statistics
    bn.running_var.fill_(9.0)
    model = nn.Sequential(bn).eval()
    x = torch.rand(64, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    recalibrate_bn(model, x, batch_size=64)
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, x.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True), atol=1e-5)
    assert not model.training and bn.momentum == 0.1  # eval mode, the momentum restored
    recalibrate_bn(model, x, batch_size=32)
    means = torch.stack([x[:32].mean(dim=(0, 2, 3)), x[32:].mean(dim=(0, 2, 3))]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-6)


def test_bn_recalibration_in_a_cell_restores_a_collapsed_pruned_model(make_cfg):
    """Per-layer 75 % on the digits CNN collapses with the dense model's statistics; recalibrated on
    256 training images it recovers. The cell reports both accuracies, and at sparsity 0 nothing is
    recalibrated (the dense reference stays the baseline)."""
    base = [*FAST, "sparsity=0.75", "data.n_eval=null"]
    stale = run(make_cfg(*base))
    recal = run(make_cfg(*base, "compress.bn_recalibrate=256"))
    assert recal["test_acc_stale_bn"] == pytest.approx(stale["clean_acc"])
    assert recal["clean_acc"] == pytest.approx(recal["test_acc_stale_bn"] + recal["bn_recal_gain"])
    assert recal["bn_recal_gain"] > 0.05, recal
    assert 0 < recal["bn_recal_gain_lo"] <= recal["bn_recal_gain"] <= recal["bn_recal_gain_hi"]
    assert recal["bn_recal_mcnemar_p"] < 0.01
    dense = run(make_cfg(*FAST, "sparsity=0", "compress.bn_recalibrate=256"))
    assert "bn_recal_gain" not in dense


def test_new_keys_at_their_neutral_value_keep_every_cell_id():
    """bn_recalibrate=0 and schedule=oneshot are the cells computed before the keys existed."""
    plain = cell_id(validate(compose([])))
    neutral = ["compress.bn_recalibrate=0", "prune.schedule=oneshot", "prune.steps=7"]
    assert cell_id(validate(compose(neutral))) == plain
    assert cell_id(validate(compose(["compress.bn_recalibrate=256"]))) != plain
    assert cell_id(validate(compose(["prune.schedule=gradual", "defend=clean"]))) \
        != cell_id(validate(compose(["defend=clean"])))


# ---------------------------------------------------------------------------------- exclusion
def test_exclude_first_and_last_find_the_stem_and_the_classifier():
    model = _resnet()
    names = [n for n, _ in select_targets(model, ["conv", "linear"])]
    kept = [n for n, _ in select_targets(model, ["conv", "linear"], ["first", "last"])]
    assert set(names) - set(kept) == {names[0], names[-1]}
    assert isinstance(dict(model.named_modules())[names[0]], nn.Conv2d)
    assert isinstance(dict(model.named_modules())[names[-1]], nn.Linear)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ConfigError, match=r"^prune\.exclude=\['first'\].*no convolution for first"):
        expand_exclude(mlp, ["first"])


# --------------------------------------------------------------------------------- gradual
def test_cubic_schedule():
    node = OmegaConf.create({"schedule": "gradual", "steps": 4})
    s = schedule(node, 0.8)
    assert s == pytest.approx([0.8 * (1 - (1 - t / 4) ** 3) for t in (1, 2, 3, 4)])
    assert s[-1] == pytest.approx(0.8) and all(a < b for a, b in itertools.pairwise(s))
    assert schedule(OmegaConf.create({"schedule": "oneshot", "steps": 4}), 0.8) == [0.8]


@pytest.mark.parametrize("method", ["l1_unstructured", "global_l1"])
def test_gradual_keeps_earlier_zeros_and_ends_at_the_oneshot_count(method):
    """Between steps the weights move (a stand-in fine-tune); masked weights stay zero, each step's
    zeros include the previous step's, and the last step prunes exactly as many as one-shot."""
    from robustsweep.steps.prune import PRUNE_METHODS

    fn = PRUNE_METHODS.resolve(OmegaConf.create({"method": method}))
    oneshot = _resnet()
    t1 = select_targets(oneshot, ["conv", "linear"])
    prune_targets(t1, fn, method, 0.75, oneshot)
    make_permanent(t1)

    model = _resnet()
    targets = select_targets(model, ["conv", "linear"])
    g = torch.Generator().manual_seed(1)
    previous: list[torch.Tensor] = []
    for i, s in enumerate(schedule(OmegaConf.create({"schedule": "gradual", "steps": 3}), 0.75)):
        if i:
            with torch.no_grad():  # a fine-tune moves every trainable weight
                for _, m in targets:
                    m.weight_orig.add_(0.01 * torch.randn(m.weight_orig.shape, generator=g))
            for (_, m), z in zip(targets, previous, strict=True):
                assert (m.weight[z] == 0).all()  # masked weights did not come back
            make_permanent(targets)
        prune_targets(targets, fn, method, s, model)
        zeros = [(m.weight == 0) for _, m in targets]
        for z_old, z in zip(previous, zeros, strict=False):
            assert (z | ~z_old).all()  # every earlier zero is still pruned
        previous = zeros
    make_permanent(targets)
    assert sum(int((m.weight == 0).sum()) for _, m in targets) == sum(int((m.weight == 0).sum()) for _, m in t1)
    assert measured_sparsity(targets) == pytest.approx(0.75, abs=0.005)


def test_gradual_in_a_cell_fine_tunes_after_every_step(make_cfg, caplog):
    caplog.set_level("INFO")
    m = run(make_cfg(*FAST, "prune.schedule=gradual", "prune.steps=3", "defend=clean", "defend.epochs=1"))
    assert m["sparsity_measured"] == pytest.approx(0.5, abs=0.005)
    assert sum("finetune epoch 1/1" in r.getMessage() for r in caplog.records) == 3
    assert sum("gradual pruning: step" in r.getMessage() for r in caplog.records) == 2


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("overrides", "key", "words"), [
    (["compress.bn_recalibrate=-1"], "compress.bn_recalibrate", "[0, 1438]"),
    (["compress.bn_recalibrate=5000"], "compress.bn_recalibrate", "[0, 1438]"),
    (["model=custom", "model._target_=tests.nets.tiny_mlp", "compress.bn_recalibrate=64"],
     "compress.bn_recalibrate", "no BatchNorm"),
    (["prune.exclude=[first]", "model=custom", "model._target_=tests.nets.tiny_mlp"], "prune.exclude",
     "no convolution for first"),
    (["prune.schedule=gradual", "prune.steps=0", "defend=clean"], "prune.steps", "integer >= 1"),
    (["prune.schedule=gradual"], "prune.schedule", "defend=clean"),
    (["prune.schedule=gradual", "prune=random_unstructured", "defend=clean"], "prune.schedule", "oneshot"),
    (["prune.schedule=gradual", "prune=channel", "sparsity=0.25", "defend=clean"], "prune.schedule", "oneshot"),
    (["prune.schedule=slowly"], "prune.schedule", "oneshot or gradual"),
    (["prune=hydra", "defend=pgd_at", "prune.score_epochs=0"], "prune.score_epochs", "integer > 0"),
    (["prune=hydra"], "defend.name", "pgd_at, trades, fast_at, clean"),
    (["prune=hydra", "defend=noise"], "defend.name", "pgd_at, trades, fast_at, clean"),
    (["prune=hydra", "defend=pgd_at", "prune.scope=row"], "prune.scope", "layer or global"),
    (["prune=hydra", "defend=pgd_at", "prune.schedule=gradual"], "prune.schedule", "oneshot for prune=hydra"),
])
def test_bad_compression_settings_are_refused_before_any_run(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        validate(compose(overrides))
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and "allowed" in msg and words in msg, msg


# ------------------------------------------------------------------------------------- HYDRA
def test_hydra_top_k_passes_the_gradient_straight_through():
    from robustsweep.steps.hydra import _TopK

    s = torch.tensor([0.3, -2.0, 0.1, 1.0], requires_grad=True)
    mask = _TopK.apply(s, torch.tensor(0.3))
    assert mask.tolist() == [1.0, 1.0, 0.0, 1.0]
    (mask * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert s.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_hydra_scores_start_as_the_magnitude_mask_move_and_leave_the_weights_alone(make_cfg):
    """By hand: the initial scores sqrt(6/fan_in) * w / max|w| order each layer like |w|, so the
    first mask is torch's l1_unstructured mask; after score training every parameter is bit-identical,
    each mask keeps round((1 - s) n) weights and some kept weights differ from the magnitude mask."""
    from torch.nn.utils import prune as tprune

    from robustsweep.steps.data import load_dataset
    from robustsweep.steps.hydra import Scores, train_scores
    from robustsweep.steps.train import new_model

    cfg = validate(make_cfg("prune=hydra", "defend=clean", "sparsity=0.5", "prune.score_epochs=1"))
    ds = load_dataset(cfg.data)
    model = new_model(cfg, ds)
    targets = select_targets(model, ["conv", "linear"])
    for (_, m), s in zip(targets, Scores(targets, 0.5, "layer").scores, strict=True):
        fan_in = m.weight[0].numel()
        assert torch.allclose(s, (6 / fan_in) ** 0.5 * m.weight / m.weight.abs().max())
    init = [Scores(targets, 0.5, "layer").masks()[i] for i in range(len(targets))]
    for (_, m), mask in zip(targets, init, strict=True):
        w = m.weight.detach().contiguous()  # torch's mask code views the weight flat
        ref = tprune.L1Unstructured(amount=0.5).compute_mask(w, torch.ones_like(w))
        assert torch.equal(mask, ref)
    before = {k: v.clone() for k, v in model.named_parameters()}
    masks, moved = train_scores(model, targets, 0.5, cfg.prune, cfg, ds)
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
        assert v.requires_grad
    assert not any(hasattr(m, "parametrizations") for _, m in targets)
    for (_, m), mask in zip(targets, masks, strict=True):
        assert int(mask.sum()) == round(0.5 * m.weight.numel())
    assert 0 < moved < 1
    assert moved == pytest.approx(sum(float((m * (1 - m0)).sum()) for m, m0 in zip(masks, init, strict=True))
                                  / sum(float(m.sum()) for m in masks))
