"""Every speed-up that could change a result, compared with the straightforward computation.

FGSM/PGD against torchattacks bit for bit; FGSM's reused direction against a fresh attack; PGD's
early stop against "fooled at any iterate" of the full attack; cells computed with the per-process
caches against the same cells without them; the reused clean IG half against a fresh one.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torchattacks

from robustsweep.core.guards import frozen
from robustsweep.pipeline import run
from robustsweep.steps.attacks import FGSM, PGD, evaluate
from robustsweep.steps.data import to_float
from robustsweep.steps.evaluate.attribution import integrated_gradients
from robustsweep.steps.models import Autocast, with_amp
from robustsweep.tracking import reuse
from robustsweep.tracking.identity import cell_id


def _batch(digits_model, n=200, dtype=torch.float32):
    model, ds, _ = digits_model
    m = copy.deepcopy(model).to(dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m, to_float(ds.x_eval[:n]).to(dtype), ds.y_eval[:n]


def test_fgsm_is_torchattacks_fgsm_bit_for_bit(digits_model):
    m, x, y = _batch(digits_model)
    for eps in (1 / 255, 0.1, 0.3):
        assert torch.equal(FGSM(m, eps)(x, y), torchattacks.FGSM(m, eps=eps)(x, y))


def test_pgd_without_early_stop_is_torchattacks_pgd_bit_for_bit(digits_model):
    m, x, y = _batch(digits_model)
    torch.manual_seed(3)
    ours = PGD(m, 0.1, alpha=0.025, steps=7, random_start=True)(x, y)
    torch.manual_seed(3)
    theirs = torchattacks.PGD(m, eps=0.1, alpha=0.025, steps=7, random_start=True)(x, y)
    assert torch.equal(ours, theirs)


def _pgd_fooled_at_any_iterate(m, x, y, eps, alpha, steps):
    """The straightforward reference: the full attack, remembering who was fooled at any iterate."""
    adv = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1)
    ever = torch.zeros(len(y), dtype=torch.bool)
    for _ in range(steps):
        adv.requires_grad_(True)
        logits = m(adv)
        ever |= logits.argmax(1) != y
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), adv)
        adv = torch.clamp(x + torch.clamp(adv.detach() + alpha * g.sign() - x, -eps, eps), 0, 1)
    with torch.no_grad():
        ever |= m(adv).argmax(1) != y
    return ever


@pytest.mark.parametrize("eps", [0.03, 0.1])
def test_pgd_early_stop_finds_exactly_the_images_full_pgd_fools_at_some_iterate(digits_model, eps):
    # float64: batch composition changes (images leave the batch) cannot move a logit's argmax
    m, x, y = _batch(digits_model, n=300, dtype=torch.float64)
    keep = m(x).argmax(1) == y
    x, y = x[keep], y[keep]
    torch.manual_seed(0)
    want = _pgd_fooled_at_any_iterate(m, x, y, eps, eps / 4, 10)
    torch.manual_seed(0)
    attack = PGD(m, eps, alpha=eps / 4, steps=10, early_stop=True)
    adv = attack(x, y)
    with torch.no_grad():
        got = m(adv).argmax(1) != y
    assert (adv - x).abs().max() <= eps + 1e-12 and adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(got, want), (int(got.sum()), int(want.sum()))
    torch.manual_seed(0)
    full = PGD(m, eps, alpha=eps / 4, steps=10)
    last = m(full(x, y)).argmax(1) != y
    assert got.sum() >= last.sum()  # found-at-some-iterate >= last-iterate ASR
    assert attack.n_grad < full.n_grad == 10 * len(y)  # and cheaper


def test_fgsm_direction_reused_across_eps_equals_a_fresh_attack(digits_model):
    model, ds, _ = digits_model
    first = evaluate(model, FGSM(model, 2 / 255), ds.x_eval, ds.y_eval, 2 / 255, 64)
    assert first.n_grad == first.n_correct and first.direction.dtype == torch.int8
    for eps in (4 / 255, 0.1, 0.3):
        fresh = evaluate(model, FGSM(model, eps), ds.x_eval, ds.y_eval, eps, 64)
        reused = evaluate(model, FGSM(model, eps), ds.x_eval, ds.y_eval, eps, 64,
                          clean_pred=first.clean_pred, direction=first.direction)
        assert reused.n_grad == 0
        assert torch.equal(reused.adv_pred, fresh.adv_pred) and reused.n_fooled == fresh.n_fooled
    with pytest.raises(ValueError, match="direction"):  # signs of other images are refused
        evaluate(model, FGSM(model, 0.1), ds.x_eval[:50], ds.y_eval[:50], 0.1, 64,
                 direction=first.direction)


def test_clean_ig_half_reused_equals_fresh(digits_model):
    model, ds, _ = digits_model
    x, y = to_float(ds.x_eval[:4]), ds.y_eval[:4]
    with frozen(model):
        x_adv = FGSM(model, 0.1)(x, y)
    _, clean = integrated_gradients(model, x, x, y, torch.arange(4), 16, "black", 64)
    b, _ = integrated_gradients(model, x, x_adv, y, torch.arange(4), 16, "black", 64)
    c, same = integrated_gradients(model, x, x_adv, y, torch.arange(4), 16, "black", 64, clean=clean)
    assert same is clean
    for k in ("ig_clean", "delta_clean", "clean_pred", "ig_adv", "delta_adv", "adv_pred"):
        assert (getattr(b, k) == getattr(c, k)).all(), k


GRID = [(s, e, a) for s in ("0", "0.5") for e in ("4/255", "0.1") for a in ("fgsm", "pgd")]
SAME = ("clean_acc", "robust_acc", "asr", "n_correct", "n_fooled", "sparsity_measured", "ig_delta",
        "ig_n_steps", "sanity_asr_eps0", "sanity_asr_noise", "sanity_asr_fgsm", "sanity_asr_pgd",
        "sanity_asr_unbounded", "guard_max_dist")


def test_a_grid_with_the_caches_equals_the_grid_without(make_cfg, caplog):
    caplog.set_level(logging.INFO)
    cells = lambda *o: [run(make_cfg(f"sparsity={s}", f"epsilon={e}", f"attack={a}",  # noqa: E731
                                     "tracking.resume=false", *o)) for s, e, a in GRID]
    plain = cells("perf.reuse=false")
    assert all(c.misses == c.hits == 0 for c in reuse.CACHES)  # perf.reuse=false: never consulted
    fast = cells()
    st = reuse.stats()
    # 2 pruned models for 8 cells; clean predictions per model; 1 FGSM direction per model
    assert st["pruned_model"]["hits"] == 6 and st["clean_pred"]["hits"] == 6
    assert st["fgsm_direction"]["hits"] == 2 and st["ig_clean"]["hits"] == 6
    assert "reusing the compressed model" in caplog.text
    for p, f, (s, e, a) in zip(plain, fast, GRID, strict=True):
        for k in SAME:
            assert p[k] == pytest.approx(f[k], nan_ok=True, abs=1e-6), (s, e, a, k)
    # the reused FGSM cells did no gradient work at all
    assert [f["attack_n_grad"] for f, (_, e, a) in zip(fast, GRID, strict=True) if a == "fgsm"] == \
        [fast[0]["n_correct"], 0, fast[4]["n_correct"], 0]


def test_a_cached_model_changed_after_caching_is_rebuilt(make_cfg, caplog):
    a = run(make_cfg("sparsity=0.5", "attribution.n_images=0"))
    (cached,) = reuse.PRUNED._d.values()
    model = cached.model
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # e.g. a user callback touching the shared model
    caplog.set_level(logging.WARNING)
    b = run(make_cfg("sparsity=0.5", "attribution.n_images=0", "tracking.resume=false"))
    assert "has changed since it was built: rebuilding" in caplog.text
    assert a["asr"] == b["asr"] and a["clean_acc"] == b["clean_acc"]


def test_bf16_autocast_keeps_guards_and_is_a_different_cell(digits_model, make_cfg):
    model, ds, _ = digits_model
    fast = with_amp(model, "bf16")
    assert isinstance(fast, Autocast) and with_amp(model, "none") is model
    fp32 = evaluate(model, FGSM(model, 0.1), ds.x_eval, ds.y_eval, 0.1, 128)
    bf16 = evaluate(fast, FGSM(fast, 0.1), ds.x_eval, ds.y_eval, 0.1, 128)  # guards checked inside
    assert bf16.clean_pred.dtype == torch.long
    assert abs(bf16.asr - fp32.asr) < 0.1  # the benchmark measures the real gap (README)
    assert cell_id(make_cfg("perf.amp=bf16")) != cell_id(make_cfg()) == cell_id(make_cfg("perf.reuse=false"))
