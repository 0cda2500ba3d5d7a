"""MLflow's default ``pt2`` models (``torch.export``), loaded with no code from the file run.

``mlflow.pytorch.log_model(model, name="model", input_example=x)`` saves ``data/model.pt2``,
the archive of ``torch.export.save``. What ``torch.export.load`` (torch 2.14) does with such
an archive, and what this module refuses before calling it:

* the weights and constants are raw tensor bytes described by JSON configs
  (``data/weights/model_weights_config.json``); an entry marked ``use_pickle`` is read with
  ``torch.load(weights_only=False)``, a constant named ``custom_obj_*`` with torch's
  TorchBind unpickler, ``opaque_obj_*`` with ``pickle.loads``, and a legacy
  ``data/weights/model.pt`` is unpickled too: all refused;
* the example inputs (``data/sample_inputs/model.pt``) are a ``torch.save`` file read with
  ``weights_only=True`` and, when that fails, **again with** ``weights_only=False``: the file
  must load with ``weights_only=True`` here, so the fallback never runs;
* the program (``models/model.json``) names operators by dotted path and carries symbolic
  sizes that are parsed by ``sympy.sympify`` (an ``eval``) and ``guards_code`` that
  ``ExportedProgram.module()`` turns into Python with ``exec``: every operator must be an
  ``aten`` operator or a size operation, every size expression must be made of the few
  sympy names and literals that torch writes, and ``guards_code`` must be empty;
* ``data/aotinductor/`` (a compiled shared library, loaded with ``dlopen``) and every other
  member outside the layout torch writes are refused, as are compressed and duplicate
  members (a second reader could see other bytes than the ones checked here).

The loaded program is unflattened (``torch.export.unflatten``): its module tree comes back
(``features``, ``fc``; ``conv1``, ``layer1`` .. ``layer4`` on a ResNet), forward hooks on it
fire and gradients flow, so every explainer that uses hooks or input gradients runs on it.
The tree is held by :class:`ExportedModule`, which deep-copies (the sanity check needs it) and
runs a program whose batch dimension was fixed at export (a batch-1 input example) at that
batch size whatever the caller passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from audit.engine.model import AttributionError, hook_count
from audit.errors import first_line
from audit.loaders import ModelLoadError

__all__ = [
    "PT2_FILE",
    "ProgramInput",
    "Pt2Model",
    "ExportedModule",
    "fixed_batch",
    "vet_archive",
    "load_program",
    "program_input",
    "load_mlflow_pt2",
]

#: the data file of an MLflow pytorch model saved in the pt2 format
PT2_FILE = "model.pt2"
#: largest JSON member read (program, weight and constant configs)
MAX_JSON_BYTES = 64 * 2**20
#: longest symbolic size expression accepted
MAX_EXPR_CHARS = 1000

_ROOT = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_MEMBER = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d{1,9}"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d{1,9}"
    r"|extra/[A-Za-z0-9_.-]{1,200}"
)
_REQUIRED = (
    "archive_format",
    "archive_version",
    "models/model.json",
    "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
)
#: members torch.export.load would turn into code or unpickle, with what it would do
_DANGER = (
    ("data/aotinductor/", "a compiled shared library that torch loads and runs"),
    ("data/executorch/", "an ExecuTorch payload"),
    ("data/constants/custom_obj_", "a TorchBind object that torch unpickles"),
    ("data/constants/opaque_obj_", "an object that torch reads with pickle.loads"),
    ("data/weights/model.pt", "legacy weights that torch unpickles"),
    ("data/constants/model.pt", "legacy constants that torch unpickles"),
    ("models/", "a second program (only 'model' is audited)"),
)
_ATEN = re.compile(r"torch\.ops\.aten\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
#: size operations torch.export writes between symbolic sizes (serialize.py's _SYM_OPS)
_SYM_TARGETS = frozenset(
    [
        f"_operator.{n}"
        for n in (
            "getitem",
            "eq",
            "ne",
            "le",
            "ge",
            "lt",
            "gt",
            "neg",
            "pos",
            "mul",
            "add",
            "sub",
            "floordiv",
            "mod",
            "pow",
            "truediv",
            "and_",
            "or_",
            "lshift",
            "rshift",
        )
    ]
    + [f"torch.sym_{n}" for n in ("not", "int", "float", "ite", "max", "min", "sqrt")]
    + ["math.trunc"]
)
#: names a size expression may use: the sympy constructors torch's srepr writes, the functions
#: the deserializer passes to sympify, assumptions; no attribute access, no other callables
_EXPR_NAMES = frozenset(
    "Symbol Integer Rational Add Mul Mod Max Min Eq Ne Lt Le Gt Ge And Or Not True False true "
    "false integer positive nonnegative negative real finite oo FloorDiv ModularIndexing Where "
    "PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift TruncToFloat TruncToInt "
    "RoundToInt RoundDecimal ToFloat Identity IntTrueDiv FloatTrueDiv StrictLessThan "
    "StrictGreaterThan LessThan GreaterThan Equality Unequality".split()
)
_EXPR_TOKEN = re.compile(
    r"\s+|[A-Za-z][A-Za-z0-9]*|'[a-z]{1,8}[0-9]{1,9}'|[0-9]{1,12}|[-+*/(),=<>!]"
)
_SYMBOL = re.compile(r"[a-z]{1,8}[0-9]{1,9}")


@dataclass(frozen=True)
class ProgramInput:
    """The one tensor input of an exported program.

    Attributes:
        channels, height, width: its fixed image dimensions.
        dtype: its dtype.
        batch: the batch size the program was specialized to, or None when it is dynamic.
    """

    channels: int
    height: int
    width: int
    dtype: torch.dtype
    batch: int | None


@dataclass
class Pt2Model:
    """What :func:`load_mlflow_pt2` gives the loader: the module to audit and what identifies it."""

    model: nn.Module
    weights_sha256: str
    input_size: tuple[int, int]
    batch: int | None


# --------------------------------------------------------------------------- the archive
def vet_archive(data: bytes, where: str) -> None:
    """Refuse a ``.pt2`` archive whose loading would unpickle, compile or execute anything.

    Only the bytes are read (``zipfile``, ``json``, and ``torch.load(weights_only=True)`` of
    the example inputs); nothing is imported or built. See the module docstring for what is
    refused and why.

    Raises:
        ModelLoadError: naming the first member or value refused and how to log the model.
    """
    members = _members(data, where)
    for name in _REQUIRED:
        if name not in members:
            raise ModelLoadError(
                f"{where} has no {name}: it is not an archive written by torch.export.save; {_FIX}"
            )
    fmt, version = _text(members, "archive_format"), _text(members, "archive_version")
    if (fmt, version) != ("pt2", "0"):
        raise ModelLoadError(
            f"{where} is a pt2 archive of format {fmt!r} version {version!r}; this torch reads format 'pt2' "
            f"version '0': export the model again with this torch version ({torch.__version__})"
        )
    for config, folder, prefix in (
        ("data/weights/model_weights_config.json", "data/weights/", "weight_"),
        ("data/constants/model_constants_config.json", "data/constants/", "tensor_"),
    ):
        _check_payloads(_json(members, config, where), members, folder, prefix, where)
    program = _json(members, "models/model.json", where)
    if not isinstance(program, dict):
        raise ModelLoadError(f"{where}: models/model.json is not a JSON object; {_FIX}")
    if program.get("guards_code") not in (None, []):
        raise ModelLoadError(
            f"{where}: its program carries guards_code (Python source that torch would exec on load); "
            f"refused. {_FIX[0].upper()}{_FIX[1:]}"
        )
    _check_program(program, where)
    _check_sample_inputs(members["data/sample_inputs/model.pt"][1], where)


_FIX = (
    "log the model with mlflow.pytorch.log_model(model.eval(), name='model', input_example=x) "
    "from a plain nn.Module, or with audit.gate.loading.log_model_safely"
)


def _members(data: bytes, where: str) -> dict[str, tuple[zipfile.ZipInfo, bytes]]:
    """``{path below the archive's root folder: (info, bytes)}``, every member checked by name and kind."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise ModelLoadError(
            f"{where} is not a zip archive written by torch.export.save ({err}); {_FIX}"
        ) from None
    roots = {i.filename.partition("/")[0] for i in infos}
    if len(roots) != 1 or not _ROOT.fullmatch(next(iter(roots))):
        raise ModelLoadError(
            f"{where} must hold one root folder as torch.export.save writes it; found {sorted(roots)[:5]}"
        )
    members: dict[str, tuple[zipfile.ZipInfo, bytes]] = {}
    for info in infos:
        rest = info.filename.partition("/")[2]
        if info.is_dir() and not rest.strip("/"):
            continue
        if rest in members:
            raise ModelLoadError(
                f"{where} holds the member {rest!r} twice (a reader could see either copy); refused"
            )
        if not _MEMBER.fullmatch(rest):
            why = next(
                (w for p, w in _DANGER if rest.startswith(p)),
                "a file torch.export.save does not write",
            )
            raise ModelLoadError(
                f"{where} holds {rest!r}: {why}; refused, nothing was loaded. {_FIX[0].upper()}{_FIX[1:]}"
            )
        if info.compress_type != zipfile.ZIP_STORED:
            raise ModelLoadError(
                f"{where}: member {rest!r} is compressed; torch.export.save stores members uncompressed"
            )
        try:
            members[rest] = (info, zf.read(info))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            raise ModelLoadError(
                f"{where}: member {rest!r} cannot be read ({err}); the archive is damaged"
            ) from None
    return members


