"""Text transformer of contrastive dual encoders: CLIP style (causal) or SigLIP style
(bidirectional), chosen by config options of this one module.

Parameter names match Hugging Face's CLIPTextModel / SiglipTextModel without their
"text_model." prefix: embeddings.{token_embedding, position_embedding}, encoder.layers.N.*,
final_layer_norm, and SigLIP's head.
    CLIP    causal attention; pooled = the final-normed state at each text's first EOS token.
    SigLIP  bidirectional attention; pooled = head(final-normed state of the LAST position),
            whatever the padding (SigLIP texts are padded to a fixed length).

Shapes: B texts, L tokens, E width, P head output width.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from tessera.config import Config
from tessera.nn.layers import Activation
from tessera.nn.transformer import EncoderLayer


class CLIPTextConfig(Config):
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 64
    act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    causal: bool = True  # CLIP masks future tokens; SigLIP's text tower is bidirectional
    pooling: Literal["eos", "last"] = "eos"  # first EOS token (CLIP) or last position (SigLIP)
    head_size: int | None = None  # SigLIP's `head` linear on the pooled state (projection_size)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class TextEncoderLayers(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.act, cfg.layer_norm_eps)
            for _ in range(cfg.num_layers)
        )


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextEncoderLayers(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.head_size is not None:
            self.head = nn.Linear(cfg.hidden_size, cfg.head_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """input_ids (B, L), right-padded → (hidden (B, L, E), pooled (B, E) or (B, P) with a head)."""
        if input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(
                f"text of {input_ids.shape[1]} tokens exceeds max_position_embeddings "
                f"{self.cfg.max_position_embeddings}"
            )
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x, causal=self.cfg.causal, key_padding_mask=attention_mask)
        x = self.final_layer_norm(x)
        if self.cfg.pooling == "last":
            pooled = x[:, -1]
        else:
            is_eos = input_ids == self.cfg.eos_token_id
            if not bool(is_eos.any(dim=1).all()):
                raise ValueError("every text given to the CLIP text tower must contain the EOS token")
            pooled = x[torch.arange(x.shape[0], device=x.device), is_eos.int().argmax(dim=1)]
        if self.cfg.head_size is not None:
            pooled = self.head(pooled)
        return x, pooled
