"""What a reviewer sees in the MLflow UI: a real ``mlflow server``, real runs, a real headless Chromium.

One short training run with the attribution callback (its Grad-CAM grids logged with
``log_image``, as the callbacks do) and the gate's audit of the trained model, both
through a real ``mlflow server`` (SQLite) on 127.0.0.1. Headless Chromium renders the
run pages (the UI is a single-page app; a page is ``<server>/#/experiments/<id>/runs/<id>``
plus a tab); the test asserts on the rendered DOM (``--dump-dom``) and saves screenshots
(``--screenshot``, 1280x800) to ``$MODEL_AUDIT_SHOTS`` (default: the test's tmp folder).

In MLflow 3.17 the run page has the tabs Overview (about, datasets, tags, registered
models, description, metrics, parameters), Model metrics (one card per metric or image
key, grouped by key prefix), System metrics, Traces and Artifacts. Image cards live in
Model metrics; each card's header lists every parameter of the run (``key=value, ...``)
above the image.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from _mlflow_server import MlflowServer
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: What a user would give (``python -m audit.training.train data.correlation=0.99 callbacks=attribution``): the
#: run's parameters, and so the header of its image cards, are those of such a run.
USER = ["data.correlation=0.99", "callbacks=attribution"]
#: The test's own small sizes (in the run's config.yaml, not passed as the user's overrides).
TINY = [
    "data.n_train=96",
    "data.n_val=32",
    "data.size=32",
    "trainer.max_epochs=1",
    "eval_probes.n_per_group=4",
    "callbacks.attribution.probes.n_per_group=2",
    "callbacks.attribution.render=8",
    "name=ui-train",
]
AUDIT = [
    "probes.n_per_group=8",
    "probes.size=32",
    "engine.attribution_probes=8",
    "engine.sanity_probes=2",
    "engine.steps=8",
]


class _Text(HTMLParser):
    """The visible text of an HTML document (scripts and styles left out), whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)

    @classmethod
    def of(cls, doc: str) -> str:
        p = cls()
        p.feed(doc)
        return " ".join(" ".join(p.parts).split())


def chromium(
    url: str, out: Path, *, shot: str | None = None, budget_ms: int = 15000, height: int = 800
) -> str:
    """Render ``url`` in headless Chromium: the DOM once rendered; with ``shot``, also a screenshot there."""
    profile = (
        out / "chromium-profile"
    )  # a fresh profile: no UI state (chart layout, panels) from earlier runs
    base = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={profile}",
        f"--window-size=1280,{height}",
        f"--virtual-time-budget={budget_ms}",
    ]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=240)
    assert dom.returncode == 0, dom.stderr[-2000:]
    if shot:
        png = subprocess.run(
            [*base, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=240
        )
        assert png.returncode == 0 and Path(shot).is_file(), png.stderr[-2000:]
    return dom.stdout


@pytest.fixture
def server(tmp_path, monkeypatch):
    srv = MlflowServer(tmp_path)
    srv.start(timeout=180)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    monkeypatch.chdir(tmp_path)
    yield srv
    srv.stop()


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="needs Chromium (/usr/bin/chromium)")
def test_the_run_pages_show_the_gate_description_and_the_gradcam_image(server, tmp_path):
    from audit.gate.job import audit_from_config
    from audit.gate.loading import log_model_safely
    from audit.training.demo import compose_audit, compose_train
    from audit.training.train import train

    shots = Path(os.environ.get("MODEL_AUDIT_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    cfg = compose_train([*USER, *TINY])
    trained = train(cfg, overrides=USER)
    client = MlflowClient(server.uri, registry_uri=server.uri)
    run = client.get_run(trained.run_id)
    images = [a.path for a in client.list_artifacts(trained.run_id, "images")]
    assert any(p.startswith("images/audit~gradcam+step+") for p in images), (
        images
    )  # log_image, by the callback
    assert set(run.data.params) == {
        "net",
        "data",
        "data/correlation",
        "max_epochs",
        "lr",
        "batch_size",
        "seed",
        "callbacks",
    }, run.data.params
    model_uri, _ = log_model_safely(
        trained.module.net,
        OmegaConf.to_container(cfg.net, resolve=True),
        registered_name="ui-wolf",
        run_id=trained.run_id,
        tracking_uri=server.uri,
    )
    out = audit_from_config(
        compose_audit([f"model.uri={model_uri}", *AUDIT, f"paths.root_dir={tmp_path}"])
    )
    assert out.run_id and out.verdict, out.error
    gate = client.get_run(out.run_id)
    report = json.loads((out.report_dir / "report.json").read_text())
    decisive = [c["finding"] for c in report["checks"] if c["decisive"]] or report["findings"][:1]

    # the gate run's Overview: the description, with the verdict and its decisive reasons
    page = f"{server.uri}/#/experiments/{gate.info.experiment_id}/runs/{out.run_id}"
    text = _Text.of(chromium(page, tmp_path, shot=str(shots / "gate_run_overview.png")))
    chromium(page, tmp_path, shot=str(shots / "gate_run_overview_full.png"), height=2000)
    assert f"{out.verdict} (" in text and "model-audit gate run for registered model" in text, text[
        :3000
    ]
    for finding in decisive:
        assert " ".join(finding.split()).rstrip(".") in text, (finding, text[:3000])
    assert "No verdict" not in text

    # the training run's Model metrics tab at 1280x800: the image cards come first (the group
    # ``audit`` holds only the images; MLflow sorts the groups by name and puts a group's
    # charts before its images). Cards render as they scroll into view, so an image in the
    # DOM of an 800 px window is in the first screen; the Grad-CAM card's place in the order
    # is read from a window tall enough to render every card.
    train_page = f"{server.uri}/#/experiments/{run.info.experiment_id}/runs/{trained.run_id}"
    first = chromium(
        f"{train_page}/model-metrics",
        tmp_path,
        shot=str(shots / "train_run_model_metrics.png"),
        budget_ms=120000,
    )
    assert any("get-artifact" in s and "images/audit~" in s for s in _srcs(first)), _srcs(first)
    dom = chromium(
        f"{train_page}/model-metrics",
        tmp_path,
        shot=str(shots / "train_run_model_metrics_full.png"),
        budget_ms=120000,
        height=2400,
    )
    chromium(train_page, tmp_path, shot=str(shots / "train_run_overview.png"))
    overlay = [s for s in _srcs(dom) if "get-artifact" in s and "images/audit~gradcam+step+" in s]
    assert overlay, _srcs(dom)
    text = _Text.of(dom)
    sections = re.findall(r"\b(audit[\w/]*) \(\d+\)", text)  # the group headers, e.g. "audit (4)"
    assert sections[0] == "audit" and "audit/gradcam" in sections, sections
    cards = text[text.index("audit (") :]
    # the first three cards (the first row at this width): curves, gradcam, input_x_gradient
    assert cards.index("audit/gradcam ") < cards.index("deletion_auc"), cards[:1500]
    assert cards.index("audit/gradcam ") < cards.index("audit/input_x_g"), cards[:1500]
    header = ", ".join(f"{k}={v}" for k, v in run.data.params.items())
    assert header.split(", ")[0] in text, (
        header
    )  # each image card's header lists the run's parameters


def _srcs(dom: str) -> list[str]:
    """The ``src`` of every image, unescaped and URL-decoded (``images/audit~gradcam+step+0+...``)."""
    return [unquote(html.unescape(s)) for s in re.findall(r'<img[^>]*\bsrc="([^"]*)"', dom)]
