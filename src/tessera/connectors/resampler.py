"""Qwen-VL's position-aware vision-language adapter: ONE cross-attention layer in which a fixed
set of learnable queries attends over an image's vision tokens, so every image becomes the
same number of tokens (256 in the paper) whatever its size.

As in Qwen-VL's `Resampler` (visual.attn_pool) followed by visual.ln_post and visual.proj:
    kv   = ln_kv(kv_proj(vision tokens))                      kv_proj only when widths differ
    out  = attn(query = ln_q(queries) + pos(query grid),
                key   = kv + pos(key grid),  value = kv)         torch MultiheadAttention layout
    out  = ln_post(out) @ proj
Position encodings are fixed 2D sin-cos (MAE layout: first half encodes the column, second half
the row). The queries sit on a √Q × √Q grid; an image's rows × cols key grid is placed on the
same frame (key (r, c) at ((r + ½)·g/rows − ½, (c + ½)·g/cols − ½)), which is the position
Qwen-VL's bicubic resize of the query table gives each key, computed exactly instead of
interpolated, so any grid and aspect ratio lines up with the queries.

Prefix tokens (a class token) have no place on the grid and are not attended to (Qwen-VL's
ViT has none).

Parameter names follow Qwen-VL: query, kv_proj, attn.{in_proj_weight, in_proj_bias,
out_proj}, ln_q, ln_kv, ln_post, proj.

Shapes: N images, Q queries (g = √Q), image i has S_i = rows_i·cols_i grid tokens of width
E_v; everything after kv_proj is E_llm wide; output (N·Q, E_llm).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.connectors.base import VisionTokens
from tessera.nn.positions import grid_positions, sincos_2d
from tessera.vision.vit import PoolingAttention, _pad_segments


class ResamplerConfig(Config):
    kind: Literal["resampler"] = "resampler"
    num_queries: int = 256  # a square number: the queries sit on a √Q × √Q grid
    num_heads: int = 32  # Qwen-VL: LLM width / 128
    layer_norm_eps: float = 1e-6

    @model_validator(mode="after")
    def _check(self) -> ResamplerConfig:
        g = math.isqrt(self.num_queries)
        if self.num_queries < 1 or g * g != self.num_queries:
            raise ValueError(f"num_queries must be a positive square number (a query grid), got {self.num_queries}")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be ≥ 1, got {self.num_heads}")
        return self

    @property
    def query_grid(self) -> int:
        return math.isqrt(self.num_queries)


class Resampler(nn.Module):
    """VisionTokens → (N·Q, E_llm): Q tokens per image for any grid."""

    def __init__(self, cfg: ResamplerConfig, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        if llm_dim % cfg.num_heads:
            raise ValueError(f"resampler: LLM width {llm_dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        g = cfg.query_grid
        self.query = nn.Parameter(torch.empty(cfg.num_queries, llm_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        # Fixed, so a buffer; not saved because it is a function of the config.
        self.register_buffer("pos_embed", sincos_2d(*grid_positions(g, g, g), llm_dim), persistent=False)
        self.kv_proj: nn.Module = nn.Linear(vision_dim, llm_dim, bias=False) if vision_dim != llm_dim else nn.Identity()
        self.attn = PoolingAttention(llm_dim, cfg.num_heads)
        self.ln_q = nn.LayerNorm(llm_dim, eps=cfg.layer_norm_eps)
        self.ln_kv = nn.LayerNorm(llm_dim, eps=cfg.layer_norm_eps)
        self.ln_post = nn.LayerNorm(llm_dim, eps=cfg.layer_norm_eps)
        self.proj = nn.Parameter(llm_dim**-0.5 * torch.randn(llm_dim, llm_dim))
        self._key_pos: dict[tuple[int, int], Tensor] = {}

    def num_output_tokens(self, rows: int, cols: int) -> int:
        return self.cfg.num_queries

    def key_positions(self, rows: int, cols: int) -> Tensor:
        """(rows·cols, E_llm) sin-cos encodings of a key grid on the query frame (cached per grid)."""
        if (rows, cols) not in self._key_pos:
            g = self.cfg.query_grid
            self._key_pos[(rows, cols)] = sincos_2d(*grid_positions(rows, cols, g), self.pos_embed.shape[1])
        return self._key_pos[(rows, cols)].to(self.pos_embed.device)

    def forward(self, vision: VisionTokens) -> Tensor:
        kv = self.ln_kv(self.kv_proj(vision.grid_tokens()))
        pos = torch.cat([self.key_positions(r, c) for r, c in vision.grids]).to(kv.dtype)
        lengths = [r * c for r, c in vision.grids]
        cu = torch.tensor([0, *lengths], device=kv.device).cumsum(0)
        keys, mask = _pad_segments(kv + pos, cu)
        values, _ = _pad_segments(kv, cu)
        n = vision.num_images
        queries = (self.ln_q(self.query) + self.pos_embed.to(kv.dtype)).expand(n, -1, -1)
        out = self.attn(queries, keys, mask, values=values)  # (N, Q, E)
        out = self.ln_post(out.reshape(n * self.cfg.num_queries, -1))
        return out @ self.proj
