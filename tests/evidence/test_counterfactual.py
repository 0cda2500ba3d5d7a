"""Synthesized counterfactuals for masks-only probe sets (audit.evidence.counterfactual, audit.rules.counterfactual)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from _toy_models import ColourReader, GreyReader, colour_probe_set

from audit.evidence import counterfactual
from audit.pipeline import (
    AuditConfigError,
    check_config,
    decide,
    default_config,
    merge_config,
    recheck,
    run_audit,
)
from audit.probes import ProbeSet
from audit.report.write import render_html, write_reports
from audit.rules import counterfactual as counterfactual_rule

GATE = default_config()["gate"]
NO_METHODS = {"engine": {"methods": []}}


def masks_only(probes: ProbeSet) -> ProbeSet:
    """The same images and masks, without groups and pairs (the common segmentation case)."""
    return ProbeSet(
        images=probes.images,
        labels=probes.labels,
        class_names=probes.class_names,
        masks=probes.masks,
    )


@pytest.fixture(scope="module")
def squares() -> ProbeSet:
    # red and blue squares, each half on dark and half on light grey: contexts balanced
    # across classes, where Xiao's Mixed-Same minus Mixed-Rand accuracy gap sees nothing
    return masks_only(colour_probe_set(n_per_group=24, size=32))


@pytest.fixture(scope="module")
def audits(squares):
    return {m.__name__: run_audit(m(), squares, NO_METHODS) for m in (ColourReader, GreyReader)}


# ------------------------------------------------------------------ run_audit: the gate can PASS and FAIL
def test_a_clean_model_passes_with_masks_only(audits):
    r = audits["ColourReader"]
    assert r.verdict == "PASS"
    decisive = [c for c in r.checks if c.decisive and c.kind == "counterfactual"]
    assert {c.name for c in decisive} == {"synthesized/red", "synthesized/blue"}
    red = next(c for c in decisive if c.name == "synthesized/red")
    assert red.finding.startswith(
        "pasting each red onto other probes' backgrounds flips the prediction for 0 of 48"
    )
    assert "rules out a flip rate of 0.15" in red.finding
    assert "Mixed-Same 1.00 (48/48)" in red.support and "paste control" in red.support
    assert r.metrics["synthesized/red/flip_rate"] == 0.0
    doc = json.loads(r.to_json())
    assert recheck(doc) == "PASS"
    strict = {**doc["config"]["gate"], "flip_rate": {"fail": 0.02, "pass": 0.01}}
    assert recheck(doc, strict) == "INCONCLUSIVE"  # 48 objects cannot rule out a flip rate of 0.02


def test_a_background_reader_fails_with_masks_only_although_contexts_are_balanced(audits):
    r = audits["GreyReader"]
    assert r.verdict == "FAIL"
    checks = {c.name: c for c in r.checks}
    for cls in ("red", "blue"):
        c = checks[f"synthesized/{cls}"]
        assert (
            c.verdict == "FAIL"
            and c.decisive
            and "is clearly above the tolerated 0.05" in c.finding
        )
        assert c.numbers["flip_rate"] > 0.3
        # Xiao's background gap cannot see it: both kinds of background come from the same mix
        assert abs(c.numbers["bg_gap"]) < 0.2
    assert recheck(json.loads(r.to_json())) == "FAIL"


def test_findings_say_what_was_synthesized_and_what_it_cannot_see(audits):
    checks = {c.name: c for c in audits["ColourReader"].checks}
    assert checks["synthesized"].verdict is None
    assert checks["synthesized"].finding.startswith("96 objects of 96 probes were each pasted")
    blind = checks["synthesized/blind_spot"]
    assert (
        blind.verdict is None
        and not blind.decisive
        and "a cue inside the object mask" in blind.finding
    )


def test_only_masks_only_probe_sets_get_counterfactuals(squares):
    full = colour_probe_set(n_per_group=4, size=32)
    assert "synthesized" not in run_audit(ColourReader(), full, NO_METHODS).raw
    off = run_audit(ColourReader(), squares, {"engine": {"methods": [], "synthesized_probes": 0}})
    assert "synthesized" not in off.raw and off.verdict == "INCONCLUSIVE"


def test_the_cap_limits_the_objects_and_is_counted(squares):
    r = run_audit(ColourReader(), squares, {"engine": {"methods": [], "synthesized_probes": 10}})
    syn = r.raw["synthesized"]
    assert len(syn["rows"]) == 10 and syn["skipped"]["over_cap"] == 86
    assert sorted(syn["labels"]).count(0) == 5  # spread over the classes
    assert (
        "86 over the cap engine.synthesized_probes=10"
        in next(c for c in r.checks if c.name == "synthesized").finding
    )


@pytest.mark.parametrize(
    "over, needle",
    [
        (
            {"engine": {"synthesized_probes": -1}},
            "engine.synthesized_probes must be an integer >= 0",
        ),
        (
            {"engine": {"synthesized_max_object": 0.0}},
            "engine.synthesized_max_object=0.0 is out of range",
        ),
    ],
)
def test_bad_settings_are_refused(over, needle):
    with pytest.raises(AuditConfigError, match=re.escape(needle)):
        check_config(merge_config(over))


# ------------------------------------------------------------------ the swaps
def test_backgrounds_come_from_the_right_classes_and_never_from_the_object_itself(squares):
    plan = counterfactual.plan_swaps(squares.labels, squares.masks, 0.5, 256, seed=0)
    labels = squares.labels.tolist()
    assert len(plan.rows) == len(squares)
    for r, s, x in zip(plan.rows, plan.same, plan.rand, strict=True):
        assert s != r and labels[s] == labels[r] and labels[x] != labels[r]


def test_empty_and_too_large_objects_are_skipped_and_counted(squares):
    masks = squares.masks.clone()
    masks[0] = False  # empty: a pure background, never pasted
    masks[1, :, :24, :] = True  # 75% of the image: neither pasted nor used as a background
    probes = ProbeSet(
        images=squares.images, labels=squares.labels, class_names=squares.class_names, masks=masks
    )
    plan = counterfactual.plan_swaps(probes.labels, probes.masks, 0.5, 256, seed=0)
    assert plan.skipped == {"empty": 1, "too_large": 1, "no_background": 0, "over_cap": 0}
    assert 0 not in plan.rows and 1 not in plan.rows and 1 not in plan.same + plan.rand
    r = run_audit(ColourReader(), probes, NO_METHODS)
    text = next(c for c in r.checks if c.name == "synthesized").finding
    assert "1 with an empty mask; 1 whose mask covers more than 50% of the image" in text
    assert r.verdict == "PASS"


def test_without_objects_to_paste_nothing_is_synthesized(squares):
    masks = squares.masks.clone()
    masks[squares.labels == 1, :, :24, :] = (
        True  # every blue mask too large: no blue object, no blue background
    )
    probes = ProbeSet(
        images=squares.images, labels=squares.labels, class_names=squares.class_names, masks=masks
    )
    r = run_audit(ColourReader(), probes, NO_METHODS)
    assert r.verdict == "INCONCLUSIVE" and r.raw["synthesized"]["rows"] == []
    text = next(c for c in r.checks if c.name == "synthesized").finding
    assert (
        text.startswith("no object could be pasted")
        and "48 whose mask covers more than 50%" in text
    )
    assert "48 without another probe of their class, or of another class" in text


def test_the_swaps_are_deterministic_and_leave_the_global_rng_alone(squares):
    model = GreyReader()  # building a module draws its initial weights from the global RNG
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = run_audit(model, squares, NO_METHODS).raw["synthesized"]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not drawn from
    torch.manual_seed(2)
    b = run_audit(GreyReader(), squares, NO_METHODS).raw["synthesized"]
    assert a == b
    c = run_audit(GreyReader(), squares, {"engine": {"methods": [], "seed": 5}}).raw["synthesized"]
    assert c["same_background"] != a["same_background"]
    img = counterfactual.synthesize(squares, a["rows"][:8], a["rand_background"][:8])
    assert torch.equal(
        img, counterfactual.synthesize(squares, a["rows"][:8], a["rand_background"][:8])
    )


def test_the_object_keeps_its_pixels_and_position(squares):
    rows, bgs = [3, 60], [70, 10]
    img = counterfactual.synthesize(squares, rows, bgs)
    for j, r in enumerate(rows):
        m = squares.masks[r, 0]
        assert torch.equal(img[j][:, m], squares.images[r][:, m])


# ------------------------------------------------------------------ hole filling
def test_hole_filling_leaves_no_trace_of_the_old_object():
    colour = torch.tensor([0.3, 0.6, 0.4]).view(3, 1)
    img = colour.view(3, 1, 1).expand(3, 48, 48).clone()
    hole = torch.zeros(1, 48, 48, dtype=torch.bool)
    hole[:, 10:34, 12:30] = True
    img[:, hole[0]] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1)  # a red object
    img[:, 9, 12:30] = 0.6  # an anti-aliased rim just outside the mask
    filled = counterfactual.fill_holes(img[None], hole[None])[0]
    # the hole is the surrounding colour; the known rim row counts as the image's texture,
    # so the fill carries a little grain (see the grain test below), never the red
    assert (filled[:, hole[0]] - colour).abs().mean() < 0.01 and (
        filled[:, hole[0]] - colour
    ).abs().max() < 0.06
    assert (filled - colour.view(3, 1, 1)).abs().max() < 0.06  # and the rim went with it
    # a smooth gradient is continued smoothly into the hole, far from the old red
    ramp = torch.linspace(0.2, 0.8, 48).view(1, 1, 48).expand(3, 48, 48).clone()
    ramp[:, hole[0]] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1)
    out = counterfactual.fill_holes(ramp[None], hole[None])[0]
    truth = torch.linspace(0.2, 0.8, 48).view(1, 1, 48).expand(3, 48, 48)
    assert (out[:, hole[0]] - truth[:, hole[0]]).abs().max() < 0.06
    far = torch.ones(48, 48, dtype=torch.bool)
    far[7:37, 9:33] = False
    assert torch.equal(out[:, far], ramp[:, far])  # pixels away from the hole are untouched


def test_the_fill_carries_the_backgrounds_grain():
    """A smooth patch on a grainy background is a shape of its own: the fill gets the image's grain."""
    g = torch.Generator().manual_seed(3)
    img = (0.5 + 0.05 * torch.randn(3, 48, 48, generator=g)).clamp(0, 1)
    hole = torch.zeros(1, 48, 48, dtype=torch.bool)
    hole[:, 10:34, 12:30] = True
    img[:, hole[0]] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1)
    out = counterfactual.fill_holes(img[None], hole[None])
    inside = out[0][:, hole[0]]
    outside = img[:, ~hole[0]]
    assert abs(float(inside.mean()) - 0.5) < 0.01
    assert (
        0.6 < float(inside.std()) / float(outside.std()) < 1.4
    )  # grainy like the rest, not smooth
    assert torch.equal(out, counterfactual.fill_holes(img[None], hole[None]))  # deterministic


