"""The sanity filter of the gate (audit.pipeline): constant maps, one randomization, recheck."""

from __future__ import annotations

import json

import pytest
import torch
from test_sanity import DeadWhenRandomized, flat_red

import audit.methods
from audit import run_audit
from audit.pipeline import (
    AuditConfigError,
    _sanity_raw,
    check_config,
    decide,
    default_config,
    merge_config,
    recheck,
)
from audit.probes import ProbeSet

GATE = default_config()["gate"]


def probe_set(n: int = 8, flat: tuple[int, ...] = (), size: int = 12) -> ProbeSet:
    """Random images, all of class 0; the rows in ``flat`` have a constant red channel."""
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = flat_red(x, list(flat))
    return ProbeSet(images=x, labels=torch.zeros(n, dtype=torch.long), class_names=["red", "other"])


def engine(**over) -> dict:
    return check_config(
        merge_config({"engine": {"methods": ["gradcam"], "sanity_probes": 8, **over}})
    )["engine"]


def faithful(n: int = 8) -> dict:
    """Per-probe MoRF and LeRF numbers that pass the faithfulness filter."""
    return {
        "deletion_auc": [0.2 + 0.01 * (i % 3) for i in range(n)],
        "lerf_auc": [0.5 + 0.01 * (i % 2) for i in range(n)],
    }


def sanity_of(model, probes, **over) -> dict:
    methods = {"gradcam": faithful()}
    _sanity_raw(methods, model, probes, engine(**over))
    return methods["gradcam"]


def check(raw_methods: dict, name: str = "sanity/gradcam"):
    _, checks = decide({"behaviour": {}, "methods": raw_methods}, GATE)
    used = next(c for c in checks if c.name == "methods").numbers["used"]
    return next(c for c in checks if c.name == name), used


# ------------------------------------------------------------------ constant maps
@pytest.mark.parametrize("mode", ["full", "cascade"])
def test_an_all_zero_randomized_gradcam_passes(mode):
    e = sanity_of(DeadWhenRandomized().eval(), probe_set(), sanity_mode=mode)
    assert e["sanity_constant_randomized"] == [True] * 8 and e["sanity_constant"] == [False] * 8
    assert e["sanity_spearman"] == [0.0] * 8 and e["sanity_similarity"] == 0.0
    c, used = check({"gradcam": e})
    assert used == ["gradcam"] and c.numbers["used"] and c.numbers["similarity"] == 0.0
    assert c.finding.startswith("gradcam passes the randomization sanity check: similarity 0.00")
    assert (
        "the randomized model's map is constant on 8 of 8 probes: it changed completely there"
        in c.finding
    )
    assert "barely change" not in c.finding and "undefined" not in c.finding


def test_constant_original_maps_are_named_and_left_out():
    e = sanity_of(DeadWhenRandomized().eval(), probe_set(flat=(1, 4, 6)))
    assert e["sanity_constant"] == [i in (1, 4, 6) for i in range(8)]
    assert [e["sanity_spearman"][i] != e["sanity_spearman"][i] for i in (1, 4, 6)] == [
        True
    ] * 3  # NaN
    c, used = check({"gradcam": e})
    assert used == ["gradcam"] and c.numbers["constant_original"] == 3 and c.numbers["probes"] == 8
    assert (
        "Grad-CAM gives a constant map on 3 of 8 probes: it says nothing there, and they are left out"
        in c.finding
    )
    assert "constant on 5 of 5 probes" in c.finding


def test_left_out_probes_are_evidence_neither_way():
    def numbers(values, const):
        return {
            **faithful(len(values)),
            "sanity_mode": "full",
            "sanity_spearman": values,
            "sanity_spearman_abs": values,
            "sanity_constant": const,
            "sanity_constant_randomized": [False] * len(values),
        }

    # low similarities on constant probes do not rescue a method that fails on the rest
    c, used = check({"gradcam": numbers([None, None, 0.9, 0.9], [True, True, False, False])})
    assert used == [] and c.numbers["similarity"] == pytest.approx(0.9)
    assert c.finding == (
        "gradcam is not used as evidence: its maps barely change when every layer is randomized (similarity 0.90, "
        "must stay below 0.50); Grad-CAM gives a constant map on 2 of 4 probes: it says nothing there, and they "
        "are left out"
    )
    # stray numbers stored for constant probes are ignored as well
    c, used = check({"gradcam": numbers([0.95, 0.95, 0.1, 0.1], [True, True, False, False])})
    assert used == ["gradcam"] and c.numbers["similarity"] == pytest.approx(0.1)


