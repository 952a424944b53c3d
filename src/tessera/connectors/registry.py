"""Every connector kind: the discriminated config union `ConnectorConfig` (on `kind`) that
LVLMConfig holds, and `build_connector`, which makes the module for a config.

Kept apart from `tessera.connectors.base` so that connector modules can import the contract
(`VisionTokens`) at run time while this module imports every connector.

    kind              config             module       tokens per image (rows × cols grid, p prefix)
    "linear", "mlp"   ProjectorConfig    Projector    p + rows·cols            LLaVA, LLaVA-1.5
    "token_merge"     TokenMergeConfig   TokenMerge   rows·cols / (bh·bw)      MiniGPT-v2, InternVL
    "resampler"       ResamplerConfig    Resampler    num_queries              Qwen-VL
    "qformer"         QFormerConfig      QFormerConnector  num_queries         BLIP-2, MiniGPT-4

A config dict without "kind" is a projector (checkpoints written before the union had one).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Tag
from torch import nn

from tessera.connectors.projector import Projector, ProjectorConfig
from tessera.connectors.qformer import QFormerConfig, QFormerConnector
from tessera.connectors.resampler import Resampler, ResamplerConfig
from tessera.connectors.token_merge import TokenMerge, TokenMergeConfig


def _tag(value: Any) -> str | None:
    kind = value.get("kind", "mlp") if isinstance(value, dict) else getattr(value, "kind", None)
    return "projector" if kind in ("linear", "mlp") else kind


ConnectorConfig = Annotated[
    Annotated[ProjectorConfig, Tag("projector")]
    | Annotated[TokenMergeConfig, Tag("token_merge")]
    | Annotated[ResamplerConfig, Tag("resampler")]
    | Annotated[QFormerConfig, Tag("qformer")],
    Discriminator(_tag),
]


def build_connector(cfg: ConnectorConfig, vision_dim: int, llm_dim: int, prefix_tokens: int = 0) -> nn.Module:
    """The connector module for `cfg`; `prefix_tokens` is how many tokens precede each image's
    grid in the VisionTokens it will get (only the projector keeps and so counts them)."""
    if isinstance(cfg, ProjectorConfig):
        return Projector(cfg, vision_dim, llm_dim, prefix_tokens=prefix_tokens)
    if isinstance(cfg, TokenMergeConfig):
        return TokenMerge(cfg, vision_dim, llm_dim)
    if isinstance(cfg, ResamplerConfig):
        return Resampler(cfg, vision_dim, llm_dim)
    if isinstance(cfg, QFormerConfig):
        return QFormerConnector(cfg, vision_dim, llm_dim)
    raise ValueError(f"unknown connector config {type(cfg).__name__} (kind {getattr(cfg, 'kind', None)!r})")
