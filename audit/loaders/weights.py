"""Weights files read without running code: ``torch.save`` state_dicts and ``*.safetensors``.

:func:`read_state_dict` reads a file once, hashes those bytes and loads them: a
``.safetensors`` file (the name decides) with :func:`read_safetensors`, any other with
``torch.load(weights_only=True)``. A safetensors header is checked before anything is
allocated: its length against the file's, every tensor's dtype, shape and byte range
against the bytes that follow, so a header that claims absurd sizes is refused without
reserving them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from audit.errors import first_line
from audit.loaders import ModelLoadError

__all__ = [
    "SAFETENSORS_SUFFIX",
    "MAX_HEADER_BYTES",
    "read_state_dict",
    "read_safetensors",
    "check_safetensors_header",
]

SAFETENSORS_SUFFIX = ".safetensors"
#: the largest safetensors header accepted (the safetensors library's own limit)
MAX_HEADER_BYTES = 100 * 2**20
#: bytes per element of each safetensors dtype
_ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def read_state_dict(path: Path, where: str) -> tuple[Mapping[str, torch.Tensor], str]:
    """The state_dict in ``path`` and the SHA-256 of the bytes read (read once: hashed = loaded).

    Raises:
        ModelLoadError: no such file, a file that needs unpickling, a refused safetensors
            header, a Lightning checkpoint, or anything but a mapping of names to tensors.
    """
    if not path.is_file():
        raise ModelLoadError(f"{where}: no such file {str(path)!r}")
    data = path.read_bytes()
    if path.name.endswith(SAFETENSORS_SUFFIX):
        state: object = read_safetensors(data, where)
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
            raise ModelLoadError(
                f"{where} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
                f"{first_line(err, 300)}); save weights with torch.save(model.state_dict(), path) or "
                f"safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'), not the whole module"
            ) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
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
    return state, hashlib.sha256(data).hexdigest()


def check_safetensors_header(data: bytes, where: str) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, each checked against the bytes present.

    Raises:
        ModelLoadError: a header longer than the file or :data:`MAX_HEADER_BYTES`, not JSON,
            or a tensor whose dtype is unknown or whose shape and byte range do not fit the data.
    """
    if len(data) < 8:
        raise ModelLoadError(
            f"{where} is {len(data)} bytes: too short for a safetensors file (8-byte header length)"
        )
    n = int.from_bytes(data[:8], "little")
    body = len(data) - 8 - n
    if n > MAX_HEADER_BYTES or body < 0:
        raise ModelLoadError(
            f"{where}: its safetensors header claims {n} bytes; the file has {len(data) - 8} after the length "
            f"(at most {MAX_HEADER_BYTES} accepted): a damaged or hostile file, refused before reading it"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(
            f"{where}: its safetensors header is not JSON ({err}); save it with safetensors.torch.save_file"
        ) from None
    if not isinstance(header, dict):
        raise ModelLoadError(
            f"{where}: its safetensors header is a {type(header).__name__}, not a JSON object"
        )
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, spec in tensors.items():
        _check_entry(name, spec, body, where)
    return tensors


def _check_entry(name: str, spec: object, body: int, where: str) -> None:
    what = f"{where}: tensor {name[:100]!r}"
    if not isinstance(spec, dict) or spec.get("dtype") not in _ITEM_BYTES:
        raise ModelLoadError(
            f"{what} has dtype {spec.get('dtype') if isinstance(spec, dict) else spec!r}; known: {sorted(_ITEM_BYTES)}"
        )
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ModelLoadError(f"{what} has shape {shape!r}, not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= body
    ):
        raise ModelLoadError(
            f"{what} has data offsets {offsets!r} outside the {body} bytes of data; refused"
        )
    need = math.prod(shape) * _ITEM_BYTES[spec["dtype"]]  # Python ints: no overflow
    if need != offsets[1] - offsets[0]:
        raise ModelLoadError(
            f"{what} claims shape {shape} of {spec['dtype']} ({need} bytes) but spans {offsets[1] - offsets[0]} "
            f"bytes; refused before allocating"
        )


def read_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, its header checked first (:func:`check_safetensors_header`)."""
    check_safetensors_header(data, where)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ModelLoadError(
            f"{where} cannot be read as safetensors ({first_line(err, 300)}); save it with safetensors.torch.save_file"
        ) from None
