"""What every explainer and metric needs around a model, and undoes afterwards.

* :func:`preserved` is the one context manager that saves and restores the state an
  explainer may touch: ``model.training`` of every submodule, ``requires_grad`` and
  ``.grad`` of every parameter, the grad mode, forward/backward hooks and BatchNorm
  running statistics.
* :func:`resolve_target`, :func:`resolve_layer`, :func:`default_layer` and
  :func:`check_finite` turn user arguments into tensors and modules, with errors
  that name the value received and the valid choices.
* :func:`layer_outputs` and :func:`token_grid` say how a layer's output lies on the
  input's grid: a map ``[N, C, h, w]``, channels-last ``[N, h, w, C]``, or a
  transformer's tokens ``[N, T, C]`` (a class token, then the patches row by row).
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from audit.errors import AuditError

__all__ = [
    "AttributionError",
    "preserved",
    "hook_count",
    "model_device",
    "prepare_inputs",
    "resolve_target",
    "resolve_layer",
    "default_layer",
    "last_feature_map",
    "LeafCapture",
    "leaf_activation",
    "layer_outputs",
    "layer_layout",
    "map_layout",
    "token_grid",
    "LayerOutput",
    "check_finite",
    "chunks",
    "logits_problem",
]


class AttributionError(AuditError, ValueError):
    """An explainer or metric was called with arguments that cannot work; the message says why."""


def logits_problem(out: object, class_names: Sequence[str]) -> str | None:
    """Why ``out``, a model's output for probes of ``class_names``, is not logits ``[N, classes]``
    (one per class, in order); None when it is. The one output-shape check of the engine
    (:func:`audit.pipeline.run_audit`) and the training callbacks."""
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ""
        return (
            f"the model must return logits [N, classes]; it returned {type(out).__name__} {shape}"
        )
    if out.shape[1] != len(class_names):
        return (
            f"the probes' classes do not match the model's outputs: the probe set has "
            f"{len(class_names)} classes {class_names} but the model has {out.shape[1]} outputs; "
            f"classes.txt line i must name model output i"
        )
    return None


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(d: dict) -> bool:
    """Whether a module's ``__dict__`` holds a non-empty hook dict (most modules have none)."""
    return bool(
        d.get("_forward_hooks")
        or d.get("_forward_pre_hooks")
        or d.get("_backward_hooks")
        or d.get("_backward_pre_hooks")
    )


def _hook_keys(model: nn.Module | list[nn.Module]) -> dict[tuple[int, str], set[int]]:
    modules = model.modules() if isinstance(model, nn.Module) else model
    keys: dict[tuple[int, str], set[int]] = {}
    for m in modules:
        # hook dicts are instance attributes: reading __dict__ skips nn.Module.__getattr__
        d = m.__dict__
        if _has_hooks(d):
            for name in _HOOK_DICTS:
                if hooks := d.get(name):
                    keys[(id(m), name)] = set(hooks)
    return keys


def hook_count(model: nn.Module) -> int:
    """Forward, pre-forward and backward hooks on all submodules (for tests and guards)."""
    return sum(len(keys) for keys in _hook_keys(model).values())


def _remove_new_hooks(
    model: nn.Module | list[nn.Module], before: dict[tuple[int, str], set[int]]
) -> int:
    removed = 0
    for m in model.modules() if isinstance(model, nn.Module) else model:
        d = m.__dict__
        if not _has_hooks(d):
            continue
        for name in _HOOK_DICTS:
            hooks = d.get(name)
            if not hooks:
                continue
            for key in set(hooks) - before.get((id(m), name), set()):
                del hooks[key]
                removed += 1
    return removed


