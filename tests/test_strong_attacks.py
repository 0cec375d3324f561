"""Reviewer-grade attacks: AutoAttack as torchattacks computes it, L2 PGD as torchattacks.PGDL2,
the per-image worst case, CW counted inside the ball, the minimum-norm curve, transfer, bad input."""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest
import torch
import torchattacks
from omegaconf import OmegaConf

from robustsweep.config import ConfigError, validate
from robustsweep.core.guards import frozen
from robustsweep.pipeline import run
from robustsweep.steps.attack_zoo import Ensemble, InsideBall, autoattack
from robustsweep.steps.attacks import PGD, build_attack, evaluate
from robustsweep.steps.data import to_float
from robustsweep.steps.evaluate.min_norm import curve, min_norms


def _correct(model, ds, n=64):
    x, y = to_float(ds.x_eval), ds.y_eval
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][:n], y[ok][:n]


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3)])
def test_autoattack_equals_torchattacks_autoattack_on_the_same_batches(digits_model, norm, eps):
    """Done-when 2: identical robust accuracy (and identical images) to the library's own call,
    with the same seed, on the same batches of correctly classified images."""
    model, ds, _ = digits_model
    # 128 images, two batches of 64: enough to tell the two apart (asserted below); the whole eval set
    # made this the suite's slowest test (377 s of CPU for both norms). (64 images in batches of 32
    # took longer: AutoAttack's per-batch loops over 9 target classes cost the same for half a batch.)
    x_eval, y_eval = ds.x_eval[:128], ds.y_eval[:128]
    acfg = OmegaConf.create({"name": "autoattack", "version": "standard", "norm": norm, "steps": 10,
                             "batch_size": 64})
    with frozen(model):
        ours = evaluate(model, build_attack(model, eps, acfg, n_classes=10, seed=3), x_eval, y_eval, eps, 64)
        idx = (ours.clean_pred == y_eval).nonzero().flatten()
        lib = torchattacks.AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                                      version="standard", n_classes=10, seed=3)
        fooled = 0
        for i in range(0, len(idx), 64):
            j = idx[i:i + 64]
            x_adv = lib(to_float(x_eval[j]), y_eval[j])
            fooled += int((model(x_adv).argmax(1) != y_eval[j]).sum())
    assert 0 < ours.n_fooled < ours.n_correct  # a test that can tell the two apart
    assert ours.n_fooled == fooled
    # every fooled image is credited to exactly one component
    assert int((ours.broken_by >= 0).sum()) == ours.n_fooled
    assert ours.attack_names == ("apgd-ce", "apgd-t", "fab-t", "square")


def test_the_pgd_prefilter_only_lowers_robust_accuracy_and_spares_autoattack_the_broken_images(digits_model):
    """Issue 32: PGD first, AutoAttack's components on what PGD left robust. Per image the result is the
    worst case over both: every image AutoAttack alone breaks is broken (robust accuracy never higher),
    PGD is credited with what it broke, and the components see only the rest."""
    model, ds, _ = digits_model
    x_eval, y_eval = ds.x_eval[:128], ds.y_eval[:128]
    base = {"name": "autoattack", "version": "standard", "norm": "linf", "steps": 10}
    seen: list[int] = []
    with frozen(model):
        alone = evaluate(model, build_attack(model, 0.1, OmegaConf.create(base), n_classes=10, seed=3),
                         x_eval, y_eval, 0.1, 64)
        torch.manual_seed(0)
        attack = build_attack(model, 0.1, OmegaConf.create({**base, "prefilter": "pgd"}), n_classes=10, seed=3)
        apgd = attack.attacks[1]
        apgd_call = apgd.forward
        apgd.forward = lambda x, y: (seen.append(len(x)), apgd_call(x, y))[1]
        pre = evaluate(model, attack, x_eval, y_eval, 0.1, 64)
    assert pre.attack_names == ("pgd", "apgd-ce", "apgd-t", "fab-t", "square")
    assert 0 < alone.n_fooled < alone.n_correct  # a case where the two could differ
    by_pgd = int((pre.broken_by == 0).sum())
    assert by_pgd > 0 and sum(seen) == pre.n_correct - by_pgd  # APGD-CE saw only the images PGD left
    correct = alone.clean_pred == y_eval
    broken_alone, broken_pre = correct & (alone.adv_pred != y_eval), correct & (pre.adv_pred != y_eval)
    assert not (broken_alone & ~broken_pre).any()  # no image robust that AutoAttack alone breaks
    assert pre.robust_acc <= alone.robust_acc


