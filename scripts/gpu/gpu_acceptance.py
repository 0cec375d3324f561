"""The GPU acceptance in one call on a lent GPU machine, and its offline CPU rehearsal.

**For a user with a GPU of their own** none of this is needed: install robustsweep there and run
``python -m robustsweep -m experiment=gpu sparsity=0,0.25,0.5,0.75 epsilon=2/255,4/255,8/255
attack=fgsm,pgd`` (CIFAR-10 from torchvision, README "Getting CIFAR-10"), then
``python scripts/bench/bench.py --device cuda --data-root <an image tree of CIFAR-10>``.

This script serves the project's own situation, which may be yours on a cluster: a GPU comes now and
then, for ~15 minutes, on a machine with no internet whose image has torch,
torchvision, numpy, scipy, scikit-learn, matplotlib, pandas, safetensors and tqdm but not hydra,
omegaconf, mlflow, optuna, torchattacks or captum, and whose Python is 3.12. So everything it
lacks is packed here, travels with the working tree (64 MiB per call in all), and one command
does the rest:

    python scripts/gpu/gpu_acceptance.py pack          # here: outputs/gpu_pack/ (cp312 wheels + CIFAR-10)
    # device call, carry=["outputs/gpu_pack"], timeout_s=600:
    python3 scripts/gpu/gpu_acceptance.py run --out $OUT
    python scripts/gpu/gpu_acceptance.py rehearse      # here: the same flow at toy size, offline

``run``: installs the wheels with ``pip --no-index --no-deps --target`` (the image keeps its own
torch), unpacks the JPEG copy of CIFAR-10, runs the seed grid through the CLI (its first job
trains the ResNet-18 baseline: ``experiment=gpu``, ``train=cifar_gpu``), then
``scripts/bench/bench.py --device cuda`` on the cached baseline, and writes to ``--out``:
``acceptance.json`` (every figure), ``cells.csv``, ``bench.json``, ``mlflow_store.tar.xz`` and
``acceptance.log``. It runs in a work folder outside the checkout, so the installed wheel, not the
source tree, is what runs. A deadline (``--budget``) keeps it inside one 10-minute call: a step
that runs out of time is stopped and the JSON says so.

``rehearse``: packs for *this* Python at toy size (the bundled digits as 200 training and 200
test JPEGs, a width-8 ResNet-18, one epoch), builds a
stand-in for the GPU image (a fresh virtualenv that sees only the image's packages, linked from
this environment), and runs ``run --toy`` with it: no index, no network, the same steps. What
the pack lacks fails here, not in a GPU window.

Why the data travels as JPEGs in a .tar.xz: the 60,000 files are 57 MB (quality-75 JPEGs barely
compress) but their identical headers do: 18.6 MB. Raw uint8 arrays (184 MB) compress to far more.
Why ``mlflow-skinny`` instead of ``mlflow``: jobs only log to a SQLite store; the full package adds
the server and UI (12 MB of wheel, plus flask, gunicorn, graphene, ...). The store comes back here,
where ``mlflow ui`` reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

log = logging.getLogger("gpu_acceptance")
REPO = Path(__file__).resolve().parents[2]
PACK = REPO / "outputs" / "gpu_pack"
LIMIT_MIB = 64  # what travels per device call: the working tree plus carried paths
# Packages the GPU image already holds (the device library's KINDS.md, read 2026-11-17); their
# wheels do not travel. nvidia-* and cuda-* are matched by prefix.
IMAGE = [w for line in Path(__file__).with_name("gpu_image_packages.txt").read_text().splitlines()
         if not line.startswith("#") for w in line.split()]
# mlflow's client, without the server and UI; the SQLite store needs sqlalchemy and alembic.
SKINNY = {"mlflow": ["mlflow-skinny=={mlflow}", "sqlalchemy", "alembic"]}
PROVIDED_BY = {"mlflow": "mlflow-skinny"}
GRID = ["sparsity=0,0.25,0.5,0.75", "epsilon=2/255,4/255,8/255", "attack=fgsm,pgd"]
# + the toy data pack (200 + 200 images). Drift on 10 images, not 100: its IG dominates a CPU cell.
TOY = ["model.width=8", "train.epochs=1", "drift.n_images=10", "drift.n_random=4", "device=cpu"]
# The rehearsal's grid: every kind of cell of GRID (dense and pruned, both attacks) once, 4 cells
# instead of 24 (~9 s each on a 2-core CPU: CI's time goes to what the flow proves, not to repeats).
TOY_GRID = ["sparsity=0,0.75", "epsilon=8/255", "attack=fgsm,pgd"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def in_image(name: str) -> bool:
    n = norm(name)
    return n in {norm(i) for i in IMAGE} or n.startswith(("nvidia-", "cuda-"))


def sh(cmd: list[str], timeout: float | None = None, **kw: object) -> subprocess.CompletedProcess:
    log.info("$ %s", " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, timeout=timeout, **kw)  # type: ignore[arg-type]


def mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


# ------------------------------------------------------------------------------------------ pack
def requirements() -> list[str]:
    """robustsweep's dependencies (as installed here), minus the image's, mlflow as mlflow-skinny."""
    out = []
    for d in metadata.requires("robustsweep") or []:
        if "extra ==" in d:
            continue
        name = re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0]
        if in_image(name):
            continue
        out += [r.format(mlflow=metadata.version("mlflow")) for r in SKINNY.get(norm(name), [d])]
    return out


def resolve(reqs: list[str], target: list[str], find_links: Path) -> list[tuple[str, str, str]]:
    """(name, version, file name) of every distribution ``reqs`` need, from pip's resolver."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        sh([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
            "--target", Path(tmp) / "t", "--report", report, "--find-links", find_links, *target, *reqs])
        items = json.loads(report.read_text())["install"]
    return [(i["metadata"]["name"], i["metadata"]["version"], i["download_info"]["url"].rsplit("/", 1)[-1])
            for i in items]


