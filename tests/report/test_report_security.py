"""Reports under attack: report.md inert in a GitHub comment, and report folders replaced as
one set (never a mix of two audits, no leftovers) whatever point a write is killed at."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from audit.datasets import snow_wolf
from audit.models import SmallCNN
from audit.pipeline import run_audit
from audit.probes import ProbeSet
from audit.report import write as rpt
from audit.report.write import REPORT_FILES, render_markdown, write_reports

HOSTILE_NAMES = [
    "http://evil.example/x",
    "www.evil.example",
    "a@b.example",
    "![x](http://e/x.png)",
    "<img src=x>",
    "[click](javascript:alert(1))",
    "@octocat #1 :smile:",
    "``tick`` `",
    "\u202eevil\u200d",
]
MODEL = {
    "name": "https://evil.example/model",
    "version": "www.evil.example",
    "uri": "<img src=x onerror=alert(1)>",
}
RUN_ID = "a@b.example"


@pytest.fixture(scope="module")
def hostile():
    base = snow_wolf.probe_set(n_per_group=2, size=32, seed=1)
    classes = [HOSTILE_NAMES[3], HOSTILE_NAMES[4]]
    contexts = [HOSTILE_NAMES[0], HOSTILE_NAMES[5]]
    probes = ProbeSet(
        images=base.images,
        labels=base.labels,
        class_names=classes,
        masks=base.masks,
        groups=base.groups,
        group_names=[f"{c}|{x}" for c in classes for x in contexts],
        pairs=base.pairs,
    )
    torch.manual_seed(0)
    cfg = {"methods": ["gradcam"], "attribution_probes": 4, "sanity_probes": 2, "steps": 4}
    return run_audit(SmallCNN(), probes, {"engine": cfg})


# --------------------------------------------------------------------------- Markdown
def _outside_code(md: str) -> str:
    """The Markdown with every inline code span removed (what GFM would still parse)."""
    return re.sub(r"(?<!`)(`+)(?!`).*?(?<!`)\1(?!`)", "", md)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_code_span_holds_any_name(name):
    span = rpt.code_span(name)
    fence = re.match(r"`+", span).group()
    assert span.endswith(fence) and span.startswith(fence)
    inner = span[len(fence) : -len(fence)]
    # padded with one space each side only where the text itself starts or ends with a backtick
    padded = inner.startswith(" ") and inner.endswith(" ")
    assert padded == ("`" in (inner.strip()[:1], inner.strip()[-1:]))
    assert fence not in inner and not re.search(r"(?<!`)" + fence + r"(?!`)", inner)
    assert "\u202e" not in span and "\u200d" not in span  # no bidi override or zero-width joiner


@pytest.mark.parametrize("name", [*HOSTILE_NAMES, "mine-pickle", "`", "a`", "`a", " spaced  out "])
def test_code_span_renders_as_the_name_without_padding(name):
    markdown_it = pytest.importorskip("markdown_it")
    span = rpt.code_span(name)
    shown = rpt._md_text(name)
    out = markdown_it.MarkdownIt("commonmark").renderInline(span)
    assert out == f"<code>{html.escape(shown, quote=False)}</code>", (span, out)
    if "`" not in shown:
        assert span == f"`{shown}`"  # no padding: `mine-pickle`, not ` mine-pickle `


def test_markdown_text_outside_code_spans_is_ours(hostile):
    md = render_markdown(hostile, MODEL, RUN_ID)
    rest = _outside_code(md)
    for pattern in ("http", "www.", "@", "<", "javascript", "![", "](http", "#1", ":smile:"):
        assert pattern not in rest, (pattern, rest)
    assert rest.count("](") == 1 and "[report.html](report.html)" in rest


def test_markdown_renders_without_links_images_or_html(hostile):
    markdown_it = pytest.importorskip("markdown_it")
    pytest.importorskip("linkify_it")
    md = render_markdown(hostile, MODEL, RUN_ID)
    parser = markdown_it.MarkdownIt("gfm-like")  # tables, strikethrough, linkify, raw HTML allowed
    parser.linkify.set({"fuzzy_link": True, "fuzzy_email": True, "fuzzy_ip": True})
    out = parser.render(md)
    assert re.findall(r"<a\b[^>]*>", out) == ['<a href="report.html">']
    tags = set(re.findall(r"<\s*([a-zA-Z][a-zA-Z0-9]*)", out))
    assert tags <= {
        "h3",
        "p",
        "strong",
        "code",
        "ul",
        "li",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "a",
    }, tags
    outside = re.sub(r"<code>.*?</code>", "", out, flags=re.S)
    assert "<img" not in out and "javascript:" not in outside and "http" not in outside
    # the names come through as text
    assert "<code>https://evil.example/model</code>" in out
    assert "<code>&lt;img src=x onerror=alert(1)&gt;</code>" in out
    assert out.count("<tr>") == 1 + len(hostile.raw["behaviour"]["groups"])
    for row in re.findall(r"<tr>\s*<td>(.*?)</td>", out, re.S):
        assert row.count("<code>") == 2 and " | " in row  # class | context, the pipe escaped


def test_reports_say_when_and_by_which_version(hostile, tmp_path):
    paths = write_reports(hostile, tmp_path / "r", model=MODEL)
    d = json.loads(paths["json"].read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", d["made_at"])
    assert d["tool_version"] not in ("", None)
    assert f"{d['made_at']} by model-audit {d['tool_version']}" in paths["html"].read_text()
    assert f"Made {d['made_at']} by model-audit `{d['tool_version']}`." in paths["md"].read_text()


# --------------------------------------------------------------------------- one set, no leftovers
@pytest.fixture
def fake(monkeypatch):
    """Renders that write ``tag`` into all three files (fast, no torch in a forked child)."""
    state = {"tag": "A"}
    monkeypatch.setattr(
        rpt, "render_html", lambda *a, **k: f'<div id="verdict">{state["tag"]}</div>'
    )
    monkeypatch.setattr(rpt, "report_dict", lambda *a, **k: {"verdict": state["tag"]})
    monkeypatch.setattr(rpt, "render_markdown", lambda *a, **k: f"**{state['tag']}**")
    return state


def _tags(folder: Path) -> set[str]:
    html = re.search(r'id="verdict">(\w+)<', (folder / "report.html").read_text()).group(1)
    js = json.loads((folder / "report.json").read_text())["verdict"]
    md = re.search(r"\*\*(\w+)\*\*", (folder / "report.md").read_text()).group(1)
    return {html, js, md}


def _assert_clean(parent: Path, name: str) -> None:
    """Only the link and the one version it points to."""
    link = parent / name
    assert link.is_symlink()
    assert sorted(p.name for p in parent.iterdir()) == sorted([name, os.readlink(link)])
    assert sorted(p.name for p in link.iterdir()) == sorted(REPORT_FILES)


def test_layout_and_no_leftovers(fake, tmp_path):
    folder = tmp_path / "reports" / "model-1"
    for tag in ("A", "B", "C"):
        fake["tag"] = tag
        paths = write_reports(None, folder)
        assert paths["html"] == folder / "report.html" and paths["html"].is_file()
        assert _tags(folder) == {tag}
        _assert_clean(folder.parent, "model-1")


# (function, call number, crash after the call instead of before it)
KILL_POINTS = [
    ("fsync", 1, False),
    ("fsync", 2, True),
    ("rename", 1, False),
    ("rename", 1, True),
    ("rename", 2, True),
    ("symlink", 1, True),
    ("replace", 1, False),
    ("replace", 1, True),
    ("rmtree", 1, False),
]


@pytest.mark.parametrize(
    "point", KILL_POINTS, ids=[f"{f}{n}{'-after' if a else ''}" for f, n, a in KILL_POINTS]
)
@pytest.mark.parametrize("start", ["link", "plain-dir"])
def test_killed_write_leaves_one_consistent_set(fake, tmp_path, point, start):
    """SIGKILL-like death (``os._exit``, no cleanup runs) at each step of a write, in a forked child."""
    folder = tmp_path / "reports" / "m"
    if start == "link":
        fake["tag"] = "OLD"
        write_reports(None, folder)
    else:  # a report folder of an older model-audit: a plain directory (and a stale temp file)
        folder.mkdir(parents=True)
        for name in REPORT_FILES:
            (folder / name).write_text(
                {
                    "report.html": '<div id="verdict">OLD</div>',
                    "report.json": '{"verdict": "OLD"}',
                    "report.md": "**OLD**",
                }[name]
            )
        (folder / ".report.md.abc123.tmp").write_text("half")
    func, nth, after = point
    owner = shutil if func == "rmtree" else os
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            real = getattr(owner, func)
            calls = [0]

            def dying(*a, **k):
                calls[0] += 1
                if calls[0] == nth and not after:
                    os._exit(9)
                out = real(*a, **k)
                if calls[0] == nth:
                    os._exit(9)
                return out

            setattr(owner, func, dying)
            fake["tag"] = "NEW"
            write_reports(None, folder)
            os._exit(0)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 9), code
    if os.path.lexists(folder):
        tags = _tags(folder)
        assert len(tags) == 1 and tags <= {"OLD", "NEW"}, tags
    else:  # only while a plain directory is migrated: absent, never mixed
        assert start == "plain-dir" and point in (("rename", 2, True), ("replace", 1, False)), point
    fake["tag"] = "NEXT"
    write_reports(None, folder)
    assert _tags(folder) == {"NEXT"}
    _assert_clean(folder.parent, "m")


def test_exception_keeps_the_previous_set_and_leaves_nothing(fake, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    write_reports(None, folder)
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    fake["tag"] = "B"
    with pytest.raises(OSError, match="disk full"):
        write_reports(None, folder)
    assert _tags(folder) == {"A"}
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_foreign_folders_are_not_moved(fake, tmp_path):
    plain = tmp_path / "mine"
    plain.mkdir()
    (plain / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds files that are not reports \('notes.txt'\)"):
        write_reports(None, plain)
    assert (plain / "notes.txt").read_text() == "keep me" and not plain.is_symlink()
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "linked"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match="is a symbolic link not made by model-audit"):
        write_reports(None, link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "linked", "mine"]
