"""CLIP-style causal text transformer, used as the text tower of contrastive pretraining.

Parameter names match Hugging Face's CLIPTextModel without its "text_model." prefix:
embeddings.{token_embedding, position_embedding}, encoder.layers.N.*, final_layer_norm.
The pooled output is the final-normed state at each sequence's first EOS token.

Shapes: B texts, L tokens, E width.
"""

from __future__ import annotations

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

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """input_ids (B, L), right-padded → (hidden (B, L, E), pooled (B, E))."""
        if input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(
                f"text of {input_ids.shape[1]} tokens exceeds max_position_embeddings "
                f"{self.cfg.max_position_embeddings}"
            )
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x, causal=True, key_padding_mask=attention_mask)
        x = self.final_layer_norm(x)
        is_eos = input_ids == self.cfg.eos_token_id
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError("every text given to the CLIP text tower must contain the EOS token")
        eos_pos = is_eos.int().argmax(dim=1)
        return x, x[torch.arange(x.shape[0], device=x.device), eos_pos]