def _text(members: Mapping[str, tuple[zipfile.ZipInfo, bytes]], name: str) -> str:
    raw = members[name][1]
    return raw[:64].decode("utf-8", "replace").strip()


def _json(members: Mapping[str, tuple[zipfile.ZipInfo, bytes]], name: str, where: str) -> Any:
    if name not in members:
        raise ModelLoadError(f"{where} has no {name}; {_FIX}")
    raw = members[name][1]
    if len(raw) > MAX_JSON_BYTES:
        raise ModelLoadError(
            f"{where}: {name} is {len(raw)} bytes, over the {MAX_JSON_BYTES} accepted for its JSON"
        )
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(
            f"{where}: {name} is not valid JSON ({type(err).__name__}: {err}); {_FIX}"
        ) from None


def _check_payloads(
    config: Any, members: Mapping[str, Any], folder: str, prefix: str, where: str
) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ModelLoadError(
            f"{where}: the payload config of {folder} has no 'config' mapping; {_FIX}"
        )
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise ModelLoadError(
                f"{where}: the tensor {str(fqn)[:100]!r} in {folder} is stored pickled (use_pickle), and torch "
                f"would unpickle it with weights_only=False; refused. Tensor subclasses are pickled: log a "
                f"model whose weights are plain tensors"
            )
        path = meta.get("path_name")
        if (
            not isinstance(path, str)
            or not re.fullmatch(prefix + r"\d{1,9}", path)
            or folder + path not in members
        ):
            raise ModelLoadError(
                f"{where}: the tensor {str(fqn)[:100]!r} names the payload {path!r}, not a {prefix}N file of {folder}"
            )
        if not isinstance(meta.get("tensor_meta"), dict):
            raise ModelLoadError(
                f"{where}: the tensor {str(fqn)[:100]!r} has no tensor_meta; {_FIX}"
            )


