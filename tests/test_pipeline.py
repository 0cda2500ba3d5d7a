"""The gate's judgement (audit.pipeline): decide() on plain numbers, run_audit() on real models."""

from __future__ import annotations

import json

import pytest
import torch
from _toy_models import ColourReader, ContextReader, colour_probe_set

from audit import AuditResult, run_audit
from audit.datasets import snow_wolf
from audit.pipeline import (
    AuditConfigError,
    check_config,
    decide,
    default_config,
    merge_config,
    recheck,
)
from audit.probes import ProbeSet

GATE = default_config()["gate"]


def groups(**counts: tuple[int, int]) -> dict:
    return {"groups": {k.replace("_", "|"): {"correct": c, "n": n} for k, (c, n) in counts.items()}}


def faithful_method(n: int = 40, outside: float = 0.5, area: float = 0.7, groups_of=None) -> dict:
    """Per-probe numbers of a method whose LeRF curve clearly beats its MoRF curve and that passes sanity."""
    e = {
        "deletion_auc": [0.2 + 0.01 * (i % 5) for i in range(n)],
        "lerf_auc": [0.5 + 0.01 * (i % 3) for i in range(n)],
        "outside_share": [outside + 0.01 * (i % 4) for i in range(n)],
        "outside_area": [area] * n,
        "sanity_similarity": 0.1,
    }
    if groups_of is not None:
        e["groups"] = [groups_of[i % len(groups_of)] for i in range(n)]
    return e


# ------------------------------------------------------------------ decide(): behaviour
def test_large_gap_fails_with_a_sentence_holding_the_numbers():
    raw = {
        "behaviour": groups(
            wolf_snow=(250, 256),
            wolf_grass=(80, 256),
            husky_snow=(250, 256),
            husky_grass=(251, 256),
        )
    }
    verdict, checks = decide(raw, GATE)
    assert verdict == "FAIL"
    wolf = next(c for c in checks if c.name == "context_gap/wolf")
    assert wolf.verdict == "FAIL" and wolf.decisive
    assert "wolf|grass: accuracy 0.31 (80/256) vs 0.98 (250/256) for wolf|snow" in wolf.finding
    assert wolf.numbers["low"] > GATE["context_gap"]["pass"]
    husky = next(c for c in checks if c.name == "context_gap/husky")
    assert husky.verdict == "PASS"


def test_small_gaps_pass_and_a_harder_class_is_not_a_spurious_feature():
    # husky is much harder than wolf, but equally hard in both contexts: no context gap
    raw = {
        "behaviour": groups(
            wolf_snow=(250, 256),
            wolf_grass=(248, 256),
            husky_snow=(180, 256),
            husky_grass=(182, 256),
        )
    }
    verdict, checks = decide(raw, GATE)
    assert verdict == "PASS"
    assert all(c.verdict == "PASS" for c in checks if c.name.startswith("context_gap/"))


def test_too_few_probes_is_inconclusive_and_says_how_many_would_decide():
    raw = {
        "behaviour": groups(
            wolf_snow=(15, 16), wolf_grass=(13, 16), husky_snow=(15, 16), husky_grass=(15, 16)
        )
    }
    verdict, checks = decide(raw, GATE)
    assert verdict == "INCONCLUSIVE"
    wolf = next(c for c in checks if c.name == "context_gap/wolf")
    assert "probes per group would decide" in wolf.finding
    # the same proportions with 16x the probes decide
    raw = {
        "behaviour": groups(
            wolf_snow=(240, 256),
            wolf_grass=(208, 256),
            husky_snow=(240, 256),
            husky_grass=(240, 256),
        )
    }
    assert decide(raw, GATE)[0] == "FAIL"


def test_flip_rate_decides_only_without_groups():
    pairs = {"pairs": {"flipped": 90, "total": 200}}
    verdict, checks = decide({"behaviour": pairs}, GATE)
    assert verdict == "FAIL" and next(c for c in checks if c.name == "flip_rate").decisive
    raw = {"behaviour": {**groups(wolf_snow=(250, 256), wolf_grass=(249, 256)), **pairs}}
    verdict, checks = decide(raw, GATE)
    assert verdict == "PASS"  # behaviour decides; the flips corroborate
    flip = next(c for c in checks if c.name == "flip_rate")
    assert flip.verdict is None and "90 of 200" in flip.finding
    assert decide({"behaviour": {"pairs": {"flipped": 1, "total": 400}}}, GATE)[0] == "PASS"


