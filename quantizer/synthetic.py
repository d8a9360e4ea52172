"""Structured synthetic embeddings for tests and benchmarks: a mixture of low-rank Gaussians.

Each of ``components`` clusters has its own mean and a random ``rank``-dimensional subspace, plus
a little isotropic noise, so the data has the clustered, anisotropic structure of real teacher
embeddings (unlike white noise, which no quantiser can compress). Writing them as embedding
shards: :func:`spear.testing.write_embedding_shards`.
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
