"""ALBEF ("Align before Fuse"): a ViT, a BERT whose lower half encodes text and whose upper
half fuses text with the image by cross-attention, and an EMA momentum model.

Objectives (`pretrain_losses`, the fusion-model contract of train/fusion_tasks.py):
    itc   image [CLS] and text [CLS] projected to the ITC space, aligned BEFORE fusion against
          the momentum model's features of the batch and a queue of earlier ones
          (FeatureQueue); targets = α·softmax(momentum similarities) + (1 − α)·positives
          (momentum distillation). Positives: every candidate of the same image (image_ids)
          or with the very same caption text, spread evenly, as ALBEF's retrieval fine-tuning
          does with image ids.
    itm   binary match / no match read from the fused [CLS] over a 3B batch (B positives, each
          image with a hard negative text, each text with a hard negative image), negatives
          drawn ∝ softmax of the ITC similarities, the positive and every row of the same image
          or the same caption excluded (objectives/itm.py).
    mlm   15% of the caption tokens masked, predicted from the fused states (conditioned on the
          image); targets distilled from the momentum model the same way.
α ramps linearly from 0 to `alpha` over `alpha_ramp_steps` (ALBEF: the first epoch). The
temperature τ (init 0.07) is stored as τ itself and clamped to [0.001, 0.5] after each step.

Momentum model. `visual_encoder_m`, `text_encoder_m` (with its MLM head), `vision_proj_m`,
`text_proj_m` mirror the trained modules; `after_step` moves them by EMA (0.995). Their
weights are BUFFERS (objectives/momentum.momentum_buffers): they are saved in the checkpoint
(keys `<module>_m.*`, as in ALBEF's own checkpoints) together with the queue (`queue.*`), so a
resumed run continues exactly, while `named_parameters()`, `set_trainable` and the optimizer
never see them, so no trainable prefix (not even "*") can reach them. After loading main
weights from elsewhere, `reset_momentum()` copies them into the momentum model.
Under data parallelism the queue enqueues every rank's momentum features (FeatureQueue
all-gathers them, as ALBEF does), so every rank holds the same queue.

Parameter names follow ALBEF's checkpoints where the parts allow: visual_encoder.*,
text_encoder.bert.* (BertModel: layers 0..fusion_layer-1 text, the rest fusion with
crossattention), text_encoder.cls.predictions.* (BertOnlyMLMHead, decoder tied to the word
embeddings), vision_proj, text_proj, temp, itm_head. The ViT is Tessera's (CLIP naming) in
timm's layout: pre-norm blocks, no pre-norm after the embeddings, biased patch embedding and a
final LayerNorm over every token.

Shapes:
    B pairs   N image tokens (class token first)   E_v image width   L text tokens
    E text width   P ITC width   K queue size   C = B + K candidates   V vocabulary
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.data.templates import IGNORE_INDEX
from tessera.objectives.contrastive import bank_itc_loss, positive_targets
from tessera.objectives.itm import (
    HardNegatives,
    ITMHead,
    itm_batch,
    itm_loss,
    sample_hard_negatives,
)
from tessera.objectives.mlm import MLMHead, mask_tokens, mlm_logits, mlm_loss
from tessera.objectives.momentum import (
    FeatureQueue,
    alpha_ramp,
    distillation_targets,
    ema_update_buffers_,
    momentum_buffers,
)
from tessera.text.bert import BertConfig, BertModel
from tessera.vision.vit import VisionTransformer, ViTConfig

if TYPE_CHECKING:
    from tessera.train.fusion_tasks import ImageTextBatch

OBJECTIVES = ("itc", "itm", "mlm")

# timm's ViT as ALBEF uses it: pre-norm blocks, no norm after the embeddings, biased patch
# embedding, exact GELU, LayerNorm(eps 1e-6) over every output token.
ALBEF_VISION = ViTConfig(
    image_size=64, patch_size=8, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
    act="gelu", layer_norm_eps=1e-6, class_token=True, pre_layernorm=False, patch_bias=True,
    post_layernorm_on="all_tokens",
)
# BERT split 2 + 2: layers 0-1 text encoder, layers 2-3 fusion (cross-attention to the image).
ALBEF_TEXT = BertConfig(
    vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
    max_position_embeddings=64, cross_attention_layers=(2, 3), encoder_width=128,
)


class ALBEFConfig(Config):
    vision: ViTConfig = ALBEF_VISION
    text: BertConfig = ALBEF_TEXT
    embed_dim: int = 256  # the ITC space
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4  # weight of the momentum model's targets (momentum distillation)
    alpha_ramp_steps: int = 0  # α rises linearly from 0 over these steps (ALBEF: one epoch); 0 = none
    mlm_probability: float = 0.15
    # Token ids the MLM masking needs: never-masked tokens and the mask token itself (from
    # train_bpe(..., extra_special_tokens=("<mask>",)); None: the model cannot train MLM).
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 3
    mask_token_id: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ALBEFConfig:
        layers = self.text.cross_attention_layers
        n = self.text.num_layers
        if not layers:
            raise ValueError("text.cross_attention_layers must name the fusion layers (ALBEF: the top half)")
        if tuple(sorted(layers)) != tuple(range(min(layers), n)) or min(layers) == 0:
            raise ValueError(
                f"text.cross_attention_layers {layers} must be the top layers k..{n - 1} with k ≥ 1: "
                "the layers below are the text encoder, the ones above the fusion encoder"
            )
        if self.text.cross_attention_width != self.vision.hidden_size:
            raise ValueError(
                f"text.encoder_width {self.text.cross_attention_width} must equal vision.hidden_size "
                f"{self.vision.hidden_size}: the fusion layers cross-attend to the image tokens"
            )
        if not self.vision.class_token or self.vision.post_layernorm_on != "all_tokens":
            raise ValueError("ALBEF's ViT needs class_token=True and post_layernorm_on='all_tokens' (timm layout)")
        if not 0 < self.temp_min <= self.temp_init <= self.temp_max:
            raise ValueError(f"temp_init {self.temp_init} must lie in [temp_min {self.temp_min}, temp_max {self.temp_max}]")
        if self.embed_dim < 1 or self.queue_size < 1:
            raise ValueError("embed_dim and queue_size must be positive")
        if not 0 <= self.momentum <= 1 or not 0 <= self.alpha <= 1:
            raise ValueError(f"momentum {self.momentum} and alpha {self.alpha} must lie in [0, 1]")
        if self.alpha_ramp_steps < 0:
            raise ValueError(f"alpha_ramp_steps must be ≥ 0, got {self.alpha_ramp_steps}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        ids = {"pad": self.pad_token_id, "bos": self.bos_token_id, "eos": self.eos_token_id,
               "mask": self.mask_token_id}
        bad = {k: v for k, v in ids.items() if v is not None and not 0 <= v < self.text.vocab_size}
        if bad:
            raise ValueError(f"token ids {bad} outside the vocabulary 0..{self.text.vocab_size - 1}")
        return self

    @property
    def fusion_layer(self) -> int:
        """First layer of the fusion encoder; layers below it are the text encoder."""
        return min(self.text.cross_attention_layers)


class ALBEFTextEncoder(nn.Module):
    """BertForMaskedLM's layout: `bert` (text layers, then fusion layers) and `cls` (MLM head)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.bert = BertModel(cfg)
        self.cls = MLMHead(cfg, self.bert.embeddings.word_embeddings)


