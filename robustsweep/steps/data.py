"""Datasets, decoded once into uint8 tensors that stay resident on the device.

Every loader returns a ``Dataset``: ``x_*`` uint8 NCHW in [0, 255], ``y_*`` int64, plus the
per-channel mean/std the model normalises with *inside* its forward (see models.py), so attacks and
eps always work on [0, 1] pixels. Decoding happens once per process per dataset
(``functools.lru_cache``): the jobs of a multirun share it.

Adding a dataset: one YAML in conf/data/ with ``_target_: <pkg.module.loader>`` (or ``name:
<yours>`` and one function here decorated with ``@register_dataset("<yours>")``), a loader
``f(cfg)`` that returns ``(x_train, y_train, x_test, y_test, classes)`` (or ``(f, None, x_test,
y_test, classes)`` with ``f() -> (x_train, y_train)`` to decode the training split only when
something trains).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robustsweep.core.errors import ConfigError
from robustsweep.core.paths import resolve_path
from robustsweep.core.progress import progress
from robustsweep.core.registry import Registry

log = logging.getLogger(__name__)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]
DATASETS: Registry[Callable[[DictConfig], Arrays]] = Registry("data")
register_dataset = DATASETS.register
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class Dataset:
    name: str
    classes: list[str]
    x_test: torch.Tensor  # uint8 (N, C, H, W)
    y_test: torch.Tensor  # int64 (N,)
    eval_idx: torch.Tensor  # indices into the test split: the fixed evaluation subset
    # The training split and its statistics are only needed to train: decoded on first use, so a
    # sweep over a cached baseline never decodes CIFAR-10's 50k training JPEGs (~6 s).
    _train: Callable[[], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    _stats: Callable[[], tuple[tuple[float, ...], tuple[float, ...]]] = field(repr=False)

    @property
    def x_train(self) -> torch.Tensor:  # uint8 (N, C, H, W)
        return self._train()[0]

    @property
    def y_train(self) -> torch.Tensor:
        return self._train()[1]

    @property
    def mean(self) -> tuple[float, ...]:  # per channel, [0, 1] units
        return self._stats()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._stats()[1]

    @property
    def x_eval(self) -> torch.Tensor:
        return self.x_test[self.eval_idx]

    @property
    def y_eval(self) -> torch.Tensor:
        return self.y_test[self.eval_idx]

    def showcase_pos(self, k: int) -> torch.Tensor:
        """k positions in the eval subset, one per class in label order, then the rest.

        Fixed for a given eval subset, so every job of a sweep attributes the same images, and
        varied across classes (the subset is sorted, and image trees are sorted by class).
        """
        y = self.y_test[self.eval_idx].cpu()
        pos = [int((y == c).nonzero()[0]) for c in range(len(self.classes)) if (y == c).any()]
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[pos] = False
        return torch.cat([torch.tensor(pos, dtype=torch.long), rest.nonzero().flatten()])[:k]

    def showcase_idx(self, k: int) -> torch.Tensor:
        """The test indices of ``showcase_pos(k)``."""
        return self.eval_idx[self.showcase_pos(k).to(self.eval_idx.device)]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_test.shape[1:])  # type: ignore[return-value]


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return x.float().div_(255.0)


# ------------------------------------------------------------------------------------ loaders
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits().images, .target``, read straight from scikit-learn's ``digits.csv.gz``
    (the same ``np.loadtxt``): importing ``sklearn.datasets`` costs ~1.5 s of every process that
    loads digits (each CLI job, each joblib worker), the file itself 0.05 s. Falls back to
    ``load_digits`` if the file moved in another scikit-learn."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(next(iter(spec.submodule_search_locations or [])), "datasets", "data", "digits.csv.gz") \
        if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


@register_dataset("digits")
def _digits(cfg: DictConfig) -> Arrays:
    """scikit-learn's bundled 8x8 digits (1,797 images, 0..16 grey levels): works offline."""
    images, target = digits_arrays()
    x = np.rint(images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    y = target.astype(np.int64)
    # A fixed, seeded 80/20 split: the same test images whatever the run seed.
    perm = np.random.default_rng(cfg.get("split_seed", 0)).permutation(len(x))
    n_test = round(len(x) * cfg.get("test_fraction", 0.2))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test], [str(i) for i in range(10)]


