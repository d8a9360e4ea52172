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
of the merges are sums of entries of a small per-vector matrix of look-ups, so after the first
``x @ centers.T`` no tensor of size ``dim`` is touched again.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spear.errors import SpearError

FORMAT_VERSION = 1
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


def new_id() -> str:
    """A random 8-hex-digit quantiser id."""
    return secrets.token_hex(4)


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
    """What a saved quantiser says about itself (the JSON next to its tensors)."""

    dim: int
    num_codebooks: int
    codebook_size: int
    id: str = field(default_factory=new_id)
    teacher: str = ""
    layer: int = -1
    normalised: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    rrl: float | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

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
    blocks: Tensor  # (C*C*K*K,) the Gram matrix as contiguous (C, C, K, K) blocks
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
        return self.info.id

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
            # On CPU, argmax alone wants big chunks (the (C*K, dim) logit weights are read once
            # per chunk); refinement's look-up tensors grow with the chunk, so smaller ones there.
            batch_size = 4096 if dev.type == "cuda" or refine_rounds == 0 else 256
        out = torch.empty(flat_x.shape[0], self.num_codebooks, dtype=torch.uint8, device=dev)
        for start in range(0, flat_x.shape[0], batch_size):
            chunk = flat_x[start : start + batch_size].to(dev, self._param_dtype())
            out[start : start + batch_size] = self.indexes(self.normalise(chunk), refine_rounds).to(
                torch.uint8
            )
        return out.reshape(*lead, self.num_codebooks)

    @torch.no_grad()
    def indexes(self, x: Tensor, refine_rounds: int) -> Tensor:
        """Normalised x (B, dim) -> int64 indexes (B, C): argmax start + refinement."""
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
            blocks4 = gram.view(c, k, c, k).permute(0, 2, 1, 3).contiguous()  # (C, C, K, K)
            diag_rows = blocks4.diagonal(dim1=0, dim2=1).permute(2, 0, 1).contiguous()
            sq = gram.diagonal().reshape(c, k).clone()
        self._tables = _Tables(version, flat, gram, blocks4.view(-1), diag_rows, sq)
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
            id=self.info.id,
            teacher=self.info.teacher,
            layer=self.info.layer,
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
    dev = xc.device
    offsets = torch.arange(c, device=dev) * k  # (C,)
    # <x_hat, c_jk> for the current x_hat: a sum of the chosen centres' Gram rows.
    approx_c = F.embedding_bag(idx + offsets, t.gram, mode="sum").view(b, c, k)  # (B, C, K)
    err_c = approx_c - xc  # <e, c_jk> with e = x_hat - x
    err_old = err_c.gather(2, idx[..., None])  # (B, C, 1)
    g_old = t.diag_rows[torch.arange(c, device=dev), idx]  # (B, C, K): <c_jo, c_jk>
    sq_old = t.sq.gather(1, idx.T).T  # (B, C)
    # Change of squared error when codebook j alone switches to entry k:
    # ||e + c_jk - c_jo||^2 - ||e||^2 = ||c_jk - c_jo||^2 + 2 <e, c_jk - c_jo>
    change = t.sq + sq_old[..., None] - 2 * g_old + 2 * (err_c - err_old)  # (B, C, K)

    s = min(limit or shortlist(1, k), k)
    val, cand = change.topk(s, dim=2, largest=False, sorted=False)  # (B, C, S)

    # Correction tables: u[b, j, a, l] = <c_j,cand_ja, c_l,o_l>, w[b, j, l] = <c_jo, c_lo>, so
    # <c_ja - c_jo, c_lb - c_lo> = G(ja, lb) - u[j, a, l] - u[l, b, j] + w[j, l].
    cb = torch.arange(c, device=dev, dtype=torch.int32)
    pair_base = (cb[:, None] * c + cb[None, :]) * (k * k)  # (C, C) start of block (j, l)
    cand32, idx32 = cand.int(), idx.int()
    u = lookup(
        t.blocks, pair_base[None, :, None, :] + cand32[..., None] * k + idx32[:, None, None, :]
    )  # (B, C, S, C)
    w = lookup(t.blocks, pair_base[None] + idx32[:, :, None] * k + idx32[:, None, :])  # (B, C, C)

    best, best_pos = merge_candidates(val, cand, idx, u, w, t.blocks, k, limit)
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
    u: Tensor,
    w: Tensor,
    blocks: Tensor,
    codebook_size: int,
    limit: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Merge candidate groups pairwise until one best combination remains.

    Args:
        val: (B, C, S) error change of each single-codebook candidate.
        cand: (B, C, S) the candidates' entries; idx: (B, C) current entries.
        u, w: correction tables of :func:`refine_round`.
        blocks: the Gram matrix as flat (C, C, K, K) blocks.
    Returns: the best combination's error change (B,) and its positions (B, C) in the
        codebooks' candidate lists.
    """
    b, c, s = val.shape
    k = codebook_size
    dev = val.device
    cb = torch.arange(c, device=dev)
    bo = torch.arange(b, device=dev)
    pos = torch.arange(s, device=dev).view(1, 1, s, 1).expand(b, c, s, 1)  # (B, N, K', L)
    n, width = c, 1
    while n > 1:
        kp = val.shape[2]
        half, lw = n // 2, width
        grp = cb.view(half, 2, lw)  # codebooks of each (even, odd) group pair
        ev, od = grp[:, 0], grp[:, 1]  # (N/2, L)
        pe, po = pos[:, 0::2], pos[:, 1::2]  # (B, N/2, K', L)
        # Entries chosen by each even candidate, and every shortlisted entry of the odd group.
        e_entry = cand[bo[:, None, None, None], ev[None, :, None, :], pe]  # (B, N/2, K', L)
        o_entry = cand[:, od]  # (B, N/2, L, S)
        base = ((ev[:, :, None] * c + od[:, None, :]) * (k * k)).int()  # (N/2, Le, Lo)
        # R[b, h, p, l, y] = <change of even candidate p, change of odd codebook l to entry y>.
        # The look-ups are ordered (h, j, l, b, ...) so consecutive ones stay inside one
        # (K, K) Gram block, which stays in cache.
        e_t = (e_entry.int() * k).permute(1, 3, 0, 2)[:, :, None, :, :, None]  # (N/2,Le,1,B,K',1)
        o_t = o_entry.int().permute(1, 2, 0, 3)[:, None, :, :, None, :]  # (N/2, 1, Lo, B, 1, S)
        flat = (base[..., None, None, None] + e_t) + o_t  # (N/2, Le, Lo, B, K', S)
        r = lookup(blocks, flat).sum(1).permute(2, 0, 3, 1, 4)  # (B, N/2, K', Lo, S)
        u_e = u[
            bo[:, None, None, None, None],
            ev[None, :, None, :, None],
            pe[..., None],
            od[None, :, None, None, :],
        ].sum(3)  # (B, N/2, K', Lo): sum_j <c_j,new, c_l,old>
        u_t = u.transpose(2, 3)  # (B, C_l, C_j, S)
        u_o = u_t[bo[:, None, None, None], od[None, :, :, None], ev[None, :, None, :]]
        u_o = u_o.sum(3)  # (B, N/2, Lo, S): sum_j <c_j,old, c_l,y>
        w_eo = w[bo[:, None, None, None], ev[None, :, :, None], od[None, :, None, :]].sum(2)
        r = r - u_e[..., None] - (u_o - w_eo[..., None])[:, :, None]  # (B, N/2, K', Lo, S)
        # cross[p, q] = sum over odd codebooks l of R[p, l, entry of candidate q in l]
        ri = (torch.arange(lw, device=dev) * s)[None, None, None, :] + po  # (B, N/2, K', Lo)
        cross = r.flatten(3).gather(3, ri.flatten(2)[:, :, None, :].expand(b, half, kp, kp * lw))
        cross = cross.view(b, half, kp, kp, lw).sum(-1)  # (B, N/2, K', K')
        score = (val[:, 0::2, :, None] + val[:, 1::2, None, :] + 2 * cross).flatten(2)
        n, width = half, width * 2
        keep = 1 if n == 1 else min(limit or shortlist(width, k), kp * kp)
        val, sel = score.topk(keep, dim=2, largest=False, sorted=False)  # (B, N, keep)
        p, q = sel // kp, sel % kp
        pos = torch.cat(
            [
                pe.gather(2, p[..., None].expand(b, n, keep, lw)),
                po.gather(2, q[..., None].expand(b, n, keep, lw)),
            ],
            dim=3,
        )  # (B, N, keep, L)
    return val.reshape(b), pos.reshape(b, c)


def squared_error(q: Quantizer, x: Tensor, idx: Tensor) -> Tensor:
    """Squared reconstruction error (B,) of normalised x (B, dim) under indexes (B, C)."""
    return ((q.decode(idx, denormalise=False) - x) ** 2).sum(-1)


def relative_reconstruction_loss(x: Tensor, x_hat: Tensor) -> float:
    """RRL: sum ||x_hat - x||^2 / sum ||x - mean(x)||^2 over the frames (B, dim)."""
    num = ((x_hat.double() - x.double()) ** 2).sum()
    den = ((x.double() - x.double().mean(0)) ** 2).sum().clamp_min(1e-20)
    return float(num / den)
