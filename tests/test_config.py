"""Composition, epsilon parsing and value validation: bad input fails early and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ValidationError

from robustsweep.config import ConfigError, compose, parse_epsilon, validate


@pytest.mark.parametrize(("text", "value"), [
    ("8/255", 8 / 255), (" 2 / 255 ", 2 / 255), ("0.1", 0.1), (0.25, 0.25), (0, 0.0), ("1", 1.0),
    ("1e-2", 0.01),
])
def test_parse_epsilon_accepts_numbers_and_fractions(text, value):
    assert parse_epsilon(text) == pytest.approx(value)


@pytest.mark.parametrize(("text", "fragment"), [
    ("8/0", "divides by zero"), ("-1", "outside [0, 1]"), (-1, "outside [0, 1]"),
    ("abc", "not a number"), ("300/255", "outside [0, 1]"), (True, "not valid"),
])
def test_parse_epsilon_rejects_with_key_value_and_allowed(text, fragment):
    with pytest.raises(ConfigError) as e:
        parse_epsilon(text)
    msg = str(e.value)
    assert fragment in msg and "epsilon=" in msg and "8/255" in msg


def test_default_config_composes_and_validates():
    cfg = validate(compose())
    assert cfg.data.name == "digits" and cfg.model.name == "small_cnn"
    assert isinstance(cfg.epsilon, float)


def test_epsilon_fraction_from_command_line_is_parsed():
    cfg = validate(compose(["epsilon=8/255"]))
    assert cfg.epsilon == pytest.approx(8 / 255)


def test_experiment_seed_is_the_original_study():
    cfg = validate(compose(["experiment=seed"]))
    assert (cfg.data.name, cfg.model.name, cfg.prune.method, cfg.attack.name) == (
        "cifar10", "resnet18", "l1_unstructured", "fgsm")
    assert cfg.epsilon == pytest.approx(8 / 255)


@pytest.mark.parametrize("override", ["sparsity=abc", "seed=1.5", "epsilon=[1]"])
def test_wrong_types_fail_at_compose_time(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose([override])


def test_unknown_group_option_lists_available_options():
    with pytest.raises((ConfigCompositionException, HydraException)) as e:
        compose(["attack=deepfool"])
    assert "fgsm" in str(e.value) and "pgd" in str(e.value)


def test_unknown_key_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, HydraException)):
        compose(["attack.stepz=3"])


@pytest.mark.parametrize(("overrides", "key"), [
    (["sparsity=1.5"], "sparsity"),
    (["sparsity=-0.1"], "sparsity"),
    (["sparsity=1.0"], "sparsity"),
    (["epsilon=-1"], "epsilon"),
    (["epsilon=8/0"], "epsilon"),
    (["device=tpu"], "device"),
    (["attack=pgd", "attack.steps=0"], "attack.steps"),
    (["attribution.baseline=noise"], "attribution.baseline"),
    (["prune.layers=[conv,attention]"], "prune.layers"),
    (["data.n_eval=0"], "data.n_eval"),
    (["train.lr=abc"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["train.label_smoothing=1.5"], "train.label_smoothing"),
    (["train.flip=maybe"], "train.flip"),
    (["train.crop_pad=-1"], "train.crop_pad"),
    (["prune.finetune_lr=-0.1"], "prune.finetune_lr"),
    (["attack=pgd", "attack.step_size=abc"], "attack.step_size"),
    (["model.checkpoint=/nonexistent/weights.safetensors"], "model.checkpoint"),
])
def test_bad_values_name_key_value_and_allowed(overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(compose(overrides))
    msg = str(e.value)
    assert msg.startswith(f"{key}="), msg
    assert "allowed" in msg, msg


def test_imagefolder_without_test_split_is_rejected(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ConfigError) as e:
        validate(compose(["data=imagefolder", f"data.root={tmp_path}"]))
    assert "data.root=" in str(e.value) and "test/" in str(e.value)


def test_imagefolder_root_is_required():
    with pytest.raises(ConfigError, match=r"^data\.root is missing"):
        validate(compose(["data=imagefolder"]))


def test_any_missing_value_is_named_with_how_to_set_it():
    with pytest.raises(ConfigError, match=r"^train\.lr is missing \(\?\?\?\).*train\.lr=<value>"):
        validate(compose(["train.lr=???"]))


@pytest.mark.parametrize(("overrides", "ok"), [
    (["attack=pgd", "epsilon=8/255", "attack.step_size=2/255"], True),
    (["attack=pgd", "epsilon=8/255", "attack.step_size=8/255"], True),  # = eps: fine
    (["attack=pgd", "epsilon=2/255", "attack.step_size=8/255"], False),
    (["attack=pgd", "epsilon=0", "attack.step_size=2/255"], True),  # eps=0 is a control
    (["attack=pgd", "epsilon=2/255", "attack.step_size=null"], True),
])
def test_pgd_step_larger_than_eps_is_refused(overrides, ok):
    if ok:
        validate(compose(overrides))
    else:
        with pytest.raises(ConfigError, match=r"attack.step_size='8/255' .* a step <= epsilon"):
            validate(compose(overrides))


def test_every_config_group_folder_ships_in_the_wheel() -> None:
    """pyproject lists the conf/ folders one by one; a new group left out would not be installed."""
    tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(("robustsweep", *d.relative_to(root).parts))
        for d in [root / "conf", *(root / "conf").rglob("*")]
        if d.is_dir() and any(d.glob("*.yaml"))
    }
    assert folders, "no config folders found"
    assert folders <= listed, f"add to [tool.setuptools] packages: {sorted(folders - listed)}"


def test_readmes_configuration_table_lists_every_group_and_option():
    """README "Configuration": a row per config group under conf/, naming every option in it
    (a group or option added without its row fails here)."""
    import re

    from robustsweep.core.paths import CONF_DIR

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (.*?) \|", section, re.M)}
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        assert group.name in rows, f"README's Configuration table has no row for group {group.name!r}"
        missing = [o.stem for o in group.glob("*.yaml") if f"`{o.stem}`" not in rows[group.name]]
        assert not missing, f"group {group.name!r}: options {missing} are not in its README row"
