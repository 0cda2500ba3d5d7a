"""Ten classes named like numbers, three contexts each, paired and not: decided, logged, rendered.

Probe folders users bring often have classes "0".."9" (MNIST- or CIFAR-index-like) and three or
more contexts per class. The toy probes and models are in ``_toy_models``: a hue square per class
on a dark, mid or light grey; ``DigitReader`` reads the hue only (clean), ``DigitShortcut`` misreads
class "3" on the light grey. Per class every pair of contexts is a comparison: 10 x 3 = 30.
"""

from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path

import pytest
import torch
from _jobkit import ALLOW, ENGINE, NAME, cli, registry, state
from _toy_models import DIGIT_CLASSES, DigitReader, DigitShortcut, digit_probe_set
from mlflow.tracking import MlflowClient

from audit.engine.stats import comparisons_for, min_probes_for
from audit.pipeline import VERDICTS, recheck, run_audit
from audit.probes import ProbeSet
from audit.report import write as rpt
from audit.rules.behaviour import comparisons

TESTS = Path(__file__).resolve().parents[1]
PAIRS = 24  # per class (paired) or per group (unpaired); see test_24_per_class_is_enough
CONTEXTS = ("dark", "mid", "light")
BEHAVIOUR_ONLY = {"engine": {"methods": []}}
# numeric-looking names that must stay distinct strings: no int("01") == int("1"), no float("1e1") == 10
ODD = ("0", "00", "01", "1", "1.0", "10", "1e1", "-1", "007", "nan")
ODD_CONTEXTS = {"0": 0.2, "1": 0.5, "2": 0.8}  # numeric contexts too; "2" is the light grey
cell = rpt._code_cell  # a group as the Markdown table shows it


@pytest.fixture(scope="module")
def paired() -> ProbeSet:
    return digit_probe_set(PAIRS)


def _context_checks(result) -> dict:
    return {c.name: c for c in result.checks if c.name.startswith("context_gap/")}


