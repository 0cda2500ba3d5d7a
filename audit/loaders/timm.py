"""timm models (``model=timm``): a registered timm architecture with weights from a file.

``pip install 'model-audit[timm]'``. The config names the architecture as timm registers it
(``name: resnet18``; ``timm.list_models()`` lists them), ``num_classes``, the weights file
(``path``: ``.safetensors``, or a ``torch.save(model.state_dict())`` file read with
``weights_only=True``) and further constructor arguments (``kwargs``: ``drop_rate``,
``img_size``...). The network is built by ``timm.create_model(name, pretrained=False, ...)``:

* the name is checked against timm's registry before anything is built (an unknown name
  is refused with the closest registered ones);
* ``timm.create_model`` must be allowed by ``model.allowed_targets`` (checked by
  :mod:`audit.gate.loading` before this module is called);
* nothing is downloaded: ``pretrained`` must be false and no argument may name weights,
  a checkpoint or a cache (``pretrained_cfg``, ``checkpoint_path``, ``cache_dir``...);
  the weights come from ``path``;
* the arguments are plain values (strings, numbers, booleans, null, lists, mappings).

timm's pretrained config for the name gives the defaults the model was made for: its
``mean``/``std`` (the model is wrapped in :class:`audit.models.Normalized` unless
``model.normalization`` says otherwise) and its input size (``kwargs.img_size`` when given,
as timm's transformers take it; ``model.input_size`` overrides both), which
``probes.transform`` brings probe photos to.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from audit.errors import first_line
from audit.loaders import ModelLoadError
from audit.loaders.weights import read_state_dict
from audit.models import Normalized

__all__ = ["BUILDER", "KEYS", "TimmModel", "load_timm", "check_name", "input_size", "normalization"]

#: the dotted path ``model.allowed_targets`` must allow for ``model=timm``
BUILDER = "timm.create_model"
#: the keys of a ``model=timm`` config
KEYS = frozenset(
    {
        "kind",
        "name",
        "num_classes",
        "path",
        "kwargs",
        "pretrained",
        "input_size",
        "normalization",
        "allowed_targets",
    }
)
#: ``create_model`` arguments that the config sets elsewhere, or that fetch or read weights
_REFUSED = {
    "model_name": "set model.name instead",
    "num_classes": "set model.num_classes instead",
    "pretrained": "the audit downloads nothing: pass the weights file as model.path",
    "pretrained_cfg": "the audit downloads nothing: pass the weights file as model.path",
    "pretrained_cfg_overlay": "the audit downloads nothing: pass the weights file as model.path",
    "checkpoint_path": "the weights come from model.path only",
    "cache_dir": "the audit downloads nothing: pass the weights file as model.path",
    "pretrained_strict": "the weights come from model.path and must fit the architecture exactly",
}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_DEPTH = 16


@dataclass
class TimmModel:
    """A timm network built and loaded, with what :mod:`audit.gate.loading` records about it.

    Attributes:
        model: the network in eval mode, wrapped in ``Normalized`` with timm's mean/std
            unless the config gave its own normalization.
        name: the weights file's stem (the report's name).
        uri: the weights file.
        weights_sha256: SHA-256 of the bytes of the weights file read.
        input_size: ``(height, width)`` the model takes.
    """

    model: nn.Module
    name: str
    uri: str
    weights_sha256: str
    input_size: tuple[int, int]


def load_timm(src: Mapping[str, Any]) -> TimmModel:
    """Build ``src["name"]`` with ``timm.create_model`` and load ``src["path"]`` into it (strict).

    ``src`` is the ``model`` config (its ``allowed_targets`` already checked against
    :data:`BUILDER` by the caller).

    Raises:
        ModelLoadError: timm missing, ``pretrained`` set, an unknown name, refused or
            non-plain arguments, no weights file, weights that do not fit, or a bad size.
    """
    timm = _import_timm()
    if src.get("pretrained") not in (None, False):
        raise ModelLoadError(
            f"model.pretrained={src.get('pretrained')!r}: the audit downloads nothing and audits the weights "
            f"you give it: set model.pretrained=false and pass the weights file, e.g. model.path=weights.safetensors "
            f"(safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'))"
        )
    name = check_name(src.get("name"))
    num_classes = src.get("num_classes")
    if type(num_classes) is not int or num_classes < 1:
        raise ModelLoadError(
            f"model.num_classes must be a positive integer (the classes of the weights' head, e.g. "
            f"model.num_classes=2); got {num_classes!r}"
        )
    kwargs = _kwargs(src.get("kwargs"))
    path = src.get("path")
    if not isinstance(path, str) or not path:
        raise ModelLoadError(
            f"model.path must name the weights file (.safetensors, or a torch.save(model.state_dict()) file); "
            f"got {path!r}"
        )
    state, sha = read_state_dict(
        Path(path), f"model.path {path!r}"
    )  # read before anything is built
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except Exception as err:  # noqa: BLE001 - the architecture's own argument checks raise anything
        raise ModelLoadError(
            f"timm.create_model({name!r}, num_classes={num_classes}, **{kwargs!r}) failed "
            f"({type(err).__name__}: {first_line(err, 300)}); check model.kwargs against the architecture"
        ) from None
    _fit(model, state, name, path)
    model.eval()
    size = input_size(model, kwargs, src.get("input_size"))
    if src.get("normalization") is None:
        mean, std = normalization(model)
        model = Normalized(model, mean, std).eval()
    return TimmModel(
        model=model, name=Path(path).stem, uri=path, weights_sha256=sha, input_size=size
    )


def _import_timm() -> Any:
    try:
        import timm
    except ModuleNotFoundError as err:
        raise ModelLoadError(
            f"model.kind=timm needs the timm package ({err}); install the extra: pip install 'model-audit[timm]'"
        ) from None
    return timm


def check_name(name: Any) -> str:
    """``name`` if timm registers it (an architecture, optionally with a pretrained tag: ``resnet18.a1_in1k``).

    Raises:
        ModelLoadError: not a string, or not registered; the message lists the closest names.
    """
    timm = _import_timm()
    if not isinstance(name, str) or not name:
        raise ModelLoadError(
            f"model.name must be a timm model name such as 'resnet18' (timm.list_models()); got {name!r}"
        )
    arch, _, tag = name.partition(".")
    if timm.is_model(arch) and (not tag or name in timm.list_pretrained(arch + ".*")):
        return name
    known = timm.list_pretrained(arch + ".*") if timm.is_model(arch) else timm.list_models()
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else "timm.list_models('*part*') lists the names"
    raise ModelLoadError(
        f"model.name {name!r} is not a model timm registers ({hint}); set model.name to one of timm.list_models()"
    )


def _kwargs(value: Any) -> dict[str, Any]:
    """The checked ``model.kwargs``: identifiers mapped to plain values, none of :data:`_REFUSED`.

    Written here rather than shared with :mod:`audit.gate.loading`'s ``_target_`` checks: that
    module imports this one, and these arguments have their own refusals (:data:`_REFUSED`).
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ModelLoadError(
            f"model.kwargs must be a mapping of create_model arguments (e.g. {{drop_rate: 0.1}}); got {value!r}"
        )
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _IDENT.fullmatch(key) or key.startswith("_"):
            raise ModelLoadError(
                f"model.kwargs: {key!r} is not an argument name (a Python identifier, not _private)"
            )
        if key in _REFUSED:
            raise ModelLoadError(f"model.kwargs.{key} is refused: {_REFUSED[key]}")
        out[key] = _plain(item, f"model.kwargs.{key}", 0)
    return out