@register_dataset("cifar10")
def _cifar10(cfg: DictConfig) -> Arrays:
    """torchvision's CIFAR-10 binary files under ``data.root`` (downloaded if missing)."""
    from torchvision.datasets import CIFAR10

    root = resolve_path(cfg.root)
    try:
        train = CIFAR10(str(root), train=True, download=bool(cfg.download))
        test = CIFAR10(str(root), train=False, download=bool(cfg.download))
    except (OSError, RuntimeError) as e:  # URLError is an OSError; "Dataset not found" a RuntimeError
        raise ConfigError(
            f"data.root={str(cfg.root)!r}: CIFAR-10 is not at {root} and could not be downloaded "
            f"({type(e).__name__}: {e}); allowed offline: the python-version archive "
            f"(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) unpacked into that "
            f"folder (cifar-10-batches-py/), an image tree with data=imagefolder "
            f"data.root=/path/to/cifar10-jpg (train/<class>/*.jpg, test/...), or the bundled data=digits "
            f"(README \"Getting CIFAR-10\")"
        ) from e
    to_nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731
    return (to_nchw(train.data), np.asarray(train.targets, np.int64),
            to_nchw(test.data), np.asarray(test.targets, np.int64), list(train.classes))


def _list_split(split_dir: Path) -> tuple[list[Path], list[str]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    files = [f for c in classes for f in sorted((split_dir / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    return files, classes


def _decode(files: list[Path], size: int, channels: int, desc: str) -> np.ndarray:
    from PIL import Image
    mode = "RGB" if channels == 3 else "L"
    out = np.empty((len(files), size, size, channels), np.uint8)
    for i, f in enumerate(progress(files, desc=desc, unit="img")):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(im).reshape(size, size, channels)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for a bad file
            raise _unreadable(f, e) from e
    return out.transpose(0, 3, 1, 2).copy()


def _unreadable(f: Path, e: Exception, root: str | None = None) -> ConfigError:
    """The error for an image file PIL cannot decode (``f`` is ``root/<split>/<class>/<file>``;
    ``root``: data.root as written, when known)."""
    return ConfigError(f"data.root={root or str(f.parents[2])!r}: {f} is not a readable image "
                       f"({type(e).__name__}: {e}); allowed: image files PIL can decode (replace or "
                       f"remove this one)")


@register_dataset("imagefolder")
def _imagefolder(cfg: DictConfig) -> Arrays:
    """Any ``root/{train,test}/<class>/*`` tree, decoded once and resized to ``data.size``."""
    root = resolve_path(cfg.root)
    tr_files, classes = _list_split(root / "train")
    te_files, te_classes = _list_split(root / "test")
    if te_classes != classes:
        raise ConfigError(f"data.root={str(cfg.root)!r}: test/ classes {te_classes} differ from "
                          f"train/ classes {classes}")
    label = {c: i for i, c in enumerate(classes)}
    x_te = _decode(te_files, cfg.size, cfg.channels, "decode test")
    y_te = np.array([label[f.parent.name] for f in te_files], np.int64)

    def train() -> tuple[np.ndarray, np.ndarray]:  # decoded only if something trains (or needs stats)
        return (_decode(tr_files, cfg.size, cfg.channels, "decode train"),
                np.array([label[f.parent.name] for f in tr_files], np.int64))
    return train, None, x_te, y_te, classes


def check_data_config(cfg: DictConfig) -> None:
    """Cheap checks of a data config, before anything is decoded (called by validate())."""
    DATASETS.validate(cfg, cfg)
    if cfg.get("n_eval") is not None and (not isinstance(cfg.n_eval, int) or cfg.n_eval <= 0):
        raise ConfigError(f"data.n_eval={cfg.n_eval!r} is not valid; allowed: null (whole test "
                          f"split) or an integer > 0")
    # Statistics in 0..255 units (or of normalised data) would silently rescale every input.
    for key, lo_open in (("mean", False), ("std", True)):
        vals = cfg.get(key)
        if vals:
            ok = all(isinstance(v, int | float) and (v > 0 if lo_open else v >= 0) and v <= 1 for v in vals)
            if not ok:
                raise ConfigError(f"data.{key}={list(vals)!r} is not valid; allowed: null (computed "
                                  f"from the training split) or per-channel values in "
                                  f"{'(0, 1]' if lo_open else '[0, 1]'} pixel units (not 0..255)")


def _check_imagefolder(cfg: DictConfig, _: DictConfig) -> None:
    """``data=imagefolder``: the root holds train/<class>/ and test/<class>/ folders."""
    if OmegaConf.is_missing(cfg, "root") or not cfg.root:
        raise ConfigError("data.root is missing; allowed: a folder with train/<class>/* and "
                          "test/<class>/* images, e.g. data.root=/data/cifar10-jpg")
    root = resolve_path(cfg.root)
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir() or not any(p.is_dir() for p in d.iterdir()):
            raise ConfigError(
                f"data.root={str(cfg.root)!r}: no {split}/<class>/ folders in {root}; allowed: "
                f"a folder with train/<class>/*.jpg and test/<class>/*.jpg (ImageFolder layout)"
            )
    _check_tree(cfg, root)
    if not isinstance(cfg.size, int) or cfg.size <= 0:
        raise ConfigError(f"data.size={cfg.size!r} is not valid; allowed: an integer > 0")
    if cfg.channels not in (1, 3):
        raise ConfigError(f"data.channels={cfg.channels!r} is not valid; allowed: 1, 3")


DATASETS.checks["imagefolder"] = _check_imagefolder


def _check_cifar10(cfg: DictConfig, _: DictConfig) -> None:
    """``data=cifar10`` with ``download: false`` needs torchvision's files already in ``data.root``:
    said before anything runs (a download that fails offline is reported when the data loads)."""
    root = resolve_path(cfg.root)
    if not cfg.get("download", True) and not (root / "cifar-10-batches-py").is_dir():
        raise ConfigError(f"data.download=false but data.root={str(cfg.root)!r} has no cifar-10-batches-py/ "
                          f"({root}); allowed: data.download=true (online), the python-version archive "
                          f"cifar-10-python.tar.gz unpacked there, or data=imagefolder data.root=<image tree> "
                          f"(README \"Getting CIFAR-10\")")


DATASETS.checks["cifar10"] = _check_cifar10


# What validation checks of an image tree, and what it leaves to the loader. Checked, cheaply
# (a sweep validates every job): train/ and test/ have the same class folders; each split holds
# images; the first _SAMPLE_PER_CLASS image files of each class (directory order, at most
# _SAMPLE_MAX per split, each decoded in full: a truncated JPEG passes PIL's verify()) are readable.
# Not checked: every other file. Listing CIFAR-10's 60k files alone takes ~0.8 s and decoding them
# ~6 s, so the loader checks the rest as it decodes and refuses the first bad one with a
# ConfigError naming it; that fails the cell that decodes it (its MLflow run has started by then).
# Class folders without images are only warned about when the split has images in other classes.
_SAMPLE_PER_CLASS = 2
_SAMPLE_MAX = 64
_DECODED_OK: set[tuple[str, int, int]] = set()  # (file, size, mtime) already decoded by a check


def _first_images(folder: Path, k: int) -> list[Path]:
    """Up to ``k`` image files of ``folder`` in directory order, without listing all of it."""
    found: list[Path] = []
    with os.scandir(folder) as it:
        for e in it:
            if Path(e.name).suffix.lower() in IMAGE_SUFFIXES and e.is_file():
                found.append(Path(e.path))
                if len(found) >= k:
                    break
    return found


def _check_tree(cfg: DictConfig, root: Path) -> None:
    """The cheap checks of an image tree described above; raises ConfigError naming data.root."""
    from PIL import Image

    classes = {split: sorted(p.name for p in (root / split).iterdir() if p.is_dir())
               for split in ("train", "test")}
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise ConfigError(f"data.root={str(cfg.root)!r}: train/ and test/ have different class folders "
                          f"(only in train/: {only_train}; only in test/: {only_test}); allowed: the same "
                          f"<class>/ folders in both splits")
    for split, names in classes.items():
        sample = {c: _first_images(root / split / c, _SAMPLE_PER_CLASS) for c in names}
        empty = [c for c in names if not sample[c]]
        if len(empty) == len(names):
            raise ConfigError(f"data.root={str(cfg.root)!r}: the class folders of {split}/ ({_few(names)}) "
                              f"hold no images; allowed: a folder with train/<class>/ and test/<class>/ "
                              f"folders of image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if empty:
            log.warning("data.root=%r: %d class folder(s) of %s/ hold no images: %s", str(cfg.root),
                        len(empty), split, _few(empty))
        # round-robin over the classes, so a capped sample still reaches every class it can
        order = [fs[i] for i in range(_SAMPLE_PER_CLASS) for fs in sample.values() if i < len(fs)]
        for f in order[:_SAMPLE_MAX]:
            st = f.stat()
            seen = (str(f), st.st_size, st.st_mtime_ns)
            if seen in _DECODED_OK:
                continue
            try:
                with Image.open(f) as im:
                    im.load()
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for a bad file
                raise _unreadable(f, e, str(cfg.root)) from e
            _DECODED_OK.add(seen)


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def exact_shape(cfg: DictConfig) -> tuple[int, int, int] | None:
    """``shape_hint`` when it is known, not guessed: the built-in datasets; None for a loader
    ``_target_`` (its images are only seen when it runs)."""
    if cfg.get("_target_") or cfg.get("name") not in ("digits", "cifar10", "imagefolder"):
        return None
    return shape_hint(cfg)


def shape_hint(cfg: DictConfig) -> tuple[int, int, int]:
    """(channels, image size, classes) of a data config without decoding anything: what a
    ``model._target_`` is built with when validate() checks that it returns an ``nn.Module``."""
    if cfg.get("name") == "digits" and not cfg.get("_target_"):
        return 1, 8, 10
    if cfg.get("name") == "imagefolder" and not cfg.get("_target_"):
        train = resolve_path(cfg.root) / "train"
        return int(cfg.channels), int(cfg.size), sum(p.is_dir() for p in train.iterdir())
    return int(cfg.get("channels", 3)), int(cfg.get("size", 32)), int(cfg.get("num_classes", 10))


def train_size(cfg: DictConfig) -> int | None:
    """Images in the training split of a data config, without decoding (None: not known before
    loading, e.g. a ``_target_`` dataset)."""
    if cfg.get("_target_"):
        return None
    if cfg.get("name") == "digits":
        return 1797 - round(1797 * cfg.get("test_fraction", 0.2))
    if cfg.get("name") == "cifar10":
        return 50000
    if cfg.get("name") == "imagefolder":
        return len(_list_split(resolve_path(cfg.root) / "train")[0])
    return None


def test_size(cfg: DictConfig) -> int | None:
    """Images in the test split of a data config, without decoding (None: not known before loading)."""
    if cfg.get("_target_"):
        return None
    if cfg.get("name") == "digits":
        return round(1797 * cfg.get("test_fraction", 0.2))
    if cfg.get("name") == "cifar10":
        return 10000
    if cfg.get("name") == "imagefolder":
        return len(_list_split(resolve_path(cfg.root) / "test")[0])
    return None


def decode_seconds(cfg: DictConfig, k: int = 64) -> float:
    """Seconds per image to decode this data config's files (an image tree: ``k`` of its test
    images timed); 0 for data that loads as arrays (digits, torchvision's CIFAR-10)."""
    if cfg.get("_target_") or cfg.get("name") != "imagefolder":
        return 0.0
    files = _list_split(resolve_path(cfg.root) / "test")[0][:k]
    if not files:
        return 0.0
    t0 = time.perf_counter()
    _decode(files, int(cfg.size), int(cfg.channels), desc="timing the decoder")
    return (time.perf_counter() - t0) / len(files)


# ------------------------------------------------------------------------------------- facade
def _checked(x: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise ConfigError(f"data={name!r}: the loader returned {getattr(x, 'dtype', type(x).__name__)} "
                          f"images of shape {getattr(x, 'shape', '?')}; allowed: NCHW uint8 pixels in [0, 255] "
                          f"(normalisation happens inside the model)")
    return x


@functools.lru_cache(maxsize=4)
def _load_cpu(key: str) -> tuple[np.ndarray, np.ndarray, list[str], Callable[[], tuple[np.ndarray, np.ndarray]],
                                 Callable[[], tuple[tuple[float, ...], tuple[float, ...]]]]:
    """Test split now; training split and its per-channel statistics when first asked for."""
    cfg = OmegaConf.create(key)
    x_tr, y_tr, x_te, y_te, classes = DATASETS.resolve(cfg)(cfg)
    _checked(x_te, DATASETS.name_of(cfg))

    @functools.cache
    def train() -> tuple[np.ndarray, np.ndarray]:
        x, y = x_tr() if callable(x_tr) else (x_tr, y_tr)
        return _checked(x, DATASETS.name_of(cfg)), y

    @functools.cache
    def stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
        if cfg.get("mean") and cfg.get("std"):  # fixed by the config: nothing to decode
            return tuple(cfg.mean), tuple(cfg.std)
        m, sd = channel_stats(train()[0])
        return (tuple(cfg.mean) if cfg.get("mean") else m), (tuple(cfg.std) if cfg.get("std") else sd)

    return x_te, y_te, classes, train, stats


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of uint8 NCHW images, in chunks.

    A float copy of CIFAR-10's training split would be 600 MB; chunked sums need a few MB.
    """
    s1 = np.zeros(x.shape[1])
    s2 = np.zeros(x.shape[1])
    for i in range(0, len(x), chunk):
        b = x[i:i + chunk].astype(np.float64) / 255.0
        s1 += b.sum(axis=(0, 2, 3))
        s2 += (b * b).sum(axis=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def identity(cfg: DictConfig) -> dict:
    """The keys of a data config that determine the decoded images (for caches and hashes)."""
    keep = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in ("n_eval", "subset_seed", "download")}
    if keep.get("root"):
        keep["root"] = str(resolve_path(keep["root"]).resolve())
    return keep


# (id of a decoded array, device) -> (that array, its copy on the device). Holding the array keeps
# its id from being reused; keyed by the array itself, so a re-decode is never shadowed.
_ON_DEVICE: dict[tuple[int, str], tuple[np.ndarray, torch.Tensor]] = {}


def _on_device(arr: np.ndarray, dev: torch.device) -> torch.Tensor:
    """``arr`` on ``dev``, copied once per process (on CUDA, CIFAR-10 would be 180 MB per job)."""
    if dev.type == "cpu":
        return torch.from_numpy(arr)  # no copy
    k = (id(arr), str(dev))
    if k not in _ON_DEVICE:
        if len(_ON_DEVICE) >= 16:  # 4 datasets' splits at most
            _ON_DEVICE.clear()
        _ON_DEVICE[k] = (arr, torch.from_numpy(arr).to(dev))
    return _ON_DEVICE[k][1]


def load_dataset(cfg: DictConfig, device: torch.device | str = "cpu") -> Dataset:
    """Decode (once per process) and move to ``device`` as uint8; pick the eval subset.

    The training split is decoded and moved on first access (``ds.x_train``, ``ds.mean``)."""
    key = OmegaConf.to_yaml(OmegaConf.create({**identity(cfg), "download": cfg.get("download")}))
    x_te, y_te, classes, train, stats = _load_cpu(key)
    n_test = len(x_te)
    n_eval = cfg.get("n_eval") or n_test
    if n_eval > n_test:
        raise ConfigError(f"data.n_eval={n_eval} is larger than the test split ({n_test} images); "
                          f"allowed: null or an integer in [1, {n_test}]")
    # The same seeded subset in every job (independent of the run seed), sorted for locality.
    g = torch.Generator().manual_seed(int(cfg.get("subset_seed", 0)))
    eval_idx = torch.randperm(n_test, generator=g)[:n_eval].sort().values
    dev = torch.device(device)

    def train_on_device() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = train()
        return _on_device(x, dev), _on_device(y, dev)

    ds = Dataset(
        name=DATASETS.name_of(cfg), classes=classes,
        x_test=_on_device(x_te, dev), y_test=_on_device(y_te, dev),
        eval_idx=eval_idx.to(dev), _train=train_on_device, _stats=stats,
    )
    log.info("data %s: %d test images of shape %s, eval subset %d (training split: decoded when "
             "needed)", ds.name, n_test, ds.shape, n_eval)
    return ds