def _check_program(program: dict[str, Any], where: str) -> None:
    """Every node target an aten or size operator; every size expression plain sympy."""
    stack: list[Any] = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "target" in item:
                _check_target(item["target"], where)
            if "expr_str" in item:
                _check_expr(item["expr_str"], where)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_target(target: Any, where: str) -> None:
    if isinstance(target, str) and (_ATEN.fullmatch(target) or target in _SYM_TARGETS):
        return
    raise ModelLoadError(
        f"{where}: its program calls {str(target)[:120]!r}; only aten operators (torch.ops.aten.*) and size "
        f"operations are accepted (no higher-order, custom or delegated operators); refused"
    )


def _check_expr(expr: Any, where: str) -> None:
    """A symbolic size as torch writes it (``Symbol('s77', positive=True, integer=True)``): sympify evals it."""
    bad = None
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS or "**" in expr:
        bad = "too long, not a string, or a power"
    else:
        pos = 0
        while pos < len(expr) and bad is None:
            m = _EXPR_TOKEN.match(expr, pos)
            if m is None:
                bad = f"the character {expr[pos]!r}"
                break
            token = m.group()
            if token[0].isalpha() and token not in _EXPR_NAMES and not _SYMBOL.fullmatch(token):
                bad = f"the name {token!r}"
            pos = m.end()
    if bad is not None:
        raise ModelLoadError(
            f"{where}: a symbolic size of its program, {str(expr)[:120]!r}, holds {bad}: torch parses these "
            f"with sympify (an eval), so only sympy sizes as torch writes them are accepted; refused"
        )


def _check_sample_inputs(raw: bytes, where: str) -> None:
    if not raw:
        return
    try:
        torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError...: any failure means torch's fallback
        raise ModelLoadError(
            f"{where}: its example inputs (data/sample_inputs/model.pt) do not load with torch.load("
            f"weights_only=True) ({type(err).__name__}: {first_line(err, 300)}), and torch.export.load would then "
            f"unpickle them with weights_only=False; refused. Log the model with a plain tensor as input_example"
        ) from None