def test_a_method_constant_on_every_probe_is_not_evidence():
    e = sanity_of(DeadWhenRandomized().eval(), probe_set(flat=tuple(range(8))))
    assert e["sanity_constant"] == [True] * 8 and e["sanity_similarity"] != e["sanity_similarity"]
    c, used = check({"gradcam": e})
    assert used == [] and not c.numbers["used"] and "similarity" not in c.numbers
    assert c.finding == (
        "gradcam is not used as evidence: Grad-CAM gives a constant map on all 8 sanity probes: it says "
        "nothing there, so there is nothing a randomized model could change"
    )


def test_an_old_report_with_an_undefined_similarity_is_not_evidence():
    c, used = check({"gradcam": {**faithful(), "sanity_similarity": None}})
    assert used == [] and "its sanity similarity is undefined" in c.finding
    c, used = check({"gradcam": {**faithful(), "sanity_similarity": 0.2}})
    assert used == ["gradcam"] and c.numbers["similarity"] == 0.2


# ------------------------------------------------------------------ one randomization by default
@pytest.mark.parametrize(("mode", "calls"), [("full", 2), ("cascade", 3)])
def test_the_default_runs_one_randomization(monkeypatch, mode, calls):
    assert default_config()["engine"]["sanity_mode"] == "full"
    seen: list[str] = []
    real = audit.methods.explain

    def counting(method, *args, **kwargs):
        seen.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(audit.methods, "explain", counting)
    over = {} if mode == "full" else {"sanity_mode": "cascade"}
    e = sanity_of(DeadWhenRandomized().eval(), probe_set(), **over)
    assert (
        seen == ["gradcam"] * calls
    )  # the original, then one (full) or one per layer (fc, features.0)
    assert e["sanity_mode"] == mode
    assert ("sanity_cascade" in e) == (mode == "cascade")
    if mode == "cascade":
        assert list(e["sanity_cascade"]) == ["fc", "features.0"]


def test_bad_sanity_mode_is_a_config_error():
    with pytest.raises(
        AuditConfigError, match=r"engine.sanity_mode must be full .* or cascade .*; got 'fast'"
    ):
        check_config(merge_config({"engine": {"sanity_mode": "fast"}}))


# ------------------------------------------------------------------ recheck from report JSON
def test_recheck_reads_the_stored_sanity_numbers():
    probes = probe_set(n=16, flat=(2, 9))
    cfg = {
        "engine": {
            "methods": ["gradcam"],
            "attribution_probes": 16,
            "sanity_probes": 16,
            "steps": 4,
        }
    }
    result = run_audit(DeadWhenRandomized().eval(), probes, cfg)
    report = json.loads(
        json.dumps(result.to_dict(), allow_nan=False)
    )  # NaN -> null, as in report.json
    assert recheck(report) == result.verdict
    stored = report["evidence"]["methods"]["gradcam"]
    assert stored["sanity_spearman"][2] is None and stored["sanity_constant"][2] is True
    _, again = decide(report["evidence"], report["config"]["gate"])
    before = next(c for c in result.checks if c.name == "sanity/gradcam")
    after = next(c for c in again if c.name == "sanity/gradcam")
    assert after.finding == before.finding and after.numbers == before.numbers
    assert (
        "Grad-CAM gives a constant map on 2 of 16 probes: it says nothing there" in before.finding
    )
    assert result.metrics["gradcam/sanity_similarity"] == 0.0
    # a stricter gate re-derived from the same numbers
    strict = {**report["config"]["gate"], "sanity": {"max_similarity": -0.5}}
    _, checks = decide(report["evidence"], strict)
    assert not next(c for c in checks if c.name == "sanity/gradcam").numbers["used"]
