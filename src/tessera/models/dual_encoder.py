"""Dual encoder (CLIP family): an image tower and a text tower meeting in a shared
embedding space through linear projections, compared by a scaled cosine similarity.

Parameter names match Hugging Face's CLIPModel: vision_model.*, text_model.*,
visual_projection, text_projection, logit_scale.

Shapes: N images, B texts, E_v / E_t tower widths, P projection width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tessera.config import Config
from tessera.text.clip_text import CLIPTextConfig, CLIPTextTransformer
from tessera.vision.vit import VisionTransformer, ViTConfig


class DualEncoderConfig(Config):
    vision: ViTConfig = ViTConfig()
    text: CLIPTextConfig = CLIPTextConfig()
    projection_dim: int = 128
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)


class DualEncoder(nn.Module):
    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.text_model = CLIPTextTransformer(cfg.text)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        # Stored as a log so the scale stays positive; clamped after every optimizer step.
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))

    def encode_image(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        """(N, P) unit-norm image embeddings."""
        out = self.vision_model(images)
        return F.normalize(self.visual_projection(self.vision_model.pooled(out)), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, P) unit-norm text embeddings."""
        _, pooled = self.text_model(input_ids, attention_mask)
        return F.normalize(self.text_projection(pooled), dim=-1)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0.0, self.cfg.logit_scale_max)
