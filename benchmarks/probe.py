"""Manifest probe rate: files per second whose headers are read, local disk vs an S3 server.

The S3 server is moto's on loopback, so these figures measure the request path (s3fs range
reads, one HTTP round trip per block) without network latency; on real S3 each request costs
~10-30 ms more, which is why probing uses a thread pool. Run:

    uv run python benchmarks/probe.py [--files 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")

from spear.stages.manifest import ManifestConfig, SourceConfig, list_source, probe_files
from spear.storage import StorageConfig, join, write_atomic
from spear.synth import encode, sine


def write_files(root: str, n: int, storage: StorageConfig) -> None:
    flac = encode(sine(10.0, 16000, 440.0), 16000, "FLAC", "PCM_16")
    wav = encode(sine(10.0, 44100, 440.0), 44100, "WAV", "PCM_16")
    for i in range(n):
        name, data = (f"f{i:05d}.flac", flac) if i % 2 else (f"f{i:05d}.wav", wav)
        write_atomic(join(root, name), data, storage)


def rate(root: str, storage: StorageConfig, threads: int) -> tuple[float, int]:
    cfg = ManifestConfig(probe_threads=threads)
    files = list_source(SourceConfig(url=root), cfg, storage)
    t0 = time.perf_counter()
    res = probe_files(files, "bench", cfg, storage)
    dt = time.perf_counter() - t0
    assert not res.quarantine
    return len(files) / dt, len(files)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=300)
    args = ap.parse_args()
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="bench"
        )
        s3 = StorageConfig(endpoint_url=endpoint, region="us-east-1")
        local = StorageConfig()
        with tempfile.TemporaryDirectory() as tmp:
            write_files(tmp, args.files, local)
            write_files("s3://bench/probe", args.files, s3)
            print(f"{'storage':<10}{'threads':>8}{'files':>8}{'files/s':>10}")
            for name, root, st in (("local", tmp, local), ("s3-moto", "s3://bench/probe", s3)):
                for threads in (1, 4, 16):
                    r, n = rate(root, st, threads)
                    print(f"{name:<10}{threads:>8}{n:>8}{r:>10.0f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