# --------------------------------------------------------------------------- the program
def load_program(data: bytes, where: str) -> torch.export.ExportedProgram:
    """The exported program in ``data`` (the bytes of a ``.pt2`` file), vetted first (:func:`vet_archive`)."""
    vet_archive(data, where)
    with _quiet_torch():
        try:
            return torch.export.load(io.BytesIO(data))
        except Exception as err:  # noqa: BLE001 - the deserializer raises many kinds
            raise ModelLoadError(
                f"{where} cannot be read by torch.export.load ({type(err).__name__}: {first_line(err, 300)}); "
                f"it was exported with another torch version or is damaged: log it again with torch {torch.__version__}"
            ) from None


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch.export.load logs a traceback and warns on a file it cannot read: the caller reports it in one line."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def program_input(program: torch.export.ExportedProgram, where: str) -> ProgramInput:
    """The single image input of ``program``: ``[batch, channels, height, width]`` with its dtype.

    Raises:
        ModelLoadError: the program takes other inputs, returns more than one tensor, or
            updates its buffers when it runs (exported in training mode).
    """
    sig = program.graph_signature
    if len(sig.user_inputs) != 1 or len(sig.user_outputs) != 1:
        raise ModelLoadError(
            f"{where}: its program takes {len(sig.user_inputs)} input(s) and returns {len(sig.user_outputs)} "
            f"output(s); an image classifier takes one image batch and returns one logits tensor"
        )
    if sig.buffers_to_mutate:
        names = sorted(sig.buffers_to_mutate.values())[:3]
        raise ModelLoadError(
            f"{where}: its program updates buffers when it runs ({names}...): it was exported in training "
            f"mode (BatchNorm on batch statistics); log it again after model.eval()"
        )
    node = next(
        n for n in program.graph.nodes if n.op == "placeholder" and n.name == sig.user_inputs[0]
    )
    val = node.meta.get("val")
    shape = tuple(getattr(val, "shape", ()))
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise ModelLoadError(
            f"{where}: its program's input has shape {shape}; an image classifier takes [N, 3, H, W]"
        )
    batch = shape[0] if isinstance(shape[0], int) else None
    return ProgramInput(int(shape[1]), int(shape[2]), int(shape[3]), val.dtype, batch)


def _check_input(inp: ProgramInput, mlmodel: Mapping[str, Any], where: str) -> None:
    if inp.channels != 3 or inp.dtype != torch.float32:
        raise ModelLoadError(
            f"{where}: its program takes {inp.dtype} images of {inp.channels} channel(s); the probes are float32 "
            f"RGB (3 channels): export the model with a float32 [N, 3, H, W] input example"
        )
    spec = _signature_input(mlmodel)
    if spec is None:
        return
    shape, dtype = spec
    if list(shape[1:]) != [inp.channels, inp.height, inp.width] or dtype not in (None, "float32"):
        raise ModelLoadError(
            f"{where}: the MLmodel signature says the input is {dtype} {shape}, its program takes float32 "
            f"[N, {inp.channels}, {inp.height}, {inp.width}]: the files disagree; log the model again"
        )


def _signature_input(mlmodel: Mapping[str, Any]) -> tuple[list[Any], str | None] | None:
    """``(shape, dtype)`` of the one tensor input in an MLmodel signature, None when it records none."""
    sig = mlmodel.get("signature") if isinstance(mlmodel, Mapping) else None
    inputs = sig.get("inputs") if isinstance(sig, Mapping) else None
    try:
        specs = json.loads(inputs) if isinstance(inputs, str) else None
    except ValueError:
        return None
    if not isinstance(specs, list) or len(specs) != 1 or not isinstance(specs[0], dict):
        return None
    tensor = specs[0].get("tensor-spec")
    if not isinstance(tensor, dict) or not isinstance(tensor.get("shape"), list):
        return None
    return tensor["shape"], tensor.get("dtype")


