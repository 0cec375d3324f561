"""Data: decoded once to uint8, fixed eval subset, ImageFolder trees, clear offline errors."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from robustsweep.config import ConfigError, compose, validate
from robustsweep.steps.data import load_dataset
from robustsweep.steps.train import augment


def _tree(root, split_counts, size=10, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for split, n in split_counts.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")


def test_digits_are_uint8_in_range_with_fixed_eval_subset():
    cfg = compose(["data.n_eval=50"]).data
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.x_test.dtype == torch.uint8 and a.x_test.shape[1:] == (1, 8, 8)
    assert int(a.x_test.max()) == 255
    assert torch.equal(a.eval_idx, b.eval_idx) and len(a.eval_idx) == 50
    other = load_dataset(compose(["data.n_eval=50", "data.subset_seed=1"]).data)
    assert not torch.equal(a.eval_idx, other.eval_idx)


def test_eval_subset_does_not_depend_on_run_seed():
    a = load_dataset(compose(["data.n_eval=30", "seed=1"]).data)
    b = load_dataset(compose(["data.n_eval=30", "seed=2"]).data)
    assert torch.equal(a.eval_idx, b.eval_idx)


def test_n_eval_larger_than_test_split_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.n_eval=100000"):
        load_dataset(compose(["data.n_eval=100000"]).data)


def test_imagefolder_tree_is_decoded_resized_and_labelled(tmp_path):
    _tree(tmp_path, {"train": 3, "test": 2}, size=10)
    cfg = validate(compose(["data=imagefolder", f"data.root={tmp_path}", "data.size=6",
                            "data.n_eval=null"]))
    ds = load_dataset(cfg.data)
    assert ds.classes == ["cat", "dog"]
    assert ds.x_train.shape == (6, 3, 6, 6) and ds.x_test.shape == (4, 3, 6, 6)
    assert ds.y_test.tolist() == [0, 0, 1, 1]
    assert len(ds.mean) == 3 and all(s > 0 for s in ds.std)


def test_imagefolder_training_split_is_decoded_only_when_needed(tmp_path, monkeypatch):
    from robustsweep.steps import data as data_mod

    _tree(tmp_path, {"train": 3, "test": 2}, size=6)
    decoded = []
    real = data_mod._decode
    monkeypatch.setattr(data_mod, "_decode", lambda files, *a: decoded.append(a[-1]) or real(files, *a))
    cfg = validate(compose(["data=imagefolder", f"data.root={tmp_path}", "data.size=6", "data.n_eval=null"]))
    ds = load_dataset(cfg.data)
    assert decoded == ["decode test"] and ds.x_test.shape == (4, 3, 6, 6)
    assert ds.mean and decoded == ["decode test", "decode train"]  # statistics need the train split
    assert ds.x_train.shape == (6, 3, 6, 6) and load_dataset(cfg.data).y_train.tolist() == [0] * 3 + [1] * 3
    assert decoded == ["decode test", "decode train"]  # once per process


def test_cifar10_offline_error_names_root_and_alternatives(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    cfg = compose(["data=cifar10", f"data.root={tmp_path}/cifar"]).data
    with pytest.raises(ConfigError) as e:
        load_dataset(cfg)
    msg = str(e.value)
    assert "data.root=" in msg and str(tmp_path) in msg
    assert "data=imagefolder" in msg and "data=digits" in msg


def test_augment_crops_and_flips_per_image():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    same = augment(x, pad=0, flip=False, gen=torch.Generator().manual_seed(0))
    assert torch.equal(same, x)
    out = augment(x, pad=2, flip=True, gen=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every output pixel is either padding (0) or a value of the same image
    for i in range(2):
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0}


def test_showcase_images_are_fixed_and_span_classes():
    ds = load_dataset(compose(["data.n_eval=100"]).data)
    idx = ds.showcase_idx(6)
    assert torch.equal(idx, ds.showcase_idx(6))
    assert set(idx.tolist()) <= set(ds.eval_idx.tolist())
    assert len(set(ds.y_test[idx].tolist())) == 6  # six different classes
    assert len(ds.showcase_idx(12).unique()) == 12  # beyond one per class: no repeats


def test_channel_stats_match_numpy_on_float_copy():
    from robustsweep.steps.data import channel_stats

    x = np.random.default_rng(0).integers(0, 256, (50, 3, 5, 4), dtype=np.uint8)
    mean, std = channel_stats(x, chunk=7)
    f = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, f.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(std, f.std(axis=(0, 2, 3)), rtol=1e-7)


def test_loader_returning_normalised_floats_is_rejected(monkeypatch):
    from robustsweep.steps import data as data_mod

    def bad(cfg):
        x = np.zeros((4, 1, 8, 8), np.float32) - 0.5  # normalised tensors: the classic mistake
        return x, np.zeros(4, np.int64), x, np.zeros(4, np.int64), ["a"]

    monkeypatch.setitem(data_mod.DATASETS, "digits", bad)
    data_mod._load_cpu.cache_clear()
    try:
        with pytest.raises(ConfigError, match="uint8"):
            load_dataset(compose(["data.split_seed=123"]).data)
    finally:
        data_mod._load_cpu.cache_clear()


def test_digits_read_from_the_csv_equal_scikit_learns_load_digits():
    """The fast path (no ``sklearn.datasets`` import) against the library's own loader."""
    import numpy as np
    from sklearn.datasets import load_digits

    from robustsweep.steps.data import digits_arrays

    images, target = digits_arrays()
    ref = load_digits()
    assert images.dtype == ref.images.dtype and np.array_equal(images, ref.images)
    assert np.array_equal(target, ref.target)


def test_cifar_experiments_read_torchvisions_cifar10_and_say_what_to_do_offline(tmp_path):
    """Every CIFAR experiment works for a user without this project's JPEG copy: torchvision's CIFAR-10
    (downloaded into data.root), and offline without the files a message naming what to do."""
    import pytest

    from robustsweep.config import ConfigError, compose, validate

    for experiment in ("cifar_small", "seed", "gpu"):
        cfg = compose([f"experiment={experiment}", "device=cpu"])
        assert cfg.data.name == "cifar10" and "shared" not in str(cfg.data.root), experiment
    offline = ["experiment=cifar_small", f"data.root={tmp_path}", "data.download=false"]
    with pytest.raises(ConfigError, match=r"data.download=false .*no cifar-10-batches-py.*Getting CIFAR-10"):
        validate(compose(offline))
    (tmp_path / "cifar-10-batches-py").mkdir()
    validate(compose(offline))  # the unpacked python-version archive is what it needs