def _plain(value: Any, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ModelLoadError(f"{where} is nested deeper than {_MAX_DEPTH} levels")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if any(not isinstance(k, str) or k.startswith("_") for k in value):
            raise ModelLoadError(
                f"{where}: its keys must be plain names (no _target_ or other _keys); got {list(value)!r}"
            )
        return {k: _plain(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    raise ModelLoadError(
        f"{where} is a {type(value).__name__}; arguments must be plain values (strings, numbers, booleans, null, "
        f"lists and mappings of those)"
    )


def _fit(model: nn.Module, state: Mapping[str, Any], name: str, path: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = [
        f"{label}: {items[:3]}{f' (+{len(items) - 3} more)' if len(items) > 3 else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    if parts:
        raise ModelLoadError(
            f"the weights in {path!r} do not fit timm's {name!r}: {'; '.join(parts)}; model.name, "
            f"model.num_classes and model.kwargs must be those the weights were trained with"
        )
    model.load_state_dict(state, strict=True)


def input_size(model: nn.Module, kwargs: Mapping[str, Any], given: Any = None) -> tuple[int, int]:
    """The ``(height, width)`` the model takes: ``given`` (``model.input_size``), else
    ``kwargs["img_size"]`` (timm's transformers take their size as that argument), else the
    ``input_size`` of timm's pretrained config for the architecture."""
    where, value = "model.input_size", given
    if value is None and "img_size" in kwargs:
        where, value = "model.kwargs.img_size", kwargs["img_size"]
    if value is None:
        from timm.data import resolve_model_data_config

        where, value = (
            "timm's pretrained config",
            resolve_model_data_config(model)["input_size"][-2:],
        )
    pair = [value, value] if type(value) is int else value
    if (
        not isinstance(pair, Sequence)
        or isinstance(pair, str)
        or len(pair) != 2
        or not all(type(v) is int and v > 0 for v in pair)
    ):
        raise ModelLoadError(
            f"{where} must be one positive integer or [height, width]; got {value!r}"
        )
    return int(pair[0]), int(pair[1])


def normalization(model: nn.Module) -> tuple[list[float], list[float]]:
    """timm's pretrained ``(mean, std)`` for the architecture (``resolve_model_data_config``)."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    return [float(v) for v in config["mean"]], [float(v) for v in config["std"]]
