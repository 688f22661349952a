"""Storage formats of one KV row: asymmetric uniform group quantization, bit-packed into uint8.

A "row" is one (token, KV head) vector of ``head_dim`` values. It is split into groups of
``group_size`` values; each group has an fp16 ``scale`` and fp16 ``zero`` (the low end of its
range, the group minimum unless the encoder's clipping search shrank the range):

    code = clamp(round((x - zero) / scale), 0, 2**bits - 1),    x_hat = code * scale + zero

Packing layout ("split halves", chosen so that a SIMD kernel unpacks with one shift and one
mask per lane, no interleaving shuffles): with ``k = 8 // bits`` codes per byte and a group of
G values, byte ``j`` (0 <= j < G/k) of the group holds codes ``j, j + G/k, ..., j + (k-1)G/k``
at bit offsets ``0, bits, ..., (k-1)bits``. At 8 bits a byte is a code; 16 bits is fp16 as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BIT_WIDTHS: tuple[int, ...] = (2, 4, 8, 16)
PACKED_BIT_WIDTHS: tuple[int, ...] = (2, 4, 8)
SCALE_BYTES = 2  # fp16 scale
ZERO_BYTES = 2  # fp16 zero


@dataclass(frozen=True)
class RowFormat:
    """How one (token, head) row of ``head_dim`` values is stored at ``bits`` bits."""

    bits: int
    head_dim: int
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in BIT_WIDTHS:
            raise ValueError(f"bits={self.bits} is not a supported width; choose one of {BIT_WIDTHS}")
        if self.bits != 16:
            if self.group_size <= 0 or self.head_dim % self.group_size:
                raise ValueError(
                    f"group_size={self.group_size} must divide head_dim={self.head_dim}; "
                    f"use a divisor of {self.head_dim} (the default 64 needs head_dim % 64 == 0)"
                )
            if self.group_size % (8 // self.bits):
                raise ValueError(f"group_size={self.group_size} must be a multiple of {8 // self.bits} at {self.bits} bits")

    @property
    def packed(self) -> bool:
        return self.bits != 16

    @property
    def groups(self) -> int:
        return self.head_dim // self.group_size if self.packed else 0

    @property
    def code_bytes(self) -> int:
        """Bytes of codes (or fp16 values) per row."""
        return self.head_dim * self.bits // 8

    @property
    def row_bytes(self) -> int:
        """All bytes one row occupies, scales and zeros included."""
        return self.code_bytes + self.groups * (SCALE_BYTES + ZERO_BYTES)

    @property
    def bits_per_value(self) -> float:
        """Effective storage cost per value, scale overhead included (4 bits, group 64 -> 4.5)."""
        return 8.0 * self.row_bytes / self.head_dim


def nominal_bits_per_value(bits: int, head_dim: int = 64, group_size: int = 64) -> float:
    """Storage bits per value of one width, scales included (4 -> 4.5 at group 64): the class costs."""
    return RowFormat(bits, head_dim, group_size).bits_per_value


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: [..., G] integers in [0, 2**bits) -> packed uint8 [..., G * bits // 8] (split halves)."""
    if bits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // bits
    g = codes.shape[-1]
    if g % per_byte:
        raise ValueError(f"last dim {g} is not a multiple of {per_byte} codes per byte")
    # [..., per_byte, G/per_byte]: lane s holds codes s*G/k ... (s+1)*G/k - 1
    lanes = codes.to(torch.int32).reshape(*codes.shape[:-1], per_byte, g // per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (lanes << shifts[:, None]).sum(dim=-2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed uint8 [..., G * bits // 8] -> codes uint8 [..., G] (inverse of :func:`pack_codes`)."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    lanes = (packed.unsqueeze(-2) >> shifts[:, None]) & ((1 << bits) - 1)  # [..., k, G/k]
    return lanes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


# Candidate shrink factors of each group's [min, max] range (about its midpoint). The encoder
# keeps, per group, the one with the least squared error (summed by :func:`fold_sum`, the first
# minimum on ties): clipping a few outliers buys finer steps for the rest (-8% MSE at 4 bits,
# -42% at 2 bits on SmolLM2's rotated K/V). Only the encoder searches; the stored format and the
# dequantizer are unchanged.
CLIP_RATIOS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def fold_sum(e: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in one fixed fp32 order: repeatedly add the second half onto the
    first (an odd last element carries over), so n values take ceil(log2 n) element-wise adds.

    The clip search compares candidates' errors that can tie to the last bit, so its sum must be
    the same everywhere the encoder runs: torch.sum's order follows its SIMD dispatch (and
    version), while element-wise fp32 adds are exactly rounded on every backend. The C++ kernels
    (runtime_ops/kvq_kernels.h ``fold_sum``) add in this very order."""
    while e.shape[-1] > 1:
        n, h = e.shape[-1], e.shape[-1] // 2
        s = e[..., :h] + e[..., h : 2 * h]
        e = torch.cat([s, e[..., 2 * h :]], dim=-1) if n % 2 else s
    return e[..., 0]


def quantize_rows(
    x: torch.Tensor, fmt: RowFormat, clip_search: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [..., head_dim] float -> (codes uint8 [..., code_bytes], scale fp16 [..., groups], zero fp16 [..., groups])."""
    if not fmt.packed:
        raise ValueError("16-bit rows are stored as fp16, not quantized")
    if x.shape[-1] != fmt.head_dim:
        raise ValueError(f"rows have {x.shape[-1]} values, format expects head_dim={fmt.head_dim}")
    lead = x.shape[:-1]
    g = x.float().reshape(*lead, fmt.groups, 1, fmt.group_size)  # [..., G, 1, gs]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [..., G, 1]
    ratios = torch.tensor(CLIP_RATIOS if clip_search else (1.0,), device=x.device)
    mid = (lo + hi) / 2
    lo = mid - (mid - lo) * ratios  # [..., G, R]
    hi = mid + (hi - mid) * ratios
    levels = (1 << fmt.bits) - 1
    # Quantize against the fp16-rounded scale/zero that dequantization will use, so the
    # error bound holds for what is stored, not for an fp32 ideal.
    zero = lo.to(torch.float16)
    span = hi - zero.float()
    scale = torch.where(span > 0, span / levels, torch.ones_like(span)).to(torch.float16)
    scale = torch.where(scale.float() > 0, scale, torch.full_like(scale, 2.0**-24))  # fp16 underflow guard
    codes = torch.round((g - zero.float()[..., None]) / scale.float()[..., None]).clamp_(0, levels)  # [..., G, R, gs]
    if len(ratios) > 1:
        err = fold_sum((codes * scale.float()[..., None] + zero.float()[..., None] - g).square())  # [..., G, R]
        best = err.argmin(-1, keepdim=True)  # [..., G, 1]
        codes = codes.gather(-2, best[..., None].expand(*best.shape, fmt.group_size))
        scale, zero = scale.gather(-1, best), zero.gather(-1, best)
    codes, scale, zero = codes[..., 0, :], scale[..., 0], zero[..., 0]
    packed = pack_codes(codes.to(torch.uint8), fmt.bits)  # [..., groups, group_size*bits/8]
    return packed.reshape(*lead, fmt.code_bytes), scale, zero


def dequantize_rows(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: RowFormat, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` up to quantization error -> [..., head_dim] in ``dtype``."""
    lead = codes.shape[:-1]
    per_group = codes.reshape(*lead, fmt.groups, fmt.group_size * fmt.bits // 8)
    q = unpack_codes(per_group, fmt.bits).to(dtype)  # [..., groups, group_size]
    x = q * scale.to(dtype)[..., None] + zero.to(dtype)[..., None]
    return x.reshape(*lead, fmt.head_dim)


def fake_quantize(x: torch.Tensor, bits: int, group_size: int = 64, clip_search: bool = True) -> torch.Tensor:
    """Round trip through the storage format at ``bits`` (16 = fp16), in x's dtype."""
    if bits == 16:
        return x.to(torch.float16).to(x.dtype)
    fmt = RowFormat(bits, x.shape[-1], group_size)
    return dequantize_rows(*quantize_rows(x, fmt, clip_search), fmt, dtype=x.dtype)


QUERY_BITS = (32, 8)  # the attention's query precision: fp32, or int8 rows


def quantize_query(qs: torch.Tensor) -> torch.Tensor:
    """Query rows [..., D] (already times the softmax scale) -> q_hat = q8 * s, s = max|row| / 127.

    The int8 query of ``kvq::packed_attention(query_bits=8)``: one symmetric scale per row, ties
    to even. Keys are then scored with integer dot products (runtime_ops/kvq_kernels.h); every
    implementation runs these fp32 steps in this order, since a differently rounded s or quotient
    moves a q8 value by one."""
    s = qs.abs().amax(-1, keepdim=True) / 127.0  # [..., 1]
    q8 = torch.where(s > 0, torch.round(qs / torch.where(s > 0, s, 1.0)).clamp(-127, 127), 0.0)
    return q8 * s