def pack(dest: Path, python: str, toy: bool, data_root: Path | None) -> dict:
    """Wheels for ``python`` (e.g. "3.12") that the image lacks, our own wheel, and the data."""
    t0 = time.perf_counter()
    if dest.exists():
        shutil.rmtree(dest)
    wheels, local = dest / "wheels", dest / "build"
    wheels.mkdir(parents=True)
    reqs = requirements()
    # Distributions published only as source (antlr4-python3-runtime, omegaconf's parser) are
    # built into wheels once, here; the platform-targeted resolve below then finds them.
    for name, version, file in resolve(reqs, [], local):
        if not file.endswith(".whl") and not in_image(name):
            sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", local, f"{name}=={version}"])
    target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
              *[a for p in PLATFORMS for a in ("--platform", p)]]
    need = [(n, v) for n, v, _ in resolve(reqs, target, local) if not in_image(n)]
    sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels, "--find-links", local,
        *target, *[f"{n}=={v}" for n, v in need]])
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO])
    shutil.rmtree(local, ignore_errors=True)

    archive = dest / "cifar10-jpg.tar.xz"
    if toy:  # no CIFAR-10 in CI: the bundled digits, as the same kind of JPEG tree
        data_root = digits_jpegs(dest / "toy-data", per_class=20)
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        tar.add(data_root, arcname="cifar10-jpg")
    shutil.rmtree(dest / "toy-data", ignore_errors=True)
    manifest = {"python": python, "toy": toy, "wheels": sorted(p.name for p in wheels.iterdir()),
                "wheels_mib": round(mib(wheels), 2), "data_mib": round(mib(archive), 2),
                "pack_s": round(time.perf_counter() - t0, 1)}
    tree = subprocess.run(["git", "-C", REPO, "ls-files", "-co", "--exclude-standard"], capture_output=True,
                          text=True, check=True).stdout.split()
    tree_bytes = sum((REPO / f).stat().st_size for f in tree if (REPO / f).is_file())
    manifest["tree_mib"] = round(tree_bytes / 2**20, 2)
    manifest["travels_mib"] = round(manifest["tree_mib"] + mib(dest), 2)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info("pack %s: %d wheels %.1f MiB, data %.1f MiB; with the tree %.1f MiB travel (limit %d) in %.0f s",
             dest, len(manifest["wheels"]), manifest["wheels_mib"], manifest["data_mib"],
             manifest["travels_mib"], LIMIT_MIB, manifest["pack_s"])
    if manifest["travels_mib"] > LIMIT_MIB:
        raise SystemExit(f"the pack and the tree are {manifest['travels_mib']} MiB; a device call carries "
                         f"at most {LIMIT_MIB} MiB")
    return manifest


