"""Connectors that map vision tokens into the language model's embedding space one-to-one:
a single linear layer (LLaVA) or a two-layer MLP with GELU (LLaVA-1.5).

Implements the connector contract of `tessera.connectors.base`: `num_output_tokens(rows, cols)`
is the image's token count, its prefix tokens (a kept class token) included, so the data
pipeline can expand image placeholders before the model ever runs; connectors that change
the token count (Q-Former, resampler, token merging) answer differently.

Parameter names follow Hugging Face's LlavaMultiModalProjector: linear_1, linear_2.

Shapes: T_v vision tokens of the batch, E_v vision width, E LLM width.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from tessera.config import Config
from tessera.connectors.base import VisionTokens
from tessera.nn.layers import Activation, activation_fn


class ProjectorConfig(Config):
    kind: Literal["linear", "mlp"] = "mlp"
    act: Activation = "gelu"
    bias: bool = True


class Projector(nn.Module):
    """(T_v, E_v) → (T_v, E): token count unchanged."""

    def __init__(self, cfg: ProjectorConfig, vision_dim: int, llm_dim: int, prefix_tokens: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.prefix_tokens = prefix_tokens  # passed through one-to-one, so counted
        self.linear_1 = nn.Linear(vision_dim, llm_dim, bias=cfg.bias)
        if cfg.kind == "mlp":
            self.act = activation_fn(cfg.act)
            self.linear_2 = nn.Linear(llm_dim, llm_dim, bias=cfg.bias)

    def num_output_tokens(self, rows: int, cols: int) -> int:
        return self.prefix_tokens + rows * cols

    def forward(self, vision: VisionTokens | Tensor) -> Tensor:
        """VisionTokens (or their bare (T_v, E_v) tokens) → (T_v, E)."""
        x = self.linear_1(vision.tokens if isinstance(vision, VisionTokens) else vision)
        if self.cfg.kind == "mlp":
            x = self.linear_2(self.act(x))
        return x
