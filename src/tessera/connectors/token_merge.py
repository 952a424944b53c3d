"""Token merging: each block of neighbouring vision tokens becomes ONE token whose features are
the block's tokens concatenated, then a projector maps it to the LLM width.

MiniGPT-v2 and InternVL do the same operation with different blocks:
    MiniGPT-v2   "concatenate every 4 adjacent tokens": `view(B, P/4, 4·E)` over the raster
                 order, i.e. 1×4 horizontal runs → block (1, 4), then ONE linear layer.
    InternVL     pixel shuffle (scale 0.5, ps_version v2): each 2×2 square → block (2, 2),
                 channels ordered top-left, top-right, bottom-left, bottom-right; then
                 LayerNorm + Linear + GELU + Linear (`mlp1`).
Both read the block's tokens in row-major order and emit the blocks in row-major order, so
the merge is a pure rearrangement (`merge_blocks`): values are moved, never mixed.
Both systems drop the class token before merging, so prefix tokens are dropped here too.

Parameter names follow Hugging Face's InternVLMultiModalProjector: layer_norm, linear_1,
linear_2 (MiniGPT-v2 has no Hugging Face port; its llama_proj is our linear_1).

Shapes: image i has a rows_i × cols_i grid of E_v-wide tokens; block (bh, bw) must divide it;
it becomes (rows_i/bh)·(cols_i/bw) tokens of width bh·bw·E_v, then E_llm after the projector.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import field_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.connectors.base import VisionTokens
from tessera.nn.layers import Activation, activation_fn


class TokenMergeConfig(Config):
    kind: Literal["token_merge"] = "token_merge"
    block: tuple[int, int] = (2, 2)  # (rows, cols) of tokens merged into one: (1, 4) MiniGPT-v2, (2, 2) InternVL
    projector: Literal["linear", "mlp"] = "mlp"
    norm: bool = False  # LayerNorm over the merged features first (InternVL)
    act: Activation = "gelu"
    layer_norm_eps: float = 1e-5

    @field_validator("block")
    @classmethod
    def _block(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1 or v[1] < 1:
            raise ValueError(f"block sides must be ≥ 1, got {v}")
        return v

    @property
    def factor(self) -> int:
        """How many tokens become one."""
        return self.block[0] * self.block[1]


def merge_blocks(grid: Tensor, block: tuple[int, int]) -> Tensor:
    """(rows, cols, E) → (rows/bh · cols/bw, bh·bw·E): blocks in row-major order, each the
    concatenation of its tokens in row-major order."""
    rows, cols, dim = grid.shape
    bh, bw = block
    if rows % bh or cols % bw:
        raise ValueError(
            f"a {rows}x{cols} token grid cannot be merged in {bh}x{bw} blocks: the grid's rows must "
            f"be a multiple of {bh} and its columns of {bw} (choose an image size accordingly)"
        )
    x = grid.reshape(rows // bh, bh, cols // bw, bw, dim).permute(0, 2, 1, 3, 4)
    return x.reshape((rows // bh) * (cols // bw), bh * bw * dim)


class TokenMerge(nn.Module):
    """VisionTokens → (Σ rows_i·cols_i / (bh·bw), E_llm)."""

    def __init__(self, cfg: TokenMergeConfig, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        merged = cfg.factor * vision_dim
        if cfg.norm:
            self.layer_norm = nn.LayerNorm(merged, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(merged, llm_dim)
        if cfg.projector == "mlp":
            self.act = activation_fn(cfg.act)
            self.linear_2 = nn.Linear(llm_dim, llm_dim)

    def num_output_tokens(self, rows: int, cols: int) -> int:
        bh, bw = self.cfg.block
        if rows % bh or cols % bw:
            raise ValueError(
                f"a {rows}x{cols} token grid cannot be merged in {bh}x{bw} blocks (token_merge connector)"
            )
        return (rows // bh) * (cols // bw)

    def forward(self, vision: VisionTokens) -> Tensor:
        x = torch.cat([merge_blocks(grid, self.cfg.block) for _, grid, _ in vision.per_image()])
        if self.cfg.norm:
            x = self.layer_norm(x)
        x = self.linear_1(x)
        if self.cfg.projector == "mlp":
            x = self.linear_2(self.act(x))
        return x
