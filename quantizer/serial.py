"""Quantisers and training state as bytes (safetensors with a JSON header); no file I/O here.

A saved quantiser (``quantizer.safetensors``, :data:`QUANTIZER_FILE`) holds float32 tensors
``to_logits.weight`` (C*K, dim), ``to_logits.bias`` (C*K,), ``centers`` (C, K, dim), ``norm_mean``
and ``norm_std`` (dim,), and under the header metadata key ``spear`` the JSON of
:class:`~spear.quantizer.mvq.QuantizerInfo` plus ``id``. The id is :func:`content_id` of the
tensors: a file whose id does not match its tensors is refused (it was edited after writing).
Files of format 1 (random ids) load with the id of their content; files before format 3 do not
record the teacher weights they were trained on (``teacher_weights`` empty: unknown).

A training checkpoint (:data:`CHECKPOINT_FILE`) is the same container: every tensor of the
state (model, Adam moments) by a numbered name, and under ``spear_checkpoint`` the JSON of the
rest of the state, with tensors replaced by references. Nothing is unpickled, ever.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from spear.errors import SpearError
from spear.quantizer.mvq import (
    CODE_TENSORS,
    FORMAT_VERSION,
    NORM_TENSORS,
    Quantizer,
    QuantizerInfo,
)

QUANTIZER_FILE = "quantizer.safetensors"
"""The quantiser in a ``spear quantizer train`` output folder; written last (the commit marker)."""
INFO_FILE = "quantizer.json"
"""A readable copy of the quantiser's header JSON, beside it."""
CHECKPOINT_FILE = "checkpoint.safetensors"
"""The resumable training state in an output folder (present until training finishes)."""

QUANTIZER_KEY = "spear"
CHECKPOINT_KEY = "spear_checkpoint"
CHECKPOINT_VERSION = 1


class QuantizerFileError(SpearError):
    """Bytes that should be a quantiser or a training checkpoint are not one spear wrote."""


# -- the quantiser ---------------------------------------------------------------------------


def quantizer_header(q: Quantizer) -> dict[str, Any]:
    """The JSON stored with the tensors: the info, the content id and the format version."""
    return {**q.info.__dict__, "format_version": FORMAT_VERSION, "id": q.id}


def quantizer_to_bytes(q: Quantizer) -> bytes:
    meta = {QUANTIZER_KEY: json.dumps(quantizer_header(q), sort_keys=True)}
    return st_save(q.export_tensors(), metadata=meta)


