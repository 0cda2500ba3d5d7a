"""TCAV with the probe groups' contexts as concepts (audit/evidence/concepts.py, audit/rules/concepts.py).

Known answers come from a hand-built model on images whose context is a colour: the red
context raises the red channel, the blue context the blue one, and the green channel is
the same in every image. Class ``a``'s logit is the mean of the red channel, class
``b``'s the mean of the green one: ``a`` rises along "red" and falls along "blue", ``b``
ignores both (its derivative along any CAV is zero, since no CAV has a green part).
"""

from __future__ import annotations

import json
import math
import random
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from audit.config import AuditConfigError, check_config, merge_config
from audit.engine.model import AttributionError, hook_count
from audit.evidence.concepts import (
    concept_rows,
    directional_derivatives,
    fit_cav,
    has_concepts,
    summary,
    tcav,
    tcav_raw,
    tcav_test,
)
from audit.pipeline import recheck, run_audit
from audit.probes import ProbeSet
from audit.rules import concepts, decide

GATE = {"confidence": 0.95}


def colour_probes(
    n_per_group: int = 24,
    size: int = 16,
    seed: int = 0,
    contexts=("red", "blue"),
    classes=("a", "b"),
) -> ProbeSet:
    """Groups '<class>|<context>'; the context sets a channel's level, the class changes nothing."""
    g = torch.Generator().manual_seed(seed)
    images, labels, groups = [], [], []
    for k, _cls in enumerate(classes):
        for j, ctx in enumerate(contexts):
            x = 0.2 + 0.2 * torch.rand(n_per_group, 3, size, size, generator=g)
            if ctx == "red":
                x[:, 0] += 0.4
            elif ctx == "blue":
                x[:, 2] += 0.4
            x[:, 1] = 0.5  # green: the same everywhere
            images.append(x)
            labels += [k] * n_per_group
            groups += [k * len(contexts) + j] * n_per_group
    names = [f"{c}|{x}" for c in classes for x in contexts]
    return ProbeSet(
        images=torch.cat(images),
        labels=torch.tensor(labels),
        class_names=list(classes),
        groups=torch.tensor(groups),
        group_names=names,
    )


