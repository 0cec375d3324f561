"""The real command line, in a subprocess: a 2-job multirun, bad input, --help/--cfg."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests import forked_cli
from tests.conftest import FAST
from tests.forked_cli import run_many

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def cli(tmp_path: Path, *args: str, cold: bool = False) -> subprocess.CompletedProcess:
    """``python -m robustsweep *args`` in ``tmp_path``, without the user's MLFLOW_TRACKING_URI: in a
    process forked after the imports (tests/forked_cli.py), or with ``cold`` a new interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if not cold:
        return forked_cli.run(list(args), tmp_path, env)
    return subprocess.run([sys.executable, "-m", "robustsweep", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_job_multirun_writes_two_mlflow_runs(tmp_path):
    """From a cold start, as a user types it (the other command-line tests share the imports)."""
    p = cli(tmp_path, "-m", "sparsity=0,0.5", "epsilon=8/255", *FAST, cold=True)
    assert p.returncode == 0, p.stderr[-3000:]
    # before anything runs, what it will cost here; at the end, what it took (issue 32)
    log = p.stdout + p.stderr
    assert "estimate for the 2 cells to run on cpu" in log and "baselines: 1 to train" in log, log[-3000:]
    assert "the cells took " in log and "(estimated before the sweep: ~" in log, log[-3000:]
    store = tmp_path / "outputs" / "mlflow.db"  # default store, relative to the launch dir
    assert store.exists()
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("robustsweep")
    runs = client.search_runs([exp.experiment_id], "tags.`robustsweep.role` = 'cell'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.tags["hydra.job.num"] for r in runs) == ["0", "1"]
    assert all(r.data.tags["hydra.sweep.dir"] for r in runs)
    for r in runs:
        assert {"clean_acc", "robust_acc", "asr", "n_eval", "n_correct", "sparsity_measured",
                "ig_delta"} <= set(r.data.metrics)
        paths = {a.path for a in client.list_artifacts(r.info.run_id, "ig")}
        assert {"ig/ig_maps.png", "ig/attributions.npz"} <= paths
    # one baseline trained, then reused
    assert len(list((tmp_path / "outputs" / "cache" / "baselines").glob("*.safetensors"))) == 1
    assert (p.stdout + p.stderr).count("training baseline") == 1


# Each is a real ``python -m robustsweep`` command in its own process (forked from one that has
# imported torch and robustsweep once: tests/forked_cli.py; ~0.3 s each instead of ~6 s).
BAD_INPUT = [
    (["sparsity=1.5"], "sparsity=1.5"),
    (["epsilon=-1"], "epsilon=-1"),
    (["epsilon=8/0"], "epsilon='8/0'"),
    (["attack=deepfool"], "Could not find 'attack/deepfool'"),
    (["model.checkpoint=missing.safetensors"], "model.checkpoint='missing.safetensors'"),
    (["-m", "sparsity=0,1.5"], "sparsity=1.5"),
    # the list: types, unknown keys, missing values, eps, steps, step size, amount, device
    (["seed=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    (["sparsity=half"], "sparsity"),
    (["attack.stepz=3"], "Could not override 'attack.stepz'"),
    # what Hydra's message then advises: + adds the key, which nothing reads (issue 31)
    (["+sparsty=0.9"], "+sparsty=0.9: 'sparsty' is not a key robustsweep knows (did you mean sparsity?)"),
    (["attack=pgd", "+attack.stepz=5"], "attack.stepz is not a key of attack=pgd (did you mean attack.steps?)"),
    (["-m", "sparsity=0,0.5", "+attack.stepz=5"], "attack.stepz is not a key of attack=fgsm"),
    (["data=imagefolder"], "data.root is missing"),
    (["epsilon=1.5"], "epsilon=1.5"),
    (["attack=pgd", "attack.steps=0"], "attack.steps=0 is not valid; allowed: an integer > 0"),
    (["attack=pgd", "epsilon=2/255", "attack.step_size=8/255"],
     "attack.step_size='8/255' is not valid; allowed: a step <= epsilon"),
    (["-m", "attack=pgd", "epsilon=2/255,16/255", "attack.step_size=8/255"], "a step <= epsilon"),
    (["sparsity=1.0"], "sparsity=1.0 is not valid; allowed: a float in [0, 1)"),
    (["device=tpu"], "device='tpu' is not valid; allowed: auto, cpu, cuda, cuda:N, mps"),
    (["device=cuda"], "no CUDA GPU is available here"),
    (["-m", "device=cuda", "sparsity=0,0.5"], "no CUDA GPU is available here"),
    (["data.mean=[125.3,123.0,113.9]"], "not 0..255"),
    (["attribution.max_n_steps=8"], "attribution.max_n_steps=8 is not valid"),
]

HELP_ARGS = [["--help"], ["--cfg", "job"], ["--info"]]


@pytest.fixture(scope="module")
def forked_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The commands of this module that end before any job: ``" ".join(args)`` -> (cwd, process)."""
    commands = [args for args, _ in BAD_INPUT] + HELP_ARGS
    dirs = [tmp_path_factory.mktemp("cli") for _ in commands]
    runs = run_many([{"args": args, "cwd": d} for args, d in zip(commands, dirs, strict=True)])
    return {" ".join(args): (d, p) for args, d, p in zip(commands, dirs, runs, strict=True)}


@pytest.mark.parametrize(("args", "fragment"), BAD_INPUT)
def test_bad_input_fails_before_anything_starts(forked_runs, args, fragment):
    if "CUDA" in fragment and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    tmp_path, p = forked_runs[" ".join(args)]
    assert p.returncode != 0
    assert fragment in p.stderr + p.stdout, (p.stderr + p.stdout)[-2000:]
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
    assert not (tmp_path / "outputs" / "cache" / "baselines").exists()  # nothing trained or cached


def test_imagefolder_without_test_dir_fails_clearly(tmp_path):
    (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
    p = cli(tmp_path, "data=imagefolder", "data.root=tree")
    out = p.stdout + p.stderr
    assert p.returncode == 2
    assert "data.root='tree'" in out and "test/" in out and "Traceback" not in out
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


@pytest.mark.parametrize("args", HELP_ARGS)
def test_help_cfg_info_start_nothing(forked_runs, args):
    tmp_path, p = forked_runs[" ".join(args)]
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "outputs").exists()
    if args == ["--cfg", "job"]:
        assert "sparsity:" in p.stdout and "attack:" in p.stdout


def test_wheel_ships_configs_and_sweeper_plugin(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path), "-q"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (wheel,) = tmp_path.glob("robustsweep-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "robustsweep/conf/config.yaml" in names
    assert "robustsweep/conf/experiment/seed.yaml" in names
    assert "hydra_plugins/robustsweep_sweeper/validating_sweeper.py" in names
    assert not any(n.startswith("hydra_plugins/__init__") for n in names)


def test_checkpoint_for_another_model_is_a_clear_error(tmp_path):
    import torch

    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "other.pt")
    p = cli(tmp_path, "model.checkpoint=other.pt")
    assert p.returncode == 2
    assert "model.checkpoint='other.pt'" in p.stdout + p.stderr and "does not fit" in p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    # the job got as far as its MLflow run: the failure is recorded there, not lost
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("robustsweep").experiment_id])
    assert run.info.status == "FAILED" and "does not fit" in run.data.tags["robustsweep.error"]


def test_user_checkpoint_is_used_instead_of_training(tmp_path):
    from robustsweep.config import compose
    from robustsweep.core.checkpoint import save_checkpoint
    from robustsweep.steps.data import load_dataset
    from robustsweep.steps.train import new_model

    cfg = compose()
    model = new_model(cfg, load_dataset(cfg.data))
    save_checkpoint(model, tmp_path / "mine.safetensors")
    p = cli(tmp_path, "model.checkpoint=mine.safetensors", "attribution=none", "epsilon=0")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "loaded user checkpoint" in p.stdout + p.stderr
    assert "training baseline" not in p.stdout + p.stderr
    assert not (tmp_path / "outputs" / "cache" / "baselines").exists()  # nothing trained or cached