# ------------------------------------------------------------------ the rule on known counts
def syn_block(flips: dict[str, tuple[int, int]], classes=("wolf", "husky"), counts=None) -> dict:
    """Evidence with ``k`` of ``n`` flipped objects per class (every object right on its original)."""
    labels, orig, same, rand = [], [], [], []
    for ci, cls in enumerate(classes):
        k, n = flips.get(cls, (0, 0))
        for i in range(n):
            labels.append(ci)
            orig.append(ci)
            same.append(ci)
            rand.append(1 - ci if i < k else ci)
    rows = list(range(len(labels)))
    return {
        "classes": list(classes),
        "class_counts": counts or [100] * len(classes),
        "max_object_share": 0.5,
        "limit": 256,
        "seed": 0,
        "skipped": {"empty": 2, "too_large": 0, "no_background": 0, "over_cap": 0},
        "rows": rows,
        "labels": labels,
        "same_background": rows,
        "rand_background": rows,
        "original": orig,
        "same": same,
        "rand": rand,
    }


def test_no_flips_in_every_class_passes():
    verdict, checks = decide(
        {"behaviour": {}, "synthesized": syn_block({"wolf": (0, 48), "husky": (0, 48)})}, GATE
    )
    assert verdict == "PASS"
    wolf = next(c for c in checks if c.name == "synthesized/wolf")
    assert wolf.decisive and wolf.verdict == "PASS" and "0 of 48 objects" in wolf.finding
    assert wolf.numbers["high"] == pytest.approx(
        0.0534, abs=1e-4
    )  # one-sided 95% Wilson bound of 0/48
    assert "2 with an empty mask" in next(c for c in checks if c.name == "synthesized").finding


