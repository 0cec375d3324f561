"""Efficiency metrics (robustsweep.steps.efficiency) and channel removal (prune=channel): each
method changes what it claims, measured on the model, and bad input is refused before any run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from robustsweep.config import ConfigError, validate
from robustsweep.steps.channel import channel_counts, remove_channels
from robustsweep.steps.data import to_float
from robustsweep.steps.efficiency import count_flops, count_params, latency_ms, measure, size_bytes
from robustsweep.steps.prune import apply_pruning, make_permanent


def test_flops_params_and_bytes_match_a_hand_count():
    """Conv 1->2, 3x3, padding 1 on 8x8 (2*9*64 = 1152 multiply-adds) then Linear 128->10 (1280):
    2 FLOPs per multiply-add, biases and elementwise ops not counted."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(128, 10, bias=False))
    assert count_flops(net, torch.rand(1, 1, 8, 8)) == 2 * (1152 + 1280)
    with torch.no_grad():
        net[0].weight.zero_()
    total, nonzero = count_params(net)
    assert (total, nonzero) == (18 + 1280, 1280)
    size, zipped = size_bytes(net)
    assert 4 * total < size < 4 * total + 1024  # float32 payload + a small JSON header
    assert zipped < size


def test_latency_is_finite_and_positive_and_runs_at_least_min_repeats():
    calls = []
    net = nn.Linear(4, 2)
    net.register_forward_hook(lambda *_: calls.append(1))
    ms = latency_ms(net, torch.rand(3, 4), warmup=2, min_repeats=5, min_seconds=0.0)
    assert math.isfinite(ms) and ms > 0
    assert len(calls) == 2 + 5


