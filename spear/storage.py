"""Storage anywhere fsspec reaches: local paths, ``s3://`` (s3fs), ``memory://``, any fsspec URL.

Every stage takes URLs plus one :class:`StorageConfig`. The driver resolves the config once
(options + the standard AWS variables) and passes it to every Ray task and actor explicitly: a
worker on another node does not see the driver's environment, and a test's in-process S3 mock
would not reach it either.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from spear.errors import StorageError

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class StorageConfig:
    """How to reach object storage. Credentials are never stored here: each worker takes them
    from its own AWS chain (variables, config files, instance or workload identity), or from
    the variables the driver forwards to a local Ray (see :func:`spear.ray_utils.init_ray`)."""

    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, a moto server). Default: ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` from the driver's environment."""
    region: str | None = None
    """S3 region. Default: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` or the AWS config."""
    anon: bool = False
    """Anonymous S3 access (public buckets)."""
    profile: str | None = None
    """Named profile from the AWS config files."""
    block_size: int = 1 << 20
    """Read block size in bytes for remote files (range reads)."""

    def resolved(self) -> StorageConfig:
        """Fill unset fields from the driver's environment, so workers get explicit values."""
        endpoint = (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        profile = self.profile or os.environ.get("AWS_PROFILE")
        return StorageConfig(
            endpoint_url=endpoint or None,
            region=region or None,
            anon=self.anon,
            profile=profile or None,
            block_size=self.block_size,
        )

    def options_for(self, protocol: str) -> dict[str, Any]:
        """fsspec keyword arguments for a filesystem of ``protocol``."""
        if protocol in ("s3", "s3a"):
            opts: dict[str, Any] = {"anon": self.anon, "default_block_size": self.block_size}
            client_kwargs: dict[str, Any] = {}
            if self.endpoint_url:
                opts["endpoint_url"] = self.endpoint_url
            if self.region:
                client_kwargs["region_name"] = self.region
            if self.profile:
                opts["profile"] = self.profile
            if client_kwargs:
                opts["client_kwargs"] = client_kwargs
            return opts
        return {}


def protocol_of(url: str) -> str:
    """The fsspec protocol of ``url`` (``file`` for plain paths)."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def check_url(url: str) -> None:
    """Fail with one clear line when ``url`` names no filesystem fsspec knows."""
    if not url or not url.strip():
        raise StorageError("empty URL")
    proto = protocol_of(url)
    try:
        fsspec.get_filesystem_class(proto)
    except (ValueError, ImportError) as err:
        raise StorageError(f"unsupported storage URL {url!r}: {err}") from None
    if proto in ("s3", "s3a") and not url.split("://", 1)[1].strip("/"):
        raise StorageError(f"S3 URL {url!r} names no bucket")


def filesystem(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``url`` to ``(filesystem, path)``; the path is what that filesystem expects.

    The URL is split once, at its ``proto://``, and the rest is a name: fsspec's own parser
    (``url_to_fs``) reads ``a::b.wav`` as a chain of two URLs and ``?versionId=`` as an S3
    option, so a file named that way would open another file or fail. Chained URLs
    (``simplecache::s3://...``) are therefore not supported; every character a filesystem or
    S3 allows in a name is.
    """
    check_url(url)
    proto = protocol_of(url)
    try:
        fs = fsspec.filesystem(proto, **storage.options_for(proto))
        path = fs._strip_protocol(url)
    except Exception as err:  # fsspec raises many types; the user needs the message
        raise StorageError(f"cannot open {url!r}: {err}") from None
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL, keeping its protocol."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://{posixpath.join(rest, *parts)}"
    return os.path.join(url, *parts)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URL of a path returned by ``fs`` (listings drop the protocol)."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def canonical_url(url: str, storage: StorageConfig) -> str:
    """One spelling per file (absolute local paths, ``proto://bucket/key``): ids hash this."""
    fs, path = filesystem(url, storage)
    if protocol_of(url) == "file":
        return os.path.abspath(path)
    return unstrip(fs, path)


def write_atomic(url: str, data: bytes, storage: StorageConfig) -> None:
    """Write ``data`` so that readers see either nothing or the whole object.

    Object stores publish a PUT whole; local files are written beside the target, then renamed.
    """
    try:
        _write_atomic(url, data, storage)
    except StorageError:
        raise
    except Exception as err:  # permissions, S3 AccessDenied, a full disk: one clear line
        raise StorageError(f"cannot write {url!r}: {type(err).__name__}: {err}") from None


def _write_atomic(url: str, data: bytes, storage: StorageConfig) -> None:
    fs, path = filesystem(url, storage)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        parent = posixpath.dirname(path)
        _makedirs_racing(parent)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _makedirs_racing(path: str, tries: int = 8) -> None:
    """``makedirs`` that survives a concurrent writer removing an empty ancestor; every local
    write, create and move here makes its folders with it.

    Attempts of one unit stage under a shared ``_work/attempts/NAME/``, which a losing attempt
    removes once empty (``spear.commit``). ``os.makedirs`` checks that ancestor, then
    creates the child: an ``rmdir`` between the two fails the ``mkdir`` with FileNotFoundError.
    Once the child exists the ancestor is not empty, so creating the whole chain again wins.
    """
    for i in range(tries):
        try:
            os.makedirs(path, exist_ok=True)
            return
        except FileNotFoundError:
            if i == tries - 1:
                raise


def create_exclusive(url: str, data: bytes, storage: StorageConfig) -> bool:
    """Create the object at ``url`` only if it does not exist; True if this call created it.

    The commit primitive of exactly-once outputs: of two writers racing for one name, exactly
    one wins. Local files: a hard link from a complete temporary file (atomic, fails if the
    name exists). S3 (s3fs) and ``memory://``: a conditional PUT (``If-None-Match: *``).
    Other filesystems have no exclusive create that fsspec exposes; there an existence check
    precedes the write, which is exclusive only while one writer runs per name (logged).
    """
    fs, path = filesystem(url, storage)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    try:
        if proto in ("file", "local"):
            parent = posixpath.dirname(path)
            _makedirs_racing(parent)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        if proto in ("s3", "s3a", "memory"):
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        _warn_not_exclusive(proto)
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True
    except StorageError:
        raise
    except Exception as err:
        raise StorageError(f"cannot write {url!r}: {type(err).__name__}: {err}") from None


@functools.cache
def _warn_not_exclusive(proto: str) -> None:
    log.warning(
        "storage %s:// has no exclusive create in fsspec: commits are exclusive only while "
        "one job writes to an output at a time",
        proto,
    )


def move(src: str, dst: str, storage: StorageConfig) -> None:
    """Move one object; ``dst`` appears whole (a rename locally, a server-side copy on S3)."""
    fs, spath = filesystem(src, storage)
    _, dpath = filesystem(dst, storage)
    try:
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if proto in ("file", "local"):
            _makedirs_racing(posixpath.dirname(dpath))
            os.replace(spath, dpath)
        else:
            fs.mv(spath, dpath)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise StorageError(f"cannot move {src!r} to {dst!r}: {type(err).__name__}: {err}") from None


def remove_tree(url: str, storage: StorageConfig) -> None:
    """Delete ``url`` and everything under it; nothing to delete is fine."""
    fs, path = filesystem(url, storage)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as err:
        raise StorageError(f"cannot delete {url!r}: {type(err).__name__}: {err}") from None


def list_names(url: str, storage: StorageConfig) -> list[str]:
    """Base names directly under the folder ``url`` (empty when it does not exist)."""
    fs, path = filesystem(url, storage)
    try:
        if not fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except Exception as err:
        raise StorageError(f"cannot list {url!r}: {type(err).__name__}: {err}") from None


def forget_listings(url: str, storage: StorageConfig) -> None:
    """Drop this process's cached listings under ``url`` (fsspec caches them per instance):
    after other processes (Ray workers) wrote there, they are stale."""
    fs, path = filesystem(url, storage)
    fs.invalidate_cache(path)  # the path and its parents
    cache = getattr(fs, "dircache", None)
    if cache is not None:  # and every folder below it
        for key in [k for k in cache if str(k).startswith(path.rstrip("/") + "/")]:
            cache.pop(key, None)


def read_bytes(url: str, storage: StorageConfig) -> bytes:
    fs, path = filesystem(url, storage)
    data: bytes = fs.cat_file(path)
    return data


def exists(url: str, storage: StorageConfig) -> bool:
    fs, path = filesystem(url, storage)
    try:
        return bool(fs.exists(path))
    except Exception as err:
        raise StorageError(f"cannot reach {url!r}: {type(err).__name__}: {err}") from None
