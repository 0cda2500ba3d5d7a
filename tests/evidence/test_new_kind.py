"""Issue 30: a new kind of evidence is one evidence module that registers itself (one line), and
its rule; run_audit measures it, decide lists its checks (corroborating), the reports show it.

The toy kind is written into a temporary module and imported from there, so nothing in
the repository names it: the test fails if run_audit, decide or the report do not find
registered kinds on their own.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _toy_models import ColourReader, colour_probe_set

from audit.evidence import (
    BUILTIN_KINDS,
    EvidenceKind,
    KindError,
    get_kind,
    register_kind,
    unregister_kind,
)
from audit.pipeline import AuditResult, recheck, run_audit
from audit.probes import ProbeSet
from audit.report.write import report_dict, write_reports

# no attribution methods: the audit is behaviour only, well under a second
CONFIG = {"engine": {"methods": [], "sanity_probes": 0}}
MADE = {"made_at": "2026-01-01T00:00:00+00:00", "tool_version": "test"}

TOY = '''
import torch

from audit.evidence import EvidenceKind, register_kind
from audit.rules import Check


def measure(model, probes, engine):
    """The number of probes the model gives its first class; None without groups."""
    if probes.groups is None:
        return None
    with torch.no_grad():
        pred = model(probes.images).argmax(1)
    return {"n": len(probes), "first_class": int((pred == 0).sum())}


def judge(raw, gate):
    share = raw["first_class"] / raw["n"]
    return [Check("toy/first_class", "toy", None, f"toy: {share:.3f} of the probes get the first class",
                  {"share": share})]


register_kind(EvidenceKind("toy", measure, judge))
'''


@pytest.fixture
def toy_kind(tmp_path: Path) -> Iterator[ModuleType]:
    """The toy kind, imported from a module in tmp_path (importing it registers it); unregistered after."""
    folder = tmp_path / "toy_src"
    folder.mkdir()
    (folder / "toy_kind_evidence.py").write_text(textwrap.dedent(TOY))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("toy_kind_evidence")
    finally:
        unregister_kind("toy")
        sys.modules.pop("toy_kind_evidence", None)
        sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def probes():
    return colour_probe_set(n_per_group=48, size=16)


def _timeless(doc: Any) -> Any:
    """``doc`` without its times (every ``seconds`` key, at any depth)."""
    if isinstance(doc, dict):
        return {k: _timeless(v) for k, v in doc.items() if k != "seconds"}
    if isinstance(doc, list):
        return [_timeless(v) for v in doc]
    return doc


def _audit(probes) -> AuditResult:
    result = run_audit(ColourReader(), probes, CONFIG)
    assert result is not None
    return result


def test_a_registered_kind_reaches_report_json_and_html(toy_kind, probes, tmp_path):
    result = _audit(probes)
    assert result.raw["toy"] == {"n": len(probes), "first_class": len(probes) // 2}
    doc = report_dict(result, {"name": "toy-model"}, made=MADE)
    assert doc["evidence"]["toy"] == {"n": 192, "first_class": 96}
    toy_checks = [c for c in doc["checks"] if c["kind"] == "toy"]
    assert toy_checks == [
        {
            "name": "toy/first_class",
            "kind": "toy",
            "verdict": None,
            "decisive": False,
            "finding": "toy: 0.500 of the probes get the first class",
            "numbers": {"share": 0.5},
            "support": "",
            "against": "",
        }
    ]

    paths = write_reports(result, tmp_path / "report", model={"name": "toy-model"})
    written = json.loads(paths["json"].read_text())
    assert written["evidence"]["toy"] == doc["evidence"]["toy"]
    assert [c for c in written["checks"] if c["kind"] == "toy"] == toy_checks
    html = paths["html"].read_text()
    section = html.split('<section id="kind-toy">', 1)[1].split("</section>", 1)[0]
    assert "Evidence: toy" in section and "toy: 0.500 of the probes get the first class" in section
    assert "<code>toy/first_class</code>" in section

    # corroborating only: the verdict, and recheck's, are those of the built-in evidence
    assert result.verdict == "PASS" and recheck(written) == "PASS"


def test_a_kind_changes_nothing_of_the_other_evidence(probes, tmp_path):
    plain = report_dict(_audit(probes), {"name": "m"}, made=MADE)
    sys.path.insert(0, str(tmp_path))
    (tmp_path / "toy_again.py").write_text(textwrap.dedent(TOY))
    try:
        importlib.import_module("toy_again")
        with_toy = report_dict(_audit(probes), {"name": "m"}, made=MADE)
    finally:
        unregister_kind("toy")
        sys.modules.pop("toy_again", None)
        sys.path.remove(str(tmp_path))
    assert with_toy["evidence"].pop("toy")
    with_toy["checks"] = [c for c in with_toy["checks"] if c["kind"] != "toy"]
    with_toy["findings"] = [f for f in with_toy["findings"] if not f.startswith("toy: ")]
    assert json.dumps(_timeless(with_toy), sort_keys=True) == json.dumps(
        _timeless(plain), sort_keys=True
    )


def test_a_kind_that_does_not_apply_stores_nothing(toy_kind, probes):
    no_groups = ProbeSet(
        images=probes.images,
        labels=probes.labels,
        class_names=probes.class_names,
        masks=probes.masks,
    )
    result = _audit(no_groups)
    assert "toy" not in result.raw and not any(c.kind == "toy" for c in result.checks)


def test_recheck_without_the_kind_says_so(toy_kind, probes):
    doc = report_dict(_audit(probes), {"name": "m"}, made=MADE)
    unregister_kind("toy")
    with pytest.warns(
        UserWarning, match="'toy' is of a kind not registered here, so it is judged without it"
    ):
        assert recheck(doc) == doc["verdict"] == "PASS"


def test_register_kind_refuses_builtin_and_taken_names(toy_kind):
    def nothing(model, probes, engine):
        return None

    for name in BUILTIN_KINDS:
        with pytest.raises(KindError, match=f"{name!r} is built in"):
            register_kind(EvidenceKind(name, nothing))
    with pytest.raises(KindError, match="'toy' is already registered: unregister_kind"):
        register_kind(EvidenceKind("toy", nothing))
    assert get_kind("toy") is not None and get_kind("toy").judge is not None


def test_a_judge_must_return_checks_of_its_own_kind(probes):
    from audit.rules import Check

    def measure(model, probes, engine):
        return {"n": len(probes)}

    def judge(raw, gate):
        return [Check("mislabelled", "behaviour", None, "a check of another kind")]

    register_kind(EvidenceKind("mislabelled", measure, judge))
    try:
        with pytest.raises(
            TypeError,
            match="the judge of evidence kind 'mislabelled' returned .*: return audit.rules.Check objects of kind 'mislabelled'",
        ):
            _audit(probes)
    finally:
        unregister_kind("mislabelled")
