"""Trained MVQ quantisers loaded for inference (the tokenize actor, the quantiser jobs' reads).

A quantiser is named by its ``spear quantizer train`` output folder or its ``.safetensors`` file,
at any fsspec URL. The bytes are read through ``spear.storage`` and parsed by
``spear.quantizer.serial``, never the training code: ``quantizer/`` itself stays free of fsspec
(docs/architecture.md, "Layering").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spear.checkpoints import CheckpointError
from spear.errors import SpearError
from spear.storage import StorageConfig, exists, join, read_bytes

if TYPE_CHECKING:
    from spear.quantizer.mvq import Quantizer


def quantizer_url(url: str) -> str:
    """A quantiser given as its ``spear quantizer train`` folder or its ``.safetensors`` file ->
    the file."""
    from spear.quantizer.serial import QUANTIZER_FILE

    return url if url.endswith(".safetensors") else join(url, QUANTIZER_FILE)


def load_quantizer(url: str, storage: StorageConfig, device: str = "cpu") -> Quantizer:
    """The quantiser at ``url`` (a ``spear quantizer train`` folder or its file), on ``device``.

    One-line errors tell a missing quantiser from an unfinished training (a folder holding only
    a checkpoint) and from a file that is not a quantiser."""
    from spear.quantizer.serial import CHECKPOINT_FILE, quantizer_from_bytes

    target = quantizer_url(url)
    if not exists(target, storage):
        folder = target.rsplit("/", 1)[0] if "/" in target else "."
        if exists(join(folder, CHECKPOINT_FILE), storage):
            raise CheckpointError(
                f"quantiser {url!r} is unfinished: its training stopped before the end (only "
                f"{CHECKPOINT_FILE} there); rerun spear quantizer train with --out {folder} to "
                "finish it"
            )
        raise CheckpointError(
            f"no quantiser at {target!r}: give a spear quantizer train output folder or its "
            ".safetensors file"
        )
    try:
        data = read_bytes(target, storage)
    except SpearError:
        raise
    except Exception as err:  # a folder named *.safetensors, permissions, a dropped connection
        raise CheckpointError(
            f"cannot read quantiser {target!r}: {type(err).__name__}: {err}"
        ) from None
    return quantizer_from_bytes(data, target).to(device)