# ------------------------------------------------------------------ decide(): attribution and filters
def test_masks_only_attribution_decides_with_faithful_sane_methods():
    on_context = {
        "methods": {
            "gradcam": faithful_method(outside=0.97, area=0.7),
            "lrp": faithful_method(outside=0.95, area=0.7),
        }
    }
    verdict, checks = decide({"behaviour": {"n": 40, "correct": 30}, **on_context}, GATE)
    assert verdict == "FAIL"
    att = next(c for c in checks if c.name == "attribution/gradcam")
    assert (
        att.decisive
        and "of Grad-CAM relevance lies outside the object masks, where 70% of the image's area lies"
        in att.finding
    )
    # relevance on the object never PASSes on its own: it does not show the context is ignored
    on_object = {"methods": {"gradcam": faithful_method(outside=0.2, area=0.7)}}
    verdict, checks = decide({"behaviour": {}, **on_object}, GATE)
    assert verdict == "INCONCLUSIVE"
    assert next(c for c in checks if c.name == "attribution/gradcam").verdict == "INCONCLUSIVE"


def test_unfaithful_or_insane_methods_are_not_evidence():
    unfaithful = faithful_method(outside=0.97)
    unfaithful["deletion_auc"] = list(unfaithful["lerf_auc"])  # the ranking does not matter: chance
    insane = faithful_method(outside=0.97)
    insane["sanity_similarity"] = 0.9
    verdict, checks = decide(
        {"behaviour": {}, "methods": {"saliency": unfaithful, "lrp": insane}}, GATE
    )
    assert verdict == "INCONCLUSIVE"
    text = " ".join(c.finding for c in checks)
    assert (
        "saliency is not used as evidence: removing its most relevant pixels first does not clearly hurt"
        in text
    )
    assert (
        "lrp is not used as evidence: its maps barely change when every layer is randomized (similarity 0.90"
        in text
    )
    assert next(c for c in checks if c.name == "methods").numbers["used"] == []


def test_attribution_veto_turns_a_behavioural_pass_into_inconclusive():
    raw = {
        "behaviour": groups(wolf_snow=(250, 256), wolf_grass=(249, 256)),
        "methods": {
            "gradcam": faithful_method(outside=0.97, area=0.7),
            "lrp": faithful_method(outside=0.96, area=0.7),
        },
    }
    assert decide(raw, GATE)[0] == "INCONCLUSIVE"
    no_veto = {**GATE, "attribution": {**GATE["attribution"], "veto": False}}
    assert decide(raw, no_veto)[0] == "PASS"


def test_per_group_attribution_supports_the_behaviour_finding():
    raw = {
        "behaviour": groups(wolf_snow=(250, 256), wolf_grass=(80, 256)),
        "methods": {
            "gradcam": faithful_method(
                outside=0.82, area=0.7, groups_of=["wolf|snow", "wolf|grass"]
            )
        },
    }
    _, checks = decide(raw, GATE)
    wolf = next(c for c in checks if c.name == "context_gap/wolf")
    assert wolf.verdict == "FAIL"
    # corroborating numbers go below the decisive sentence, never into it
    assert "relevance" not in wolf.finding and not wolf.against
    assert (
        "on wolf|grass, Grad-CAM puts" in wolf.support
        and "the context covers 70% of these images" in wolf.support
    )


def test_attribution_that_points_the_other_way_never_corroborates():
    # the maps put less relevance outside the object than the context's area (62% < 70%): beside a
    # FAIL of behaviour that is no corroboration; it is shown as pointing the other way
    raw = {
        "behaviour": groups(wolf_snow=(250, 256), wolf_grass=(80, 256)),
        "methods": {
            "gradcam": faithful_method(
                outside=0.62, area=0.7, groups_of=["wolf|snow", "wolf|grass"]
            )
        },
    }
    _, checks = decide(raw, GATE)
    wolf = next(c for c in checks if c.name == "context_gap/wolf")
    assert wolf.verdict == "FAIL" and wolf.support == ""
    assert (
        wolf.against.startswith("on wolf|grass, Grad-CAM puts 6") and "covers 70%" in wolf.against
    )
    assert json.loads(json.dumps(wolf.to_dict()))["against"] == wolf.against
    # beside a PASS the same on-object maps agree
    raw["behaviour"] = groups(wolf_snow=(250, 256), wolf_grass=(249, 256))
    _, checks = decide(raw, GATE)
    wolf = next(c for c in checks if c.name == "context_gap/wolf")
    assert wolf.verdict == "PASS" and "Grad-CAM puts" in wolf.support and wolf.against == ""


@pytest.mark.parametrize(
    "verdict, leans, where",
    [
        ("FAIL", True, "support"),
        ("FAIL", False, "against"),
        ("PASS", False, "support"),
        ("PASS", True, "against"),
        ("FAIL", None, None),
        ("INCONCLUSIVE", True, None),
        (None, False, None),
    ],
)
def test_other_evidence_never_corroborates_the_other_way(verdict, leans, where):
    from audit.rules.base import other_evidence

    assert other_evidence(verdict, leans, "line") == ({} if where is None else {where: "line"})
    assert other_evidence(verdict, leans, "") == {}


