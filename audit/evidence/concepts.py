"""TCAV (Kim et al. 2018): does a class logit rise along a context concept of the probe set?

Testing with Concept Activation Vectors asks whether moving a layer's activations in
the direction of a human concept raises a class logit. Here the concepts are the
probe set's contexts: group names ``"<class>|<context>"`` give the concept "snow"
(probes whose context is snow, whatever their class) and the classes to score. On the
snow-wolf demo a model that leans on the background has a wolf logit that rises along
"snow". It corroborates the audit and never votes (:mod:`audit.rules.concepts`).

How the probes are used (:func:`concept_rows`; every draw comes from one private
``torch.Generator`` seeded with ``seed``):

* **Scored probes**: per class, up to ``max_probes`` (at most half of each group), spread
  over its groups and held out from every CAV.
* **CAV** ``i`` of concept ``c`` (``i = 1..random_concepts``): ``examples`` probes of context
  ``c``, spread evenly over the classes that have that context (so the concept is the
  context, not a class), against a random concept ``r_i`` of ``examples`` probes spread
  over the classes in the same proportions, then over each class's contexts: random
  images of the probe set's own distribution, so "snow against random" keeps the
  paper's design (random images hold the concept at its base rate; noise images would
  make it "image against noise"). Within a CAV the two sets share no image.
* **Null CAV** ``i``: a second random concept ``r'_i`` against ``r_i``.

Each CAV draws a fresh sample of the concept from the rest of the probes. The paper's
code keeps one set of concept images for every CAV and varies only the random side,
which tests those images, not the context: on the demo's clean model (its wolf-minus-
husky margin moves with the background in 0.52 of 512 same-animal pairs, by -0.02 on
average), one fixed draw of 30 snow probes out of five made "snow" significant for
both classes (all 20 CAVs agreed, p 0.02 and 0.008 after Bonferroni); with a fresh
sample per CAV none of the five draws was (``python -m audit.bench.concepts``). A fixed
reference random set for the null (the paper's code) fails the same way: every null
CAV carries that set's quirks (all ten null scores of the shortcut model were 0.00 for
wolf and 1.00 for husky). The shares that do not divide evenly are drawn too: giving the
first class the extra image every time made the clean model's husky logit "rise" along
both snow and grass.

The test (Kim et al., section 3.5): the TCAV score of class ``k`` for CAV ``i`` is the
share of class-``k`` scored probes whose class-``k`` logit has a positive directional
derivative along the CAV. The concept's ``random_concepts`` scores and the null's are
compared with a two-sided Welch t-test (:func:`tcav_test`; Welch because the concept's
scores often have far less spread than the null's), Bonferroni over the (class,
concept) tests, at the gate's ``confidence`` (:func:`summary`).

Also reported, because a sign count says nothing of size: the **logit shift**, the mean
directional derivative along the unit CAV times the distance between the concept's and
the random images' mean activations along it, i.e. the first-order change of the logit
when the activations move from the random images to the concept's along the CAV.

The layer: by default the last channels-first feature map of a forward pass (the rule of
the activation-maximization callback, :func:`audit.engine.model.last_feature_map`:
``features`` on SmallCNN, ``layer4`` on a ResNet). When global average pooling and a
linear layer follow it (both of those), the gradient of a logit there is the same for
every input, so a CAV scores 0 or 1 on every probe and the score is the share of CAVs
whose direction raises the logit; the t-test over the CAVs still holds, and the default
of 30 random concepts is for it (with 10, in an earlier version, the shortcut model's
scores of 1.00 or 0.00 against nulls of 0.4 and 0.5 +- 0.5 gave p 0.02 to 0.15 after
Bonferroni). An inner layer (``layer=``)
scores probe by probe.

Our own CAV fit and scores rather than captum's ``TCAV``: its ``DefaultClassifier`` shuffles
its train/test split with Python's global ``random`` and fits sklearn's unseeded
``SGDClassifier`` (the global RNG; the project's rule is a private seeded generator), and
``TCAV`` writes every batch of activations and every CAV to files under ``save_path``,
reloads the CAVs on every ``interpret`` call and differentiates all of its inputs in
one pass. Here a CAV is the normal of an L2-regularised logistic regression
(:func:`fit_cav`, Newton's method in float64, deterministic), the activations stay in
memory, and the gradients run in chunks (``max_batch`` or the memory budget). Given the
same CAVs, the scores equal captum's ``TCAV`` (tests/evidence/test_tcav.py).

Cost on the demo (SmallCNN, 1,024 probes at 64 px, defaults ``examples=30``,
``random_concepts=30``, ``max_probes=128``): one forward pass per probe drawn into a
CAV (about 770), 256 forward+backward passes and 90 CAV fits of 4,096 dimensions:
3.6 and 4.7 s of default audits of 122 and 115 s on this 2-core CPU while other jobs
ran (docs/concepts.md, "Concept evidence: TCAV").
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from audit.engine.model import (
    AttributionError,
    check_finite,
    chunks,
    last_feature_map,
    leaf_activation,
    prepare_inputs,
    preserved,
    resolve_layer,
)
from audit.evidence.behaviour import split_group
from audit.methods import rows_per_pass
from audit.probes import ProbeSet

__all__ = [
    "MIN_EXAMPLES",
    "group_minimum",
    "TCAVResult",
    "Plan",
    "tcav",
    "tcav_raw",
    "tcav_layer",
    "concept_rows",
    "has_concepts",
    "fit_cav",
    "directional_derivatives",
    "tcav_test",
    "summary",
]

#: The fewest images a concept (and each random concept) may have: a CAV fit on fewer is noise.
MIN_EXAMPLES = 10
#: The fewest random concepts: the t-test needs two scores on each side.
MIN_RANDOM = 2


@dataclass
class TCAVResult:
    """TCAV scores of every class along every context concept, and along random concepts.

    Attributes:
        layer: the module whose output the CAVs live in.
        classes: the scored classes (names of model outputs).
        concepts: the contexts, in the order of the group names.
        concept_classes: per concept, the classes its examples come from (one class only:
            the concept is confounded with that class).
        examples: images per concept and per random concept.
        scored: per class, how many held-out probes were scored.
        scores: ``scores[class][concept]``: one TCAV score per CAV ``i`` (a sample of the concept against ``r_i``).
        random_scores: ``random_scores[class]``: the scores of the CAVs ``r'_i`` against
            ``r_i`` (the null distribution).
        shift: ``shift[class][concept]``: the logit shift per CAV (see the module docstring).
        random_shift: ``random_shift[class]``: the same for the null CAVs.
        seed: the seed of the private generator.
        seconds: wall time.
    """

    layer: str
    classes: list[str]
    concepts: list[str]
    concept_classes: dict[str, list[str]]
    examples: int
    scored: dict[str, int]
    scores: dict[str, dict[str, list[float]]]
    random_scores: dict[str, list[float]]
    shift: dict[str, dict[str, list[float]]]
    random_shift: dict[str, list[float]]
    seed: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able numbers (the ``tcav`` block of a report's evidence)."""
        return {
            "layer": self.layer,
            "classes": list(self.classes),
            "concepts": list(self.concepts),
            "concept_classes": {c: list(v) for c, v in self.concept_classes.items()},
            "examples": self.examples,
            "random_concepts": len(next(iter(self.random_scores.values()), [])),
            "scored": dict(self.scored),
            "scores": {k: {c: list(v) for c, v in d.items()} for k, d in self.scores.items()},
            "random_scores": {k: list(v) for k, v in self.random_scores.items()},
            "shift": {k: {c: list(v) for c, v in d.items()} for k, d in self.shift.items()},
            "random_shift": {k: list(v) for k, v in self.random_shift.items()},
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Plan:
    """Probe rows of every concept, random concept and scored class (see :func:`concept_rows`)."""

    concepts: list[str]
    concept_rows: dict[str, list[torch.Tensor]]  # per concept, its sample for CAV i
    concept_classes: dict[str, list[str]]
    randoms: list[torch.Tensor]  # r_i: the counterparts of the concepts in CAV i
    references: list[torch.Tensor]  # r'_i: the null's "concept" against r_i
    scored: dict[int, torch.Tensor]  # class index -> rows


def _split(n: int, parts: int, gen: torch.Generator) -> list[int]:
    """``n`` in ``parts`` shares that differ by at most one; which shares get the one more is drawn.

    Drawn rather than fixed: a fixed rule would always give the first class one more image
    in every random concept, and a CAV would pick up that class (measured on the demo's
    clean model: with 16 wolves against 15 in the concept, its husky logit "rose" along
    both snow and grass).
    """
    shares = [n // parts] * parts
    for i in torch.randperm(parts, generator=gen)[: n % parts].tolist():
        shares[i] += 1
    return shares


def _even(n: int, parts: int) -> list[int]:
    """``n`` in ``parts`` shares that differ by at most one, the first ones larger (for caps)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _usable_groups(probes: ProbeSet) -> list[tuple[int, int, str]]:
    """``(group index, class index, context)`` of every group named ``<class>|<context>``."""
    if probes.groups is None:
        return []
    out = []
    for g, name in enumerate(probes.group_names):
        cls, ctx = split_group(name)
        if ctx and cls in probes.class_names:
            out.append((g, probes.class_names.index(cls), ctx))
    return out


def _contexts(usable: Sequence[tuple[int, int, str]]) -> list[str]:
    return list(dict.fromkeys(ctx for _, _, ctx in usable))


def has_concepts(probes: ProbeSet) -> bool:
    """Whether the probe set has what TCAV needs: groups ``<class>|<context>`` with two or more contexts."""
    return len(_contexts(_usable_groups(probes))) >= 2


def group_minimum(examples: int, context_classes: int, classes: int, class_contexts: int) -> int:
    """Probes a group ``<class>|<context>`` needs for TCAV: one to score, its share of its context's
    concept (``examples`` over the ``context_classes`` classes seen in that context) and of two
    random concepts (``examples`` over the ``classes``, then over its class's ``class_contexts``).
    ``model-audit plan`` and :func:`concept_rows` both use it."""
    concept = math.ceil(examples / context_classes)
    random = math.ceil(math.ceil(examples / classes) / class_contexts)
    return concept + 2 * random + 1


def concept_rows(
    probes: ProbeSet, examples: int, random_concepts: int, max_probes: int, seed: int
) -> Plan:
    """Which probes make each concept and random concept of each CAV, and which are scored.

    See the module docstring for the design. Every group ``<class>|<context>`` needs one
    probe to score plus, for each CAV, its share of its context's concept and of two
    random concepts (``r_i`` and ``r'_i``); the error names the groups that are short.

    Raises:
        AttributionError: no groups, fewer than two contexts, ``examples`` below
            :data:`MIN_EXAMPLES`, fewer than :data:`MIN_RANDOM` random concepts, or too few
            probes in a group.
    """
    for name, value, low in (
        ("examples", examples, MIN_EXAMPLES),
        ("random_concepts", random_concepts, MIN_RANDOM),
        ("max_probes", max_probes, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AttributionError(f"TCAV's {name} must be an integer >= {low}; got {value!r}")
    if probes.groups is None or not probes.group_names:
        raise AttributionError(
            "TCAV needs context groups: give each probe a group '<class>|<context>' (e.g. 'wolf|snow') "
            "in the probe set's group column"
        )
    usable = _usable_groups(probes)
    contexts = _contexts(usable)
    if len(contexts) < 2:
        raise AttributionError(
            f"TCAV needs at least two contexts among the groups '<class>|<context>' (a concept is tested against "
            f"random probes of every context); the groups {probes.group_names} give {contexts or 'none'}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    context_groups = {ctx: [g for g, _, c in usable if c == ctx] for ctx in contexts}
    class_groups: dict[int, list[int]] = {}
    for g, k, _ in usable:
        class_groups.setdefault(k, []).append(g)
    concept_classes = {
        ctx: [probes.class_names[k] for _, k, c in usable if c == ctx] for ctx in contexts
    }
    need_of = {
        g: group_minimum(examples, len(context_groups[c]), len(class_groups), len(class_groups[k]))
        for g, k, c in usable
    }
    rows: dict[int, torch.Tensor] = {}
    short = []
    for g, _, _ in usable:
        r = (probes.groups == g).nonzero().flatten()
        rows[g] = r[torch.randperm(len(r), generator=gen)]
        need = need_of[g]
        if len(r) < need:
            short.append(f"'{probes.group_names[g]}' has {len(r)}, needs {need}")
    if short:
        raise AttributionError(
            f"too few probes for TCAV with {examples} images per concept: group {'; '.join(short)} "
            f"(one probe to score, and its share of its context's concept and of two random concepts); "
            f"lower engine.tcav.examples (at least {MIN_EXAMPLES}) or add probes to these groups"
        )
    scored: dict[int, list[torch.Tensor]] = {}
    pools: dict[int, torch.Tensor] = {}
    for gs in class_groups.values():
        for g, cap in zip(gs, _even(max_probes, len(gs)), strict=True):
            r = rows[g]
            # at most half of a group is scored, the rest is the pool the CAVs' examples are drawn from
            n_score = min(cap, len(r) // 2, len(r) - (need_of[g] - 1))
            scored.setdefault(int(probes.labels[r[0]]), []).append(r[:n_score])
            pools[g] = r[n_score:]

    def random_shares() -> dict[
        int, int
    ]:  # balanced over the classes like a concept, then over contexts
        out: dict[int, int] = {}
        for gs, n in zip(
            class_groups.values(), _split(examples, len(class_groups), gen), strict=True
        ):
            out.update(zip(gs, _split(n, len(gs), gen), strict=True))
        return out

    concept: dict[str, list[torch.Tensor]] = {c: [] for c in contexts}
    randoms: list[torch.Tensor] = []
    references: list[torch.Tensor] = []
    for _ in range(random_concepts):
        # CAV i: a fresh sample of each concept, r_i and r'_i, disjoint (one permutation of each group's pool)
        share_c: dict[int, int] = {}
        for gs in context_groups.values():
            share_c.update(zip(gs, _split(examples, len(gs), gen), strict=True))
        share_r, share_ref = random_shares(), random_shares()
        parts: dict[str, list[torch.Tensor]] = {c: [] for c in contexts}
        r_i: list[torch.Tensor] = []
        ref_i: list[torch.Tensor] = []
        for g, _, ctx in usable:
            pool = pools[g][torch.randperm(len(pools[g]), generator=gen)]
            a, b, c = share_c[g], share_r[g], share_ref[g]
            parts[ctx].append(pool[:a])
            r_i.append(pool[a : a + b])
            ref_i.append(pool[a + b : a + b + c])
        for ctx in contexts:
            concept[ctx].append(torch.cat(parts[ctx]))
        randoms.append(torch.cat(r_i))
        references.append(torch.cat(ref_i))
    return Plan(
        concepts=contexts,
        concept_rows=concept,
        concept_classes=concept_classes,
        randoms=randoms,
        references=references,
        scored={k: torch.cat(v) for k, v in scored.items()},
    )


def tcav_layer(
    model: nn.Module, example: torch.Tensor, layer: str | nn.Module | None = None
) -> str:
    """The layer TCAV uses for inputs like ``example``: ``layer``, else the last channels-first feature map.

    The default is the activation-maximization callback's (:func:`audit.engine.model.last_feature_map`):
    the last module, in execution order, whose output is a map ``[N, C, h, w]`` with
    ``h*w > 1``, unless transformer tokens follow it.
    """
    if layer is not None:
        return resolve_layer(model, layer)[0]
    name = last_feature_map(model, example)
    if name is None:
        raise AttributionError(
            "TCAV found no channels-first feature map [N, C, h, w] that is not followed by transformer tokens; "
            "name a layer (engine.tcav.layer), e.g. a block's output"
        )
    return name


def fit_cav(
    concept: torch.Tensor, random: torch.Tensor, l2: float = 0.01, max_iter: int = 50
) -> torch.Tensor:
    """The unit CAV of ``concept`` against ``random`` activations ``[n, D]``.

    The normal of an L2-regularised logistic regression (concept 1, random 0, an
    unpenalised intercept): deterministic, no random draws. The activations are centred
    and divided by their mean norm (one scalar, so the direction in the layer's own
    coordinates is kept) and the penalty is ``l2 / 2 * |w|^2`` there (captum's
    ``DefaultClassifier`` uses ``alpha=0.01`` with sklearn's SGD). The optimum lies in the
    span of the ``n`` activations, so when ``D > n`` the fit runs on their coordinates in
    that span (a thin SVD; the same optimum, ``|w|`` unchanged), by Newton's method with
    backtracking in float64: a few ``(n + 1)``-square solves, where L-BFGS in ``D``
    dimensions took about 100 iterations of Python overhead (measured 40-100 ms a CAV
    against a few ms, same direction to 1e-6).

    Returns:
        float32 ``[D]`` of unit norm, pointing towards the concept.
    """
    x = torch.cat([concept, random]).to(torch.float64)
    y = torch.cat([torch.ones(len(concept)), torch.zeros(len(random))]).to(torch.float64)
    z = x - x.mean(0)
    z = z / z.norm(dim=1).mean().clamp_min(1e-12)
    back = None  # [D, n]: from coordinates in the span back to the layer's coordinates
    if (
        z.shape[1] > z.shape[0]
    ):  # z = U S V^T from the n x n Gram matrix (an SVD of z is 10x slower)
        evals, u = torch.linalg.eigh(z @ z.T)
        keep = evals > evals.max().clamp_min(1e-300) * 1e-10
        s = evals[keep].sqrt()
        back = z.T @ (u[:, keep] / s)
        z = u[:, keep] * s
    n, d = z.shape
    a = torch.cat(
        [z, torch.ones(n, 1, dtype=torch.float64)], dim=1
    )  # the last column: the intercept
    penalty = torch.full((d + 1,), l2, dtype=torch.float64)
    penalty[-1] = 0.0

    def loss(beta: torch.Tensor) -> torch.Tensor:
        f = a @ beta
        return (F.softplus(f) - y * f).mean() + 0.5 * (penalty * beta * beta).sum()

    beta = torch.zeros(d + 1, dtype=torch.float64)
    current = loss(beta)
    for _ in range(max_iter):
        p = torch.sigmoid(a @ beta)
        grad = a.T @ (p - y) / n + penalty * beta
        if float(grad.abs().max()) < 1e-10:
            break
        hess = (a.T * (p * (1 - p))) @ a / n + torch.diag(penalty)
        step = torch.linalg.solve(hess + 1e-12 * torch.eye(d + 1, dtype=torch.float64), grad)
        t = 1.0
        while t > 1e-8:  # backtracking (Armijo)
            trial = beta - t * step
            value = loss(trial)
            if value <= current - 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        beta, current = trial, value
    w = beta[:-1] if back is None else back @ beta[:-1]
    norm = w.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise AttributionError(
            "a CAV fit found no direction (the concept's activations equal the random ones')"
        )
    return (w / norm).to(torch.float32)


def _activations(
    model: nn.Module, module: nn.Module, name: str, images: torch.Tensor, step: int | None
) -> torch.Tensor:
    """``module``'s output for ``images``, flattened to ``[N, D]`` (float32, on the CPU)."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: tuple, out: object) -> None:
        if not isinstance(out, torch.Tensor):
            raise AttributionError(
                f"TCAV needs a layer that outputs one tensor; '{name}' returns {type(out).__name__}"
            )
        seen.append(out.detach().flatten(1).float().cpu())

    parts = []
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for rows in chunks(len(images), step):
                seen.clear()
                check_finite(model(images[rows]))
                _once(len(seen), name)
                parts.append(seen[0])
    finally:
        handle.remove()
    return torch.cat(parts)


def _once(calls: int, name: str) -> None:
    if calls != 1:
        raise AttributionError(
            f"layer '{name}' ran {calls} times in one forward pass; TCAV needs a layer that runs exactly once "
            "(pick its parent block or another layer)"
        )


def _directional(
    model: nn.Module, module: nn.Module, name: str, x: torch.Tensor, k: int, v: torch.Tensor
) -> torch.Tensor:
    """Directional derivatives ``[n, CAVs]`` of logit ``k`` along each row of ``v`` at ``module``'s output."""
    with leaf_activation(module, "TCAV", name) as cap:
        logits = model(x)
    _once(cap.calls, name)
    check_finite(logits)
    (grad,) = torch.autograd.grad(logits[:, k].sum(), cap.activation, allow_unused=True)
    if grad is None:
        raise AttributionError(
            f"the logits do not depend on layer '{name}'; pick a layer on the path to the output"
        )
    return (grad.flatten(1).float() @ v.T).cpu()


def directional_derivatives(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int,
    cavs: torch.Tensor,
    *,
    layer: str | nn.Module | None = None,
    max_batch: int | None = None,
) -> torch.Tensor:
    """``S_{C,k}(x)``: the derivative of logit ``target`` along each CAV at the layer's output, per input.

    Args:
        model: the classifier (left as it was, see :func:`tcav`).
        inputs: images ``[N, C, H, W]``.
        target: the class index whose logit is differentiated.
        cavs: ``[n, D]`` directions in the layer's flattened output (``D`` = its size per image).
        layer: as in :func:`tcav`.
        max_batch: most images per forward+backward pass.

    Returns:
        float32 ``[N, n]`` on the CPU; TCAV's score is the share of positive entries per column.
    """
    with preserved(model, freeze=True):
        x = prepare_inputs(model, inputs)
        name = tcav_layer(model, x[:1], layer)
        module = resolve_layer(model, name)[1]
        v = cavs.to(x.device, torch.float32)
        return torch.cat(
            [
                _directional(model, module, name, x[part], target, v)
                for part in chunks(len(x), rows_per_pass(model, x, max_batch))
            ]
        )


def tcav(
    model: nn.Module,
    probes: ProbeSet,
    *,
    layer: str | nn.Module | None = None,
    examples: int = 30,
    random_concepts: int = 30,
    max_probes: int = 128,
    seed: int = 0,
    max_batch: int | None = None,
) -> TCAVResult:
    """TCAV scores of each class along each context concept of ``probes`` (see the module docstring).

    The model is left as it was (:func:`audit.engine.model.preserved`: eval mode inside,
    flags, gradients, hooks and BatchNorm statistics restored); works under
    ``torch.no_grad()`` and ``torch.inference_mode()``; the result depends only on the
    arguments (all draws come from a private generator seeded with ``seed``).

    Args:
        model: a classifier returning logits ``[N, classes]`` for the probes' images.
        probes: a probe set with groups ``"<class>|<context>"`` (two or more contexts).
        layer: module name or module; None: the last channels-first feature map
            (:func:`tcav_layer`).
        examples: images per concept and per random concept (>= :data:`MIN_EXAMPLES`).
        random_concepts: random counterparts per concept, and null CAVs (>= 2).
        max_probes: most held-out probes scored per class.
        seed: seed of the private generator that splits the probes.
        max_batch: most images per forward pass (None: the memory budget decides).

    Returns:
        The :class:`TCAVResult`.

    Raises:
        AttributionError: probes without two contexts, too few probes for ``examples``,
            a layer that is not in the model or does not output one tensor.
    """
    t0 = time.perf_counter()
    plan = concept_rows(probes, examples, random_concepts, max_probes, seed)
    with preserved(model, freeze=True):
        first = prepare_inputs(model, probes.images[:1])
        name = tcav_layer(model, first, layer)
        module = resolve_layer(model, name)[1]
        c, r = len(plan.concepts), len(plan.randoms)
        # the CAVs' example sets: each concept's sample j against r_j, then each r'_j against r_j (the null)
        pairs = [
            (plan.concept_rows[ctx][j], plan.randoms[j]) for ctx in plan.concepts for j in range(r)
        ]
        pairs += list(zip(plan.references, plan.randoms, strict=True))
        need = torch.cat([t for pair in pairs for t in pair]).unique()
        images = prepare_inputs(model, probes.images[need])
        acts = _activations(model, module, name, images, rows_per_pass(model, images, max_batch))
        position = torch.full((len(probes),), -1, dtype=torch.long)
        position[need] = torch.arange(len(need))
        cavs, gaps = [], []
        for a, b in pairs:
            xa, xb = acts[position[a]], acts[position[b]]
            cavs.append(fit_cav(xa, xb))
            gaps.append((xa.mean(0) - xb.mean(0)) @ cavs[-1])
        cavs = torch.stack(cavs)
        gap = torch.stack(gaps).double()
        v = cavs.to(first.device)
        scores: dict[str, dict[str, list[float]]] = {}
        random_scores: dict[str, list[float]] = {}
        shift: dict[str, dict[str, list[float]]] = {}
        random_shift: dict[str, list[float]] = {}
        scored: dict[str, int] = {}
        for k, rows in plan.scored.items():
            x = prepare_inputs(model, probes.images[rows])
            positive = torch.zeros(len(pairs), dtype=torch.float64)
            total = torch.zeros(len(pairs), dtype=torch.float64)
            for part in chunks(len(x), rows_per_pass(model, x, max_batch)):
                dd = _directional(model, module, name, x[part], k, v).double()
                positive += (dd > 0).sum(0)
                total += dd.sum(0)
            share = (positive / len(rows)).tolist()
            moved = (total / len(rows) * gap).tolist()
            cls = probes.class_names[k]
            scores[cls] = {ctx: share[i * r : (i + 1) * r] for i, ctx in enumerate(plan.concepts)}
            random_scores[cls] = share[c * r :]
            shift[cls] = {ctx: moved[i * r : (i + 1) * r] for i, ctx in enumerate(plan.concepts)}
            random_shift[cls] = moved[c * r :]
            scored[cls] = len(rows)
    return TCAVResult(
        layer=name,
        classes=list(scores),
        concepts=list(plan.concepts),
        concept_classes=plan.concept_classes,
        examples=examples,
        scored=scored,
        scores=scores,
        random_scores=random_scores,
        shift=shift,
        random_shift=random_shift,
        seed=int(seed),
        seconds=time.perf_counter() - t0,
    )


def tcav_raw(model: nn.Module, probes: ProbeSet, engine: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tcav`` evidence block of :func:`audit.pipeline.run_audit`: :meth:`TCAVResult.to_dict`, or ``{"error": ...}``.

    The options come from ``engine["tcav"]`` (``layer``, ``examples``, ``random_concepts``,
    ``probes``), the seed and the batch size from ``engine``. TCAV only corroborates, so a
    model or probe set it cannot handle is recorded as an error (shown as a finding) and
    the audit goes on; a ``layer`` the model does not have is the user's mistake.

    Raises:
        AuditConfigError: ``engine.tcav.layer`` names no module of the model.
    """
    # audit.config imports the methods; importing it here keeps this module light
    from audit.config import AuditConfigError

    opts = engine["tcav"]
    layer = opts.get("layer")
    if layer is not None:
        try:
            resolve_layer(model, layer)
        except AttributionError as err:
            raise AuditConfigError(f"engine.tcav.layer: {err}") from None
    try:
        res = tcav(
            model,
            probes,
            layer=layer,
            examples=int(opts["examples"]),
            random_concepts=int(opts["random_concepts"]),
            max_probes=int(opts["probes"]),
            seed=int(engine["seed"]),
            max_batch=engine.get("max_batch"),
        )
    except Exception as err:  # noqa: BLE001 - optional evidence: recorded and shown, the audit goes on
        return {"error": f"{type(err).__name__}: {err}"}
    return res.to_dict()


def tcav_test(concept: Sequence[float], random: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test that the concept's scores and the random ones share a mean.

    Two samples without spread (every CAV scored the same) give 1.0 when their values are
    equal and 0.0 when they differ: there is nothing left to doubt.
    """
    from scipy import stats

    a = [float(s) for s in concept]
    b = [float(s) for s in random]
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if max(a) == min(a) and max(b) == min(b):
        return 1.0 if a[0] == b[0] else 0.0
    with (
        warnings.catch_warnings()
    ):  # "precision loss" when one side is constant: the statistic is still exact
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else 1.0


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    v = [float(x) for x in values]
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return m, sd


def summary(block: Mapping[str, Any], confidence: float) -> list[dict[str, Any]]:
    """One row per (class, concept) of a ``tcav`` evidence block: the test at ``confidence``.

    Each row: ``class``, ``concept``, ``score`` and ``score_sd`` (over the CAVs),
    ``random`` and ``random_sd`` (the null CAVs), ``p`` (Welch, two-sided), ``p_adjusted``
    (Bonferroni over ``tests``, the number of rows), ``significant`` (``p_adjusted <
    1 - confidence``), ``direction`` ("rises" when the score is above the null's mean,
    else "falls"), ``shift`` and ``random_shift_sd`` (logits), ``scored`` and ``cavs``.
    """
    rows: list[dict[str, Any]] = []
    for cls, per in (block.get("scores") or {}).items():
        null = block["random_scores"][cls]
        null_shift = (block.get("random_shift") or {}).get(cls) or []
        for ctx, vals in per.items():
            score, score_sd = _mean_sd(vals)
            rnd, rnd_sd = _mean_sd(null)
            shift = _mean_sd(((block.get("shift") or {}).get(cls) or {}).get(ctx) or [])[0]
            rows.append(
                {
                    "class": cls,
                    "concept": ctx,
                    "score": score,
                    "score_sd": score_sd,
                    "random": rnd,
                    "random_sd": rnd_sd,
                    "p": tcav_test(vals, null),
                    "direction": "rises" if score > rnd else "falls",
                    "shift": shift,
                    "random_shift_sd": _mean_sd(null_shift)[1],
                    "scored": int((block.get("scored") or {}).get(cls, 0)),
                    "cavs": len(vals),
                }
            )
    alpha = 1.0 - float(confidence)
    for row in rows:
        p = row["p"]
        row["tests"] = len(rows)
        row["p_adjusted"] = min(1.0, p * len(rows)) if math.isfinite(p) else math.nan
        row["significant"] = bool(math.isfinite(p) and row["p_adjusted"] < alpha)
    return rows
