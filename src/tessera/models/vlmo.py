"""VLMo: a Mixture-of-Modality-Experts transformer that is both a dual encoder and a fusion encoder.

Every layer shares one self-attention across modalities and replaces the feed-forward block
by experts (text/bert.py's modality experts): the L-FFN (BERT's own `intermediate` / `output`)
for text tokens, the V-FFN (`image_expert`) for image tokens, and in the top
`vl_expert_layers` layers a VL-FFN (`vl_expert`) that takes every token of a fused sequence.
    image only     patch tokens through all layers, V-FFN everywhere → [CLS] → ITC embedding
    text only      word tokens through all layers, L-FFN everywhere  → [CLS] → ITC embedding
    fused          [text; image] in one sequence: routed by modality below the top layers,
                   VL-FFN in them → pooled text [CLS] → ITM head, downstream heads
So retrieval can rank by ITC with two independent passes and re-rank the top candidates with
the fused pass (ITM).

Stagewise pretraining (`stage_trainable` names what trains in each):
    "image"       images only, masked image modelling; attention + V-FFN + patch embeddings.
                  MIM here is SimMIM-style rather than BEiT's dVAE tokens: a random 40% of the
                  patches are replaced by a learned mask embedding and a linear head regresses
                  each masked patch's (normalised) pixels, mean squared error; with
                  mim_loss_on="all" the visible patches are scored too.
    "text"        texts only, MLM; attention and V-FFN frozen, the L-FFN and the word
                  embeddings (and the MLM head tied to them) train.
    "image_text"  image-text pairs: ITC (learnable temperature, as CLIP), ITM with hard
                  negatives sampled from the ITC similarities, and MLM on the fused pass;
                  everything trains. The VL-FFN starts here from its random initialisation,
                  as in the VLMo code (its stage-2 checkpoint holds no VL-FFN).
Rows of a batch that share an image (or carry identical text) are never negatives of each
other: ITC spreads its target over them and ITM never draws them.

Parameter names: transformer.* is text/bert.py's BertModel with modality experts
(embeddings.{word_embeddings, position_embeddings, token_type_embeddings (the modality-type
table: 0 text, 1 image), LayerNorm}, encoder.layer.N.{attention, intermediate, output,
image_expert, vl_expert}, pooler.dense); vision_embeddings.* is vision/vit.py's
VisionEmbeddings (class_embedding, patch_embedding, position_embedding); then
image_layernorm, itc_image_proj, itc_text_proj, logit_scale, itm_score, mlm_score (decoder
tied to the word embeddings), mim_mask_token, mim_head. There is no Hugging Face VLMo.

Shapes:
    B batch   L text tokens   N image tokens (1 + P)   P patches   E hidden size
    D ITC projection width   p patch size   C channels   M masked positions
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.models.vilt import (
    LinearInit,
    as_image_list,
    check_objectives,
    embed_image_list,
    init_weights,
    mask_text_for_mlm,
    same_pair_mask,
)
from tessera.nn.layers import Activation
from tessera.objectives.contrastive import positive_targets
from tessera.objectives.itm import ITMHead, itm_loss, itm_pair_indices, sample_hard_negatives
from tessera.objectives.mlm import MLMPredictions, mlm_loss
from tessera.text.bert import IMAGE_MODALITY, TEXT_MODALITY, BertConfig, BertModel
from tessera.vision.vit import VisionEmbeddings, ViTConfig

Stage = Literal["image", "text", "image_text"]
STAGES: tuple[Stage, ...] = ("image", "text", "image_text")


class VLMoConfig(Config):
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    act: Activation = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 40  # text positions
    vl_expert_layers: int = 2  # the top layers with a VL-FFN (VLMo-Base: 2 of 12)
    image_size: int = 64  # the square grid the position table is learned for
    patch_size: int = 8
    num_channels: int = 3
    projection_dim: int = 128  # ITC embedding width
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    initializer_range: float = 0.02
    linear_init: LinearInit = "pytorch"  # see ViltConfig.linear_init
    mask_token_id: int | None = None  # the tokenizer's "<mask>"
    special_token_ids: tuple[int, ...] = (0, 1, 2, 3, 4)  # never masked: <pad> <unk> <s> </s> <image>
    mlm_probability: float = 0.15
    mim_probability: float = 0.4  # share of patches masked in masked image modelling (BEiT: 40%)
    # Which patches the MIM loss covers: "masked" (BEiT, SimMIM) or "all", the visible ones too,
    # which keeps the encoder from collapsing to the mean image where masked content is
    # unpredictable from its context (ShapesWorld's randomly placed shapes).
    mim_loss_on: Literal["masked", "all"] = "masked"

    @model_validator(mode="after")
    def _check(self) -> VLMoConfig:
        if not 1 <= self.vl_expert_layers <= self.num_layers:
            raise ValueError(f"vl_expert_layers {self.vl_expert_layers} outside 1..{self.num_layers}: the fusion "
                             f"encoder needs at least one VL-FFN layer")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside the vocabulary 0..{self.vocab_size - 1}")
        for name in ("mlm_probability", "mim_probability"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        self.text_config  # noqa: B018 - validates the transformer's sizes
        self.vision_config  # noqa: B018 - validates the patch grid
        return self

    @property
    def text_config(self) -> BertConfig:
        """The shared transformer: BERT with modality experts; its two token types are the
        modality types (0 text, 1 image)."""
        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=2,
            layer_norm_eps=self.layer_norm_eps, act=self.act, pooler=True, modality_experts=True,
            vl_expert_layers=self.vl_expert_layers,
        )

    @property
    def vision_config(self) -> ViTConfig:
        """Sizes of the patch embeddings (only ViT's embeddings are used; the layers are shared)."""
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, hidden_size=self.hidden_size, num_layers=1,
            num_heads=self.num_heads, intermediate_size=self.intermediate_size, num_channels=self.num_channels,
            class_token=True, patch_bias=True,
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def stage_trainable(cfg: VLMoConfig, stage: Stage) -> list[str]:
    """The module prefixes that train in a stage of VLMo's recipe (StageConfig.trainable)."""
    layers = [f"transformer.encoder.layer.{i}" for i in range(cfg.num_layers)]
    if stage == "image":
        return ["vision_embeddings", "image_layernorm", "transformer.embeddings.token_type_embeddings",
                "mim_mask_token", "mim_head",
                *[f"{layer}.attention" for layer in layers], *[f"{layer}.image_expert" for layer in layers]]
    if stage == "text":
        return ["transformer.embeddings.word_embeddings", "transformer.embeddings.position_embeddings",
                "transformer.embeddings.LayerNorm", "mlm_score",
                *[f"{layer}.intermediate" for layer in layers], *[f"{layer}.output" for layer in layers]]
    if stage == "image_text":
        return ["*"]
    raise ValueError(f"unknown VLMo stage {stage!r}; stages are {list(STAGES)}")


def soft_itc_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, same_pair: Tensor) -> Tensor:
    """CLIP's symmetric ITC loss whose target spreads evenly over every column that is a true
    match (same_pair (B, B), diagonal True). Without duplicates it equals clip_loss exactly."""
    logits = logit_scale.exp() * image_emb @ text_emb.t()  # (B, B) image → text
    i2t = F.cross_entropy(logits, positive_targets(same_pair))
    t2i = F.cross_entropy(logits.t(), positive_targets(same_pair.t()))
    return 0.5 * (i2t + t2i)


