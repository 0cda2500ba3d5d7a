"""Reports rendered from Jinja2 templates: names that look like template code, HTML or Markdown
come through literally in both reports; the environments escape every value whatever a
template says; the templates are strict, sandboxed and shipped in the package."""

from __future__ import annotations

import html
import importlib.resources
import re
from html.parser import HTMLParser

import jinja2
import pytest
import torch
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup

from audit.datasets import snow_wolf
from audit.models import SmallCNN
from audit.pipeline import run_audit
from audit.probes import ProbeSet
from audit.report import write as rpt
from audit.report.write import render_html, render_markdown, write_reports

JINJA = "{{ 7*7 }}"
RAW = "{% raw %}"
SCRIPT = "</script><script>alert(1)</script>"
PIPES = "| a | b |"
COMMENT = "{# c #}{{ self.__init__.__globals__ }}"
CLASSES = [JINJA, RAW]
CONTEXTS = [SCRIPT, PIPES]
MODEL = {"name": JINJA, "version": RAW, "uri": SCRIPT, "tag": PIPES, "note": COMMENT}
RUN_ID = "{% for x in range(9**9) %}{% endfor %}"
HOSTILE = [JINJA, RAW, SCRIPT, PIPES, COMMENT, RUN_ID]


@pytest.fixture(scope="module")
def result():
    base = snow_wolf.probe_set(n_per_group=2, size=32, seed=1)
    probes = ProbeSet(
        images=base.images,
        labels=base.labels,
        class_names=CLASSES,
        masks=base.masks,
        groups=base.groups,
        group_names=[f"{c}|{x}" for c in CLASSES for x in CONTEXTS],
        pairs=base.pairs,
    )
    torch.manual_seed(0)
    cfg = {"methods": ["gradcam"], "attribution_probes": 4, "sanity_probes": 2, "steps": 4}
    return run_audit(SmallCNN(), probes, {"engine": cfg})


@pytest.fixture(scope="module")
def files(result, tmp_path_factory):
    return write_reports(result, tmp_path_factory.mktemp("tpl") / "r", model=MODEL, run_id=RUN_ID)


