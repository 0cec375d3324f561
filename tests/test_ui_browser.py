"""The MLflow UI, in a real headless Chromium, shows what a sweep logged.

Starts ``mlflow server`` on 127.0.0.1 against a store filled by a real 4 x 3 quickstart sweep,
then checks with Playwright driving the system Chromium (no browser download): the experiment,
the sweep's parent run with its child runs, a metric column, and the IG figure and summary
heatmap artifacts. Screenshots go to ``outputs/ui_test/`` in the repository.
Skipped when Chromium or Playwright is not installed (``.ci/run`` installs both).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from robustsweep.tracking.store import exact_metrics
from tests.test_cli import cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
if CHROMIUM is None:
    pytest.skip("no system chromium", allow_module_level=True)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    p = cli(root, "-m", "experiment=quickstart", "sparsity=0,0.25,0.5,0.75", "epsilon=0.05,0.1,0.2",
            "train.epochs=5", "attribution.n_images=3", "attribution.n_steps=16")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{root}/outputs/mlflow.db", "--host", "127.0.0.1", "--port", str(port)],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    yield url, client, client.get_experiment_by_name("robustsweep").experiment_id
    proc.terminate()
    proc.wait(timeout=30)


def test_ui_shows_sweep_children_metric_and_ig_figure(server):
    from playwright.sync_api import expect, sync_playwright

    url, client, exp = server
    # opened in MLflow 3's "Model training" view, not the GenAI one
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp])
    parent = next(r for r in runs if r.data.tags.get("robustsweep.role") == "sweep")
    child = next(r for r in runs if r.data.tags.get("robustsweep.role") == "cell")
    shots = REPO / "outputs" / "ui_test"
    shots.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1700, "height": 1000})
        # Wait for conditions, not for a fixed short time: on a busy machine (load ~3.5 on 2 cores)
        # the UI took longer than expect()'s default 5 s to list the experiment.
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)

        # the experiment's runs: one parent row; expanding it shows the twelve children
        # the "Model training" side of MLflow 3's UI (GenAI is its default): the README's link says so
        page.goto(f"{url}/#/experiments/{exp}/runs?workflowType=machine_learning")
        expect(page.get_by_text("robustsweep").first).to_be_visible()
        assistant = page.get_by_role("button", name="Close")
        if assistant.count():  # MLflow 3's assistant side panel hides half the table
            assistant.first.click()
        parent_row = page.locator("[role=row]").filter(has_text=parent.info.run_name[:20]).first
        expect(parent_row).to_be_visible()
        expect(page.get_by_text(child.info.run_name)).to_have_count(0)  # folded under the parent
        parent_row.locator("button").first.click()
        cells = [r for r in runs if r.data.tags.get("robustsweep.role") == "cell"]
        assert len(cells) == 12
        for r in cells:
            expect(page.get_by_text(r.info.run_name).first).to_be_visible()
        expect(page.get_by_text("13 matching runs")).to_be_visible()

        # a metric column
        page.get_by_role("button", name=re.compile("Columns")).click()
        page.get_by_text("asr", exact=True).first.click()
        page.keyboard.press("Escape")
        expect(page.locator("[role=columnheader]").filter(has_text=re.compile(r"^asr$"))).to_be_visible()
        # 4 significant digits on screen, not the exact value's 16 (which the tag keeps)
        fractional = [r for r in cells if exact_metrics(r)["asr"] not in (0.0, 1.0)
                      and repr(exact_metrics(r)["asr"]) != repr(r.data.metrics["asr"])]
        assert fractional, "no cell with an ASR that needs rounding"
        for r in fractional:
            expect(page.get_by_text(repr(r.data.metrics["asr"]), exact=True).first).to_be_visible()
            expect(page.get_by_text(repr(exact_metrics(r)["asr"]))).to_have_count(0)
        page.screenshot(path=str(shots / "runs.png"))

        def show_artifact(run_id: str, folder: str, name: str, shot: str) -> None:
            page.goto(f"{url}/#/experiments/{exp}/runs/{run_id}/artifacts?workflowType=machine_learning")
            page.get_by_text(folder, exact=True).first.click()
            page.get_by_text(name).first.click()
            img = page.get_by_role("img", name=f"{folder}/{name}")
            expect(img).to_be_visible()
            expect(img).to_have_js_property("complete", True)
            assert img.evaluate("(el) => el.naturalWidth") > 100  # the PNG really loaded
            page.screenshot(path=str(shots / shot))

        show_artifact(child.info.run_id, "ig", "ig_maps.png", "ig_figure.png")
        show_artifact(parent.info.run_id, "summary", "heatmap_asr.png", "summary_heatmap.png")
        for name in ("attention_drift.png", "cells.csv", "curves.png", "heatmap_robust_acc.png"):
            expect(page.get_by_text(name).first).to_be_attached()
        page.get_by_text("curves.png").first.click()
        expect(page.get_by_role("img", name="summary/curves.png")).to_be_visible()
        page.screenshot(path=str(shots / "summary_curves.png"))
        page.get_by_text("pareto.png").first.click()  # robust accuracy against latency and size
        expect(page.get_by_role("img", name="summary/pareto.png")).to_be_visible()
        page.screenshot(path=str(shots / "summary_pareto.png"))
        browser.close()
    assert (shots / "runs.png").stat().st_size > 10_000