# ---------------------------------------------------------------- the probe set and the count
def test_the_digit_probes_hold_ten_classes_three_contexts_and_shared_pairs(paired):
    assert paired.class_names == list(DIGIT_CLASSES) == [str(i) for i in range(10)]
    assert paired.group_names == [f"{c}|{x}" for c in DIGIT_CLASSES for x in CONTEXTS]
    assert len(paired) == 10 * 3 * PAIRS
    paired.check_names()  # every name is a valid MLflow key
    # every pair id is one object in each of the 3 contexts of its class
    for p in torch.unique(paired.pairs).tolist()[:: PAIRS // 2]:
        rows = (paired.pairs == p).nonzero()[:, 0]
        assert len(rows) == 3 and len({paired.group_of(int(r)) for r in rows}) == 3
        assert len(set(paired.labels[rows].tolist())) == 1
        assert torch.equal(paired.masks[rows[0]], paired.masks[rows[2]])
    unpaired = digit_probe_set(PAIRS, paired=False)
    assert unpaired.pairs is None and unpaired.group_names == paired.group_names


def test_24_per_class_is_enough_and_thirty_comparisons_are_counted():
    # the toy models are exact: accuracy 1 and no discordant pair where they read the object
    assert min_probes_for(0.0, best_accuracy=1.0, discordant=0.0, comparisons=30) <= PAIRS
    assert min_probes_for(0.0, best_accuracy=1.0, comparisons=30) <= PAIRS
    assert comparisons_for([3] * 10) == 10 * 3 == 30


# ---------------------------------------------------------------- the decision, in memory
@pytest.mark.parametrize("design", ["paired", "unpaired"])
def test_clean_passes_and_shortcut_fails_on_class_3_light(design, paired):
    probes = paired if design == "paired" else digit_probe_set(PAIRS, paired=False)
    clean = run_audit(DigitReader(), probes, BEHAVIOUR_ONLY)
    assert clean.verdict == "PASS", clean.findings
    beh = clean.raw["behaviour"]
    comps = comparisons(beh)
    assert len(comps) == 30 and {c.cls for c in comps} == set(DIGIT_CLASSES)
    assert all(c.paired is (design == "paired") for c in comps)
    checks = _context_checks(clean)
    assert sorted(checks) == sorted(f"context_gap/{c}" for c in DIGIT_CLASSES)
    assert all(c.verdict == "PASS" and c.numbers["class_comparisons"] == 3 for c in checks.values())
    assert "the largest of 3 context pairs" in checks["context_gap/0"].finding
    assert recheck(json.loads(clean.to_json())) == "PASS"

    bad = run_audit(DigitShortcut(), probes, BEHAVIOUR_ONLY)
    assert bad.verdict == "FAIL", bad.findings
    checks = _context_checks(bad)
    fail = checks.pop("context_gap/3")
    assert fail.verdict == "FAIL" and fail.decisive
    assert fail.numbers["worst_group"] == "3|light" and fail.numbers["worst_accuracy"] == 0.0
    assert fail.numbers["comparisons"] == 30 and fail.numbers["paired"] is (design == "paired")
    assert fail.finding.startswith("3|light: accuracy 0.00 (0/24) vs 1.00 (24/24) for 3|")
    assert "Holm over 30 comparisons" in fail.finding
    assert all(c.verdict == "PASS" for c in checks.values())  # the other nine classes are fine
    # the reason is class 3 alone: the nine classes that pass are not reasons for the FAIL
    assert [c.name for c in bad.checks if c.decisive] == ["context_gap/3"]
    assert bad.findings[0] == fail.finding
    assert recheck(json.loads(bad.to_json())) == "FAIL"


def test_masks_only_over_ten_classes_runs():
    probes = digit_probe_set(4, groups=False)
    assert probes.groups is None and probes.pairs is None and probes.masks is not None
    cfg = {
        "engine": {
            "methods": ["saliency"],
            "attribution_probes": 20,
            "sanity_probes": 2,
            "steps": 4,
        }
    }
    result = run_audit(DigitReader(), probes, cfg)
    assert result.verdict in VERDICTS
    assert recheck(json.loads(result.to_json())) == result.verdict
    out = rpt.render_html(result)  # overlays per class: ten of them
    assert all(f"class {c}" in out for c in DIGIT_CLASSES)


# ---------------------------------------------------------------- the rendering
def test_the_report_shows_thirty_groups_legibly(paired):
    result = run_audit(
        DigitShortcut(),
        paired,
        {
            "engine": {
                "methods": ["gradcam"],
                "attribution_probes": 30,
                "sanity_probes": 2,
                "steps": 4,
            }
        },
    )
    rows = rpt._group_rows(result)
    assert [r[0] for r in rows] == paired.group_names
    chart = rpt._group_chart(rows)  # looked at by hand once: 30 labelled bars, one colour per class
    w, h = chart.size
    assert h / 30 >= 25 and w >= 400  # at least 25 pixels per bar and its label
    grey = torch.tensor(list(chart.convert("L").tobytes())).view(h, w)
    assert (grey[:, :3] == 255).all() and (grey[:, -3:] == 255).all()  # no label runs off the sides
    page = rpt.render_html(result)
    for g in paired.group_names:
        assert f"<tr><td>{html.escape(g)}</td>" in page  # one table row per group
        assert f"gradcam: group {html.escape(g)}" in page  # one overlay figure per group
    md = rpt.render_markdown(result)
    table = [ln for ln in md.splitlines() if ln.startswith("| `")]
    assert len(table) == 30 and table[9] == f"| {cell('3|dark')} | 1.00 | 0.86 to 1.00 | 24 |"
    assert f"| {cell('3|light')} | 0.00 |" in md


# ---------------------------------------------------------------- the job, end to end
@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A registry with toy v1 = DigitShortcut (v2 = DigitReader: ``clean_v2``) and the folder of odd names."""
    folder = tmp_path_factory.mktemp("many-classes")
    registry(folder / "store", models=(DigitShortcut,))
    digit_probe_set(PAIRS, class_names=ODD, contexts=ODD_CONTEXTS).save(folder / "odd")
    return folder


@pytest.fixture(scope="module")
def digits(template):
    """The folder of the ten digit classes (``digit_probe_set``), beside the template registry."""
    if not (template / "digits").is_dir():
        digit_probe_set(PAIRS).save(template / "digits")
    return "digits"


@pytest.fixture(scope="module")
def clean_v2(template):
    """Adds toy v2 = DigitReader to the template registry (registering a model takes seconds)."""
    registry(template / "store", models=(DigitReader,))
    return 2


@pytest.fixture
def job(template, tmp_path, monkeypatch):
    """A fresh copy of the registry; returns a function running ``model-audit`` on a version and folder."""
    shutil.copytree(template / "store", tmp_path / "store")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.syspath_prepend(str(TESTS))
    client = MlflowClient(uri, registry_uri=uri)

    def run(version: int, probes: str) -> tuple:
        args = [
            f"model.uri=models:/{NAME}/{version}",
            f"tracking.uri={uri}",
            "probes=folder",
            f"probes.path={template / probes}",
            ALLOW,
            *ENGINE,
        ]
        res = cli(args, tmp_path)
        tags = state(client)["versions"][str(version)]
        run = client.get_run(tags["audit.run_id"])
        folder = tmp_path / "reports" / f"{NAME}-{version}"
        files = {name: (folder / name).read_text(encoding="utf-8") for name in rpt.REPORT_FILES}
        return res, tags, run, files

    return run


def _names_are_strings(report: dict, classes, contexts) -> None:
    groups = [f"{c}|{x}" for c in classes for x in contexts]
    assert report["probes"]["classes"] == list(classes)
    assert report["probes"]["groups"] == groups
    assert list(report["evidence"]["behaviour"]["groups"]) == groups
    assert list(report["evidence"]["behaviour"]["label_counts"]) == list(classes)
    gaps = [c["name"] for c in report["checks"] if c["name"].startswith("context_gap/")]
    assert gaps == [f"context_gap/{c}" for c in classes]
    metrics = report["metrics"]
    for c in classes:
        assert {f"context_gap/{c}", f"context_gap/{c}/low", f"context_gap/{c}/high"} <= set(metrics)
    assert {f"acc/{g}" for g in groups} <= set(metrics)


def _logged(run, classes, contexts) -> None:
    """MLflow keys: ``acc/<class>_<context>`` and ``context_gap/<class>``, the names as written."""
    keys = set(run.data.metrics)
    for c in classes:
        assert {f"context_gap/{c}", f"context_gap/{c}/low", f"context_gap/{c}/high"} <= keys
        assert {f"acc/{c}_{x}" for x in contexts} <= keys
    assert len([k for k in keys if k.startswith("acc/")]) == len(classes) * len(contexts)
    assert len([k for k in keys if k.startswith("context_gap/") and k.count("/") == 1]) == len(
        classes
    )


@pytest.mark.slow
def test_job_passes_the_clean_model_on_ten_digit_classes(clean_v2, digits, job):
    res, tags, run, files = job(clean_v2, digits)
    assert res.code == 0 and f"{NAME} v2: PASS" in res.out, res.out + res.err
    assert tags["audit.verdict"] == "PASS" and run.data.tags["audit.verdict"] == "PASS"
    report = json.loads(files["report.json"])
    assert report["verdict"] == "PASS" and recheck(report) == "PASS"
    _names_are_strings(report, DIGIT_CLASSES, CONTEXTS)
    gap0 = next(c for c in report["checks"] if c["name"] == "context_gap/0")
    assert gap0["numbers"]["comparisons"] == 30 and gap0["numbers"]["class_comparisons"] == 3
    _logged(run, DIGIT_CLASSES, CONTEXTS)
    assert run.data.metrics["context_gap/0"] == 0.0 and run.data.metrics["acc/0_dark"] == 1.0
    page = files["report.html"]
    assert "<td><code>context_gap/0</code></td>" in page and "<td>0|dark</td>" in page
    assert (
        f"| {cell('0|dark')} | 1.00 |" in files["report.md"]
        and f"| {cell('9|light')} |" in files["report.md"]
    )


@pytest.mark.slow
def test_job_fails_the_shortcut_on_class_3_in_the_light_context(digits, job):
    res, tags, run, files = job(1, digits)
    assert res.code == 1 and f"{NAME} v1: FAIL" in res.out, res.out + res.err
    assert tags["audit.verdict"] == "FAIL" and run.data.metrics["verdict_pass"] == 0.0
    report = json.loads(files["report.json"])
    assert recheck(report) == "FAIL"
    _names_are_strings(report, DIGIT_CLASSES, CONTEXTS)
    decisive = [c for c in report["checks"] if c["decisive"] and c["verdict"] == "FAIL"]
    assert [c["name"] for c in decisive] == ["context_gap/3"]
    finding = decisive[0]["finding"]
    assert (
        finding.startswith("3|light: accuracy 0.00 (0/24)")
        and "Holm over 30 comparisons" in finding
    )
    assert report["findings"][0] == finding
    _logged(run, DIGIT_CLASSES, CONTEXTS)
    assert run.data.metrics["acc/3_light"] == 0.0 and run.data.metrics["context_gap/3"] == 1.0
    assert run.data.metrics["context_gap"] == 1.0
    assert "3|light: accuracy 0.00" in html.unescape(files["report.html"])
    assert "3|light: accuracy 0.00 (0/24)" in files["report.md"]


def test_numeric_looking_class_names_stay_distinct_strings(template):
    loaded = ProbeSet.load(template / "odd")
    assert loaded.class_names == list(ODD)
    with open(template / "odd" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # a row labelled "01" is output 2, "1" output 3, "1.0" output 4, "10" output 5, "1e1" output 6
    assert [int(loaded.labels[i]) for i in range(len(rows))] == [
        ODD.index(r["label"]) for r in rows
    ]
    assert {r["label"] for r in rows} == set(ODD)
    assert loaded.group_names == [f"{c}|{x}" for c in ODD for x in ODD_CONTEXTS]
    assert loaded.digest == digit_probe_set(PAIRS, class_names=ODD, contexts=ODD_CONTEXTS).digest
    # the classes.txt lines are kept verbatim (no "01" -> 1, no "1e1" -> 10.0)
    assert (template / "odd" / "classes.txt").read_text().splitlines() == list(ODD)


def test_job_on_numeric_looking_class_and_context_names(job):
    res, tags, run, files = job(1, "odd")
    assert res.code == 1 and f"{NAME} v1: FAIL" in res.out, res.out + res.err
    assert tags["audit.verdict"] == "FAIL" and run.data.tags["audit.verdict"] == "FAIL"
    report = json.loads(files["report.json"])
    assert recheck(report) == "FAIL"
    _names_are_strings(report, ODD, ODD_CONTEXTS)
    # output 3 is class "1"; the shortcut misreads it on the light grey, context "2"
    decisive = [c for c in report["checks"] if c["decisive"] and c["verdict"] == "FAIL"]
    assert [c["name"] for c in decisive] == ["context_gap/1"]
    assert decisive[0]["numbers"]["worst_group"] == "1|2" and decisive[0]["finding"].startswith(
        "1|2: accuracy 0.00"
    )
    passed = {
        c["name"]
        for c in report["checks"]
        if c["name"].startswith("context_gap/") and c["verdict"] == "PASS"
    }
    assert passed == {
        f"context_gap/{c}" for c in ODD if c != "1"
    }  # "01", "1.0", "10" are other classes
    _logged(run, ODD, ODD_CONTEXTS)
    m = run.data.metrics
    assert m["context_gap/1"] == 1.0 and m["acc/1_2"] == 0.0
    assert (
        m["context_gap/01"]
        == m["context_gap/10"]
        == m["context_gap/1.0"]
        == m["context_gap/1e1"]
        == 0.0
    )
    assert m["acc/01_2"] == m["acc/10_2"] == m["acc/nan_2"] == 1.0
    assert (
        f"| {cell('1|2')} | 0.00 |" in files["report.md"]
        and f"| {cell('01|2')} | 1.00 |" in files["report.md"]
    )
    assert "<td>1.0|2</td>" in files["report.html"] and "<td>1e1|0</td>" in files["report.html"]
    why = [
        ln
        for ln in files["report.md"].split("**Concept evidence**")[0].splitlines()
        if ln.startswith("- ")
    ]
    assert len(why) == 1 and "1|2: accuracy 0.00 (0/24)" in why[0]  # one reason: class "1", not ten
