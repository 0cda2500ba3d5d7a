"""Audit reports: files, self-containment, escaping, recheck round trip, Markdown, folders, browser."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from audit.datasets import snow_wolf
from audit.engine import stats
from audit.models import SmallCNN
from audit.pipeline import SCHEMA, recheck, run_audit
from audit.probes import ProbeSet
from audit.report import write as rpt
from audit.report.write import (
    REPORT_FILES,
    render_html,
    render_markdown,
    report_folder,
    write_reports,
)

EVIL = "<script>alert(1)</script>"
AMP = "husky & \"co\" 'x'"
CONTEXTS = ("snow & ice", 'grass "green"')
MODEL = {"name": "cand<b>idate</b>", "version": 7, "uri": "models:/<img src=x onerror=alert(2)>/7"}
RUN_ID = "run-&-<id>"
CHROMIUM = "/usr/bin/chromium"


def _audit(probes: ProbeSet, methods: list[str], **engine) -> object:
    torch.manual_seed(0)
    cfg = {"methods": methods, "attribution_probes": 8, "sanity_probes": 2, "steps": 4, **engine}
    return run_audit(SmallCNN(), probes, {"engine": cfg})


def _base(n_per_group: int = 4) -> ProbeSet:
    return snow_wolf.probe_set(n_per_group=n_per_group, size=32, seed=1)


@pytest.fixture(scope="module")
def hostile():
    """Groups, pairs and masks, with class and group names that are HTML and Markdown active."""
    base = _base()
    classes = [EVIL, AMP]
    probes = ProbeSet(
        images=base.images,
        labels=base.labels,
        class_names=classes,
        masks=base.masks,
        groups=base.groups,
        group_names=[f"{c}|{ctx}" for c in classes for ctx in CONTEXTS],
        pairs=base.pairs,
    )
    return _audit(probes, ["gradcam", "saliency"])


@pytest.fixture(scope="module")
def hostile_files(hostile, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return write_reports(hostile, folder, model=MODEL, run_id=RUN_ID)


@pytest.fixture(scope="module")
def labels_only():
    base = _base()
    return _audit(
        ProbeSet(images=base.images, labels=base.labels, class_names=base.class_names),
        ["gradcam"],
        clusters=2,
    )


# --------------------------------------------------------------------------- files
def test_writes_three_files_and_no_temporaries(hostile, hostile_files):
    assert set(hostile_files) == {"html", "json", "md"}
    assert [p.name for p in hostile_files.values()] == list(REPORT_FILES)
    folder = hostile_files["html"].parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(REPORT_FILES)
    for p in hostile_files.values():
        assert p.stat().st_size > 200
        p.read_text(encoding="utf-8")


def test_failure_midway_leaves_the_previous_report(hostile, tmp_path, monkeypatch):
    paths = write_reports(hostile, tmp_path, model={"name": "old"})
    before = {k: p.read_bytes() for k, p in paths.items()}

    def broken(*_a, **_k):
        raise RuntimeError("render failed")

    monkeypatch.setattr(rpt, "render_markdown", broken)
    with pytest.raises(RuntimeError, match="render failed"):
        write_reports(hostile, tmp_path, model={"name": "new"})
    monkeypatch.undo()

    calls = []
    real_fsync = os.fsync

    def fsync_fails_on_third(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_on_third)
    with pytest.raises(OSError, match="disk full"):
        write_reports(hostile, tmp_path, model={"name": "new"})
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)


# --------------------------------------------------------------------------- HTML
def test_html_is_self_contained(hostile_files):
    page = hostile_files["html"].read_text(encoding="utf-8")
    low = page.lower()
    assert "<script" not in low and "<link" not in low and "<iframe" not in low
    assert "@import" not in low and "url(" not in low
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", low)
    srcs = re.findall(r"""\ssrc\s*=\s*"([^"]*)\"""", page)
    assert len(srcs) >= 4
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(h.startswith("#") for h in re.findall(r"""\shref\s*=\s*"([^"]*)\"""", page))
    assert "Content-Security-Policy" in page


def test_html_contents(hostile, hostile_files):
    page = hostile_files["html"].read_text(encoding="utf-8")
    assert re.search(r'<div id="verdict" class="verdict \w+">(PASS|FAIL|INCONCLUSIVE)</div>', page)
    assert f'id="verdict" class="verdict {hostile.verdict.lower()}">{hostile.verdict}<' in page
    for section in (
        "evidence",
        "examples",
        "overlays",
        "record",
        "groups",
        "curves",
        "checks",
        "metrics",
        "config",
    ):
        assert f'<section id="{section}">' in page
    assert '<section id="clusters">' not in page
    assert hostile.probes["digest"] in page
    # reasons: deciding findings first, every finding present (escaped)
    decisive = [c.finding for c in hostile.checks if c.decisive]
    assert decisive
    positions = [page.index(html.escape(c.finding)) for c in hostile.checks]
    assert max(positions[i] for i, c in enumerate(hostile.checks) if c.decisive) < min(
        positions[i] for i, c in enumerate(hostile.checks) if not c.decisive
    )
    # one overlay grid per method and group, the curves with the random reference
    for m in ("gradcam", "saliency"):
        for g in hostile.probe_set.group_names:
            assert f'alt="{html.escape(f"{m} overlays, group {g}")}"' in page
    assert 'alt="deletion curves"' in page and 'alt="group accuracy chart"' in page
    assert "context_gap" in page and "engine:" in page and "attribution_probes: 8" in page
    # the metrics table holds every metric
    for k in hostile.metrics:
        assert html.escape(k) in page


def test_html_escapes_every_user_string(hostile, hostile_files):
    page = hostile_files["html"].read_text(encoding="utf-8")
    assert EVIL not in page
    assert html.escape(EVIL) in page
    assert AMP not in page and 'grass "green"' not in page and "snow & ice" not in page
    assert html.escape(AMP) in page and html.escape(f"{AMP}|{CONTEXTS[1]}") in page
    assert MODEL["name"] not in page and html.escape(MODEL["name"]) in page
    assert MODEL["uri"] not in page and html.escape(MODEL["uri"]) in page
    assert RUN_ID not in page and html.escape(RUN_ID) in page
    assert "onerror=alert" not in page.replace(html.escape(MODEL["uri"]), "")
    # nothing but the report's own tags: every tag name is from a fixed set
    tags = set(re.findall(r"<\s*([a-zA-Z][a-zA-Z0-9]*)", page))
    assert tags <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "header",
        "div",
        "h1",
        "h2",
        "h3",
        "table",
        "tr",
        "th",
        "td",
        "code",
        "nav",
        "a",
        "section",
        "ol",
        "ul",
        "li",
        "span",
        "p",
        "figure",
        "img",
        "figcaption",
        "pre",
        "footer",
        "details",
        "summary",
    }


def test_html_without_evidence_groups_or_with_clusters(labels_only):
    base = _base()
    no_methods = _audit(
        base, [], dissection={"enabled": False}
    )  # dissection adds its units' images
    page = render_html(no_methods)
    assert '<div id="verdict"' in page and "No attribution method was run" in page
    assert '<section id="groups">' in page and '<section id="overlays">' not in page
    alts = re.findall(r'<img [^>]*alt="([^"]*)"', page)
    # the deciding numbers only (no method: no maps, no explained probes to show as examples): the group
    # chart, and the untrained net's competence and context gaps against their thresholds
    assert alts == [
        "group accuracy chart",
        "deciding comparisons: competence",
        "deciding comparisons: context gap",
    ]

    masks_only = _audit(
        ProbeSet(
            images=base.images, labels=base.labels, class_names=base.class_names, masks=base.masks
        ),
        ["gradcam"],
    )
    page = render_html(masks_only, {"name": "m"})
    assert '<section id="groups">' not in page and '<section id="overlays">' in page
    assert (
        'alt="gradcam overlays, class wolf"' in page
        and 'alt="gradcam overlays, class husky"' in page
    )
    assert render_markdown(masks_only).count("| group |") == 0

    assert labels_only.verdict == "INCONCLUSIVE" and labels_only.raw["clusters"]["gradcam"]
    page = render_html(labels_only)
    assert '<section id="clusters">' in page and 'alt="gradcam cluster means"' in page
    for c in labels_only.raw["clusters"]["gradcam"]:
        assert f"<td>{c['class_name']}</td><td class='num'>{c['cluster']}</td>" in page


# --------------------------------------------------------------------------- JSON
def test_json_round_trips_through_recheck(hostile, hostile_files, labels_only, tmp_path):
    d = json.loads(hostile_files["json"].read_text(encoding="utf-8"))
    assert d["schema"] == SCHEMA and d["schema_version"] == 1
    assert d["model"]["name"] == MODEL["name"] and d["model"]["version"] == "7"
    assert d["model"]["uri"] == MODEL["uri"] and d["mlflow_run_id"] == RUN_ID
    assert d["verdict"] == hostile.verdict
    assert recheck(d) == hostile.verdict
    made = {"made_at": d["made_at"], "tool_version": d["tool_version"]}
    assert d == json.loads(json.dumps(rpt.report_dict(hostile, MODEL, RUN_ID, made=made)))
    paths = write_reports(labels_only, tmp_path)
    d = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert (
        recheck(d) == labels_only.verdict
        and d["model"]["name"] is None
        and d["mlflow_run_id"] is None
    )


# --------------------------------------------------------------------------- Markdown
def test_markdown_summary(hostile, hostile_files):
    md = hostile_files["md"].read_text(encoding="utf-8")
    head = md.splitlines()[0]
    assert head.startswith("### ") and f"**{hostile.verdict}**" in head
    assert "`cand<b>idate</b>`" in head and "version `7`" in head and "` cand" not in head
    why = md.split("**Concept evidence**")[0]  # the units and concepts follow in their own list
    bullets = [ln for ln in why.splitlines() if ln.startswith("- ")]
    assert len(bullets) == sum(c.decisive for c in hostile.checks) > 0
    assert all(b.startswith("- `") and b.endswith("`") for b in bullets)  # findings are code spans
    assert hostile.probes["digest"][:12] in md and hostile.probes["digest"] not in md
    assert "report.html" in md and "gradcam" in md and "saliency" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert rows[0] == "| group | accuracy | 95% CI | n |"
    groups = hostile.raw["behaviour"]["groups"]
    assert len(rows) == 1 + len(groups)
    for ln, (g, c) in zip(rows[1:], groups.items(), strict=True):
        cells = re.split(r"(?<!\\)\|", ln)[1:-1]
        assert len(cells) == 4, ln
        lo, hi = stats.wilson_interval(c["correct"], c["n"], 0.95)
        assert cells[0].strip() == " \\| ".join(rpt.code_span(part) for part in g.split("|"))
        assert cells[2].strip() == f"{lo:.2f} to {hi:.2f}" and cells[3].strip() == str(c["n"])


# --------------------------------------------------------------------------- folders
@pytest.mark.parametrize(
    "name, version",
    [
        ("../x y", None),
        ("../x y", "3"),
        ("..", ".."),
        ("a/b\\c", "1/../2"),
        ("", None),
        (".hidden", None),
        ("-rf", None),
        ("x" * 500, "1"),
        ("mo dèl:<1>", "v|2"),
    ],
)
def test_report_folder_stays_inside(tmp_path, name, version):
    folder = report_folder(tmp_path / "reports", name, version)
    assert folder.parent == tmp_path / "reports"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", folder.name) and ".." not in folder.name
    assert not folder.name.startswith((".", "-")) and len(folder.name) <= 255
    assert folder.resolve().parent == (tmp_path / "reports").resolve()


def test_report_folder_names():
    assert report_folder("reports", "../x y", None) == Path("reports/__x_y")
    assert report_folder("reports", "wolf-net", "3") == Path("reports/wolf-net-3")
    assert report_folder("reports", "wolf-net", None) == Path("reports/wolf-net")
    assert report_folder("reports", "x" * 500, "1") != report_folder(
        "reports", "x" * 499 + "y", "1"
    )


# --------------------------------------------------------------------------- browser
_PROBE_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var v = document.getElementById("verdict");
  var cs = v ? window.getComputedStyle(v) : null;
  var visible = !!v && v.offsetHeight > 0 && v.offsetWidth > 0 && cs.display !== "none"
                && cs.visibility !== "hidden" && parseFloat(cs.opacity) > 0;
  var pre = document.createElement("pre");
  pre.id = "check";
  pre.textContent = JSON.stringify({images: imgs.length, loaded: loaded, visible: visible,
    verdict: v ? v.textContent : null, background: cs ? cs.backgroundColor : null});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"headless Chromium not installed at {CHROMIUM}"
)
def test_report_renders_in_headless_chromium(hostile, hostile_files, tmp_path):
    page = hostile_files["html"].read_text(encoding="utf-8")
    # The report has no script. A probe script goes first in <head>, before the page's
    # Content-Security-Policy, which only governs what follows it: the page itself
    # (its data: images and inline styles) is still checked under its own policy.
    assert page.count("<head>") == 1
    wrapper = tmp_path / "wrapped.html"
    wrapper.write_text(page.replace("<head>", "<head>" + _PROBE_SCRIPT, 1), encoding="utf-8")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--run-all-compositor-stages-before-draw",
        "--virtual-time-budget=10000",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        wrapper.as_uri(),
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    m = re.search(r'<pre id="check">(.*?)</pre>', out.stdout, re.S)
    assert m, f"no check output; rc={out.returncode} stderr tail: {out.stderr[-2000:]}"
    check = json.loads(html.unescape(m.group(1)))
    n_img = len(re.findall(r"<img ", page))
    assert check["images"] == n_img > 0
    assert check["loaded"] == check["images"], check
    assert check["visible"] is True and check["verdict"] == hostile.verdict
    colour = {
        "PASS": "rgb(26, 127, 55)",
        "FAIL": "rgb(207, 34, 46)",
        "INCONCLUSIVE": "rgb(191, 135, 0)",
    }
    assert check["background"] == colour[hostile.verdict]