def _tree(model: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter], list[nn.Module]]:
    """Submodules, parameters and BatchNorm layers of ``model``, each once.

    ``model.modules()`` and ``model.parameters()`` walk the tree with nested generators:
    together with the passes for hooks and BatchNorms ~0.5 ms on a ResNet-50 on every
    explainer call, on a GPU at small batches a tenth of the work itself. Here one
    loop over ``__dict__`` (skipping ``nn.Module.__getattr__``) finds the modules.
    """
    modules: list[nn.Module] = []
    seen = {id(model)}
    stack = [model]
    while stack:
        m = stack.pop()
        modules.append(m)
        for c in reversed(m.__dict__["_modules"].values()):
            if c is not None and id(c) not in seen:
                seen.add(id(c))
                stack.append(c)
    # shared parameters once, in the order of first appearance
    params = {
        id(p): p for m in modules for p in m.__dict__["_parameters"].values() if p is not None
    }
    bns = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return modules, list(params.values()), bns


@contextmanager
def preserved(
    model: nn.Module, eval_mode: bool = True, grad: bool = True, freeze: bool = False
) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode and gradients on, then restore everything.

    Restores the ``training`` flag of every submodule, ``requires_grad`` and the
    ``.grad`` tensor object of every parameter, BatchNorm running statistics, and
    the global grad mode. Exceptions propagate (nothing is swallowed). A hook left
    on the model by the block is an error of the block: it is removed and reported.

    Args:
        model: the model to guard.
        eval_mode: put the model in eval mode inside the block.
        grad: enable gradients inside the block (the caller may be under
            ``torch.no_grad()``; ``torch.inference_mode()`` is exited too).
        freeze: set ``requires_grad=False`` on every parameter inside the block (no
            graph is built for the weights).
    """
    # one traversal of the module tree, reused below: on a GPU the explainers of a
    # ResNet-50 at small batches are bound by Python time
    modules, params, bns = _tree(model)
    training = [(m, m.training) for m in modules]
    if grad and any(p.is_inference() for p in params):
        raise AttributionError(
            "the model's parameters are inference tensors (the model was built or loaded under "
            "torch.inference_mode()), and autograd cannot differentiate through them; build or "
            "load the model outside torch.inference_mode() (calling the explainer inside it is fine)"
        )
    req = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    stats = _BufferSnapshot.take(model, bns)
    hooks_before = _hook_keys(modules)
    grad_before = torch.is_grad_enabled()
    try:
        # a model already in eval mode is left alone (train(False) sets every flag
        # through nn.Module.__setattr__)
        if eval_mode and any(flag for _, flag in training):
            # the flags themselves, as restored below: an exported program's module
            # (``ep.module()``) refuses eval(), its graph being fixed in the mode it was exported in
            for m, flag in training:
                if flag:
                    m.training = False
        if freeze:
            for p, r in zip(params, req, strict=True):
                if r:
                    p.requires_grad_(False)
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            yield model
    finally:
        for m, flag in training:
            if m.training != flag:  # nn.Module.__setattr__ is slow; most flags are unchanged
                m.training = flag
        for p, r, g in zip(params, req, grads, strict=True):
            if p.requires_grad != r:
                p.requires_grad_(r)
            if p.grad is not g:
                p.grad = g
        stats.restore()
        torch.set_grad_enabled(grad_before)
    left = _remove_new_hooks(modules, hooks_before)
    if left:
        raise RuntimeError(
            f"{left} hook(s) were left on the model by the code run inside preserved(); "
            "an explainer must remove its hooks (register them in a with-block or try/finally)"
        )


class _BufferSnapshot:
    """BatchNorm statistics saved before a block and put back where the block may have changed them.

    Comparing every buffer with ``torch.equal`` afterwards costs one device sync per
    buffer (159 on ResNet-50: several milliseconds on a GPU, more than an explainer's
    own work at small batches). Instead the snapshot is one concatenated copy per dtype
    (one kernel, no sync), and a buffer is restored when its version counter moved or
    its module's ``num_batches_tracked`` did: the native batch-norm kernel updates the
    running mean and variance without bumping their version counters, but every
    training-mode forward adds 1 to ``num_batches_tracked`` in Python, which does.
    """

    def __init__(self, buffers: list[torch.Tensor], counters: list[torch.Tensor | None]) -> None:
        self.buffers = buffers
        self.counters = counters  # per buffer: its module's num_batches_tracked (or None)
        self.versions = [b._version for b in buffers]
        self.counter_versions = [0 if c is None else c._version for c in counters]
        self.counted = all(c is not None for c in counters)
        self.offsets: list[int] = []
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        for b in buffers:
            key = (b.dtype, b.device)
            offset = sizes.get(key, 0)
            sizes[key] = offset + b.numel()
            groups.setdefault(key, []).append(b)
            self.offsets.append(offset)
        self.flat: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {
            k: torch.cat([t.detach().reshape(-1) for t in ts]) for k, ts in groups.items()
        }

    @classmethod
    def take(cls, model: nn.Module, bns: list[nn.Module]) -> _BufferSnapshot:
        """The snapshot of the buffers of ``model``'s BatchNorm layers ``bns``, reused while none moved.

        Reuse is safe only when every BatchNorm has a ``num_batches_tracked`` counter
        (then any change bumps a version the snapshot holds); otherwise a fresh copy is
        taken. Inference tensors (made under ``torch.inference_mode()``) cannot change
        outside it and are left out; a counter that is one cannot be watched.
        """
        buffers = [b for m in bns for b in m._buffers.values() if b is not None]
        old = _SNAPSHOTS.get(model)
        if (
            old is not None
            and len(old.buffers) == len(buffers)
            and all(
                map(operator.is_, buffers, old.buffers)
            )  # the same objects: same inference flags
            and [b._version for b in buffers] == old.versions
        ):
            return old
        kept: list[torch.Tensor] = []
        counters: list[torch.Tensor | None] = []
        counted = True
        for m in bns:
            counter = m._buffers.get("num_batches_tracked")
            if counter is not None and counter.is_inference():
                counter = None  # no version counter to watch: copy back always
            counted &= counter is not None
            for b in m._buffers.values():
                if b is not None and not b.is_inference():
                    kept.append(b)
                    counters.append(counter)
        snap = cls(kept, counters)
        if counted and len(kept) == len(buffers):
            _SNAPSHOTS[model] = snap
        return snap

    def restore(self) -> None:
        if self.counted and [b._version for b in self.buffers] == self.versions:
            return  # nothing moved (the counters are among the buffers): the common case
        with torch.no_grad():
            for b, version, counter, cv, offset in zip(
                self.buffers,
                self.versions,
                self.counters,
                self.counter_versions,
                self.offsets,
                strict=True,
            ):
                # without a counter a training-mode forward leaves no trace: copy back always
                if counter is None or b._version != version or counter._version != cv:
                    saved = self.flat[(b.dtype, b.device)][offset : offset + b.numel()]
                    b.copy_(saved.view_as(b))


_SNAPSHOTS: weakref.WeakKeyDictionary[nn.Module, _BufferSnapshot] = weakref.WeakKeyDictionary()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def prepare_inputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``inputs`` on the model's device that autograd can use.

    Tensors created under ``torch.inference_mode()`` cannot enter autograd; cloning
    outside inference mode gives a normal tensor. The caller's tensor is never
    modified.
    """
    if not isinstance(inputs, torch.Tensor):
        raise AttributionError(f"inputs must be a tensor [N, C, H, W]; got {type(inputs).__name__}")
    if inputs.ndim != 4:
        raise AttributionError(
            f"inputs must be a batch [N, C, H, W]; got shape {tuple(inputs.shape)} "
            "(add a batch dimension with x[None])"
        )
    if not inputs.is_floating_point():
        raise AttributionError(f"inputs must be floating point; got {inputs.dtype}")
    with torch.inference_mode(False):
        return inputs.detach().to(model_device(model)).clone()


