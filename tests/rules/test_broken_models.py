"""Gate integrity: a broken, constant or guessing model is never promoted; bad options fail first.

* NaN/Inf logits on any probe: ``BrokenModelError`` (an ``AuditConfigError``: exit 2).
  Before the fix an all-NaN model PASSed: the argmax of a NaN row is class 0, so it
  looked like a model that always says 'wolf', whose context gaps are all 0.
* One class for every probe, or an accuracy not clearly above chance (the largest class
  share): the ``competence`` check makes the verdict INCONCLUSIVE, never PASS, also
  through :func:`recheck`.
* An option the model rejects (unknown Grad-CAM layer, unknown LRP composite, unknown
  option name) and a forward that fails only on batches: ``AuditConfigError`` before
  the heavy work, not an INCONCLUSIVE or a traceback after it.
"""

from __future__ import annotations

import json

import pytest
import torch
from _toy_models import ColourReader, Constant, ContextReader, colour_probe_set
from torch import nn

import audit.pipeline as pipeline
from audit.datasets import snow_wolf
from audit.evidence.behaviour import ForwardError, NonFiniteLogits, predict
from audit.pipeline import (
    AuditConfigError,
    BrokenModelError,
    check_config,
    decide,
    default_config,
    merge_config,
    recheck,
    run_audit,
)
from audit.probes import ProbeSet

GATE = default_config()["gate"]
# behaviour only: no explainers (the checks under test never need them), so each audit is fast
QUICK = {"engine": {"methods": [], "sanity_probes": 0}}
FAST = {"engine": {"attribution_probes": 32, "sanity_probes": 4, "steps": 8}}


