"""The report leads with the evidence: the verdict and the deciding numbers above the fold at
1280x800 in headless Chromium, then examples, explanations with their colour scale, the
record, and the statistics collapsed; captions name only what their figure draws; badges only
on the checks that decided."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _toy_models import ColourReader, GreyReader, colour_probe_set
from PIL import Image

from audit.pipeline import run_audit
from audit.report import pictures
from audit.report import write as rpt
from audit.report.write import render_html, write_reports

CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 1280, 800
ENGINE = {
    "methods": ["gradcam", "input_x_gradient"],
    "attribution_probes": 16,
    "sanity_probes": 4,
    "steps": 8,
}


def _audit(model: torch.nn.Module):
    torch.manual_seed(0)
    return run_audit(model, colour_probe_set(n_per_group=24, size=32), {"engine": ENGINE})


@pytest.fixture(scope="module")
def audits():
    """The shortcut model (reads the grey context: FAIL) and the clean one (reads the colour: PASS)."""
    out = {"fail": _audit(GreyReader()), "pass": _audit(ColourReader())}
    assert out["fail"].verdict == "FAIL" and out["pass"].verdict == "PASS"
    return out


@pytest.fixture(scope="module")
def pages(audits, tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    return {
        k: write_reports(r, root / k, model={"name": f"colour-{k}", "version": 1})
        for k, r in audits.items()
    }


def _figures(x):
    """Every figure (a dict with a data URI ``src``) in a view, at any depth."""
    if isinstance(x, dict):
        if isinstance(x.get("src"), str) and x["src"].startswith("data:image/png"):
            yield x
        for v in x.values():
            yield from _figures(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _figures(v)


def _view(result):
    return rpt._html_view(
        result,
        rpt._model_info({"name": "m"}),
        None,
        {"made_at": "2024-01-01T00:00:00Z", "tool_version": "1"},
    )


# --------------------------------------------------------------------------- order
def test_page_leads_with_the_verdict_and_the_deciding_numbers(pages):
    for page in (p["html"].read_text(encoding="utf-8") for p in pages.values()):
        marks = [
            'id="verdict"',
            'id="deciding-numbers"',
            'alt="group accuracy chart"',
            'alt="deciding comparisons: context gap"',
            'id="reasons"',
            '<section id="examples">',
            '<section id="overlays">',
            '<section id="record">',
            '<details id="statistics">',
            '<section id="curves">',
            '<section id="checks">',
            '<section id="config">',
        ]
        at = [page.index(m) for m in marks]
        assert at == sorted(at), dict(zip(marks, at, strict=True))
        assert page.index("</details>") > page.index('<section id="config">')


def test_markdown_follows_the_same_order(pages, audits):
    md = pages["fail"]["md"].read_text(encoding="utf-8")
    marks = [
        "**FAIL**",
        "| group | accuracy |",
        "Context gap per class with its interval",
        "**Example 1**",
        "**Why**",
        "**Evidence methods**",
        "[report.html](report.html)",
    ]
    at = [md.index(m) for m in marks]
    assert at == sorted(at), dict(zip(marks, at, strict=True))
    # the failing pair: the same red square right on dark grey, wrong on light grey
    assert (
        "**Example 1** (context: true class → prediction): `red|light`: `red` → `blue`; `red|dark`: `red` → `red`"
        in md
    )
    assert "` red" not in md and "`red` 1.00 (0.76 to 1.00, **FAIL**)" in md


# --------------------------------------------------------------------------- badges and corroboration
def test_only_deciding_checks_carry_a_badge(pages, audits):
    fail = pages["fail"]["html"].read_text(encoding="utf-8")
    comp = next(c for c in audits["fail"].checks if c.name == "competence")
    assert comp.verdict == "INCONCLUSIVE" and not comp.decisive  # the FAIL does not hinge on it
    assert 'class="badge inconclusive"' not in fail and 'class="badge pass"' not in fail
    assert "inconclusive, not deciding" in fail
    badges = len(re.findall(r'class="badge fail"', fail))
    deciding = sum(c.decisive for c in audits["fail"].checks)
    # each deciding check: its reason, its row among the deciding numbers, its row in the checks table
    assert badges == 3 * deciding
    passing = pages["pass"]["html"].read_text(encoding="utf-8")
    assert 'class="badge fail"' not in passing and 'class="badge inconclusive"' not in passing


def test_a_line_that_points_the_other_way_is_not_shown_as_corroborating(pages, audits):
    red = next(c for c in audits["fail"].checks if c.name == "context_gap/red")
    assert red.verdict == "FAIL" and red.support == ""
    assert "Grad-CAM puts 0% of its relevance outside the object" in red.against
    page = pages["fail"]["html"].read_text(encoding="utf-8")
    shown = html.escape(rpt.sentence(red.against))
    assert f"corroborating: {shown}" not in page
    assert f"points the other way (not corroborating): {shown}" in page
    assert (
        f"Here the maps look right while the behaviour is wrong: {shown}" in page
    )  # in the explanations


# --------------------------------------------------------------------------- figures and captions
#: words a caption uses for a drawn line, and the element the figure must then draw
STYLE_WORDS = {"solid": "MoRF", "dashed": "LeRF", "dotted": "random", "grey": "random"}


def test_captions_name_only_what_their_figure_draws(audits):
    result = audits["fail"]
    view = _view(result)
    page = render_html(result)
    figures = list(_figures(view))
    assert len(figures) >= 6
    for fig in figures:
        # every figure the view holds is on the page, under its alt text
        assert f'alt="{html.escape(fig["alt"])}"' in page
        caption = (fig.get("caption") or "").lower()
        for word, element in STYLE_WORDS.items():
            if word in caption:
                assert element in fig.get("draws", ()), (fig["alt"], word, caption)
    curves = view["curves"]["figure"]
    assert curves["draws"] == [
        "MoRF",
        "LeRF",
    ]  # the audit measures no random ordering: none is drawn
    assert "random ordering scores 0" in curves["caption"] and "dotted" not in curves["caption"]
    assert "SRG = AUC(LeRF) - AUC(MoRF)" in curves["caption"]
    assert "dashed grey line" not in page
    # a plot that does draw the random ordering (the training callbacks' reference) says so
    mean = {"deletion": torch.linspace(1, 0, 9), "lerf": torch.linspace(1, 0.5, 9)}
    _img, drawn = pictures.faithfulness_plot(
        {"gradcam": mean, "random": {"deletion": torch.linspace(1, 0.2, 9)}}
    )
    assert drawn == [
        "MoRF",
        "LeRF",
        "random",
    ] and "dotted grey: a random ordering" in rpt._curves_caption(drawn, 0.01)
    _img, drawn = pictures.faithfulness_plot({"gradcam": {"deletion": mean["deletion"]}})
    assert drawn == ["MoRF"] and "dashed" not in rpt._curves_caption(drawn, 0.01)
    # every in-page link leads to an element of the page
    ids = set(re.findall(r'\sid="([^"]+)"', page))
    assert {h[1:] for h in re.findall(r'href="(#[^"]*)"', page)} <= ids


def test_explanations_have_a_colour_scale_and_say_what_maps_cannot_show(audits):
    view = _view(audits["pass"])
    ex = view["explanations"]
    assert ex["scales"] and all(f["alt"].startswith("colour scale") for f in ex["scales"])
    page = render_html(audits["pass"])
    section = page[page.index('<section id="overlays">') : page.index('<section id="record">')]
    assert "What they cannot show" in section and 'alt="colour scale (unsigned maps)"' in section
    img = Image.open(io.BytesIO(base64.b64decode(ex["scales"][0]["src"].split(",", 1)[1]))).convert(
        "RGB"
    )
    assert (
        img.size[0] > 200 and len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 50
    )  # a ramp, not a blank


def test_grid_captions_wrap_within_their_tile():
    from audit.report.pictures import image_grid

    img = torch.rand(2, 3, 16, 16)
    narrow = image_grid(
        img, ["unit 1: a-very-long-context-name 0.83", "unit 2: light 0.71"], ncols=2, scale=2
    )
    short = image_grid(img, ["u1", "u2"], ncols=2, scale=2)
    assert narrow.size[0] == short.size[0]  # the canvas did not grow sideways
    assert narrow.size[1] > short.size[1]  # the long caption took more lines instead
    # nothing is drawn in the gap between the two tiles' caption columns
    a = torch.from_numpy(np.asarray(narrow.convert("L")).astype(np.int32))
    gap = a[32 + 6 :, 6 + 32 + 1 : 6 + 32 + 5]
    assert int(gap.min()) == 255


# --------------------------------------------------------------------------- headless Chromium at 1280x800
_MEASURE = """<script>
window.addEventListener("load", function () {
  function box(id) { var e = document.getElementById(id); if (!e) return null;
    var r = e.getBoundingClientRect(); return {top: r.top, bottom: r.bottom, left: r.left, right: r.right}; }
  var pre = document.createElement("pre");
  pre.id = "measured";
  pre.textContent = JSON.stringify({width: window.innerWidth, height: window.innerHeight,
    verdict: box("verdict"), numbers: box("deciding-numbers"), images: document.images.length,
    loaded: Array.prototype.filter.call(document.images, function (i) { return i.complete && i.naturalWidth > 0; }).length});
  document.body.appendChild(pre);
});
</script>"""


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--run-all-compositor-stages-before-draw",
        "--virtual-time-budget=10000",
        "--hide-scrollbars",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={profile}",
        *extra,
        url,
    ]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"headless Chromium not installed at {CHROMIUM}"
)
@pytest.mark.parametrize("which", ["fail", "pass"])
def test_verdict_and_deciding_numbers_are_above_the_fold(pages, audits, which, tmp_path):
    page = pages[which]["html"].read_text(encoding="utf-8")
    # The page has no script and its CSP forbids one: a measuring script goes into a copy, first in
    # <head>, before the policy (which governs only what follows it); the page itself is unchanged.
    assert page.count("<head>") == 1 and "<script" not in page
    copy = tmp_path / "measured.html"
    copy.write_text(page.replace("<head>", "<head>" + _MEASURE, 1), encoding="utf-8")
    out = _chromium(tmp_path, copy.as_uri(), "--dump-dom")
    m = re.search(r'<pre id="measured">(.*?)</pre>', out.stdout, re.S)
    assert m, f"no measurement; rc={out.returncode} stderr tail: {out.stderr[-2000:]}"
    got = json.loads(html.unescape(m.group(1)))
    # headless Chromium's window of 1280x800 may give the page a shorter viewport (its own frame):
    # the fold is the lower of the two, so what is asserted is seen without scrolling in either
    assert got["width"] == WIDTH and 600 <= got["height"] <= HEIGHT, got
    fold = min(HEIGHT, got["height"])
    assert got["loaded"] == got["images"] > 0, got
    assert 0 <= got["verdict"]["top"] and got["verdict"]["bottom"] <= fold, got
    # the whole block of deciding numbers (charts) is visible without scrolling, beside each other
    assert 0 < got["numbers"]["top"] and got["numbers"]["bottom"] <= fold, got
    assert got["numbers"]["right"] <= WIDTH, got
    # and the real page (no script) renders at that size
    shot = tmp_path / f"{which}.png"
    _chromium(tmp_path, pages[which]["html"].as_uri(), f"--screenshot={shot}")
    with Image.open(shot) as img:
        assert img.size == (WIDTH, HEIGHT)
        colour = {"fail": (207, 34, 46), "pass": (26, 127, 55)}[which]
        assert img.convert("RGB").getpixel((40, 40)) == colour  # the verdict box, top left
