"""LLM-based vision-language model: vision encoder → connector → decoder LLM (LLaVA family).

The data pipeline expands each image placeholder into exactly `num_image_tokens(h, w)`
copies of the image token id; `embed` checks the count and scatters the projected visual
features into those positions. Text and image tokens then run through the decoder as one
sequence, padded or packed.

Shapes:
    N images in the batch          list of (3, H_i, W_i)
    T_v vision tokens kept         sum over images of (P_i [+1 if the class token is kept])
    B, L rows and tokens of the text batch (B = 1 for a packed row)
    E LLM width
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.connectors.projector import Projector, ProjectorConfig
from tessera.text.llama import LlamaConfig, LlamaDecoder
from tessera.vision.vit import VisionTransformer, ViTConfig


class LVLMConfig(Config):
    vision: ViTConfig = ViTConfig()
    connector: ProjectorConfig = ProjectorConfig()
    llm: LlamaConfig = LlamaConfig()
    image_token_id: int
    # Which ViT layer feeds the connector, as Hugging Face counts hidden_states: 0 = the
    # embeddings, k = after layer k, negative counts from the end (-1 = last layer).
    vision_feature_layer: int = -2
    # "patch" drops the class token (LLaVA's "default"), "full" keeps it.
    vision_feature_select: Literal["patch", "full"] = "patch"

    @model_validator(mode="after")
    def _check(self) -> LVLMConfig:
        n = self.vision.num_layers
        if not -n - 1 <= self.vision_feature_layer <= n:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} outside [{-n - 1}, {n}]")
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} outside the vocabulary of {self.llm.vocab_size}")
        return self

    @property
    def vision_layers_run(self) -> int:
        """How many ViT layers to run to reach the feature layer."""
        k = self.vision_feature_layer
        return k if k >= 0 else self.vision.num_layers + 1 + k


class LVLM(nn.Module):
    def __init__(self, cfg: LVLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTransformer(cfg.vision)
        self.connector = Projector(cfg.connector, cfg.vision.hidden_size, cfg.llm.hidden_size)
        self.language_model = LlamaDecoder(cfg.llm)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens an image of this size expands to."""
        n = self.vision_tower.num_tokens(height, width)
        if self.cfg.vision_feature_select == "patch" and self.cfg.vision.class_token:
            n -= 1
        return self.connector.num_output_tokens(n)

    def image_features(self, images: Sequence[Tensor]) -> Tensor:
        """(T_v, E): projected visual tokens of every image, in order."""
        out = self.vision_tower(images, num_layers=self.cfg.vision_layers_run)
        feats = out.patch_tokens() if self.cfg.vision_feature_select == "patch" else out.hidden
        return self.connector(feats)

    def embed(self, input_ids: Tensor, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Token embeddings with visual features scattered in → (inputs_embeds (B, L, E), image mask (B, L))."""
        embeds = self.language_model.embed_tokens(input_ids)
        is_image = input_ids == self.cfg.image_token_id
        n_slots = int(is_image.sum())
        if not images:
            if n_slots:
                raise ValueError(f"the text has {n_slots} image tokens but no image was given")
            return embeds, is_image
        feats = self.image_features(images).to(embeds.dtype)
        if feats.shape[0] != n_slots:
            raise ValueError(
                f"{len(images)} images give {feats.shape[0]} visual tokens but the text has {n_slots} "
                "image-token slots; expand placeholders with model.num_image_tokens"
            )
        embeds = embeds.masked_scatter(is_image[..., None], feats)
        return embeds, is_image

    def forward(
        self,
        input_ids: Tensor,
        images: Sequence[Tensor] = (),
        *,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        attention_mask: Tensor | None = None,
        kv_cache=None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (B, L, E); `language_model.logits` turns them into scores.
        With `keep` (B, L) only the kept positions' states, (N, E) (see LlamaDecoder.forward)."""
        embeds, is_image = self.embed(input_ids, images)
        return self.language_model(
            inputs_embeds=embeds, position_ids=position_ids, cu_seqlens=cu_seqlens,
            attention_mask=attention_mask, modality_mask=is_image, kv_cache=kv_cache, keep=keep,
        )