def test_many_flips_in_one_class_fails_with_holm():
    verdict, checks = decide(
        {"behaviour": {}, "synthesized": syn_block({"wolf": (30, 48), "husky": (0, 48)})}, GATE
    )
    assert verdict == "FAIL"
    wolf = next(c for c in checks if c.name == "synthesized/wolf")
    assert wolf.verdict == "FAIL" and wolf.decisive
    assert (
        "flips the prediction for 30 of 48 objects" in wolf.finding
        and "Holm over 2 classes" in wolf.finding
    )
    assert wolf.numbers["holm_level"] == pytest.approx(0.025) and wolf.numbers["holm_low"] > 0.05
    assert next(c for c in checks if c.name == "synthesized/husky").verdict == "PASS"


def test_few_objects_are_inconclusive_and_say_how_many_would_decide():
    verdict, checks = decide(
        {"behaviour": {}, "synthesized": syn_block({"wolf": (0, 8), "husky": (0, 8)})}, GATE
    )
    assert verdict == "INCONCLUSIVE"
    wolf = next(c for c in checks if c.name == "synthesized/wolf")
    assert (
        wolf.decisive
        and "about 16 objects of wolf would decide a flip rate of 0.00" in wolf.finding
    )
    assert (
        decide(
            {"behaviour": {}, "synthesized": syn_block({"wolf": (2, 16), "husky": (0, 48)})}, GATE
        )[0]
        == "INCONCLUSIVE"
    )


