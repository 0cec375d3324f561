"""Integrated Gradients: completeness holds; the figure has the promised layout."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from robustsweep.core.guards import frozen
from robustsweep.steps.attacks import build_attack
from robustsweep.steps.data import to_float
from robustsweep.steps.evaluate.attribution import integrated_gradients, plot_attributions


def _attr(digits_model, k=3, n_steps=64):
    model, ds, _ = digits_model
    idx = ds.eval_idx[:k]
    x, y = to_float(ds.x_test[idx]), ds.y_test[idx]
    with frozen(model):
        x_adv = build_attack(model, 0.1, OmegaConf.create({"name": "fgsm", "batch_size": 8}))(x, y)
    return integrated_gradients(model, x, x_adv, y, idx, n_steps, "black", 64)[0], model, x, y


def test_ig_completeness(digits_model):
    a, model, x, y = _attr(digits_model)
    with torch.no_grad():
        fx = model(x).gather(1, y[:, None]).squeeze(1)
        f0 = model(torch.zeros_like(x)).gather(1, y[:, None]).squeeze(1)
    # attributions sum to F(x) - F(baseline) up to the reported delta, and the delta is small
    sums = a.ig_clean.reshape(len(y), -1).sum(1)
    np.testing.assert_allclose(sums - (fx - f0).numpy(), a.delta_clean, atol=1e-4)
    assert np.all(np.abs(a.delta_clean) <= np.maximum(0.05 * np.abs((fx - f0).numpy()), 1e-3))
    assert a.mean_abs_delta < 0.05


def test_ig_leaves_model_unchanged(digits_model):
    model = digits_model[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _attr(digits_model, k=2, n_steps=8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_figure_layout_and_shared_symmetric_scale(digits_model, tmp_path):
    a, *_ = _attr(digits_model, k=2, n_steps=16)
    fig = plot_attributions(a, [str(i) for i in range(10)], "test")
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 2 * 4
    for row in range(2):
        clean, adv = image_axes[4 * row + 1].images[0], image_axes[4 * row + 3].images[0]
        lo, hi = clean.get_clim()
        assert lo == -hi and (lo, hi) == adv.get_clim()
    fig.savefig(tmp_path / "f.png")
    a.save_npz(str(tmp_path / "a.npz"))
    z = np.load(tmp_path / "a.npz")
    assert z["ig_clean"].shape == z["images"].shape == (2, 1, 8, 8)


def test_attribution_reuses_the_evaluations_adversarial_examples(make_cfg, monkeypatch):
    """Issue 31: the attributed adversarial images are the ones the robust evaluator made and
    counted (the cell's attack is not run again on them); only images the evaluation did not attack
    (clean-wrong) are attacked now."""
    from robustsweep.pipeline import run
    from robustsweep.steps.evaluate import robust as robust_mod

    seen, attacked = [], []
    original = robust_mod.Robust.adversarial
    real_checked = robust_mod.attack_checked

    def spy(self, ctx, pos):
        out = original(self, ctx, pos)
        seen.append((self.res, pos.clone(), out.clone()))
        return out

    def counting(attack, x, y, eps):
        attacked.append(len(x))
        return real_checked(attack, x, y, eps)

    monkeypatch.setattr(robust_mod.Robust, "adversarial", spy)
    monkeypatch.setattr(robust_mod, "attack_checked", counting)
    run(make_cfg("attack=pgd", "attribution.n_images=4", "sparsity=0.5"))
    ((res, pos, out),) = seen
    correct = [i for i, p in enumerate(pos.tolist()) if p in res.kept]
    assert correct, "no showcase image was classified correctly: nothing to check"
    for i in correct:
        assert torch.equal(out[i], res.kept[int(pos[i])].to(out.dtype))
    wrong = len(pos) - len(correct)
    assert sum(attacked) == wrong  # only the clean-wrong images were attacked again
