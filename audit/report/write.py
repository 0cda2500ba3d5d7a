"""Audit reports: one :class:`~audit.pipeline.AuditResult` -> ``report.html``, ``report.json``, ``report.md``.

* ``report.html``: one self-contained page for a human reviewer. Every picture is an
  inline ``data:image/png;base64`` URI, the CSS is inline, there is no script and no
  external URL, and a Content-Security-Policy forbids loading anything but inline
  images and styles. It shows the verdict (``id="verdict"``), the model and probe set
  (with the layer each layer-based method explained at, e.g. Grad-CAM's),
  the reasons (deciding findings first), the group accuracies with Wilson intervals,
  the deletion curves against the random reference, attribution overlays per method
  and group, example synthesized counterfactuals (masks only: objects pasted onto
  other probes' backgrounds), the TCAV scores along the groups' contexts, the network dissection's context units, every check, the SpRAy clusters of a labels-only probe set, the metrics
  and the full config.
* ``report.json``: :meth:`AuditResult.to_dict` plus the model and the MLflow run id;
  :func:`audit.pipeline.recheck` re-derives the verdict from it.
* ``report.md``: a short summary for a pull-request comment that points to the page.

The page and the summary are Jinja2 templates, ``audit/report/templates/report.html.j2`` and
``report.md.j2`` (shipped in the wheel), rendered in a sandboxed environment with
``StrictUndefined``. The Python side only prepares plain data for them (the views of
:func:`_html_view` and :func:`_markdown_view`: strings, numbers, pictures as data URIs);
no value is ever compiled as a template. Every user-supplied string (class, group and
model names, URIs, findings, config values, method names) is inert, and the template
author cannot forget it: the HTML environment escapes every interpolated value
(autoescape, with :func:`html.escape`'s quoting), and the Markdown environment turns every
interpolated value into an inline code span (:func:`code_span`; no links, autolinks, images
or HTML in a GitHub comment) unless it is a number or was marked safe explicitly. Each
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
import functools
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

import jinja2
import numpy as np
import torch
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from audit.engine import stats
from audit.evidence import BUILTIN_KINDS, counterfactual, get_kind
from audit.evidence.attribution import RANDOM
from audit.pipeline import SCHEMA, SCHEMA_VERSION, AuditResult, Check
from audit.report import pictures
from audit.report.text import visible
from audit.rules import concepts
from audit.rules import dissection as dissection_rules
from audit.rules.base import plain_numbers

__all__ = [
    "REPORT_FILES",
    "report_dict",
    "write_reports",
    "render_reports",
    "write_rendered",
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
_MODEL_FIELDS = (
    "name",
    "version",
    "uri",
    "registered_name",
    "registered_version",
    "kind",
    "layout",
)
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
            :class:`audit.gate.loading.LoadedModel`, whose network itself is left out).
        run_id: the MLflow run that logged the audit, if any.
        made: ``made_at`` and ``tool_version`` (default: now, the installed version).

    Returns:
        A JSON-ready dict that keeps ``schema``/``schema_version`` (so
        :func:`audit.pipeline.recheck` accepts it), with ``model``, ``mlflow_run_id``,
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
    """Write ``report.html``, ``report.json`` and ``report.md`` for one audit into ``folder``, as one set.

    ``result`` is the :class:`~audit.pipeline.AuditResult` that :func:`audit.pipeline.run_audit`
    returns; its pictures (overlays, curves, clusters, swaps) need its ``evidence`` and
    ``probe_set``, which a result rebuilt from JSON lacks (then the page shows the
    numbers only). The gate (``model-audit``, :mod:`audit.gate.job`) calls this with the
    registered model's identity and its MLflow run, into ``<reports_dir>/<model>-<version>``.
    Open ``folder / "report.html"`` in a browser, post ``report.md`` as a pull-request
    comment (it links to ``report.html`` beside it), and re-derive the verdict from
    ``report.json`` with :func:`audit.pipeline.recheck`.

    Example (about 10 s on a CPU; an untrained net, so the verdict is not the point)::

        import torch
        from audit.pipeline import run_audit
        from audit.datasets import snow_wolf
        from audit.models import SmallCNN
        from audit.report.write import report_folder, write_reports

        torch.manual_seed(0)
        probes = snow_wolf.probe_set(n_per_group=4, size=32, seed=0)
        result = run_audit(SmallCNN(), probes, {"engine": {"methods": ["gradcam"], "attribution_probes": 8}})
        folder = report_folder("reports", "snow-wolf", "3")  # reports/snow-wolf-3, not created yet
        paths = write_reports(result, folder, model={"name": "snow-wolf", "version": 3})
        print(result.verdict, paths["html"])  # e.g. INCONCLUSIVE reports/snow-wolf-3/report.html

    A reader of ``folder`` sees one audit's three files, never a mix of two audits,
    whatever point a write is interrupted at (an exception, SIGKILL, power loss after
    the fsyncs). The layout::

        <parent>/<name>                     symbolic link -> .<name>.v<ns>-<hex>
        <parent>/.<name>.v<ns>-<hex>/       report.html, report.json, report.md

    Everything is rendered in memory first (:func:`render_html`, :func:`report_dict`,
    :func:`render_markdown`). The three files go into a fresh hidden
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
        result: the audit result (see above).
        folder: the report folder (e.g. from :func:`report_folder`); its parent is
            created when missing.
        model: the audited model's identity: a mapping such as ``{"name": ..., "version":
            ..., "uri": ...}`` or a dataclass such as :class:`audit.gate.loading.LoadedModel`
            (see :func:`report_dict`); None shows the model as unnamed.
        run_id: the MLflow run id that logged the audit, if any.

    Returns:
        ``{"html": path, "json": path, "md": path}``, paths through ``folder``.

    Raises:
        ValueError: ``folder`` has no name of its own (``""``, ``.``, ``..``).
        FileExistsError: ``folder`` is a file, a link not made here, or a directory
            holding files that are not reports; nothing is changed.
        TypeError: ``model`` is neither a mapping nor a dataclass.
        OSError: a write failed (e.g. a full disk); the previous report stays as it was.
    """
    return write_rendered(render_reports(result, model, run_id), folder)


def render_reports(
    result: AuditResult, model: Mapping[str, Any] | None = None, run_id: str | None = None
) -> dict[str, str]:
    """The three reports of one audit as text, ``{"html": ..., "json": ..., "md": ...}``, made at one
    time: render once, then :func:`write_rendered` them wherever they go (the gate writes the
    same texts as the run's artifacts and into the local report folder). Arguments as
    :func:`write_reports`."""
    made = _made()
    return {
        "html": render_html(result, model, run_id, made=made),
        "json": json.dumps(report_dict(result, model, run_id, made=made), indent=2, allow_nan=False)
        + "\n",
        "md": render_markdown(result, model, run_id, made=made),
    }


def write_rendered(texts: Mapping[str, str], folder: str | Path) -> dict[str, Path]:
    """Write the reports :func:`render_reports` made into ``folder`` as one set, atomically (the
    layout, the clean-up and the errors are :func:`write_reports`'s); returns their paths."""
    folder = Path(folder)
    name = folder.name
    if name in ("", ".", ".."):
        raise ValueError(
            f"report folder {folder} has no name of its own; give a folder such as reports/<model>"
        )
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
    """The self-contained HTML page (see the module docstring), from ``templates/report.html.j2``.

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
    return _template("report.html.j2").render(
        v=_html_view(result, _model_info(model), run_id, made)
    )


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
    ``report.html``; the text is ``templates/report.md.j2``.

    Every user-supplied string (model name, version and URI, run id, findings, group
    and method names) is shown as an inline code span (:func:`code_span`, applied by the
    template environment to every interpolated value): inside one, GitHub-flavoured
    Markdown makes no link, autolink (``http://``, ``www.``, e-mail), image, HTML,
    emphasis, entity, @-mention, issue reference or emoji. The only link is the report's
    own ``[report.html](report.html)``.

    Args:
        result: the audit result.
        model: the audited model's identity (see :func:`report_dict`).
        run_id: the MLflow run id, if any.
        made: ``made_at`` and ``tool_version`` (default: now, the installed version).

    Returns:
        The Markdown text.
    """
    made = _made() if made is None else made
    return _template("report.md.j2").render(
        v=_markdown_view(result, _model_info(model), run_id, made)
    )


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
        raise FileExistsError(
            f"report folder {folder} is a file; remove it or choose another reports folder"
        )
    other = sorted(
        p.name
        for p in folder.iterdir()
        if not (_OLD_REPORT_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink())
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
        raise TypeError(
            f"model must be a mapping (name, version, uri, ...); got {type(model).__name__}"
        )
    out: dict[str, Any] = {k: None for k in _MODEL_FIELDS[:4]}
    for k, v in src.items():
        if isinstance(v, torch.nn.Module):
            continue
        out[str(k)] = v
    if out.get("version") is not None:
        out["version"] = str(out["version"])
    return plain_numbers(out)


def _schema(result: AuditResult) -> str:
    return f"{SCHEMA} v{SCHEMA_VERSION}"


def _safe_part(text: Any) -> str:
    s = _SAFE_NAME.sub("_", str(text))
    s = re.sub(r"\.{2,}", "_", s)
    s = re.sub(r"^[.-]", "_", s)
    if len(s) > _MAX_NAME:
        s = s[: _MAX_NAME - 13] + "_" + hashlib.sha256(str(text).encode()).hexdigest()[:12]
    return s or "model"


def sentence(text: str) -> str:
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


# --------------------------------------------------------------------------- helpers: templates
#: The template of each report, by the environment that renders it (chosen by the name's suffix).
_HTML_SUFFIX, _MD_SUFFIX = ".html.j2", ".md.j2"


class _MarkdownSafe(str):
    """Text that is Markdown already (a code span, a formatted number, a sanitized digest):
    the Markdown environment prints it as it is. Anything else it prints is a code span;
    joining or slicing one gives a plain ``str`` again, which is escaped."""

    __slots__ = ()


def _html_value(value: Any) -> Any:
    """``finalize`` of the HTML environment: every printed value, HTML-escaped as
    :func:`html.escape` does it (``&#x27;``, ``&quot;``), before Jinja's autoescape sees it;
    invisible characters (a bidi override, a control) are shown as escapes first
    (:func:`audit.report.text.visible`; newlines and tabs stay, e.g. in the config block).

    Markup is passed through only when it is Jinja's own (a macro's output): the views
    hold no :class:`~markupsafe.Markup`, so nothing from an audit is ever printed raw.
    """
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(visible(value, keep="\n\t"), quote=True))


def _md_value(value: Any) -> Any:
    """``finalize`` of the Markdown environment: every printed value becomes an inline code
    span (:func:`code_span`), except numbers and :class:`_MarkdownSafe` text."""
    if isinstance(value, _MarkdownSafe):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return _MarkdownSafe(code_span(value))


def _md_fixed(value: Any, digits: int = 2) -> _MarkdownSafe:
    """The ``fixed`` filter: a number with ``digits`` decimals (``0.50``)."""
    return _MarkdownSafe(f"{float(value):.{int(digits)}f}")


def _md_cell(value: Any) -> _MarkdownSafe:
    """The ``cell`` filter: a value for a table cell (:func:`_code_cell`)."""
    return _MarkdownSafe(_code_cell(value))


@functools.cache
def _environment(kind: str) -> SandboxedEnvironment:
    """The sandboxed template environment for ``"html"`` or ``"md"`` (made once).

    Both load from the package's ``templates`` folder, raise on an undefined name
    (``StrictUndefined``) and keep lines as written (``trim_blocks``, ``lstrip_blocks``,
    the final newline). HTML autoescapes every value (:func:`_html_value`); Markdown makes
    every value a code span (:func:`_md_value`), with the filters ``cell`` and ``fixed``
    and ``safe`` for text that is Markdown already.
    """
    common = {
        "loader": jinja2.PackageLoader("audit.report", "templates"),
        "undefined": jinja2.StrictUndefined,
        "trim_blocks": True,
        "lstrip_blocks": True,
        "keep_trailing_newline": True,
        "auto_reload": False,
    }
    if kind == "html":
        return SandboxedEnvironment(autoescape=True, finalize=_html_value, **common)
    if kind == "md":
        env = SandboxedEnvironment(autoescape=False, finalize=_md_value, **common)
        env.filters.update(cell=_md_cell, fixed=_md_fixed, safe=_MarkdownSafe)
        return env
    raise ValueError(f"unknown template kind {kind!r}")


def _template(name: str) -> jinja2.Template:
    """A report template by file name: ``*.html.j2`` in the HTML environment, ``*.md.j2`` in
    the Markdown one (a template is never rendered with the other's escaping)."""
    if name.endswith(_HTML_SUFFIX):
        return _environment("html").get_template(name)
    if name.endswith(_MD_SUFFIX):
        return _environment("md").get_template(name)
    raise ValueError(f"report template {name!r} must end with {_HTML_SUFFIX} or {_MD_SUFFIX}")


# --------------------------------------------------------------------------- helpers: escaping
#: The longest user string shown in the Markdown summary (longer ones are cut with an ellipsis).
MD_MAX_TEXT = 1000
_BACKTICKS = re.compile(r"`+")


def _md_text(x: Any) -> str:
    """``x`` as one printable line of at most :data:`MD_MAX_TEXT` characters.

    Whitespace runs (newlines included) become one space; other non-printable
    characters (controls, bidirectional overrides, zero-width characters) are shown
    as their escapes (:func:`audit.report.text.visible`: ``\\u202e``), so a name cannot
    reorder or hide text around it, and the reader sees that it tried.
    """
    s = visible(" ".join(str(x).split()))
    if len(s) > MD_MAX_TEXT:
        s = s[: MD_MAX_TEXT - 1] + "\u2026"
    return s


def code_span(x: Any) -> str:
    """A user string as an inline code span: inert in GitHub-flavoured Markdown.

    The fence is one backtick longer than the longest backtick run inside, so the text
    cannot close the span early; one space pads each side only when the text starts or
    ends with a backtick (CommonMark strips exactly that one space), so a plain name reads
    ``` `mine-pickle` ``` in the raw text too. Inside a code span nothing is parsed: no
    links, autolinks, images, HTML, entities or emphasis, and GitHub adds no mentions or
    references.
    """
    s = _md_text(x)
    if not s:
        return "(empty)"
    fence = "`" * (max((len(r) for r in _BACKTICKS.findall(s)), default=0) + 1)
    pad = " " if s[0] == "`" or s[-1] == "`" else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _code_cell(x: Any) -> str:
    """:func:`code_span` for a table cell: a ``|`` (which would split the cell even inside a
    code span) is shown as an escaped ``\\|`` between the code spans of the parts."""
    return " \\| ".join(code_span(part) for part in _md_text(x).split("|"))


def _count(x: Any) -> int | None:
    try:
        return None if x is None or isinstance(x, bool) else int(x)
    except (TypeError, ValueError):
        return None


def _mpl_text(x: Any) -> str:
    """A string for a Matplotlib label: ``$`` would start mathtext."""
    return visible(x).replace("$", r"\$")


# --------------------------------------------------------------------------- helpers: pictures
def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(img: Image.Image, alt: str, caption: str | None = None) -> dict[str, Any]:
    """A picture for the page: its PNG as a data URI, its size, alt text and caption."""
    w, h = img.size
    return {"src": _png(img), "width": w, "height": h, "alt": alt, "caption": caption}


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
        tile = pictures.overlay(mean_img, mean_map)[0]
        img = (
            (np.clip(mean_img[0].numpy(), 0.0, 1.0).transpose(1, 2, 0) * 255.0)
            .round()
            .astype(np.uint8)
        )
        gap = np.full((img.shape[0], 2, 3), 255, dtype=np.uint8)
        tiles.append(np.concatenate([img, gap, tile], axis=1))
        caps.append(f"{c.get('class_name')} #{c.get('cluster')} (n={c.get('size')})")
    if not tiles:
        return None
    arr = torch.from_numpy(np.stack(tiles).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return pictures.image_grid(arr, caps, ncols=4, scale=2 if arr.shape[2] < 48 else 1)


# --------------------------------------------------------------------------- views: plain data for the templates
#: check kinds report.md lists under "Concept evidence" (audit/rules/concepts.py, audit/rules/dissection.py)
_CONCEPT_KINDS = ("concepts", "dissection")


def _markdown_view(
    result: AuditResult, info: Mapping[str, Any], run_id: str | None, made: Mapping[str, str]
) -> dict[str, Any]:
    """What ``report.md.j2`` shows, as plain strings and numbers (escaped by the template)."""
    decisive = [c for c in result.checks if c.decisive]
    all_methods, used = _methods_used(result)
    digest = re.sub(r"[^0-9A-Za-z]", "", str(result.probes.get("digest", "")))[:12]
    return {
        "verdict": str(result.verdict),
        "name": info.get("name") or "model",
        "version": info.get("version"),
        "uri": info.get("uri") or None,
        "run_id": run_id or None,
        # letters and digits only: shown as it is, in a single-backtick code span
        "digest": _MarkdownSafe(digest or "unknown"),
        "n": _count(result.probes.get("n")),
        "decisive": [
            {
                "finding": sentence(c.finding),
                "support": sentence(c.support) if c.support else None,
                "against": sentence(c.against) if c.against else None,
            }
            for c in decisive
        ],
        "groups": [
            {"group": g, "accuracy": acc, "low": lo, "high": hi, "n": total}
            for g, _k, total, acc, lo, hi in _group_rows(result)
        ],
        "methods": all_methods,
        "used": used,
        "unused": [x for x in all_methods if x not in used],
        "layers": list(method_layers(result).items()),
        "deciding": [
            {"rule": sc["figure"]["caption"], "rows": sc["rows"]} for sc in _deciding_scales(result)
        ],
        "examples": _md_examples(result),
        # what the units and concepts say (network dissection, TCAV): corroborating, never deciding
        "concepts": [
            sentence(c.finding)
            for c in result.checks
            if not c.decisive and c.kind in _CONCEPT_KINDS
        ],
        "others": len(result.checks)
        - len(decisive)
        - sum(not c.decisive and c.kind in _CONCEPT_KINDS for c in result.checks),
        # an ISO 8601 time stamp reduced to digits, letters and ":+.-"
        "made_at": _MarkdownSafe(re.sub(r"[^0-9A-Za-z:+.-]", "", str(made["made_at"]))),
        "tool_version": made["tool_version"],
    }


def _html_view(
    result: AuditResult, info: Mapping[str, Any], run_id: str | None, made: Mapping[str, str]
) -> dict[str, Any]:
    """What ``report.html.j2`` shows, as plain data (strings, numbers, figures); a section
    that is None is left out of the page. In page order: the verdict, the deciding numbers
    and reasons, examples, explanations, the audit record, then (collapsed) the statistics."""
    verdict = str(result.verdict)
    name = info.get("name") or "model"
    view = {
        "title": f"Audit {verdict}: {name}",
        "verdict": verdict,
        "name": name,
        "summary": _summary(result, info),
        "facts": _facts(result, info, run_id, made),
        "deciding": _deciding_view(result),
        "decisive": [
            {
                "verdict": c.verdict,
                "finding": sentence(c.finding),
                "support": sentence(c.support) if c.support else None,
                "against": sentence(c.against) if c.against else None,
            }
            for c in result.checks
            if c.decisive
        ],
        "examples": _examples_view(result),
        "explanations": _explanations_view(result),
        "others": [sentence(c.finding) for c in result.checks if not c.decisive],
        "groups": _groups_view(result),
        "curves": _curves_view(result),
        "synthesized": _synthesized_view(result),
        "tcav": _tcav_view(result),
        "dissection": _dissection_view(result),
        "extra": _extra_kinds_view(result),
        "checks": [
            {
                "name": c.name,
                "kind": c.kind,
                "verdict": c.verdict,
                "decisive": c.decisive,
                "finding": sentence(c.finding),
            }
            for c in _ordered(result.checks)
        ],
        "clusters": _clusters_view(result),
        "metrics": [(k, _num(v)) for k, v in sorted(result.metrics.items())],
        "config": _config_text(result),
        "schema": _schema(result),
    }
    view["nav"] = _nav(view)
    return view


def _summary(result: AuditResult, info: Mapping[str, Any]) -> str:
    """The header's one line: version, probes and what they carry, overall accuracy."""
    probes = result.probes or {}
    parts = [f"version {info['version']}"] if info.get("version") is not None else []
    carries = [
        k
        for k, flag in (("masks", "has_masks"), ("groups", "has_groups"), ("pairs", "has_pairs"))
        if probes.get(flag)
    ]
    parts.append(
        f"{probes.get('n', '?')} probes ({', '.join(carries) if carries else 'labels only'})"
    )
    beh = result.raw.get("behaviour") or {}
    if "correct" in beh and beh.get("n"):
        parts.append(f"overall accuracy {beh['correct'] / beh['n']:.2f}")
    return " \u00b7 ".join(parts)


def _fact(label: str, value: Any, kind: str = "text") -> dict[str, Any]:
    """One row of the header's table: ``kind`` "text", "code" (monospace) or "layers"
    (``value``: (method, layer) pairs)."""
    return {"label": label, "value": value, "kind": kind}


def _facts(
    result: AuditResult, info: Mapping[str, Any], run_id: str | None, made: Mapping[str, str]
) -> list[dict]:
    """The header's table: the model, the run, the probe set, the layers, times."""
    probes = result.probes or {}
    facts = [
        _fact("Model", info.get("name") or "(unnamed)"),
        _fact("Version", info.get("version") if info.get("version") is not None else "(none)"),
    ]
    if info.get("registered_name"):
        reg = str(info["registered_name"])
        if info.get("registered_version") is not None:
            reg += f" version {info['registered_version']}"
        facts.append(_fact("Registered model", reg))
    facts.append(_fact("Model URI", info.get("uri") or "(none)", "code"))
    facts += [_fact(str(k), info[k]) for k in sorted(set(info) - set(_MODEL_FIELDS))]
    facts.append(_fact("MLflow run", run_id, "code") if run_id else _fact("MLflow run", "(none)"))
    facts.append(_fact("Probe digest", probes.get("digest", "(unknown)"), "code"))
    size = probes.get("size") or []
    carries = [
        k
        for k, flag in (("masks", "has_masks"), ("groups", "has_groups"), ("pairs", "has_pairs"))
        if probes.get(flag)
    ]
    beh = result.raw.get("behaviour") or {}
    counts = f"{probes.get('n', '?')} probes"
    if len(size) == 2:
        counts += f" of {size[0]}\u00d7{size[1]} pixels"
    counts += f"; {len(result.explained)} explained"
    if "correct" in beh and beh.get("n"):
        counts += (
            f"; overall accuracy {beh['correct'] / beh['n']:.2f} ({beh['correct']}/{beh['n']})"
        )
    facts.append(_fact("Probes", counts))
    facts.append(
        _fact("Classes", ", ".join(str(c) for c in probes.get("classes") or []) or "(none)")
    )
    if probes.get("groups"):
        facts.append(_fact("Groups", ", ".join(str(g) for g in probes["groups"])))
    facts.append(_fact("Probes carry", ", ".join(carries) if carries else "labels only"))
    layers = method_layers(result)
    if layers:
        facts.append(_fact("Attribution layers", list(layers.items()), "layers"))
    facts.append(_fact("Audit time", f"{result.seconds:.1f} s"))
    facts.append(_fact("Report made", f"{made['made_at']} by model-audit {made['tool_version']}"))
    return facts


def _nav(view: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(anchor, title) of each section the page (``view``) has, in page order."""
    links = [("evidence", "Deciding evidence")]
    for key, anchor, title in (
        ("examples", "examples", "Examples"),
        ("explanations", "overlays", "Explanations"),
        ("clusters", "clusters", "Clusters"),
    ):
        if view.get(key):
            links.append((anchor, title))
    return links + [("record", "Audit record"), ("statistics", "Statistics and filters")]


def _groups_view(result: AuditResult) -> dict[str, Any] | None:
    """The group-accuracy chart and rows (None without groups)."""
    rows = _group_rows(result)
    if not rows:
        return None
    pct = round(100 * GROUP_CONFIDENCE)
    chart = _figure(
        _group_chart(rows),
        "group accuracy chart",
        f"Accuracy per group (bars, one colour per class) with {pct}% Wilson intervals (whiskers), all probes.",
    )
    return {
        "pct": pct,
        "chart": chart,
        "rows": [
            {"group": g, "correct": k, "n": n, "accuracy": acc, "low": lo, "high": hi}
            for g, k, n, acc, lo, hi in rows
        ],
    }


def _curves_view(result: AuditResult) -> dict[str, Any] | None:
    """The faithfulness filter's curves (MoRF and LeRF per method, the random ordering when
    measured) with a caption that names exactly what the plot draws, and failed methods;
    ``{"figure": None}`` when no method was run; None when the methods drew no curve."""
    ev = result.evidence
    if ev is None:
        return {"figure": None}
    curves = {m: c for m, c in ev.curves.items() if c}
    if not curves:
        return None
    img, drawn = pictures.faithfulness_plot(
        curves, title=f"mean over {int(ev.index.numel())} explained probes"
    )
    need = float(((result.config.get("gate") or {}).get("faithfulness") or {}).get("min_gain", 0.0))
    figure = _figure(img, "deletion curves", _curves_caption(drawn, need))
    figure["draws"] = drawn
    return {
        "figure": figure,
        "random": RANDOM,
        "errors": [(m, err) for m, err in ev.errors.items()],
    }


def _curves_caption(drawn: Sequence[str], min_gain: float) -> str:
    """What the faithfulness plot shows, naming only the lines it draws (``drawn``)."""
    parts = [
        "Target-class probability while pixels are replaced by the baseline (mean over the explained probes)"
    ]
    if "MoRF" in drawn:
        parts.append("solid: each method's most relevant pixels first (MoRF)")
    if "LeRF" in drawn:
        parts.append("dashed, same colour: its least relevant first (LeRF)")
    if "random" in drawn:
        parts.append("dotted grey: a random ordering")
    text = "; ".join(parts) + "."
    if "MoRF" in drawn and "LeRF" in drawn:
        text += (
            " The gap between a method's two curves is its symmetric relevance gain, SRG = AUC(LeRF) - AUC(MoRF):"
            f" a method counts as evidence when the low end of its SRG's interval over probes lies above {min_gain:g}"
            " (a random ordering scores 0) and it passes the randomization sanity check."
        )
    return text


def _overlays_view(result: AuditResult) -> dict[str, Any] | None:
    """Per method, one overlay grid per group (or class) of up to :data:`OVERLAYS_PER_GROUP` probes."""
    lay = _layout(result)
    if lay is None or not lay[0].maps:
        return None
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
    methods = []
    for m, maps in ev.maps.items():
        figs = []
        for g in order:
            picks = [p for p in by_group.get(g, []) if index[p] in map_pos][:OVERLAYS_PER_GROUP]
            if not picks:
                continue
            r = [rows[p] for p in picks]
            grid = pictures.overlay_grid(
                ps.images[r],
                maps[[map_pos[index[p]] for p in picks]],
                [names[int(ps.labels[x])] for x in r],
                [
                    names[int(preds[p])] if 0 <= int(preds[p]) < len(names) else str(int(preds[p]))
                    for p in picks
                ],
                ncols=OVERLAYS_PER_GROUP,
            )
            figs.append(_figure(grid, f"{m} overlays, {g}", f"{m}: {g}"))
        if figs:
            methods.append({"name": m, "figures": figs})
    return {
        "per": OVERLAYS_PER_GROUP,
        "unit": "group" if ps.groups is not None else "class",
        "methods": methods,
    }


def _synthesized_examples(result: AuditResult) -> list[int]:
    """Objects (indices into the ``synthesized`` evidence) to show: per class up to
    :data:`SWAPS_PER_CLASS`, flipped ones first; empty when the images cannot be rebuilt."""
    syn, ps = result.raw.get("synthesized") or {}, result.probe_set
    if not syn or ps is None or ps.masks is None:
        return []
    keys = ("rows", "same_background", "rand_background", "labels", "original", "same", "rand")
    cols = [list(syn.get(k) or []) for k in keys]
    n = len(cols[0])
    if (
        not n
        or any(len(c) != n for c in cols)
        or any(not 0 <= int(r) < len(ps) for c in cols[:3] for r in c)
    ):
        return []
    by_class: dict[int, list[int]] = {}
    for i in sorted(range(n), key=lambda i: (int(syn["same"][i]) == int(syn["rand"][i]), i)):
        picks = by_class.setdefault(int(syn["labels"][i]), [])
        if len(picks) < SWAPS_PER_CLASS:
            picks.append(i)
    return [i for c in sorted(by_class) for i in by_class[c]]


def _synthesized_view(result: AuditResult) -> dict[str, Any] | None:
    """Example swaps (original, Mixed-Same, Mixed-Rand with their predictions) and the numbers per class."""
    picks = _synthesized_examples(result)
    if not picks:
        return None
    syn, ps = result.raw["synthesized"], result.probe_set
    names = list(ps.class_names)

    def name(k: Any) -> str:
        k = int(k)
        return (names[k] if 0 <= k < len(names) else str(k))[:18]

    rows = [int(syn["rows"][i]) for i in picks]
    same = counterfactual.synthesize(ps, rows, [int(syn["same_background"][i]) for i in picks])
    rand = counterfactual.synthesize(ps, rows, [int(syn["rand_background"][i]) for i in picks])
    tiles = torch.stack(
        [x for j in range(len(rows)) for x in (ps.images[rows[j]], same[j], rand[j])]
    )
    caps = [
        c
        for i in picks
        for c in (
            f"orig: {name(syn['original'][i])}",
            f"same: {name(syn['same'][i])}",
            f"rand: {name(syn['rand'][i])}",
        )
    ]
    grid = pictures.image_grid(tiles, caps, ncols=3, scale=2 if tiles.shape[-1] < 64 else 1)
    table = [
        {
            "class_name": c.name.split("/", 1)[1],
            "verdict": c.verdict,
            "decisive": c.decisive,
            "flips": c.numbers.get("flips"),
            "objects": c.numbers.get("objects"),
            "flip_rate": _num(c.numbers.get("flip_rate")),
            "accuracy_original": _num(c.numbers.get("accuracy_original")),
            "accuracy_same": _num(c.numbers.get("accuracy_same")),
            "accuracy_rand": _num(c.numbers.get("accuracy_rand")),
        }
        for c in result.checks
        if c.kind == "counterfactual" and "flip_rate" in c.numbers
    ]
    figure = _figure(
        grid,
        "synthesized counterfactual examples",
        "original | Mixed-Same | Mixed-Rand, predicted class",
    )
    return {"figure": figure, "rows": table}


def _tcav_view(result: AuditResult) -> dict[str, Any] | None:
    """The TCAV table (one row per class and concept) and its chart; None without TCAV numbers."""
    block = result.raw.get("tcav")
    rows = concepts.rows(block, result.config.get("gate") or {})
    if not rows:
        return None
    table = [
        {
            "class_name": r["class"],
            "concept": r["concept"],
            "score": f"{r['score']:.2f} \u00b1 {r['score_sd']:.2f}",
            "random": f"{r['random']:.2f} \u00b1 {r['random_sd']:.2f}",
            "p": _num(r["p_adjusted"]),
            "significant": "yes" if r["significant"] else "no",
            "direction": r["direction"],
            "shift": f"{r['shift']:+.2f}",
            "random_shift": f"\u00b1{r['random_shift_sd']:.2f}",
            "scored": r["scored"],
        }
        for r in rows
    ]
    chart = _figure(
        _tcav_chart(rows),
        "TCAV scores chart",
        "Mean TCAV score per class and concept (bars, with the spread over the CAVs) and the random concepts' "
        "mean \u00b1 sd (grey band) of each class.",
    )
    return {
        "layer": block.get("layer"),
        "cavs": block.get("random_concepts"),
        "examples": block.get("examples"),
        "tests": len(rows),
        "confidence": round(100 * float(result.config["gate"]["confidence"])),
        "rows": table,
        "chart": chart,
    }


def _tcav_chart(rows: Sequence[Mapping[str, Any]]) -> Image.Image:
    """Horizontal bars of the TCAV scores with the random concepts' mean +- sd behind each."""
    n = len(rows)
    fig = Figure(figsize=(6.4, 0.42 * n + 1.1), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)[::-1]
    for yi, r in zip(y, rows, strict=True):
        lo, hi = r["random"] - r["random_sd"], r["random"] + r["random_sd"]
        if math.isfinite(lo) and math.isfinite(hi):
            ax.fill_betweenx(
                [yi - 0.4, yi + 0.4], max(lo, 0.0), min(hi, 1.0), color="0.85", zorder=0
            )
        ax.plot([r["random"]] * 2, [yi - 0.4, yi + 0.4], color="0.45", linewidth=1, zorder=1)
    colours = ["C3" if r["significant"] else "C0" for r in rows]
    sd = [r["score_sd"] if math.isfinite(r["score_sd"]) else 0.0 for r in rows]
    ax.barh(
        y,
        [r["score"] for r in rows],
        xerr=sd,
        color=colours,
        alpha=0.8,
        height=0.5,
        capsize=3,
        zorder=2,
    )
    ax.set_yticks(y)
    ax.set_yticklabels([_mpl_text(f"{r['class']} along {r['concept']}") for r in rows], fontsize=9)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("TCAV score (red: significant; grey: random concepts)")
    ax.grid(axis="x", alpha=0.3)
    fig.subplots_adjust(left=0.38, right=0.97, bottom=0.8 / (0.42 * n + 1.1), top=0.97)
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


#: Context units listed in the report's dissection table.
DISSECTION_ROWS = 16


def _dissection_block(result: AuditResult) -> Mapping[str, Any] | None:
    """The dissection evidence when it ran (an error is shown through its finding only)."""
    block = result.raw.get("dissection")
    return block if block and "error" not in block else None


def _dissection_view(result: AuditResult) -> dict[str, Any] | None:
    """The context units' table (unit, concept, IoUs, logit shares) and their activation-maximization images."""
    block = _dissection_block(result)
    if block is None:
        return None
    units = dissection_rules.context_units(block)
    rows = dissection_rules.rows(block, DISSECTION_ROWS)
    classes = [c for c in block.get("share") or {} if rows and c in rows[0]["share"]]
    table = [
        {
            "unit": r["unit"],
            "concept": r["concept"],
            "iou": f"{r['iou']:.2f}",
            "iou_context": f"{r['iou_context']:.2f}",
            "iou_object": f"{r['iou_object']:.2f}",
            "shares": [f"{r['share'][c]:.1%}" for c in classes],
        }
        for r in rows
    ]
    carried = dissection_rules.carried(block, units)
    pics = (getattr(result, "pictures", None) or {}).get("dissection")
    figure = None
    if pics is not None and len(pics.get("units", [])):
        best = {r["unit"]: r for r in dissection_rules.rows(block)}
        caps = [
            f"unit {u}: {best[u]['concept']} {best[u]['iou']:.2f}" if u in best else f"unit {u}"
            for u in pics["units"]
        ]
        grid = pictures.image_grid(
            pics["images"],
            caps,
            ncols=min(8, len(caps)),
            scale=2 if pics["images"].shape[-1] < 64 else 1,
        )
        figure = _figure(
            grid,
            "activation maximization of the context units",
            f"Images synthesized to excite each listed unit of {block['layer']} (activation maximization).",
        )
    return {
        "layer": block["layer"],
        "units": int(block["units"]),
        "probes": block.get("probes"),
        "quantile": f"{float(block['quantile']):g}",
        "threshold": f"{float(block['iou_threshold']):g}",
        "contexts": ", ".join(block.get("contexts") or []) or None,
        "count": len(units),
        "shown": len(table),
        "classes": classes,
        "carried": [(c, f"{v:.0%}") for c, v in carried.items()],
        "rows": table,
        "figure": figure,
        "exact": float(block.get("completeness_error") or 0.0) < 1e-4,
    }


def _extra_kinds_view(result: AuditResult) -> list[dict[str, Any]]:
    """One section per registered extra kind of evidence in the raw block (audit.evidence.register_kind),
    in raw order: its name, an anchor made of safe characters, and its checks."""
    out: list[dict[str, Any]] = []
    for name in result.raw:
        if name in BUILTIN_KINDS or get_kind(name) is None:
            continue
        checks = [
            {"name": c.name, "verdict": c.verdict, "finding": sentence(c.finding)}
            for c in result.checks
            if c.kind == name
        ]
        out.append({"name": name, "anchor": "kind-" + _SAFE_NAME.sub("_", name), "checks": checks})
    return out


def _ordered(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if c.decisive] + [c for c in checks if not c.decisive]


def _clusters_view(result: AuditResult) -> list[dict[str, Any]] | None:
    """Per method, the cluster means (a figure, when the maps are at hand) and the clusters' rows."""
    clusters = result.raw.get("clusters")
    if not clusters:
        return None
    lay = _layout(result)
    explained = list(result.explained)
    out = []
    for m, items in clusters.items():
        figure = None
        if lay is not None and m in lay[0].maps:
            img = _cluster_means(lay, m, items)
            if img is not None:
                figure = _figure(
                    img, f"{m} cluster means", f"{m}: mean image and mean map per cluster"
                )
        rows = []
        for c in items:
            members = [int(x) for x in c.get("members", [])]
            shown = [str(explained[x]) if 0 <= x < len(explained) else str(x) for x in members[:24]]
            more = f" \u2026 (+{len(members) - 24})" if len(members) > 24 else ""
            rows.append(
                {
                    "class_name": c.get("class_name"),
                    "cluster": c.get("cluster"),
                    "size": c.get("size"),
                    "members": ", ".join(shown) + more,
                }
            )
        out.append({"name": m, "figure": figure, "rows": rows})
    return out


def _config_text(result: AuditResult) -> str:
    """The full config as YAML (JSON when YAML is not at hand)."""
    cfg = plain_numbers(result.config)
    try:
        import yaml

        return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, default_flow_style=False)
    except Exception:  # noqa: BLE001 - JSON is a fine fallback for display
        return json.dumps(cfg, indent=2)


# --------------------------------------------------------------------------- views: the evidence that leads the page
#: Most comparisons charted among the deciding numbers (the rest are in the checks table).
DECIDING_ROWS = 8
#: Example pairs (or synthesized swaps) shown before the explanations.
EXAMPLE_PAIRS = 2


def _family(c: Check) -> str | None:
    """The scale a check's numbers are charted on among the deciding numbers (None: not charted)."""
    n = c.numbers
    if c.name.startswith("context_gap/") and "gap" in n:
        return "context_gap"
    if c.name == "flip_rate" and "flip_rate" in n:
        return "flip_rate"
    if c.name.startswith("synthesized/") and "flip_rate" in n:
        return "synthesized"
    if c.name.startswith("attribution/") and "excess" in n and c.verdict is not None:
        return "attribution"
    if c.name == "competence" and "accuracy" in n:
        return "competence"
    return None


def _deciding_families(result: AuditResult) -> list[str]:
    """The scales of the checks that decided, in the order they decided (the veto's: attribution)."""
    out: list[str] = []
    for c in result.checks:
        fam = (
            "attribution" if c.decisive and c.name == "veto" else _family(c) if c.decisive else None
        )
        if fam is not None and fam not in out:
            out.append(fam)
    return out


def _interval_row(c: Check, fam: str) -> dict[str, Any]:
    """One charted comparison: its estimate, the interval its rule reads and its verdict."""
    n = c.numbers
    if fam == "context_gap":
        label, value, lo, hi = c.name.split("/", 1)[1], n["gap"], n["low"], n["high"]
        what = f"{n['worst_group']} {n['worst_accuracy']:.2f} vs {n['best_group']} {n['best_accuracy']:.2f}"
    elif fam in ("flip_rate", "synthesized"):
        label = "pairs" if fam == "flip_rate" else c.name.split("/", 1)[1]
        value, lo, hi = n["flip_rate"], n.get("holm_low", n["low"]), n["high"]
        what = f"{n.get('flipped', n.get('flips'))} of {n.get('pairs', n.get('objects'))} flip"
    elif fam == "attribution":
        label, value, lo, hi = c.name.split("/", 1)[1], n["excess"], n["low"], n["high"]
        what = f"{n['outside_share']:.0%} of relevance outside, {n['outside_area']:.0%} of area"
    else:
        label, value, lo, hi = "all probes", n["accuracy"], n["low"], n["high"]
        what = f"{n['correct']} of {n['n']} right; chance {n['chance']:.2f}"
    return {
        "label": str(label),
        "value": float(value),
        "low": _finite_or(lo, 0.0),
        "high": _finite_or(hi, 1.0),
        "what": what,
        "verdict": c.verdict,
        "decisive": c.decisive,
    }


def _finite_or(x: Any, default: float) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def _scale(fam: str, checks: Sequence[Check], gate: Mapping[str, Any]) -> dict[str, Any]:
    """Axis, limits, threshold lines and the rule (one sentence) of a family's chart."""
    pct = round(100 * float(gate.get("confidence", 0.95)))
    if fam == "context_gap":
        f, p = float(gate["context_gap"]["fail"]), float(gate["context_gap"]["pass"])
        return {
            "axis": "context gap within the class (best context minus worst)",
            "xlim": (0.0, 1.0),
            "lines": [
                (p, f"tolerated {p:g}: FAIL when the lower end is right of it"),
                (f, f"{f:g}: PASS when the upper end is left of it"),
            ],
            "rule": f"Context gap per class with its interval ({pct}%; lower end Holm-adjusted): FAIL when the "
            f"lower end lies above {p:g}, PASS when the upper end lies below {f:g}.",
        }
    if fam in ("flip_rate", "synthesized"):
        f, p = float(gate["flip_rate"]["fail"]), float(gate["flip_rate"]["pass"])
        what = "pairs" if fam == "flip_rate" else "objects pasted onto other backgrounds"
        return {
            "axis": f"flip rate ({what})",
            "xlim": (0.0, 1.0),
            "lines": [
                (p, f"tolerated {p:g}: FAIL when the lower end is right of it"),
                (f, f"{f:g}: PASS when the upper end is left of it"),
            ],
            "rule": f"Share of {what} whose prediction flips when only the context changes, with its "
            f"{pct}% one-sided bounds: FAIL when the lower one lies above {p:g}, PASS when the upper "
            f"one lies below {f:g}.",
        }
    if fam == "attribution":
        f = float(gate["attribution"]["fail"])
        return {
            "axis": "relevance outside the object beyond its area (-1 to +1)",
            "xlim": (-1.0, 1.0),
            "lines": [(f, f"{f:g}: FAIL when the lower end is right of it")],
            "rule": f"Excess relevance outside the object masks per usable method, with its {pct}% interval: a "
            f"method votes FAIL when the lower end lies above {f:g}; maps never PASS a model.",
        }
    chance = float(next(c.numbers["chance"] for c in checks if c.name == "competence"))
    return {
        "axis": "accuracy on all probes",
        "xlim": (0.0, 1.0),
        "lines": [(chance, f"chance {chance:.2f}: the lower end must be right of it")],
        "rule": f"Overall accuracy with its {pct}% Wilson interval against chance ({chance:.2f}, always "
        f"answering the largest class): a model not clearly above it is never promoted.",
    }


def _interval_chart(rows: Sequence[Mapping[str, Any]], scale: Mapping[str, Any]) -> Image.Image:
    """Each row's estimate (dot) and interval (bar) on one axis, with the thresholds as lines."""
    n = len(rows)
    height = 0.42 * n + 1.1 + 0.17 * len(scale["lines"])
    fig = Figure(figsize=(6.4, height), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)[::-1]
    colour = {"PASS": "#1a7f37", "FAIL": "#cf222e"}
    for yi, r in zip(y, rows, strict=True):
        c = colour.get(str(r["verdict"]), "#8c959f") if r["decisive"] else "#8c959f"
        ax.plot(
            [r["low"], r["high"]], [yi, yi], color=c, linewidth=6, alpha=0.45, solid_capstyle="butt"
        )
        ax.plot([r["value"]], [yi], "o", color=c, markersize=6)
    for (x, text), style in zip(scale["lines"], ("--", ":"), strict=False):
        ax.axvline(x, color="0.2", linestyle=style, linewidth=1.2, label=_mpl_text(text))
    ax.legend(
        loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=7, frameon=False, borderaxespad=0.2
    )
    ax.set_yticks(y)
    ax.set_yticklabels([_mpl_text(r["label"]) for r in rows], fontsize=9)
    lo, hi = scale["xlim"]
    ax.set_xlim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))  # a dot at an end stays whole
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel(_mpl_text(scale["axis"]), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.subplots_adjust(
        left=0.2,
        right=0.97,
        bottom=0.62 / height,
        top=1 - (0.12 + 0.17 * len(scale["lines"])) / height,
    )
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def _deciding_scales(result: AuditResult) -> list[dict[str, Any]]:
    return _deciding_view(result)["scales"]


def _md_examples(result: AuditResult) -> list[list[dict[str, str]]]:
    """The example pairs (or swaps) as text: per example, (note, true class, prediction) per image."""
    ex = _examples_view(result)
    return [] if ex is None else ex["items"]


def _deciding_view(result: AuditResult) -> dict[str, Any]:
    """The deciding numbers: the group accuracies per class (chart), and per deciding scale the
    comparisons with their intervals against the thresholds (chart and rows), failing first."""
    gate = result.config.get("gate") or {}
    groups = _group_rows(result)
    pct = round(100 * GROUP_CONFIDENCE)
    view: dict[str, Any] = {"groups": None, "scales": []}
    if groups:
        view["groups"] = _figure(
            _group_chart(groups),
            "group accuracy chart",
            f"Accuracy per group, one colour per class, with {pct}% Wilson intervals.",
        )
    for fam in _deciding_families(result)[:2]:
        checks = [c for c in result.checks if _family(c) == fam]
        order = {"FAIL": 0, "INCONCLUSIVE": 1, "PASS": 2}
        rows = sorted(
            (_interval_row(c, fam) for c in checks),
            key=lambda r: (not r["decisive"], order.get(str(r["verdict"]), 3), -r["value"]),
        )
        shown = rows[:DECIDING_ROWS]
        scale = _scale(fam, checks, gate)
        fig = _figure(
            _interval_chart(shown, scale),
            f"deciding comparisons: {fam.replace('_', ' ')}",
            scale["rule"],
        )
        view["scales"].append(
            {
                "name": fam,
                "figure": fig,
                "more": len(rows) - len(shown),
                "rows": [
                    {
                        **r,
                        "value": f"{r['value']:.2f}",
                        "low": f"{r['low']:.2f}",
                        "high": f"{r['high']:.2f}",
                    }
                    for r in shown
                ],
            }
        )
    return view


def _examples_view(result: AuditResult) -> dict[str, Any] | None:
    """One or two example pairs with the model's predictions: the same object in the worst and the
    best context of the class the verdict hinges on (flipped pairs first), or, for synthesized
    counterfactuals, objects with their swapped backgrounds; None when there is nothing to show."""
    fams = _deciding_families(result)
    if "synthesized" in fams or (
        _synthesized_examples(result) and "context_gap" not in fams and "flip_rate" not in fams
    ):
        return _swap_examples(result)
    lay = _layout(result)
    if lay is None or lay[1].pairs is None and lay[1].groups is None:
        return None
    ev, ps, rows, _map_pos, _index = lay
    preds = {r: int(p) for r, p in zip(rows, ev.logits.argmax(dim=1).tolist(), strict=True)}
    gap = next((c for c in _ordered_by_gap(result)), None)
    names = list(ps.class_names)
    group_of = (
        (lambda r: ps.group_names[int(ps.groups[r])]) if ps.groups is not None else (lambda r: "")
    )
    wanted = (gap.numbers["worst_group"], gap.numbers["best_group"]) if gap is not None else None
    picks = _example_pairs(ps, preds, group_of, wanted)
    if not picks:
        return None
    flat = [r for pair in picks for r in pair]
    label = [names[int(ps.labels[r])] for r in flat]
    pred = [names[preds[r]] if 0 <= preds[r] < len(names) else str(preds[r]) for r in flat]
    notes = [group_of(r) or f"probe {r}" for r in flat]
    grid = pictures.prediction_grid(ps.images[flat], label, pred, notes, ncols=2 * len(picks))
    same = ps.pairs is not None and all(int(ps.pairs[a]) == int(ps.pairs[b]) for a, b in picks)
    what = (
        "the same object in two contexts"
        if same
        else "a probe of each context (not the same object: no explained pair covers both)"
    )
    cap = f"{len(picks)} example{'s' if len(picks) > 1 else ''}, each {what}: the group, the true class and the model's prediction (green right, red wrong)."
    tiles = [{"note": n, "label": y, "pred": p} for n, y, p in zip(notes, label, pred, strict=True)]
    return {
        "figure": _figure(grid, "example pairs with predictions", cap),
        "kind": "pairs",
        "same": same,
        "items": [tiles[2 * i : 2 * i + 2] for i in range(len(picks))],
    }


def _ordered_by_gap(result: AuditResult) -> list[Check]:
    """Context-gap checks, the deciding failing ones first, then by the size of the gap."""
    checks = [c for c in result.checks if _family(c) == "context_gap"]
    return sorted(
        checks, key=lambda c: (not c.decisive, c.verdict != "FAIL", -float(c.numbers["gap"]))
    )


def _example_pairs(
    ps, preds: Mapping[int, int], group_of, wanted: tuple[str, str] | None
) -> list[tuple[int, int]]:
    """Up to :data:`EXAMPLE_PAIRS` explained (row, row) pairs: the same pair id in the two
    ``wanted`` groups (or any two groups), flipped predictions first; else one row of each group."""
    by_pair: dict[int, list[int]] = {}
    if ps.pairs is not None:
        for r in sorted(preds):
            by_pair.setdefault(int(ps.pairs[r]), []).append(r)
    found = []
    for members in by_pair.values():
        if wanted is not None:
            a = next((r for r in members if group_of(r) == wanted[0]), None)
            b = next((r for r in members if group_of(r) == wanted[1]), None)
        else:
            a, b = (members + [None, None])[:2]
        if a is not None and b is not None:
            found.append((preds[a] == preds[b], a, b))
    found.sort(key=lambda t: (t[0], t[1]))
    if found:
        return [(a, b) for _, a, b in found[:EXAMPLE_PAIRS]]
    if wanted is None:
        return []
    a = next((r for r in sorted(preds) if group_of(r) == wanted[0]), None)
    b = next((r for r in sorted(preds) if group_of(r) == wanted[1]), None)
    return [(a, b)] if a is not None and b is not None else []


def _swap_examples(result: AuditResult) -> dict[str, Any] | None:
    """Synthesized swaps (original, Mixed-Same, Mixed-Rand) with the predictions, flipped first."""
    picks = _synthesized_examples(result)[:EXAMPLE_PAIRS]
    if not picks:
        return None
    syn, ps = result.raw["synthesized"], result.probe_set
    names = list(ps.class_names)
    rows = [int(syn["rows"][i]) for i in picks]
    same = counterfactual.synthesize(ps, rows, [int(syn["same_background"][i]) for i in picks])
    rand = counterfactual.synthesize(ps, rows, [int(syn["rand_background"][i]) for i in picks])
    tiles = torch.stack(
        [x for j in range(len(rows)) for x in (ps.images[rows[j]], same[j], rand[j])]
    )

    def name(k: Any) -> str:
        k = int(k)
        return names[k] if 0 <= k < len(names) else str(k)

    labels = [name(syn["labels"][i]) for i in picks for _ in range(3)]
    preds = [name(syn[k][i]) for i in picks for k in ("original", "same", "rand")]
    notes = [n for _ in picks for n in ("original", "Mixed-Same", "Mixed-Rand")]
    grid = pictures.prediction_grid(tiles, labels, preds, notes, ncols=3 * len(picks))
    cap = (
        "Each object on its own probe, pasted onto a background of its class (Mixed-Same) and of another class "
        "(Mixed-Rand), with the model's prediction (green right, red wrong); flipped objects first."
    )
    tiles = [
        {"note": n, "label": y, "pred": p} for n, y, p in zip(notes, labels, preds, strict=True)
    ]
    return {
        "figure": _figure(grid, "example swaps with predictions", cap),
        "kind": "swaps",
        "same": True,
        "items": [tiles[3 * i : 3 * i + 3] for i in range(len(picks))],
    }


def _explanations_view(result: AuditResult) -> dict[str, Any] | None:
    """The overlays with their colour scale and what the maps can and cannot show."""
    overlays = _overlays_view(result)
    if overlays is None:
        return None
    maps = result.evidence.maps
    signed = sorted({bool((m < 0).any()) for m in maps.values() if m.numel()})
    scales = [
        _figure(
            pictures.colour_scale(s),
            f"colour scale ({'signed' if s else 'unsigned'} maps)",
            "Signed maps (bwr): blue against the class, red for it, white none."
            if s
            else "Unsigned maps (inferno): dark none, bright the most relevant pixels.",
        )
        for s in signed
    ]
    _all, used = _methods_used(result)
    against = [
        c.against for c in result.checks if c.decisive and c.against and c.kind == "behaviour"
    ]
    return {**overlays, "scales": scales, "used": used, "against": [sentence(a) for a in against]}
