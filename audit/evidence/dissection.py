"""Network dissection on the probe masks: which units of a layer respond to the context, and what they carry.

After Bau et al. 2017 ("Network Dissection: Quantifying Interpretability of Deep Visual
Representations"). For each unit (channel) ``k`` of a layer:

* **Threshold.** ``T_k`` is the top ``quantile`` of the unit's activations over every
  probe and every pixel of its map upsampled (bilinearly) to the mask size, so the
  unit's firing region ``M_k = {S_k >= T_k}`` covers that share of the pixels. Bau et al.
  take the top 0.005 over a data set of 63,000 images with concepts of a few percent of
  an image each; here the concepts are large (the context is the whole image outside
  the object mask: 92% of a snow-wolf probe; one of its two contexts is about 46%), and
  an IoU can only reach ``min(q, A) / max(q, A)`` for a region of share ``q`` and a
  concept of area ``A``. The default ``q = 0.2`` lets a perfect detector of one of two
  contexts score 0.43, of a snow-wolf object 0.4, against 0.16 and 0.06 for a unit that
  fires at random. The quantile is that of :data:`SAMPLES` upsampled pixels per unit
  (random positions from a private generator, interpolated exactly as the maps are
  upsampled; every pixel when there are fewer): upsampling every map for an exact
  quantile was most of the cost. A unit whose top ``q`` reaches its minimum (a ReLU unit
  silent on more than ``1 - q`` of the pixels, or a dead one) fires where it is above that
  minimum: its floor is never a response.
* **IoU.** ``IoU_k(L) = sum |M_k & L| / sum |M_k | L|`` over the probe set, for the
  object concept ``L`` = the masks and the context concept(s): the complement of the
  masks, and, when the probes name their contexts (groups ``"<class>|<context>"``), the
  complement on the probes of each context (``snow``, ``grass``). The whole context is
  measured too, but with small objects it covers nearly every pixel, so its IoU is
  close to ``q`` for every unit (a unit firing at random scores ``q * A / (q + A - q * A)``);
  named contexts are what separate units. A unit is a **context unit** when its best
  concept (highest IoU) is a context concept (the named ones when there are any, else the
  whole context) and that IoU exceeds ``iou_threshold`` (Bau et al.: the unit "detects"
  its best concept).
* **Logit share.** The contribution of unit ``k`` to the logit of class ``c`` on a probe is
  ``sum over positions of a_k * d logit_c / d a_k`` (gradient times activation at the
  layer). For a global-average-pool + linear head (``logit_c = sum_k w_ck mean(a_k) + b_c``)
  this is exactly ``w_ck * mean(a_k)``, and the contributions add up to the logit minus
  its value with the layer zeroed; otherwise it is a first-order approximation. Every run
  measures how far off it is (:attr:`Dissection.completeness_error`: the mean absolute
  gap between the logit change and the summed contributions, over the mean absolute
  logit change; 0 up to rounding when exact). The **share** of class ``c`` carried by
  units ``S`` is, over the probes labelled ``c``, the sum of the positive contributions
  of the units in ``S`` to logit ``c`` over the sum of the positive contributions of all
  units: the share of the evidence *for* class ``c`` that those units supply (in [0, 1],
  additive over units; a ratio of sums, so probes with little evidence weigh little).
  A unit pushing against the class is not counted as carrying it.

Measured cost (this machine: 2 CPU cores shared with three other jobs, load about 6):
the demo's SmallCNN at ``features`` (64 units, 8x8 maps upsampled to 64x64) on 256
probes of 64 px took 9.2 to 9.5 s: 2.5 s for the forward and backward passes (and one
forward with the layer zeroed), 0.7 s for the thresholds, 6.3 s for the exact IoU counts
(every upsampled pixel, in blocks). Memory: the layer's maps of every probe
(``N * K * h * w`` floats; 4 MiB for 256 demo probes) plus one block of upsampled maps of at
most :data:`BLOCK_ELEMENTS` values. The model is restored (:func:`audit.engine.model.preserved`),
and it works under ``torch.inference_mode()``.

:func:`dissection_raw` is the audit's measuring step (a JSON-able block for
``report.json``); :mod:`audit.rules.dissection` turns it into a finding, which informs
and never votes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from audit.engine.model import (
    AttributionError,
    check_finite,
    last_feature_map,
    layer_layout,
    prepare_inputs,
    preserved,
    resolve_layer,
)
from audit.methods import rows_per_pass

__all__ = [
    "Dissection",
    "dissect",
    "dissection_raw",
    "dissection_pictures",
    "probe_contexts",
    "SAMPLES",
    "BLOCK_ELEMENTS",
]

#: Upsampled pixels per unit that its threshold is the quantile of (all, when there are fewer).
SAMPLES = 2**17
#: Most values of one block of upsampled maps (64 MiB of float32).
BLOCK_ELEMENTS = 2**24
#: Completeness errors below this count as exact (float32 rounding of the summed contributions).
EXACT = 1e-4


@dataclass(frozen=True)
class Dissection:
    """Per-unit IoUs and logit shares of one layer on one probe set (see the module docstring).

    Attributes:
        layer: the module's name.
        quantile: share of the upsampled pixels above each unit's threshold.
        iou_threshold: the IoU a context unit's best context concept must exceed.
        contexts: the context concepts units are labelled with: the probes' named
            contexts, or ``["context"]`` (the whole outside of the masks) without names.
        threshold: ``T_k`` per unit ``[K]``.
        iou_object: IoU with the object masks ``[K]``.
        iou_context: IoU with the whole context (outside the masks) ``[K]``.
        iou_contexts: IoU with each of ``contexts`` ``[len(contexts), K]``.
        areas: share of the probes' pixels each concept covers: ``object``, ``context``
            and each named context.
        share: ``[classes, K]``: per class (model output) the share of the positive
            contributions to its logit, over its probes, that each unit supplies
            (float64; NaN for a class without probes).
        class_probes: probes per class ``[classes]``.
        completeness_error: mean ``|logit change - sum of contributions|`` over mean
            ``|logit change|`` (the logit change: from the layer zeroed to the layer as
            it is); 0 up to rounding when the head after the layer is linear in it.
    """

    layer: str
    quantile: float
    iou_threshold: float
    contexts: list[str]
    threshold: torch.Tensor
    iou_object: torch.Tensor
    iou_context: torch.Tensor
    iou_contexts: torch.Tensor
    areas: dict[str, float]
    share: torch.Tensor
    class_probes: torch.Tensor
    completeness_error: float

    @property
    def units(self) -> int:
        return int(self.threshold.numel())

    @property
    def exact(self) -> bool:
        """Whether the contributions add up to the logit change (a GAP + linear head: yes)."""
        return self.completeness_error < EXACT

    def best_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per unit, the index into :attr:`contexts` of its best context concept and that IoU."""
        iou, idx = self.iou_contexts.max(dim=0)
        return idx, iou

    def context_units(self) -> list[int]:
        """Units whose best concept is a context above :attr:`iou_threshold`, most aligned first."""
        _, iou = self.best_context()
        hit = (iou > self.iou_threshold) & (iou > self.iou_object)
        units = hit.nonzero().flatten().tolist()
        return sorted(units, key=lambda k: (-float(iou[k]), k))

    def carried(self, units: Sequence[int]) -> torch.Tensor:
        """Per class, the share of its logit's positive contributions that ``units`` supply ``[classes]``."""
        idx = torch.as_tensor(list(units), dtype=torch.long)
        return (
            self.share[:, idx].sum(dim=1)
            if idx.numel()
            else torch.zeros(self.share.shape[0], dtype=self.share.dtype)
        )


