"""Hugging Face ``transformers`` image classifiers, loaded with no code from the folder run.

Two sources hold the same files:

* a local folder written by ``model.save_pretrained(folder)`` (and, beside it,
  ``image_processor.save_pretrained(folder)``): ``config.json``, ``model.safetensors``
  (or ``model.safetensors.index.json`` and its shards), ``preprocessor_config.json``;
  the ``model=huggingface`` config (``kind: huggingface``, ``path``);
* an MLflow ``transformers``-flavor model (``mlflow.transformers.log_model`` of an
  ``image-classification`` pipeline or of ``{"model": ..., "image_processor": ...}``),
  reached through ``kind: mlflow``: MLflow 3.18 writes the model's ``save_pretrained``
  files under ``model/`` (the flavor's ``model_binary``) and the image processor's under
  ``components/image_processor/``.

What is refused, before ``transformers`` reads anything: a ``config.json`` whose
``model_type`` or ``architectures`` is not one of :data:`CLASSES` (transformers' own
``*ForImageClassification`` classes, checked to be defined in ``transformers.models``),
an ``auto_map`` (custom code that ``trust_remote_code`` would run) or a
``quantization_config`` (it pulls in other packages' loaders); pickled weights
(``pytorch_model.bin``, ...) with no safetensors beside them; a safetensors header that does
not fit its file (:func:`audit.loaders.weights.check_safetensors_header`); files that
hold more than ``model.max_bytes`` together. Only the vetted files are copied, from the
bytes that were checked and hashed, into a fresh temporary folder, and
``from_pretrained`` reads that folder with ``trust_remote_code=False``,
``use_safetensors=True``, ``local_files_only=True`` and the Hub in offline mode, in
float32 with eager attention (the ``attn_implementation`` a config names could fetch
kernels). The image processor's JSON is read as data (``image_mean``, ``image_std``,
``size``, ``crop_size``); no processor class is built.

The network is wrapped in :class:`LogitsOf` (its forward returns ``.logits``), and in
:class:`audit.models.Normalized` with the processor's mean and std unless the model config
gives ``normalization`` itself; the processor's size is the model's ``input_size``, so
``probes.transform`` resizes probes to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from audit.errors import first_line
from audit.loaders import ModelLoadError
from audit.loaders.weights import check_safetensors_header
from audit.models import Normalized

__all__ = [
    "CLASSES",
    "CONFIG_FILE",
    "PROCESSOR_FILE",
    "HFModel",
    "LogitsOf",
    "load_folder",
    "load_mlflow_transformers",
    "is_mlflow_transformers",
    "mlflow_weights_sha256",
    "model_folder",
]

CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: the shards ``save_pretrained`` writes beside an index
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
#: weights files that transformers would read with pickle (or through TensorFlow / Flax)
PICKLED = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
    "model.ckpt.index",
    "training_args.bin",
)
#: the largest JSON file read (config, processor config, shard index)
MAX_JSON_BYTES = 4 * 2**20
#: ``model_type`` -> the transformers classes its ``architectures`` may name. Each family is
#: explained by the default methods in tests/loaders/test_huggingface.py; another family is refused.
CLASSES: dict[str, tuple[str, ...]] = {
    "vit": ("ViTForImageClassification",),
    "deit": ("DeiTForImageClassification",),
    "swin": ("SwinForImageClassification",),
    "convnext": ("ConvNextForImageClassification",),
    "beit": ("BeitForImageClassification",),
    "resnet": ("ResNetForImageClassification",),
}
#: config keys that make transformers run or fetch code other than the class itself
_REFUSED_KEYS = {
    "auto_map": "custom code (transformers would import it with trust_remote_code=True)",
    "quantization_config": "a quantization config (transformers would load it through other packages)",
}
_HOW_TO_SAVE = (
    "save it with model.save_pretrained(folder) and image_processor.save_pretrained(folder) "
    "(transformers writes model.safetensors), or log it with mlflow.transformers.log_model"
)


@dataclass
class HFModel:
    """A loaded Hugging Face classifier.

    Attributes:
        model: :class:`LogitsOf` the network, in :class:`Normalized` with the processor's
            mean and std unless the config gave its own normalization.
        weights_sha256: SHA-256 (hex) of the safetensors weights read (see :func:`weights_sha256`).
        input_size: ``(height, width)`` from the image processor (else ``config.image_size``); None if neither says.
        model_type: ``config.json``'s ``model_type``.
    """

    model: nn.Module
    weights_sha256: str
    input_size: tuple[int, int] | None
    model_type: str


class LogitsOf(nn.Module):
    """A ``transformers`` classifier as a plain ``[N, 3, H, W] -> [N, classes]`` network.

    transformers' classifiers take ``pixel_values=`` and return an ``ImageClassifierOutput``;
    the explainers call ``model(x)`` and want the logits tensor.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(pixel_values=x, return_dict=True).logits


