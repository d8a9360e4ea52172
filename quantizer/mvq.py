"""Direct-sum multi-codebook vector quantisation (MVQ), SPEC section 2.

A vector x (dim,) is approximated by ``sum_c centers[c, i_c]``: C codebooks of K entries, with no
order between codebooks. Encoding starts from the argmax of ``to_logits(x)`` per codebook and
then runs R rounds of joint refinement. One round:

1. score every single-codebook substitution by its exact change of squared error;
2. keep the best ``shortlist(1)`` entries of every codebook;
3. merge groups of codebooks pairwise (C -> C/2 -> ... -> 1 groups); each merge scores every
   pair of the two groups' candidates exactly and keeps the best ``shortlist(L)`` (L codebooks
   per group), until one best combination remains. It replaces the current codes only when it
   lowers the error, so a round never makes a code worse.

The pairwise scores need inner products of candidate changes. The reference implementation
(k2-fsa ``multi_quantization``) materialises (B, groups, K', dim) difference tensors for them in
every round. Here everything comes from the centres' Gram matrix ``G = centers @ centers.T``,
computed once per set of weights: substitution scores are sums of Gram rows, and the cross terms
of the merges are sums of Gram entries between shortlisted entries (looked up per codebook pair,
summed with embedding bags), so after the first ``x @ centers.T`` no tensor of size ``dim`` is
touched again.

A quantiser's id is derived from what decides its codes (:func:`content_id`): the shapes, the
logit weights, the centres and the normalisation stats. Two bit-identical trainings share an id;
any change of weights gives a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spear.errors import SpearError

# 3: records the teacher weights it was trained on; 2: the id is derived from the weights
# (1: a random id)
FORMAT_VERSION = 3
CPU_CHUNK = 64  # most vectors per refinement task on CPU (its look-up tensors stay in cache)
MIN_CHUNK = 16  # fewer vectors than this per task are not worth a thread
SCALE_SPEED = 10.0  # scales are exp(speed * param): a larger effective lr for the two scalars


class QuantizerMismatchError(SpearError):
    """Codes or data from one quantiser meet another one."""


def check_same_quantizer(id_a: str, id_b: str, what: str = "codes") -> None:
    """Raise when ``id_a`` and ``id_b`` name different quantisers: their codes must never mix."""
    if id_a != id_b:
        raise QuantizerMismatchError(
            f"{what} come from quantiser {id_a!r} but quantiser {id_b!r} was expected; "
            "codes of different quantisers cannot be mixed"
        )


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # by (process id, workers)
_POOLS_LOCK = threading.Lock()


def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    """``workers`` threads whose torch operations run single-threaded (set once per thread).

    ``torch.set_num_threads`` sets the calling thread's OpenMP/MKL thread count and a process
    default; the default is restored as soon as every worker has set its own. A forked child
    gets pools of its own (threads do not survive a fork)."""
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            saved = torch.get_num_threads()
            ready = threading.Barrier(workers + 1)

            def single_threaded() -> None:
                torch.set_num_threads(1)
                ready.wait()

            pool = ThreadPoolExecutor(workers, "mvq-encode", single_threaded)
            for _ in range(workers):  # start every worker now (each blocks until all have)
                pool.submit(int)
            ready.wait()
            torch.set_num_threads(saved)
            _POOLS[key] = pool
        return pool


ID_PREFIX = "mvq-"
CODE_TENSORS = ("to_logits.weight", "to_logits.bias", "centers")
NORM_TENSORS = ("norm_mean", "norm_std")


def content_id(
    tensors: dict[str, Tensor], dim: int, num_codebooks: int, codebook_size: int, normalised: bool
) -> str:
    """``mvq-`` + 16 hex digits of the sha256 of everything that decides the codes: the shapes,
    then each of :data:`CODE_TENSORS` (and, when normalised, :data:`NORM_TENSORS`) by name,
    shape and little-endian float32 bytes. ``tensors`` as :meth:`Quantizer.export_tensors`."""
    h = hashlib.sha256()
    head = {"dim": dim, "num_codebooks": num_codebooks, "codebook_size": codebook_size}
    h.update(json.dumps(head | {"normalised": normalised}, sort_keys=True).encode())
    for name in CODE_TENSORS + (NORM_TENSORS if normalised else ()):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"\n{name} {list(t.shape)}\n".encode())
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return ID_PREFIX + h.hexdigest()[:16]


def shortlist(group_codebooks: int, codebook_size: int) -> int:
    """Candidates kept per group of ``group_codebooks`` codebooks during refinement: 16 for
    K=256 (8 for small K), doubling each time the group size grows 4x, at most 128 (the
    reference's schedule; it keeps the work per merge roughly constant)."""
    k = 8 if codebook_size <= 16 else 16
    size = group_codebooks
    while size >= 4:
        size //= 4
        k *= 2
    return min(k, 128)


@dataclass
class QuantizerInfo:
    """What a saved quantiser says about itself (the JSON next to its tensors). Its id is not
    here: :attr:`Quantizer.id` derives it from the weights."""

    dim: int
    num_codebooks: int
    codebook_size: int
    teacher: str = ""
    layer: int = -1
    teacher_weights: str = ""
    """The weights of the teacher whose embeddings it was trained on, from their metadata: the
    checkpoint's sha256, ``random`` (a random-weights teacher), or empty: unknown (embeddings
    that do not say, or a quantiser written before format 3)."""
    normalised: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    rrl: float | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    def trained_on(self) -> str:
        """The teacher, layer and weights it was trained on, in words."""
        weights = self.teacher_weights
        said = (
            "unknown weights"
            if not weights
            else "random weights"
            if weights == "random"
            else f"checkpoint sha256 {weights}"
        )
        layer = f"layer {self.layer}" if self.layer >= 0 else "layer unknown"
        return f"{self.teacher or 'unknown teacher'}, {layer}, {said}"

    @classmethod
    def from_json(cls, text: str) -> QuantizerInfo:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class _Tables:
    """Look-up tables for refinement, derived from the centres (recomputed when they change)."""

    version: tuple[int, ...]
    flat: Tensor  # (C*K, dim) centres
    gram: Tensor  # (C*K, C*K) all centre inner products
    diag_rows: Tensor  # (C, K, K) the diagonal blocks: <c_ja, c_jb>
    sq: Tensor  # (C, K) squared norms of the centres


class Quantizer(nn.Module):
    """MVQ encoder/decoder. ``encode`` takes embeddings (..., dim) in the teacher's space
    (normalising them when the quantiser has stats) and returns uint8 codes (..., C)."""

    norm_mean: Tensor  # (dim,) buffers: per-dimension stats of the training set
    norm_std: Tensor

    def __init__(self, info: QuantizerInfo) -> None:
        super().__init__()
        c, k, d = info.num_codebooks, info.codebook_size, info.dim
        if c < 1 or c & (c - 1):
            raise ValueError(f"num_codebooks must be a power of two, got {c}")
        if not 2 <= k <= 256:
            raise ValueError(f"codebook_size must be in 2..256 for uint8 codes, got {k}")
        self.info = info
        self.to_logits = nn.Linear(d, c * k)
        # Centres start as the logit weights (a cheap, data-independent init that works).
        self.centers = nn.Parameter(self.to_logits.weight.detach().clone().reshape(c, k, d))
        self.logits_scale = nn.Parameter(torch.zeros(()))
        self.centers_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("norm_mean", torch.zeros(d))
        self.register_buffer("norm_std", torch.ones(d))
        self._tables: _Tables | None = None
        self._id: tuple[tuple[Any, ...], str] | None = None

    # -- shapes and parameters -------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def num_codebooks(self) -> int:
        return self.info.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.info.codebook_size

    @property
    def id(self) -> str:
        """The content id (:func:`content_id`) of the current weights; cached until a parameter
        or buffer changes (in place or replaced)."""
        tensors = [*self.parameters(), *self.buffers()]
        key = (self.info.normalised, *((id(t), t._version) for t in tensors))
        if self._id is None or self._id[0] != key:
            i = self.info
            ident = content_id(
                self.export_tensors(), i.dim, i.num_codebooks, i.codebook_size, i.normalised
            )
            self._id = (key, ident)
        return self._id[1]

    def get_centers(self) -> Tensor:
        """Effective centres (C, K, dim)."""
        return (self.centers_scale * SCALE_SPEED).exp() * self.centers

    def logits(self, x: Tensor) -> Tensor:
        """Logits (B, C, K) of normalised x (B, dim)."""
        scaled = (self.logits_scale * SCALE_SPEED).exp() * x
        return self.to_logits(scaled).reshape(-1, self.num_codebooks, self.codebook_size)

    def set_normalisation(self, mean: Tensor, std: Tensor) -> None:
        self.norm_mean.copy_(mean)
        self.norm_std.copy_(std.clamp_min(1e-5))
        self.info.normalised = True

    def normalise(self, x: Tensor) -> Tensor:
        """Teacher space -> the space the codebooks live in (identity without stats)."""
        if not self.info.normalised:
            return x
        return (x - self.norm_mean) / self.norm_std

    def denormalise(self, x: Tensor) -> Tensor:
        if not self.info.normalised:
            return x
        return x * self.norm_std + self.norm_mean

    def _param_dtype(self) -> torch.dtype:
        return self.centers.dtype

    # -- decode ----------------------------------------------------------------------------

    def decode(self, codes: Tensor, denormalise: bool = True) -> Tensor:
        """Codes (..., C) (any integer dtype) -> reconstruction (..., dim)."""
        if codes.shape[-1] != self.num_codebooks:
            raise ValueError(
                f"codes have {codes.shape[-1]} codebooks, expected {self.num_codebooks}"
            )
        lead = codes.shape[:-1]
        idx = codes.reshape(-1, self.num_codebooks).to(self.centers.device, torch.long)
        flat = self.get_centers().reshape(-1, self.dim)  # (C*K, dim)
        offsets = torch.arange(self.num_codebooks, device=idx.device) * self.codebook_size
        x_hat = F.embedding_bag(idx + offsets, flat, mode="sum")  # (B, dim)
        if denormalise:
            x_hat = self.denormalise(x_hat)
        return x_hat.reshape(*lead, self.dim)

    # -- encode ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: Tensor, refine_rounds: int = 5, batch_size: int = 0) -> Tensor:
        """Embeddings (..., dim) -> uint8 codes (..., C) on the quantiser's device."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"input has dim {x.shape[-1]}, quantiser expects {self.dim}")
        if not 0 <= refine_rounds <= 5:
            raise ValueError(f"refine_rounds must be in 0..5, got {refine_rounds}")
        lead = x.shape[:-1]
        dev = self.centers.device
        flat_x = x.reshape(-1, self.dim)
        if batch_size <= 0:
            batch_size = 4096  # bounds memory; on CPU, indexes() splits further for threads
        out = torch.empty(flat_x.shape[0], self.num_codebooks, dtype=torch.uint8, device=dev)
        for start in range(0, flat_x.shape[0], batch_size):
            chunk = flat_x[start : start + batch_size].to(dev, self._param_dtype())
            out[start : start + batch_size] = self.indexes(self.normalise(chunk), refine_rounds).to(
                torch.uint8
            )
        return out.reshape(*lead, self.num_codebooks)

    @torch.no_grad()
    def indexes(self, x: Tensor, refine_rounds: int) -> Tensor:
        """Normalised x (B, dim) -> int64 indexes (B, C): argmax start + refinement.

        On CPU with refinement, the vectors are split into chunks of at most ``CPU_CHUNK`` that
        run in parallel on ``torch.get_num_threads()`` worker threads, each running torch
        single-threaded. Refinement is many small tensor operations; intra-op threading would
        meet at a barrier after every one of them, which costs more than the operations
        themselves whenever another process competes for the cores. Chunks are independent, so
        the codes are the same either way."""
        workers = torch.get_num_threads()
        b = x.shape[0]
        if refine_rounds == 0 or x.device.type != "cpu" or workers <= 1 or b < 2 * MIN_CHUNK:
            return self._indexes(x, refine_rounds)
        self.tables()  # built once here, with every thread, before the workers share it
        size = max(MIN_CHUNK, min(CPU_CHUNK, -(-b // workers)))
        parts = _cpu_pool(workers).map(lambda p: self._indexes(p, refine_rounds), x.split(size))
        return torch.cat(list(parts))

    @torch.no_grad()
    def _indexes(self, x: Tensor, refine_rounds: int) -> Tensor:
        idx = self.logits(x).argmax(dim=-1)  # (B, C)
        if refine_rounds == 0:
            return idx
        t = self.tables()
        xc = (x @ t.flat.T).view(-1, self.num_codebooks, self.codebook_size)  # (B, C, K)
        # A round is a deterministic function of (x, codes): a vector whose codes did not
        # change would not change in any later round either, so only changed ones go on.
        active = torch.arange(idx.shape[0], device=idx.device)
        for _ in range(refine_rounds):
            new = refine_round(xc[active], idx[active], t)
            changed = (new != idx[active]).any(1)
            idx[active] = new
            active = active[changed]
            if active.numel() == 0:
                break
        return idx

    def tables(self) -> _Tables:
        """Gram tables for the current centres; cached until a parameter changes in place."""
        version = (self.centers._version, self.centers_scale._version, id(self.centers))
        if self._tables is not None and self._tables.version == version:
            return self._tables
        with torch.no_grad():
            c, k = self.num_codebooks, self.codebook_size
            if (c * k) ** 2 >= 2**31:
                raise ValueError(f"refinement tables for {c}x{k} codebooks exceed int32 indexing")
            flat = self.get_centers().reshape(c * k, self.dim).detach()
            gram = flat @ flat.T  # (C*K, C*K)
            gram = 0.5 * (gram + gram.T)  # exactly symmetric, so look-ups agree both ways
            # (C, K, K) diagonal blocks: diag_rows[j, a, b] = <c_ja, c_jb>
            diag_rows = gram.view(c, k, c, k).diagonal(0, 0, 2).permute(2, 0, 1).contiguous()
            sq = gram.diagonal().reshape(c, k).clone()
        self._tables = _Tables(version, flat, gram, diag_rows, sq)
        return self._tables

    # -- phase change ----------------------------------------------------------------------

    def product(self) -> Quantizer:
        """A quantiser with C/2 codebooks of K^2 entries; entry (a, b) of new codebook n is the
        sum of entry a of codebook 2n and entry b of 2n+1 (logits and centres alike), so it
        reconstructs exactly what this one does."""
        c, k, d = self.num_codebooks, self.codebook_size, self.dim
        info = QuantizerInfo(
            dim=d,
            num_codebooks=c // 2,
            codebook_size=k * k,
            teacher=self.info.teacher,
            layer=self.info.layer,
            teacher_weights=self.info.teacher_weights,
            normalised=self.info.normalised,
            training=dict(self.info.training),
        )
        out = Quantizer(info).to(self.centers.device, self.centers.dtype)
        with torch.no_grad():
            w = self.to_logits.weight.view(c // 2, 2, k, d)
            b = self.to_logits.bias.view(c // 2, 2, k)
            cen = self.centers.view(c // 2, 2, k, d)
            # (C/2, K, K, dim): first codebook of the pair is the high digit
            out.to_logits.weight.copy_((w[:, 0, :, None] + w[:, 1, None, :]).reshape(-1, d))
            out.to_logits.bias.copy_((b[:, 0, :, None] + b[:, 1, None, :]).reshape(-1))
            out.centers.copy_((cen[:, 0, :, None] + cen[:, 1, None, :]).reshape(c // 2, k * k, d))
            out.logits_scale.copy_(self.logits_scale)
            out.centers_scale.copy_(self.centers_scale)
            out.norm_mean.copy_(self.norm_mean)
            out.norm_std.copy_(self.norm_std)
        return out

    # -- save / load -----------------------------------------------------------------------

    def export_tensors(self) -> dict[str, Tensor]:
        """The saved tensors, with the learned scales folded in."""
        with torch.no_grad():
            w = (self.logits_scale * SCALE_SPEED).exp() * self.to_logits.weight
            return {
                "to_logits.weight": w.detach().float().cpu().contiguous(),
                "to_logits.bias": self.to_logits.bias.detach().float().cpu().contiguous(),
                "centers": self.get_centers().detach().float().cpu().contiguous(),
                "norm_mean": self.norm_mean.detach().float().cpu().contiguous(),
                "norm_std": self.norm_std.detach().float().cpu().contiguous(),
            }

    @classmethod
    def from_tensors(cls, info: QuantizerInfo, tensors: dict[str, Tensor]) -> Quantizer:
        q = cls(info)
        with torch.no_grad():
            q.to_logits.weight.copy_(tensors["to_logits.weight"])
            q.to_logits.bias.copy_(tensors["to_logits.bias"])
            q.centers.copy_(tensors["centers"])
            q.norm_mean.copy_(tensors["norm_mean"])
            q.norm_std.copy_(tensors["norm_std"])
        return q


# -- refinement ----------------------------------------------------------------------------


def refine_round(xc: Tensor, idx: Tensor, t: _Tables, limit: int | None = None) -> Tensor:
    """One round of joint refinement, all from Gram look-ups.

    Args:
        xc: (B, C, K) inner products of the (normalised) inputs with every centre.
        idx: (B, C) current indexes.
        t: the quantiser's Gram tables.
        limit: overrides the shortlist sizes (tests pass a huge one for an exhaustive search).
    Returns: (B, C) indexes whose squared error is never larger than that of ``idx``.
    """
    b, c, k = xc.shape
    offsets = torch.arange(c, device=xc.device) * k  # (C,)
    rows = idx + offsets  # (B, C) rows of the chosen centres in the flat tables
    # <x_hat, c_jk> for the current x_hat: a sum of the chosen centres' Gram rows.
    approx_c = F.embedding_bag(rows, t.gram, mode="sum").view(b, c, k)  # (B, C, K)
    err_c = approx_c - xc  # <e, c_jk> with e = x_hat - x
    err_old = err_c.gather(2, idx[..., None])  # (B, C, 1)
    g_old = F.embedding(rows, t.diag_rows.view(c * k, k))  # (B, C, K): <c_jo, c_jk>
    sq_old = t.sq.view(-1)[rows]  # (B, C)
    # Change of squared error when codebook j alone switches to entry k:
    # ||e + c_jk - c_jo||^2 - ||e||^2 = ||c_jk - c_jo||^2 + 2 <e, c_jk - c_jo>
    change = t.sq + sq_old[..., None] - 2 * g_old + 2 * (err_c - err_old)  # (B, C, K)

    s = min(limit or shortlist(1, k), k)
    val, cand = change.topk(s, dim=2, largest=False, sorted=False)  # (B, C, S)
    best, best_pos = merge_candidates(val, cand, idx, t.gram, k, limit)
    new_idx = cand.gather(2, best_pos[..., None]).squeeze(2)
    # Keep the old codes unless the best combination really lowers the error.
    return torch.where((best < 0)[:, None], new_idx, idx)


def lookup(table: Tensor, flat_idx: Tensor) -> Tensor:
    """``table.take(flat_idx)`` for int32 indexes (int32 halves the index tensors' memory
    traffic; Gram tables of up to 2^31 entries only)."""
    return table.index_select(0, flat_idx.reshape(-1)).view(flat_idx.shape)


def merge_candidates(
    val: Tensor,
    cand: Tensor,
    idx: Tensor,
    gram: Tensor,
    codebook_size: int,
    limit: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Merge candidate groups pairwise until one best combination remains.

    Two groups' candidates p (even group) and q (odd group) combine with error change
    ``val[p] + val[q] + 2 * <D(p), D(q)>``, where D(p) is the change of the reconstruction under
    p: the sum over the group's codebooks j of (centre p_j - current centre o_j). With
    ``t[p, q] = <sum_j c_j,p_j, sum_l c_l,q_l>`` that cross term is
    ``t[p, q] - t[p, o] - t[o, q] + t[o, o]`` (o: keep the current entries), so each group
    carries one extra candidate, "current entries", and t is all that is needed.

    Every p_j is one of codebook j's S shortlisted entries or its current one, so a merge first
    looks up, per vector, ``g[j, a, l, y] = <c_j,a, c_l,y>`` over those S+1 entries for each
    codebook pair (j, l) that meets in it (each pair meets exactly once in the whole search:
    C(C-1)/2 * (S+1)^2 look-ups a round, about 35k for 16 x 256), then forms t with two
    embedding bags: rows of g summed over the even candidates' entries, then the result's
    (transposed) rows summed over the odd candidates' entries.

    Args:
        val: (B, C, S) error change of each single-codebook candidate.
        cand: (B, C, S) the candidates' entries; idx: (B, C) current entries.
        gram: the (C*K, C*K) Gram matrix of the centres.
    Returns: the best combination's error change (B,) and its positions (B, C) in the
        codebooks' candidate lists.
    """
    b, c, s = val.shape
    k = codebook_size
    dev = val.device
    flat_gram = gram.view(-1)
    # Each codebook's shortlisted entries followed by its current one (B, C, S+1), as rows
    # of the flat (C*K, C*K) Gram matrix.
    offsets = torch.arange(c, device=dev, dtype=torch.int32)[:, None] * k
    ext = torch.cat([cand, idx[:, :, None]], 2).to(torch.int32) + offsets
    # Candidates as positions in their codebooks' lists; each group also gets one extra
    # candidate, position S everywhere: "keep the current entries".
    pos = torch.arange(s + 1, device=dev).view(1, 1, s + 1, 1).expand(b, c, s + 1, 1)
    n, lw = c, 1
    while n > 1:
        kp = val.shape[2]
        half = n // 2
        # Group h covers codebooks h*2*lw .. (h+1)*2*lw - 1: its even half then its odd half.
        sides = ext.view(b, half, 2, lw, s + 1)
        e_rows = (sides[:, :, 0] * (c * k))[..., None, None]  # (B, N/2, Le, S+1, 1, 1)
        # g[b, h, j, a, l, y] = <c_j,a, c_l,y>, position S standing for the current entry.
        g = lookup(flat_gram, e_rows + sides[:, :, 1, None, None])  # (B, N/2, Le, S+1, Lo, S+1)
        if lw == 1:  # single codebooks: candidate = shortlist position
            t = g.view(b, half, s + 1, s + 1)
        else:
            pe, po = pos[:, 0::2], pos[:, 1::2]  # (B, N/2, K'+1, L)
            # r[p, (l, y)] = sum over even codebooks j of g[j, entry of p in j, l, y] ...
            start = torch.arange(b * half * lw, device=dev).view(b, half, 1, lw) * (s + 1)
            r = F.embedding_bag((start + pe).view(-1, lw), g.view(-1, lw * (s + 1)), mode="sum")
            r = r.view(b, half, kp + 1, lw * (s + 1)).transpose(2, 3).contiguous()
            # ... and t[p, q] = sum over odd codebooks l of r[p, (l, entry of q in l)].
            start = torch.arange(b * half * lw, device=dev).view(b, half, 1, lw) * (s + 1)
            t = F.embedding_bag((start + po).view(-1, lw), r.view(-1, kp + 1), mode="sum")
            t = t.view(b, half, kp + 1, kp + 1).transpose(2, 3)  # (B, N/2, K'+1, K'+1)
        # t[p, q] = <sum of even centres under p, sum of odd centres under q>, so the cross
        # term of the changes is t[p, q] - t[p, old] - t[old, q] + t[old, old].
        cross = (t[..., :kp, :kp] - t[..., :kp, kp:]) - (t[..., kp:, :kp] - t[..., kp:, kp:])
        score = (val[:, 0::2, :, None] + val[:, 1::2, None, :] + 2 * cross).flatten(2)
        n, lw = half, lw * 2
        if n == 1:
            val, sel = score.min(dim=2, keepdim=True)  # (B, 1, 1)
            keep = 1
        else:
            keep = min(limit or shortlist(lw, k), kp * kp)
            val, sel = score.topk(keep, dim=2, largest=False, sorted=False)  # (B, N, keep)
        # Positions of the kept candidates, then the current entries again: (B, N, keep+1, L).
        old = sel.new_full((b, n, 1), kp)
        p, q = torch.cat([sel // kp, old], 2), torch.cat([sel % kp, old], 2)
        pos = torch.cat(
            [
                pos[:, 0::2].gather(2, p[..., None].expand(b, n, keep + 1, lw // 2)),
                pos[:, 1::2].gather(2, q[..., None].expand(b, n, keep + 1, lw // 2)),
            ],
            dim=3,
        )  # (B, N, keep + 1, L)
    return val.reshape(b), pos[:, :, 0].reshape(b, c)


def squared_error(q: Quantizer, x: Tensor, idx: Tensor) -> Tensor:
    """Squared reconstruction error (B,) of normalised x (B, dim) under indexes (B, C)."""
    return ((q.decode(idx, denormalise=False) - x) ** 2).sum(-1)


def relative_reconstruction_loss(x: Tensor, x_hat: Tensor) -> float:
    """RRL: sum ||x_hat - x||^2 / sum ||x - mean(x)||^2 over the frames (B, dim)."""
    num = ((x_hat.double() - x.double()) ** 2).sum()
    den = ((x.double() - x.double().mean(0)) ** 2).sum().clamp_min(1e-20)
    return float(num / den)