def digits_jpegs(dest: Path, per_class: int) -> Path:
    """scikit-learn's bundled 8x8 digits as 32x32 RGB JPEGs in an image-folder tree."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for split, offset in (("train", 0), ("test", per_class)):
        for k in range(10):
            folder = dest / split / f"digit{k}"
            folder.mkdir(parents=True)
            of_k = [i for i in range(len(d.target)) if d.target[i] == k]
            for j, i in enumerate(of_k[offset:offset + per_class]):
                img = Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).resize((32, 32)).convert("RGB")
                img.save(folder / f"{j:04d}.jpg", quality=75)
    return dest


# ------------------------------------------------------------------------------------------- run
class Deadline:
    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self, reserve: float = 0.0) -> float:
        return max(self.end - time.monotonic() - reserve, 1.0)


def step(result: dict, name: str, cmd: list, timeout: float, **kw: object) -> bool:
    """Run one step, time it, record ok / timed out / failed in ``result["steps"]``."""
    t0 = time.perf_counter()
    rec: dict = {}
    try:
        sh(cmd, timeout=timeout, **kw)
        rec["status"] = "ok"
    except subprocess.TimeoutExpired:
        rec["status"] = f"timed out after {timeout:.0f} s"
    except subprocess.CalledProcessError as e:
        rec["status"] = f"failed (exit {e.returncode})"
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    result["steps"][name] = rec
    log.info("step %s: %s in %.1f s", name, rec["status"], rec["wall_s"])
    return rec["status"] == "ok"


def check_installed(env: dict) -> None:
    """Every requirement of the installed robustsweep is importable (metadata present)."""
    code = (
        "import importlib.metadata as m, re, sys\n"
        f"prov = {PROVIDED_BY!r}\n"
        "missing = []\n"
        "for r in m.requires('robustsweep') or []:\n"
        "    if 'extra ==' in r: continue\n"
        "    n = re.split(r'[<>=!~ \\[;]', r, maxsplit=1)[0].lower()\n"
        "    try: m.version(prov.get(n, n))\n"
        "    except m.PackageNotFoundError: missing.append(n)\n"
        "import robustsweep, hydra, omegaconf, mlflow, optuna, torchattacks, captum, torch\n"
        "print('torch', torch.__version__, 'cuda', torch.cuda.is_available())\n"
        "sys.exit('missing: ' + ', '.join(missing) if missing else 0)\n")
    sh([sys.executable, "-c", code], env=env, timeout=120)


def run(pack_dir: Path, out: Path, toy: bool, budget_s: float, work: Path) -> dict:
    deadline = Deadline(budget_s)
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "acceptance.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger().addHandler(handler)
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    result: dict = {"toy": toy, "pack": manifest, "steps": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if work.exists():
        shutil.rmtree(work)
    site, data = work / "site", work / "data"
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(site), "PIP_CONFIG_FILE": os.devnull, "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'outputs' / 'mlflow.db'}"}
    try:
        wheels = sorted((pack_dir / "wheels").glob("*.whl"))
        ok = step(result, "install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                      "--no-compile", "--target", site, *wheels],
                  timeout=deadline.left(), env=env)
        if ok:
            check_installed(env)
        t0 = time.perf_counter()
        with tarfile.open(pack_dir / "cifar10-jpg.tar.xz") as tar:
            tar.extractall(data, filter="data")
        result["steps"]["unpack"] = {"status": "ok", "wall_s": round(time.perf_counter() - t0, 1)}
        root = data / "cifar10-jpg"
        overrides = ["experiment=gpu", "data=imagefolder", f"data.root={root}", *(TOY if toy else [])]
        grid_dir = work / "grid"
        grid = TOY_GRID if toy else GRID
        step(result, "grid", [sys.executable, "-m", "robustsweep", "-m", *overrides, *grid,
                              f"hydra.sweep.dir={grid_dir}"],
             timeout=deadline.left(reserve=150 if not toy else 30), env=env, cwd=work)
        bench = work / "bench.json"
        step(result, "bench", [sys.executable, REPO / "scripts" / "bench" / "bench.py",
                               "--device", "cpu" if toy else "cuda", "--experiment", "gpu", "--data-root", root,
                               "--model", "resnet18", "--n-eval", "200" if toy else "10000",
                               "--skip", "plain,lean,growth,overhead,sweep", "--out", bench,
                               *[f"--override={o}" for o in TOY if toy and not o.startswith("device=")]],
             timeout=deadline.left(reserve=15), env=env, cwd=work)
        collect(result, work, grid_dir, bench, out)
    finally:
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        (out / "acceptance.json").write_text(json.dumps(result, indent=1))
        logging.getLogger().removeHandler(handler)
        log.info("wrote %s", out / "acceptance.json")
    return result


def collect(result: dict, work: Path, grid_dir: Path, bench: Path, out: Path) -> None:
    """The figures into ``result``; cells.csv, bench.json and the store into ``out``."""
    cells = grid_dir / "summary" / "cells.csv"
    if cells.is_file():
        shutil.copy(cells, out / "cells.csv")
        lines = cells.read_text().splitlines()
        result["grid"] = {"cells": len(lines) - 1}
    if bench.is_file():
        shutil.copy(bench, out / "bench.json")
        b = json.loads(bench.read_text())
        result["machine"] = b.get("machine")
        result["baseline"] = b.get("baseline")
        result["ceiling"] = b.get("ceiling")
        result["engine"] = b.get("engine")
        result["memory"] = b.get("memory")
        train_s = (b.get("baseline") or {}).get("train_s")
        grid = result["steps"].get("grid", {})
        if train_s is not None and grid.get("status") == "ok":
            result.setdefault("grid", {})["wall_s_without_training"] = round(grid["wall_s"] - train_s, 1)
    store = work / "outputs"
    if store.is_dir():
        with tarfile.open(out / "mlflow_store.tar.xz", "w:xz") as tar:
            for name in ("mlflow.db", "mlartifacts"):
                if (store / name).exists():
                    tar.add(store / name, arcname=name)
        result["store_mib"] = round(mib(out / "mlflow_store.tar.xz"), 2)


# -------------------------------------------------------------------------------------- rehearse
def fake_image(dest: Path) -> Path:
    """A folder holding links to only the image's packages, as installed in this environment.

    A namespace folder (no ``__init__.py``, e.g. ``google/``) is shared with packages the image
    lacks, so only this distribution's own subfolder of it is linked."""
    dest.mkdir(parents=True)
    linked = set()
    for dist in metadata.distributions():
        if not in_image(dist.metadata["Name"]) or not dist.files:
            continue
        base = Path(dist.locate_file(""))
        for f in dist.files:
            if f.parts[0] in ("..", "__pycache__") or f.parts[0].endswith(".pth"):
                continue
            top = base / f.parts[0]
            shared = top.is_dir() and not (top / "__init__.py").exists() and not top.name.endswith(
                (".dist-info", ".libs", ".data")) and len(f.parts) > 2
            rel = Path(*f.parts[:2]) if shared else Path(f.parts[0])
            if rel in linked or not (base / rel).exists():
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).symlink_to(base / rel)
            linked.add(rel)
    return dest