def test_a_class_with_nothing_pasted_cannot_pass():
    verdict, checks = decide({"behaviour": {}, "synthesized": syn_block({"wolf": (0, 48)})}, GATE)
    assert verdict == "INCONCLUSIVE"
    missing = next(c for c in checks if c.name == "synthesized/missing")
    assert missing.decisive and "no object of class 'husky' could be pasted" in missing.finding
    assert (
        decide({"behaviour": {}, "synthesized": syn_block({"wolf": (30, 48)})}, GATE)[0] == "FAIL"
    )


def test_synthesized_outranks_attribution_and_without_objects_attribution_decides():
    on_context = {
        "gradcam": {
            "deletion_auc": [0.2] * 40,
            "random_deletion_auc": [0.5] * 40,
            "outside_share": [0.97] * 40,
            "outside_area": [0.7] * 40,
            "sanity_similarity": 0.1,
        }
    }
    raw = {
        "behaviour": {},
        "methods": on_context,
        "synthesized": syn_block({"wolf": (30, 48), "husky": (0, 48)}),
    }
    assert decide(raw, GATE)[0] == "FAIL"
    raw["synthesized"] = syn_block({"wolf": (0, 48), "husky": (0, 48)})
    assert (
        decide(raw, GATE)[0] == "INCONCLUSIVE"
    )  # the attribution veto: relevance clearly off the objects
    raw["synthesized"] = syn_block({})
    verdict, checks = decide(raw, GATE)
    assert verdict == "FAIL" and next(c for c in checks if c.name == "attribution/gradcam").decisive
    assert counterfactual_rule.judge(None, GATE, {}, []).verdict is None


# ------------------------------------------------------------------ the report
def test_the_report_shows_example_swaps(audits, tmp_path):
    r = audits["GreyReader"]
    page = render_html(r, {"name": "m"})
    assert '<section id="synthesized">' in page and 'href="#examples"' in page
    assert 'alt="synthesized counterfactual examples"' in page
    # the swaps the verdict hinges on lead the page, before the explanations and the statistics
    assert page.index('alt="example swaps with predictions"') < page.index(
        '<details id="statistics">'
    )
    assert "original | Mixed-Same | Mixed-Rand" in page
    paths = write_reports(r, tmp_path / "rep")
    doc = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert recheck(doc) == "FAIL" and doc["evidence"]["synthesized"]["rows"]
    # a report whose objects name a class it does not have is refused, not judged under a made-up name
    doc["evidence"]["synthesized"]["labels"][0] = len(doc["evidence"]["synthesized"]["classes"])
    with pytest.raises(
        ValueError, match=r"object 0 has label 2, which is not an index into its 2 classes"
    ):
        recheck(doc)
    assert '<section id="synthesized">' not in render_html(
        run_audit(ColourReader(), colour_probe_set(4), NO_METHODS)
    )
