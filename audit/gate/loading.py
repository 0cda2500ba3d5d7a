"""Loading a candidate model for an audit, and logging models so that they can be audited.

:func:`load_model` takes the ``model`` mapping of the audit config:

* ``{"kind": "mlflow", "uri": "models:/name@alias" | "models:/name/3" | "runs:/<run>/model",
  "allow_pickle": False, "max_bytes": 2**31}``: the safe layout of :func:`log_model_safely`
  (``net.json`` + ``state_dict.pth`` or ``model.safetensors``, read without pickle), MLflow 3's
  default "pt2" format (``torch.export``; vetted, loaded with no code from the file run and
  unflattened: :mod:`audit.loaders.pt2`), or an MLflow pytorch model saved with
  ``serialization_format="pickle"`` (only with ``allow_pickle``: unpickling runs code).
* ``{"kind": "checkpoint", "path": "x.ckpt", "module": "audit.training.Classifier"}``.
* ``{"kind": "state_dict", "target": {"_target_": ...}, "path": "weights.pt"}`` (or
  ``weights.safetensors``).
* ``{"kind": "timm", "name": "resnet18", "num_classes": 2, "path": "w.safetensors", "kwargs": {}}``:
  built by ``timm.create_model`` (which ``allowed_targets`` must allow), with timm's own
  normalization and input size by default (:mod:`audit.loaders.timm`).

Every kind accepts ``normalization: {mean: [...], std: [...]}`` (wraps the model in
:class:`audit.models.Normalized`), ``name`` (overrides the report name) and
``allowed_targets`` (see below). Problems raise :class:`ModelLoadError` naming the
problem and the fix.

Every model file is treated as written by an attacker. A network config (``net.json``,
a checkpoint's ``hyper_parameters``, ``model.target``) is built by :func:`build_network`,
never by Hydra's ``instantiate``: its one ``_target_`` is imported only when the dotted
path matches a glob of ``model.allowed_targets`` (default :data:`DEFAULT_ALLOWED_TARGETS`),
checked on the string before anything is imported (a ``*`` never matches a private name
such as ``_api`` nor the packages of :data:`EXPLICIT_ONLY`: a pattern must name them);
it must name an ``nn.Module`` subclass or a function whose return annotation names one,
checked before it is called; its arguments must be plain JSON values with no Hydra
special keys (``_target_``, ``_args_``, ...) anywhere; no argument, given or by default,
may ask for pretrained weights (``weights``, ``weights_backbone``, ``pretrained``...).
While a model loads, :func:`no_downloads` makes every ``torch.hub`` download and
torchvision's ``WeightsEnum.get_state_dict`` raise.

A registry version is resolved and downloaded in the named store only, from its own
run's or logged model's artifacts: a source outside the run's artifacts and its
experiment's artifact location, ``..``, encoded traversal or backslashes in any URI,
or a symbolic link out of the model folder are refused before anything is copied. The
store's listing must hold at most ``max_bytes`` (``model.max_bytes``, default
:data:`DEFAULT_MAX_BYTES`), and the copy is measured again on disk, in a
:func:`temporary_folder` removed on every exit.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import dataclasses
import enum
import fnmatch
import functools
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from audit.errors import first_line
from audit.gate import tracking
from audit.loaders import ModelLoadError
from audit.loaders.huggingface import (
    is_mlflow_transformers,
    load_mlflow_transformers,
    mlflow_weights_sha256,
)
from audit.loaders.weights import read_state_dict
from audit.models import Normalized

__all__ = [
    "ModelLoadError",
    "LoadedModel",
    "VersionIdentity",
    "load_model",
    "read_identity",
    "version_weights_sha256",
    "weights_file",
    "log_model_safely",
    "build_network",
    "check_target",
    "allowed_targets",
    "current_allowed_targets",
    "DEFAULT_ALLOWED_TARGETS",
    "DEFAULT_MAX_BYTES",
    "EXPLICIT_ONLY",
    "SAFE_FILES",
    "SAFETENSORS_FILE",
    "no_downloads",
    "temporary_folder",
    "check_folder_size",
]

NET_FILE = "net.json"
WEIGHTS_FILE = "state_dict.pth"
#: the safe layout's weights as safetensors, read instead of WEIGHTS_FILE when present
SAFETENSORS_FILE = "model.safetensors"
NORMALIZATION_FILE = "normalization.json"
SAFE_FILES = (NET_FILE, WEIGHTS_FILE, NORMALIZATION_FILE)
KINDS = ("mlflow", "checkpoint", "state_dict", "timm", "huggingface")
_KEYS = {
    "mlflow": {
        "kind",
        "uri",
        "allow_pickle",
        "normalization",
        "name",
        "allowed_targets",
        "max_bytes",
    },
    "checkpoint": {"kind", "path", "module", "normalization", "name", "allowed_targets"},
    "state_dict": {"kind", "target", "path", "normalization", "name", "allowed_targets"},
    "timm": {
        "kind",
        "name",
        "num_classes",
        "path",
        "kwargs",
        "pretrained",
        "input_size",
        "normalization",
        "allowed_targets",
    },
    "huggingface": {"kind", "path", "normalization", "name", "max_bytes"},
}
#: globs of the ``_target_`` paths a model file may name unless ``model.allowed_targets`` says otherwise
DEFAULT_ALLOWED_TARGETS = ("audit.models.*", "torchvision.models.*")
#: packages whose builders change process-wide settings (``quantize=True`` switches
#: ``torch.backends.quantized.engine``): a ``*`` never reaches into them, a pattern must name them
EXPLICIT_ONLY = ("torchvision.models.quantization",)
#: the most bytes a model download may hold unless ``model.max_bytes`` says otherwise (2 GiB)
DEFAULT_MAX_BYTES = 2 * 1024**3
#: Hydra's special keys: only a top-level ``_target_`` is honoured, the others are refused everywhere
HYDRA_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})
#: torchvision's flag for a random initialization (VGG, GoogLeNet, Inception3), not a download
_NOT_WEIGHTS = frozenset({"init_weights"})
_GLOB_CHARS = frozenset("*?[")
#: string arguments that a builder resolves by fetching or reading files (timm's model names)
_FETCHED_NAMES = ("hf-hub:", "hf_hub:", "local-dir:", "http://", "https://", "file:")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GLOB = re.compile(r"[A-Za-z0-9_.*?\[\]!]+")
_MAX_DEPTH = 32
_PLAIN = "plain values (strings, numbers, booleans, null, lists and mappings of those)"
# the allow-list in force while the loader calls LightningModule.load_from_checkpoint;
# None outside it (training from one's own configs: any importable network)
_CHECKPOINT_ALLOWED: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "audit_allowed_targets", default=None
)
_HOW_TO_LOG = (
    "log it with mlflow.pytorch.log_model(model.eval(), name='model', input_example=x) (MLflow's "
    "default pt2 format), with audit.gate.loading.log_model_safely(model, net_config) (a _target_ mapping "
    "and a state_dict), or with serialization_format='pickle' and allow_pickle: true"
)


@dataclass
class LoadedModel:
    """A model ready to audit.

    Attributes:
        model: the network, in eval mode (wrapped in ``Normalized`` if configured).
        name: a short name for report folders (registered name, run id or file stem).
        version: the registered version, else None.
        uri: where it came from (model URI or file path).
        registered_name: the registered model when loaded from a registry version.
        registered_version: that version (the gate tags it).
        kind: ``mlflow``, ``checkpoint``, ``state_dict`` or ``timm``.
        layout: ``safe``, ``pt2``, ``pickle``, ``checkpoint``, ``state_dict`` or ``timm``.
        weights_sha256: SHA-256 (hex) of the bytes of the weights actually audited: the
            downloaded ``state_dict.pth``, the checkpoint file, the state_dict file, or the
            data file of a pickled MLflow model.
        identity: for a registry version, what identifies it (see :class:`VersionIdentity`).
        input_size: the ``(height, width)`` the model expects when its source says so (an
            exported program's fixed input, a timm or Hugging Face config); None when any
            size works. Probe images of another size are brought to it by ``probes.transform``.
    """

    model: nn.Module
    name: str
    version: str | None
    uri: str
    registered_name: str | None = None
    registered_version: str | None = None
    kind: str = "mlflow"
    layout: str = "safe"
    weights_sha256: str = ""
    identity: VersionIdentity | None = None
    input_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class VersionIdentity:
    """What identifies the registry version an audit judged, recorded when it was loaded.

    A version deleted and registered again under the same name and number, or whose
    source now points at other weights, no longer matches: the gate compares this record
    with the registry right before each write (:func:`read_identity`) and re-hashes the
    weights the version points to before the alias moves (:func:`version_weights_sha256`).

    Attributes:
        registered_name: the registered model.
        version: the version number, as a string.
        source: the version's ``source`` URI.
        run_id: the version's run id ("" when it has none).
        creation_timestamp: the version's creation time (ms since the epoch; 0 if unknown).
        weights_sha256: SHA-256 (hex) of the weights file read when it was loaded.
    """

    registered_name: str
    version: str
    source: str
    run_id: str
    creation_timestamp: int
    weights_sha256: str = ""

    def same_version(self, other: VersionIdentity) -> bool:
        """Whether ``other`` (read from the registry later) is the version recorded here."""
        return (
            self.registered_name,
            self.version,
            self.source,
            self.run_id,
            self.creation_timestamp,
        ) == (
            other.registered_name,
            other.version,
            other.source,
            other.run_id,
            other.creation_timestamp,
        )

    def differences(self, other: VersionIdentity) -> list[str]:
        """``"field: recorded -> now"`` for each field of the version that differs in ``other``."""
        return [
            f"{key}: {getattr(self, key)!r} -> {getattr(other, key)!r}"
            for key in ("source", "run_id", "creation_timestamp", "weights_sha256")
            if getattr(other, key) and getattr(self, key) != getattr(other, key)
        ]


# --------------------------------------------------------------------------- entry point
def load_model(source: Mapping[str, Any], tracking_uri: str | None = None) -> LoadedModel:
    """Load the candidate described by ``source`` (see the module docstring), in eval mode.

    Args:
        source: the ``model`` config mapping (a dict or an OmegaConf ``DictConfig``).
        tracking_uri: MLflow tracking URI for ``kind: mlflow``; None uses
            :func:`audit.gate.tracking.tracking_uri`.

    Raises:
        ModelLoadError: the source is malformed, missing, unsafe or does not fit.
    """
    src = _plain(source)
    kind = src.get("kind")
    if kind not in KINDS:
        raise ModelLoadError(f"model.kind must be one of {list(KINDS)}; got {kind!r}")
    unknown = sorted(set(src) - _KEYS[kind])
    if unknown:
        raise ModelLoadError(
            f"unknown key(s) {unknown} for model.kind={kind!r}; valid keys are {sorted(_KEYS[kind])}"
        )
    allowed = allowed_targets(src.get("allowed_targets"))
    with no_downloads():  # a pickled model or a checkpoint's module downloads nothing either
        if kind == "mlflow":
            loaded = _from_mlflow(src, tracking.tracking_uri(tracking_uri), allowed)
        elif kind == "checkpoint":
            loaded = _from_checkpoint(src, allowed)
        elif (
            kind == "timm"
        ):  # audit.loaders.timm; its builder is checked against the allow-list first
            loaded = _from_timm(src, allowed)
        elif kind == "huggingface":  # audit/loaders/huggingface.py
            loaded = _from_huggingface(src)
        else:
            loaded = _from_state_dict(src, allowed)
    if src.get("normalization") is not None:
        if isinstance(loaded.model, Normalized):
            raise ModelLoadError(
                f"{loaded.uri} already carries its normalization ({NORMALIZATION_FILE}); "
                f"remove model.normalization from the config, or it would be applied twice"
            )
        loaded.model = _normalized(loaded.model, src["normalization"], "model.normalization")
    if src.get("name") and kind != "timm":  # model=timm: name is the architecture
        loaded.name = str(src["name"])
    loaded.model.eval()
    return loaded


def _plain(source: Mapping[str, Any], what: str = "the model source") -> dict[str, Any]:
    """A plain dict from a mapping or an OmegaConf ``DictConfig`` (interpolations resolved)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(source, DictConfig):
        return OmegaConf.to_container(source, resolve=True)
    if not isinstance(source, Mapping):
        raise ModelLoadError(
            f"{what} must be a mapping (e.g. {{'kind': 'mlflow', 'uri': 'models:/name@champion'}}); "
            f"got {type(source).__name__}"
        )
    return dict(source)


def _normalized(model: nn.Module, spec: Any, where: str) -> nn.Module:
    if not isinstance(spec, Mapping) or not {"mean", "std"} <= set(spec):
        raise ModelLoadError(f"{where} must be a mapping {{mean: [...], std: [...]}}; got {spec!r}")
    mean, std = spec["mean"], spec["std"]
    if not isinstance(mean, Sequence) or not isinstance(std, Sequence):
        raise ModelLoadError(
            f"{where}: mean and std must be lists with one value per channel; got {spec!r}"
        )
    # probe images are RGB: one value per channel, never a single value broadcast over three
    if isinstance(mean, str) or isinstance(std, str) or len(mean) != 3 or len(std) != 3:
        raise ModelLoadError(
            f"{where}: mean and std need exactly 3 values, one per RGB channel of the probe images "
            f"(e.g. mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]); got {spec!r}"
        )
    values = [*mean, *std]
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ModelLoadError(f"{where}: mean and std must be finite numbers; got {spec!r}")
    try:
        return Normalized(model, [float(m) for m in mean], [float(s) for s in std])
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{where} is invalid: {err}") from err


# --------------------------------------------------------------------------- safe builder
def allowed_targets(value: Any, where: str = "model.allowed_targets") -> tuple[str, ...]:
    """The allow-list of ``_target_`` globs: ``value`` checked, or the default when None."""
    if value is None:
        return DEFAULT_ALLOWED_TARGETS
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ModelLoadError(
            f"{where} must be a list of glob patterns of dotted paths, e.g. "
            f"[audit.models.*, torchvision.models.*, mypkg.nets.*]; got {value!r}"
        )
    for pattern in value:
        if not isinstance(pattern, str) or not _GLOB.fullmatch(pattern):
            raise ModelLoadError(
                f"{where}: {pattern!r} is not a glob of a dotted path (letters, digits, _ . * ? [ ] !), "
                f"e.g. mypkg.nets.*"
            )
    return tuple(value)


def _is_allowed(path: str, allowed: Sequence[str]) -> bool:
    """``path`` matches a glob of ``allowed`` that spells out what a ``*`` may not reach.

    A private component (``_api``, ``_utils``, ``_Net``: any name starting with ``_``) and
    the packages of :data:`EXPLICIT_ONLY` are matched only by a pattern whose literal
    start (the components before the first wildcard) names them: ``mypkg._nets.*``
    allows ``mypkg._nets.Net``, ``mypkg.*`` does not.
    """
    parts = path.split(".")
    need = _must_be_named(parts)
    return any(
        fnmatch.fnmatchcase(path, pattern) and _literal_start(pattern)[:need] == parts[:need]
        for pattern in allowed
    )


def _must_be_named(parts: list[str]) -> int:
    """How many leading components of a path a pattern must spell out (see :func:`_is_allowed`)."""
    need = max((i + 1 for i, part in enumerate(parts) if part.startswith("_")), default=0)
    for package in EXPLICIT_ONLY:
        named = package.split(".")
        if parts[: len(named)] == named:
            need = max(need, len(named))
    return need


def _literal_start(pattern: str) -> list[str]:
    """The components of ``pattern`` before the first one with a wildcard."""
    start: list[str] = []
    for part in pattern.split("."):
        if _GLOB_CHARS & set(part):
            break
        start.append(part)
    return start


def _vouched(path: str, origin: str, allowed: Sequence[str]) -> bool:
    """Whether an entry of ``allowed`` names ``path`` exactly (no wildcard) and ``path`` is defined
    in the same top-level package: ``timm.create_model``, defined as
    ``timm.models._factory.create_model``. The user named that very object, and a package's
    public name for its own code vouches for it; a re-export of another package's function
    (``mypkg.system`` being ``os.system``) is still refused, as is anything a glob reaches.
    """
    return path in allowed and _same_package(path, origin)


def _same_package(path: str, origin: str) -> bool:
    return origin.split(".")[0] == path.split(".")[0]


def _why_not_allowed(path: str, allowed: Sequence[str]) -> str:
    """Why a path that a glob of ``allowed`` matches is refused all the same ("" when no glob matches)."""
    if not any(fnmatch.fnmatchcase(path, pattern) for pattern in allowed):
        return ""
    parts = path.split(".")
    package = next((p for p in EXPLICIT_ONLY if parts[: len(p.split("."))] == p.split(".")), None)
    if package is not None:
        return (
            f" (the builders in {package} change process-wide settings such as "
            f"torch.backends.quantized.engine, so a * in model.allowed_targets never matches them: "
            f"name {package}.* explicitly)"
        )
    private = next(part for part in parts if part.startswith("_"))
    return (
        f" (a * in model.allowed_targets never matches a private name {private!r}: name it in the "
        f"pattern)"
    )


def _how_to_allow(path: str, allowed: Sequence[str], exact: bool = False) -> str:
    """The allow-list with ``path``'s module added (``exact``: ``path`` itself, which vouches for
    its definition in the same package, see :func:`_vouched`)."""
    example = ",".join([*allowed, path if exact else path.rpartition(".")[0] + ".*"])
    return (
        f"if you trust that code, add it to model.allowed_targets, e.g. "
        f"model.allowed_targets=[{example}]"
    )


def check_target(
    path: Any, allowed: Sequence[str] | None, where: str, key: str = "_target_"
) -> str:
    """``path`` if it is a dotted path of identifiers allowed by ``allowed`` (None: any).

    Only the string is looked at: nothing is imported. Raises :class:`ModelLoadError`
    naming ``where``, ``key``, the path and how to allow it.
    """
    if not isinstance(path, str):
        raise ModelLoadError(
            f"{where}: {key} must be a dotted class path such as 'audit.models.SmallCNN'; got {path!r}"
        )
    if not _is_dotted(path):
        raise ModelLoadError(
            f"{where}: {key} {path!r} is not a dotted path of identifiers (module.Class, e.g. "
            f"'audit.models.SmallCNN'); nothing was imported"
        )
    if allowed is not None and not _is_allowed(path, allowed):
        raise ModelLoadError(
            f"{where}: {key} {path!r} is not in model.allowed_targets {list(allowed)}"
            f"{_why_not_allowed(path, allowed)}, so nothing was imported; {_how_to_allow(path, allowed)}"
        )
    return path


def _is_dotted(path: str) -> bool:
    parts = path.split(".")
    return len(parts) >= 2 and all(_NAME.fullmatch(p) and not p.startswith("__") for p in parts)


@contextlib.contextmanager
def _working_dir_first() -> Iterator[None]:
    """The working directory first on ``sys.path`` (as ``python -m`` has it) for one import, then removed.

    ``model-audit`` is a console script: Python puts the script's folder on the path, not
    the working directory, so ``my_module.MyNet`` beside the user's files would not be
    found without ``PYTHONPATH=.``. Modules already imported (``audit``, ``torchvision``)
    are taken from ``sys.modules`` and are never shadowed by a folder of the same name.
    """
    try:
        cwd = os.getcwd()
    except OSError:  # the working directory was removed: nothing to add
        cwd = None
    if cwd is not None:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if cwd is not None:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _import_path(path: str) -> Any:
    """What the dotted ``module.name`` ``path`` names, imported with :func:`_working_dir_first`.

    Callers check ``path`` against the allow-list first: this runs the module's code.
    """
    module_name, _, attr = path.rpartition(".")
    with _working_dir_first():
        module = importlib.import_module(module_name)
    return getattr(module, attr)


def _import_hint(path: str, err: BaseException) -> str:
    """What to set when :func:`_import_path` failed: the files looked for, where, and PYTHONPATH."""
    module_name, _, attr = path.rpartition(".")
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "(removed)"
    pythonpath = os.environ.get("PYTHONPATH") or "unset"
    missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
    if missing and (module_name == missing or module_name.startswith(missing + ".")):
        parent, _, leaf = missing.rpartition(".")
        found = sys.modules.get(parent) if parent else None
        if found is not None and getattr(found, "__path__", None):
            folders = ", ".join(map(str, found.__path__))
            return f"looked for {leaf}.py and {leaf}/__init__.py in the package {parent} ({folders}): check the path"
        return (
            f"looked for {leaf}.py and {leaf}/__init__.py in the working directory {cwd} and on PYTHONPATH "
            f"({pythonpath}); run model-audit in the folder that holds {leaf}.py (or the package folder "
            f"{leaf}/), or set PYTHONPATH to that folder (PYTHONPATH=/path/to/folder model-audit ...)"
        )
    file = getattr(sys.modules.get(module_name), "__file__", None)
    if isinstance(err, AttributeError) and file:
        return (
            f"{module_name} ({file}) has no attribute {attr!r}: check the name after the last dot"
        )
    if file or isinstance(err, ImportError):
        return (
            f"{module_name} was found{f' ({file})' if file else ''}, but importing it failed: fix the module "
            f"or install what it imports"
        )
    return "give a module path and a name in it, e.g. 'audit.models.SmallCNN'"


def _plain_value(value: Any, where: str, key: str, depth: int = 0) -> Any:
    """A plain copy of ``value`` (JSON types only); Hydra special keys and odd names are refused."""
    if depth > _MAX_DEPTH:
        raise ModelLoadError(f"{where}: {key} is nested deeper than {_MAX_DEPTH} levels")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_value(v, where, f"{key}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return _plain_kwargs(value, where, key, depth + 1)
    raise ModelLoadError(f"{where}: {key} is a {type(value).__name__}; arguments must be {_PLAIN}")


def _plain_kwargs(
    args: Mapping[Any, Any], where: str, prefix: str = "", depth: int = 0
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in args.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name in HYDRA_KEYS:
            raise ModelLoadError(
                f"{where}: {key} is a Hydra special key; only one top-level _target_ is built and "
                f"its arguments must be {_PLAIN}, never objects to build or call. To build a nested "
                f"object, write a network class that builds it and add that class to model.allowed_targets"
            )
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ModelLoadError(f"{where}: argument name {key!r} is not a Python identifier")
        out[name] = _plain_value(value, where, key, depth)
    return out


def _no_download(kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse the arguments that ask for pretrained weights (see :func:`_fetches`); nothing is imported."""
    for name, value in kwargs.items():
        if _fetches(name, value):
            raise ModelLoadError(
                f"{where}: {name}={value!r} asks for pretrained weights, which would be "
                f"downloaded; the audit downloads nothing and the weights come from the model's own "
                f"file: set {name}: null or remove it"
            )


def _fetches(name: str, value: Any) -> bool:
    """Whether argument ``name`` with ``value`` names pretrained weights that a builder would fetch.

    A torchvision weights enum always does. Otherwise the name decides what a value means:
    ``*pretrained*`` is a flag (anything but None/False/0 asks); ``weights*``/``*_weights``
    (not ``init_weights``, a random initialization) is a weights name, enum or URL unless it
    is numbers (class weights); ``*backbone*`` asks with a string, True or a mapping (a
    number there is a layer count, as in ``trainable_backbone_layers``). Any other
    argument (``progress=True``, ``norm="batch"``) is not about weights.
    """
    if _is_weights_enum(value):
        return True
    if isinstance(value, str) and value.lower().startswith(_FETCHED_NAMES):
        return True  # timm.create_model("hf-hub:org/name") fetches a config even without pretrained=True
    words = re.split(r"_+", name.lower())
    if value is None or value is False or name in _NOT_WEIGHTS:
        return False
    if any(w.startswith("pretrain") for w in words):
        return not (isinstance(value, (int, float)) and value == 0)
    if any(w.startswith("weight") for w in words):
        return not _numbers(value)
    if "backbone" in words:
        return value is True or isinstance(value, (str, Mapping))
    if (
        "checkpoint" in words or "cache" in words
    ):  # timm.create_model(checkpoint_path=..., cache_dir=...)
        return isinstance(value, str) and bool(value)
    return False


def _numbers(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_numbers(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_weights_enum(value: Any) -> bool:
    """A member of an enum that carries a download URL (torchvision's ``WeightsEnum``)."""
    return isinstance(value, enum.Enum) and isinstance(getattr(value.value, "url", None), str)


def _show(value: Any) -> str:
    return str(value) if isinstance(value, enum.Enum) else repr(value)


def _check_config(
    config: Any, allowed: Sequence[str] | None, where: str
) -> tuple[str, dict[str, Any]]:
    """The checked ``(_target_, kwargs)`` of a network config; nothing is imported."""
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise ModelLoadError(
            f"{where} must be a mapping with a '_target_' class path, e.g. "
            f"{{'_target_': 'audit.models.SmallCNN', 'num_classes': 2}}; got {config!r}"
        )
    path = check_target(config["_target_"], allowed, where)
    kwargs = _plain_kwargs({k: v for k, v in config.items() if k != "_target_"}, where)
    if allowed is not None:
        _no_download(kwargs, where)
    return path, kwargs


def build_network(
    config: Mapping[str, Any], allowed: Sequence[str] | None, where: str = "the network config"
) -> nn.Module:
    """Build a network from ``{"_target_": "pkg.mod.Class", **plain_kwargs}``, safely.

    No Hydra, no OmegaConf interpolation: the ``_target_`` string is checked first (dotted
    identifiers, matching a glob of ``allowed``), only then its module is imported; the
    object must be an ``nn.Module`` subclass or a function whose result is an ``nn.Module``,
    defined in an allowed module too (so a re-exported ``os.system`` does not pass). The
    arguments are plain JSON values without Hydra special keys; with an allow-list,
    pretrained ``weights`` are refused.

    Args:
        config: the network config.
        allowed: globs of allowed dotted paths (see ``model.allowed_targets``); None trusts
            the config (a config the caller wrote): any importable network, weights allowed.
        where: names the config in error messages.

    Raises:
        ModelLoadError: the config is refused or the network cannot be built.
    """
    path, kwargs = _check_config(config, allowed, where)  # nothing imported before this passes
    try:
        obj = _import_path(path)
    except Exception as err:  # an import runs the module's code: any error can come out
        raise ModelLoadError(
            f"could not build {where} ({path!r}): cannot import it ({type(err).__name__}: "
            f"{first_line(err)}); {_import_hint(path, err)}"
        ) from err
    if not (isinstance(obj, type) or inspect.isfunction(obj)):
        raise ModelLoadError(
            f"{where}: _target_ {path!r} is a {type(obj).__name__}, neither a torch.nn.Module subclass "
            f"nor a Python function that builds one"
        )
    origin = f"{obj.__module__}.{obj.__qualname__}"
    if (
        allowed is not None
        and not _is_allowed(origin, allowed)
        and not _vouched(path, origin, allowed)
    ):
        raise ModelLoadError(
            f"{where}: _target_ {path!r} is defined as {origin!r}, which is not in "
            f"model.allowed_targets {list(allowed)}{_why_not_allowed(origin, allowed)}; nothing was "
            f"called; {_how_to_allow(path, allowed, exact=True) if _same_package(path, origin) else _how_to_allow(origin, allowed)}"
        )
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise ModelLoadError(
            f"{where}: _target_ {path!r} is the class {obj.__name__}, not a torch.nn.Module subclass"
        )
    if allowed is None:  # the caller's own config: built as written, pretrained weights included
        model = _call(obj, kwargs, path, where)
    else:
        _check_builder(obj, path, kwargs, where)  # before the call: its signature says what it does
        model = _call_without_downloads(obj, kwargs, path, where)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"{where}: _target_ {path!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _call(obj: Callable[..., Any], kwargs: Mapping[str, Any], path: str, where: str) -> Any:
    try:
        return obj(**kwargs)
    except Exception as err:  # the network's own argument checks
        raise ModelLoadError(
            f"could not build {where} ({path!r}): {type(err).__name__}: {first_line(err)}"
        ) from err


def _call_without_downloads(
    obj: Callable[..., Any], kwargs: Mapping[str, Any], path: str, where: str
) -> Any:
    """``obj(**kwargs)`` under :func:`no_downloads`: an attempt fails the build even if the builder
    caught the error it raised."""
    with no_downloads() as attempts:
        try:
            model = obj(**kwargs)
        except Exception as err:
            if attempts:
                raise _download_refused(attempts, path, where) from err
            raise ModelLoadError(
                f"could not build {where} ({path!r}): {type(err).__name__}: {first_line(err)}"
            ) from err
    if attempts:
        raise _download_refused(attempts, path, where)
    return model


def _download_refused(attempts: list[tuple[str, str]], path: str, where: str) -> ModelLoadError:
    through, url = attempts[0]
    return ModelLoadError(
        f"{where}: building {path!r} tried to download {url!r} through {through}; the audit downloads "
        f"nothing and the weights come from the model's own file: build the network without "
        f"pretrained weights"
    )


def _check_builder(obj: Any, path: str, kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse, before any call, what does not say it builds a network without pretrained weights.

    A function must be annotated to return an ``nn.Module`` subclass; no parameter may
    default to pretrained weights unless the config sets it (see :func:`_fetches`).
    """
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(
            f"{where}: _target_ {path!r} has no signature to check ({first_line(err)}); nothing was called"
        ) from err
    if not isinstance(obj, type):
        _check_returns(obj, signature.return_annotation, path, where)
    for name, param in signature.parameters.items():
        if (
            name in kwargs
        ):  # checked by _no_download, unless only the default tells it names weights
            if _is_weights_enum(param.default) and kwargs[name] not in (None, False):
                raise ModelLoadError(
                    f"{where}: {name}={kwargs[name]!r} asks for pretrained weights (its default is "
                    f"{_show(param.default)}), which would be downloaded; the audit downloads nothing and "
                    f"the weights come from the model's own file: set {name}: null"
                )
            continue
        if param.default is not param.empty and _fetches(name, param.default):
            raise ModelLoadError(
                f"{where}: _target_ {path!r} defaults {name} to {_show(param.default)} (pretrained weights, "
                f"which would be downloaded); nothing was called. The audit downloads nothing and the "
                f"weights come from the model's own file: set {name}: null in the network config"
            )


def _check_returns(fn: Callable[..., Any], annotation: Any, path: str, where: str) -> None:
    if annotation is inspect.Signature.empty:
        raise ModelLoadError(
            f"{where}: _target_ {path!r} has no return annotation, so nothing says it builds a network; "
            f"nothing was called. If it does, annotate it, e.g. def {path.rpartition('.')[2]}(...) -> "
            f"nn.Module, or name the network class itself"
        )
    returned = _annotation_class(fn, annotation)
    if not (isinstance(returned, type) and issubclass(returned, nn.Module)):
        shown = annotation.__qualname__ if isinstance(annotation, type) else repr(annotation)
        raise ModelLoadError(
            f"{where}: _target_ {path!r} returns {shown}, not a torch.nn.Module subclass; only a network "
            f"class or a function annotated to return one is called, so nothing was called"
        )


def _annotation_class(fn: Callable[..., Any], annotation: Any) -> Any:
    """The class a return annotation names; a string (``from __future__ import annotations``) is
    looked up as a dotted name in the function's module, never evaluated. None if it names none."""
    if not isinstance(annotation, str):
        return annotation
    name = annotation.strip().strip("'\"")
    parts = name.split(".")
    if not all(_NAME.fullmatch(part) for part in parts):
        return None
    scope = getattr(inspect.unwrap(fn), "__globals__", {})
    value = scope.get(parts[0], getattr(builtins, parts[0], None))
    for part in parts[1:]:
        value = getattr(value, part, None)
    return value


# --------------------------------------------------------------------------- no downloads
_GUARD_LOCK = threading.Lock()
_GUARD_ATTEMPTS: list[list[tuple[str, str]]] = []  # one list per no_downloads() in force
_GUARD_PATCHES: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) while in force


def _download_functions() -> list[tuple[str, Any, str, Callable[[tuple, dict], str]]]:
    """(label, owner, attribute, what it fetches) of every function that downloads weights."""
    import torch.hub
    from torchvision.models import WeightsEnum

    first = lambda args, kwargs: str(args[0] if args else next(iter(kwargs.values()), "?"))  # noqa: E731
    hub = [
        (f"torch.hub.{name}", torch.hub, name, first)
        for name in ("load", "list", "help", "load_state_dict_from_url", "download_url_to_file")
    ]
    enum_url = lambda args, kwargs: str(getattr(args[0], "url", "?"))  # noqa: E731
    return [*hub, ("WeightsEnum.get_state_dict", WeightsEnum, "get_state_dict", enum_url)]


def _refusing(
    label: str, original: Callable[..., Any], what: Callable[[tuple, dict], str]
) -> Callable[..., Any]:
    """``original``, refused while a :func:`no_downloads` is in force (a reference kept past it
    behaves as the original)."""

    @functools.wraps(original)
    def refuse(*args: Any, **kwargs: Any) -> Any:
        with _GUARD_LOCK:
            active = list(_GUARD_ATTEMPTS)
        if not active:
            return original(*args, **kwargs)
        url = what(args, kwargs)
        for attempts in active:
            attempts.append((label, url))
        raise ModelLoadError(
            f"tried to download {url!r} through {label}; the audit downloads nothing and the weights "
            f"come from the model's own file"
        )

    return refuse


def _patch_downloads() -> None:
    """Replace every download function, and each module's own reference to one (``from torch.hub
    import load_state_dict_from_url``), by its refusing twin; remembered for :func:`_restore_downloads`."""
    for label, owner, attribute, what in _download_functions():
        original = owner.__dict__[attribute]
        twin = _refusing(label, original, what)
        holders = [owner] + [
            module
            for module in list(sys.modules.values())
            if module is not owner and _holds(module, attribute, original)
        ]
        for holder in holders:
            _GUARD_PATCHES.append((holder, attribute, original))
            setattr(holder, attribute, twin)


def _holds(module: Any, attribute: str, original: Any) -> bool:
    try:  # sys.modules may hold lazy stand-ins whose attribute access runs code
        namespace = object.__getattribute__(module, "__dict__")
    except Exception:
        return False
    return isinstance(namespace, dict) and namespace.get(attribute) is original


def _restore_downloads() -> None:
    while _GUARD_PATCHES:
        holder, attribute, original = _GUARD_PATCHES.pop()
        setattr(holder, attribute, original)


@contextlib.contextmanager
def no_downloads() -> Iterator[list[tuple[str, str]]]:
    """While in force, every weight download raises :class:`ModelLoadError` and is recorded.

    Covers ``torch.hub`` (``load``, ``list``, ``help``, ``load_state_dict_from_url``,
    ``download_url_to_file``, and the modules that imported one of them by name) and
    torchvision's ``WeightsEnum.get_state_dict``. Yields the list of attempts as
    ``(function, url)``, filled even when the caller swallows the error. Nested uses
    share one set of replacements; the last one out restores the originals, also when
    the body raises. Process-wide while in force: a thread that downloads meanwhile is
    refused too.
    """
    attempts: list[tuple[str, str]] = []
    with _GUARD_LOCK:
        if not _GUARD_ATTEMPTS:
            _patch_downloads()
        _GUARD_ATTEMPTS.append(attempts)
    try:
        yield attempts
    finally:
        with _GUARD_LOCK:
            del _GUARD_ATTEMPTS[next(i for i, a in enumerate(_GUARD_ATTEMPTS) if a is attempts)]
            if not _GUARD_ATTEMPTS:
                _restore_downloads()


def current_allowed_targets() -> tuple[str, ...] | None:
    """The allow-list in force for :func:`audit.training.build_net`: the model config's while
    the loader rebuilds a checkpoint's module, else None (the caller's own, trusted config)."""
    return _CHECKPOINT_ALLOWED.get()


def _check_hparams(
    value: Any, allowed: Sequence[str], where: str, key: str, depth: int = 0
) -> None:
    """Every ``_target_`` anywhere in a checkpoint's hyper-parameters: allowed, plain arguments."""
    if depth > _MAX_DEPTH:
        raise ModelLoadError(f"{where}: {key} is nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        if "_target_" in value:
            _check_config(value, allowed, f"{where}: {key}")
            return
        for name, item in value.items():
            sub = f"{key}.{name}"
            if name in HYDRA_KEYS:
                raise ModelLoadError(
                    f"{where}: {sub} is a Hydra special key; only a _target_ block with {_PLAIN} as "
                    f"arguments is accepted in hyper-parameters"
                )
            _check_hparams(item, allowed, where, sub, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_hparams(item, allowed, where, f"{key}[{i}]", depth + 1)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- mlflow
def _from_mlflow(src: dict[str, Any], uri: str, allowed: tuple[str, ...]) -> LoadedModel:
    model_uri = src.get("uri")
    if not isinstance(model_uri, str) or not model_uri:
        raise ModelLoadError(
            "model.uri is required for kind: mlflow, e.g. 'models:/name@champion', 'models:/name/3' "
            "or 'runs:/<run_id>/model'"
        )
    allow_pickle = src.get("allow_pickle", False)
    if not isinstance(allow_pickle, bool):
        raise ModelLoadError(f"model.allow_pickle must be true or false; got {allow_pickle!r}")
    if not model_uri.startswith(("runs:/", "models:/")):
        raise ModelLoadError(
            f"unsupported model URI '{model_uri}'; use models:/name@alias, models:/name/<version> or runs:/<run_id>/<path>"
        )
    reason = _traversal(model_uri)
    if reason:
        raise ModelLoadError(
            f"model.uri '{model_uri}' {reason}; give the artifact path inside the run, e.g. "
            f"runs:/<run_id>/model; nothing was downloaded"
        )
    max_bytes = _max_bytes(src.get("max_bytes", DEFAULT_MAX_BYTES))
    _check_store_exists(uri)
    from mlflow.tracking import MlflowClient

    # both URIs explicit: the process default (MLFLOW_TRACKING_URI, ./mlflow.db) is never consulted
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    info = _resolve(client, model_uri)
    identity = info.get("identity")
    run_id = identity.run_id if identity else None
    with temporary_folder() as tmp:
        local = _download(
            client, uri, info["source"], tmp, model_uri, max_bytes=max_bytes, run_id=run_id
        )
        own_norm = src.get("normalization") is not None
        model, layout, sha, input_size = _read_artifacts(
            Path(local), model_uri, allow_pickle, allowed, max_bytes, own_norm
        )
    return LoadedModel(
        model=model,
        name=info["name"],
        version=info["version"],
        uri=model_uri,
        registered_name=info["registered_name"],
        registered_version=info["version"],
        kind="mlflow",
        layout=layout,
        weights_sha256=sha,
        identity=dataclasses.replace(identity, weights_sha256=sha) if identity else None,
        input_size=input_size,
    )


def _check_store_exists(uri: str) -> None:
    """A ``sqlite:///`` store must exist already: MLflow would create an empty one."""
    if not uri.startswith("sqlite:///"):
        return
    db = uri[len("sqlite:///") :].split("?", 1)[0]
    if db in ("", ":memory:"):
        return
    if not Path(db).is_file():
        raise ModelLoadError(
            f"the MLflow store {uri} does not exist (no file {str(Path(db).absolute())!r}); set "
            f"tracking.uri (or MLFLOW_TRACKING_URI) to the store that holds the model; nothing was created"
        )


def _resolve(client: Any, model_uri: str) -> dict[str, Any]:
    """Registered name/version (for models:/name/N and models:/name@alias) or the run, with the
    ``source`` to download (a ``runs:/`` URI, a ``models:/m-<id>`` logged model or an artifact URI)."""
    if model_uri.startswith("runs:/"):
        run_id, _ = _parse_runs_uri(model_uri, model_uri)
        _get_run(client, run_id, model_uri)
        return {
            "source": model_uri,
            "name": f"run-{run_id[:8]}",
            "version": None,
            "registered_name": None,
        }
    rest = model_uri[len("models:/") :].rstrip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        mv = _registry_call(
            client,
            model_uri,
            name,
            lambda: client.get_model_version_by_alias(name, alias),
            f"alias {alias!r}",
        )
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if not version.isdigit():
            raise ModelLoadError(
                f"'{model_uri}': version {version!r} is not a number; stages are not supported, "
                f"use models:/{name}/<version> or models:/{name}@<alias>"
            )
        mv = _registry_call(
            client,
            model_uri,
            name,
            lambda: client.get_model_version(name, version),
            f"version {version}",
        )
    else:  # an MLflow 3 logged model id, models:/m-...
        return {"source": model_uri, "name": rest, "version": None, "registered_name": None}
    if not mv.source:
        raise ModelLoadError(f"'{model_uri}': the registered version has no source to download")
    return {
        "source": str(mv.source),
        "name": name,
        "version": str(mv.version),
        "registered_name": name,
        "identity": _identity_of(name, mv),
    }


def _identity_of(name: str, mv: Any, weights_sha256: str = "") -> VersionIdentity:
    return VersionIdentity(
        registered_name=name,
        version=str(mv.version),
        source=str(mv.source or ""),
        run_id=str(mv.run_id or ""),
        creation_timestamp=int(mv.creation_timestamp or 0),
        weights_sha256=weights_sha256,
    )


def read_identity(client: Any, name: str, version: str) -> VersionIdentity | None:
    """The registry's current record of ``name`` version ``version`` (no weights hash), or None
    when the version no longer exists. Other registry errors propagate (``MlflowException``)."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return _identity_of(name, mv)


def version_weights_sha256(client: Any, tracking_uri: str, identity: VersionIdentity) -> str:
    """SHA-256 of the weights file that ``identity.source`` points to now, downloaded from the
    named store into a temporary folder that is removed again. Nothing is unpickled or built:
    only the bytes of the file the loader would read (:func:`weights_file`) are hashed.

    Raises:
        ModelLoadError: the source cannot be downloaded or holds no weights file.
    """
    model_uri = f"models:/{identity.registered_name}/{identity.version}"
    with temporary_folder() as tmp:
        local = Path(
            _download(client, tracking_uri, identity.source, tmp, model_uri, run_id=identity.run_id)
        )
        if _layout(local, model_uri) == "mlflow" and is_mlflow_transformers(local):
            return mlflow_weights_sha256(local, model_uri)
        return _sha256(weights_file(local, model_uri).read_bytes())


def _parse_runs_uri(uri: str, model_uri: str) -> tuple[str, str]:
    run_id, _, path = uri[len("runs:/") :].partition("/")
    path = path.strip("/")
    if not run_id or not path:
        raise ModelLoadError(
            f"'{model_uri}' must look like runs:/<run_id>/<artifact path>, e.g. runs:/abc123/model"
        )
    return run_id, path


def _get_run(client: Any, run_id: str, model_uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise ModelLoadError(
                f"could not read run {run_id!r} from {client.tracking_uri}: {first_line(err)}"
            ) from err
        raise ModelLoadError(
            f"'{model_uri}': run {run_id!r} does not exist in {client.tracking_uri} "
            f"(check MLFLOW_TRACKING_URI and the run id)"
        ) from err


def _registry_call(
    client: Any, model_uri: str, name: str, call: Callable[[], Any], what: str
) -> Any:
    """``call()``; a missing model/version/alias becomes a ModelLoadError naming what exists."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ModelLoadError(
                f"could not read '{model_uri}' from {client.tracking_uri}: {err}"
            ) from err
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            names = sorted(m.name for m in client.search_registered_models(max_results=50))
            raise ModelLoadError(
                f"'{model_uri}': no registered model {name!r} in {client.tracking_uri}; "
                f"registered models: {names or 'none'}"
            ) from err
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        aliases = {k: str(v) for k, v in (model.aliases or {}).items()}
        raise ModelLoadError(
            f"'{model_uri}': model {name!r} has no {what}; its versions are {versions or 'none'} "
            f"and its aliases {aliases or 'none'}"
        ) from err


def _download(
    client: Any,
    uri: str,
    source: str,
    dst: str,
    model_uri: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    run_id: str | None = None,
) -> str:
    """Download ``source`` through ``client``'s own store into ``dst``, checked first.

    ``runs:/`` and ``models:/m-<id>`` sources are turned into the artifact URI recorded in
    that store, so MLflow's URI resolvers (which may consult the process-global store)
    are never used; any other source must lie inside the artifacts of the version's run
    ``run_id`` or of that run's experiment (:func:`_check_inside`). Traversal is refused
    in every URI, and the listing must hold at most ``max_bytes`` before anything is
    copied; the copy is measured again on disk.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        artifact_uri = _artifact_uri(client, uri, source, model_uri, max_bytes, run_id)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=dst, tracking_uri=uri, registry_uri=uri
        )
    except (MlflowException, OSError) as err:
        raise ModelLoadError(
            f"could not download the artifacts of '{model_uri}' ({type(err).__name__}: "
            f"{first_line(err)}); check that the artifact path exists in the run"
        ) from err
    check_folder_size(Path(local), max_bytes, f"the download of '{model_uri}'")
    return local


_SOURCE_FIX = (
    "a version's weights are read only from its own run's or logged model's artifacts in the named "
    "store: register the model from its run (audit.gate.loading.log_model_safely(..., registered_name=...) "
    "or mlflow.register_model('runs:/<run_id>/model', name)); nothing was downloaded"
)


def _artifact_uri(
    client: Any, uri: str, source: str, model_uri: str, max_bytes: int, run_id: str | None
) -> str:
    """The artifact URI in the named store that ``source`` names, checked, its listing within ``max_bytes``."""
    _refuse_source(source, _traversal(source), model_uri)
    if source.startswith("runs:/"):
        source_run, path = _parse_runs_uri(source, model_uri)
        run = _get_run(client, source_run, model_uri)
        root = run.info.artifact_uri
        found = _checked(_join(root, path), root, source, uri, model_uri, max_bytes)
        if found is not None:
            return found
        # MLflow 3 keeps a model logged with log_model(name=...) in a logged model
        first, _, sub = path.partition("/")
        logged = _logged_model_of_run(client, run, first)
        if logged is None:  # the download names what is missing
            return _join(root, path)
        root = logged.artifact_location
        target = _join(root, sub)
    elif source.startswith("models:/"):
        model_id, _, sub = source[len("models:/") :].partition("/")
        root = client.get_logged_model(model_id).artifact_location
        target = _join(root, sub)
    else:
        root, target = _check_inside(client, source, run_id, model_uri), source
    return _checked(target, root, source, uri, model_uri, max_bytes) or target


def _checked(
    artifact_uri: str, root: str, source: str, uri: str, model_uri: str, max_bytes: int
) -> str | None:
    """``artifact_uri`` once checked (no traversal, not a reference, inside ``root`` once links
    are resolved, no link out of it, listing within ``max_bytes``); None when the listing
    holds no file (a missing path)."""
    if artifact_uri.startswith(("runs:", "models:")):  # never resolved by MLflow itself
        raise ModelLoadError(
            f"'{model_uri}' points at {artifact_uri!r}, a reference to another reference; "
            f"register the artifact location itself"
        )
    reason = _traversal(artifact_uri)
    if reason:
        raise ModelLoadError(
            f"'{model_uri}': the artifact location '{artifact_uri}' recorded in the store {reason}; "
            f"nothing was downloaded"
        )
    if not _under(_location(artifact_uri), _location(root)):  # a symbolic link on the way out
        _refuse_source(
            source,
            f"leads to {os.path.realpath(_local_path(artifact_uri) or '')}, outside "
            f"the artifacts it names ({root})",
            model_uri,
        )
    local = _local_path(artifact_uri)
    if local is not None:
        _check_links(local, artifact_uri, model_uri)
    files = _listed_files(artifact_uri, uri, model_uri, max_bytes)
    return artifact_uri if files else None


_ENCODED = re.compile(r"%(2e|2f|5c|25|00)", re.IGNORECASE)


def _traversal(uri: str) -> str:
    """Why ``uri`` could lead out of the folder it names ("" when it cannot)."""
    if "\\" in uri:
        return "has a backslash"
    encoded = _ENCODED.search(uri)
    if encoded:
        return f"has an encoded '.', '/', '\\' or '%' ({encoded.group(0).lower()})"
    if any(ord(c) < 32 for c in uri):
        return "has a control character"
    if ".." in urllib.parse.unquote(uri).split("/"):
        return "has a '..' component"
    return ""


def _refuse_source(source: str, reason: str, model_uri: str) -> None:
    if reason:
        raise ModelLoadError(
            f"'{model_uri}': the registered version's source '{source}' {reason}; {_SOURCE_FIX}"
        )


def _check_inside(client: Any, source: str, run_id: str | None, model_uri: str) -> str:
    """The root that an artifact URI source lies inside: its run's artifacts or its experiment's
    artifact location; else ModelLoadError."""
    if not run_id:
        _refuse_source(
            source,
            "is an artifact location of a version that names no run, so it cannot be "
            "checked against the artifacts of its run",
            model_uri,
        )
    run = _get_run(client, str(run_id), model_uri)
    experiment = client.get_experiment(run.info.experiment_id)
    roots = [run.info.artifact_uri, experiment.artifact_location]
    where = _location(source)
    inside = next((root for root in roots if root and _under(where, _location(root))), None)
    if inside is None:
        _refuse_source(
            source,
            f"is outside the artifacts of its run {run_id} ({run.info.artifact_uri}) and of its "
            f"experiment ({experiment.artifact_location})",
            model_uri,
        )
    return str(inside)


def _location(uri: str) -> tuple[str, str, tuple[str, ...]]:
    """``(scheme, host, path components)`` of an artifact URI; a local path is ``file`` with
    its symbolic links resolved."""
    local = _local_path(uri)
    if local is not None:
        return "file", "", tuple(part for part in os.path.realpath(local).split("/") if part)
    parsed = urllib.parse.urlparse(uri)
    parts = tuple(part for part in urllib.parse.unquote(parsed.path).split("/") if part)
    return parsed.scheme.lower(), parsed.netloc.lower(), parts


def _under(where: tuple[str, str, tuple[str, ...]], root: tuple[str, str, tuple[str, ...]]) -> bool:
    return where[:2] == root[:2] and where[2][: len(root[2])] == root[2]


def _local_path(uri: str) -> str | None:
    """The local path of a ``file:`` URI or a plain path; None for other schemes."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme.lower() == "file":
        return urllib.parse.unquote(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return uri
    return None


def _check_links(path: str, artifact_uri: str, model_uri: str) -> None:
    """No symbolic link under a local artifact folder may lead outside it (the copy follows them)."""
    root = os.path.realpath(path)
    for folder, dirs, files in os.walk(path):  # links to folders are listed, never entered
        for name in (*dirs, *files):
            entry = os.path.join(folder, name)
            if os.path.islink(entry) and not _inside(os.path.realpath(entry), root):
                raise ModelLoadError(
                    f"'{model_uri}': {os.path.relpath(entry, path)} in '{artifact_uri}' is a symbolic link "
                    f"to {os.path.realpath(entry)}, outside the model's artifacts; {_SOURCE_FIX}"
                )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _listed_files(artifact_uri: str, uri: str, model_uri: str, max_bytes: int) -> int:
    """The number of files the store lists under ``artifact_uri``; ModelLoadError as soon as their
    listed sizes add up to more than ``max_bytes`` (before anything is copied)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(artifact_uri, tracking_uri=uri, registry_uri=uri)
    files, total, folders = 0, 0, [None]
    while folders:
        for info in repo.list_artifacts(folders.pop()):
            if info.is_dir:
                folders.append(info.path)
                continue
            files += 1
            total += info.file_size or 0  # unknown sizes are measured on disk after the copy
            if total > max_bytes:
                raise ModelLoadError(
                    f"'{model_uri}': the artifacts at '{artifact_uri}' hold more than model.max_bytes="
                    f"{max_bytes} bytes ({total} listed); nothing was downloaded: raise model.max_bytes "
                    f"if the model is really that large"
                )
    return files


def _max_bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelLoadError(
            f"model.max_bytes must be an integer >= 1 (bytes), e.g. {DEFAULT_MAX_BYTES} for 2 GiB; got {value!r}"
        )
    return value


def check_folder_size(folder: Path, max_bytes: int, what: str) -> int:
    """The bytes on disk under ``folder`` (or of the file); ModelLoadError above ``max_bytes``.

    Symbolic links count as themselves and are never followed.
    """
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        total = folder.lstat().st_size
    else:
        total = 0
        for parent, dirs, files in os.walk(folder):
            total += sum(os.lstat(os.path.join(parent, name)).st_size for name in files)
            total += sum(
                os.lstat(os.path.join(parent, d)).st_size
                for d in dirs
                if os.path.islink(os.path.join(parent, d))
            )
    if total > max_bytes:
        raise ModelLoadError(
            f"{what} holds {total} bytes on disk, more than model.max_bytes={max_bytes}; raise "
            f"model.max_bytes if the model is really that large"
        )
    return total


@contextlib.contextmanager
def temporary_folder(prefix: str = "model-audit-load-") -> Iterator[str]:
    """A new folder in ``tempfile.gettempdir()``, removed on every exit.

    Removal is retried while something (a copy thread still running after an error) writes
    into the folder. The body's error is the one raised; when the folder cannot be removed
    at all, a :class:`ModelLoadError` says where it is (after the body's message, if any).
    """
    folder = tempfile.mkdtemp(prefix=prefix)
    try:
        yield folder
    except Exception as err:
        left = _remove_folder(folder)
        if left:
            raise ModelLoadError(f"{first_line(err)}; and {left}") from err
        raise
    except BaseException:
        _remove_folder(folder)
        raise
    left = _remove_folder(folder)
    if left:
        raise ModelLoadError(left)


def _remove_folder(folder: str, tries: int = 20) -> str:
    """Remove ``folder``; "" once it is gone, else what is left and why."""
    error: OSError | None = None
    for attempt in range(tries):
        try:
            shutil.rmtree(folder, onerror=_make_writable)
        except FileNotFoundError:
            return ""
        except OSError as err:  # e.g. 'Directory not empty': a file appeared meanwhile
            error = err
            time.sleep(0.01 * (attempt + 1))
            continue
        if not os.path.lexists(folder):
            return ""
    return f"the temporary folder {folder} could not be removed ({type(error).__name__}: {error}); remove it by hand"


def _make_writable(func: Callable[[str], Any], path: str, exc_info: Any) -> None:
    """``shutil.rmtree``'s error handler: a file already gone is fine; a read-only folder is made
    writable and the removal retried; anything else propagates."""
    err = exc_info[1]
    if isinstance(err, FileNotFoundError):
        return
    if isinstance(err, PermissionError):
        os.chmod(os.path.dirname(path) or ".", 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        func(path)
        return
    raise err


def _join(base: str, sub: str) -> str:
    return f"{base.rstrip('/')}/{sub}" if sub else base


def _logged_model_of_run(client: Any, run: Any, name: str) -> Any:
    """The logged model called ``name`` whose source run is ``run``, else None."""
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'"
    )
    return next((m for m in models if m.source_run_id == run.info.run_id), None)


def _layout(folder: Path, model_uri: str) -> str:
    """``safe`` (net.json + state_dict.pth) or ``mlflow`` (an MLmodel folder); else ModelLoadError."""
    if folder.is_file():
        raise ModelLoadError(
            f"'{model_uri}' is a single file, not a model folder; point it at the folder logged by "
            f"log_model_safely (e.g. runs:/<run_id>/model)"
        )
    if (folder / NET_FILE).is_file():
        return "safe"
    if (folder / "MLmodel").is_file():
        return "mlflow"
    found = sorted(p.name for p in folder.iterdir())
    raise ModelLoadError(
        f"'{model_uri}' holds neither the safe layout ({NET_FILE} + {WEIGHTS_FILE}) nor an MLflow model "
        f"(MLmodel); it holds {found or 'nothing'}. {_HOW_TO_LOG[0].upper()}{_HOW_TO_LOG[1:]}"
    )


def _read_artifacts(
    folder: Path,
    model_uri: str,
    allow_pickle: bool,
    allowed: tuple[str, ...],
    max_bytes: int,
    own_norm: bool,
) -> tuple[nn.Module, str, str, tuple[int, int] | None]:
    """``(model, layout, weights sha256, input size or None)`` of a downloaded model folder."""
    if _layout(folder, model_uri) == "safe":
        model, sha = _read_safe(folder, model_uri, allowed)
        return model, "safe", sha, None
    if is_mlflow_transformers(folder):  # audit/loaders/huggingface.py
        got = load_mlflow_transformers(folder, model_uri, max_bytes, own_norm)
        return got.model, "transformers", got.weights_sha256, got.input_size
    data, fmt = _pytorch_data(folder, model_uri)
    if fmt == "pt2":
        from audit.loaders.pt2 import load_mlflow_pt2

        got = load_mlflow_pt2(folder, data, model_uri)
        return got.model, "pt2", got.weights_sha256, got.input_size
    model, sha = _read_mlflow_pytorch(data, fmt, folder, model_uri, allow_pickle)
    return model, "pickle", sha, None


def _read_safe(folder: Path, model_uri: str, allowed: tuple[str, ...]) -> tuple[nn.Module, str]:
    try:
        net_config = json.loads((folder / NET_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{NET_FILE} of '{model_uri}' is not valid JSON: {err}") from err
    weights = _safe_weights(folder)
    if not weights.is_file():
        raise ModelLoadError(
            f"'{model_uri}' has {NET_FILE} but no {WEIGHTS_FILE} or {SAFETENSORS_FILE}; log it again with log_model_safely"
        )
    where = f"{NET_FILE} of '{model_uri}'"
    model = build_network(net_config, allowed, where)  # before the weights are even read
    state, sha = read_state_dict(weights, f"{weights.name} of '{model_uri}'")
    _fit(model, state, net_config, f"'{model_uri}'")
    norm_file = folder / NORMALIZATION_FILE
    if norm_file.is_file():
        try:
            spec = json.loads(norm_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelLoadError(
                f"{NORMALIZATION_FILE} of '{model_uri}' is not valid JSON: {err}"
            ) from err
        model = _normalized(model, spec, f"{NORMALIZATION_FILE} of '{model_uri}'")
    return model, sha


def _safe_weights(folder: Path) -> Path:
    """The weights file of the safe layout: ``model.safetensors`` when present, else ``state_dict.pth``."""
    return (
        folder / SAFETENSORS_FILE
        if (folder / SAFETENSORS_FILE).is_file()
        else folder / WEIGHTS_FILE
    )


def _pytorch_data(folder: Path, model_uri: str) -> tuple[Path, str | None]:
    """The data folder of an MLflow pytorch model and its format (``pt2``, ``pickle`` or None)."""
    import yaml

    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"the MLmodel file of '{model_uri}' is not valid YAML: {err}") from err
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    flavors = flavors if isinstance(flavors, dict) else {}
    flavor = flavors.get("pytorch")
    if not isinstance(flavor, dict):
        raise ModelLoadError(
            f"'{model_uri}' is an MLflow model without the pytorch flavor (flavors: "
            f"{sorted(flavors)}); {_HOW_TO_LOG}"
        )
    data = folder / str(flavor.get("model_data", "data"))
    if not data.resolve().is_relative_to(folder.resolve()):
        raise ModelLoadError(
            f"the MLmodel file of '{model_uri}' names model_data {flavor.get('model_data')!r}, "
            f"outside the model folder; log the model again"
        )
    fmt = flavor.get("serialization_format")
    if fmt is None:  # MLflow 3.17 does not record it; the saved file tells
        fmt = (
            "pt2"
            if (data / "model.pt2").is_file()
            else "pickle"
            if (data / "model.pth").is_file()
            else None
        )
    return data, fmt


def weights_file(folder: Path, model_uri: str) -> Path:
    """The file of a downloaded model folder whose bytes are the weights an audit judges and
    hashes: ``state_dict.pth`` of the safe layout, or the data file of an MLflow pytorch model
    (``model.pth`` pickled, ``model.pt2`` exported). Only the folder's layout is read.

    Raises:
        ModelLoadError: the folder holds neither layout, or its weights file is missing.
    """
    if _layout(folder, model_uri) == "safe":
        path = _safe_weights(folder)
    else:
        data, fmt = _pytorch_data(folder, model_uri)
        path = data / ("model.pt2" if fmt == "pt2" else "model.pth")
    if not path.is_file():
        raise ModelLoadError(
            f"'{model_uri}' has no weights file {path.relative_to(folder)}; {_HOW_TO_LOG}"
        )
    return path


def _read_mlflow_pytorch(
    data: Path, fmt: str | None, folder: Path, model_uri: str, allow_pickle: bool
) -> tuple[nn.Module, str]:
    if fmt != "pickle":
        found = sorted(p.name for p in data.iterdir()) if data.is_dir() else []
        raise ModelLoadError(
            f"'{model_uri}': unknown pytorch model format in {data.name}/ (files {found}); {_HOW_TO_LOG}"
        )
    if not allow_pickle:
        raise ModelLoadError(
            f"'{model_uri}' is a pickled PyTorch model (MLflow pytorch flavor, serialization_format="
            f"'pickle'); unpickling can run arbitrary code, so it is "
            f"refused by default. If you trust its author, set allow_pickle: true in the model config "
            f"(model.allow_pickle=true on the command line). To log it safely instead, "
            f"use audit.gate.loading.log_model_safely(model, net_config)"
        )
    pickled = data / "model.pth"
    if not pickled.is_file():
        raise ModelLoadError(
            f"'{model_uri}': the pickled pytorch model has no {data.name}/model.pth; {_HOW_TO_LOG}"
        )
    sha = _sha256(pickled.read_bytes())
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    try:
        # the pickle names the user's classes (mynets.Net): found in the working directory as
        # a _target_ is, also from the model-audit console script
        with _working_dir_first():
            model = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    except MlflowException as err:
        raise ModelLoadError(
            f"MLflow refused to unpickle '{model_uri}' ({err}); MLFLOW_ALLOW_PICKLE_DESERIALIZATION "
            f"must not be false for allow_pickle: true to work"
        ) from err
    except (
        ImportError,
        AttributeError,
    ) as err:  # the pickle names a class that is not importable here
        missing = getattr(err, "name", None) or "its module"
        raise ModelLoadError(
            f"'{model_uri}' cannot be unpickled: {type(err).__name__}: {first_line(err)}; {_import_hint(f'{missing}.x', err)}"
        ) from err
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"'{model_uri}' unpickled to a {type(model).__name__}, not a torch.nn.Module"
        )
    return model, sha


# --------------------------------------------------------------------------- files
def _fit(model: nn.Module, state: Mapping[str, torch.Tensor], target: Any, where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        ):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {items[:5]}{more}")
        tname = target.get("_target_") if isinstance(target, Mapping) else target
        raise ModelLoadError(
            f"the weights of {where} do not fit the architecture {tname!r}: {'; '.join(parts)}. "
            f"The _target_ and its arguments must match the architecture the weights were trained with"
        )
    model.load_state_dict(state, strict=True)


def _from_state_dict(src: dict[str, Any], allowed: tuple[str, ...]) -> LoadedModel:
    path = src.get("path")
    if not path:
        raise ModelLoadError(
            "model.path is required for kind: state_dict (a file written by torch.save(model.state_dict(), path))"
        )
    target = src.get("target")
    model = build_network(target, allowed, "model.target")
    state, sha = read_state_dict(Path(path), f"model.path {str(path)!r}")
    _fit(model, state, target, f"{str(path)!r}")
    return LoadedModel(
        model=model,
        name=Path(path).stem,
        version=None,
        uri=str(path),
        kind="state_dict",
        layout="state_dict",
        weights_sha256=sha,
    )


def _from_huggingface(src: dict[str, Any]) -> LoadedModel:
    from audit.loaders.huggingface import load_folder

    max_bytes = _max_bytes(src.get("max_bytes", DEFAULT_MAX_BYTES))
    got = load_folder(src.get("path"), max_bytes, src.get("normalization") is not None)
    return LoadedModel(
        model=got.model,
        name=Path(str(src["path"])).name,
        version=None,
        uri=str(src["path"]),
        kind="huggingface",
        layout="huggingface",
        weights_sha256=got.weights_sha256,
        input_size=got.input_size,
    )


def _from_timm(src: dict[str, Any], allowed: tuple[str, ...]) -> LoadedModel:
    from audit.loaders.timm import BUILDER, load_timm

    check_target(BUILDER, allowed, "model.kind=timm", key="its builder")
    got = load_timm(src)
    return LoadedModel(
        model=got.model,
        name=got.name,
        version=None,
        uri=got.uri,
        kind="timm",
        layout="timm",
        weights_sha256=got.weights_sha256,
        input_size=got.input_size,
    )


def _from_checkpoint(src: dict[str, Any], allowed: tuple[str, ...]) -> LoadedModel:
    import pytorch_lightning as pl
    from pytorch_lightning.core.saving import CHECKPOINT_PAST_HPARAMS_KEYS

    path = src.get("path")
    if not path or not Path(path).is_file():
        raise ModelLoadError(
            f"model.path must name an existing Lightning checkpoint (.ckpt); got {path!r}"
        )
    class_path = src.get("module", "audit.training.Classifier")
    if not isinstance(class_path, str) or not _is_dotted(class_path):
        raise ModelLoadError(
            f"model.module must be the LightningModule's full class path (module.Class), e.g. "
            f"'audit.training.Classifier' or 'my_module.MyNet'; got {class_path!r}"
        )
    try:
        cls = _import_path(class_path)
    except (ImportError, AttributeError, ValueError) as err:
        module = class_path.rpartition(".")[0]
        also = (
            ""
            if _is_allowed(class_path, allowed)
            else f"; if the checkpoint's hyper-parameters name a _target_ in {module}, allow it too: "
            f"model.allowed_targets=[{','.join([*allowed, module + '.*'])}]"
        )
        raise ModelLoadError(
            f"model.module {class_path!r} cannot be imported ({type(err).__name__}: {first_line(err)}); "
            f"{_import_hint(class_path, err)}{also}"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ModelLoadError(
            f"model.module {class_path!r} is not a pytorch_lightning.LightningModule subclass; give the "
            f"class the checkpoint was trained with, e.g. 'audit.training.Classifier'"
        )
    where = f"checkpoint {str(path)!r}"
    data = Path(path).read_bytes()  # read once: checked, hashed and loaded from the same bytes
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise ModelLoadError(
            f"{where} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{first_line(err)}); it must hold plain values and tensors only (no pickled objects)"
        ) from err
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ModelLoadError(
            f"{where} is not a Lightning checkpoint (no 'state_dict' entry); for a bare state_dict "
            f"use kind: state_dict with model.target"
        )
    # every _target_ Lightning would hand to the module, checked before any import
    for key in (cls.CHECKPOINT_HYPER_PARAMS_KEY, *CHECKPOINT_PAST_HPARAMS_KEYS):
        if key in checkpoint:
            _check_hparams(checkpoint[key], allowed, where, key)
    token = _CHECKPOINT_ALLOWED.set(allowed)  # audit.training.build_net applies it too
    try:
        module = cls.load_from_checkpoint(io.BytesIO(data), map_location="cpu", weights_only=True)
    except ModelLoadError as err:
        raise ModelLoadError(f"{where}: {err}") from err
    except Exception as err:  # Lightning raises KeyError, TypeError, UnpicklingError...
        raise ModelLoadError(
            f"{class_path}.load_from_checkpoint({str(path)!r}, weights_only=True) failed "
            f"({type(err).__name__}: {first_line(err)}); model.module must be the LightningModule "
            f"class that wrote the checkpoint: set it, e.g. model.module=my_module.MyNet (now "
            f"{class_path!r}), and check that its hyperparameters rebuild the network and are plain "
            f"values (no pickled objects)"
        ) from err
    finally:
        _CHECKPOINT_ALLOWED.reset(token)
    net = module.net if isinstance(getattr(module, "net", None), nn.Module) else module
    return LoadedModel(
        model=net,
        name=Path(path).stem,
        version=None,
        uri=str(path),
        kind="checkpoint",
        layout="checkpoint",
        weights_sha256=_sha256(data),
    )


# --------------------------------------------------------------------------- logging
def log_model_safely(
    model_or_net: nn.Module,
    net_config: Mapping[str, Any],
    artifact_path: str = "model",
    normalization: Mapping[str, Sequence[float]] | None = None,
    registered_name: str | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> tuple[str, str | None]:
    """Log ``net.json`` + ``state_dict.pth`` (+ ``normalization.json``) into a run; optionally register it.

    The layout needs no pickle to load (``torch.load(weights_only=True)``) and keeps the
    eager module, so explainer hooks work. The weights are checked against
    ``net_config`` before anything is logged.

    Args:
        model_or_net: the network; a ``Normalized`` wrapper is unwrapped (its mean/std
            become ``normalization``), a LightningModule with a ``net`` gives its ``net``.
        net_config: the ``{"_target_": ..., **kwargs}`` mapping that builds the network.
        artifact_path: folder in the run's artifacts.
        normalization: ``{"mean": [...], "std": [...]}`` applied before the network.
        registered_name: register a model version under this name (created if needed).
        run_id: the run to log to; None uses the active run (``mlflow.start_run()``).
        tracking_uri: where the run lives; None uses ``mlflow.get_tracking_uri()``.

    Returns:
        ``(model_uri, version)``: ``models:/name/<version>`` and the version when
        registered, else ``runs:/<run_id>/<artifact_path>`` and None.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    net = model_or_net
    if isinstance(net, Normalized):
        if normalization is not None:
            raise ModelLoadError(
                "the model is Normalized and normalization= was given too; give one of them"
            )
        normalization = {"mean": net.mean.flatten().tolist(), "std": net.std.flatten().tolist()}
        net = net.model
    elif not isinstance(net, nn.Module):
        raise ModelLoadError(f"model_or_net must be a torch.nn.Module; got {type(net).__name__}")
    elif isinstance(getattr(net, "net", None), nn.Module) and "_target_" in net_config:
        net = net.net
    config = _plain(net_config, "net_config")
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    # the caller's own config (any importable network), but plain: what the loader will accept
    _fit(build_network(config, None, "net_config"), state, config, "the model to log")
    if normalization is not None:
        _normalized(nn.Identity(), normalization, "normalization")
        normalization = {
            "mean": [float(x) for x in normalization["mean"]],
            "std": [float(x) for x in normalization["std"]],
        }
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise ModelLoadError(
                "log_model_safely needs a run: call it inside `with mlflow.start_run():` or pass run_id="
            )
        run_id = active.info.run_id
    client = tracking.client(tracking_uri or mlflow.get_tracking_uri())
    with tempfile.TemporaryDirectory(prefix="model-audit-log-") as tmp:
        folder = Path(tmp)
        (folder / NET_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        torch.save(state, folder / WEIGHTS_FILE)
        if normalization is not None:
            (folder / NORMALIZATION_FILE).write_text(json.dumps(normalization))
        client.log_artifacts(run_id, str(folder), artifact_path)
    if registered_name is None:
        return f"runs:/{run_id}/{artifact_path}", None
    try:
        client.get_registered_model(registered_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(registered_name)
    run = client.get_run(run_id)
    mv = client.create_model_version(
        registered_name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id
    )
    return f"models:/{registered_name}/{mv.version}", str(mv.version)
