"""Orthonormal Hadamard rotation of the head dimension.

Rotating K and V by an orthonormal H before quantization spreads outlier channels over the
whole row, so a per-row min/max quantizer wastes fewer levels on one large channel. Because
H is orthonormal, (qH)(kH)^T = qk^T: queries are rotated the same way and the attention
output, a mix of rotated values, is rotated back with H^T (= H, Sylvester's H is symmetric).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, n] orthonormal, symmetric Hadamard matrix; n must be a power of two."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}; disable it with hadamard=False")
    return _hadamard_cpu(n).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x: [..., n] -> x @ H (its own inverse)."""
    return x @ hadamard_matrix(x.shape[-1], x.dtype, x.device)
