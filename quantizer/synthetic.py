"""Structured synthetic embeddings for tests and benchmarks: a mixture of low-rank Gaussians.

Each of ``components`` clusters has its own mean and a random ``rank``-dimensional subspace, plus
a little isotropic noise, so the data has the clustered, anisotropic structure of real teacher
embeddings (unlike white noise, which no quantiser can compress).
"""

from __future__ import annotations

import numpy as np


def mixture_of_low_rank_gaussians(
    n: int, dim: int, *, components: int = 32, rank: int = 16, noise: float = 0.05, seed: int = 0
) -> np.ndarray:
    """float32 (n, dim) vectors; the same seed always gives the same mixture."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1.0, (components, dim))
    bases = rng.normal(0, 1.0 / np.sqrt(rank), (components, rank, dim))
    comp = rng.integers(0, components, n)
    z = rng.normal(0, 1.0, (n, rank))
    x = means[comp] + np.einsum("nr,nrd->nd", z, bases[comp]) + rng.normal(0, noise, (n, dim))
    return x.astype(np.float32)


def write_embedding_shards(
    url: str, x: np.ndarray, *, shards: int = 2, item_frames: int = 50, **meta: object
) -> list[str]:
    """Write frames (N, dim) as embedding shards (float16) under ``url``; returns the URLs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spear.formats import (
        EMBEDDING_DTYPE,
        EMBEDDING_SHARD_SCHEMA,
        EMBEDDING_SHARD_VERSION,
        with_metadata,
    )
    from spear.storage import StorageConfig, join, write_atomic

    storage = meta.pop("storage", None) or StorageConfig()
    assert isinstance(storage, StorageConfig)
    schema = with_metadata(
        EMBEDDING_SHARD_SCHEMA, "embedding", EMBEDDING_SHARD_VERSION, dim=x.shape[1], **meta
    )
    items = [x[i : i + item_frames] for i in range(0, len(x), item_frames)]
    urls = []
    for s in range(shards):
        rows = [
            {
                "item_id": f"item{i:06d}",
                "num_frames": len(a),
                "embeddings": np.ascontiguousarray(a, EMBEDDING_DTYPE).tobytes(),
            }
            for i, a in enumerate(items)
            if i % shards == s
        ]
        import io

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
        u = join(url, f"shard-{s:05d}.parquet")
        write_atomic(u, buf.getvalue(), storage)
        urls.append(u)
    return urls