# --------------------------------------------------------------------------- entry points
def load_folder(path: Any, max_bytes: int, normalization_given: bool) -> HFModel:
    """The ``save_pretrained`` folder ``path`` (``model.path`` of ``kind: huggingface``).

    Raises:
        ModelLoadError: no such folder, or a refused or broken file (see the module docstring).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ModelLoadError(
            f"model.path is required for kind: huggingface: a folder written by model.save_pretrained(folder); got {path!r}"
        )
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(
            f"model.path {str(path)!r} is not a folder; give the folder that model.save_pretrained(folder) wrote "
            f"(config.json, model.safetensors, preprocessor_config.json)"
        )
    processor = folder / PROCESSOR_FILE
    return _load(
        folder,
        processor if processor.is_file() else None,
        f"model.path {str(path)!r}",
        max_bytes,
        normalization_given,
    )


def load_mlflow_transformers(
    folder: Path, model_uri: str, max_bytes: int, normalization_given: bool
) -> HFModel:
    """A downloaded MLflow ``transformers``-flavor model folder (``MLmodel`` at its root)."""
    model_dir = model_folder(folder, model_uri)
    processor = _processor_file(folder)
    return _load(model_dir, processor, f"'{model_uri}'", max_bytes, normalization_given)


def is_mlflow_transformers(folder: Path) -> bool:
    """Whether the MLflow model in ``folder`` is of the ``transformers`` flavor (and not also pytorch's)."""
    import yaml

    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False  # the pytorch reader names the problem
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    return isinstance(flavors, dict) and "transformers" in flavors and "pytorch" not in flavors


def model_folder(folder: Path, model_uri: str) -> Path:
    """The folder of an MLflow ``transformers`` model that holds the ``save_pretrained`` files
    (the flavor's ``model_binary``, ``model``), refused when it lies outside ``folder``."""
    flavor = _flavor(folder, model_uri)
    if flavor.get("source_model_revision") or flavor.get("model_binary") is None:
        raise ModelLoadError(
            f"'{model_uri}' was logged with save_pretrained=False: it names a Hub repository "
            f"({flavor.get('source_model_name')!r}) instead of holding the weights, and the audit downloads "
            f"nothing; log it again with mlflow.transformers.log_model(..., save_pretrained=True)"
        )
    binary = str(flavor["model_binary"])
    model_dir = folder / binary
    if not model_dir.resolve().is_relative_to(folder.resolve()) or not model_dir.is_dir():
        raise ModelLoadError(
            f"the MLmodel file of '{model_uri}' names model_binary {binary!r}, not a folder inside the "
            f"model; log it again with mlflow.transformers.log_model"
        )
    return model_dir


def mlflow_weights_sha256(folder: Path, model_uri: str) -> str:
    """SHA-256 of the safetensors weights of a downloaded MLflow ``transformers`` model, as
    :func:`load_mlflow_transformers` computes it; nothing is built."""
    model_dir = model_folder(folder, model_uri)
    files = _weights_files(model_dir, f"'{model_uri}'", _read_json_file)
    return weights_sha256([(name, (model_dir / name).read_bytes()) for name in files])


def weights_sha256(files: list[tuple[str, bytes]]) -> str:
    """The weights' SHA-256: of the one ``model.safetensors`` file's bytes (as ``sha256sum``
    gives it), or, for a sharded model, of each file's name, length and bytes in turn (the
    index, then the shards in name order), so no byte can move from one file to the next."""
    if len(files) == 1:
        return hashlib.sha256(files[0][1]).hexdigest()
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the files
def _load(
    model_dir: Path, processor: Path | None, where: str, max_bytes: int, normalization_given: bool
) -> HFModel:
    budget = _Budget(max_bytes, where)
    config_bytes = budget.read(model_dir / CONFIG_FILE, json_file=True)
    config = _parse_json(config_bytes, f"{CONFIG_FILE} of {where}")
    model_type, class_name = _check_config(config, where)
    names = _weights_files(
        model_dir,
        where,
        lambda p: _parse_json(budget.read(p, json_file=True), f"{p.name} of {where}"),
    )
    weights = [(name, budget.read(model_dir / name)) for name in names]
    for name, data in weights:
        if name.endswith(".safetensors"):
            check_safetensors_header(data, f"{name} of {where}")
    spec = (
        _parse_json(budget.read(processor, json_file=True), f"{PROCESSOR_FILE} of {where}")
        if processor
        else {}
    )
    if not isinstance(spec, dict):
        raise ModelLoadError(
            f"{PROCESSOR_FILE} of {where} is a {type(spec).__name__}, not a JSON object; {_HOW_TO_SAVE}"
        )
    network = _from_pretrained(class_name, {CONFIG_FILE: config_bytes, **dict(weights)}, where)
    model: nn.Module = LogitsOf(network).eval()
    mean_std = _normalization(spec, where)
    if mean_std is not None and not normalization_given:
        model = Normalized(model, *mean_std).eval()
    return HFModel(model, weights_sha256(weights), _input_size(spec, config, where), model_type)


class _Budget:
    """Reads files once, as bytes, while their sizes add up to at most ``max_bytes``."""

    def __init__(self, max_bytes: int, where: str) -> None:
        self.left, self.max_bytes, self.where = max_bytes, max_bytes, where

    def read(self, path: Path, json_file: bool = False) -> bytes:
        if path.is_symlink() or not path.is_file():
            raise ModelLoadError(
                f"{self.where} has no file {path.name}{' (a symbolic link is refused)' if path.is_symlink() else ''}; "
                f"{_HOW_TO_SAVE}"
            )
        size = path.stat().st_size
        if json_file and size > MAX_JSON_BYTES:
            raise ModelLoadError(
                f"{path.name} of {self.where} is {size} bytes, more than the {MAX_JSON_BYTES} read for a JSON file"
            )
        if size > self.left:
            raise ModelLoadError(
                f"{self.where}: its files hold more than model.max_bytes={self.max_bytes} bytes ({path.name} alone is "
                f"{size}); nothing was loaded: raise model.max_bytes if the model is really that large"
            )
        data = path.read_bytes()
        if len(data) > self.left:  # the file grew since its size was read
            raise ModelLoadError(
                f"{path.name} of {self.where} changed while it was read; load it again"
            )
        self.left -= len(data)
        return data


def _read_json_file(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelLoadError(
            f"{path.name} is more than the {MAX_JSON_BYTES} bytes read for a JSON file"
        )
    return _parse_json(path.read_bytes(), path.name)


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(f"{what} is not valid JSON ({err}); {_HOW_TO_SAVE}") from None


def _check_config(config: Any, where: str) -> tuple[str, str]:
    """``(model_type, class name)`` of a vetted ``config.json``; nothing is imported."""
    if not isinstance(config, dict):
        raise ModelLoadError(
            f"{CONFIG_FILE} of {where} is a {type(config).__name__}, not a JSON object; {_HOW_TO_SAVE}"
        )
    for key, what in _REFUSED_KEYS.items():
        if config.get(key):
            raise ModelLoadError(
                f"{CONFIG_FILE} of {where} has {key!r}: {what}; only transformers' own image classifiers are loaded "
                f"({_supported()}): remove {key!r} or save the model with one of those classes"
            )
    model_type = config.get("model_type")
    if model_type not in CLASSES:
        raise ModelLoadError(
            f"{CONFIG_FILE} of {where} has model_type {model_type!r}; supported: {_supported()}; "
            f"save a model of one of those classes"
        )
    archs = config.get("architectures") or [CLASSES[model_type][0]]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in CLASSES[model_type]:
        raise ModelLoadError(
            f"{CONFIG_FILE} of {where} has architectures {archs!r} for model_type {model_type!r}; expected "
            f"[{', '.join(map(repr, CLASSES[model_type]))}] (an image classifier of transformers itself)"
        )
    return model_type, archs[0]


def _supported() -> str:
    return ", ".join(f"{t} ({'/'.join(c)})" for t, c in CLASSES.items())


def _weights_files(model_dir: Path, where: str, read_json: Any) -> list[str]:
    """The names of the safetensors files to read: ``model.safetensors``, else the index and its shards."""
    if (model_dir / SAFETENSORS).is_file():
        return [SAFETENSORS]
    if (model_dir / SAFETENSORS_INDEX).is_file():
        index = read_json(model_dir / SAFETENSORS_INDEX)
        shards = index.get("weight_map") if isinstance(index, dict) else None
        names = sorted(set(shards.values())) if isinstance(shards, dict) else []
        bad = [n for n in names if not isinstance(n, str) or not _SHARD.fullmatch(n)]
        if not names or bad:
            raise ModelLoadError(
                f"{SAFETENSORS_INDEX} of {where} must map tensors to shards named model-NNNNN-of-NNNNN.safetensors "
                f"beside it; got {bad[:3] or 'no shards'}; {_HOW_TO_SAVE}"
            )
        return [SAFETENSORS_INDEX, *names]
    found = sorted(p.name for p in model_dir.iterdir())
    pickled = [
        n for n in found if n in PICKLED or n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    ]
    if pickled:
        raise ModelLoadError(
            f"{where} holds pickled weights {pickled} and no {SAFETENSORS}; unpickling can run code, so only "
            f"safetensors are read: save it with model.save_pretrained(folder) (safetensors by default) or "
            f"convert the weights to model.safetensors"
        )
    raise ModelLoadError(
        f"{where} has no {SAFETENSORS} (it holds {found or 'nothing'}); {_HOW_TO_SAVE}"
    )


def _processor_file(folder: Path) -> Path | None:
    """The image processor's config in an MLflow transformers model, if it was logged."""
    for sub in ("image_processor", "feature_extractor", "processor"):
        path = folder / "components" / sub / PROCESSOR_FILE
        if path.is_file():
            return path
    return None


def _flavor(folder: Path, model_uri: str) -> dict[str, Any]:
    import yaml

    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ModelLoadError(
            f"the MLmodel file of '{model_uri}' cannot be read ({err}); log the model again"
        ) from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    flavor = flavors.get("transformers") if isinstance(flavors, dict) else None
    if not isinstance(flavor, dict):
        raise ModelLoadError(
            f"'{model_uri}' has no transformers flavor in its MLmodel file; log it with mlflow.transformers.log_model"
        )
    return flavor


# --------------------------------------------------------------------------- transformers
def _from_pretrained(class_name: str, files: Mapping[str, bytes], where: str) -> nn.Module:
    """transformers' ``class_name`` from the checked bytes ``files``, written to a fresh folder."""
    cls = _transformers_class(class_name, where)
    tmp = tempfile.mkdtemp(prefix="model-audit-hf-")
    try:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        with _hub_offline():
            try:
                network, info = cls.from_pretrained(
                    tmp,
                    local_files_only=True,
                    trust_remote_code=False,
                    use_safetensors=True,
                    dtype=torch.float32,
                    attn_implementation="eager",
                    output_loading_info=True,
                    ignore_mismatched_sizes=True,  # reported in `info`, refused by _check_fit with the names
                )
            except (
                Exception
            ) as err:  # transformers raises OSError, ValueError, RuntimeError, KeyError...
                raise ModelLoadError(
                    f"transformers could not load {where} as {class_name} ({type(err).__name__}: {first_line(err, 300)}); "
                    f"{_HOW_TO_SAVE}"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _check_fit(info, class_name, where)
    return network.float().eval()


def _check_fit(info: Mapping[str, Any], class_name: str, where: str) -> None:
    """Refuse weights that leave parameters at their random initialization or do not fit:
    transformers only warns about them, and the audit would judge random weights."""
    problems = {
        "missing": sorted(info.get("missing_keys") or []),
        "of another shape": sorted(
            str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []
        ),
        "unexpected": sorted(info.get("unexpected_keys") or []),
    }
    found = [
        f"{what}: {keys[:5]}{f' (+{len(keys) - 5} more)' if len(keys) > 5 else ''}"
        for what, keys in problems.items()
        if keys
    ]
    if found:
        raise ModelLoadError(
            f"the weights of {where} do not fit {class_name} as its config.json describes it ({'; '.join(found)}); "
            f"save the model and its config together with model.save_pretrained(folder)"
        )


def _transformers_class(class_name: str, where: str) -> type[nn.Module]:
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            f"{where} is a Hugging Face model and transformers is not installed; install the extra: "
            f"pip install 'model-audit[huggingface]'"
        ) from None
    cls = getattr(transformers, class_name, None)
    if not (
        isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and cls.__module__.startswith("transformers.models.")
    ):
        raise ModelLoadError(
            f"{where}: transformers {transformers.__version__} has no image classifier {class_name!r}"
        )
    return cls


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """The Hugging Face Hub in offline mode for one load (huggingface_hub reads ``HF_HUB_OFFLINE``
    once, at import, so its constant is set too) and transformers' progress bars off (the
    console keeps its one line per step) and its log quiet; all restored afterwards."""
    from huggingface_hub import constants
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report would precede the one line of a refusal

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved = constants.HF_HUB_OFFLINE
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        constants.HF_HUB_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- the processor
def _normalization(spec: Mapping[str, Any], where: str) -> tuple[list[float], list[float]] | None:
    """The processor's ``(image_mean, image_std)`` when it normalizes; None when it does not or says nothing."""
    if spec.get("do_normalize") is False or ("image_mean" not in spec and "image_std" not in spec):
        return None
    mean, std = spec.get("image_mean"), spec.get("image_std")
    ok = all(
        isinstance(v, list)
        and len(v) == 3
        and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
        )
        for v in (mean, std)
    ) and all(s > 0 for s in std)
    if not ok:
        raise ModelLoadError(
            f"{PROCESSOR_FILE} of {where}: image_mean and image_std must be 3 finite numbers each (std > 0); got "
            f"{mean!r} and {std!r}; fix the file or set model.normalization={{mean: [...], std: [...]}}"
        )
    return [float(x) for x in mean], [float(x) for x in std]


def _input_size(
    spec: Mapping[str, Any], config: Mapping[str, Any], where: str
) -> tuple[int, int] | None:
    """The images' ``(height, width)``: the processor's crop (when it crops), else its size, else ``config.image_size``."""
    if spec.get("do_center_crop") and spec.get("crop_size") is not None:
        return _pair(spec["crop_size"], f"{PROCESSOR_FILE} of {where}: crop_size")
    if spec.get("size") is not None:
        return _pair(spec["size"], f"{PROCESSOR_FILE} of {where}: size")
    if config.get("image_size") is not None:
        return _pair(config["image_size"], f"{CONFIG_FILE} of {where}: image_size")
    return None


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, dict):
        value = (
            (value.get("height"), value.get("width"))
            if "height" in value
            else (value.get("shortest_edge"),) * 2
        )
    elif isinstance(value, int):
        value = (value, value)
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16384 for v in value)
    )
    if not ok:
        raise ModelLoadError(
            f"{what} must be a size in pixels ({{height, width}}, {{shortest_edge}} or an integer); got {value!r}; "
            f"fix the file or set probes.transform.size"
        )
    return int(value[0]), int(value[1])
