"""One error base: every exception class a user can see derives from :class:`audit.errors.AuditError`,
and :func:`audit.errors.first_line` is the one "first line of an error"."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import pytest

import audit
import audit.callbacks
from audit.errors import EXIT_ERROR, AuditError, first_line, report, user_line

#: Exception classes that are not user errors, by name, with the reason. Private classes
#: (a leading underscore: internal control flow such as ``_Reached``) and warnings are
#: skipped by rule.
NOT_AUDIT_ERRORS = {
    "JobInterrupted": "a BaseException, so that no `except Exception` on the way swallows a signal",
}


def modules_under(*packages: str) -> list[str]:
    """Every module of ``packages`` (recursively), ``__main__`` modules left out (they run on import)."""
    names: list[str] = []
    for name in packages:
        pkg = importlib.import_module(name)
        names.append(name)
        names += [
            m.name
            for m in pkgutil.walk_packages(pkg.__path__, f"{name}.")
            if m.name.rsplit(".", 1)[-1] != "__main__"
        ]
    return names


def foreign_errors(module_names: list[str]) -> list[str]:
    """``module.Class`` of each public exception class defined in these modules that does not
    derive from :class:`AuditError` (warnings and :data:`NOT_AUDIT_ERRORS` excepted)."""
    bad = []
    for name in module_names:
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or cls_name.startswith("_") or cls_name in NOT_AUDIT_ERRORS:
                continue
            if issubclass(cls, BaseException) and not issubclass(cls, (AuditError, Warning)):
                bad.append(f"{name}.{cls_name}")
    return bad


def test_every_user_visible_exception_class_derives_from_audit_error():
    modules = modules_under("audit", "audit.callbacks")
    assert (
        len(modules) > 50
    )  # the walk reaches the whole tree (audit.callbacks ships from callbacks/)
    assert any(m.startswith("audit.callbacks.") for m in modules)
    assert foreign_errors(modules) == []


def test_the_walk_finds_an_exception_class_without_the_base(tmp_path, monkeypatch):
    """The check above can fail: a module with a stray ``ValueError`` subclass is named."""
    pkg = tmp_path / "stray_pkg"
    (pkg / "inner").mkdir(parents=True)
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "inner" / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "inner" / "mod.py").write_text(
        "from audit.errors import AuditError\n"
        "class StrayError(ValueError):\n    pass\n"
        "class GoodError(AuditError, ValueError):\n    pass\n"
        "class _Internal(Exception):\n    pass\n"
        "class Careful(UserWarning):\n    pass\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        modules = modules_under("stray_pkg")
        assert "stray_pkg.inner.mod" in modules
        assert foreign_errors(modules) == ["stray_pkg.inner.mod.StrayError"]
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "stray_pkg"]:
            del sys.modules[name]


def test_the_project_errors_keep_the_standard_bases_their_callers_catch():
    from audit.config import AuditConfigError, BrokenModelError
    from audit.gate.loading import ModelLoadError
    from audit.gate.registry import GateError, GateWriteError, VersionChangedError
    from audit.probes import ProbeSetError

    for cls in (
        AuditConfigError,
        BrokenModelError,
        GateError,
        VersionChangedError,
        ModelLoadError,
        ProbeSetError,
    ):
        assert issubclass(cls, AuditError) and issubclass(cls, ValueError), cls
    assert issubclass(GateWriteError, AuditError) and issubclass(GateWriteError, RuntimeError)


@pytest.mark.parametrize(
    ("message", "limit", "expected"),
    [
        ("one line", None, "one line"),
        ("\n  first\nsecond\nthird", None, "first"),
        ("", None, ""),
        ("   \n ", None, ""),
        ("x" * 400 + "\nmore", 300, "x" * 300),
        ("short\nmore", 300, "short"),
    ],
)
def test_first_line(message, limit, expected):
    assert first_line(RuntimeError(message), limit) == expected


def test_report_prints_the_one_line_and_returns_exit_2(capsys):
    code = report("model-audit plan", AuditError("gate.confidence must be a number; got 'x'"))
    assert code == EXIT_ERROR == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "model-audit plan: error: gate.confidence must be a number; got 'x'\n"


def test_errors_module_imports_no_other_audit_module():
    source = Path(audit.__file__).with_name("errors.py").read_text(encoding="utf-8")
    imports = [ln for ln in source.splitlines() if ln.startswith(("import ", "from "))]
    assert imports and not [ln for ln in imports if "audit" in ln], imports


def test_user_line_puts_the_topic_before_a_project_error_and_the_type_before_any_other():
    from audit.config import AuditConfigError
    from audit.probes import ProbeSetError

    assert (
        user_line(ProbeSetError("row 7: file 'a.png' cannot be read"))
        == "bad probe set: row 7: file 'a.png' cannot be read"
    )
    assert user_line(AuditConfigError("engine.steps must be an integer >= 1; got 0\n(detail)")) == (
        "engine.steps must be an integer >= 1; got 0"
    )
    assert (
        user_line(RuntimeError("CUDA out of memory\nTried to allocate"))
        == "RuntimeError: CUDA out of memory"
    )


def test_plan_refuses_a_bad_design_through_the_one_error_base(capsys):
    """``model-audit plan``'s own refusals are AuditErrors (still ValueErrors), worded by report()."""
    from audit.gate.plan import Design, PlanError, main

    with pytest.raises(PlanError) as err:
        Design(power=1.5).check()
    assert isinstance(err.value, ValueError) and isinstance(err.value, AuditError)
    assert main(["--power", "1.5"]) == EXIT_ERROR
    assert (
        capsys.readouterr().err
        == "model-audit plan: error: power must lie strictly between 0.5 and 1; got 1.5\n"
    )
