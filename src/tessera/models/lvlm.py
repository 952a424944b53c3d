"""LLM-based vision-language model: vision encoder → connector → decoder LLM (LLaVA family,
MiniGPT-v2, Qwen-VL, InternVL, ...).

The data pipeline expands each image placeholder into exactly `num_image_tokens(h, w)`
copies of the image token id; `embed` checks the count and scatters the connector's output
into those positions. Text and image tokens then run through the decoder as one sequence,
padded or packed. The connector (`tessera.connectors`) may change the token count: it gets
the vision tokens with each image's grid (`VisionTokens`) and says how many tokens an image
becomes. With `tiling` (InternVL) each image is first cut into encoder-sized tiles plus a
thumbnail; the tiles of one image fill that image's ONE placeholder group, in order.

The main vision tower is a CLIP-style ViT, a NaViT encoder (native resolution and aspect
ratio, POINTS) or a ViTDet encoder with a conv neck (Vary's new vision vocabulary), chosen by
the `kind` of `vision`. `extra_towers` run further towers beside it, each with its own
connector (Vary-base); each image's tokens from the towers are joined one after the other
(`tower_merge="sequence"`) or side by side ("channels", as the released Vary-base does: each
connector then gives E / towers channels and the towers must agree on the token count).
With `image_positions="shared"` (CogVLM) all image tokens of one image share one position id,
and a decoder with a visual expert routes image tokens (the image mask) to it.

Shapes:
    N images in the batch          list of (3, H_i, W_i)
    N' encoder inputs              N, or the tiles of every image with tiling
    T_v vision tokens kept         sum over encoder inputs of (P_i [+1 if the class token is kept])
    T_out connector output         sum over encoder inputs of connector.num_output_tokens(grid)
    B, L rows and tokens of the text batch (B = 1 for a packed row)
    E LLM width
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Discriminator, Tag, model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.connectors.base import VisionTokens
from tessera.connectors.projector import ProjectorConfig
from tessera.connectors.registry import ConnectorConfig, build_connector
from tessera.data.collate import share_image_positions
from tessera.data.tiling import TilingConfig, choose_grid, tile_image
from tessera.text.llama import LlamaConfig, LlamaDecoder
from tessera.vision.navit import NaViT, NaViTConfig
from tessera.vision.vit import VisionTransformer, ViTConfig
from tessera.vision.vitdet import ViTDet, ViTDetConfig


def _vision_kind(value: Any) -> str:
    return value.get("kind", "vit") if isinstance(value, dict) else getattr(value, "kind", "vit")


# A vision tower's config: a CLIP/SigLIP-style ViT (it has no `kind` field, so configs written
# before the union read unchanged), a NaViT or a ViTDet encoder, told apart by `kind`.
VisionConfig = Annotated[
    Annotated[ViTConfig, Tag("vit")] | Annotated[NaViTConfig, Tag("navit")] | Annotated[ViTDetConfig, Tag("vitdet")],
    Discriminator(_vision_kind),
]


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    if isinstance(cfg, NaViTConfig):
        return NaViT(cfg)
    if isinstance(cfg, ViTDetConfig):
        return ViTDet(cfg)
    return VisionTransformer(cfg)


def vision_width(cfg: VisionConfig) -> int:
    """Width of the tokens a tower gives its connector."""
    return cfg.output_width if isinstance(cfg, ViTDetConfig) else cfg.hidden_size


def tower_grid(tower: nn.Module, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the token grid `tower` makes of an image of this size; raises a clear
    error for a size the tower cannot take."""
    if isinstance(tower, VisionTransformer):
        tower.num_tokens(height, width)  # checks the size against the patch size
        p = tower.cfg.patch_size
        return height // p, width // p
    return tower.token_grid(height, width)


def _check_feature_layer(vision: VisionConfig, layer: int, name: str) -> None:
    n = vision.num_layers
    if not -n - 1 <= layer <= n:
        raise ValueError(f"{name} {layer} outside [{-n - 1}, {n}]")


def _layers_run(vision: VisionConfig, layer: int) -> int:
    return layer if layer >= 0 else vision.num_layers + 1 + layer


def resize_square(images: Sequence[Tensor], size: int) -> list[Tensor]:
    """Every (3, H, W) image resized (bilinear, antialiased) to size×size; images already of
    that size are passed through."""
    out = []
    for img in images:
        if tuple(img.shape[-2:]) != (size, size):
            img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)[0].to(img.dtype)
        out.append(img)
    return out


class VisionBranchConfig(Config):
    """A further vision tower with its own connector, run beside the main one (Vary-base: the
    new vision vocabulary next to CLIP, each with its own linear input embedding)."""

    vision: VisionConfig
    connector: ConnectorConfig = ProjectorConfig(kind="linear")
    feature_layer: int = -1  # as LVLMConfig.vision_feature_layer
    feature_select: Literal["patch", "full"] = "patch"
    image_size: int | None = None  # square side images are resized to for this tower; None: as given

    @model_validator(mode="after")
    def _check(self) -> VisionBranchConfig:
        _check_feature_layer(self.vision, self.feature_layer, "feature_layer")
        return self

    @property
    def prefix_tokens(self) -> int:
        return int(self.vision.class_token and self.feature_select == "full")


