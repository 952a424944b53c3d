"""What every connector sees and answers: the bridge between a vision encoder and an LLM.

The LVLM hands a connector every image's vision tokens at once as `VisionTokens` and asks it,
before the model ever runs, how many tokens one image becomes (`num_output_tokens`), so the
data pipeline can expand each image placeholder to exactly that many image-token ids:

    @dataclass VisionTokens:
        tokens: Tensor                 # (T, E_v) every image's tokens, image after image
        grids: list[tuple[int, int]]   # per image: (rows, cols) of its patch-token grid
        prefix_tokens: int             # tokens before the grid in each image (class token: 1)
    connector.num_output_tokens(rows, cols) -> int   # tokens one image becomes
    connector.forward(vision: VisionTokens) -> Tensor (T_out, E_llm), image after image

Connectors that keep the count (linear / MLP projector) map token by token; the Q-Former and
the Qwen-VL resampler give a fixed count whatever the image size; token merging (MiniGPT-v2's
concatenation of 4 adjacent tokens, InternVL's pixel shuffle) divides it. Every connector is
built as `cls(cfg, vision_dim, llm_dim)` (the projector also takes the prefix-token count, since
it passes prefix tokens through and must count them); configs form a discriminated union on `kind`
(`tessera.connectors.registry.ConnectorConfig`).

This module imports no connector, so every connector may import it at run time.

Shapes: N images, rows_i × cols_i patch grid of image i, p prefix tokens per image,
T = Σ (p + rows_i·cols_i) vision tokens, E_v vision width, E_llm LLM width.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class VisionTokens:
    tokens: Tensor  # (T, E_v) every image's tokens, image after image
    grids: list[tuple[int, int]]  # per image: (rows, cols) of its patch-token grid
    prefix_tokens: int = 0  # tokens before the grid in each image (class token: 1)

    def __post_init__(self) -> None:
        if self.prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be ≥ 0, got {self.prefix_tokens}")
        if self.tokens.dim() != 2:
            raise ValueError(f"VisionTokens.tokens must be (T, E_v), got shape {tuple(self.tokens.shape)}")
        expected = sum(self.lengths)
        if self.tokens.shape[0] != expected:
            raise ValueError(
                f"VisionTokens has {self.tokens.shape[0]} tokens but its grids {self.grids} with "
                f"{self.prefix_tokens} prefix token(s) each need {expected}"
            )

    @property
    def num_images(self) -> int:
        return len(self.grids)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each image, prefix included."""
        return [self.prefix_tokens + r * c for r, c in self.grids]

    def per_image(self) -> Iterator[tuple[Tensor, Tensor, tuple[int, int]]]:
        """(prefix (p, E_v), grid tokens (rows, cols, E_v), (rows, cols)) of each image in order."""
        start = 0
        for (rows, cols), length in zip(self.grids, self.lengths, strict=True):
            chunk = self.tokens[start : start + length]
            yield chunk[: self.prefix_tokens], chunk[self.prefix_tokens :].reshape(rows, cols, -1), (rows, cols)
            start += length

    def grid_tokens(self) -> Tensor:
        """(Σ rows_i·cols_i, E_v): the grid tokens of every image, prefix tokens removed."""
        if not self.prefix_tokens:
            return self.tokens
        return torch.cat([grid.reshape(-1, grid.shape[-1]) for _, grid, _ in self.per_image()])


@runtime_checkable
class Connector(Protocol):
    """Vision tokens → LLM-width tokens. Implementations are nn.Modules built as
    `cls(cfg, vision_dim, llm_dim)`."""

    def num_output_tokens(self, rows: int, cols: int) -> int:
        """Tokens one image with a rows×cols patch grid becomes."""
        ...

    def __call__(self, vision: VisionTokens) -> Tensor:
        """(T_out, E_llm): every image's output tokens, image after image."""
        ...