def test_unstructured_pruning_changes_nonzeros_only_and_channel_removal_shrinks_everything(digits_model):
    model, ds, _ = digits_model
    dense = measure(model, tuple(ds.x_test.shape[1:]), torch.device("cpu"))
    masked = copy.deepcopy(model)
    make_permanent(apply_pruning(masked, "global_l1", 0.5, ["conv", "linear"]))
    m = measure(masked, tuple(ds.x_test.shape[1:]), torch.device("cpu"))
    assert m["params_total"] == dense["params_total"] and m["flops"] == dense["flops"]
    assert m["size_mb"] == dense["size_mb"] and m["size_mb_zipped"] < dense["size_mb_zipped"]
    assert m["params_nonzero"] < 0.6 * dense["params_nonzero"]

    thin = copy.deepcopy(model)
    before = channel_counts(thin)
    out = remove_channels(thin, 0.5, "l1", to_float(ds.x_test[:2]), len(ds.classes))
    after = channel_counts(thin)
    assert all(after[n] == before[n] // 2 for n in before), (before, after)
    assert out["sparsity_measured"] == pytest.approx(0.5)
    c = measure(thin, tuple(ds.x_test.shape[1:]), torch.device("cpu"))
    assert c["params_total"] < 0.5 * dense["params_total"] and c["flops"] < 0.5 * dense["flops"]
    assert c["size_mb"] < 0.5 * dense["size_mb"]
    assert 1 - c["params_total"] / dense["params_total"] == pytest.approx(out["params_removed"])
    assert thin(to_float(ds.x_test[:5])).shape == (5, len(ds.classes))  # still a working classifier


def test_channel_importances_choose_by_their_own_criterion(digits_model):
    """l1 is deterministic; random depends on its seed; taylor (gradients on images) and random
    keep other channels than l1 (DepGraph's l1 is the group norm over every layer a channel
    couples, so it is not the first conv's weight norm alone: that is not asserted)."""
    model, ds, _ = digits_model
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight.detach()
    calib = (to_float(ds.x_test[:64]), ds.y_test[:64])

    def kept(imp: str, seed: int = 0) -> frozenset[int]:
        thin = copy.deepcopy(model)
        remove_channels(thin, 0.5, imp, to_float(ds.x_test[:2]), len(ds.classes), calib=calib, seed=seed)
        w = next(m for m in thin.modules() if isinstance(m, nn.Conv2d)).weight.detach()
        return frozenset(int((first - k).abs().sum((1, 2, 3)).argmin()) for k in w)

    assert kept("l1") == kept("l1") and len(kept("l1")) == first.shape[0] // 2
    assert kept("random", 1) != kept("random", 2)
    assert kept("taylor") != kept("l1") and kept("random", 1) != kept("l1")


def test_a_cell_with_prune_channel_logs_efficiency_and_the_channel_ratio(make_cfg):
    from robustsweep.pipeline import run

    out = run(validate(make_cfg("prune=channel", "sparsity=0.25", "attribution=none",
                                "efficiency.min_seconds=0")))
    assert out["sparsity_measured"] == pytest.approx(0.25, abs=0.02)
    for k in ("params_total", "params_nonzero", "size_mb", "size_mb_zipped", "flops", "latency_ms_b1",
              "latency_ms_b64"):
        assert math.isfinite(out[k]) and out[k] > 0, k
    dense = run(validate(make_cfg("attribution=none", "efficiency.latency=false")))
    assert dense["params_total"] > out["params_total"] and "latency_ms_b1" not in dense


def test_bad_compression_input_is_refused_before_any_run(make_cfg):
    bad = [
        (("prune=channel", "sparsity=0.99"),
         r"sparsity=0.99.*channel ratio in \[0, 0\.9688\].*32 output.*would keep none"),
        (("prune=channel", "prune.importance=hessian"),
         r"prune.importance='hessian'.*l1 or l2 or taylor or random"),
        (("prune=channel", "prune.n_calib=0"), r"prune.n_calib=0"),
        (("prune=channel", "prune.layers=[conv,linear]"), r"prune.layers=.*\[conv\]"),
        (("efficiency.min_repeats=0",), r"efficiency.min_repeats=0.*integer > 0"),
        (("efficiency.min_seconds=-1",), r"efficiency.min_seconds=-1"),
    ]
    for overrides, match in bad:
        with pytest.raises(ConfigError, match=match):
            validate(make_cfg(*overrides))


def test_efficiency_settings_do_not_change_a_cells_identity(make_cfg):
    from robustsweep.tracking.identity import cell_id

    assert cell_id(make_cfg()) == cell_id(make_cfg("efficiency.latency=false", "efficiency.min_repeats=3"))


def test_pareto_front_and_figure():
    """The front keeps the points nothing beats on both axes; the figure draws one row per
    (attack, eps) with a point per cell."""
    from robustsweep.summary import pareto, pareto_front

    cost, acc = [1.0, 2.0, 3.0, 1.5, 4.0], [0.5, 0.6, 0.4, 0.45, 0.7]
    assert pareto_front(cost, acc, higher_is_better=True) == [0, 1, 4]
    assert pareto_front(cost, acc, higher_is_better=False) == [0, 3, 2]

    def cell(method, s, lat, size, ra):
        return {"attack.name": "fgsm", "attack.norm": "linf", "prune.method": method, "sparsity": s,
                "epsilon": 0.1, "latency_ms_b64": lat, "size_mb_zipped": size, "robust_acc": ra,
                "asr": 1 - ra, "suspect": "", "n_pred_classes": 10}

    cells = [cell("none", 0.0, 10, 1.0, 0.3), cell("channel", 0.5, 4, 0.3, 0.2),
             cell("global_l1", 0.5, 10, 0.6, 0.31)]
    fig = pareto(cells)
    assert len(fig.axes) == 2 and len(fig.axes[0].collections) == 3  # robust accuracy vs latency, vs size
    assert {t.get_text() for t in fig.axes[0].texts} == {"dense", "channel 0.50", "global_l1 0.50"}
    assert pareto([{**c, "latency_ms_b64": float("nan")} for c in cells]) is None


def test_fake_quantization_matches_a_hand_rounding_and_keeps_pruned_zeros():
    from robustsweep.steps.quantize import levels_per_channel, quantize_weight

    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    w[0] = 0.0  # an all-zero channel stays zero
    w[1, 0] = 0.0  # pruned weights stay zero
    for bits in (8, 6, 4, 2):
        qmax = 2 ** (bits - 1) - 1
        scale = w.reshape(6, -1).abs().amax(1).clamp_min(1e-30).view(-1, 1, 1, 1) / qmax
        ref = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
        q = quantize_weight(w, bits)
        assert torch.allclose(q, ref, atol=1e-6), bits
        assert levels_per_channel(q) <= 2 ** bits - 1
        assert (q[0] == 0).all() and (q[1, 0] == 0).all()
    assert levels_per_channel(quantize_weight(w, 2)) == 3


def test_a_cell_with_pruning_and_fake_quantization_measures_both(make_cfg):
    from robustsweep.pipeline import run

    out = run(validate(make_cfg("prune=global_l1", "sparsity=0.5", "quantize=fake", "quantize.bits=4",
                                "attribution=none", "efficiency.latency=false")))
    assert out["quant_bits"] == 4 and 3 <= out["quant_levels_max"] <= 15
    assert out["sparsity_measured"] >= 0.5  # rounding only adds zeros
    dense8 = run(validate(make_cfg("prune=none", "quantize=fake", "quantize.bits=8", "attribution=none",
                                   "efficiency.latency=false")))
    dense = run(validate(make_cfg("prune=none", "attribution=none", "efficiency.latency=false")))
    assert abs(dense8["clean_acc"] - dense["clean_acc"]) <= 0.02  # 8 bits: nearly the float model
    assert "quant_bits" not in dense


def test_bad_quantization_input_is_refused_and_none_keeps_cell_ids(make_cfg):
    from omegaconf import OmegaConf

    from robustsweep.tracking.identity import cell_id

    for overrides, match in [(("quantize=fake", "quantize.bits=9"), r"quantize.bits=9.*\{2..8\}"),
                             (("quantize=fake", "quantize.bits=1"), r"quantize.bits=1"),
                             (("quantize=fake", "quantize.layers=[]"), r"quantize.layers"),
                             (("quantize.name=int4",), r"quantize.name='int4' is not valid; allowed: .*fake")]:
        with pytest.raises(ConfigError, match=match):
            validate(make_cfg(*overrides))
    cfg = make_cfg()
    without = cfg.copy()
    OmegaConf.set_struct(without, False)
    del without["quantize"]
    assert cell_id(cfg) == cell_id(without)


@pytest.fixture(scope="module")
def int8_pair(digits_model):
    """The digits CNN pruned 50 % (global_l1) and quantized to int8, through the compress stages."""
    from robustsweep.config import compose
    from robustsweep.steps import compress

    model, ds, cfg = digits_model
    cfg = validate(compose(["prune=global_l1", "sparsity=0.5", "quantize=int8", "device=cpu",
                            f"paths.output_dir={cfg.paths.output_dir}"]))
    m = copy.deepcopy(model)
    measured = compress.finalize(compress.compress(m, cfg, ds))
    return m.eval(), ds, measured


def test_int8_twin_agrees_and_gives_gradients_while_the_int8_model_scores(int8_pair):
    from robustsweep.steps.evaluate.quant import check_twin_gradient
    from robustsweep.steps.quantize import pairs, twin_mode

    m, ds, measured = int8_pair
    (pair,) = pairs(m)
    x = to_float(ds.x_test)
    assert measured["quant_bits"] == 8
    with torch.inference_mode():
        scored = m(x)
        assert torch.equal(scored, pair.int8((x - m.mean) / m.std))  # the int8 network decides
        with twin_mode(m):
            twin = m(x)
    assert (scored.argmax(1) == twin.argmax(1)).float().mean() >= 0.99
    assert not torch.equal(scored, twin)  # two different computations
    assert any(t.is_quantized for t in m.state_dict().values())  # what is stored is the int8 model
    check_twin_gradient(m, x[:8], ds.y_test[:8])  # does not raise
    c = measure(m, tuple(ds.x_test.shape[1:]), torch.device("cpu"))
    assert c["flops"] > 0 and c["params_nonzero"] < 0.6 * c["params_total"]  # pruned zeros survive int8


def test_a_twin_without_input_gradient_is_an_error():
    from robustsweep.steps.evaluate.quant import TwinGradientError, check_twin_gradient
    from robustsweep.steps.quantize import Int8Pair

    class Constant(nn.Module):  # no graph to the input (as torchao's pt2e int8 graph), or a zero one
        def __init__(self, detach: bool) -> None:
            super().__init__()
            self.detach = detach

        def forward(self, x):
            return torch.zeros(len(x), 3) + 0 * (x.detach() if self.detach else x).sum()

    for detach in (True, False):
        with pytest.raises(TwinGradientError, match="silently do nothing"):
            check_twin_gradient(Int8Pair(Constant(detach), Constant(detach)), torch.rand(2, 1, 4, 4),
                                torch.tensor([0, 1]))


def test_a_cell_with_int8_logs_agreement_and_the_twin_asr(make_cfg):
    from robustsweep.pipeline import run

    out = run(validate(make_cfg("quantize=int8", "device=cpu", "attack=pgd", "attribution=none",
                                "efficiency.latency=false")))
    assert out["quant_agreement"] >= 0.99 and 0 <= out["asr_twin"] <= 1 and 0 <= out["asr"] <= 1
    assert out["size_mb"] < 0.5 * run(validate(make_cfg("attribution=none", "efficiency.latency=false",
                                                         "sparsity=0")))["size_mb"]


def test_bad_int8_input_is_refused(make_cfg):
    for overrides, match in [(("quantize.backend=tpu",), r"quantize.backend=.tpu.*backend of this torch"),
                             (("quantize.n_calib=0",), r"quantize.n_calib=0"),
                             (("quantize.min_agreement=2",), r"quantize.min_agreement=2.*\[0, 1\]"),
                             (("perf.amp=bf16",), r"perf.amp='bf16'.*none with quantize=int8")]:
        with pytest.raises(ConfigError, match=match):
            validate(make_cfg("quantize=int8", "device=cpu", *overrides))


def test_a_collapsed_cell_is_drawn_but_never_on_the_pareto_front():
    from robustsweep.summary import pareto

    def cell(method, s, lat, ra, suspect=""):
        return {"attack.name": "fgsm", "attack.norm": "linf", "prune.method": method, "sparsity": s,
                "epsilon": 0.1, "latency_ms_b64": lat, "size_mb_zipped": lat, "robust_acc": ra,
                "asr": 1 - ra, "suspect": suspect, "n_pred_classes": 10}

    cells = [cell("none", 0.0, 10, 0.3), cell("channel", 0.75, 2, 0.5, "collapsed")]
    ax = pareto(cells).axes[0]
    (front,) = ax.lines
    assert list(front.get_xdata()) == [10]  # only the dense cell


def test_cells_that_differ_in_quantization_never_share_a_compressed_model(make_cfg):
    """The quant evaluator reads the quantize group, but quantize builds the model: the per-process
    reuse key must keep it (it once dropped it, and a float cell reused an int8 model)."""
    from robustsweep.tracking.reuse import pruned_key

    keys = {pruned_key(validate(make_cfg(*o)), "cpu") for o in
            [(), ("quantize=fake", "quantize.bits=4"), ("quantize=fake", "quantize.bits=8"),
             ("quantize=int8", "device=cpu")]}
    assert len(keys) == 4
    assert pruned_key(validate(make_cfg("epsilon=0.2")), "cpu") == pruned_key(validate(make_cfg()), "cpu")


def test_a_latency_measured_under_load_is_flagged_and_kept_off_the_latency_front(monkeypatch):
    """The figure of a busy machine is kept (latency_ms_*) but flagged, and pareto.png leaves the cell
    off its latency front (the size front still has it)."""
    from robustsweep.steps import efficiency
    from robustsweep.summary import pareto

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    med, spread = efficiency.latency_stats(net, torch.rand(1, 1, 8, 8), min_repeats=20, min_seconds=0.0)
    assert med > 0 and spread >= 0
    timings = {"spread": 0.05}  # the measurement itself, made deterministic: (median ms, IQR / median)
    monkeypatch.setattr(efficiency, "latency_stats", lambda *a, **k: (1.5, timings["spread"]))
    monkeypatch.setattr(efficiency.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    calm = efficiency.measure(net, (1, 8, 8), torch.device("cpu"))
    assert calm["latency_noisy"] == 0.0 and calm["load_per_core"] == 0.0 and calm["latency_ms_b1"] == 1.5
    monkeypatch.setattr(efficiency.os, "getloadavg", lambda: (64.0, 64.0, 64.0))  # a busy machine
    assert efficiency.measure(net, (1, 8, 8), torch.device("cpu"))["latency_noisy"] == 1.0
    monkeypatch.setattr(efficiency.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    timings["spread"] = 0.6  # repeats that scatter
    assert efficiency.measure(net, (1, 8, 8), torch.device("cpu"))["latency_noisy"] == 1.0

    def cell(s, lat, ra, suspect=""):
        return {"attack.name": "fgsm", "attack.norm": "linf", "prune.method": "l1_unstructured", "sparsity": s,
                "epsilon": 0.1, "latency_ms_b64": lat, "size_mb_zipped": 1 - s, "robust_acc": ra,
                "asr": 1 - ra, "suspect": suspect, "n_pred_classes": 10}

    fig = pareto([cell(0.0, 10, 0.3), cell(0.5, 0.1, 0.4, "latency_noisy")])
    (latency_front,) = fig.axes[0].lines
    (size_front,) = fig.axes[1].lines
    assert list(latency_front.get_xdata()) == [10]  # the noisy cell is not on the latency front
    assert list(size_front.get_xdata()) == [0.5]  # its size is not noise (and it dominates there)