class VisionBranch(nn.Module):
    """One extra tower and its connector: images → (Σ tokens, E / towers or E)."""

    def __init__(self, cfg: VisionBranchConfig, llm_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = build_vision_tower(cfg.vision)
        self.connector = build_connector(cfg.connector, vision_width(cfg.vision), llm_width,
                                         prefix_tokens=cfg.prefix_tokens)

    def num_tokens(self, height: int, width: int) -> int:
        if self.cfg.image_size:
            height = width = self.cfg.image_size
        return self.connector.num_output_tokens(*tower_grid(self.vision_tower, height, width))

    def forward(self, images: Sequence[Tensor]) -> Tensor:
        inputs = resize_square(images, self.cfg.image_size) if self.cfg.image_size else list(images)
        out = self.vision_tower(inputs, num_layers=_layers_run(self.cfg.vision, self.cfg.feature_layer))
        feats = out.patch_tokens() if self.cfg.feature_select == "patch" else out.hidden
        return self.connector(VisionTokens(tokens=feats, grids=out.grids, prefix_tokens=self.cfg.prefix_tokens))


class LVLMConfig(Config):
    vision: VisionConfig = ViTConfig()
    connector: ConnectorConfig = ProjectorConfig()
    llm: LlamaConfig = LlamaConfig()
    image_token_id: int
    # Which ViT layer feeds the connector, as Hugging Face counts hidden_states: 0 = the
    # embeddings, k = after layer k, negative counts from the end (-1 = last layer).
    vision_feature_layer: int = -2
    # "patch" drops the class token (LLaVA's "default"), "full" keeps it.
    vision_feature_select: Literal["patch", "full"] = "patch"
    # InternVL's dynamic high resolution: tiles of the encoder's image size (+ a thumbnail).
    tiling: TilingConfig | None = None
    # Square side images are resized to before the main tower (Vary-base: CLIP reads 224 px
    # while the new vocabulary reads 1024 px); None: as given.
    vision_image_size: int | None = None
    extra_towers: list[VisionBranchConfig] = []
    tower_merge: Literal["sequence", "channels"] = "sequence"
    # "shared" (CogVLM): all image tokens of one image share one position id.
    image_positions: Literal["per_token", "shared"] = "per_token"

    @model_validator(mode="after")
    def _check(self) -> LVLMConfig:
        _check_feature_layer(self.vision, self.vision_feature_layer, "vision_feature_layer")
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} outside the vocabulary of {self.llm.vocab_size}")
        if self.tiling is not None and (not isinstance(self.vision, ViTConfig) or self.extra_towers
                                        or self.vision_image_size):
            raise ValueError("tiling needs a ViT main tower, no extra_towers and no vision_image_size")
        for tower in [self.vision, *(b.vision for b in self.extra_towers)]:
            if isinstance(tower, NaViTConfig) and tower.token_drop_rate:
                raise ValueError("an LVLM's NaViT must not drop tokens (token_drop_rate must be 0): image "
                                 "placeholders are expanded to the full token count before the model runs")
        towers = 1 + len(self.extra_towers)
        if self.tower_merge == "channels" and self.llm.hidden_size % towers:
            raise ValueError(f"tower_merge 'channels' splits the LLM width {self.llm.hidden_size} among {towers} "
                             "towers: it must divide evenly")
        return self

    @property
    def connector_width(self) -> int:
        """Width each tower's connector outputs: E, or E / towers when merged by channels."""
        if self.tower_merge == "channels":
            return self.llm.hidden_size // (1 + len(self.extra_towers))
        return self.llm.hidden_size

    @property
    def vision_layers_run(self) -> int:
        """How many ViT layers to run to reach the feature layer."""
        k = self.vision_feature_layer
        return k if k >= 0 else self.vision.num_layers + 1 + k

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch grid in each image's vision tokens (a kept class token)."""
        return int(self.vision.class_token and self.vision_feature_select == "full")


