"""Loading a candidate model for an audit, and logging models so that they can be audited.

:func:`load_model` takes the ``model`` mapping of the audit config:

* ``{"kind": "mlflow", "uri": "models:/name@alias" | "models:/name/3" | "runs:/<run>/model",
  "allow_pickle": False}``: the safe layout of :func:`log_model_safely` (``net.json`` +
  ``state_dict.pth``, read with ``weights_only=True``), or an MLflow pytorch model saved
  with ``serialization_format="pickle"`` (only with ``allow_pickle``). MLflow 3's default
  "pt2" (``torch.export``) format is refused: forward hooks never fire on an exported
  graph, so Grad-CAM and LRP would silently see nothing.
* ``{"kind": "checkpoint", "path": "x.ckpt", "module": "audit.training.Classifier"}``.
* ``{"kind": "state_dict", "target": {"_target_": ...}, "path": "weights.pt"}``.

Every kind accepts ``normalization: {mean: [...], std: [...]}`` (wraps the model in
:class:`audit.models.Normalized`) and ``name`` (overrides the report name).
Problems raise :class:`ModelLoadError` naming the problem and the fix.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from audit import tracking
from audit.models import Normalized

__all__ = ["ModelLoadError", "LoadedModel", "load_model", "log_model_safely", "SAFE_FILES"]

NET_FILE = "net.json"
WEIGHTS_FILE = "state_dict.pth"
NORMALIZATION_FILE = "normalization.json"
SAFE_FILES = (NET_FILE, WEIGHTS_FILE, NORMALIZATION_FILE)
KINDS = ("mlflow", "checkpoint", "state_dict")
_KEYS = {
    "mlflow": {"kind", "uri", "allow_pickle", "normalization", "name"},
    "checkpoint": {"kind", "path", "module", "normalization", "name"},
    "state_dict": {"kind", "target", "path", "normalization", "name"},
}
_HOW_TO_LOG = (
    "log it with audit.loading.log_model_safely(model, net_config) (a _target_ mapping and a "
    "state_dict, loaded with weights_only=True), or with "
    "mlflow.pytorch.log_model(model, name=..., serialization_format='pickle') and allow_pickle: true"
)


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message names the problem and the fix."""


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
        kind: ``mlflow``, ``checkpoint`` or ``state_dict``.
        layout: ``safe``, ``pickle``, ``checkpoint`` or ``state_dict``.
    """

    model: nn.Module
    name: str
    version: str | None
    uri: str
    registered_name: str | None = None
    registered_version: str | None = None
    kind: str = "mlflow"
    layout: str = "safe"


# --------------------------------------------------------------------------- entry point
def load_model(source: Mapping[str, Any], tracking_uri: str | None = None) -> LoadedModel:
    """Load the candidate described by ``source`` (see the module docstring), in eval mode.

    Args:
        source: the ``model`` config mapping (a dict or an OmegaConf ``DictConfig``).
        tracking_uri: MLflow tracking URI for ``kind: mlflow``; None uses
            :func:`audit.tracking.tracking_uri`.

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
    if kind == "mlflow":
        loaded = _from_mlflow(src, tracking.tracking_uri(tracking_uri))
    elif kind == "checkpoint":
        loaded = _from_checkpoint(src)
    else:
        loaded = _from_state_dict(src)
    if src.get("normalization") is not None:
        if isinstance(loaded.model, Normalized):
            raise ModelLoadError(
                f"{loaded.uri} already carries its normalization ({NORMALIZATION_FILE}); "
                f"remove model.normalization from the config, or it would be applied twice"
            )
        loaded.model = _normalized(loaded.model, src["normalization"], "model.normalization")
    if src.get("name"):
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
    try:
        return Normalized(model, [float(m) for m in mean], [float(s) for s in std])
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{where} is invalid: {err}") from err