def rehearse(keep: Path | None, budget: float = 900.0) -> int:
    t0 = time.perf_counter()
    tmp = Path(keep or tempfile.mkdtemp(prefix="rs-rehearse-"))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    pack_dir = REPO / "outputs" / "gpu_pack_rehearse"
    pack(pack_dir, python, toy=True, data_root=None)
    if tmp.exists():
        shutil.rmtree(tmp)
    image = fake_image(tmp / "image")
    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", venv])
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "gpu_image.pth").write_text(f"{image}\n")
    out = tmp / "out"
    sh([venv / "bin" / "python", Path(__file__).resolve(), "run", "--toy", "--pack", pack_dir, "--out", out,
        "--work", tmp / "work", "--budget", str(budget)])
    result = json.loads((out / "acceptance.json").read_text())
    bad = {k: v["status"] for k, v in result["steps"].items() if v["status"] != "ok"}
    n = (result.get("grid") or {}).get("cells")
    missing = [f for f in ("acceptance.json", "cells.csv", "bench.json", "mlflow_store.tar.xz")
               if not (out / f).is_file()]
    log.info("rehearsal in %.0f s: steps %s, %s cells, pack %s MiB (wheels %s + data %s)",
             time.perf_counter() - t0, {k: v["wall_s"] for k, v in result["steps"].items()}, n,
             result["pack"]["travels_mib"], result["pack"]["wheels_mib"], result["pack"]["data_mib"])
    expected = math.prod(len(o.split("=", 1)[1].split(",")) for o in TOY_GRID)
    if bad or n != expected or missing:
        log.error("rehearsal failed: steps %s, %s cells (expected %d), missing %s", bad, n, expected, missing)
        return 1
    if keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="wheels + data for the GPU image into outputs/gpu_pack")
    p.add_argument("--python", default="3.12", help="the image's Python (major.minor)")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpg")
    r = sub.add_parser("run", help="on the device: install, unpack, grid, bench, collect")
    r.add_argument("--pack", type=Path, default=PACK)
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/gpu_acceptance")))
    r.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rs-acceptance")
    r.add_argument("--budget", type=float, default=570.0, help="seconds for everything (a call has 600)")
    r.add_argument("--toy", action="store_true", help="the rehearsal's sizes, on the CPU")
    h = sub.add_parser("rehearse", help="pack at toy size for this Python and run it offline here")
    h.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    h.add_argument("--budget", type=float, default=900.0,
                   help="seconds for the toy run (169 s on an idle 2-core CPU; CI allows more for a busy one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.cmd == "pack":
        pack(PACK, args.python, toy=False, data_root=args.data_root)
        return 0
    if args.cmd == "run":
        result = run(args.pack, args.out, args.toy, args.budget, args.work)
        return 0 if all(s["status"] == "ok" for s in result["steps"].values()) else 1
    return rehearse(args.keep, args.budget)


if __name__ == "__main__":
    sys.exit(main())
