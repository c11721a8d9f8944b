"""int4: weight-only, asymmetric, groups of `group_size` along the input axis (a scale and a zero per
group), two values per byte; W ≈ (q − 8) · scale + zero per group, q in 0..15.

Kept ranks move in steps of the group size: that makes a column prefix a whole number of groups, and
the CPU kernel's packed rows come in blocks of 32 (every supported group size is a multiple of 32).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from acip_core.formats.family import Family
from acip_core.formats.qweight import QWeight, zero_rows

INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # chosen by measurement (benchmarks/RESULTS.md, "Precision as a second axis: the formats")
_INT4_CPU = torch.ops.aten._weight_int4pack_mm_for_cpu  # torch's CPU kernel (looked up once)


class Int4Weight(QWeight, kind="int4"):
    """data packed for the device's kernel (CPU: uint8 [out, in/2]), scales [in/g, out, 2] (scale,
    zero). The codes q are read back from the packed bytes on the CPU (`codes()`); only a layout that
    cannot be read back (CUDA's) keeps them unpacked beside it (`q`, 1 byte per weight more)."""

    def scale_rows(self, factor: torch.Tensor) -> "QWeight":
        # per-(row, group) grids are equivariant to a row's scale (int4_balance)
        f = F.pad(factor.float(), (0, self.scales.shape[-2] - len(factor)), value=1.0)
        scales = (self.scales.float() * f[None, :, None]).to(self.scales.dtype)  # [k/g, rows, 2]: scale, zero
        return Int4Weight("int4", self.data, scales, self.shape, self.group_size, self.q)

    def rows(self, n: int) -> "QWeight":
        """The first n output rows (n must be a multiple of 32)."""
        out, k = self.shape
        if n == out:
            return self
        if n % 32:
            raise ValueError(f"int4 rows come in blocks of 32, got {n}")
        block = None if self.data.is_cuda else _int4_cpu_block()
        if block is None:  # a layout that is not read back (CUDA's): repacked from the kept codes
            data = _pack_int4(self.q[:n])
        elif n % block == 0:  # whole blocks: a view
            data = self.data[:n]
        else:  # AVX-512's blocks of 64: the last 32 rows repacked as the smaller last block they become
            whole = n // block * block
            data = torch.cat([self.data[:whole], _pack_int4(_unpack_int4_cpu(self.data[whole:whole + block], k)[: n - whole])])
        return Int4Weight("int4", data, self.scales[:, :n].contiguous(), (n, k), self.group_size,
                          None if self.q is None else self.q[:n])

    def codes(self) -> torch.Tensor:
        """The codes [rows, in] uint8 (rows padded to 32), unpacked from the CPU layout."""
        if self.q is not None:
            return self.q
        return _unpack_int4_cpu(self.data, self.shape[1])

    def cols(self, n: int) -> "QWeight":
        """The first n input columns (a copy; n must be a whole number of groups)."""
        out, k = self.shape
        if n == k:
            return self
        if n % self.group_size:
            raise ValueError(f"int4 columns come in groups of {self.group_size}, got {n}")
        block = None if self.data.is_cuda else _int4_cpu_block()
        if block is not None:  # a column prefix is a slice of each block's bytes: a copy, no repacking
            rows = self.data.shape[0]
            whole = rows // block * block
            parts = [self.data[:whole].view(whole // block, k, block // 2)[:, :n].reshape(whole, n // 2)]
            if rows > whole:  # the smaller last block
                parts.append(self.data[whole:].reshape(k, -1)[:n].reshape(rows - whole, n // 2))
            data = torch.cat(parts) if rows > whole else parts[0]
        else:
            data = _pack_int4(self.codes()[:, :n])
        return Int4Weight("int4", data, self.scales[: n // self.group_size].contiguous(), (out, n), self.group_size,
                          None if self.q is None else self.q[:, :n])

    def _cpu_product(self, x2: torch.Tensor) -> torch.Tensor:
        return _INT4_CPU(x2.contiguous(), self.data, self.group_size, self.scales)

    def cpu_kernel(self):
        out, k = self.shape
        if self.data.is_cuda or not out or not k or self.data.shape[0] != out:
            return None
        op, data, group, scales = _INT4_CPU.default, self.data, self.group_size, self.scales
        return lambda x2: op(x2, data, group, scales)

    def _cuda_product(self, x2: torch.Tensor) -> torch.Tensor:
        """torch's CUDA int4 kernel where it runs (_pack_int4 chose its layout), else the dequantized
        reference."""
        if self.data.dtype == torch.int32:  # the kernel's layout
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.data, self.group_size,
                                                   self.scales.to(torch.bfloat16))
            return y.to(x2.dtype)
        return F.linear(x2, self.dequantize().to(x2.dtype))

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(CPU layout: start a multiple of 32, its packed row blocks.)"""
        out, k = self.shape
        stop = out if stop is None else min(stop, out)
        if self.q is not None:
            q = self.q[start:stop]
        else:  # CPU layout: whole blocks unpack alone
            if start % 32:
                raise ValueError(f"int4 rows unpack in blocks of 32, got start {start}")
            block = _int4_cpu_block()
            first = start // block * block
            q = _unpack_int4_cpu(self.data[first:-(-stop // block) * block], k)[start - first: stop - first]
        rows, g = q.shape[0], self.group_size
        sz = self.scales[:, start:stop].float()  # [k/g, rows, 2]
        scale, zero = sz[..., 0].t()[:, :, None], sz[..., 1].t()[:, :, None]  # [rows, k/g, 1]
        return ((q.float().reshape(rows, k // g, g) - 8) * scale + zero).reshape(rows, k)

    def portable(self) -> dict:
        """Codes two per byte, low nibble first (the template repacks them for its CPU kernel)."""
        codes = self.codes().to(torch.uint8)
        return {"qweight": (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), "scales": self.scales.contiguous()}


class Int4Family(Family):
    name, dash, marker = "int4", "dashdot", "triangle-up"
    group_sizes, default_group_size = INT4_GROUP_SIZES, DEFAULT_GROUP_SIZE
    calibrated = True  # GPTQ codes from each layer's input Gram (engine/basis.py, "int4 quantizer")

    def validate(self, format) -> None:
        if format.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {list(INT4_GROUP_SIZES)}, got {format.group_size}")

    def key(self, format) -> str:
        return f"int4-g{format.group_size}"

    def rank_step(self, format) -> int:
        """Whole groups."""
        return format.group_size

    def weight_bytes(self, format, out_features: int, in_features: int) -> int:
        """Rows padded to the kernel's blocks of 32; a scale and a zero per group."""
        groups = in_features // self.group_for(format, in_features) if in_features else 0
        rows = -(-out_features // 32) * 32
        return rows * in_features // 2 + 2 * groups * rows * self.compute_dtype(format).itemsize

    def group_for(self, format, in_features: int) -> int:
        """The group length used for an input size (the largest supported divisor <= group_size;
        SmolLM2's 576-wide inputs take groups of 64 when 128 is asked)."""
        for g in sorted(INT4_GROUP_SIZES, reverse=True):
            if g <= format.group_size and in_features % g == 0:
                return g
        raise ValueError(f"int4 needs an input size that is a multiple of 32, got {in_features}")

    def pack(self, format, weight: torch.Tensor, gram: torch.Tensor | None = None) -> QWeight:
        """`gram` (its input's second moment) lets int4 choose its codes by the output's error."""
        return quantize_int4(weight, self.group_for(format, weight.shape[1]), self.compute_dtype(format), gram=gram)

    def pack_many(self, format, weights: list, grams: list, rows: list) -> list:
        """One batched GPTQ per group length (far faster than one by one)."""
        by_group: dict[int, list[int]] = {}
        for i, w in enumerate(weights):
            by_group.setdefault(self.group_for(format, w.shape[1]), []).append(i)
        out = [None] * len(weights)
        for g, idx in by_group.items():
            packs = quantize_int4_many([weights[i] for i in idx], g, self.compute_dtype(format),
                                       grams=[grams[i] for i in idx], rows=[rows[i] for i in idx])
            for i, p in zip(idx, packs):
                out[i] = p
        return out

    def tensor_layout(self, format) -> str:
        g = format.group_size
        return ("`<layer>.down.qweight` [rank, in] and `<layer>.up.qweight` [out, rank] (rows padded to a "
                "multiple of 32), int4 codes, two per byte, low nibble first (so [rows, in / 2]), each with "
                f"`scales` [in / {g}, rows, 2] (scale and zero per group of {g} inputs); y = up(down(x)) "
                "(+ `<layer>.up.bias`).")


INT4 = Int4Family()
FAMILIES = (INT4,)


# -- quantizing -----------------------------------------------------------------------------------
# clipping ratios tried per group: shrinking the [min, max] range trades a few clipped outliers for
# a finer grid; the best per group (least squared error) is kept (RESULTS.md "int4 quantizer")
_INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, dtype=torch.bfloat16,
                  clips=_INT4_CLIPS, gram: torch.Tensor | None = None) -> QWeight:
    """Asymmetric int4 in groups along the input axis, with a per-group clipping search.

    With `gram` (the layer input's second moment E[x xᵀ], [in, in]) the codes are chosen GPTQ-style:
    input columns left to right, each column's rounding error spread over the columns not yet
    rounded so that the *output* error E‖ΔW x‖² is small, not the weights' own (ARCHITECTURE.md,
    "int4 quantizer"). Rows are independent either way, so a row prefix stays a valid quantization."""
    return quantize_int4_many([weight], group_size, dtype, clips, None if gram is None else [gram])[0]


_GPTQ_BATCH = 16  # weights quantized together by GPTQ (one Python step per column for all of them)


def quantize_int4_many(weights: list, group_size: int = DEFAULT_GROUP_SIZE, dtype=torch.bfloat16,
                       clips=_INT4_CLIPS, grams: list | None = None, rows: list | None = None) -> list[QWeight]:
    """`quantize_int4` of many weights (each with its Gram, or None: round to nearest), each padded
    with zero rows to `rows[i]` (default: its own rows). GPTQ runs batched over weights of the same
    input size: a model's worth of layers in a few thousand Python steps instead of one per column of
    every layer. Padded copies exist for one batch at a time only."""
    grams = list(grams) if grams is not None else [None] * len(weights)
    rows = list(rows) if rows is not None else [w.shape[0] for w in weights]
    for w in weights:
        if w.shape[1] % group_size:
            raise ValueError(f"int4 needs the input size ({w.shape[1]}) to be a multiple of the group size {group_size}")

    def padded(i, to=None):  # float32, zero rows up to `to` (default: the kernel's blocks of 32)
        return zero_rows(weights[i].detach().float(), to or -(-rows[i] // 32) * 32)

    out: list = [None] * len(weights)
    batches: dict[int, list[int]] = {}
    for i, g in enumerate(grams):
        if g is not None:
            batches.setdefault(weights[i].shape[1], []).append(i)
            continue
        w = padded(i)
        wg = w.reshape(w.shape[0], -1, group_size)
        scale, zero = _int4_grid(wg, dtype, clips)
        q = _int4_round(wg, scale, zero)
        out[i] = _int4_qweight((rows[i], w.shape[1]), q, scale, zero, group_size, dtype)
    for idx in batches.values():
        for start in range(0, len(idx), _GPTQ_BATCH):
            chunk = idx[start:start + _GPTQ_BATCH]
            n = [-(-rows[i] // 32) * 32 for i in chunk]
            w = torch.stack([padded(i, max(n)) for i in chunk])
            q, scale, zero = _int4_gptq(w, torch.stack([grams[i].to(w.device) for i in chunk]), group_size, dtype, clips)
            for b, i in enumerate(chunk):
                out[i] = _int4_qweight((rows[i], w.shape[2]), q[b, :n[b]], scale[b, :n[b]], zero[b, :n[b]],
                                       group_size, dtype)
    return out


# exponents tried by int4_balance: 0 leaves the factors as they are
INT4_BALANCE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def int4_balance(down: torch.Tensor, up_t: torch.Tensor, gram: torch.Tensor,
                 group_size: int = DEFAULT_GROUP_SIZE, dtype=torch.bfloat16) -> torch.Tensor:
    """Per-rank scales c [r] for the factors of y = up_tᵀ·(down·x): `down`'s rows / c and `up_t`'s rows · c
    give the same product, and int4's groups along `up`'s rank axis then spend their precision where the
    output error is. `up`'s input down·x has second moment M = down·G·downᵀ (G = `gram`, the layer
    input's), steep along the rank (the singular directions' energies); c = s^α with s² = diag(M),
    normalized per group, α per group of `group_size` rank rows from INT4_BALANCE_ALPHAS by that group's
    output error Σ e²·s² once rounded (activation-aware scaling as in AWQ, Lin et al. 2024, searched on
    the output error). Groups round independently, so the choice is the best one for every size's
    prefix of whole groups at once. `down`'s rows are quantized independently, so a row's scale leaves
    its codes as they were (`QWeight.scale_rows`)."""
    d, u = down.detach().float(), up_t.detach().float().t()  # [r, in], [out, r]
    s2 = ((d @ gram.to(d.device, torch.float32)) * d).sum(1).clamp_min(0)  # diag(M) [r]
    live = s2 > 0
    r, pad = u.shape[1], -(-u.shape[1] // group_size) * group_size - u.shape[1]  # whole groups along the rank
    groups = (r + pad) // group_size
    s2g, liveg = F.pad(s2, (0, pad)).reshape(groups, group_size), F.pad(live, (0, pad)).reshape(groups, group_size)
    ug = F.pad(u, (0, pad)).reshape(u.shape[0], groups, group_size)
    best_err, best_c = None, None
    for alpha in INT4_BALANCE_ALPHAS:
        c = torch.where(liveg, s2g.clamp_min(1e-30) ** (alpha / 2), torch.ones_like(s2g))  # [groups, g]
        logc = torch.where(liveg, c.log(), torch.zeros_like(c))
        c = c / (logc.sum(1, keepdim=True) / liveg.sum(1, keepdim=True).clamp_min(1)).exp()  # per group: geo-mean 1
        wg = ug * c
        scale, zero = _int4_grid(wg, dtype, _INT4_CLIPS)
        deq = ((_int4_round(wg, scale, zero) - 8) * scale + zero) / c
        err = ((deq - ug) ** 2 * s2g).sum(0).sum(-1)  # [groups]: each group's output error (diagonal moment)
        if best_err is None:
            best_err, best_c = err, c
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_c = torch.where(better[:, None], c, best_c)
    return best_c.reshape(-1)[:r]


def _int4_qweight(shape, q, scale, zero, group_size, dtype) -> QWeight:
    """A QWeight from codes q [rows, k/g, g] (rows padded to 32) and scale, zero [rows, k/g, 1]."""
    codes = q.to(torch.uint8).reshape(q.shape[0], -1)
    sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1).contiguous()  # [k/g, out, 2]
    data = _pack_int4(codes)
    keep = codes.is_cuda or _int4_cpu_block() is None  # a layout that cannot be read back keeps the codes
    return Int4Weight("int4", data, sz.to(dtype), tuple(shape), group_size, codes if keep else None)


def _int4_round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """int4 codes 0..15 of w on the grid (scale, zero): w ≈ (q − 8)·scale + zero."""
    return torch.round((w - zero) / scale + 8).clamp(0, 15)


def _int4_grid(wg: torch.Tensor, dtype, clips, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per group of `wg` [rows, groups, g] with the least squared rounding error among
    the clipping ratios (stored: w = (q − 8)·scale + zero); `weight` (broadcast to wg) weighs the
    entries' errors."""
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    mid = (lo + hi) / 2
    best_err = best = None
    for c in clips:
        scale = ((hi - lo) * c / 15).clamp_min(1e-8).to(dtype).float()
        zero = (mid - (hi - lo) * c / 2 + 8 * scale).to(dtype).float()
        q = _int4_round(wg, scale, zero)
        err = ((q - 8) * scale + zero - wg).pow(2)
        err = (err if weight is None else err * weight).sum(-1, keepdim=True)
        if best is None:
            best_err, best = err, (scale, zero)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = tuple(torch.where(better, new, old) for new, old in zip((scale, zero), best))
    return best


GPTQ_DAMP = 0.01  # ridge on the Gram, relative to its mean diagonal (the GPTQ paper's default)


def _int4_gptq(w: torch.Tensor, gram: torch.Tensor, g: int, dtype, clips):
    """GPTQ (Frantar et al., 2023) with static groups, batched: codes q [B, rows, k/g, g] and scale,
    zero [B, rows, k/g, 1] of the weights w [B, rows, k] under the input Grams [B, k, k]."""
    batch, rows, k = w.shape
    w = w.clone()
    h = gram.double()
    diag = h.diagonal(dim1=-2, dim2=-1)  # a view: edits reach h
    dead = diag <= 0  # inputs that never fire: their weights do not matter
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    diag += GPTQ_DAMP * diag.mean(-1, keepdim=True)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.empty_like(w)
    scales, zeros = [], []
    for g0 in range(0, k, g):
        block = w[..., g0:g0 + g]  # a view: updated in place as its columns are rounded
        hb = hinv[:, g0:g0 + g, g0:g0 + g]
        # the grid weighs each column's error as GPTQ's objective does: by 1 / [H⁻¹ chol]_jj²
        importance = hb.diagonal(dim1=-2, dim2=-1).pow(-2)[:, None, None, :]  # [B, 1, 1, g]
        scale, zero = (t[..., 0, :] for t in _int4_grid(block[..., None, :], dtype, clips, importance))
        errors = torch.empty_like(block)
        for j in range(g):
            col = block[..., j:j + 1]
            qj = _int4_round(col, scale, zero)
            e = (col - ((qj - 8) * scale + zero)) / hb[:, j, j, None, None]
            block[..., j + 1:] -= e * hb[:, None, j, j + 1:]
            q[..., g0 + j:g0 + j + 1], errors[..., j:j + 1] = qj, e
        w[..., g0 + g:] -= errors @ hinv[:, g0:g0 + g, g0 + g:]
        scales.append(scale)
        zeros.append(zero)
    groups = k // g
    return (q.reshape(batch, rows, groups, g), torch.stack(scales, 2).reshape(batch, rows, groups, 1),
            torch.stack(zeros, 2).reshape(batch, rows, groups, 1))


@functools.lru_cache(maxsize=1)
def _int4_cpu_block() -> int | None:
    """Rows per block of torch's CPU int4 layout as `_unpack_int4_cpu` reads it: 32 where torch runs
    its AVX2 code, 64 where it runs its AVX-512 code (torch 2.13). Checked once per process on a probe
    with whole blocks of either and a smaller last block; None where neither reads back (then the
    codes are kept beside the packed bytes, and prefixes are repacked from them)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (96, 128), generator=g, dtype=torch.int32)
    packed = _pack_int4(codes)
    for block in (32, 64):
        try:
            if torch.equal(_unpack_int4_cpu(packed, 128, block), codes.to(torch.uint8)):
                return block
        except RuntimeError:
            pass
    return None


def _unpack_int4_cpu(data: torch.Tensor, k: int, block: int | None = None) -> torch.Tensor:
    """The codes [rows, k] uint8 of CPU-packed int4 rows that start at a block boundary. The layout
    (measured on torch 2.13): rows in blocks of `block` (32: AVX2 code; 64: AVX-512 code); within a
    block, block/2 bytes per column, byte j holding row j (low nibble) and row j + block/2; a last
    block of fewer rows holds, per column, consecutive rows two per byte, the even one low."""
    block = block or _int4_cpu_block()
    rows = data.shape[0]
    whole = rows // block * block
    b = data[:whole].reshape(whole // block, k, block // 2)  # [block, column, byte]
    parts = [torch.cat([b & 0xF, b >> 4], dim=2).transpose(1, 2).reshape(whole, k)]
    if rows > whole:
        t = data[whole:].reshape(k, (rows - whole) // 2)
        parts.append(torch.stack([t & 0xF, t >> 4], dim=2).reshape(k, rows - whole).t())
    return torch.cat(parts) if rows > whole else parts[0]


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [rows, k] (0..15) in the layout of the device's int4 kernel (k/2 bytes per row either way)."""
    if codes.is_cuda:
        pairs = _int4_pairs(codes)
        tiles = _cuda_int4_tiles(codes.shape[1])
        if tiles and _cuda_int4_kernel(codes.device):
            return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        return pairs  # no kernel for this shape or GPU: the bytes are held, the product is the reference
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


# -- CUDA: the kernels gpt-fast uses (docs/ARCHITECTURE.md "Formats") ------------------------------
def _int4_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Codes [rows, k] as uint8 [rows, k/2], two per byte, even column in the high nibble (the input
    of torch's CUDA int4 packing)."""
    return (codes[:, ::2].to(torch.uint8) << 4 | codes[:, 1::2].to(torch.uint8)).contiguous()


def _cuda_int4_tiles(k: int) -> int:
    """The inner k-tiles of torch's CUDA int4 layout for an input size (0: none fits)."""
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), 0)


@functools.lru_cache(maxsize=None)
def _cuda_int4_kernel(device: torch.device) -> bool:
    """Whether torch's CUDA int4 kernel (`_weight_int4pack_mm`, the tinygemm one: Ampere and later)
    runs on this GPU and matches the dequantized product on a probe; checked once per device."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        codes = torch.randint(0, 16, (64, 128), generator=g, device=device, dtype=torch.int32)
        sz = torch.rand(4, 64, 2, generator=g, device=device).to(torch.bfloat16)
        pairs = _int4_pairs(codes)
        x = torch.randn(5, 128, generator=g, device=device).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm(x, torch.ops.aten._convert_weight_to_int4pack(pairs, 8), 32, sz)
        w = Int4Weight("int4", pairs, sz, (64, 128), 32, codes.to(torch.uint8)).dequantize()
        ref = x.float() @ w.t()
        return bool((y.float() - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-3)
    except (RuntimeError, NotImplementedError):
        return False