class AnimalReader(nn.Module):
    """Classifies snow-wolf images by the animal's build, never looking at the background.

    The animal is segmented by colour (coat: darker than snow and not green like grass;
    white markings: bright and neutral, where snow is tinted blue); its extent across
    its principal axis over its extent along it is low for a wolf (long snout, hanging
    tail) and high for a husky (tall ears, tail curled over the back). Both images of a
    pair show the same animal, so they get the same answer: no context gap, and right
    on about every probe (192/192 at 32x32, seed 2024; 190/192 at seed 3). Not
    differentiable: the explainers fail on it and are noted as not used.
    """

    def __init__(self, threshold: float = 0.56, sharpness: float = 40.0) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("sharpness", torch.tensor(float(sharpness)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        bright = x.mean(1)
        coat = (bright < 0.7) & (b > 0.6 * g)
        marks = (bright > 0.75) & ((b - r).abs() < 0.03)
        m = (coat | marks).to(x.dtype)
        h, w = x.shape[-2:]
        yy, xx = torch.meshgrid(
            torch.arange(h, dtype=x.dtype, device=x.device) + 0.5,
            torch.arange(w, dtype=x.dtype, device=x.device) + 0.5,
            indexing="ij",
        )
        area = m.sum((1, 2)).clamp_min(1.0)
        dx = xx - ((m * xx).sum((1, 2)) / area)[:, None, None]
        dy = yy - ((m * yy).sum((1, 2)) / area)[:, None, None]
        cxx, cyy, cxy = ((m * p * q).sum((1, 2)) / area for p, q in ((dx, dx), (dy, dy), (dx, dy)))
        th = (0.5 * torch.atan2(2 * cxy, cxx - cyy))[:, None, None]
        u = dx * torch.cos(th) + dy * torch.sin(th)
        v = dy * torch.cos(th) - dx * torch.sin(th)
        on = m > 0
        big = torch.finfo(x.dtype).max
        length = torch.where(on, u, -big).amax((1, 2)) - torch.where(on, u, big).amin((1, 2)) + 1
        height = torch.where(on, v, -big).amax((1, 2)) - torch.where(on, v, big).amin((1, 2)) + 1
        score = self.sharpness * (height / length - self.threshold)  # > 0: husky
        return torch.stack([-score, score], dim=1)


class AllNaN(Constant):
    """A model whose weights went NaN: every logit is NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float("nan")


class InfOnWhite(AnimalReader):
    """Good, except that an all-white image overflows: +Inf logits for that row only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        white = x.flatten(1).amin(dim=1) >= 1.0
        return torch.where(white[:, None], torch.full_like(out, float("inf")), out)


class WhereIsIt(nn.Module):
    """Guesses: 'husky' when the animal stands right of centre, which says nothing about the class.

    Both images of a pair get the same answer, so there is no context gap either: with
    enough probes the old gate PASSed it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = ((x.mean(1) < 0.7) & (x[:, 2] > 0.6 * x[:, 1])).to(x.dtype)
        cols = torch.arange(x.shape[-1], dtype=x.dtype) + 0.5
        cx = (m.sum(1) * cols).sum(1) / m.sum((1, 2)).clamp_min(1.0) / x.shape[-1]
        score = 40.0 * (cx - 0.5)
        return torch.stack([-score, score], dim=1)


class OneAtATime(ContextReader):
    """Runs on one image, raises on a batch (a forward that flattens with view(1, -1))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise RuntimeError(f"shape '[1, -1]' is invalid for input of size {x.shape[0] * 2}")
        return super().forward(x)


@pytest.fixture(scope="module")
def probes() -> ProbeSet:
    return snow_wolf.probe_set(n_per_group=48, size=32, seed=2024)


# ------------------------------------------------------------------ broken models: exit 2, no verdict
def test_an_all_nan_model_is_broken_not_passed(probes):
    with pytest.raises(BrokenModelError) as err:
        run_audit(AllNaN(), probes, FAST)
    msg = str(err.value)
    assert msg == (
        "the model is broken: it returned NaN/Inf logits for 192 of 192 probes (first: probe 0); "
        "check its weights and input normalization; a broken model is never audited or promoted"
    )
    assert isinstance(err.value, AuditConfigError) and "\n" not in msg
    assert "BrokenModelError" in pipeline.__all__


def test_what_the_old_gate_saw_of_a_nan_model_no_longer_passes(probes):
    # argmax of a NaN row is 0: the NaN model "predicted" wolf for every probe. These are
    # the counts the old gate judged (PASS: every context gap is 0); now they are INCONCLUSIVE.
    pred = torch.zeros(len(probes), dtype=torch.long)
    raw = {"behaviour": pipeline.behaviour_raw(probes, pred)}
    old = {
        "behaviour": {
            k: v for k, v in raw["behaviour"].items() if k in ("n", "correct", "groups", "pairs")
        }
    }
    assert decide(old, GATE)[0] == "PASS"  # without the competence counts: the old verdict
    verdict, checks = decide(raw, GATE)
    assert verdict == "INCONCLUSIVE"
    assert checks[0].name == "competence" and checks[0].decisive
    assert checks[0].finding.startswith(
        "INCONCLUSIVE: the model predicts 'wolf' for every probe (192 of 192)"
    )


def test_one_inf_row_is_enough(probes):
    images = probes.images.clone()
    images[5] = 1.0
    ps = ProbeSet(
        images=images,
        labels=probes.labels,
        class_names=probes.class_names,
        groups=probes.groups,
        group_names=probes.group_names,
    )
    with pytest.raises(
        BrokenModelError, match=r"NaN/Inf logits for 1 of 192 probes \(first: probe 5\)"
    ):
        run_audit(InfOnWhite(), ps, QUICK)


def test_predict_counts_non_finite_rows_over_every_batch():
    model = InfOnWhite()
    x = torch.rand(10, 3, 32, 32) * 0.5
    x[[3, 7, 8]] = 1.0
    with pytest.raises(NonFiniteLogits) as err:
        predict(model, x, max_batch=4, finite=True)
    assert (err.value.bad, err.value.n, err.value.first) == (3, 10, 3)
    assert predict(model, x, max_batch=4).shape == (
        10,
    )  # unchecked by default (training-time callers)


# ------------------------------------------------------------------ competence: constant or guessing models never PASS
def test_a_constant_model_is_inconclusive_with_the_reason_first(probes):
    result = run_audit(Constant(), probes, FAST)
    assert result.verdict == "INCONCLUSIVE"
    assert result.findings[0] == (
        "INCONCLUSIVE: the model predicts 'husky' for every probe (192 of 192): its accuracy per context "
        "says nothing about what it relies on, and a constant model is never promoted"
    )
    beh = result.raw["behaviour"]
    assert beh["predicted_counts"] == {"wolf": 0, "husky": 192}
    assert beh["label_counts"] == {"wolf": 96, "husky": 96} and beh["chance"] == 0.5
    # the context gaps alone would PASS it: the competence check is what holds it back
    gaps = [c for c in result.checks if c.name.startswith("context_gap/")]
    assert gaps and all(c.verdict == "PASS" and not c.decisive for c in gaps)
    doc = json.loads(result.to_json())
    assert recheck(doc) == "INCONCLUSIVE"
    loose = {**doc["config"]["gate"], "context_gap": {"fail": 0.5, "pass": 0.3}}
    assert recheck(doc, loose) == "INCONCLUSIVE"  # no threshold makes a constant model pass


def test_a_model_at_chance_is_inconclusive_even_without_a_context_gap():
    probes = snow_wolf.probe_set(n_per_group=200, size=32, seed=11)
    result = run_audit(WhereIsIt(), probes, QUICK)
    beh = result.raw["behaviour"]
    assert (
        0.4 < beh["correct"] / beh["n"] < 0.6
        and len([k for k in beh["predicted_counts"].values() if k]) == 2
    )
    assert result.metrics["flip_rate"] == 0.0
    old = {"behaviour": {k: v for k, v in beh.items() if k in ("n", "correct", "groups", "pairs")}}
    assert decide(old, GATE)[0] == "PASS"  # the old gate promoted this guesser
    assert result.verdict == "INCONCLUSIVE"
    comp = result.checks[0]
    assert comp.name == "competence" and comp.decisive and comp.numbers["chance"] == 0.5
    assert "chance 0.50 (the share of the largest class" in comp.finding
    assert recheck(json.loads(result.to_json())) == "INCONCLUSIVE"


def test_chance_is_the_largest_class_share_not_one_over_k():
    # 80 % of the probes are wolves: 83 of 100 right beats 1/2 but not "always wolf" (0.80)
    beh = {
        "n": 100,
        "correct": 83,
        "label_counts": {"wolf": 80, "husky": 20},
        "predicted_counts": {"wolf": 90, "husky": 10},
        "groups": {"wolf|snow": {"correct": 40, "n": 40}, "wolf|grass": {"correct": 39, "n": 40}},
    }
    verdict, checks = decide({"behaviour": beh}, GATE)
    assert verdict == "INCONCLUSIVE"
    comp = next(c for c in checks if c.name == "competence")
    assert comp.numbers["chance"] == 0.8 and "not clearly above chance 0.80" in comp.finding
    assert decide({"behaviour": {**beh, "correct": 97}}, GATE)[0] == "PASS"


def test_competence_never_turns_a_fail_into_inconclusive(probes):
    # the background reader is at chance overall (right on one background, wrong on the
    # other), and that is exactly the spurious feature the gate must FAIL
    result = run_audit(ContextReader(), probes, QUICK)
    assert result.verdict == "FAIL"
    comp = next(c for c in result.checks if c.name == "competence")
    assert comp.verdict == "INCONCLUSIVE" and not comp.decisive
    assert result.findings[0].startswith(("wolf|grass: accuracy 0.0", "husky|snow: accuracy 0.0"))


def test_a_model_that_reads_the_animal_still_passes(probes):
    result = run_audit(AnimalReader(), probes, FAST)
    assert result.verdict == "PASS", result.findings
    comp = next(c for c in result.checks if c.name == "competence")
    assert comp.verdict == "PASS" and not comp.decisive
    assert comp.finding.startswith(
        "accuracy 1.00 (192/192, 95% CI 0.98 to 1.00) is above chance: 0.50"
    )
    assert result.metrics["context_gap"] < 0.05
    assert recheck(json.loads(result.to_json())) == "PASS"


def test_the_colour_reader_still_passes():
    probes = colour_probe_set(n_per_group=48, size=32)
    result = run_audit(ColourReader(), probes, QUICK)
    assert result.verdict == "PASS", result.findings
    assert next(c for c in result.checks if c.name == "competence").verdict == "PASS"
    assert recheck(json.loads(result.to_json())) == "PASS"


def test_reports_without_the_counts_recheck_as_before():
    # evidence written before the competence check (no label/prediction counts): not judged on it
    raw = {
        "behaviour": {
            "n": 512,
            "correct": 500,
            "groups": {
                "wolf|snow": {"correct": 250, "n": 256},
                "wolf|grass": {"correct": 250, "n": 256},
            },
        }
    }
    verdict, checks = decide(raw, GATE)
    assert verdict == "PASS" and not any(c.name == "competence" for c in checks)


# ------------------------------------------------------------------ config errors before the audit
@pytest.fixture
def no_prediction(monkeypatch):
    """Fails the test if the audit gets as far as predicting the probes."""

    def boom(*_a, **_k):
        raise AssertionError("the audit started before the config error was raised")

    monkeypatch.setattr(pipeline, "predict_batches", boom)


@pytest.mark.parametrize(
    "options, needle",
    [
        (
            {"gradcam": {"layer": "nope"}},
            "engine.method_options.gradcam (layer='nope') does not work on this model: layer 'nope' not found; "
            "top-level modules are: features, pool, fc; conv layers are: features.0; fix the option, or drop it "
            "to use gradcam's default",
        ),
        (
            {"gradcam": {"layer": "fc"}},
            "Grad-CAM needs a spatial map [N, C, h, w] from the layer; 'fc' outputs",
        ),
        (
            {"lrp": {"composite": "nosuch"}},
            "engine.method_options.lrp (composite='nosuch') does not work on this "
            "model: unknown LRP composite 'nosuch'; choose one of",
        ),
    ],
)
def test_an_option_the_model_rejects_is_a_config_error_before_the_audit(
    probes, no_prediction, options, needle
):
    cfg = {"engine": {"methods": sorted(options), "method_options": options, "sanity_probes": 0}}
    with pytest.raises(AuditConfigError) as err:
        run_audit(ContextReader(), probes, cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_option_names_fail_in_check_config_without_a_model():
    with pytest.raises(AuditConfigError) as err:
        check_config(
            merge_config(
                {"engine": {"methods": ["gradcam"], "method_options": {"gradcam": {"layr": "x"}}}}
            )
        )
    assert str(err.value).startswith(
        "engine.method_options.gradcam: method 'gradcam' got unknown option(s) layr; "
        "its options are: layer"
    )


def test_a_method_the_model_cannot_run_is_still_only_recorded(probes):
    # LRP cannot explain the AnimalReader with or without options: the model's fault, not the
    # config's, so the method is noted as not used and behaviour decides
    cfg = {
        "engine": {
            "methods": ["lrp"],
            "method_options": {"lrp": {"composite": "epsilon"}},
            "sanity_probes": 0,
            "attribution_probes": 8,
            "steps": 4,
        }
    }
    result = run_audit(AnimalReader(), probes, cfg)
    assert result.verdict == "PASS"
    assert "error" in result.raw["methods"]["lrp"]


def test_a_forward_that_fails_on_batches_is_one_clear_config_error(probes):
    with pytest.raises(AuditConfigError) as err:
        run_audit(OneAtATime(), probes, QUICK)
    assert str(err.value) == (
        "the model's forward raised RuntimeError (shape '[1, -1]' is invalid for input of size 256) on a batch "
        "of 128 probes (it ran on one); a forward must accept any batch size (look for a reshape or view that "
        "assumes one image), or set engine.max_batch=1 to audit one probe at a time"
    )
    # the way out the message names works
    ok = run_audit(OneAtATime(), probes, {"engine": {**QUICK["engine"], "max_batch": 1}})
    assert ok.verdict == "FAIL"  # it is the background reader


def test_predict_names_the_batch_that_raised():
    with pytest.raises(ForwardError) as err:
        predict(OneAtATime(), torch.rand(5, 3, 8, 8), max_batch=2)
    assert (err.value.start, err.value.stop, err.value.batch) == (0, 2, 2)
    assert isinstance(err.value.__cause__, RuntimeError)


# ------------------------------------------------------------------ config types
@pytest.mark.parametrize(
    "over, needle",
    [
        (
            {"gate": {"attribution": {"veto": "false"}}},
            "gate.attribution.veto must be true or false; got 'false' (a string: write gate.attribution.veto=false without quotes)",
        ),
        ({"gate": {"attribution": {"veto": 0}}}, "gate.attribution.veto must be true or false"),
        ({"gate": {"confidence": True}}, "gate.confidence must be a number; got True"),
        ({"gate": {"confidence": "0.9"}}, "gate.confidence must be a number; got '0.9'"),
        (
            {"gate": {"context_gap": {"fail": float("nan")}}},
            "gate.context_gap.fail must be a number; got nan",
        ),
        ({"gate": {"flip_rate": {"pass": None}}}, "gate.flip_rate.pass must be a number; got None"),
        ({"engine": {"steps": True}}, "engine.steps must be an integer >= 1; got True"),
        ({"engine": {"steps": 8.0}}, "engine.steps must be an integer >= 1; got 8.0"),
        ({"engine": {"max_batch": "64"}}, "engine.max_batch must be an integer >= 1; got '64'"),
        ({"engine": {"seed": False}}, "engine.seed must be an integer >= 0; got False"),
        (
            {"engine": {"method_options": "gradcam"}},
            "engine.method_options must be a mapping method -> options",
        ),
        (
            {"engine": {"methods": ["gradcam"], "method_options": {"gradcam": "features"}}},
            "engine.method_options.gradcam must be a mapping option -> value",
        ),
        (
            {"gate": {"attribution": True}},
            "gate.attribution must be a mapping with keys ['fail', 'veto']",
        ),
    ],
)
def test_config_values_must_have_their_real_type(over, needle):
    with pytest.raises(AuditConfigError) as err:
        check_config(merge_config(over))
    assert needle in str(err.value)


def test_real_types_are_accepted():
    cfg = check_config(
        merge_config(
            {
                "gate": {"attribution": {"veto": False}, "confidence": 0.9},
                "engine": {"steps": 4, "max_batch": 7},
            }
        )
    )
    assert cfg["gate"]["attribution"]["veto"] is False and cfg["engine"]["steps"] == 4


def test_the_engine_and_the_callbacks_refuse_a_wrong_output_shape_in_the_same_words():
    """One output-shape check (audit.engine.model.logits_problem) for run_audit and the callbacks."""
    from audit.callbacks._base import check_outputs
    from audit.engine.model import logits_problem

    probes = colour_probe_set(2, size=16)
    probes.class_names = ["red", "blue", "green"]
    with pytest.raises(AuditConfigError) as engine:
        run_audit(ColourReader(), probes, QUICK)
    with pytest.raises(ValueError) as callback:
        check_outputs(ColourReader(), probes, "AttributionCallback")
    sentence = logits_problem(torch.zeros(1, 2), probes.class_names)
    assert sentence == (
        "the probes' classes do not match the model's outputs: the probe set has 3 classes "
        "['red', 'blue', 'green'] but the model has 2 outputs; classes.txt line i must name model output i"
    )
    assert str(engine.value) == sentence
    assert str(callback.value).startswith(f"AttributionCallback: {sentence} (or pass module=")
    assert logits_problem(torch.zeros(1, 3), probes.class_names) is None
    assert logits_problem(torch.zeros(1, 3, 2), probes.class_names).startswith(
        "the model must return logits [N, classes]; it returned Tensor (1, 3, 2)"
    )
