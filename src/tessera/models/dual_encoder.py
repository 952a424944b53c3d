"""Dual encoders: an image tower and a text tower meeting in a shared embedding space,
compared by a scaled cosine similarity.

- DualEncoder (CLIP): linear projections of both towers' pooled outputs; softmax (ITC) loss.
  Parameter names match Hugging Face's CLIPModel: vision_model.*, text_model.*,
  visual_projection, text_projection, logit_scale.
- SigLIPDualEncoder: the towers' pooled outputs (the vision MAP head, the text head) are the
  embeddings; pair logits = exp(logit_scale) · cos + logit_bias, the bias of the pairwise
  sigmoid loss. Names match SiglipModel: vision_model.*, text_model.*, logit_scale, logit_bias
  (both of shape (1,), as there).

Shapes: N images, B texts, E_v / E_t tower widths, P projection (embedding) width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.text.clip_text import CLIPTextConfig, CLIPTextTransformer
from tessera.vision.vit import VisionTransformer, ViTConfig, box_pool, patches_in_boxes


@dataclass
class RegionEmbeddings:
    """What `DualEncoder.encode_image_and_regions` returns (unit-norm rows)."""

    images: Tensor  # (N, P)
    boxes: Tensor  # (M, P) each box's pooled patch tokens
    patches: Tensor | None = None  # (K, P) every patch a box owns, with per_patch
    patch_box: Tensor | None = None  # (K,) the box of each patch row


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

    def encode_image_and_regions(self, images: Tensor, image_index: Tensor, boxes: Tensor, *,
                                 per_patch: bool = False) -> RegionEmbeddings:
        """One ViT pass over images (N, 3, H, W) → their (N, P) embeddings and, for the boxes
        (M, 4) in pixels of images image_index (M,): each box's last-layer patch tokens averaged
        (`box_pool`) → (M, P), and with `per_patch` every patch a box owns (`patches_in_boxes`)
        → (K, P) with its box (K,). Region rows take the class token's path: post_layernorm,
        then the projection."""
        vision = self.vision_model
        out = vision(images)
        image_emb = F.normalize(self.visual_projection(vision.pooled(out)), dim=-1)
        (grid,) = set(out.grids)  # one batch tensor: every image has the same grid
        tokens = out.patch_tokens()

        def embed(x: Tensor) -> Tensor:
            return F.normalize(self.visual_projection(vision.post_layernorm(x)), dim=-1)

        regions = box_pool(tokens.view(len(out.grids), *grid, -1), image_index, boxes, vision.cfg.patch_size)
        result = RegionEmbeddings(image_emb, embed(regions))
        if per_patch:
            result.patch_box, patch = patches_in_boxes(image_index, boxes, grid, len(out.grids), vision.cfg.patch_size)
            result.patches = embed(tokens[patch])
        return result

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0.0, self.cfg.logit_scale_max)


# SigLIP towers: no class token, no pre-norm, biased patch embedding, post_layernorm over all
# tokens and attention pooling; a bidirectional text tower pooled at the last position.
SIGLIP_VISION = ViTConfig(
    class_token=False, pre_layernorm=False, patch_bias=True, post_layernorm_on="all_tokens",
    map_head=True, act="gelu_tanh", layer_norm_eps=1e-6,
)
SIGLIP_TEXT = CLIPTextConfig(
    causal=False, pooling="last", head_size=SIGLIP_VISION.hidden_size, act="gelu_tanh", layer_norm_eps=1e-6,
)


class SigLIPDualEncoderConfig(Config):
    vision: ViTConfig = SIGLIP_VISION
    text: CLIPTextConfig = SIGLIP_TEXT
    logit_scale_init: float = math.log(10.0)
    logit_bias_init: float = -10.0

    @model_validator(mode="after")
    def _towers_meet(self) -> SigLIPDualEncoderConfig:
        if not self.vision.map_head:
            raise ValueError("a SigLIP image tower pools with its attention head: vision.map_head must be true")
        if self.text.head_size != self.vision.hidden_size:
            raise ValueError(
                f"text.head_size {self.text.head_size} must equal vision.hidden_size "
                f"{self.vision.hidden_size}: the two embeddings are compared directly"
            )
        return self


class SigLIPDualEncoder(nn.Module):
    def __init__(self, cfg: SigLIPDualEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.text_model = CLIPTextTransformer(cfg.text)
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.logit_scale_init))
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.logit_bias_init))

    def encode_image(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        """(N, P) unit-norm image embeddings."""
        return F.normalize(self.vision_model.pooled(self.vision_model(images)), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, P) unit-norm text embeddings."""
        _, pooled = self.text_model(input_ids, attention_mask)
        return F.normalize(pooled, dim=-1)

    def pair_logits(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """(N, B) logits of the sigmoid loss: exp(logit_scale) · image · text + logit_bias."""
        return self.logit_scale.exp() * image_emb @ text_emb.t() + self.logit_bias