def _text_key_weights(length: int) -> Tensor:
    """Fixed random odd int64 weights: key(text) = Σ_t id_t · w_t (wrapping), a hash that is the
    same for the same caption in any batch and padded to any length."""
    g = torch.Generator().manual_seed(0x414C424546)
    return torch.randint(1, 2**62, (length,), generator=g, dtype=torch.long) | 1


def _init_weights(module: nn.Module) -> None:
    """Embeddings N(0, 0.02) as in BERT (PyTorch's N(0, 1) makes the tied MLM head's first
    logits ~√E). Linear layers keep PyTorch's default (uniform ±1/√fan_in): ALBEF starts from
    pretrained DeiT and BERT, and from scratch at tiny width BERT's N(0, 0.02) leaves every
    [CLS] state nearly identical, and ITC collapses (all embeddings one vector, τ → 0)."""
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class ALBEF(nn.Module):
    def __init__(self, cfg: ALBEFConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = VisionTransformer(cfg.vision)
        self.text_encoder = ALBEFTextEncoder(cfg.text)
        self.vision_proj = nn.Linear(cfg.vision.hidden_size, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp_init))
        self.itm_head = ITMHead(cfg.text.hidden_size)
        self.apply(_init_weights)
        # Momentum twins, weights as buffers (see the module docstring); the ITM head has none.
        self.visual_encoder_m = momentum_buffers(self.visual_encoder)
        self.text_encoder_m = momentum_buffers(self.text_encoder)
        self.vision_proj_m = momentum_buffers(self.vision_proj)
        self.text_proj_m = momentum_buffers(self.text_proj)
        self.queue = FeatureQueue(
            cfg.queue_size, {"image": cfg.embed_dim, "text": cfg.embed_dim}, ids=("image_id", "text_key")
        )
        self.register_buffer(
            "text_key_weights", _text_key_weights(cfg.text.max_position_embeddings), persistent=False
        )

    # --- momentum model -----------------------------------------------------------------------

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.visual_encoder_m, self.visual_encoder),
            (self.text_encoder_m, self.text_encoder),
            (self.vision_proj_m, self.vision_proj),
            (self.text_proj_m, self.text_proj),
        ]

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the main weights into the momentum model (after loading main weights only)."""
        for target, source in self._momentum_pairs():
            ema_update_buffers_(target, source, 0.0)

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA of the momentum model, then τ clamped to [temp_min, temp_max]."""
        for target, source in self._momentum_pairs():
            ema_update_buffers_(target, source, self.cfg.momentum)
        self.temp.clamp_(self.cfg.temp_min, self.cfg.temp_max)

    def alpha_at(self, step: int) -> float:
        return alpha_ramp(step, self.cfg.alpha_ramp_steps, self.cfg.alpha)

    # --- encoders -------------------------------------------------------------------------

    @staticmethod
    def _image_tokens(encoder: nn.Module, images: Sequence[Tensor] | Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, N, E_v) normed image tokens, class token first, and a (B, N) real-token mask
        (None when every image has the same size).

        An image passed several times as the same tensor (retrieval's ITM re-ranking scores one
        image against many texts) runs through the encoder once.
        """
        images = list(images.unbind(0)) if isinstance(images, Tensor) and images.dim() == 4 else list(images)
        slot: dict[tuple[int, tuple[int, ...], tuple[int, ...]], int] = {}
        unique: list[Tensor] = []
        order: list[int] = []
        for img in images:
            key = (img.data_ptr(), tuple(img.shape), tuple(img.stride()))
            if key not in slot:
                slot[key] = len(unique)
                unique.append(img)
            order.append(slot[key])
        out = encoder(unique)
        hidden = encoder.last_hidden_state(out)
        bounds = out.cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        mask: Tensor | None = None
        if len(set(lengths)) == 1:
            tokens = hidden.view(len(lengths), lengths[0], -1)
        else:
            tokens = hidden.new_zeros(len(lengths), max(lengths), hidden.shape[-1])
            mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool, device=hidden.device)
            for i, (start, length) in enumerate(zip(bounds[:-1], lengths, strict=True)):
                tokens[i, :length] = hidden[start : start + length]
                mask[i, :length] = True
        if len(unique) < len(images):
            index = torch.tensor(order, device=hidden.device)
            tokens = tokens[index]
            mask = None if mask is None else mask[index]
        return tokens, mask

    def _text_hidden(self, encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, E): the text encoder (layers below fusion_layer), no image."""
        return encoder.bert(input_ids, attention_mask=attention_mask, end_layer=self.cfg.fusion_layer)

    def _fuse(
        self, encoder: nn.Module, text_hidden: Tensor, attention_mask: Tensor, image_embeds: Tensor,
        image_mask: Tensor | None,
    ) -> Tensor:
        """(B, L, E): the fusion layers over text states, cross-attending to image tokens."""
        return encoder.bert(
            hidden_states=text_hidden, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask, start_layer=self.cfg.fusion_layer,
        )

    def _text_keys(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) long: equal for equal captions, whatever the padding."""
        if input_ids.shape[1] > self.text_key_weights.shape[0]:
            raise ValueError(
                f"text of {input_ids.shape[1]} tokens exceeds max_position_embeddings {self.text_key_weights.shape[0]}"
            )
        weights = self.text_key_weights[: input_ids.shape[1]]
        return (input_ids * attention_mask.long() * weights).sum(dim=1)

    @staticmethod
    def _check_text(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids (B, L) and attention_mask (B, L) expected, got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        return attention_mask.to(torch.bool)

    # --- the fusion-model contract ------------------------------------------------------------

    @property
    def fused_width(self) -> int:
        return self.cfg.text.hidden_size

    def image_embeddings(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        """(N, P) unit-norm ITC embeddings of the images' class tokens."""
        embeds, _ = self._image_tokens(self.visual_encoder, images)
        return F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(M, P) unit-norm ITC embeddings of the texts' [CLS] (the text encoder alone)."""
        mask = self._check_text(input_ids, attention_mask)
        hidden = self._text_hidden(self.text_encoder, input_ids, mask)
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def fused_features(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, E): the fusion encoder's [CLS] state for image i with text i."""
        mask = self._check_text(input_ids, attention_mask)
        if len(images) != input_ids.shape[0]:
            raise ValueError(f"{len(images)} images for {input_ids.shape[0]} texts: pairs need one of each")
        embeds, image_mask = self._image_tokens(self.visual_encoder, images)
        hidden = self._text_hidden(self.text_encoder, input_ids, mask)
        return self._fuse(self.text_encoder, hidden, mask, embeds, image_mask)[:, 0]

    def itm_logits(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) the ITM head's "match" logit for image i with text i; ALBEF's retrieval adds this
        (itm_head(...)[:, 1]) to the ITC similarity when it re-ranks."""
        return self.itm_head(self.fused_features(images, input_ids, attention_mask))[:, 1]

    def pretrain_losses(self, batch: ImageTextBatch, objectives: Mapping[str, float], step: int) -> dict[str, Tensor]:
        """Unweighted losses of the requested objectives ("itc", "itm", "mlm"), plus "itm_acc" (a
        log, not a loss) with "itm". In training mode the batch's momentum features are then
        enqueued."""
        unknown = sorted(set(objectives) - set(OBJECTIVES))
        if unknown or not objectives:
            raise ValueError(f"ALBEF has no objective {unknown or '(none given)'}; allowed: {list(OBJECTIVES)}")
        ids = batch.input_ids
        mask = self._check_text(ids, batch.attention_mask)
        image_ids = batch.image_ids.to(ids.device).long()
        if len(batch.images) != ids.shape[0] or image_ids.shape != (ids.shape[0],):
            raise ValueError(
                f"batch has {len(batch.images)} images, {ids.shape[0]} texts and image_ids "
                f"{tuple(image_ids.shape)}; pairs need one of each"
            )
        alpha = self.alpha_at(step)
        text_keys = self._text_keys(ids, mask)
        image_embeds, image_mask = self._image_tokens(self.visual_encoder, batch.images)
        momentum_embeds: Tensor | None = None
        if "itc" in objectives or ("mlm" in objectives and alpha > 0):
            with torch.no_grad():
                momentum_embeds, _ = self._image_tokens(self.visual_encoder_m, batch.images)
        losses: dict[str, Tensor] = {}

        if "itc" in objectives or "itm" in objectives:
            text_hidden = self._text_hidden(self.text_encoder, ids, mask)
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
            text_feat = F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)
            if "itc" in objectives:
                assert momentum_embeds is not None
                losses["itc"], sim_i2t, sim_t2i = self._itc(
                    image_feat, text_feat, momentum_embeds, ids, mask, image_ids, text_keys, alpha
                )
            else:
                sim_i2t = image_feat @ text_feat.t() / self.temp
                sim_t2i = sim_i2t.t()
            if "itm" in objectives:
                losses["itm"], losses["itm_acc"] = self._itm(
                    sim_i2t, sim_t2i, image_embeds, image_mask, text_hidden, mask, image_ids, text_keys
                )
        if "mlm" in objectives:
            losses["mlm"] = self._mlm(ids, mask, image_embeds, image_mask, momentum_embeds, alpha)
        return losses

    # --- objectives ---------------------------------------------------------------------------

    def _itc(
        self, image_feat: Tensor, text_feat: Tensor, momentum_embeds: Tensor, ids: Tensor, mask: Tensor,
        image_ids: Tensor, text_keys: Tensor, alpha: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """ITC loss against momentum features of the batch + the queue; also returns the main
        model's in-batch similarities (B, B) for hard-negative sampling."""
        with torch.no_grad():
            text_hidden_m = self._text_hidden(self.text_encoder_m, ids, mask)
            image_feat_m = F.normalize(self.vision_proj_m(momentum_embeds[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(text_hidden_m[:, 0]), dim=-1)
            image_bank = torch.cat([image_feat_m, self.queue.get("image").to(image_feat_m.dtype)])
            text_bank = torch.cat([text_feat_m, self.queue.get("text").to(text_feat_m.dtype)])
            bank_ids = torch.cat([image_ids, self.queue.get("image_id")])
            bank_keys = torch.cat([text_keys, self.queue.get("text_key")])
            # Candidate c is a positive of pair b when it shows the same image or carries the
            # very same caption (ShapesWorld captions repeat across images).
            positives = (image_ids[:, None] == bank_ids[None]) | (text_keys[:, None] == bank_keys[None])
            targets = positive_targets(positives)
            temp = self.temp.detach()
            if alpha > 0:
                targets_i2t = distillation_targets(image_feat_m @ text_bank.t() / temp, targets, alpha)
                targets_t2i = distillation_targets(text_feat_m @ image_bank.t() / temp, targets, alpha)
            else:
                targets_i2t = targets_t2i = targets
        loss = bank_itc_loss(image_feat, text_feat, image_bank, text_bank, self.temp, targets_i2t, targets_t2i)
        if self.training:
            self.queue.enqueue(image=image_feat_m, text=text_feat_m, image_id=image_ids, text_key=text_keys)
        b = image_feat.shape[0]
        with torch.no_grad():
            sim_i2t = image_feat @ text_bank[:b].t() / temp
            sim_t2i = text_feat @ image_bank[:b].t() / temp
        return loss, sim_i2t, sim_t2i

    def _itm(
        self, sim_i2t: Tensor, sim_t2i: Tensor, image_embeds: Tensor, image_mask: Tensor | None,
        text_hidden: Tensor, mask: Tensor, image_ids: Tensor, text_keys: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """3B pairs (positives, image + hard negative text, hard negative image + text) → (CE,
        accuracy of the match / no match decision, a log)."""
        b = image_embeds.shape[0]
        negatives = self.hard_negatives(sim_i2t[:, :b], sim_t2i[:, :b], image_ids, text_keys)
        pairs = itm_batch(image_embeds, text_hidden, mask, negatives, image_mask)
        fused = self._fuse(self.text_encoder, pairs.text, pairs.text_mask, pairs.image_embeds, pairs.image_mask)
        logits = self.itm_head(fused[:, 0])
        accuracy = (logits.detach().argmax(dim=-1) == pairs.labels).float().mean()
        return itm_loss(logits, pairs.labels), accuracy

    @staticmethod
    @torch.no_grad()
    def hard_negatives(sim_i2t: Tensor, sim_t2i: Tensor, image_ids: Tensor, text_keys: Tensor) -> HardNegatives:
        """One negative text per image and one negative image per text, drawn ∝ softmax of the
        in-batch similarities (B, B); never the positive, another row of the same image, or a
        row with the very same caption (those would be matches labelled 0)."""
        same = (image_ids[:, None] == image_ids[None]) | (text_keys[:, None] == text_keys[None])
        return sample_hard_negatives(sim_i2t.detach(), sim_t2i.detach(), same_pair=same)

    def _mlm(
        self, ids: Tensor, mask: Tensor, image_embeds: Tensor, image_mask: Tensor | None,
        momentum_embeds: Tensor | None, alpha: float,
    ) -> Tensor:
        """15% masked, predicted through text + fusion layers; momentum-distilled targets."""
        cfg = self.cfg
        if cfg.mask_token_id is None:
            raise ValueError("the mlm objective needs mask_token_id in the ALBEF config (the tokenizer's '<mask>' id)")
        special = ~mask | (ids == cfg.pad_token_id) | (ids == cfg.bos_token_id) | (ids == cfg.eos_token_id)
        masked_ids, labels = mask_tokens(ids, special, cfg.text.vocab_size, cfg.mask_token_id, cfg.mlm_probability)
        selected = labels != IGNORE_INDEX
        if not bool(selected.any()):
            # A batch of very short captions can draw no token: nothing to predict this time,
            # a zero that still reaches the head keeps backward() and the summed loss valid.
            return self.text_encoder.cls(image_embeds.new_zeros(1, cfg.text.hidden_size)).sum() * 0.0
        hidden = self.text_encoder.bert(
            masked_ids, attention_mask=mask, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask
        )
        soft: Tensor | None = None
        if alpha > 0:
            assert momentum_embeds is not None
            with torch.no_grad():
                hidden_m = self.text_encoder_m.bert(
                    masked_ids, attention_mask=mask, encoder_hidden_states=momentum_embeds,
                    encoder_attention_mask=image_mask,
                )
                logits_m = mlm_logits(hidden_m, self.text_encoder_m.cls, labels)
                one_hot = F.one_hot(labels[selected], cfg.text.vocab_size).float()
                soft = distillation_targets(logits_m, one_hot, alpha)
        return mlm_loss(hidden, self.text_encoder.cls, labels, soft)