class LVLM(nn.Module):
    def __init__(self, cfg: LVLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = build_vision_tower(cfg.vision)
        self.connector = build_connector(cfg.connector, vision_width(cfg.vision), cfg.connector_width,
                                         prefix_tokens=cfg.prefix_tokens)
        self.language_model = LlamaDecoder(cfg.llm)
        self.extra_towers = nn.ModuleList(VisionBranch(b, cfg.connector_width) for b in cfg.extra_towers)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens an image of this size expands to (all its tiles with tiling, all
        towers' tokens with extra towers). The data pipeline asks this for every image, so
        images of different sizes (NaViT) get their own counts."""
        main = self._main_tokens(height, width)
        if not self.extra_towers:
            return main
        counts = [main, *(b.num_tokens(height, width) for b in self.extra_towers)]
        if self.cfg.tower_merge == "sequence":
            return sum(counts)
        if len(set(counts)) > 1:
            raise ValueError(f"tower_merge 'channels' needs every tower to give an image the same number of "
                             f"tokens; a {height}x{width} image gives {counts}")
        return main

    def _main_tokens(self, height: int, width: int) -> int:
        if self.cfg.vision_image_size:
            height = width = self.cfg.vision_image_size
        if self.cfg.tiling is None:
            return self._encoder_input_tokens(height, width)
        tile = self.cfg.vision.image_size
        rows, cols = choose_grid(height, width, tile, self.cfg.tiling)
        n = rows * cols * self._encoder_input_tokens(tile, tile)
        if self.cfg.tiling.thumbnail and rows * cols > 1:
            n += self._encoder_input_tokens(tile, tile)
        return n

    def _encoder_input_tokens(self, height: int, width: int) -> int:
        return self.connector.num_output_tokens(*tower_grid(self.vision_tower, height, width))

    def encoder_inputs(self, images: Sequence[Tensor]) -> list[Tensor]:
        """What the vision encoder runs on: the images, or every image's tiles in order."""
        if self.cfg.vision_image_size:
            images = resize_square(images, self.cfg.vision_image_size)
        if self.cfg.tiling is None:
            return list(images)
        return [t for img in images for t in tile_image(img, self.cfg.vision.image_size, self.cfg.tiling)]

    def vision_tokens(self, images: Sequence[Tensor]) -> VisionTokens:
        """The selected vision-encoder layer's tokens of every encoder input, with their grids."""
        out = self.vision_tower(self.encoder_inputs(images), num_layers=self.cfg.vision_layers_run)
        feats = out.patch_tokens() if self.cfg.vision_feature_select == "patch" else out.hidden
        return VisionTokens(tokens=feats, grids=out.grids, prefix_tokens=self.cfg.prefix_tokens)

    def image_features(self, images: Sequence[Tensor]) -> Tensor:
        """(T_out, E): connector output of every image, in order (with extra towers, each
        image's tokens of all towers, joined as `tower_merge` says)."""
        main = self.connector(self.vision_tokens(images))
        if not self.extra_towers:
            return main
        sizes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
        for h, w in sizes:
            self.num_image_tokens(h, w)  # the towers must agree when merged by channels
        parts = [main.split([self._main_tokens(h, w) for h, w in sizes])]
        for branch in self.extra_towers:
            parts.append(branch(images).split([branch.num_tokens(h, w) for h, w in sizes]))
        dim = 0 if self.cfg.tower_merge == "sequence" else -1
        return torch.cat([torch.cat(per_image, dim=dim) for per_image in zip(*parts, strict=True)])

    def position_ids(self, position_ids: Tensor | None, is_image: Tensor) -> Tensor | None:
        """The decoder's position ids for a (B, L) batch: as given (None: the decoder's default,
        0, 1, 2, … per row), or with CogVLM's one position per image (`image_positions`)."""
        if self.cfg.image_positions == "per_token":
            return position_ids
        if position_ids is None:
            b, length = is_image.shape
            position_ids = torch.arange(length, device=is_image.device).expand(b, length)
        return share_image_positions(position_ids, is_image)

    def load_pretrained_parts(self, vision: dict[str, Tensor] | None = None,
                              language: dict[str, Tensor] | None = None) -> list[str]:
        """Initialise from separately pretrained parts; returns the names of the parts loaded.
        `vision` (a CLIP-style ViT's weights, `tessera.vision.vit` names) loads into a ViT main
        tower as it is and into a NaViT main tower through `NaViT.init_from_vit`; a ViTDet main
        tower has no such counterpart and keeps its initialisation. `language` (a plain
        decoder's weights) loads into the LLM; a visual expert starts as a copy of the text weights."""
        loaded = []
        if vision is not None and isinstance(self.vision_tower, VisionTransformer | NaViT):
            if isinstance(self.vision_tower, NaViT):
                self.vision_tower.init_from_vit(vision)
            else:
                self.vision_tower.load_state_dict(vision)
            loaded.append("vision_tower")
        if language is not None:
            self.language_model.load_text_weights(language)
            loaded.append("language_model")
        return loaded

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
            more = "more image-token slots than the images fill (more placeholders than images?)" if (
                n_slots > feats.shape[0]) else "fewer image-token slots than the images fill (more images than placeholders?)"
            raise ValueError(
                f"{len(images)} images give {feats.shape[0]} visual tokens but the text has {n_slots} "
                f"image-token slots: {more}; expand each placeholder with model.num_image_tokens"
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
            inputs_embeds=embeds, position_ids=self.position_ids(position_ids, is_image), cu_seqlens=cu_seqlens,
            attention_mask=attention_mask, modality_mask=is_image, kv_cache=kv_cache, keep=keep,
        )
