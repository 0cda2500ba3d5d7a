"""Audit reports: one :class:`~audit.bias.AuditResult` -> ``report.html``, ``report.json``, ``report.md``.

* ``report.html``: one self-contained page for a human reviewer. Every picture is an
  inline ``data:image/png;base64`` URI, the CSS is inline, there is no script and no
  external URL, and a Content-Security-Policy forbids loading anything but inline
  images and styles. It shows the verdict (``id="verdict"``), the model and probe set
  (with the layer each layer-based method explained at, e.g. Grad-CAM's),
  the reasons (deciding findings first), the group accuracies with Wilson intervals,
  the deletion curves against the random reference, attribution overlays per method
  and group, example synthesized counterfactuals (masks only: objects pasted onto
  other probes' backgrounds), every check, the SpRAy clusters of a labels-only probe set, the metrics
  and the full config.
* ``report.json``: :meth:`AuditResult.to_dict` plus the model and the MLflow run id;
  :func:`audit.bias.recheck` re-derives the verdict from it.
* ``report.md``: a short summary for a pull-request comment that points to the page.

Every user-supplied string (class, group and model names, URIs, findings, config
values, method names) is inert: :func:`html.escape` in the page; in the Markdown an
inline code span (no links, autolinks, images or HTML in a GitHub comment). Each
report says when (UTC) and by which model-audit version it was made.

:func:`write_reports` renders all three in memory, writes them into a fresh hidden
directory beside the report folder and switches the folder (a symbolic link) to it in
one atomic step, so a reader sees one audit's three files, never a mix, whatever point
a write is killed at; leftovers of a killed write are removed by the next one.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import hashlib
import html
import importlib.metadata
import io
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from audit import counterfactual, render, stats
from audit.bias import SCHEMA, SCHEMA_VERSION, AuditResult, Check, _plain_numbers
from audit.evidence import RANDOM

__all__ = [
    "REPORT_FILES",
    "report_dict",
    "write_reports",
    "report_folder",
    "render_html",
    "render_markdown",
    "method_layers",
]

#: The files :func:`write_reports` writes, in the order of the keys of its result.
REPORT_FILES = ("report.html", "report.json", "report.md")
_KEYS = ("html", "json", "md")

#: Overlays shown per method and group (or class, without groups).
OVERLAYS_PER_GROUP = 4
#: Synthesized counterfactual examples shown per class (flipped objects first).
SWAPS_PER_CLASS = 3
#: Confidence of the group-accuracy intervals in the chart and the tables.
GROUP_CONFIDENCE = 0.95
_MODEL_FIELDS = ("name", "version", "uri", "registered_name", "registered_version", "kind", "layout")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME = 120


# --------------------------------------------------------------------------- public API
def report_dict(
    result: AuditResult,
    model: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    *,
    made: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The content of ``report.json``: :meth:`AuditResult.to_dict` plus the model and run.

    Args:
        result: the audit result.
        model: what was audited: ``name``, ``version``, ``uri``, ``registered_name``,
            ``registered_version`` ... (a mapping, or a dataclass such as
            :class:`audit.loading.LoadedModel`, whose network itself is left out).
        run_id: the MLflow run that logged the audit, if any.
        made: ``made_at`` and ``tool_version`` (default: now, the installed version).

    Returns:
        A JSON-ready dict that keeps ``schema``/``schema_version`` (so
        :func:`audit.bias.recheck` accepts it), with ``model``, ``mlflow_run_id``,
        ``made_at`` (UTC, ISO 8601) and ``tool_version`` added.
    """
    made = _made() if made is None else made
    base = result.to_dict()
    out: dict[str, Any] = {
        "schema": base.pop("schema"),
        "schema_version": base.pop("schema_version"),
        "verdict": base.pop("verdict"),
        "model": _model_info(model),
        "mlflow_run_id": None if run_id is None else str(run_id),
        "made_at": str(made["made_at"]),
        "tool_version": str(made["tool_version"]),
    }
    out.update(base)
    return out