# --------------------------------------------------------------------------- the module
class ExportedModule(nn.Module):
    """An exported program unflattened (``torch.export.unflatten``), as the audit runs it.

    The module shares the unflattened tree's children, parameters and buffers (the same
    dicts), so its layer names are the program's own (``features``, ``layer4``) and a hook
    on one of them is a hook on the program. A deep copy (the sanity check randomizes one)
    unflattens the program again and clones the current weights into it: the unflattened
    tree itself holds the program's symbolic example tensors, which cannot be copied.

    With ``batch_size`` (a program specialized to its input example's batch), a batch of
    that size goes through as it is, a larger one ``batch_size`` rows at a time, a smaller
    one (the last piece too) padded with copies of its last row whose outputs are dropped.
    A hook on an inner layer then sees ``batch_size`` rows per call: run the explainers with
    ``max_batch=batch_size`` (:func:`audit.run_audit` does, see :func:`fixed_batch`); a call
    with more rows while such a hook is set is refused, as its hook would see only a piece.
    """

    def __init__(
        self, program: torch.export.ExportedProgram, batch_size: int | None = None
    ) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None; got {batch_size}")
        with _quiet_torch():
            tree = torch.export.unflatten(program)
        object.__setattr__(self, "exported", program)
        object.__setattr__(self, "tree", tree)  # not a submodule: its children are ours
        object.__setattr__(self, "_modules", tree._modules)
        object.__setattr__(self, "_parameters", tree._parameters)
        object.__setattr__(self, "_buffers", tree._buffers)
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> ExportedModule:
        super().train(mode)
        self.tree.training = mode
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ExportedModule:
        new = ExportedModule(self.exported, self.batch_size)
        memo[id(self)] = new
        params = dict(self.named_parameters())
        for name, value in [*params.items(), *self.named_buffers()]:
            prefix, _, leaf = name.rpartition(".")
            owner = new.get_submodule(prefix)
            copy = value.detach().clone()
            if name in params:
                owner._parameters[leaf] = nn.Parameter(copy, requires_grad=value.requires_grad)
            else:
                owner._buffers[leaf] = copy
        flags = {n: m.training for n, m in self.named_modules()}
        for n, m in new.named_modules():
            m.training = flags.get(n, self.training)
        new.tree.training = self.training
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, b = x.shape[0], self.batch_size
        if b is None or n == b:
            return self.tree(x)
        if n > b and any(hook_count(c) for c in self.children()):
            raise AttributionError(
                f"this model runs at a fixed batch of {b} (its exported program fixes it), and a layer hook is "
                f"set: a call with {n} rows would show the hook only {b} at a time; pass max_batch={b} "
                f"(engine.max_batch={b})"
            )
        outs = []
        for start in range(0, n, b):
            part = x[start : start + b]
            k = part.shape[0]
            if k < b:
                part = torch.cat([part, part[-1:].expand(b - k, *part.shape[1:])])
            outs.append(self.tree(part)[:k])
        return torch.cat(outs)


def fixed_batch(model: nn.Module) -> int | None:
    """The batch size ``model`` (or a module inside it, e.g. under ``Normalized``) is fixed to, else None."""
    for m in model.modules():
        if isinstance(m, ExportedModule) and m.batch_size is not None:
            return m.batch_size
    return None


# --------------------------------------------------------------------------- MLflow
def load_mlflow_pt2(folder: Path, data: Path, model_uri: str) -> Pt2Model:
    """The MLflow pytorch model in ``folder`` saved as ``data/model.pt2``, vetted, loaded and unflattened.

    Args:
        folder: the downloaded model folder (with ``MLmodel``).
        data: its data folder (``MLmodel``'s ``model_data``).
        model_uri: names the model in errors.

    Raises:
        ModelLoadError: the archive is refused (see :func:`vet_archive`), cannot be read, or its
            input is no float32 RGB image batch.
    """
    import yaml

    path = data / PT2_FILE
    where = f"'{model_uri}' ({data.name}/{PT2_FILE})"
    if not path.is_file():
        raise ModelLoadError(f"'{model_uri}' has no {data.name}/{PT2_FILE}; {_FIX}")
    raw = path.read_bytes()  # read once: the bytes hashed are the bytes vetted and loaded
    program = load_program(raw, where)
    inp = program_input(program, where)
    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        mlmodel = {}  # the loader parsed it before; a signature that does not parse is not checked
    _check_input(inp, mlmodel, where)
    try:
        module = ExportedModule(program, inp.batch).eval()
    except Exception as err:  # noqa: BLE001 - unflatten raises many kinds on odd programs
        raise ModelLoadError(
            f"{where}: torch.export.unflatten cannot rebuild its module tree ({type(err).__name__}: "
            f"{first_line(err, 300)}); log it again from a plain nn.Module"
        ) from None
    return Pt2Model(module, hashlib.sha256(raw).hexdigest(), (inp.height, inp.width), inp.batch)