class _Texts(HTMLParser):
    """The text of each element of a page, by tag, with entities decoded (what a browser shows)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.texts: dict[str, list[str]] = {}
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag not in ("meta", "img"):
            self.stack.append(tag)
            self.texts.setdefault(tag, []).append("")

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack:
            self.texts[self.stack[-1]][-1] += data


def _texts(page: str) -> _Texts:
    parser = _Texts()
    parser.feed(page)
    parser.close()
    return parser


# --------------------------------------------------------------------------- both reports, end to end
def test_html_shows_template_like_names_literally(result, files):
    page = files["html"].read_text(encoding="utf-8")
    assert "<script" not in page.lower() and SCRIPT not in page
    seen = _texts(page)
    assert "script" not in seen.tags
    assert seen.texts["title"] == [f"Audit {result.verdict}: {JINJA}"]
    assert seen.texts["h1"] == [f"Model audit: {JINJA}"]
    cells = set(seen.texts["td"]) | set(seen.texts["code"])
    # the header shows the model's identity and tags as they are, never evaluated
    assert {JINJA, RAW, SCRIPT, PIPES, COMMENT, RUN_ID} <= cells, cells
    assert "49" not in cells
    # group rows and overlay figures carry the names (escaped in the markup, literal as text)
    for g in result.probe_set.group_names:
        assert g in cells and f"<tr><td>{html.escape(g)}</td>" in page
        assert f'alt="{html.escape(f"gradcam overlays, group {g}")}"' in page
    assert ", ".join(CLASSES) in cells  # the Classes row
    assert all(html.escape(name) in page for name in HOSTILE)


def test_markdown_shows_template_like_names_literally(result, files):
    md = files["md"].read_text(encoding="utf-8")
    head = md.splitlines()[0]
    assert f"for {rpt.code_span(JINJA)} version {rpt.code_span(RAW)}" in head and "49" not in head
    assert f"model {rpt.code_span(SCRIPT)}" in md and f"MLflow run {rpt.code_span(RUN_ID)}" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert rows[0] == "| group | accuracy | 95% CI | n |" and len(rows) == 1 + len(
        result.probe_set.group_names
    )
    for ln, g in zip(rows[1:], result.probe_set.group_names, strict=True):
        assert ln.startswith(f"| {rpt._code_cell(g)} | ")
        assert len(re.split(r"(?<!\\)\|", ln)[1:-1]) == 4, ln  # every | inside a name is escaped


def test_markdown_renders_the_names_as_code(result, files):
    markdown_it = pytest.importorskip("markdown_it")
    md = files["md"].read_text(encoding="utf-8")
    out = markdown_it.MarkdownIt("gfm-like").render(md)  # tables, raw HTML allowed
    assert "<script" not in out
    codes = [html.unescape(c) for c in re.findall(r"<code>(.*?)</code>", out, re.S)]
    for name in (JINJA, RAW, SCRIPT, RUN_ID):
        assert name in codes, (name, codes)
    rows = re.findall(r"<tr>(.*?)</tr>", out, re.S)
    assert len(rows) == 1 + len(result.probe_set.group_names)
    assert all(len(re.findall(r"<t[hd][ >]", r)) == 4 for r in rows), rows
    assert re.findall(r"<a\b[^>]*>", out) == ['<a href="report.html">']


def test_the_views_hold_plain_data(result):
    """The Python side builds no markup: the HTML view's strings hold no tag of ours."""
    info = rpt._model_info(MODEL)
    made = {"made_at": "2024-01-02T03:04:05Z", "tool_version": "1"}

    def strings(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x

    found = list(strings(rpt._html_view(result, info, RUN_ID, made)))
    assert found and not any(isinstance(s, Markup) for s in found)
    for s in found:
        for name in sorted(HOSTILE, key=len, reverse=True):
            s = s.replace(name, "")
        assert "<" not in s and "&" not in s, s


# --------------------------------------------------------------------------- the environments
def test_every_value_is_escaped_whatever_the_template_says():
    page = rpt._environment("html").from_string("<p>{{ x }}|{{ x ~ '' }}|{{ n }}</p>")
    evil = "<b a='1'>\"&"
    assert page.render(x=evil, n=3) == f"<p>{html.escape(evil)}|{html.escape(evil)}|3</p>"
    md = rpt._environment("md").from_string(
        "{{ x }} {{ x ~ 'y' }} {{ n }} {{ f }} {{ g|cell }} {{ f|fixed(1) }} {{ s|safe }}"
    )
    out = md.render(x="[a](http://e)", n=3, f=0.25, g="a|b", s="**ok**")
    assert out == "`[a](http://e)` `[a](http://e)y` 3 0.25 `a` \\| `b` 0.2 **ok**"
    assert (
        md.render(x=None, n=True, f=float("nan"), g="", s="")
        == "`None` `Noney` `True` nan (empty) nan "
    )


def test_templates_are_sandboxed_and_strict():
    for kind in ("html", "md"):
        env = rpt._environment(kind)
        assert isinstance(env, SandboxedEnvironment) and env.undefined is jinja2.StrictUndefined
        with pytest.raises(jinja2.exceptions.SecurityError):
            env.from_string("{{ x.__class__.__mro__ }}").render(x="a")
    with pytest.raises(jinja2.UndefinedError):
        rpt._template("report.html.j2").render(v={"title": "t"})
    with pytest.raises(jinja2.UndefinedError):
        rpt._template("report.md.j2").render(v={})
    with pytest.raises(ValueError, match="must end with"):
        rpt._template("report.css.j2")


def test_templates_ship_in_the_package():
    folder = importlib.resources.files("audit.report") / "templates"
    for name in ("report.html.j2", "report.md.j2", "report.css.j2", "_macros.html.j2"):
        assert (folder / name).is_file(), name
    assert {"report.html.j2", "report.md.j2"} <= set(rpt._environment("html").list_templates())


def test_renders_match_the_files(result, files):
    made = {"made_at": "2024-01-02T03:04:05Z", "tool_version": "1"}
    assert render_html(result, MODEL, RUN_ID, made=made).endswith("</html>\n")
    assert render_markdown(result, MODEL, RUN_ID, made=made).endswith(
        f"by model-audit {rpt.code_span('1')}.\n"
    )
    assert files["md"].read_text(encoding="utf-8").count("\n\n\n") == 0