def write_reports(
    result: AuditResult,
    folder: str | Path,
    *,
    model: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> dict[str, Path]:
    """Write ``report.html``, ``report.json`` and ``report.md`` into ``folder``, as one set.

    A reader of ``folder`` sees one audit's three files, never a mix of two audits,
    whatever point a write is interrupted at (an exception, SIGKILL, power loss after
    the fsyncs). The layout::

        <parent>/<name>                     symbolic link -> .<name>.v<ns>-<hex>
        <parent>/.<name>.v<ns>-<hex>/       report.html, report.json, report.md

    Everything is rendered in memory first. The three files go into a fresh hidden
    directory ``.<name>.v<ns>-<hex>.tmp`` beside ``folder`` and are fsynced; the
    directory is renamed to its final hidden name, and a new symbolic link replaces
    ``folder`` with :func:`os.replace` (one atomic step); then the previous version is
    removed. Leftovers of a killed earlier write (temporary directories and links, an
    unlinked version) are removed at the start of the next write into the same parent;
    on an exception this call removes its own. Writers sharing a parent directory take
    turns (an exclusive ``flock`` on the parent). ``folder`` as a plain directory (an
    older model-audit, or a fresh empty folder) is migrated: it is moved aside, the
    link takes its place, and the moved directory is removed; between those two steps
    ``folder`` is briefly absent, never mixed. A plain directory holding anything but
    report files, or a link not made here, is refused (``FileExistsError``) rather
    than moved. ``folder / "report.html"`` stays the path to open.

    Every report says when it was made (UTC, ISO 8601) and by which model-audit
    version: ``made_at`` and ``tool_version`` in ``report.json``, a line in the page's
    header and in the Markdown.

    Args:
        result: the audit result.
        folder: the report folder (e.g. from :func:`report_folder`).
        model: the audited model's identity (see :func:`report_dict`).
        run_id: the MLflow run id, if any.

    Returns:
        ``{"html": path, "json": path, "md": path}``, paths through ``folder``.
    """
    folder = Path(folder)
    made = _made()
    texts = {
        "html": render_html(result, model, run_id, made=made),
        "json": json.dumps(report_dict(result, model, run_id, made=made), indent=2, allow_nan=False) + "\n",
        "md": render_markdown(result, model, run_id, made=made),
    }
    name = folder.name
    if name in ("", ".", ".."):
        raise ValueError(f"report folder {folder} has no name of its own; give a folder such as reports/<model>")
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent):
        _remove_stale(parent, name, keep=_current_version(folder))
        version = f".{name}.v{time.time_ns()}-{secrets.token_hex(4)}"
        tmp_dir = parent / f"{version}.tmp"
        final_dir = parent / version
        link_tmp = parent / f"{version}.link"
        moved: Path | None = None
        old: str | None = None
        done = False
        try:
            os.mkdir(tmp_dir, 0o755)
            for key, file in zip(_KEYS, REPORT_FILES, strict=True):
                fd = os.open(tmp_dir / file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                    fh.write(texts[key])
                    fh.flush()
                    os.fsync(fh.fileno())
            _fsync_dir(tmp_dir)
            os.rename(tmp_dir, final_dir)
            os.symlink(version, link_tmp)
            old = _current_version(folder)
            if old is None and os.path.lexists(folder):
                _check_migratable(folder)
                moved = parent / f".{name}.v{time.time_ns()}-{secrets.token_hex(4)}.old"
                os.rename(folder, moved)
            os.replace(link_tmp, folder)  # the switch: one atomic step
            done = True
            _fsync_dir(parent)
        finally:
            if not done:
                for p in (link_tmp, tmp_dir, final_dir):
                    _remove(p)
                if moved is not None and not os.path.lexists(folder):
                    os.rename(moved, folder)  # undo the migration: the old report stays
                    moved = None
        for p in (old and parent / old, moved):
            if p is not None:
                _remove(p)
    return {key: folder / file for key, file in zip(_KEYS, REPORT_FILES, strict=True)}


def report_folder(reports_dir: str | Path, model_name: str, version: str | None) -> Path:
    """The folder of one model's report: ``<reports_dir>/<model>-<version>`` (or ``<model>``).

    Both parts are made filesystem-safe: every character outside ``[A-Za-z0-9._-]``
    becomes ``_``, runs of dots and leading dots or dashes are replaced, and an overlong
    name is shortened with a hash suffix, so the folder always lies directly inside
    ``reports_dir`` (``"../x y"`` gives ``reports/__x_y``).

    Args:
        reports_dir: the reports root (e.g. ``reports``).
        model_name: the model's name (registered name, run id or file stem).
        version: its registered version, or None.

    Returns:
        The folder path (not created).
    """
    name = _safe_part(model_name)
    if version is not None and str(version).strip():
        name = _safe_part(f"{name}-{_safe_part(version)}")
    root = Path(reports_dir)
    folder = root / name
    if folder.parent != root or name in (".", ".."):  # pragma: no cover - _safe_part rules it out
        raise ValueError(f"unsafe report folder name {name!r}")
    return folder


def render_html(
    result: AuditResult,
    model: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    *,
    made: Mapping[str, str] | None = None,
) -> str:
    """The self-contained HTML page (see the module docstring).

    Args:
        result: the audit result (its ``evidence`` and ``probe_set`` are used for the
            pictures when present; without them the page has the numbers only).
        model: the audited model's identity (see :func:`report_dict`).
        run_id: the MLflow run id, if any.
        made: ``made_at`` and ``tool_version`` (default: now, the installed version).

    Returns:
        The page as a string.
    """
    made = _made() if made is None else made
    info = _model_info(model)
    e = _esc
    verdict = str(result.verdict)
    title = f"Audit {verdict}: {info.get('name') or 'model'}"
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        _html_header(result, info, run_id, made),
        _html_nav(result),
        _html_reasons(result),
        _html_groups(result),
        _html_curves(result),
        _html_overlays(result),
        _html_synthesized(result),
        _html_checks(result),
        _html_clusters(result),
        _html_metrics(result),
        _html_config(result),
        '<footer>model-audit report, schema '
        f"{e(_schema(result))}; the verdict can be re-derived from report.json with "
        "<code>audit.bias.recheck</code>.</footer>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(p for p in parts if p)


def render_markdown(
    result: AuditResult,
    model: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    *,
    made: Mapping[str, str] | None = None,
) -> str:
    """A short Markdown summary for a pull-request comment, inert whatever the names are.

    It has a headline with the verdict and model, the deciding reasons as bullets, a
    group-accuracy table, the methods used as evidence, the probe digest (12
    characters), when and by which version it was made, and a pointer to
    ``report.html``.

    Every user-supplied string (model name, version and URI, run id, findings, group
    and method names) is shown as an inline code span (:func:`_code`): inside one,
    GitHub-flavoured Markdown makes no link, autolink (``http://``, ``www.``, e-mail),
    image, HTML, emphasis, entity, @-mention, issue reference or emoji. The only link
    is the report's own ``[report.html](report.html)``.

    Args:
        result: the audit result.
        model: the audited model's identity (see :func:`report_dict`).
        run_id: the MLflow run id, if any.
        made: ``made_at`` and ``tool_version`` (default: now, the installed version).

    Returns:
        The Markdown text.
    """
    made = _made() if made is None else made
    info = _model_info(model)
    m = _code
    verdict = str(result.verdict)
    icon = {"PASS": "\u2705", "FAIL": "\u274c", "INCONCLUSIVE": "\u26a0\ufe0f"}.get(verdict, "")
    shown = f"**{verdict}**" if icon else m(verdict)
    who = m(info.get("name") or "model")
    if info.get("version") is not None:
        who += f" version {m(info['version'])}"
    lines = [f"### {icon + ' ' if icon else ''}Model audit: {shown} for {who}", ""]
    meta = []
    if info.get("uri"):
        meta.append(f"model {m(info['uri'])}")
    if run_id:
        meta.append(f"MLflow run {m(run_id)}")
    digest = re.sub(r"[^0-9A-Za-z]", "", str(result.probes.get("digest", "")))[:12]
    n = _count(result.probes.get("n"))
    meta.append(f"probes `{digest or 'unknown'}`" + (f" ({n} probes)" if n is not None else ""))
    lines += [" \u00b7 ".join(meta), ""]

    decisive = [c for c in result.checks if c.decisive]
    lines.append("**Why**" if decisive else "**Why**: no check decided the verdict.")
    for c in decisive:
        lines.append(f"- {m(_sentence(c.finding))}")
        if c.support:  # corroborating numbers, below the reason and never part of it
            lines.append(f"  - corroborating: {m(_sentence(c.support))}")
    lines.append("")

    rows = _group_rows(result)
    if rows:
        lines += ["| group | accuracy | 95% CI | n |", "|---|---:|---|---:|"]
        for g, _k, total, acc, lo, hi in rows:
            lines.append(f"| {_code_cell(g)} | {acc:.2f} | {lo:.2f} to {hi:.2f} | {total} |")
        lines.append("")

    all_methods, used = _methods_used(result)
    if all_methods:
        unused = [x for x in all_methods if x not in used]
        text = f"**Evidence methods**: {', '.join(m(x) for x in used) if used else 'none'} used"
        if unused:
            text += f"; not used: {', '.join(m(x) for x in unused)}"
        layers = method_layers(result)
        if layers:
            text += "; layers: " + ", ".join(f"{m(x)} at {m(name)}" for x, name in layers.items())
        lines.append(text + ".")
    else:
        lines.append("**Evidence methods**: no attribution method was run.")
    others = len(result.checks) - len(decisive)
    stamp = re.sub(r"[^0-9A-Za-z:+.-]", "", str(made["made_at"]))
    lines += [
        "",
        f"Full report with {others} further finding(s), charts, overlays and the config: "
        "[report.html](report.html) (beside this file).",
        "",
        f"Made {stamp} by model-audit {m(made['tool_version'])}.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers: report folder
_VERSION_TAIL = r"\.v\d+-[0-9a-f]{8}"
#: Files a plain report directory of an older model-audit may hold (reports and its temporaries).
_OLD_REPORT_FILE = re.compile(r"report\.(?:html|json|md)|\.report\.(?:html|json|md)\..+\.tmp")


def _made() -> dict[str, str]:
    """When (UTC, ISO 8601, seconds) and by which model-audit version a report is made."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {"made_at": now.isoformat().replace("+00:00", "Z"), "tool_version": _tool_version()}


def _tool_version() -> str:
    try:
        return importlib.metadata.version("model-audit")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "unknown"


def _current_version(folder: Path) -> str | None:
    """The hidden version directory ``folder`` links to, when it is a link made here."""
    if not folder.is_symlink():
        return None
    target = os.readlink(folder)
    if re.fullmatch(re.escape(f".{folder.name}") + _VERSION_TAIL, target):
        return target
    return None


def _check_migratable(folder: Path) -> None:
    """Refuse to move aside anything but an older model-audit report directory."""
    if folder.is_symlink():
        raise FileExistsError(
            f"report folder {folder} is a symbolic link not made by model-audit (to "
            f"{os.readlink(folder)}); remove it or choose another reports folder"
        )
    if not folder.is_dir():
        raise FileExistsError(f"report folder {folder} is a file; remove it or choose another reports folder")
    other = sorted(
        p.name for p in folder.iterdir() if not (_OLD_REPORT_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink())
    )
    if other:
        shown = ", ".join(repr(x) for x in other[:3]) + (" ..." if len(other) > 3 else "")
        raise FileExistsError(
            f"report folder {folder} holds files that are not reports ({shown}); model-audit replaces "
            "a report folder as a whole: move them or choose another reports folder"
        )


def _remove_stale(parent: Path, name: str, keep: str | None) -> None:
    """Remove what killed writes of ``parent/name`` left: temporaries, unlinked versions."""
    pattern = re.compile(re.escape(f".{name}") + _VERSION_TAIL + r"(?:\.tmp|\.link|\.old)?")
    for p in parent.iterdir():
        if p.name != keep and pattern.fullmatch(p.name):
            _remove(p)


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(parent: Path):
    """An exclusive lock on the directory ``parent`` (writers of one reports folder take turns)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- helpers: data
def _model_info(model: Any) -> dict[str, Any]:
    if model is None:
        src: dict[str, Any] = {}
    elif dataclasses.is_dataclass(model) and not isinstance(model, type):
        src = {
            f.name: getattr(model, f.name)
            for f in dataclasses.fields(model)
            if not isinstance(getattr(model, f.name), torch.nn.Module)
        }
    elif isinstance(model, Mapping):
        src = dict(model)
    else:
        raise TypeError(f"model must be a mapping (name, version, uri, ...); got {type(model).__name__}")
    out: dict[str, Any] = {k: None for k in _MODEL_FIELDS[:4]}
    for k, v in src.items():
        if isinstance(v, torch.nn.Module):
            continue
        out[str(k)] = v
    if out.get("version") is not None:
        out["version"] = str(out["version"])
    return _plain_numbers(out)


def _schema(result: AuditResult) -> str:
    return f"{SCHEMA} v{SCHEMA_VERSION}"


def _safe_part(text: Any) -> str:
    s = _SAFE_NAME.sub("_", str(text))
    s = re.sub(r"\.{2,}", "_", s)
    s = re.sub(r"^[.-]", "_", s)
    if len(s) > _MAX_NAME:
        s = s[: _MAX_NAME - 13] + "_" + hashlib.sha256(str(text).encode()).hexdigest()[:12]
    return s or "model"


def _sentence(text: str) -> str:
    t = " ".join(str(text).split())
    return t if not t or t[-1] in ".!?" else t + "."


def _group_rows(result: AuditResult) -> list[tuple[str, int, int, float, float, float]]:
    """(group, correct, n, accuracy, low, high) per group with probes, in probe-set order."""
    groups = (result.raw.get("behaviour") or {}).get("groups") or {}
    rows = []
    for g, c in groups.items():
        k, n = int(c["correct"]), int(c["n"])
        if n <= 0:
            continue
        lo, hi = stats.wilson_interval(k, n, GROUP_CONFIDENCE)
        rows.append((str(g), k, n, k / n, lo, hi))
    return rows


def method_layers(result: AuditResult) -> dict[str, str]:
    """Method -> the layer its maps come from (Grad-CAM's resolved layer), as recorded by the audit."""
    out: dict[str, str] = {}
    for m, entry in (result.raw.get("methods") or {}).items():
        if isinstance(entry, Mapping) and entry.get("layer"):
            out[str(m)] = str(entry["layer"])
    return out


def _methods_used(result: AuditResult) -> tuple[list[str], list[str]]:
    methods = [str(m) for m in (result.raw.get("methods") or {})]
    used: list[str] = []
    for c in result.checks:
        if c.name == "methods":
            used = [str(m) for m in c.numbers.get("used", [])]
    return methods, used


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(f):
        return "nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return f"{f:.4g}"


# --------------------------------------------------------------------------- helpers: escaping
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


#: The longest user string shown in the Markdown summary (longer ones are cut with an ellipsis).
MD_MAX_TEXT = 1000
_BACKTICKS = re.compile(r"`+")


def _md_text(x: Any) -> str:
    """``x`` as one printable line of at most :data:`MD_MAX_TEXT` characters.

    Whitespace runs (newlines included) become one space; other non-printable
    characters (controls, bidirectional overrides, zero-width characters) become
    U+FFFD, so a name cannot reorder or hide text around it.
    """
    s = " ".join(str(x).split())
    s = "".join(ch if ch.isprintable() else "\ufffd" for ch in s)
    if len(s) > MD_MAX_TEXT:
        s = s[: MD_MAX_TEXT - 1] + "\u2026"
    return s


def _code(x: Any) -> str:
    """A user string as an inline code span: inert in GitHub-flavoured Markdown.

    The fence is one backtick longer than the longest backtick run inside, and one
    space pads each side (CommonMark strips exactly that), so the text cannot close
    the span early. Inside a code span nothing is parsed: no links, autolinks,
    images, HTML, entities or emphasis, and GitHub adds no mentions or references.
    """
    s = _md_text(x)
    if not s:
        return "(empty)"
    fence = "`" * (max((len(r) for r in _BACKTICKS.findall(s)), default=0) + 1)
    return f"{fence} {s} {fence}"


def _code_cell(x: Any) -> str:
    """:func:`_code` for a table cell: a ``|`` (which would split the cell even inside a
    code span) is shown as an escaped ``\\|`` between the code spans of the parts."""
    return " \\| ".join(_code(part) for part in _md_text(x).split("|"))


def _md(x: Any) -> str:
    """A user string made inert in Markdown (an inline code span; see :func:`_code`)."""
    return _code(x)


def _count(x: Any) -> int | None:
    try:
        return None if x is None or isinstance(x, bool) else int(x)
    except (TypeError, ValueError):
        return None


def _mpl_text(x: Any) -> str:
    """A string for a Matplotlib label: ``$`` would start mathtext."""
    return str(x).replace("$", r"\$")


# --------------------------------------------------------------------------- helpers: pictures
def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(img: Image.Image, alt: str, caption: str | None = None) -> str:
    w, h = img.size
    tag = f'<img src="{_png(img)}" width="{w}" height="{h}" alt="{_esc(alt)}">'
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{tag}{cap}</figure>"


def _group_chart(rows: Sequence[tuple[str, int, int, float, float, float]]) -> Image.Image:
    """Horizontal bars of group accuracy with Wilson interval whiskers."""
    n = len(rows)
    fig = Figure(figsize=(6.4, 0.42 * n + 1.1), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)[::-1]
    acc = np.array([r[3] for r in rows])
    err = np.array([[r[3] - r[4] for r in rows], [r[5] - r[3] for r in rows]])
    classes: list[str] = []
    for r in rows:
        cls = r[0].split("|", 1)[0]
        if cls not in classes:
            classes.append(cls)
    palette = [f"C{i % 10}" for i in range(len(classes))]
    colours = [palette[classes.index(r[0].split("|", 1)[0])] for r in rows]
    ax.barh(y, acc, color=colours, alpha=0.8, height=0.6)
    ax.errorbar(acc, y, xerr=err, fmt="o", color="0.15", markersize=3, capsize=3, linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels([_mpl_text(f"{r[0]} ({r[1]}/{r[2]})") for r in rows], fontsize=9)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(f"accuracy ({round(100 * GROUP_CONFIDENCE)}% Wilson interval)")
    ax.grid(axis="x", alpha=0.3)
    fig.subplots_adjust(left=0.38, right=0.97, bottom=0.8 / (0.42 * n + 1.1), top=0.97)
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def _layout(result: AuditResult):
    """(evidence, probe_set, rows, map_pos) when pictures can be drawn, else None.

    ``rows[p]`` is the probe row of evidence position ``p``; ``map_pos`` maps a subset
    position to its row in the evidence maps.
    """
    ev, ps = result.evidence, result.probe_set
    if ev is None or ps is None or not result.explained:
        return None
    explained = list(result.explained)
    index = [int(i) for i in ev.index.tolist()]
    if any(i < 0 or i >= len(explained) for i in index):
        return None
    rows = [explained[i] for i in index]
    map_pos = {int(p): j for j, p in enumerate(ev.map_index.tolist())}
    return ev, ps, rows, map_pos, index


# --------------------------------------------------------------------------- helpers: HTML sections
def _kv(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _html_header(
    result: AuditResult, info: Mapping[str, Any], run_id: str | None, made: Mapping[str, str]
) -> str:
    e = _esc
    verdict = str(result.verdict)
    cls = {"PASS": "pass", "FAIL": "fail"}.get(verdict, "inconclusive")
    probes = result.probes or {}
    kv: list[tuple[str, str]] = [
        ("Model", e(info.get("name") or "(unnamed)")),
        ("Version", e(info.get("version") if info.get("version") is not None else "(none)")),
    ]
    if info.get("registered_name"):
        reg = str(info["registered_name"])
        if info.get("registered_version") is not None:
            reg += f" version {info['registered_version']}"
        kv.append(("Registered model", e(reg)))
    kv.append(("Model URI", f"<code>{e(info.get('uri') or '(none)')}</code>"))
    for k in sorted(set(info) - set(_MODEL_FIELDS)):
        kv.append((str(k), e(info[k])))
    kv.append(("MLflow run", f"<code>{e(run_id)}</code>" if run_id else "(none)"))
    kv.append(("Probe digest", f"<code>{e(probes.get('digest', '(unknown)'))}</code>"))
    size = probes.get("size") or []
    carries = [k for k, flag in (("masks", "has_masks"), ("groups", "has_groups"), ("pairs", "has_pairs")) if probes.get(flag)]
    beh = result.raw.get("behaviour") or {}
    counts = f"{probes.get('n', '?')} probes"
    if len(size) == 2:
        counts += f" of {size[0]}\u00d7{size[1]} pixels"
    counts += f"; {len(result.explained)} explained"
    if "correct" in beh and beh.get("n"):
        counts += f"; overall accuracy {beh['correct'] / beh['n']:.2f} ({beh['correct']}/{beh['n']})"
    kv.append(("Probes", e(counts)))
    kv.append(("Classes", e(", ".join(str(c) for c in probes.get("classes") or []) or "(none)")))
    if probes.get("groups"):
        kv.append(("Groups", e(", ".join(str(g) for g in probes["groups"]))))
    kv.append(("Probes carry", e(", ".join(carries) if carries else "labels only")))
    layers = method_layers(result)
    if layers:
        kv.append(("Attribution layers", ", ".join(f"{e(m)} at <code>{e(name)}</code>" for m, name in layers.items())))
    kv.append(("Audit time", e(f"{result.seconds:.1f} s")))
    kv.append(("Report made", e(f"{made['made_at']} by model-audit {made['tool_version']}")))
    return (
        f'<header class="{cls}">'
        f'<div id="verdict" class="verdict {cls}">{e(verdict)}</div>'
        f'<div class="head"><h1>Model audit: {e(info.get("name") or "model")}</h1>{_kv(kv)}</div>'
        "</header>"
    )


def _html_nav(result: AuditResult) -> str:
    links = [("reasons", "Reasons")]
    if _group_rows(result):
        links.append(("groups", "Group accuracy"))
    if result.evidence is not None and result.evidence.curves:
        links.append(("curves", "Deletion curves"))
    if _layout(result) is not None and result.evidence.maps:
        links.append(("overlays", "Overlays"))
    if _synthesized_examples(result):
        links.append(("synthesized", "Synthesized counterfactuals"))
    links.append(("checks", "Checks"))
    if result.raw.get("clusters"):
        links.append(("clusters", "Clusters"))
    links += [("metrics", "Metrics"), ("config", "Config")]
    return "<nav>" + " \u00b7 ".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in links) + "</nav>"


def _verdict_badge(v: str | None) -> str:
    if v is None:
        return '<span class="badge info">info</span>'
    cls = {"PASS": "pass", "FAIL": "fail"}.get(v, "inconclusive")
    return f'<span class="badge {cls}">{_esc(v)}</span>'


def _html_reasons(result: AuditResult) -> str:
    decisive = [c for c in result.checks if c.decisive]
    others = [c for c in result.checks if not c.decisive]
    out = ['<section id="reasons"><h2>Reasons</h2>']
    if decisive:
        out.append('<h3>Deciding the verdict</h3><ol class="decisive">')
        out += [
            f"<li>{_verdict_badge(c.verdict)} {_esc(_sentence(c.finding))}"
            + (f'<div class="support">corroborating: {_esc(_sentence(c.support))}</div>' if c.support else "")
            + "</li>"
            for c in decisive
        ]
        out.append("</ol>")
    else:
        out.append("<p>No check decided the verdict.</p>")
    if others:
        out.append('<h3>Other findings</h3><ul class="others">')
        out += [f"<li>{_esc(_sentence(c.finding))}</li>" for c in others]
        out.append("</ul>")
    out.append("</section>")
    return "".join(out)


def _html_groups(result: AuditResult) -> str:
    rows = _group_rows(result)
    if not rows:
        return ""
    pct = round(100 * GROUP_CONFIDENCE)
    table = "".join(
        f"<tr><td>{_esc(g)}</td><td class='num'>{k}</td><td class='num'>{n}</td>"
        f"<td class='num'>{acc:.3f}</td><td class='num'>{lo:.3f} to {hi:.3f}</td></tr>"
        for g, k, n, acc, lo, hi in rows
    )
    return (
        '<section id="groups"><h2>Group accuracy</h2>'
        + _img(_group_chart(rows), "group accuracy chart", f"Accuracy per group with {pct}% Wilson intervals (all probes).")
        + f"<table><tr><th>group</th><th>correct</th><th>n</th><th>accuracy</th><th>{pct}% CI</th></tr>{table}</table>"
        + "</section>"
    )


def _html_curves(result: AuditResult) -> str:
    ev = result.evidence
    if ev is None or not ev.curves:
        if ev is None:
            return '<section id="curves"><h2>Deletion curves</h2><p>No attribution method was run.</p></section>'
        return ""
    curves = {m: c for m, c in ev.curves.items() if c}
    if not curves:
        return ""
    img = render.curve_plot(curves, title=f"mean over {int(ev.index.numel())} explained probes")
    note = (
        f"Target-class probability while the most relevant pixels are removed first; "
        f"the dashed grey line ({RANDOM}) removes pixels in random order. A method is used as "
        f"evidence only when its curve falls clearly faster than the random one."
    )
    errors = "".join(f"<li>{_esc(m)}: {_esc(err)}</li>" for m, err in ev.errors.items())
    err_html = f"<p>Failed methods:</p><ul>{errors}</ul>" if errors else ""
    return f'<section id="curves"><h2>Deletion curves</h2>{_img(img, "deletion curves")}<p>{_esc(note)}</p>{err_html}</section>'


def _html_overlays(result: AuditResult) -> str:
    lay = _layout(result)
    if lay is None or not lay[0].maps:
        return ""
    ev, ps, rows, map_pos, index = lay
    names = list(ps.class_names)
    preds = ev.logits.argmax(dim=1).tolist()
    by_group: dict[str, list[int]] = {}
    if ps.groups is not None:
        order = [f"group {g}" for g in ps.group_names]
        key = [f"group {ps.group_names[int(ps.groups[r])]}" for r in rows]
    else:
        order = [f"class {c}" for c in names]
        key = [f"class {names[int(ps.labels[r])]}" for r in rows]
    for p, k in enumerate(key):
        by_group.setdefault(k, []).append(p)
    out = [
        '<section id="overlays"><h2>Attribution overlays</h2>'
        f"<p>Up to {OVERLAYS_PER_GROUP} explained probes per "
        f"{'group' if ps.groups is not None else 'class'}: the image and its map (relevance for the true class). "
        "Captions give the true and the predicted class (red when wrong).</p>"
    ]
    for m, maps in ev.maps.items():
        figs = []
        for g in order:
            picks = [p for p in by_group.get(g, []) if index[p] in map_pos][:OVERLAYS_PER_GROUP]
            if not picks:
                continue
            r = [rows[p] for p in picks]
            grid = render.overlay_grid(
                ps.images[r],
                maps[[map_pos[index[p]] for p in picks]],
                [names[int(ps.labels[x])] for x in r],
                [names[int(preds[p])] if 0 <= int(preds[p]) < len(names) else str(int(preds[p])) for p in picks],
                ncols=OVERLAYS_PER_GROUP,
            )
            figs.append(_img(grid, f"{m} overlays, {g}", f"{m}: {g}"))
        if figs:
            out.append(f"<h3>{_esc(m)}</h3><div class='figs'>{''.join(figs)}</div>")
    out.append("</section>")
    return "".join(out)


def _synthesized_examples(result: AuditResult) -> list[int]:
    """Objects (indices into the ``synthesized`` evidence) to show: per class up to
    :data:`SWAPS_PER_CLASS`, flipped ones first; empty when the images cannot be rebuilt."""
    syn, ps = result.raw.get("synthesized") or {}, result.probe_set
    if not syn or ps is None or ps.masks is None:
        return []
    keys = ("rows", "same_background", "rand_background", "labels", "original", "same", "rand")
    cols = [list(syn.get(k) or []) for k in keys]
    n = len(cols[0])
    if not n or any(len(c) != n for c in cols) or any(not 0 <= int(r) < len(ps) for c in cols[:3] for r in c):
        return []
    by_class: dict[int, list[int]] = {}
    for i in sorted(range(n), key=lambda i: (int(syn["same"][i]) == int(syn["rand"][i]), i)):
        picks = by_class.setdefault(int(syn["labels"][i]), [])
        if len(picks) < SWAPS_PER_CLASS:
            picks.append(i)
    return [i for c in sorted(by_class) for i in by_class[c]]


def _html_synthesized(result: AuditResult) -> str:
    """Example swaps (original, Mixed-Same, Mixed-Rand with their predictions) and the numbers per class."""
    picks = _synthesized_examples(result)
    if not picks:
        return ""
    syn, ps = result.raw["synthesized"], result.probe_set
    names = list(ps.class_names)

    def name(k: Any) -> str:
        k = int(k)
        return (names[k] if 0 <= k < len(names) else str(k))[:18]

    rows = [int(syn["rows"][i]) for i in picks]
    same = counterfactual.synthesize(ps, rows, [int(syn["same_background"][i]) for i in picks])
    rand = counterfactual.synthesize(ps, rows, [int(syn["rand_background"][i]) for i in picks])
    tiles = torch.stack([x for j in range(len(rows)) for x in (ps.images[rows[j]], same[j], rand[j])])
    caps = [c for i in picks for c in (f"orig: {name(syn['original'][i])}", f"same: {name(syn['same'][i])}",
                                       f"rand: {name(syn['rand'][i])}")]  # fmt: skip
    grid = render.image_grid(tiles, caps, ncols=3, scale=2 if tiles.shape[-1] < 64 else 1)
    body = "".join(
        f"<tr><td>{_esc(c.name.split('/', 1)[1])}</td><td>{_verdict_badge(c.verdict)}</td>"
        f"<td class='num'>{_esc(c.numbers.get('flips'))} / {_esc(c.numbers.get('objects'))}</td>"
        f"<td class='num'>{_esc(_num(c.numbers.get('flip_rate')))}</td>"
        f"<td class='num'>{_esc(_num(c.numbers.get('accuracy_original')))}</td>"
        f"<td class='num'>{_esc(_num(c.numbers.get('accuracy_same')))}</td>"
        f"<td class='num'>{_esc(_num(c.numbers.get('accuracy_rand')))}</td></tr>"
        for c in result.checks
        if c.kind == "counterfactual" and "flip_rate" in c.numbers
    )
    note = (
        "Each object (its mask's pixels, at its own position) pasted onto the hole-filled background of another "
        "probe of its class (Mixed-Same) and of a probe of another class (Mixed-Rand), after Xiao et al. 2020. "
        "A flip is a different prediction on the two: only the background changed, both are pasted. Rows: "
        "original, Mixed-Same, Mixed-Rand, captioned with the predicted class; flipped objects are shown first. "
        "A cue inside the mask (a watermark on the object) is in every image and is not measured."
    )
    return (
        '<section id="synthesized"><h2>Synthesized counterfactuals</h2>'
        f"<p>{_esc(note)}</p>"
        + _img(grid, "synthesized counterfactual examples", "original | Mixed-Same | Mixed-Rand, predicted class")
        + "<table><tr><th>class</th><th>verdict</th><th>flips</th><th>flip rate</th><th>accuracy original</th>"
        f"<th>accuracy Mixed-Same</th><th>accuracy Mixed-Rand</th></tr>{body}</table></section>"
    )


def _html_checks(result: AuditResult) -> str:
    body = "".join(
        f"<tr{_DECISIVE_ROW if c.decisive else ''}><td><code>{_esc(c.name)}</code></td>"
        f"<td>{_esc(c.kind)}</td><td>{_verdict_badge(c.verdict)}</td>"
        f"<td>{'yes' if c.decisive else ''}</td><td>{_esc(_sentence(c.finding))}</td></tr>"
        for c in _ordered(result.checks)
    )
    return (
        '<section id="checks"><h2>Checks</h2>'
        "<table><tr><th>check</th><th>kind</th><th>verdict</th><th>decisive</th><th>finding</th></tr>"
        f"{body}</table></section>"
    )


_DECISIVE_ROW = ' class="decisive"'


def _ordered(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if c.decisive] + [c for c in checks if not c.decisive]


def _html_clusters(result: AuditResult) -> str:
    clusters = result.raw.get("clusters")
    if not clusters:
        return ""
    lay = _layout(result)
    out = [
        '<section id="clusters"><h2>SpRAy clusters</h2>'
        "<p>The attribution maps of each class, clustered (spectral relevance analysis). "
        "A cluster whose mean map sits on the background rather than the object hints at a "
        "spurious strategy; the gate leaves this to a human.</p>"
    ]
    for m, items in clusters.items():
        out.append(f"<h3>{_esc(m)}</h3>")
        if lay is not None and m in lay[0].maps:
            img = _cluster_means(lay, m, items)
            if img is not None:
                out.append(_img(img, f"{m} cluster means", f"{m}: mean image and mean map per cluster"))
        explained = list(result.explained)
        rows = []
        for c in items:
            members = [int(x) for x in c.get("members", [])]
            shown = [str(explained[x]) if 0 <= x < len(explained) else str(x) for x in members[:24]]
            more = f" \u2026 (+{len(members) - 24})" if len(members) > 24 else ""
            rows.append(
                f"<tr><td>{_esc(c.get('class_name'))}</td><td class='num'>{_esc(c.get('cluster'))}</td>"
                f"<td class='num'>{_esc(c.get('size'))}</td><td>{_esc(', '.join(shown) + more)}</td></tr>"
            )
        out.append(
            "<table><tr><th>class</th><th>cluster</th><th>size</th><th>probe rows</th></tr>"
            + "".join(rows)
            + "</table>"
        )
    out.append("</section>")
    return "".join(out)


def _cluster_means(lay, method: str, items: Sequence[Mapping[str, Any]]) -> Image.Image | None:
    ev, ps, rows, map_pos, index = lay
    pos_of = {sub: p for p, sub in enumerate(index)}  # subset position -> evidence position
    maps = ev.maps[method]
    tiles, caps = [], []
    for c in items:
        members = [int(x) for x in c.get("members", []) if int(x) in pos_of and int(x) in map_pos]
        if not members:
            continue
        mean_map = maps[[map_pos[x] for x in members]].float().mean(dim=0, keepdim=True)
        mean_img = ps.images[[rows[pos_of[x]] for x in members]].mean(dim=0, keepdim=True)
        tile = render.overlay(mean_img, mean_map)[0]
        img = (np.clip(mean_img[0].numpy(), 0.0, 1.0).transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
        gap = np.full((img.shape[0], 2, 3), 255, dtype=np.uint8)
        tiles.append(np.concatenate([img, gap, tile], axis=1))
        caps.append(f"{c.get('class_name')} #{c.get('cluster')} (n={c.get('size')})")
    if not tiles:
        return None
    arr = torch.from_numpy(np.stack(tiles).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return render.image_grid(arr, caps, ncols=4, scale=2 if arr.shape[2] < 48 else 1)


def _html_metrics(result: AuditResult) -> str:
    body = "".join(
        f"<tr><td><code>{_esc(k)}</code></td><td class='num'>{_esc(_num(v))}</td></tr>"
        for k, v in sorted(result.metrics.items())
    )
    return (
        '<section id="metrics"><h2>Metrics</h2>'
        f"<table><tr><th>metric</th><th>value</th></tr>{body}</table></section>"
    )


def _html_config(result: AuditResult) -> str:
    cfg = _plain_numbers(result.config)
    try:
        import yaml

        text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, default_flow_style=False)
    except Exception:  # noqa: BLE001 - JSON is a fine fallback for display
        text = json.dumps(cfg, indent=2)
    return f'<section id="config"><h2>Config</h2><pre>{_esc(text)}</pre></section>'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa;line-height:1.45}
header{display:flex;gap:24px;align-items:flex-start;padding:20px 28px;border-bottom:6px solid #999;background:#fff}
header.pass{border-color:#1a7f37}header.fail{border-color:#cf222e}header.inconclusive{border-color:#bf8700}
.verdict{font-size:44px;font-weight:800;letter-spacing:1px;padding:14px 26px;border-radius:10px;color:#fff;white-space:nowrap}
.verdict.pass{background:#1a7f37}.verdict.fail{background:#cf222e}.verdict.inconclusive{background:#bf8700}
h1{font-size:22px;margin:0 0 8px 0;word-break:break-all}
h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:16px 0 6px 0}
nav{padding:8px 28px;background:#f0f0f3;font-size:14px}
nav a{color:#0550ae;text-decoration:none}
section{padding:0 28px}
table{border-collapse:collapse;font-size:13px;margin:8px 0;background:#fff}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
table.kv th{background:#f6f8fa;font-weight:600;white-space:nowrap}
table.kv td,table.kv th{border:none;padding:1px 10px 1px 0;background:none}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.decisive td{background:#fff8e1}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
pre{background:#f6f8fa;border:1px solid #ddd;padding:10px;overflow:auto;white-space:pre-wrap}
.badge{display:inline-block;font-size:11px;font-weight:700;padding:1px 6px;border-radius:4px;color:#fff;background:#888}
.badge.pass{background:#1a7f37}.badge.fail{background:#cf222e}.badge.inconclusive{background:#bf8700}.badge.info{background:#8c959f}
ol.decisive li{font-weight:600;margin:4px 0}div.support{font-weight:400;color:#444;margin-left:1em}ul.others li{margin:3px 0;color:#333}
figure{margin:8px 16px 8px 0;display:inline-block;vertical-align:top}
figure img{max-width:100%;height:auto;border:1px solid #e5e5e5;background:#fff}
figcaption{font-size:12px;color:#555}
footer{margin:32px 28px 20px;font-size:12px;color:#666}
"""
