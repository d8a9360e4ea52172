"""Encode/decode of the MVQ quantiser: shapes, ranges, determinism, and the refinement search."""

from __future__ import annotations

import itertools

import pytest
import torch

from spear.errors import SpearError
from spear.quantizer.mvq import (
    Quantizer,
    QuantizerInfo,
    check_same_quantizer,
    refine_round,
    shortlist,
)
from spear.quantizer.serial import quantizer_from_bytes, quantizer_to_bytes


def make(dim: int = 32, c: int = 4, k: int = 16, seed: int = 0, dtype=torch.float32) -> Quantizer:
    torch.manual_seed(seed)
    q = Quantizer(QuantizerInfo(dim=dim, num_codebooks=c, codebook_size=k)).to(dtype)
    with torch.no_grad():
        q.centers.normal_(0, 0.5)
    return q


@torch.no_grad()
def sq_err(q: Quantizer, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return ((q.decode(idx, denormalise=False) - x) ** 2).sum(-1)


def test_shapes_dtypes_and_range() -> None:
    q = make()
    x = torch.randn(3, 5, 32)
    for rounds in range(6):
        codes = q.encode(x, rounds)
        assert codes.shape == (3, 5, 4) and codes.dtype == torch.uint8
        assert int(codes.max()) < 16
    assert q.decode(codes).shape == (3, 5, 32)


def test_deterministic_and_batch_independent() -> None:
    q = make()
    x = torch.randn(100, 32)
    a = q.encode(x, 5, batch_size=7)
    b = q.encode(x, 5, batch_size=100)
    assert torch.equal(a, b)


def test_bad_inputs_raise() -> None:
    q = make()
    with pytest.raises(ValueError):
        q.encode(torch.randn(2, 31))
    with pytest.raises(ValueError):
        q.encode(torch.randn(2, 32), refine_rounds=6)


def test_save_load_identity() -> None:
    q = make()
    q.set_normalisation(torch.randn(32), torch.rand(32) + 0.5)
    q2 = quantizer_from_bytes(quantizer_to_bytes(q))
    x = torch.randn(50, 32)
    assert q2.id == q.id and q2.info.normalised
    assert torch.equal(q.encode(x), q2.encode(x))
    assert torch.allclose(q.decode(q.encode(x)), q2.decode(q.encode(x)), atol=1e-5)


def test_id_mismatch_detected() -> None:
    a, b = make(seed=0), make(seed=1)
    assert a.id != b.id
    check_same_quantizer(a.id, a.id)
    with pytest.raises(SpearError, match="cannot be mixed"):
        check_same_quantizer(a.id, b.id)


def test_refinement_never_increases_error() -> None:
    q = make(c=8, k=64)
    x = torch.randn(200, 32)
    start = sq_err(q, x, q.indexes(x, 0))
    prev = start
    for rounds in range(1, 6):
        err = sq_err(q, x, q.indexes(x, rounds))
        assert bool((err <= prev + 1e-4).all())
        prev = err
    assert float(prev.mean()) < 0.9 * float(start.mean())


def direct_round(q: Quantizer, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The same search as refine_round, evaluated plainly: every candidate's error computed
    as ||x - sum of its centres||^2 from explicit (dim,) vectors."""
    cen = q.get_centers().detach()  # (C, K, D)
    c, k, _ = cen.shape
    out = []
    for xv, iv in zip(x, idx, strict=True):
        base = cen[torch.arange(c), iv].sum(0)
        err0 = ((base - xv) ** 2).sum()

        def change(entries: dict[int, int], iv=iv, base=base, xv=xv, err0=err0) -> torch.Tensor:
            v = base.clone()
            for j, e in entries.items():
                v = v - cen[j, iv[j]] + cen[j, e]
            return ((v - xv) ** 2).sum() - err0

        s = min(shortlist(1, k), k)
        groups = []
        for j in range(c):
            scores = torch.stack([change({j: e}) for e in range(k)])
            top = torch.topk(scores, s, largest=False).indices
            groups.append([({j: int(e)}, scores[e]) for e in top])
        width = 1
        while len(groups) > 1:
            width *= 2
            merged = []
            for h in range(len(groups) // 2):
                combos = [
                    ({**a, **b}, change({**a, **b}))
                    for (a, _), (b, _) in itertools.product(groups[2 * h], groups[2 * h + 1])
                ]
                combos.sort(key=lambda t: float(t[1]))
                keep = 1 if len(groups) == 2 else shortlist(width, k)
                merged.append(combos[:keep])
            groups = merged
        best, val = groups[0][0]
        out.append(torch.tensor([best[j] for j in range(c)]) if val < 0 else iv)
    return torch.stack(out)


@pytest.mark.parametrize("c", [4, 8])
def test_fast_refinement_matches_direct_search(c: int) -> None:
    # c=8 also covers a merge of multi-codebook groups that keeps a shortlist (not just the
    # final one).
    q = make(dim=16, c=c, k=32, dtype=torch.float64)
    x = torch.randn(20, 16, dtype=torch.float64)
    idx = q.indexes(x, 0)
    t = q.tables()
    xc = (x @ t.flat.T).view(-1, c, 32)
    fast = refine_round(xc, idx, t)
    assert torch.equal(fast, direct_round(q, x, idx))


def test_cpu_worker_threads_give_the_same_codes() -> None:
    q = make(c=8, k=64)
    x = torch.randn(300, 32)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = q.encode(x, 5)
        torch.set_num_threads(2)
        pooled = q.encode(x, 5)  # chunks on two single-threaded workers
        assert torch.get_num_threads() == 2  # the caller's setting is left alone
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(single, pooled)


def test_exhaustive_optimum_on_tiny_codebooks() -> None:
    q = make(dim=8, c=4, k=4, dtype=torch.float64)
    x = torch.randn(64, 8, dtype=torch.float64)
    combos = torch.tensor(list(itertools.product(range(4), repeat=4)))  # (256, 4)
    all_err = ((q.decode(combos, False)[None] - x[:, None]) ** 2).sum(-1)  # (64, 256)
    optimum = all_err.min(1).values
    t = q.tables()
    xc = (x @ t.flat.T).view(-1, 4, 4)
    start = q.indexes(x, 0)
    # With unbounded shortlists one round searches every combination: exactly the optimum.
    exact = refine_round(xc, start, t, limit=10**6)
    assert torch.allclose(sq_err(q, x, exact), optimum)
    # The default (pruned) search after 5 rounds gets close to it on average.
    with torch.no_grad():
        refined = sq_err(q, x, q.indexes(x, 5))
    assert float(refined.mean()) <= 1.05 * float(optimum.mean())