def test_labels_only_is_inconclusive_and_does_not_guess():
    verdict, checks = decide({"behaviour": {"n": 10, "correct": 10}, "methods": {}}, GATE)
    assert verdict == "INCONCLUSIVE"
    assert "does not guess" in checks[0].finding and checks[0].decisive


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "over, needle",
    [
        ({"gate": {"context_gap": {"fail": 1.5}}}, "gate.context_gap.fail=1.5 is out of range"),
        ({"gate": {"confidence": 1.0}}, "gate.confidence=1.0 is out of range"),
        ({"gate": {"context_gap": {"pass": 0.2}}}, "gate.context_gap.pass (0.2) must be below"),
        (
            {"gate": {"sanity": {"max_similarity": "high"}}},
            "gate.sanity.max_similarity must be a number",
        ),
        ({"engine": {"methods": ["gradcam", "nosuch"]}}, "unknown method 'nosuch'"),
        (
            {"engine": {"method_options": {"lrp": {}}, "methods": ["gradcam"]}},
            "options for ['lrp']",
        ),
        ({"gate": {"context_gap": {"fial": 0.2}}}, "unknown config key 'gate.context_gap.fial'"),
        ({"engine": {"steps": 0}}, "engine.steps must be an integer >= 1"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(over, needle):
    with pytest.raises(AuditConfigError) as err:
        check_config(merge_config(over))
    assert needle in str(err.value)


# ------------------------------------------------------------------ run_audit on real models
FAST = {"engine": {"attribution_probes": 32, "sanity_probes": 4, "steps": 8}}


@pytest.fixture(scope="module")
def probes() -> ProbeSet:
    return snow_wolf.probe_set(n_per_group=48, size=32, seed=3)


def test_a_model_reading_the_background_fails(probes):
    model = ContextReader()
    acc = (model(probes.images).argmax(1) == probes.labels).float()
    assert (
        acc[probes.groups == 0].mean() > 0.9 and acc[probes.groups == 1].mean() < 0.1
    )  # it really is one
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    result = run_audit(model, probes, FAST)
    assert isinstance(result, AuditResult)
    assert result.verdict == "FAIL"
    assert result.findings[0].startswith(("wolf|grass: accuracy 0.0", "husky|snow: accuracy 0.0"))
    assert result.metrics["context_gap"] > 0.8 and result.metrics["context_gap/wolf/low"] > 0.05
    assert result.metrics["flip_rate"] > 0.8
    # the model is untouched: weights, training flag, hooks, gradients
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_a_model_blind_to_the_context_passes_and_the_json_rechecks():
    # ColourReader reads the object (the square's colour), never the grey context. Constant
    # (always husky) is blind to the context too, but a model no better than a constant guess
    # is never promoted: INCONCLUSIVE (tests/rules/test_broken_models.py)
    probes = colour_probe_set(n_per_group=48, size=32)
    result = run_audit(ColourReader(), probes, FAST)
    assert result.verdict == "PASS"
    doc = json.loads(result.to_json())
    assert doc["schema"] == "model-audit/report" and doc["schema_version"] == 1
    assert doc["probes"]["digest"] == probes.digest
    assert recheck(doc) == "PASS"
    strict = {**doc["config"]["gate"], "context_gap": {"fail": 0.02, "pass": 0.01}}
    assert recheck(doc, strict) == "INCONCLUSIVE"  # 48 probes per group cannot rule out a 0.02 gap


def test_groups_only_masks_only_and_labels_only(probes):
    strip = dict(images=probes.images, labels=probes.labels, class_names=probes.class_names)
    groups_only = ProbeSet(**strip, groups=probes.groups, group_names=probes.group_names)
    assert run_audit(ContextReader(), groups_only, FAST).verdict == "FAIL"
    masks_only = ProbeSet(**strip, masks=probes.masks)
    r = run_audit(ContextReader(), masks_only, FAST)
    assert r.verdict in ("FAIL", "INCONCLUSIVE") and any(c.kind == "attribution" for c in r.checks)
    labels_only = ProbeSet(**strip)
    r = run_audit(ContextReader(), labels_only, FAST)
    assert r.verdict == "INCONCLUSIVE"
    assert r.raw["clusters"] and any(c.kind == "clusters" for c in r.checks)


def test_classes_that_do_not_match_the_outputs_are_refused(probes):
    three = ProbeSet(
        images=probes.images, labels=probes.labels, class_names=["wolf", "husky", "fox"]
    )
    with pytest.raises(AuditConfigError, match="the model has 2 outputs"):
        run_audit(ContextReader(), three, FAST)
