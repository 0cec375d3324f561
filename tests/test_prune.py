"""Pruning: the measured sparsity is the requested one, and it survives save/load and fine-tuning."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from robustsweep.core.checkpoint import load_into, load_state, save_checkpoint
from robustsweep.steps.models import build_model
from robustsweep.steps.prune import (
    apply_pruning,
    make_permanent,
    mask_methods,
    measured_sparsity,
    select_targets,
)

METHODS = mask_methods()  # prune=channel removes channels instead: tests/test_efficiency.py


def _model(name: str = "resnet_small") -> nn.Module:
    torch.manual_seed(0)
    shape = (3, 32) if name != "small_cnn" else (1, 8)
    return build_model(OmegaConf.create({"name": name}), in_channels=shape[0], num_classes=10,
                       image_size=shape[1],
                       mean=(0.5,) * shape[0], std=(0.25,) * shape[0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("amount", [0.25, 0.5, 0.75])
def test_measured_sparsity_matches_request(method, amount):
    model = _model()
    targets = apply_pruning(model, method, amount, ["conv", "linear"])
    make_permanent(targets)
    assert measured_sparsity(targets) == pytest.approx(amount, abs=0.005)


def test_none_leaves_the_model_dense():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = apply_pruning(model, "none", 0.5, ["conv", "linear"])
    assert measured_sparsity(targets) == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pruning_is_permanent_no_masks_left():
    model = _model()
    targets = apply_pruning(model, "l1_unstructured", 0.5, ["conv", "linear"])
    make_permanent(targets)
    names = [k for k, _ in model.named_parameters()] + [k for k, _ in model.named_buffers()]
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in names)
    assert all(not m._forward_pre_hooks for _, m in targets)


def test_l1_removes_the_smallest_weights_per_layer():
    model = _model()
    targets = select_targets(model, ["conv", "linear"])
    w0 = targets[0][1].weight.detach().clone()
    make_permanent(apply_pruning(model, "l1_unstructured", 0.5, ["conv", "linear"]))
    w1 = targets[0][1].weight.detach()
    kept, removed = w0[w1 != 0].abs(), w0[w1 == 0].abs()
    assert removed.max() <= kept.min()


def test_ln_structured_removes_whole_output_channels_of_convs_only():
    model = _model()
    targets = apply_pruning(model, "ln_structured", 0.5, ["conv", "linear"])
    make_permanent(targets)
    assert all(isinstance(m, nn.Conv2d) for _, m in targets)
    for _, m in targets:
        per_channel_zero = (m.weight.flatten(1) == 0).all(1)
        assert per_channel_zero.float().mean().item() == pytest.approx(0.5, abs=0.07)


def test_exclude_patterns_and_layer_types():
    model = _model("small_cnn")
    names = [n for n, _ in select_targets(model, ["conv"])]
    assert names == ["net.0", "net.3"]
    assert [n for n, _ in select_targets(model, ["conv", "linear"], exclude=["net.0"])] == [
        "net.3", "net.8"]


def test_random_pruning_is_seeded():
    a, b = _model(), _model()
    make_permanent(apply_pruning(a, "random_unstructured", 0.5, ["conv"], seed=3))
    make_permanent(apply_pruning(b, "random_unstructured", 0.5, ["conv"], seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                  strict=True))


def test_pruned_model_saves_loads_and_predicts_the_same(tmp_path):
    model = _model().eval()
    targets = apply_pruning(model, "global_l1", 0.75, ["conv", "linear"])
    make_permanent(targets)
    path = tmp_path / "pruned.safetensors"
    digest = save_checkpoint(model, path)
    fresh = _model().eval()
    load_into(fresh, load_state(path, digest), str(path))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    fresh_targets = select_targets(fresh, ["conv", "linear"])
    assert measured_sparsity(fresh_targets) == pytest.approx(0.75, abs=0.005)


def test_finetuning_keeps_the_masks(digits_model):
    from robustsweep.steps.train import new_model, train_model

    _, ds, cfg = digits_model
    model = new_model(cfg, ds)
    targets = apply_pruning(model, "l1_unstructured", 0.5, ["conv", "linear"])
    train_model(model, ds, cfg.train, seed=0, epochs=1, lr=0.05)
    make_permanent(targets)
    assert measured_sparsity(targets) == pytest.approx(0.5, abs=0.005)


def test_resnet18_cifar_variant_prunes_and_predicts():
    model = _model("resnet18").eval()
    assert model.net.conv1.kernel_size == (3, 3) and model.net.conv1.stride == (1, 1)
    assert isinstance(model.net.maxpool, nn.Identity)
    targets = apply_pruning(model, "global_l1", 0.5, ["conv", "linear"])
    make_permanent(targets)
    assert measured_sparsity(targets) == pytest.approx(0.5, abs=0.005)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_width_halves_every_stage_and_keeps_torchvision_names():
    from robustsweep.steps.models import resnet18

    half, full = resnet18(3, 10, 32, width=32), resnet18(3, 10, 32)
    assert sum(p.numel() for p in full.parameters()) == 11_173_962  # torchvision's ResNet-18, CIFAR stem
    assert sum(p.numel() for p in half.parameters()) == 2_797_610
    assert [half.get_submodule(f"layer{i}")[1].conv2.out_channels for i in (1, 2, 3, 4)] == [32, 64, 128, 256]
    assert half.state_dict().keys() == full.state_dict().keys()
    with torch.no_grad():
        assert half.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_train_amp_is_checked_and_absent_from_cpu_recipes():
    from robustsweep.config import compose, validate
    from robustsweep.core.errors import ConfigError

    assert "amp" not in compose(["train=cifar"]).train  # their baseline cache keys are unchanged
    assert compose(["train=cifar_gpu"]).train.amp == "bf16"
    with pytest.raises(ConfigError, match=r"train\.amp.*fp8.*none or bf16"):
        validate(compose(["+train.amp=fp8"]))