def check_finite(output: torch.Tensor, what: str = "model output") -> None:
    """Raise if ``output`` holds NaN or Inf (an explanation of garbage is garbage)."""
    if not torch.isfinite(output).all():
        bad = (~torch.isfinite(output)).reshape(output.shape[0], -1).any(dim=1)
        rows = bad.nonzero().flatten().tolist()
        raise AttributionError(
            f"{what} contains NaN or Inf for input row(s) {rows[:10]}; check the model's "
            "weights and the input range (probes are in [0, 1] display space)"
        )


def resolve_target(target: int | torch.Tensor | list | None, logits: torch.Tensor) -> torch.Tensor:
    """Class indices ``[N]`` (long, on the logits' device) from an int, a tensor/list or None.

    None means the predicted class. Raises on an index outside the model's outputs.
    """
    if logits.ndim != 2:
        raise AttributionError(
            f"the model must return logits [N, classes]; got shape {tuple(logits.shape)}"
        )
    n, k = logits.shape[0], logits.shape[1]
    if target is None:
        return logits.detach().argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise AttributionError(f"target must hold class indices (integers); got dtype {t.dtype}")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(n)
    if t.ndim != 1 or t.shape[0] != n:
        raise AttributionError(
            f"target must be an int, None or one class index per input ({n}); got shape {tuple(t.shape)}"
        )
    bad = (t < 0) | (t >= k)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AttributionError(
            f"target {int(t[i])} (row {i}) is not a class index; the model has {k} outputs (0..{k - 1})"
        )
    return t