def patchify(pixels: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) → (B, P, C·p·p), patches in the row-major order of the patch embedding and
    each patch channel-major, as a stride-p convolution reads it."""
    return F.unfold(pixels, kernel_size=patch, stride=patch).transpose(1, 2)


class VLMo(nn.Module):
    def __init__(self, cfg: VLMoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.hidden_size
        self.transformer = BertModel(cfg.text_config)
        self.vision_embeddings = VisionEmbeddings(cfg.vision_config)
        # Post-LN layers expect normalised inputs, as the text embeddings' LayerNorm gives.
        self.image_layernorm = nn.LayerNorm(e, eps=cfg.layer_norm_eps)
        self.itc_image_proj = nn.Linear(e, cfg.projection_dim, bias=False)
        self.itc_text_proj = nn.Linear(e, cfg.projection_dim, bias=False)
        # A log, so the scale stays positive; clamped after every step (after_step).
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.itm_score = ITMHead(e)
        self.mlm_score = MLMPredictions(cfg.text_config, self.transformer.embeddings.word_embeddings)
        self.mim_mask_token = nn.Parameter(torch.zeros(e))
        self.mim_head = nn.Linear(e, cfg.num_channels * cfg.patch_size**2)
        self.apply(lambda m: init_weights(m, cfg.initializer_range, cfg.linear_init))
        with torch.no_grad():
            for p in (self.vision_embeddings.class_embedding, self.mim_mask_token):
                nn.init.trunc_normal_(p, std=cfg.initializer_range)

    # ---------------------------------------------------------------- token sequences

    def _image_tokens(self, images: Sequence[Tensor] | Tensor, patch_mask: Tensor | None = None
                      ) -> tuple[Tensor, Tensor | None]:
        """(B, N, E) normalised image tokens with the image modality type, and their key mask
        (None: no padding). patch_mask (B, P) bool replaces those patches by the MIM mask token."""
        images = as_image_list(images, self.cfg.num_channels)
        ve = self.vision_embeddings

        def embed(pixels: Tensor) -> Tensor:
            x = ve.embed_patches(pixels)  # (n, E, h, w)
            rows, cols = x.shape[-2:]
            x = x.flatten(2).transpose(1, 2)
            if patch_mask is not None:
                x = torch.where(patch_mask[..., None], self.mim_mask_token.to(x.dtype), x)
            x = torch.cat([ve.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
            return x + ve.positions(rows, cols)

        for i, img in enumerate(images):
            ve_cfg = self.cfg.vision_config
            if img.shape[1] % ve_cfg.patch_size or img.shape[2] % ve_cfg.patch_size:
                raise ValueError(f"image {i} of size {img.shape[1]}x{img.shape[2]} is not a multiple of the "
                                 f"patch size {ve_cfg.patch_size}")
        if patch_mask is not None and len({tuple(img.shape) for img in images}) != 1:
            raise ValueError("masked image modelling needs images of one size")
        x, mask = embed_image_list(images, embed)
        type_embedding = self.transformer.embeddings.token_type_embeddings.weight[IMAGE_MODALITY]
        return self.image_layernorm(x + type_embedding), mask

    def encode_image(self, images: Sequence[Tensor] | Tensor, patch_mask: Tensor | None = None
                     ) -> tuple[Tensor, Tensor | None]:
        """Image-only pass (V-FFN in every layer): hidden (B, N, E) and key mask or None."""
        x, mask = self._image_tokens(images, patch_mask)
        modality = torch.full(x.shape[:2], IMAGE_MODALITY, dtype=torch.long, device=x.device)
        return self.transformer(hidden_states=x, attention_mask=mask, modality_ids=modality), mask

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Text-only pass (L-FFN in every layer): hidden (B, L, E)."""
        modality = torch.full_like(input_ids, TEXT_MODALITY)
        return self.transformer(input_ids, attention_mask=attention_mask, modality_ids=modality)

    def fuse(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor | None
             ) -> Tensor:
        """Fused pass over [text; image]: hidden (B, L + N, E); the first L positions are the text's."""
        image, image_mask = self._image_tokens(images)
        b, length = input_ids.shape
        if image.shape[0] != b:
            raise ValueError(f"{image.shape[0]} images for {b} texts: the fusion encoder pairs image i with text i")
        text = self.transformer.embeddings(input_ids)
        text_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if image_mask is None:
            image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        mask = torch.cat([text_mask, image_mask], dim=1)
        modality = torch.cat([torch.full_like(input_ids, TEXT_MODALITY),
                              torch.full(image.shape[:2], IMAGE_MODALITY, dtype=torch.long, device=image.device)], 1)
        return self.transformer(hidden_states=torch.cat([text, image], dim=1),
                                attention_mask=None if bool(mask.all()) else mask, modality_ids=modality, fused=True)

    # ---------------------------------------------------------------- the contract

    @property
    def fused_width(self) -> int:
        return self.cfg.hidden_size

    def image_embeddings(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        """(B, D) unit-norm ITC embeddings of the image-only [CLS]."""
        hidden, _ = self.encode_image(images)
        return F.normalize(self.itc_image_proj(hidden[:, 0]), dim=-1)

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, D) unit-norm ITC embeddings of the text-only [CLS]."""
        return F.normalize(self.itc_text_proj(self.encode_text(input_ids, attention_mask)[:, 0]), dim=-1)

    def fused_features(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, E): the pooled [CLS] of the fused pass of image i with text i."""
        return self.transformer.pool(self.fuse(images, input_ids, attention_mask))

    def itm_logits(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,): log-odds that image i matches text i (match logit minus no-match logit)."""
        logits = self.itm_score(self.fused_features(images, input_ids, attention_mask))
        return logits[:, 1] - logits[:, 0]

    def pretrain_losses(self, batch: Any, objectives: dict[str, float], step: int) -> dict[str, Tensor]:
        """Unweighted losses of the objectives asked for: "mim" (needs images), "mlm" (fused when
        the batch has images, text-only when it has none), "itc" and "itm" (image-text pairs)."""
        check_objectives(objectives, {"mim", "mlm", "itc", "itm"}, "VLMo")
        images = batch.images if batch.images is not None and len(batch.images) else None
        ids = batch.input_ids if batch.input_ids is not None and batch.input_ids.numel() else None
        needs_pairs = sorted({"itc", "itm"} & set(objectives))
        if needs_pairs and (images is None or ids is None):
            raise ValueError(f"VLMo objectives {needs_pairs} need image-text pairs; the batch lacks "
                             f"{'images' if images is None else 'texts'}")
        if "mim" in objectives and images is None:
            raise ValueError("VLMo objective 'mim' needs images; the batch has none")
        if "mlm" in objectives and ids is None:
            raise ValueError("VLMo objective 'mlm' needs texts; the batch has none")
        losses: dict[str, Tensor] = {}
        if "mim" in objectives:
            losses["mim"] = self._mim_loss(as_image_list(images, self.cfg.num_channels))
        if needs_pairs:
            images = as_image_list(images, self.cfg.num_channels)
            same = same_pair_mask(batch.image_ids, ids, batch.attention_mask)
            image_emb, text_emb = self.image_embeddings(images), self.text_embeddings(ids, batch.attention_mask)
            if "itc" in objectives:
                losses["itc"] = soft_itc_loss(image_emb, text_emb, self.logit_scale, same)
            if "itm" in objectives:
                losses["itm"] = self._itm_loss(images, ids, batch.attention_mask, image_emb, text_emb, same)
        if "mlm" in objectives:
            losses["mlm"] = self._mlm_loss(images, ids, batch.attention_mask)
        return losses

    @torch.no_grad()
    def after_step(self) -> None:
        self.logit_scale.clamp_(0.0, self.cfg.logit_scale_max)

    # ---------------------------------------------------------------- objectives

    def _itm_loss(self, images: list[Tensor], input_ids: Tensor, attention_mask: Tensor, image_emb: Tensor,
                  text_emb: Tensor, same: Tensor) -> Tensor:
        with torch.no_grad():
            sim = self.logit_scale.exp() * image_emb @ text_emb.t()
        negatives = sample_hard_negatives(sim, sim.t(), same_pair=same)
        image_index, text_index, labels = itm_pair_indices(negatives)
        pooled = self.fused_features([images[i] for i in image_index.tolist()], input_ids[text_index],
                                     attention_mask[text_index])
        return itm_loss(self.itm_score(pooled), labels)

    def _mlm_loss(self, images: Sequence[Tensor] | None, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        masked, labels = mask_text_for_mlm(
            input_ids, attention_mask, mask_token_id=self.cfg.mask_token_id,
            special_token_ids=self.cfg.special_token_ids, vocab_size=self.cfg.vocab_size,
            prob=self.cfg.mlm_probability, word_starts=None,
        )
        if images is None:
            hidden = self.encode_text(masked, attention_mask)
        else:
            hidden = self.fuse(images, masked, attention_mask)[:, : input_ids.shape[1]]
        return mlm_loss(hidden, self.mlm_score, labels)

    def random_patch_mask(self, batch: int, num_patches: int, device: torch.device) -> Tensor:
        """(B, P) bool: round(prob · P) patches of each image, chosen uniformly (at least one)."""
        count = max(1, round(self.cfg.mim_probability * num_patches))
        order = torch.rand(batch, num_patches, device=device).argsort(dim=1)
        return order < count

    def _mim_loss(self, images: list[Tensor]) -> Tensor:
        p = self.cfg.patch_size
        pixels = torch.stack(images) if len({tuple(i.shape) for i in images}) == 1 else None
        if pixels is None:
            raise ValueError("masked image modelling needs images of one size")
        num_patches = (pixels.shape[2] // p) * (pixels.shape[3] // p)
        patch_mask = self.random_patch_mask(pixels.shape[0], num_patches, pixels.device)
        hidden, _ = self.encode_image(pixels, patch_mask)
        scored = patch_mask if self.cfg.mim_loss_on == "masked" else torch.ones_like(patch_mask)
        predicted = self.mim_head(hidden[:, 1:][scored])  # (M, C·p·p)
        target = patchify(pixels.to(predicted.dtype), p)[scored]
        return F.mse_loss(predicted.float(), target.float())