def dissect(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    labels: torch.Tensor | Sequence[int],
    *,
    layer: str | nn.Module | None = None,
    contexts: torch.Tensor | Sequence[int] | None = None,
    context_names: Sequence[str] | None = None,
    quantile: float = 0.2,
    iou_threshold: float = 0.2,
    max_batch: int | None = None,
) -> Dissection:
    """Dissect ``layer`` of ``model`` on probes with object masks (see the module docstring).

    Args:
        model: a classifier returning logits ``[N, classes]`` (restored afterwards:
            mode, hooks, gradients, BatchNorm statistics).
        images: probes ``[N, C, H, W]`` (display space, as the model takes them).
        masks: object masks, bool ``[N, 1, H, W]`` or ``[N, H, W]`` at the images' size.
        labels: class index per probe ``[N]``: the logit whose share is measured.
        layer: module name or module with a channels-first output ``[N, K, h, w]``;
            None: the last such map of the forward pass (``features`` on SmallCNN,
            ``layer4`` on torchvision's ResNets; :func:`audit.engine.model.last_feature_map`,
            the activation-maximization callback's default too).
        contexts: optional context index per probe ``[N]`` into ``context_names``
            (e.g. from groups ``"<class>|<context>"``, :func:`probe_contexts`).
        context_names: the names of the contexts (needed with ``contexts``).
        quantile: share of the upsampled pixels above each unit's threshold, in (0, 1).
        iou_threshold: the IoU a context unit's best context concept must exceed, in [0, 1).
        max_batch: most probes per forward and backward pass (None: the memory budget's
            choice, :func:`audit.methods._common.rows_per_pass`).

    Returns:
        The :class:`Dissection` (tensors on the CPU).

    Raises:
        AttributionError: masks missing or of the wrong shape, labels or contexts that do
            not fit, a layer that is not found or has no channels-first map, or a quantile
            or threshold out of range.
    """
    x = prepare_inputs(model, images)
    n, _, h, w = x.shape
    m = _check_masks(masks, n, (h, w), x.device)
    y = _check_index(labels, n, "labels", x.device)
    if contexts is None:
        ctx, names = None, ["context"]
    else:
        if not context_names:
            raise AttributionError("contexts need context_names (one name per context index)")
        names = [str(c) for c in context_names]
        ctx = _check_index(contexts, n, "contexts", x.device)
        if int(ctx.max()) >= len(names):
            raise AttributionError(
                f"contexts holds index {int(ctx.max())}, but context_names has {len(names)} names"
            )
    if isinstance(quantile, bool) or not 0.0 < float(quantile) < 1.0:
        raise AttributionError(
            f"quantile must lie in (0, 1), e.g. 0.2 (the top fifth of the pixels); got {quantile!r}"
        )
    if isinstance(iou_threshold, bool) or not 0.0 <= float(iou_threshold) < 1.0:
        raise AttributionError(f"iou_threshold must lie in [0, 1), e.g. 0.2; got {iou_threshold!r}")
    name, module = _layer(model, layer, x)
    with preserved(model, freeze=True):
        chunk = (
            rows_per_pass(model, x[:1], max_batch, n) or n
        )  # may measure with one pass: in eval mode
        acts, contrib, classes, completeness = _forward(model, module, name, x, y, chunk)
    thr, floor = _thresholds(acts, (h, w), float(quantile))
    counts = _overlaps(acts, thr, floor, m, ctx, len(names), (h, w))
    share, per_class = _shares(contrib, y, classes)
    obj_area = m.sum(dtype=torch.float64)
    total = float(n * h * w)
    areas = {"object": float(obj_area) / total, "context": 1.0 - float(obj_area) / total}
    if ctx is not None:
        for j, c in enumerate(names):
            areas[c] = float(counts["area_by"][j]) / total
    return Dissection(
        layer=name,
        quantile=float(quantile),
        iou_threshold=float(iou_threshold),
        contexts=names,
        threshold=thr.cpu(),
        iou_object=counts["object"],
        iou_context=counts["context"],
        iou_contexts=counts["context_by"] if ctx is not None else counts["context"][None],
        areas=areas,
        share=share,
        class_probes=per_class,
        completeness_error=completeness,
    )


