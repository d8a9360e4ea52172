"""Model checkpoints: fetched once per node from any fsspec URL, sha256 recorded, read safely.

A checkpoint URL may be a local path, ``s3://...``, ``https://...`` or any other fsspec URL. Remote
files are copied into a node-local cache directory the first time any process on the node asks
for them (a file lock keeps concurrent actors from fetching twice); the file's sha256 is written
beside it and reported for provenance.

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``: arbitrary pickled
objects are never executed. Hub ids (``org/name``) are resolved through ``huggingface_hub`` only
when the user names one.

Generic on purpose: the teachers (``spear.stages.teachers.weights`` reads their layouts) and the
student's SPEAR folders (``spear.student.hf``) fetch through it; it knows no model. Quantisers
load through ``spear.stages.quantizers``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.storage import StorageConfig, filesystem, protocol_of

DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "spear", "checkpoints"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 8 << 20


class CheckpointError(SpearError):
    """A checkpoint cannot be fetched, read or understood."""


def _keys(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def check_state(expected: Mapping[str, Any], state: Mapping[str, Any], what: str) -> None:
    """The one strict check before weights are copied into a model (teachers and imported
    students alike): every shape fits, every key ``expected`` has is in ``state`` and no other.
    Values are anything with a ``.shape`` (tensors, arrays); else one :class:`CheckpointError`
    naming the keys (``what`` names the model in it)."""
    wrong = [
        f"{k!r} has shape {tuple(v.shape)}, the architecture expects {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and tuple(expected[k].shape) != tuple(v.shape)
    ]
    if wrong:
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise CheckpointError(f"{what} weight " + "; ".join(wrong[:3]) + more)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{what} weights do not fit: missing {_keys(missing)}, unexpected {_keys(unexpected)}"
        )


@dataclass(frozen=True)
class LocalCheckpoint:
    """A checkpoint available on this node."""

    path: Path
    """Local file or directory (a directory for transformers model folders and hub snapshots)."""
    sha256: str
    """Hex digest of the weights file (for a directory: of its weights files, in name order)."""
    source: str
    """What the user named: URL, path or hub id."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _dir_sha256(path: Path) -> str:
    """One digest over a model directory's weight files (name + content, in name order)."""
    files = sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
    )
    if not files:
        raise CheckpointError(f"{str(path)!r} holds no weights file (.safetensors, .bin, .pt)")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def is_hub_id(name: str) -> bool:
    """``org/name`` with no scheme, and not an existing local path."""
    return "://" not in name and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def _cached_sha(path: Path) -> str:
    """sha256 of a local file, memoised in a sidecar keyed by size and mtime."""
    side = path.with_name(path.name + ".sha256.json")
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        data = json.loads(side.read_text())
        if data.get("key") == key:
            return str(data["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_file(path)
    # A read-only checkpoint folder: the digest is still returned, just not memoised.
    with contextlib.suppress(OSError):
        side.write_text(json.dumps({"key": key, "sha256": digest}))
    return digest


def _fetch_dir(
    fs: Any, path: str, url: str, slot: Path, target: Path, meta: Path
) -> LocalCheckpoint:
    """Copy a remote folder into ``target`` (via a temporary folder, renamed when complete)."""
    tmp = Path(tempfile.mkdtemp(dir=slot, prefix=".part-"))
    try:
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        os.replace(tmp, target)
    except Exception as err:  # fsspec backends raise many types
        raise CheckpointError(
            f"cannot fetch checkpoint folder {url!r}: {type(err).__name__}: {err}"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    digest = _dir_sha256(target)
    meta.write_text(json.dumps({"url": url, "sha256": digest}))
    return LocalCheckpoint(target, digest, url)


def fetch_checkpoint(
    url: str, storage: StorageConfig, cache_dir: str | None = None
) -> LocalCheckpoint:
    """Make ``url`` available locally (once per node) and return it with its sha256.

    Local files and directories are used in place. Remote files are copied to
    ``cache_dir/<hash of url>/<basename>``; a later call on the same node reuses the copy.
    """
    if "://" not in url or protocol_of(url) in ("file", "local"):
        local = Path(url.split("://", 1)[1] if "://" in url else url).expanduser()
        if local.is_dir():
            return LocalCheckpoint(local, _dir_sha256(local), url)
        if not local.is_file():
            raise CheckpointError(f"checkpoint {url!r} does not exist")
        return LocalCheckpoint(local, _cached_sha(local), url)

    root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    slot = root / hashlib.sha256(url.encode()).hexdigest()[:24]
    slot.mkdir(parents=True, exist_ok=True)
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "checkpoint"
    target = slot / name
    meta = slot / "source.json"
    # One process per node downloads; the others wait on the lock and then find the file.
    with open(slot / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if target.exists() and meta.is_file():
                recorded = json.loads(meta.read_text())
                return LocalCheckpoint(target, str(recorded["sha256"]), url)
            fs, path = filesystem(url, storage)
            if fs.isdir(path):  # a model folder (transformers layout): fetch it whole
                return _fetch_dir(fs, path, url, slot, target, meta)
            h = hashlib.sha256()
            fd, tmp = tempfile.mkstemp(dir=slot, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as out, fs.open(path, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                os.replace(tmp, target)
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {url!r} does not exist") from None
            except SpearError:
                raise
            except Exception as err:  # fsspec backends raise many types
                raise CheckpointError(
                    f"cannot fetch checkpoint {url!r}: {type(err).__name__}: {err}"
                ) from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            digest = h.hexdigest()
            meta.write_text(json.dumps({"url": url, "sha256": digest}))
            return LocalCheckpoint(target, digest, url)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fetch_hub(repo_id: str, cache_dir: str | None = None) -> LocalCheckpoint:
    """Download a hub model folder (config + weights only). Needs network access."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"loading hub id {repo_id!r} needs huggingface_hub (pip install 'spear[hf]')"
        ) from None
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt"],
            cache_dir=cache_dir,
        )
    except Exception as err:  # offline, unknown repo, auth: the user needs one line
        raise CheckpointError(
            f"cannot download {repo_id!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no message'}); check the network "
            "or give a local path / URL to the checkpoint instead"
        ) from None
    path = Path(folder)
    return LocalCheckpoint(path, _dir_sha256(path), repo_id)


def load_weights(path: str | os.PathLike[str]) -> Any:
    """Read a weights file without executing pickled code: safetensors, or torch weights-only."""
    import torch

    p = str(path)
    if p.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(p, device="cpu")
        except Exception as err:  # SafetensorError for a file that is not one, OSError
            raise CheckpointError(
                f"cannot read {p!r} as safetensors: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}"
            ) from None
    try:
        # Memory-mapped where the format allows (torch's zip format; the legacy format cannot
        # be): the driver's check of a checkpoint then holds no copy of the weights.
        return torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except Exception as err:  # UnpicklingError for objects, RuntimeError for corrupt files
        raise CheckpointError(
            f"cannot read {p!r} as weights-only: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''} (only tensors and plain containers "
            "are accepted; re-save the state dict with torch.save(model.state_dict(), ...))"
        ) from None


def weights_in_dir(path: Path) -> dict[str, Any]:
    """All tensors of a transformers-style model folder (single or sharded files)."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        files = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{str(path)!r} holds no .safetensors / .bin weights")
    state: dict[str, Any] = {}
    for f in files:
        loaded = load_weights(f)
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{str(f)!r} is not a state dict")
        state.update(loaded)
    return state


def fetch(source: str, storage: StorageConfig, cache_dir: str | None = None) -> LocalCheckpoint:
    """A hub id through :func:`fetch_hub`, anything else through :func:`fetch_checkpoint`."""
    if is_hub_id(source):
        return fetch_hub(source, cache_dir)
    return fetch_checkpoint(source, storage, cache_dir)