# --------------------------------------------------------------------------- mlflow
def _from_mlflow(src: dict[str, Any], uri: str) -> LoadedModel:
    model_uri = src.get("uri")
    if not isinstance(model_uri, str) or not model_uri:
        raise ModelLoadError(
            "model.uri is required for kind: mlflow, e.g. 'models:/name@champion', 'models:/name/3' "
            "or 'runs:/<run_id>/model'"
        )
    allow_pickle = src.get("allow_pickle", False)
    if not isinstance(allow_pickle, bool):
        raise ModelLoadError(f"model.allow_pickle must be true or false; got {allow_pickle!r}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    info = _resolve(client, model_uri)
    with tempfile.TemporaryDirectory(prefix="model-audit-load-") as tmp:
        local = _download(info["download_uri"], tmp, uri, model_uri)
        model, layout = _read_artifacts(Path(local), model_uri, allow_pickle)
    return LoadedModel(
        model=model,
        name=info["name"],
        version=info["version"],
        uri=model_uri,
        registered_name=info["registered_name"],
        registered_version=info["version"],
        kind="mlflow",
        layout=layout,
    )


def _resolve(client: Any, model_uri: str) -> dict[str, Any]:
    """Registered name/version (for models:/name/N and models:/name@alias) or the run."""
    from mlflow.exceptions import MlflowException

    if model_uri.startswith("runs:/"):
        rest = model_uri[len("runs:/") :]
        run_id, _, path = rest.partition("/")
        if not run_id or not path:
            raise ModelLoadError(
                f"'{model_uri}' must look like runs:/<run_id>/<artifact path>, e.g. runs:/abc123/model"
            )
        try:
            client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise ModelLoadError(
                    f"could not read run {run_id!r} from {client.tracking_uri}: {err}"
                ) from err
            raise ModelLoadError(
                f"'{model_uri}': run {run_id!r} does not exist in {client.tracking_uri} "
                f"(check MLFLOW_TRACKING_URI and the run id)"
            ) from err
        return {
            "download_uri": model_uri,
            "name": f"run-{run_id[:8]}",
            "version": None,
            "registered_name": None,
        }
    if not model_uri.startswith("models:/"):
        raise ModelLoadError(
            f"unsupported model URI '{model_uri}'; use models:/name@alias, models:/name/<version> or runs:/<run_id>/<path>"
        )
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
        return {"download_uri": model_uri, "name": rest, "version": None, "registered_name": None}
    version = str(mv.version)
    return {
        "download_uri": f"models:/{name}/{version}",
        "name": name,
        "version": version,
        "registered_name": name,
    }


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


def _download(download_uri: str, dst: str, uri: str, model_uri: str) -> str:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.download_artifacts(
            download_uri, dst_path=dst, tracking_uri=uri, registry_uri=uri
        )
    except (MlflowException, OSError) as err:
        raise ModelLoadError(
            f"could not download the artifacts of '{model_uri}' ({type(err).__name__}: {err}); "
            f"check that the artifact path exists in the run"
        ) from err


def _read_artifacts(folder: Path, model_uri: str, allow_pickle: bool) -> tuple[nn.Module, str]:
    if folder.is_file():
        raise ModelLoadError(
            f"'{model_uri}' is a single file, not a model folder; point it at the folder logged by "
            f"log_model_safely (e.g. runs:/<run_id>/model)"
        )
    if (folder / NET_FILE).is_file():
        return _read_safe(folder, model_uri), "safe"
    if (folder / "MLmodel").is_file():
        return _read_mlflow_pytorch(folder, model_uri, allow_pickle), "pickle"
    found = sorted(p.name for p in folder.iterdir())
    raise ModelLoadError(
        f"'{model_uri}' holds neither the safe layout ({NET_FILE} + {WEIGHTS_FILE}) nor an MLflow model "
        f"(MLmodel); it holds {found or 'nothing'}. {_HOW_TO_LOG[0].upper()}{_HOW_TO_LOG[1:]}"
    )


def _read_safe(folder: Path, model_uri: str) -> nn.Module:
    from audit.training import build_net

    try:
        net_config = json.loads((folder / NET_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{NET_FILE} of '{model_uri}' is not valid JSON: {err}") from err
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelLoadError(
            f"'{model_uri}' has {NET_FILE} but no {WEIGHTS_FILE}; log it again with log_model_safely"
        )
    model = _build(net_config, f"{NET_FILE} of '{model_uri}'", build_net)
    state = _load_weights(folder / WEIGHTS_FILE, f"{WEIGHTS_FILE} of '{model_uri}'")
    _fit(model, state, net_config, f"'{model_uri}'")
    norm_file = folder / NORMALIZATION_FILE
    if norm_file.is_file():
        model = _normalized(
            model, json.loads(norm_file.read_text()), f"{NORMALIZATION_FILE} of '{model_uri}'"
        )
    return model


def _read_mlflow_pytorch(folder: Path, model_uri: str, allow_pickle: bool) -> nn.Module:
    import yaml

    meta = yaml.safe_load((folder / "MLmodel").read_text()) or {}
    flavor = (meta.get("flavors") or {}).get("pytorch")
    if flavor is None:
        raise ModelLoadError(
            f"'{model_uri}' is an MLflow model without the pytorch flavor (flavors: "
            f"{sorted(meta.get('flavors') or {})}); {_HOW_TO_LOG}"
        )
    data = folder / str(flavor.get("model_data", "data"))
    fmt = flavor.get("serialization_format")
    if fmt is None:  # MLflow 3.17 does not record it; the saved file tells
        fmt = (
            "pt2"
            if (data / "model.pt2").is_file()
            else "pickle"
            if (data / "model.pth").is_file()
            else None
        )
    if fmt == "pt2":
        raise ModelLoadError(
            f"'{model_uri}' was logged in MLflow's 'pt2' (torch.export) format, MLflow 3's default. "
            f"Forward hooks never fire on an exported graph, so Grad-CAM and LRP would silently see "
            f"nothing; the audit refuses it. To audit this model, {_HOW_TO_LOG}"
        )
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
            f"use audit.loading.log_model_safely(model, net_config)"
        )
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    except MlflowException as err:
        raise ModelLoadError(
            f"MLflow refused to unpickle '{model_uri}' ({err}); MLFLOW_ALLOW_PICKLE_DESERIALIZATION "
            f"must not be false for allow_pickle: true to work"
        ) from err
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"'{model_uri}' unpickled to a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


# --------------------------------------------------------------------------- files
def _build(target: Any, where: str, build_net: Any) -> nn.Module:
    if not isinstance(target, Mapping) or "_target_" not in target:
        raise ModelLoadError(
            f"{where} must be a mapping with a '_target_' class path, e.g. "
            f"{{'_target_': 'audit.models.SmallCNN', 'num_classes': 2}}; got {target!r}"
        )
    try:
        return build_net(target)
    except Exception as err:  # hydra wraps import and argument errors in several types
        raise ModelLoadError(
            f"could not build {where} ({target['_target_']!r}): {type(err).__name__}: {err}"
        ) from err


def _load_weights(path: Path, where: str) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"{where}: no such file {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise ModelLoadError(
            f"{where} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); save weights with "
            f"torch.save(model.state_dict(), path), not the whole module"
        ) from err
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        raise ModelLoadError(
            f"{where} looks like a Lightning checkpoint (it has a 'state_dict' entry); "
            f"use kind: checkpoint with the LightningModule class path instead"
        )
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelLoadError(
            f"{where} does not hold a state_dict (a mapping of names to tensors); got {type(state).__name__}"
        )
    return state


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


def _from_state_dict(src: dict[str, Any]) -> LoadedModel:
    from audit.training import build_net

    path = src.get("path")
    if not path:
        raise ModelLoadError(
            "model.path is required for kind: state_dict (a file written by torch.save(model.state_dict(), path))"
        )
    target = src.get("target")
    model = _build(target, "model.target", build_net)
    state = _load_weights(Path(path), f"model.path {str(path)!r}")
    _fit(model, state, target, f"{str(path)!r}")
    return LoadedModel(
        model=model,
        name=Path(path).stem,
        version=None,
        uri=str(path),
        kind="state_dict",
        layout="state_dict",
    )


def _from_checkpoint(src: dict[str, Any]) -> LoadedModel:
    import pytorch_lightning as pl

    path = src.get("path")
    if not path or not Path(path).is_file():
        raise ModelLoadError(
            f"model.path must name an existing Lightning checkpoint (.ckpt); got {path!r}"
        )
    class_path = src.get("module", "audit.training.Classifier")
    module_name, _, attr = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ModelLoadError(
            f"model.module {class_path!r} cannot be imported ({type(err).__name__}: {err}); give the "
            f"LightningModule's full class path, e.g. 'audit.training.Classifier'"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ModelLoadError(
            f"model.module {class_path!r} is not a pytorch_lightning.LightningModule subclass; give the "
            f"class the checkpoint was trained with, e.g. 'audit.training.Classifier'"
        )
    try:
        module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as err:  # Lightning raises KeyError, TypeError, UnpicklingError...
        first = str(err).splitlines()[0] if str(err) else ""
        raise ModelLoadError(
            f"{class_path}.load_from_checkpoint({str(path)!r}, weights_only=True) failed "
            f"({type(err).__name__}: {first}); check that the checkpoint was written by this class, that "
            f"its hyperparameters rebuild the network and that they are plain values (no pickled objects)"
        ) from err
    net = module.net if isinstance(getattr(module, "net", None), nn.Module) else module
    return LoadedModel(
        model=net,
        name=Path(path).stem,
        version=None,
        uri=str(path),
        kind="checkpoint",
        layout="checkpoint",
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

    from audit.training import build_net

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
    _fit(_build(config, "net_config", build_net), state, config, "the model to log")
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