# --------------------------------------------------------------------------- checks
def _check_masks(masks: Any, n: int, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    if masks is None:
        raise AttributionError(
            "network dissection needs object masks (the probe set has none); give masks [N, 1, H, W] "
            "marking the object, e.g. a probe folder with a mask column (docs/probes.md)"
        )
    if not isinstance(masks, torch.Tensor):
        raise AttributionError(
            f"masks must be a bool tensor [N, 1, H, W]; got {type(masks).__name__}"
        )
    m = masks[:, None] if masks.ndim == 3 else masks
    if m.ndim != 4 or m.shape[0] != n or m.shape[1] != 1 or tuple(m.shape[2:]) != size:
        raise AttributionError(
            f"masks must be [N, 1, H, W] (or [N, H, W]) like the images, here [{n}, 1, {size[0]}, {size[1]}]; "
            f"got shape {tuple(masks.shape)}"
        )
    if m.dtype != torch.bool:
        if m.is_floating_point() or not bool(((m == 0) | (m == 1)).all()):
            raise AttributionError(
                f"masks must be bool (True on the object) or 0/1 integers; got dtype {m.dtype}"
            )
        m = m.bool()
    return m.to(device)


def _check_index(values: Any, n: int, what: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values)
    if t.is_floating_point() or t.dtype == torch.bool or t.ndim != 1 or t.shape[0] != n:
        raise AttributionError(
            f"{what} must hold one integer index per probe ({n}); got {t.dtype} of shape {tuple(t.shape)}"
        )
    if n and int(t.min()) < 0:
        raise AttributionError(f"{what} must be non-negative indices; got {int(t.min())}")
    return t.long().to(device)


def _layer(
    model: nn.Module, layer: str | nn.Module | None, x: torch.Tensor
) -> tuple[str, nn.Module]:
    if layer is None:
        name = last_feature_map(model, x[:1])
        if name is None:
            raise AttributionError(
                "network dissection found no channels-first feature map [N, C, h, w] with h*w > 1 in the "
                "model (or transformer tokens follow it); name a layer with units, e.g. layer='features'"
            )
        return name, model.get_submodule(name)
    name, module = resolve_layer(model, layer)
    if layer_layout(model, x[:1], name) != "NCHW":
        raise AttributionError(
            f"layer '{name}' outputs a channels-last map [N, h, w, C]; dissection needs channels-first "
            "units: name the layer after the permute back (or before it)"
        )
    return name, module


# --------------------------------------------------------------------------- measuring
def _forward(
    model: nn.Module, module: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The layer's maps ``[N, K, h, w]``, each unit's contribution to the label's logit
    ``[N, K]`` (float64, CPU), the number of classes and the completeness error."""
    captured: list[torch.Tensor] = []
    zero = [False]

    def hook(_m: nn.Module, _inp: tuple, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AttributionError(
                f"layer '{name}' must output a map [N, C, h, w]; it returns {got}"
            )
        if zero[0]:
            return torch.zeros_like(out)
        # a leaf: the backward stops at the layer (nothing before it is needed), and it
        # has a gradient with the weights frozen and the inputs not requiring one
        leaf = out.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    acts: list[torch.Tensor] = []
    parts: list[torch.Tensor] = []
    gap = change = 0.0
    classes = 0
    handle = module.register_forward_hook(hook)
    try:
        for s in range(0, x.shape[0], chunk):
            xb, yb = x[s : s + chunk], y[s : s + chunk]
            captured.clear()
            logits = model(xb)
            if len(captured) != 1:
                raise AttributionError(
                    f"layer '{name}' ran {len(captured)} times in one forward pass; dissection needs a layer "
                    "that runs once (name one module of the path to the output)"
                )
            check_finite(logits)
            if logits.ndim != 2:
                raise AttributionError(
                    f"the model must return logits [N, classes]; got shape {tuple(logits.shape)}"
                )
            if int(yb.max()) >= logits.shape[1]:
                raise AttributionError(
                    f"label {int(yb.max())} is not a class index; the model has {logits.shape[1]} outputs"
                )
            act = captured[0]
            picked = logits.gather(1, yb[:, None])[:, 0]
            (grad,) = torch.autograd.grad(picked.sum(), act)
            c = (act.detach() * grad).sum(dim=(2, 3)).double()  # [n, K]: to the label's logit
            classes = int(logits.shape[1])
            parts.append(c.cpu())
            acts.append(act.detach().float())
            zero[0] = True
            try:
                with torch.no_grad():
                    base = model(xb).gather(1, yb[:, None])[:, 0]
            finally:
                zero[0] = False
            delta = (picked.detach() - base).double()
            gap += float((delta - c.sum(dim=1)).abs().sum())
            change += float(delta.abs().sum())
    finally:
        handle.remove()
    completeness = gap / change if change > 0 else 0.0
    return torch.cat(acts), torch.cat(parts), classes, completeness


def _blocks(n: int, k: int, size: tuple[int, int]) -> Iterator[tuple[slice, slice]]:
    """(probe rows, units) blocks whose upsampled maps hold at most :data:`BLOCK_ELEMENTS` values."""
    pixels = size[0] * size[1]
    units = max(1, min(k, BLOCK_ELEMENTS // pixels))
    rows = max(1, BLOCK_ELEMENTS // (units * pixels))
    for u in range(0, k, units):
        for r in range(0, n, rows):
            yield slice(r, min(n, r + rows)), slice(u, min(k, u + units))


def _upsampled(
    acts: torch.Tensor, rows: slice, units: slice, size: tuple[int, int]
) -> torch.Tensor:
    return F.interpolate(acts[rows, units], size=size, mode="bilinear", align_corners=False)


def _thresholds(
    acts: torch.Tensor, size: tuple[int, int], q: float, samples: int = SAMPLES, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``T_k``: the top ``q`` quantile of unit ``k``'s upsampled values, and the floor flags.

    From ``samples`` pixels per unit (all of them when there are fewer): the same random
    pixel positions of every probe for every unit, drawn from a private generator and
    interpolated exactly as :func:`F.interpolate` does (``grid_sample``, bilinear,
    ``align_corners=False``, border clamping). Upsampling every map for an exact
    quantile was most of the cost (the 8x8 maps of 256 demo probes are 67 million pixels
    at 64x64); the quantile of ``2**17`` samples is off by about 0.002 in probability.
    """
    n, k, _, _ = acts.shape
    height, width = size
    per_probe = -(-samples // max(n, 1))
    dev = acts.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    if per_probe >= height * width:  # few probes: every pixel
        ys, xs = torch.meshgrid(
            torch.arange(height, device=dev), torch.arange(width, device=dev), indexing="ij"
        )
        iy, ix = ys.reshape(1, -1).expand(n, -1), xs.reshape(1, -1).expand(n, -1)
    else:
        iy = torch.randint(height, (n, per_probe), generator=gen, device=dev)
        ix = torch.randint(width, (n, per_probe), generator=gen, device=dev)
    grid = torch.stack([(2 * ix + 1) / width - 1, (2 * iy + 1) / height - 1], dim=-1).to(
        acts.dtype
    )[:, :, None, :]
    count = n * iy.shape[1]
    keep = max(
        1, min(count, round(q * count))
    )  # values at or above T: the top `keep` of the sample
    thr = torch.empty(k, dtype=acts.dtype, device=dev)
    step = max(1, BLOCK_ELEMENTS // count)
    for u in range(0, k, step):
        vals = F.grid_sample(
            acts[:, u : u + step], grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        flat = vals[..., 0].permute(1, 0, 2).reshape(vals.shape[1], -1)  # [units, probes * pixels]
        thr[u : u + step] = flat.kthvalue(count - keep + 1, dim=1).values
    floor = thr <= acts.amin(
        dim=(0, 2, 3)
    )  # the quantile is the unit's minimum: it fires only above it
    return thr, floor


def _overlaps(
    acts: torch.Tensor,
    thr: torch.Tensor,
    floor: torch.Tensor,
    masks: torch.Tensor,
    ctx: torch.Tensor | None,
    n_ctx: int,
    size: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """IoUs with the object, the whole context and each named context (float64, CPU)."""
    n, k = acts.shape[:2]
    dev = acts.device
    fired = torch.zeros(k, dtype=torch.float64, device=dev)
    on_obj = torch.zeros(k, dtype=torch.float64, device=dev)
    ctx_by = torch.zeros(n_ctx, k, dtype=torch.float64, device=dev)
    # a unit at its floor fires strictly above it: the next float up
    t_eff = torch.where(floor, torch.nextafter(thr, torch.full_like(thr, float("inf"))), thr)
    obj_px = masks.flatten(1).sum(dim=1).double()  # [N]
    ctx_px = size[0] * size[1] - obj_px
    for rows, units in _blocks(n, k, size):
        up = _upsampled(acts, rows, units, size)
        fire = up >= t_eff[units].view(1, -1, 1, 1)
        per = fire.flatten(2).sum(dim=2).double()  # [n, kb]
        obj = (fire & masks[rows]).flatten(2).sum(dim=2).double()
        fired[units] += per.sum(dim=0)
        on_obj[units] += obj.sum(dim=0)
        if ctx is not None:
            ctx_by[:, units].index_add_(0, ctx[rows], per - obj)
    obj_total, ctx_total = obj_px.sum(), ctx_px.sum()
    iou_obj = on_obj / (fired + obj_total - on_obj).clamp_min(1)
    on_ctx = fired - on_obj
    iou_ctx = on_ctx / (fired + ctx_total - on_ctx).clamp_min(1)
    out = {"object": iou_obj.cpu(), "context": iou_ctx.cpu()}
    if ctx is not None:
        area = torch.zeros(n_ctx, dtype=torch.float64, device=dev).index_add_(0, ctx, ctx_px)
        # |M_k| counts every probe; the union with context j is |M_k| + |L_j| - |M_k & L_j|
        out["context_by"] = (ctx_by / (fired[None] + area[:, None] - ctx_by).clamp_min(1)).cpu()
        out["area_by"] = area.cpu()
    return out


def _shares(
    contrib: torch.Tensor, y: torch.Tensor, classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``share [classes, K]`` (NaN rows for classes without probes) and probes per class."""
    y = y.cpu()
    pos = contrib.clamp_min(0.0)  # [N, K]: to each probe's own label's logit
    per_class = torch.bincount(y, minlength=classes)
    share = torch.full((classes, contrib.shape[1]), float("nan"), dtype=torch.float64)
    for c in range(classes):
        rows = y == c
        if not bool(rows.any()):
            continue
        p = pos[rows].sum(dim=0)  # [K]
        total = float(p.sum())
        share[c] = p / total if total > 0 else torch.zeros_like(p)
    return share, per_class


# --------------------------------------------------------------------------- the audit's step
def probe_contexts(probes: Any) -> tuple[torch.Tensor | None, list[str] | None]:
    """Per probe the index of its context and the context names, from groups ``"<class>|<context>"``.

    ``(None, None)`` when the probe set has no groups, or fewer than two named contexts.
    """
    from audit.evidence.behaviour import split_group

    if getattr(probes, "groups", None) is None:
        return None, None
    per_group = [split_group(g)[1] for g in probes.group_names]
    names = sorted({c for c in per_group if c})
    if len(names) < 2 or any(not c for c in per_group):
        return None, None
    index = torch.tensor([names.index(per_group[int(g)]) for g in probes.groups], dtype=torch.long)
    return index, names


def dissection_raw(model: nn.Module, probes: Any, engine: Mapping[str, Any]) -> dict[str, Any]:
    """The audit's dissection block: plain numbers for ``report.json`` (``{"error": ...}`` on failure).

    Dissects ``engine.dissection.layer`` on at most ``engine.dissection.probes`` probes
    (spread over the groups). A layer the user named that the model does not have is a
    config error (:class:`audit.config.AuditConfigError`, exit 2); any other failure of
    this optional evidence (a model it cannot handle) is recorded, never raised.
    """
    from audit.config import AuditConfigError  # audit.config imports the methods: kept lazy
    from audit.engine.rows import pick_rows

    opts = engine["dissection"]
    if opts["layer"] is not None:
        try:
            resolve_layer(model, opts["layer"])
        except AttributionError as err:
            raise AuditConfigError(f"engine.dissection.layer: {err}") from None
    t0 = time.perf_counter()
    rows = pick_rows(len(probes), int(opts["probes"]), probes.groups)
    sub = probes.subset(rows)
    ctx, names = probe_contexts(sub)
    try:
        d = dissect(
            model,
            sub.images,
            sub.masks,
            sub.labels,
            layer=opts["layer"],
            contexts=ctx,
            context_names=names,
            quantile=float(opts["quantile"]),
            iou_threshold=float(opts["iou_threshold"]),
            max_batch=int(engine["max_batch"]),
        )
    except (AttributionError, RuntimeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return to_raw(d, list(probes.class_names), probes=len(rows), seconds=time.perf_counter() - t0)


def to_raw(d: Dissection, class_names: Sequence[str], **extra: Any) -> dict[str, Any]:
    """A :class:`Dissection` as plain numbers (the ``dissection`` block of ``report.json``)."""
    named = d.contexts != ["context"] or d.iou_contexts.shape[0] != 1
    return {
        "layer": d.layer,
        "units": d.units,
        "quantile": d.quantile,
        "iou_threshold": d.iou_threshold,
        "classes": [str(c) for c in class_names],
        "class_probes": [int(v) for v in d.class_probes.tolist()],
        "contexts": list(d.contexts) if named else [],
        "areas": dict(d.areas),
        "threshold": d.threshold.tolist(),
        "iou_object": d.iou_object.tolist(),
        "iou_context": d.iou_context.tolist(),
        "iou_contexts": {c: d.iou_contexts[j].tolist() for j, c in enumerate(d.contexts)}
        if named
        else {},
        "share": {
            str(c): d.share[i].tolist() for i, c in enumerate(class_names) if i < d.share.shape[0]
        },
        "completeness_error": d.completeness_error,
        **extra,
    }


def dissection_pictures(
    model: nn.Module,
    block: Mapping[str, Any] | None,
    engine: Mapping[str, Any],
    size: int | tuple[int, int] = 64,
) -> dict[str, Any] | None:
    """Activation-maximization images of the units the report lists (at most ``engine.dissection.show``).

    Returns ``{"layer", "units", "images" [U, 3, H, W] in [0, 1], "activations" [U]}``
    (CPU tensors), or None when there is nothing to show. One batched optimisation of
    every listed unit (:func:`audit.methods.activation_maximization`, seeded by
    ``engine.seed``).
    """
    from audit.methods import activation_maximization
    from audit.rules.dissection import context_units

    opts = engine["dissection"]
    if not block or "error" in block or int(opts["show"]) <= 0:
        return None
    units = context_units(block)[: int(opts["show"])]
    if not units:
        return None
    try:
        with torch.inference_mode(False):
            images, acts = activation_maximization(
                model,
                block["layer"],
                units,
                steps=int(opts["actmax_steps"]),
                size=size,
                seed=int(engine["seed"]),
            )
    except (
        AttributionError,
        RuntimeError,
    ):  # pictures are optional: the table is shown without them
        return None
    return {
        "layer": block["layer"],
        "units": units,
        "images": images.detach().cpu(),
        "activations": acts.detach().cpu(),
    }
