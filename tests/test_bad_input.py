"""Bad input is refused by ``validate()``, before any MLflow run or training starts (issue 27, part B).

Each of these used to start work first and end in a FAILED run or a traceback: a custom model with
the wrong number of outputs, an image tree without images, with corrupt images or with different
classes per split, a ``model.checkpoint`` that is not a checkpoint, and a ``prune.exclude`` that
leaves nothing to prune. Now each is a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from robustsweep.config import ConfigError, compose, validate
from tests.conftest import isolated_overrides


def three_outputs(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A user's network that ignores ``num_classes``: 3 logits whatever the data has."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 3))


def _tree(root: Path, classes: dict[str, list[str]], n: int = 3, suffix: str = ".png") -> Path:
    """``root/{split}/{class}/i.png``: ``n`` tiny valid images per class (``n=0``: empty folders)."""
    rng = np.random.default_rng(0)
    for split, names in classes.items():
        for c in names:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(d / f"{i}{suffix}")
    return root


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        validate(compose(list(overrides)))
    return str(e.value)


def test_custom_model_with_wrong_number_of_outputs():
    msg = _refused("model=custom", "model._target_=tests.test_bad_input.three_outputs")
    assert "model._target_='tests.test_bad_input.three_outputs'" in msg, msg
    assert "(2, 3)" in msg and "10 classes" in msg, msg


def test_imagefolder_with_empty_class_folders(tmp_path):
    root = _tree(tmp_path / "tree", {"train": ["a", "b"], "test": ["a", "b"]}, n=0)
    msg = _refused("data=imagefolder", f"data.root={root}")
    assert f"data.root='{root}'" in msg and "hold no images" in msg, msg
    assert "n_eval" not in msg


def test_imagefolder_of_corrupt_jpegs_names_the_first_bad_file(tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                (root / split / c / f"{i}.jpg").write_bytes(b"not a jpeg at all " * 4)
    msg = _refused("data=imagefolder", f"data.root={root}")
    assert f"data.root='{root}'" in msg and "not a readable image" in msg, msg
    assert "/a/0.jpg" in msg or "/a/1.jpg" in msg, msg  # the first class's first bad file


def test_loader_names_a_corrupt_file_that_validation_did_not_sample(tmp_path):
    """Validation decodes a few files per class; the loader refuses any other bad one by name."""
    from robustsweep.steps.data import load_dataset

    root = _tree(tmp_path / "tree", {"train": ["a", "b"], "test": ["a", "b"]}, n=12)
    bad = [root / "test" / "b" / f"{i}.png" for i in range(12)]
    # corrupt the file validation samples last in scandir order: not sampled (12 > the sample)
    order = [Path(e.path) for e in os.scandir(root / "test" / "b")]
    order[-1].write_bytes(b"\x89PNG garbage")
    assert order[-1] in bad
    cfg = validate(compose(["data=imagefolder", f"data.root={root}", "data.n_eval=null", "data.size=6"]))
    with pytest.raises(ConfigError) as e:
        load_dataset(cfg.data)
    msg = str(e.value)
    assert "data.root=" in msg and order[-1].name in msg and "not a readable image" in msg, msg


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pt", "notes.txt"])
def test_checkpoint_that_is_a_text_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("these are my notes, not weights\n" * 10)
    msg = _refused(f"model.checkpoint={path}")
    assert f"model.checkpoint='{path}'" in msg and "not a loadable checkpoint" in msg, msg


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pt"])
def test_real_checkpoints_still_pass_validation(tmp_path, name):
    """The control: genuine weights of either format are accepted (regression guard)."""
    from safetensors.torch import save_file

    from robustsweep.steps.models import build_model

    state = build_model(compose([]).model, 1, 10, 8, (0.5,), (0.5,)).state_dict()
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    validate(compose([f"model.checkpoint={path}"]))


def test_imagefolder_with_different_classes_per_split(tmp_path):
    root = _tree(tmp_path / "tree", {"train": ["a", "b"], "test": ["a", "c"]})
    msg = _refused("data=imagefolder", f"data.root={root}")
    assert f"data.root='{root}'" in msg and "['b']" in msg and "['c']" in msg, msg


@pytest.mark.parametrize("prune", ["channel", "global_l1", "l1_unstructured"])
def test_exclude_that_leaves_nothing_to_prune(prune):
    msg = _refused(f"prune={prune}", "prune.exclude=[net.*]")
    assert "prune.exclude=['net.*']" in msg, msg


def test_exclude_uses_the_names_the_run_prunes():
    """``prune.exclude`` patterns match the wrapped model's names (``net.0``): excluding the
    small CNN's convolutions by those names leaves no convolution for prune=channel."""
    msg = _refused("prune=channel", "prune.exclude=[net.0,net.3]")
    assert "prune.exclude=['net.0', 'net.3']" in msg, msg
    validate(compose(["prune=channel", "prune.exclude=[net.0]"]))  # one conv left: fine


def test_cli_refuses_with_exit_2_and_creates_no_run(tmp_path):
    """The real command line: exit status 2, the message naming the key, no run in the store.

    (A single run reports a ConfigError through Hydra's job logging, which writes to stdout, as
    tests/test_cli.py expects: so both streams are searched.)"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    p = subprocess.run([sys.executable, "-m", "robustsweep", *isolated_overrides(tmp_path),
                        "prune=channel", "prune.exclude=[net.*]"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    out = p.stdout + p.stderr
    assert "configuration error: prune.exclude=['net.*']" in out, out[-3000:]
    assert "Traceback" not in out
    store = tmp_path / "outputs" / "mlflow.db"
    if store.exists():  # the store may not even be created; if it is, it holds no run
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{store}")
        exps = [e.experiment_id for e in client.search_experiments()]
        assert not client.search_runs(exps)
    assert not (tmp_path / "outputs" / "cache").exists()