def _metadata(data: bytes, where: str) -> dict[str, str]:
    """The header metadata of safetensors bytes (a one-line error for anything else)."""
    if len(data) < 8:
        raise QuantizerFileError(f"{where} is not a safetensors file ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    try:
        if size > len(data) - 8:
            raise ValueError("header longer than the file")
        header = json.loads(data[8 : 8 + size])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise QuantizerFileError(
            f"{where} is not a safetensors file ({err}); spear writes quantisers and "
            "checkpoints as safetensors, never as pickles"
        ) from None
    return {str(k): str(v) for k, v in meta.items()}


def _tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as err:  # SafetensorError and friends for a damaged body
        raise QuantizerFileError(f"{where} is a damaged safetensors file: {err}") from None


def quantizer_from_bytes(data: bytes, where: str = "quantizer") -> Quantizer:
    """The quantiser in ``data``; :class:`QuantizerFileError` names ``where`` and what is wrong."""
    meta = _metadata(data, where)
    if QUANTIZER_KEY not in meta:
        if CHECKPOINT_KEY in meta:
            raise QuantizerFileError(
                f"{where} is a training checkpoint, not a quantiser: finish the training "
                "(rerun spear quantizer train with the same --out) and use its "
                f"{QUANTIZER_FILE}"
            )
        raise QuantizerFileError(f"{where} is not a spear quantiser (no {QUANTIZER_KEY!r} header)")
    try:
        header = json.loads(meta[QUANTIZER_KEY])
        stored_id = str(header.pop("id", ""))
        info = QuantizerInfo.from_json(json.dumps(header))
        version = int(info.format_version)
    except (ValueError, TypeError, AttributeError) as err:
        raise QuantizerFileError(f"{where}: unreadable quantiser header: {err}") from None
    if version > FORMAT_VERSION:
        raise QuantizerFileError(
            f"{where} has quantiser format {version}; this spear reads up to {FORMAT_VERSION} "
            "(upgrade spear)"
        )
    tensors = _tensors(data, where)
    c, k, d = info.num_codebooks, info.codebook_size, info.dim
    shapes = {
        "to_logits.weight": (c * k, d),
        "to_logits.bias": (c * k,),
        "centers": (c, k, d),
        "norm_mean": (d,),
        "norm_std": (d,),
    }
    for name in CODE_TENSORS + NORM_TENSORS:
        got = tuple(tensors[name].shape) if name in tensors else None
        if got != shapes[name]:
            raise QuantizerFileError(
                f"{where}: tensor {name!r} has shape {got}, the header says {shapes[name]}"
            )
    try:
        q = Quantizer.from_tensors(info, tensors)
    except ValueError as err:  # C or K out of range
        raise QuantizerFileError(f"{where}: {err}") from None
    q.info.format_version = FORMAT_VERSION
    if version >= 2 and stored_id != q.id:
        raise QuantizerFileError(
            f"{where} says it is quantiser {stored_id!r} but its weights are {q.id!r}: the "
            "file was changed after spear wrote it; use the original or retrain"
        )
    return q


def quantizer_json(q: Quantizer) -> bytes:
    """The readable ``quantizer.json`` beside a saved quantiser."""
    return json.dumps(quantizer_header(q), indent=2, sort_keys=True).encode()


# -- training state ----------------------------------------------------------------------------

# Non-JSON parts of a state are tagged objects: {"$t": name} a tensor, {"$d": [[key, value]...]}
# a dict (optimiser state is keyed by int), {"$tuple": [...]} a tuple.


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"$t": name}
    if isinstance(obj, dict):
        return {"$d": [[k, _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training checkpoint")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"$t"}:
        return tensors[obj["$t"]]
    if set(obj) == {"$d"}:
        return {k if isinstance(k, int) else str(k): _unpack(v, tensors) for k, v in obj["$d"]}
    if set(obj) == {"$tuple"}:
        return tuple(_unpack(v, tensors) for v in obj["$tuple"])
    raise ValueError(f"unknown entry {sorted(obj)}")


def state_to_bytes(state: dict[str, Any]) -> bytes:
    """A (nested) state dict of tensors, containers and plain values as safetensors bytes."""
    tensors: dict[str, torch.Tensor] = {}
    packed = _pack(state, tensors)
    meta = {CHECKPOINT_KEY: json.dumps({"version": CHECKPOINT_VERSION, "state": packed})}
    return st_save(tensors, metadata=meta)


def state_from_bytes(data: bytes, where: str = "checkpoint") -> dict[str, Any]:
    """The state :func:`state_to_bytes` wrote; a one-line error for anything else."""
    meta = _metadata(data, where)
    if CHECKPOINT_KEY not in meta:
        what = "a quantiser" if QUANTIZER_KEY in meta else "a safetensors file of something else"
        raise QuantizerFileError(f"{where} is {what}, not a spear training checkpoint")
    tensors = _tensors(data, where)
    try:
        body = json.loads(meta[CHECKPOINT_KEY])
        version = int(body["version"])
        if version > CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {version} is newer than this spear's")
        state = _unpack(body["state"], tensors)
        if not isinstance(state, dict):
            raise ValueError("the state is not a dict")
    except (ValueError, TypeError, KeyError) as err:
        raise QuantizerFileError(f"{where}: unreadable checkpoint: {err}") from None
    return state
