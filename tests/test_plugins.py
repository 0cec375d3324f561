"""A package outside robustsweep adds an evaluator, a compression stage, an attack and a certificate:
one Python file and one YAML each, declared by an entry point (robustsweep.core.plugins), with no
edit to robustsweep.

The package is built in a temporary folder as a user's would be, with its ``.dist-info`` beside it
(what ``pip install`` writes), and reaches robustsweep through ``PYTHONPATH`` only. The CLI runs in a
new interpreter: a forked one would keep the parent's schema and entry points.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from robustsweep.config import compose
from robustsweep.core import plugins
from robustsweep.tracking import identity
from robustsweep.tracking.identity import cell_id
from tests.conftest import isolated_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent

FILES = {
    # an evaluator: the mean gap between the two largest logits on the first n_images images
    "rsplug/margin.py": """
        import torch

        from robustsweep.steps.attacks import as_pixels
        from robustsweep.steps.evaluate import Evaluator, Outcome, register_evaluator


        def run(ctx):
            with torch.no_grad():
                logits = ctx.model(as_pixels(ctx.ds.x_eval[: int(ctx.cfg.margin.n_images)]))
            top2 = logits.topk(2, dim=1).values
            return Outcome({"logit_margin": float((top2[:, 0] - top2[:, 1]).mean())})


        register_evaluator(Evaluator(name="margin", group="margin", run=run, metrics=("logit_margin",)))
    """,
    "rsplug/conf/margin/on.yaml": "name: margin\nn_images: 50\n",
    # a compression stage: every conv/linear weight rounded to a multiple of `step`, after pruning
    "rsplug/roundw.py": """
        import torch

        from robustsweep.core.params import positive_number
        from robustsweep.steps.compress import Stage, StageSpec, register_stage


        def round_weights(model, cfg, ds, finetune):
            step = float(cfg.roundw.step)

            def finalize():
                changed = total = 0
                with torch.no_grad():
                    for m in model.modules():
                        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                            r = torch.round(m.weight / step) * step
                            changed += int((r != m.weight).sum())
                            total += m.weight.numel()
                            m.weight.copy_(r)
                return {"rounded_fraction": changed / total}

            return Stage(changed=True, finalize=finalize, compresses=True)


        register_stage(StageSpec("roundw", round_weights, order=25, metrics=("rounded_fraction",),
                                 label=lambda p: f"round {p['roundw.step']}" if p.get("roundw.step") else None,
                                 check=lambda node, cfg: positive_number(node, "step")))
    """,
    "rsplug/conf/roundw/on.yaml": "name: roundw\nstep: 0.05\n",
    # an attack and a certificate in robustsweep's own groups (attack, certify)
    "rsplug/signs.py": """
        import torch

        from robustsweep.steps.attacks import register_attack


        @register_attack("signs")
        def signs(model, eps, seed=0, **_):
            gen = torch.Generator().manual_seed(seed)

            def attack(x, y):  # a random corner of the L-inf ball: the weakest attack there is
                s = torch.randint(0, 2, x.shape, generator=gen).to(x) * 2 - 1
                return (x + eps * s).clamp(0, 1)

            return attack
    """,
    "rsplug/conf/attack/signs.yaml": "name: signs\n",
    "rsplug/nothing.py": """
        from robustsweep.steps.evaluate import Outcome
        from robustsweep.steps.evaluate.certify import CERTIFICATES, CertificateInfo


        @CERTIFICATES.register("nothing", info=CertificateInfo("linf", "nothing: certifies no image"))
        def nothing(ctx):
            return Outcome({"certified_acc": 0.0, "n_certified": 0.0})
    """,
    "rsplug/conf/certify/nothing.yaml": "name: nothing\n",
    "rsplug/__init__.py": "",
    "rsplug-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: rsplug\nVersion: 0.1\n",
    "rsplug-0.1.dist-info/entry_points.txt": ("[robustsweep.plugins]\nmargin = rsplug.margin\n"
                                              "roundw = rsplug.roundw\nattack = rsplug.signs\n"
                                              "certify = rsplug.nothing\n"),
}


def _package(root: Path) -> Path:
    for name, text in FILES.items():
        path = root / "site" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root / "site"


def _cli(cwd: Path, site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "robustsweep", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_outside_package_adds_an_evaluator_a_compression_stage_an_attack_and_a_certificate(tmp_path):
    site = _package(tmp_path)
    grid = ["-m", "+margin=on", "+roundw=on", "attack=signs", "certify=nothing", "sparsity=0,0.5",
            "train.epochs=3", "attribution=none",
            "data.n_eval=60", *isolated_overrides(tmp_path)]
    p = _cli(tmp_path, site, *grid)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    cells = [r for r in runs if r.data.tags.get("robustsweep.role") == "cell"]
    assert len(cells) == 2
    for r in cells:
        m = r.data.metrics
        assert m["logit_margin"] > 0 and 0 < m["rounded_fraction"] <= 1, m
        assert m["certified_acc"] == 0 and 0 <= m["asr"] <= 1, m
        assert r.data.params["roundw.step"] == "0.05" and r.data.params["margin.n_images"] == "50"
        assert "roundw=roundw" in r.info.run_name  # the stage's place in the run's name
    parent = next(r for r in runs if r.data.tags.get("robustsweep.role") == "sweep")
    text = Path(client.download_artifacts(parent.info.run_id, "summary/cells.csv")).read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2
    assert all(float(r["logit_margin"]) > 0 and float(r["rounded_fraction"]) > 0 for r in rows)

    # Bad input is refused before anything runs, naming the key: an option the plug-in does not ship,
    # and a typo in its group's keys.
    p = _cli(tmp_path, site, "+margin=off", *isolated_overrides(tmp_path))
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "Could not find 'margin/off'" in out, out
    assert "options in 'margin':\n\ton" in out, out
    p = _cli(tmp_path, site, "+margin=on", "+margin.n_imagez=3", *isolated_overrides(tmp_path))
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "margin.n_imagez" in out and "allowed: margin.n_images" in out, out[-2000:]
    p = _cli(tmp_path, site, "+roundw=on", "roundw.step=-1", *isolated_overrides(tmp_path))  # the stage's check
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "roundw.step=-1 is not valid; allowed: a number > 0" in out, out[-2000:]


def test_a_plugin_group_left_unchosen_changes_no_cell_id(monkeypatch):
    # With a plug-in installed the schema gains a key that is None until chosen; identity drops it
    # (robustsweep.tracking.identity._base), so every cell keeps the id it had without the plug-in.
    cfg = compose(["sparsity=0.5"])
    before = cell_id(cfg)
    with open_dict(cfg):
        cfg.margin = None
    monkeypatch.setattr(identity, "OPTIONAL_GROUPS", ("margin",))  # as core.schema makes it with the plug-in
    assert cell_id(cfg) == before
    with open_dict(cfg):
        cfg.margin = {"name": "margin", "n_images": 50}
    assert cell_id(cfg) != before  # chosen, it is part of the cell


def test_a_plugin_that_fails_to_import_is_an_error_naming_it(monkeypatch):
    ep = EntryPoint(name="margin", value="rsplug_missing.margin", group=plugins.GROUP)
    monkeypatch.setattr(plugins, "declared", lambda: (ep,))
    monkeypatch.setattr(plugins, "_loaded", False)
    for _ in range(2):  # and again at the next lookup: never a run without it
        with pytest.raises(ImportError, match=r"plug-in margin = rsplug_missing.margin .* ModuleNotFoundError"):
            plugins.load()
