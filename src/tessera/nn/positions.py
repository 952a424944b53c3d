"""Fixed 2D sin-cos position codes (the MAE layout: first half of the width encodes the column,
second half the row), shared by Qwen-VL's resampler (its query and key positions) and the ViT
(an optional starting value of its learned position table)."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """(M,) float positions → (M, dim): [sin(p·ω), cos(p·ω)] with ω_k = 10000^(−k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(rows: Tensor, cols: Tensor, dim: int) -> Tensor:
    """(M,) row and column coordinates → (M, dim), first half from the column, second from the row."""
    if dim % 4:
        raise ValueError(f"2D sin-cos position encodings need a width divisible by 4, got {dim}")
    return torch.cat([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], dim=1).float()


def grid_positions(rows: int, cols: int, frame: int) -> tuple[Tensor, Tensor]:
    """Row and column coordinates (rows·cols,) of a rows×cols grid placed on a frame×frame grid."""
    r = (torch.arange(rows, dtype=torch.float64) + 0.5) * frame / rows - 0.5
    c = (torch.arange(cols, dtype=torch.float64) + 0.5) * frame / cols - 0.5
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    return rr.reshape(-1), cc.reshape(-1)
