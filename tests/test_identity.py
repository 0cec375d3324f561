"""Cell identity that survives growth, the deprecated fine-tune spelling, and derived reuse keys."""

from __future__ import annotations

from omegaconf import OmegaConf, open_dict

from robustsweep.config import compose, validate
from robustsweep.tracking import reuse
from robustsweep.tracking.identity import canonical, cell_id, legacy_ids

QS = ["experiment=quickstart"]


def _cfg(*overrides: str):
    return validate(compose([*QS, *overrides]))


def _with_dummy(cfg, option: str):
    """``cfg`` as composed with a config group the package does not have yet (``dummy``), as a
    future step adds one: its ``none`` option, or a real one."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.dummy = OmegaConf.create({"name": option, "level": 0 if option == "none" else 3})
    return cfg


def test_a_new_group_at_its_neutral_default_leaves_every_cell_id_unchanged():
    for over in ([], ["sparsity=0.75", "attack=pgd"], ["prune=global_l1", "epsilon=8/255"],
                 ["attribution=none"], ["defend=clean"]):
        cfg = _cfg(*over)
        assert cell_id(_with_dummy(cfg, "none")) == cell_id(cfg), over
        assert cell_id(_with_dummy(cfg, "on")) != cell_id(cfg), over  # a real step is part of it
        # ... and so are the ids of identity v1, by which resume finds cells stored before the seams
        assert legacy_ids(_with_dummy(cfg, "none")) == legacy_ids(cfg), over
        assert legacy_ids(_with_dummy(cfg, "on")) == [], over


def test_ids_ignore_paths_tracking_checks_perf_but_not_amp():
    base = cell_id(_cfg())
    assert cell_id(_cfg("paths.output_dir=/elsewhere", "tracking.experiment=x", "checks.sanity=false",
                        "perf.reuse=false", "perf.cudnn_benchmark=false")) == base
    assert cell_id(_cfg("perf.amp=bf16")) != base
    assert cell_id(_cfg("epsilon=0.1")) == cell_id(_cfg("epsilon=25.5/255"))


def test_deprecated_finetune_keys_warn_and_are_the_same_cell_as_defend(caplog):
    old = _cfg("prune.finetune_epochs=2", "prune.finetune_lr=0.05")
    assert "deprecated" in caplog.text and "defend=clean" in caplog.text
    new = _cfg("defend=clean", "defend.epochs=2", "defend.lr=0.05")
    assert cell_id(old) == cell_id(new)
    assert "finetune_epochs" not in old.prune and old.defend.name == "clean"
    # finetune_epochs=0 was "no fine-tune": the same cell as defend=none
    assert cell_id(_cfg("prune.finetune_epochs=0")) == cell_id(_cfg())


def test_legacy_ids_exist_only_for_cells_identity_v1_could_express():
    assert len(legacy_ids(_cfg())) == 1 and len(legacy_ids(_cfg("defend=clean"))) == 1
    assert legacy_ids(_cfg("defend=clean")) != legacy_ids(_cfg())
    assert legacy_ids(_cfg("model=custom", "model._target_=tests.nets.tiny_mlp")) == []
    assert legacy_ids(_cfg("drift=ig")) == []  # drift did not exist in v1


def test_reuse_key_of_the_compressed_model_is_derived_from_the_canonical_config():
    base = reuse.pruned_key(_cfg(), "cpu")
    # what only evaluation reads does not change the model
    for over in (["epsilon=0.3"], ["attack=pgd"], ["attribution=none"], ["data.n_eval=50"],
                 ["checks.sanity=false"]):
        assert reuse.pruned_key(_cfg(*over), "cpu") == base, over
    # everything that builds it does, including a group the key code has never heard of
    for over in (["sparsity=0.25"], ["prune=global_l1"], ["defend=clean"], ["train.epochs=3"],
                 ["seed=1"], ["objective=fast_at"], ["defend=fast_at"], ["defend=fast_at", "defend.eps=0.1"]):
        assert reuse.pruned_key(_cfg(*over), "cpu") != base, over
    assert reuse.pruned_key(_cfg("defend=fast_at", "defend.eps=0.1"), "cpu") != reuse.pruned_key(
        _cfg("defend=fast_at"), "cpu")
    assert cell_id(_cfg("objective=trades", "objective.beta=1")) != cell_id(_cfg("objective=trades"))
    assert reuse.pruned_key(_with_dummy(_cfg(), "on"), "cpu") != base
    assert reuse.pruned_key(_cfg(), "cuda") != base


def test_canonical_config_drops_steps_at_none_but_keeps_them_otherwise():
    c = canonical(_cfg("attribution=none"))
    assert "attribution" not in c and "defend" not in c and "attack" in c and "paths" not in c
    assert "dummy" not in canonical(_with_dummy(_cfg(), "none"))
    assert canonical(_with_dummy(_cfg(), "on"))["dummy"] == {"name": "on", "level": 3}