def _named(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name}


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """The ``(name, module)`` for a module name (``get_submodule``) or a module of the model."""
    named = _named(model)
    if isinstance(layer, nn.Module):
        for name, m in named.items():
            if m is layer:
                return name, m
        raise AttributionError("the layer module given is not a submodule of the model")
    if not isinstance(layer, str):
        raise AttributionError(
            f"layer must be a module name or a module; got {type(layer).__name__}"
        )
    try:
        return layer, model.get_submodule(layer)
    except (AttributeError, ValueError):
        convs = [n for n, m in named.items() if isinstance(m, nn.Conv2d)]
        blocks = [n for n in named if "." not in n]
        raise AttributionError(
            f"layer '{layer}' not found; top-level modules are: {', '.join(blocks)}; "
            f"conv layers are: {', '.join(convs)}"
        ) from None


#: At most this many leading tokens (class, distillation, register tokens) lie off the patch grid.
MAX_EXTRA_TOKENS = 8


def token_grid(tokens: int, size: tuple[int, int] | torch.Size) -> tuple[int, int, int] | None:
    """Where ``tokens`` tokens of a transformer lie on the patch grid of an input of ``size``.

    Returns ``(extra, h, w)``: the first ``extra`` tokens (a class token, ...) are off
    the grid, the others are ``h`` rows of ``w`` patches in row-major order (as a patch
    embedding flattens them). The grid has the input's aspect ratio, up to the
    rounding of a stride; the fewest extra tokens (at most :data:`MAX_EXTRA_TOKENS`,
    and fewer than the patch tokens) win. None when no grid fits.
    """
    height, width = int(size[0]), int(size[1])
    for extra in range(min(MAX_EXTRA_TOKENS, tokens - 1) + 1):
        p = tokens - extra
        if p <= extra:  # extra tokens are a few beside the patches: [N, 3, C] is no 1x1 grid
            break
        best: tuple[int, int, int] | None = None
        for a in range(1, math.isqrt(p) + 1):
            if p % a:
                continue
            for h, w in ((a, p // a), (p // a, a)):
                # |h/w - H/W| scaled by w*W: below max(H, W) for a grid of floor/ceil(H/s) x floor/ceil(W/s)
                off = abs(h * width - w * height)
                if off < max(height, width) and (best is None or off < best[0]):
                    best = (off, h, w)
        if best is not None:
            return extra, best[1], best[2]
    return None


@dataclass(frozen=True)
class LayerOutput:
    """One module's tensor output in a probe forward pass (see :func:`layer_outputs`).

    Attributes:
        name: the module's name in ``model.named_modules()``.
        shape: the output's shape (batch of one).
        layout: ``"NCHW"`` or ``"NHWC"`` (channels last) for a 4-d output whose grid has the
            input's aspect ratio (see :func:`map_layout`), ``"tokens"`` for ``[N, T, C]`` tokens
            that lie on the input's patch grid, None otherwise.
        grid: ``(extra, h, w)``: leading tokens off the grid (0 for maps) and the grid's
            height and width; None when the output is no grid.
        before_attention: the module finished before the last attention module started.
        in_attention: the module ran inside an attention module (a head's queries, keys,
            ``[N, heads, T, d]`` tensors): its output is no feature map of the network.
        passthrough: the module returned its input tensor itself (``nn.Identity``, dropout
            or drop-path in eval mode): its output is its predecessor's.
        runs: how many times the module ran in the forward pass.
    """

    name: str
    shape: tuple[int, ...]
    layout: str | None
    grid: tuple[int, int, int] | None
    before_attention: bool
    in_attention: bool = False
    passthrough: bool = False
    runs: int = 1


def _layout_switch(m: nn.Module) -> str | None:
    """The 4-d layout after ``m`` when it permutes NCHW <-> NHWC (torchvision's ``Permute``: Swin, ConvNeXt)."""
    dims = m.__dict__.get("dims")
    if isinstance(dims, (list, tuple)) and len(dims) == 4:
        if tuple(dims) == (0, 2, 3, 1):
            return "NHWC"
        if tuple(dims) == (0, 3, 1, 2):
            return "NCHW"
    return None


def _is_attention(m: nn.Module) -> bool:
    """An attention module: ``nn.MultiheadAttention`` or any module with an integer ``num_heads``
    (timm, torchvision) or ``num_attention_heads`` (Hugging Face transformers: ``ViTAttention``,
    ``SwinAttention``, ``BeitAttention``; without it a transformers ViT's default layer would be
    its final ``layernorm``, where only the class token reaches the head)."""
    heads = m.__dict__.get("num_heads", m.__dict__.get("num_attention_heads"))
    return isinstance(m, nn.MultiheadAttention) or (
        isinstance(heads, int) and not isinstance(heads, bool)
    )


def _fits(h: int, w: int, size: tuple[int, int]) -> bool:
    """An ``h x w`` grid (more than one cell) over an input of ``size``: no larger than the input,
    with its aspect ratio up to the rounding of a stride (as :func:`token_grid` asks of tokens)."""
    height, width = size
    return (
        h * w > 1
        and h <= height
        and w <= width
        and abs(h * width - w * height) < max(height, width)
    )


def map_layout(shape: tuple[int, ...], size: tuple[int, int], hint: str = "NCHW") -> str | None:
    """The layout of a 4-d output of ``shape`` on an input of ``size``: ``hint`` (the layout the
    model's permute modules give) when its grid fits the input (:func:`_fits`), else the other
    one when that fits (timm's Swin, MaxViT and DaViT keep maps channels-last with no permute
    module), else None: a 4-d tensor that is no map of the image (attention heads ``[N, heads, T, d]``)."""
    other = "NHWC" if hint == "NCHW" else "NCHW"
    for layout in (hint, other):
        h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
        if _fits(h, w, size):
            return layout
    return None


def layer_outputs(model: nn.Module, example: torch.Tensor) -> list[LayerOutput]:
    """The tensor output of every named module on ``example[:1]``, in the order the modules finish.

    One forward pass under ``no_grad`` with temporary hooks (cached per model, input
    size and device while the module count stays). Forward hooks record outputs;
    forward pre-hooks on attention modules record where each starts and which outputs
    are computed inside one. A 4-d output is channels-last (``NHWC``) after a module
    that permutes ``(0, 2, 3, 1)`` and until one that permutes back ``(0, 3, 1, 2)``
    (torchvision's ``Permute`` in Swin's ``features`` and ConvNeXt's blocks), or when only
    that reading gives a grid with the input's aspect ratio (:func:`map_layout`).
    """
    key = (tuple(example.shape[1:]), example.device.type)
    count = sum(1 for _ in model.modules())
    cached = _PROBES.get(model, {}).get(key)
    if cached is not None and cached[1] == count:
        return cached[0]
    # (name, shape, layout state, inside attention, passthrough); None: an attention module starts
    events: list[tuple[str, tuple[int, ...], str, bool, bool] | None] = []
    state = ["NCHW"]
    depth = [0]  # attention modules running
    handles = []

    def post(name: str, switch: str | None, innermost: bool):
        def fn(_m, args, out):
            if innermost:
                depth[0] -= 1
            if switch is not None:
                state[0] = switch  # the permute's own output has the new layout
            if isinstance(out, torch.Tensor):
                same = any(out is a for a in args)
                events.append((name, tuple(out.shape), state[0], depth[0] > 0, same))

        return fn

    def pre(innermost: bool):
        def fn(_m, _i):
            depth[0] += innermost
            events.append(None)

        return fn

    try:
        for name, m in _named(model).items():
            innermost = False
            if _is_attention(m):
                # a block that holds the attention (torchvision's EncoderBlock has num_heads too)
                # is no attention module itself: only what runs inside the innermost one is excluded
                innermost = not any(_is_attention(c) for c in m.modules() if c is not m)
                handles.append(m.register_forward_pre_hook(pre(innermost)))
            handles.append(m.register_forward_hook(post(name, _layout_switch(m), innermost)))
        with preserved(model, grad=False):
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    outputs = _outputs(events, (int(example.shape[-2]), int(example.shape[-1])))
    _PROBES.setdefault(model, {})[key] = (outputs, count)
    return outputs


def _outputs(events: list, size: tuple[int, int]) -> list[LayerOutput]:
    """The :class:`LayerOutput` of each recorded event (see :func:`layer_outputs`)."""
    last_attention = max((i for i, e in enumerate(events) if e is None), default=len(events))
    runs: dict[str, int] = {}
    for e in events:
        if e is not None:
            runs[e[0]] = runs.get(e[0], 0) + 1
    outputs: list[LayerOutput] = []
    for i, e in enumerate(events):
        if e is None:
            continue
        name, shape, state_4d, inside, same = e
        layout: str | None = None
        grid: tuple[int, int, int] | None = None
        if inside:  # an attention's internals (projections, a relative position bias [1, heads, T, T]): no grid
            pass
        elif len(shape) == 4 and (layout := map_layout(shape, size, state_4d)) is not None:
            grid = (0, shape[2], shape[3]) if layout == "NCHW" else (0, shape[1], shape[2])
        elif len(shape) == 3 and (grid := token_grid(shape[1], size)) is not None:
            layout = "tokens"
        outputs.append(
            LayerOutput(name, shape, layout, grid, i < last_attention, inside, same, runs[name])
        )
    return outputs


def layer_layout(model: nn.Module, example: torch.Tensor, name: str) -> str:
    """The layout (``"NCHW"`` or ``"NHWC"``) of module ``name``'s 4-d output for inputs like ``example``.

    Read from the probe pass of :func:`layer_outputs` (cached); ``NCHW`` when the output is
    no map there.
    """
    for out in reversed(layer_outputs(model, example)):
        if out.name == name and out.layout in ("NCHW", "NHWC"):
            return out.layout
    return "NCHW"


def default_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module]:
    """Grad-CAM's default layer: the last module, in execution order, whose output is a grid of the
    network's own features.

    A grid is a spatial map ``[N, C, h, w]`` (or channels-last ``[N, h, w, C]``, see
    :func:`layer_outputs`) with ``h*w > 1`` and the input's aspect ratio, or a transformer's
    tokens ``[N, T, C]`` that lie on the input's patch grid (:func:`token_grid`) and that
    come **before the last attention module starts**: a ViT's head reads only the class
    token after the last attention, so every later token output gets a zero gradient on
    all patch tokens (torchvision's ViT: ``encoder.layers.encoder_layer_<last>.ln_1``, the
    layer norm in front of the last self-attention). Never a candidate:

    * a module that returns its input tensor (``nn.Identity``, dropout or drop-path in eval
      mode, timm's ``norm_pre`` or ``k_norm``): it names another module's output;
    * a module run inside an attention module (its ``[N, heads, T, d]`` queries and keys);
    * a module run more than once per forward pass (a shared activation): Grad-CAM needs
      one output.

    Found with one forward pass on ``example[:1]`` (:func:`layer_outputs`); containers
    whose output equals a child's output are preferred over the child only when they
    run later (so torchvision ResNets give ``layer4``).
    """
    outputs = layer_outputs(model, example)
    grids = [o.name for o in outputs if _is_candidate(o)]
    if not grids:
        raise AttributionError(
            "no module of the model outputs a spatial feature map [N, C, h, w] with h*w > 1, nor "
            "transformer tokens [N, T, C] on the input's patch grid; pass layer=... explicitly"
        )
    # forward hooks fire when a module finishes: the last grid in that order belongs
    # to the outermost module that ends last (layer4 rather than layer4.1.relu)
    return grids[-1], model.get_submodule(grids[-1])


def _is_candidate(o: LayerOutput) -> bool:
    """Whether a module's output may be Grad-CAM's default layer (see :func:`default_layer`)."""
    if (
        o.grid is None
        or o.grid[1] * o.grid[2] < 2
        or o.passthrough
        or o.in_attention
        or o.runs != 1
    ):
        return False
    return o.layout != "tokens" or o.before_attention


def last_feature_map(model: nn.Module, example: torch.Tensor) -> str | None:
    """The last module, in execution order, whose output is a channels-first map ``[N, C, h, w]`` with ``h*w > 1``.

    None when there is none, or when transformer tokens come after it (a ViT's one map
    is its patch embedding, ``conv_proj``: its channels are no units of the network's
    reasoning). Found with one forward pass on ``example[:1]`` (:func:`layer_outputs`);
    torchvision's ResNets give ``layer4``, SmallCNN ``features``. The default layer of
    the activation-maximization callback and of network dissection
    (:mod:`audit.evidence.dissection`): both need units, i.e. channels.
    """
    name, tokens_after = None, False
    for o in layer_outputs(model, example):  # no_grad, the model's state kept (BatchNorm too)
        if o.layout == "NCHW" and o.grid is not None and o.grid[1] * o.grid[2] > 1:
            name, tokens_after = o.name, False
        elif o.layout == "tokens":
            tokens_after = True
    return None if tokens_after else name


class LeafCapture:
    """What :func:`leaf_activation`'s hook saw: the layer's last output as a grad-requiring leaf, and its calls."""

    def __init__(self) -> None:
        self.activation: torch.Tensor | None = None
        self.calls = 0


@contextmanager
def leaf_activation(module: nn.Module, who: str, name: str | None = None) -> Iterator[LeafCapture]:
    """Replace ``module``'s output by a grad-requiring leaf during the block; remove the hook after.

    ``torch.autograd.grad(score, capture.activation)`` then runs the backward only through
    the layers after ``module``; nothing before it needs a graph. Used by Grad-CAM and
    TCAV's directional derivatives. ``who`` and ``name`` word the error for a layer that
    does not output one tensor.
    """
    cap = LeafCapture()

    def hook(_m: nn.Module, _inp: tuple, out: object) -> torch.Tensor:
        cap.calls += 1
        if not isinstance(out, torch.Tensor):
            layer = f"'{name}'" if name is not None else "this layer"
            raise AttributionError(
                f"{who} needs a layer that outputs one tensor; {layer} returns {type(out).__name__}"
            )
        leaf = out.detach().requires_grad_(True)
        cap.activation = leaf
        # a clone, so that later in-place ops (e.g. `out += identity`) act on a
        # non-leaf and the captured activation keeps its values
        return leaf.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


_PROBES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def chunks(n: int, size: int | None) -> Iterator[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``size`` (all at once for None)."""
    if size is not None and size < 1:
        raise AttributionError(f"max_batch must be a positive integer; got {size}")
    step = n if size is None else size
    for s in range(0, n, max(step, 1)):
        yield slice(s, min(n, s + step))
