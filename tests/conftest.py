"""Shared fixtures: a real local Ray cluster and a real S3 API server on loopback.

Both are session-scoped: starting Ray costs seconds. Ray workers reach the S3 server through the
endpoint passed to them explicitly (StorageConfig), never through in-process mocking.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spear.storage import StorageConfig

# Credentials for the moto server; set before Ray starts so a local Ray forwards them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    storage: StorageConfig

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if needed) and return its ``s3://`` URL."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield S3Server(endpoint, StorageConfig(endpoint_url=endpoint, region="us-east-1"))
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A real local Ray with 2 CPUs; yields its address for subprocesses."""
    import ray

    if ray.is_initialized():  # an earlier test ran a CLI job in-process, which started its own
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture
def tmp_url(tmp_path: Path) -> str:
    return str(tmp_path)


@pytest.fixture
def slow_store() -> Any:
    """``slow_store(protocol, delay)`` registers a local fsspec store under ``protocol`` whose
    every read sleeps ``delay`` seconds: what a time limit inside libsndfile must cut short."""
    import time

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    def register(protocol: str, delay: float) -> None:
        class Slow(LocalFileSystem):
            def _open(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
                f = super()._open(path, *args, **kwargs)
                real = f.read

                def read(n: int = -1) -> bytes:
                    time.sleep(delay)
                    return bytes(real(n))

                f.read = read
                return f

        Slow.protocol = protocol
        fsspec.register_implementation(protocol, Slow, clobber=True)

    return register