def test_a_prefilter_autoattack_cannot_name_is_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"attack.prefilter='fgsm' is not valid; allowed: none or pgd"):
        validate(make_cfg("attack=autoattack", "attack.prefilter=fgsm"))


def test_autoattack_refuses_a_missing_class_count(digits_model):
    model, _, _ = digits_model
    with pytest.raises(ValueError, match="n_classes"):
        build_attack(model, 0.1, {"name": "autoattack", "norm": "linf"})


@pytest.mark.parametrize("random_start", [False, True])
def test_l2_pgd_is_torchattacks_pgdl2_bit_for_bit(digits_model, random_start):
    model, ds, _ = digits_model
    x, y = _correct(model, ds)
    with frozen(model):
        torch.manual_seed(5)
        ours = PGD(model, eps=0.5, alpha=0.1, steps=7, random_start=random_start, norm="L2")(x, y)
        torch.manual_seed(5)
        theirs = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=7, random_start=random_start)(x, y)
    assert torch.equal(ours, theirs)
    assert (ours - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-6


def test_per_image_eps_is_the_scalar_attack_image_by_image(digits_model):
    """The min-norm search attacks each image at its own radius: with one radius for all it must
    be the scalar attack exactly, and each image must stay in its own ball."""
    model, ds, _ = digits_model
    x, y = _correct(model, ds, 32)
    for norm, e in (("Linf", 0.1), ("L2", 0.6)):
        with frozen(model):
            torch.manual_seed(1)
            a = PGD(model, eps=e, alpha=e / 4, steps=5, random_start=False, norm=norm)(x, y)
            torch.manual_seed(1)
            r = torch.full((len(y),), e)
            b = PGD(model, eps=r, alpha=r / 4, steps=5, random_start=False, norm=norm)(x, y)
            radii = torch.linspace(0.01, e, len(y))
            c = PGD(model, eps=radii, alpha=radii / 4, steps=5, random_start=True, early_stop=True,
                    norm=norm)(x, y)
        assert torch.allclose(a, b, atol=1e-6)
        flat = (c - x).flatten(1)
        d = flat.norm(dim=1) if norm == "L2" else flat.abs().amax(dim=1)
        assert (d <= radii + 1e-6).all()


def test_ensemble_is_the_per_image_worst_case(digits_model):
    """An image counts as robust only if every member fails; the ensemble fools exactly the union."""
    model, ds, _ = digits_model
    x, y = _correct(model, ds)
    eps = 0.08
    members = [("fgsm", build_attack(model, eps, {"name": "fgsm"})),
               ("pgd", build_attack(model, eps, {"name": "pgd", "steps": 10, "random_start": False}))]
    with frozen(model), torch.no_grad():
        fooled = []
        for _, a in members:
            with torch.enable_grad():
                xa = a(x, y)
            fooled.append(model(xa).argmax(1) != y)
        ens = Ensemble(model, members, "Linf")
        with torch.enable_grad():
            xe = ens(x, y)
        union = fooled[0] | fooled[1]
        assert torch.equal(model(xe).argmax(1) != y, union)
    assert fooled[0].sum() < union.sum() < len(y)  # members differ, and some images survive both
    assert torch.equal(ens.last_broken_by == 0, fooled[0])
    assert torch.equal(ens.last_broken_by == 1, union & ~fooled[0])


def test_cw_counts_only_perturbations_inside_the_ball(digits_model):
    model, ds, _ = digits_model
    x, y = _correct(model, ds, 32)
    with frozen(model):
        raw = torchattacks.CW(model, c=10, steps=50, lr=0.01)(x, y)
        d = (raw - x).flatten(1).norm(dim=1)
        eps = float(d[d > 0].median())  # half the found examples lie outside this ball
        kept = InsideBall(torchattacks.CW(model, c=10, steps=50, lr=0.01), eps, "L2")(x, y)
    dk = (kept - x).flatten(1).norm(dim=1)
    assert (dk <= eps).all()
    assert torch.equal(dk > 0, (d > 0) & (d <= eps))


def test_min_norm_bisection_brackets_the_radius_and_the_curve_falls(digits_model):
    model, ds, _ = digits_model
    x, y = _correct(model, ds)
    with frozen(model):
        d = min_norms(model, x, y, "linf", 0.4, n_bisect=6, steps=10, restarts=1, seed=0)
        finite = torch.isfinite(d)
        assert finite.sum() > len(y) // 2
        xf, yf, df = x[finite], y[finite], d[finite]

        def fooled(scale: float) -> float:
            torch.manual_seed(1)  # another random start than the search's
            r = df * scale
            adv = PGD(model, eps=r, alpha=2.5 * r / 10, steps=10, early_stop=True)(xf, yf)
            return float((model(adv).argmax(1) != yf).float().mean())

        # PGD is random near the boundary: well above the radius it almost always fools, well below
        # it almost never does
        assert fooled(1.5) > 0.9 and fooled(0.5) < 0.2
    acc = curve(d.numpy(), len(y), torch.linspace(0, 0.4, 21).numpy())
    assert acc[0] == 1.0 and all(a >= b for a, b in itertools.pairwise(acc))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_min_norm_on_a_linear_model_matches_the_exact_distance(norm):
    """Reference: for a linear classifier the smallest perturbation that changes the decision is
    known in closed form, min_j margin_j / ||w_y - w_j||_q (q dual to the norm), as long as the
    [0, 1] box does not bind (images near 0.5, small distances). The search can never go below it
    (soundness) and should land within a bisection step plus PGD's slack above it."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    x = 0.5 + 0.02 * torch.randn(200, 1, 4, 4)
    with torch.no_grad():
        y = lin(x).argmax(1)
        w, logits = lin[1].weight, lin(x)
        dual = 1 if norm == "linf" else 2
        exact = torch.stack([
            torch.stack([(logits[i, y[i]] - logits[i, j]) / (w[y[i]] - w[j]).norm(p=dual)
                         for j in range(4) if j != y[i]]).min() for i in range(len(y))])
    keep = exact < 0.1  # the box [0, 1] is > 0.4 away in every pixel: it cannot bind
    with frozen(lin):
        d = min_norms(lin, x[keep], y[keep], norm, 0.2, n_bisect=10, steps=20, restarts=1, seed=0)
    e = exact[keep]
    assert len(e) > 50 and torch.isfinite(d).all()
    assert (d >= e - 1e-5).all()  # no adversarial example closer than the exact distance
    # measured: median gap 2.5 % (L-inf), 6.8 % (L2: the CE gradient does not aim at the nearest boundary)
    gap = (d - e) / e
    assert gap.median() < 0.1 and (d <= e * 1.25 + 0.2 / 2**10).float().mean() > 0.9


def test_attack_configs_are_checked_before_anything_runs(make_cfg):
    bad = [
        (("attack=fgsm", "attack.norm=l2"), "attack.norm='l2'.*allowed: linf"),
        (("attack=cw", "attack.norm=linf"), "attack.norm='linf'.*allowed: l2"),
        (("attack=pgd", "attack.norm=l1"), "attack.norm='l1'.*linf or l2"),
        (("attack=autoattack", "attack.version=plus"), "attack.version='plus'.*standard"),
        (("attack=apgd", "attack.loss=hinge"), "attack.loss='hinge'.*ce or dlr"),
        (("attack=square", "attack.n_queries=0"), "attack.n_queries=0"),
        (("attack=ensemble", "attack.attacks.1.steps=0"), r"attack.attacks\[1\].steps=0"),
        (("attack=ensemble", "attack.attacks=[]"), "attack.attacks=.*non-empty list"),
        (("attack=pgd", "epsilon=2"), "epsilon=2.*outside \\[0, 1\\]"),
        (("attack=pgd", "attack.norm=l2", "epsilon=500"), "outside \\[0, 388\\]"),
        (("transfer=dense", "transfer.name=other"), "transfer.name='other'"),
        (("min_norm=bisect", "min_norm.n_bisect=0"), "min_norm.n_bisect=0"),
    ]
    for overrides, match in bad:
        with pytest.raises(ConfigError, match=match):
            validate(make_cfg(*overrides))
    assert validate(make_cfg("attack=pgd", "attack.norm=l2", "epsilon=3.5")).epsilon == 3.5


def test_an_l2_eps_written_like_linf_warns_loudly(make_cfg, caplog):
    validate(make_cfg("attack=pgd", "attack.norm=l2", "epsilon=8/255"))
    assert any("L-inf-sized budget" in r.message for r in caplog.records)


def test_linf_default_norm_leaves_cell_ids_unchanged(make_cfg):
    from robustsweep.tracking.identity import cell_id

    cfg = make_cfg("attack=pgd")
    without = cfg.copy()
    OmegaConf.set_struct(without, False)
    del without.attack["norm"]
    assert cell_id(cfg) == cell_id(without)
    assert cell_id(make_cfg("attack=pgd", "attack.norm=l2", "epsilon=0.5")) != cell_id(make_cfg("attack=pgd",
                                                                                             "epsilon=0.5"))


def test_an_autoattack_cell_without_prefilter_keeps_the_id_it_had_before_the_key(make_cfg):
    """A reference AutoAttack cell stored before ``attack.prefilter`` existed is its ``prefilter=none``
    cell (resumed by it); the default, PGD first, is another cell."""
    from robustsweep.tracking.identity import cell_id

    cfg = make_cfg("attack=autoattack", "attack.prefilter=none")
    before = cfg.copy()
    OmegaConf.set_struct(before, False)
    del before.attack["prefilter"], before.attack["prefilter_steps"]
    assert cell_id(cfg) == cell_id(before)
    assert cell_id(make_cfg("attack=autoattack")) != cell_id(cfg)


def test_autoattack_cell_end_to_end_logs_breakdown_outcomes_curve_and_transfer(make_cfg):
    import mlflow

    cfg = make_cfg("attack=autoattack_fast", "epsilon=0.1", "sparsity=0.5", "transfer=dense", "min_norm=bisect",
                   "min_norm.n_bisect=4", "attribution=none", "data.n_eval=150")
    m = run(cfg)
    assert 0 < m["asr"] <= 1
    assert sum(v for k, v in m.items() if k.startswith("broken_by_")) == m["n_fooled"]
    assert m["sanity_asr_own"] >= m["sanity_asr_pgd"] - 1 / m["sanity_n_probe"]
    assert 0 <= m["transfer_asr"] <= 1 and not math.isnan(m["transfer_source_asr"])
    assert m["min_norm_median"] > 0
    # the curve at the cell's eps and the fixed-eps attack agree within a few images
    assert abs(m["min_norm_robust_acc_at_eps"] - m["robust_acc"]) < 0.1
    client = mlflow.MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    rid = client.search_runs([exp], "attributes.status = 'FINISHED' and params.`attack.name` = 'autoattack'",
                             )[0].info.run_id
    path = client.download_artifacts(rid, "outcomes.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m["n_eval"]
    fooled = [r for r in rows if r["clean_pred"] == r["label"] and r["adv_pred"] != r["label"]]
    assert len(fooled) == m["n_fooled"] and all(r["broken_by"] for r in fooled)
    names = {a.path for a in client.list_artifacts(rid, "min_norm")}
    assert names == {"min_norm/distances.csv", "min_norm/curve.png"}


def test_attacks_that_need_more_classes_than_the_data_has_are_refused_before_any_run(tmp_path):
    """AutoAttack's APGD-T reads the 4th-largest logit and APGD-DLR the 3rd: on a 3-class image
    folder the first must be refused at validation (torchattacks would raise an IndexError
    mid-run), the second allowed; a 2-class folder refuses APGD-DLR too."""
    from PIL import Image

    from robustsweep.config import compose

    def tree(root, classes):
        for split in ("train", "test"):
            for c in classes:
                d = root / split / c
                d.mkdir(parents=True)
                Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "0.png")

    tree(tmp_path / "three", ("a", "b", "c"))
    tree(tmp_path / "two", ("a", "b"))
    three = ["data=imagefolder", f"data.root={tmp_path / 'three'}", "model=small_cnn"]
    with pytest.raises(ConfigError, match=r"attack=autoattack needs a dataset with at least 4 classes.*has 3"):
        validate(compose([*three, "attack=autoattack"]))
    with pytest.raises(ConfigError, match=r"attack.attacks\[1\].*at least 3 classes.*has 2"):
        validate(compose(["data=imagefolder", f"data.root={tmp_path / 'two'}", "model=small_cnn",
                          "attack=ensemble"]))
    validate(compose([*three, "attack=apgd", "attack.loss=dlr"]))
    with pytest.raises(ValueError, match="needs the data's class count"):
        autoattack(torch.nn.Identity(), 0.1, n_classes=3)