class ColourNet(nn.Module):
    """features (identity 1x1 conv, BatchNorm at identity, ReLU), GAP, fc: a = mean red, b = mean green."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 3, 1, bias=False)
        bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(3)[:, :, None, None])
            bn.running_var.fill_(1.0 - bn.eps)  # (x - 0) / sqrt(var + eps) = x
        self.features = nn.Sequential(conv, bn, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _row(rows, cls, concept):
    return next(r for r in rows if r["class"] == cls and r["concept"] == concept)


@pytest.fixture(scope="module")
def known():
    model = ColourNet().eval()
    probes = colour_probes()
    return model, probes, tcav(model, probes, examples=12, random_concepts=20, seed=0)


def test_known_answer_concept_found_and_ignored(known):
    _, _, res = known
    assert res.layer == "features"  # the last channels-first map (the actmax callback's rule)
    rows = summary(res.to_dict(), 0.95)
    assert len(rows) == 4 and all(r["tests"] == 4 for r in rows)
    red, blue = _row(rows, "a", "red"), _row(rows, "a", "blue")
    # a's logit is the red mean: every CAV of red against random probes raises it, every blue one lowers it
    assert red["score"] == 1.0 and red["significant"] and red["direction"] == "rises"
    assert blue["score"] == 0.0 and blue["significant"] and blue["direction"] == "falls"
    assert 0.0 < red["random"] < 1.0  # random-vs-random CAVs point either way
    assert red["shift"] > 10 * red["random_shift_sd"] > 0 and blue["shift"] < 0
    # b's logit is the green mean, which no image varies: no CAV moves it
    for ctx in ("red", "blue"):
        b = _row(rows, "b", ctx)
        assert b["score"] == 0.0 and b["random"] == 0.0 and b["shift"] == 0.0
        assert not b["significant"] and b["p"] == 1.0


def test_scores_are_the_share_of_positive_directional_derivatives(known):
    model, probes, res = known
    plan = concept_rows(probes, 12, 20, 128, 0)
    x = probes.images[plan.scored[0]]
    acts = {}
    hook = model.features.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.flatten(1)))
    with torch.no_grad():
        model(probes.images)
    hook.remove()
    v = fit_cav(acts["a"][plan.concept_rows["red"][3]], acts["a"][plan.randoms[3]])
    dd = directional_derivatives(model, x, 0, v[None])
    # at `features` the gradient of a logit is the same for every input (GAP + linear): w_a / (h*w)
    expected = (v.view(3, 16, 16).sum((1, 2)) / 256) @ model.fc.weight[0].detach()
    assert torch.allclose(dd[:, 0], expected.expand(len(x)), atol=1e-6)
    assert res.scores["a"]["red"][3] == float((dd[:, 0] > 0).float().mean())


def test_directional_derivatives_match_captum_tcav():
    """Given the same CAVs, captum's TCAV (LayerGradientXActivation without the inputs) counts the same signs."""
    from captum.concept import TCAV, Concept
    from captum.concept._utils.classifier import Classifier

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    x = torch.rand(40, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    cavs = torch.randn(
        3, 4 * 12 * 12, generator=torch.Generator().manual_seed(2)
    )  # directions at layer '1'

    class Fixed(Classifier):  # returns the given CAV for each experimental set, ignores the data
        def __init__(self) -> None:
            self.i = 0

        def train_and_eval(self, dataloader, **kwargs):
            labels = torch.cat([y for _, y in dataloader]).tolist()
            self.ids = list(dict.fromkeys(labels))  # the set's concept ids, the concept's first
            self.v = cavs[self.i]
            self.i += 1
            return {}

        def weights(self):
            return torch.stack([self.v, -self.v])

        def classes(self):
            return self.ids

    data = [Concept(i, f"c{i}", [x[5 * i : 5 * i + 5]]) for i in range(4)]
    with tempfile.TemporaryDirectory() as folder:
        captum_tcav = TCAV(model, ["1"], classifier=Fixed(), save_path=folder)
        sets = [[data[0], data[1]], [data[0], data[2]], [data[0], data[3]]]
        for k in range(3):
            out = captum_tcav.interpret(x, sets, target=k)
            theirs = [float(out[f"0-{j}"]["1"]["sign_count"][0]) for j in (1, 2, 3)]
            ours = (
                (directional_derivatives(model, x, k, cavs, layer="1") > 0).float().mean(0).tolist()
            )
            assert ours == pytest.approx(theirs, abs=1e-6)


def test_deterministic_with_a_seed_and_no_global_rng(known):
    model, probes, res = known
    torch_state, py_state, np_state = (
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state(),
    )
    again = tcav(model, probes, examples=12, random_concepts=20, seed=0).to_dict()
    assert torch.equal(torch_state, torch.get_rng_state()) and py_state == random.getstate()
    assert np.array_equal(np_state[1], np.random.get_state()[1])
    first = res.to_dict()
    first.pop("seconds"), again.pop("seconds")
    assert first == again
    p0, p1 = concept_rows(probes, 12, 20, 128, 0), concept_rows(probes, 12, 20, 128, 1)
    assert not torch.equal(p0.concept_rows["red"][0], p1.concept_rows["red"][0])


def test_concepts_are_balanced_held_out_and_disjoint_from_random():
    probes = colour_probes(n_per_group=40)
    plan = concept_rows(probes, 12, 3, 10, 0)
    assert plan.concepts == ["red", "blue"] and plan.concept_classes == {
        "red": ["a", "b"],
        "blue": ["a", "b"],
    }
    assert {k: len(v) for k, v in plan.scored.items()} == {0: 10, 1: 10}
    scored = set(torch.cat(list(plan.scored.values())).tolist())
    for i in range(3):
        rows_r, rows_ref = set(plan.randoms[i].tolist()), set(plan.references[i].tolist())
        for ctx in ("red", "blue"):
            rows = plan.concept_rows[ctx][i]
            assert len(rows) == 12
            names = {probes.group_names[int(g)] for g in probes.groups[rows]}
            assert names == {f"a|{ctx}", f"b|{ctx}"}  # the context across classes
            assert int((probes.labels[rows] == 0).sum()) == 6  # balanced over the classes
            assert not set(rows.tolist()) & (
                rows_r | rows_ref | scored
            )  # CAV i's sets never share an image
        for r in (plan.randoms[i], plan.references[i]):
            assert (
                len(r) == 12 and int((probes.labels[r] == 0).sum()) == 6
            )  # the concepts' class balance
            assert {probes.group_names[int(g)] for g in probes.groups[r]} == set(probes.group_names)
        assert not rows_r & rows_ref and not (rows_r | rows_ref) & scored
    # each CAV draws its own sample of the concept (the test is about the context, not 12 images)
    assert not torch.equal(plan.concept_rows["red"][0], plan.concept_rows["red"][1])


def test_model_is_left_as_it_was_and_inference_mode_works():
    model = ColourNet()
    model.train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    grad = model.fc.weight.grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probes = colour_probes()
    with torch.inference_mode():
        res = tcav(model, probes, examples=12, random_concepts=4, seed=0)
    assert res.scores["a"]["red"] == [1.0] * 4
    assert model.training and all(m.training for m in model.modules())
    assert model.fc.weight.grad is grad and all(p.requires_grad for p in model.parameters())
    assert hook_count(model) == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics too


def test_bad_inputs_name_the_problem_and_the_fix():
    model = ColourNet().eval()
    probes = colour_probes(n_per_group=24)
    no_groups = ProbeSet(images=probes.images, labels=probes.labels, class_names=probes.class_names)
    assert not has_concepts(no_groups)
    with pytest.raises(AttributionError, match="needs context groups"):
        tcav(model, no_groups)
    one = colour_probes(contexts=("red",))
    assert not has_concepts(one)
    with pytest.raises(AttributionError, match="at least two contexts"):
        tcav(model, one, examples=10)
    with pytest.raises(
        AttributionError, match=r"group 'a\|red' has 24, needs 61.*lower engine.tcav.examples"
    ):
        tcav(model, probes, examples=60)
    with pytest.raises(AttributionError, match="examples must be an integer >= 10"):
        tcav(model, probes, examples=5)
    with pytest.raises(AttributionError, match="random_concepts must be an integer >= 2"):
        tcav(model, probes, examples=10, random_concepts=1)
    with pytest.raises(AttributionError, match="layer 'nope' not found"):
        tcav(model, probes, examples=10, layer="nope")
    engine = merge_config(None)["engine"]
    engine["tcav"] = dict(engine["tcav"], layer="nope")
    with pytest.raises(AuditConfigError, match="engine.tcav.layer"):
        tcav_raw(model, probes, engine)
    engine["tcav"] = dict(engine["tcav"], layer=None, examples=60)
    assert (
        "needs 61" in tcav_raw(model, probes, engine)["error"]
    )  # the probes, not the user's option
    for key, value, match in (
        ("enabled", "yes", "enabled must be true or false"),
        ("layer", "", "module name"),
        ("examples", 3, "examples must be an integer >= 10"),
        ("random_concepts", 1, "random_concepts must be an integer >= 2"),
        ("probes", 0, "probes must be an integer >= 1"),
    ):
        with pytest.raises(AuditConfigError, match=match):
            check_config(merge_config({"engine": {"tcav": {key: value}}}))
    with pytest.raises(AuditConfigError, match="unknown config key 'engine.tcav.typo'"):
        merge_config({"engine": {"tcav": {"typo": 1}}})


def test_t_test_edge_cases():
    assert tcav_test([1.0] * 5, [1.0] * 5) == 1.0
    assert tcav_test([1.0] * 5, [0.0] * 5) == 0.0
    assert math.isnan(tcav_test([1.0], [0.0, 1.0]))
    from scipy import stats

    a, b = [0.9, 0.8, 1.0, 0.95], [0.4, 0.6, 0.5, 0.2, 0.7]
    assert tcav_test(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)


@pytest.fixture(scope="module")
def audited():
    probes = colour_probes(n_per_group=24)
    engine = {"methods": [], "tcav": {"examples": 12, "random_concepts": 20, "probes": 16}}
    return run_audit(ColourNet().eval(), probes, {"engine": engine})


def test_audit_records_informs_and_never_votes(audited):
    block = audited.raw["tcav"]
    assert json.loads(json.dumps(block)) == block  # plain numbers: report.json's evidence block
    mine = [c for c in audited.checks if c.kind == "concepts"]
    assert {c.name for c in mine} == {"tcav/a/red", "tcav/a/blue"}
    assert all(c.verdict is None and not c.decisive for c in mine)
    red = next(c for c in mine if c.name == "tcav/a/red")
    assert (
        "the a logit rises along the red concept: score 1.00" in red.finding
        and "Bonferroni over 4 tests" in red.finding
    )
    assert red.finding in audited.findings
    assert audited.metrics["tcav/a/red"] == 1.0 and audited.metrics["tcav/b/red"] == 0.0
    assert audited.metrics["tcav/a/red/shift"] > 0
    without = {k: v for k, v in audited.raw.items() if k != "tcav"}
    for gate in (audited.config["gate"], dict(audited.config["gate"], confidence=0.6)):
        assert decide(audited.raw, gate)[0] == decide(without, gate)[0]
    assert recheck(json.loads(audited.to_json())) == audited.verdict
    # an error is one informing finding too
    failed = concepts.check({"error": "AttributionError: too few"}, GATE)
    assert [(c.name, c.verdict) for c in failed] == [("tcav", None)] and "not computed" in failed[
        0
    ].finding
    assert (
        decide(dict(audited.raw, tcav={"error": "x"}), audited.config["gate"])[0] == audited.verdict
    )


def test_summary_finding_when_nothing_is_significant(audited):
    block = json.loads(json.dumps(audited.raw["tcav"]))
    for cls in block["scores"]:
        for ctx in block["scores"][cls]:
            block["scores"][cls][ctx] = list(block["random_scores"][cls])
    checks = concepts.check(block, GATE)
    assert len(checks) == 1 and checks[0].name == "tcav" and checks[0].verdict is None
    assert (
        "no class logit moves along a context concept differently from random concepts (4 tests"
        in checks[0].finding
    )


def test_off_and_absent(audited):
    probes = colour_probes(n_per_group=24)
    res = run_audit(
        ColourNet().eval(), probes, {"engine": {"methods": [], "tcav": {"enabled": False}}}
    )
    assert "tcav" not in res.raw and not any(c.kind == "concepts" for c in res.checks)
    one = colour_probes(n_per_group=24, contexts=("red",))
    assert "tcav" not in run_audit(ColourNet().eval(), one, {"engine": {"methods": []}}).raw


def test_report_section_renders_escaped(tmp_path):
    from audit.report.write import render_html, render_markdown

    probes = colour_probes(n_per_group=24, contexts=("<i>red</i>", "blue$x$"))
    engine = {"methods": [], "tcav": {"examples": 12, "random_concepts": 6, "probes": 16}}
    res = run_audit(ColourNet().eval(), probes, {"engine": engine})
    page = render_html(res)
    # TCAV corroborates: its section sits in the collapsed statistics, which the navigation links
    assert 'id="tcav"' in page and "Concepts (TCAV)" in page and 'href="#statistics"' in page
    assert "&lt;i&gt;red&lt;/i&gt;" in page and "<i>red</i>" not in page
    assert "TCAV scores chart" in page and "<code>features</code>" in page
    md = render_markdown(res)
    concepts = [c for c in res.checks if c.kind == "concepts"]
    assert concepts and all(not c.decisive for c in concepts)
    assert (
        f"{len(res.checks) - sum(c.decisive for c in res.checks) - len(concepts)} further finding(s)"
        in md
    )
    section = md.split("**Concept evidence**")[1]
    assert all(f"- `{c.finding}" in section for c in concepts if "`" not in c.finding)


@pytest.mark.slow
def test_demo_models_shortcut_concept_found_clean_not(tracking_uri):
    """The demo's two models (trained here as `make demo` trains them): TCAV finds snow/grass in the shortcut only."""
    from audit.datasets import snow_wolf
    from audit.training.demo import compose_train
    from audit.training.train import train

    probes = snow_wolf.probe_set(
        n_per_group=256, size=64, seed=2024
    )  # the audit job's default probes
    engine = merge_config(None)["engine"]
    found = {}
    for rho in (0.99, 0.5):
        result = train(
            compose_train(
                [f"data.correlation={rho}", "logger=none", "trainer.enable_progress_bar=false"]
            )
        )
        block = tcav_raw(result.module.net.eval(), probes, engine)
        found[rho] = (result.max_gap, {(r["class"], r["concept"]): r for r in summary(block, 0.95)})
    gap, shortcut = found[0.99]
    assert gap >= 0.30  # it learned the shortcut
    for key in (("wolf", "snow"), ("husky", "grass")):
        r = shortcut[key]
        assert r["significant"] and r["direction"] == "rises" and r["score"] >= 0.95, r
        assert r["shift"] > 5 * r["random_shift_sd"], r
    gap, clean = found[0.5]
    assert gap <= 0.10
    for r in clean.values():
        # the clean model's logits barely move along the contexts: a tenth of the shortcut's shift at most
        assert abs(r["shift"]) <= 0.1 * min(abs(s["shift"]) for s in shortcut.values()), r
    assert not any(r["significant"] for r in clean.values()), clean
