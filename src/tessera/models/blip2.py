"""BLIP-2 stage 1: a frozen image encoder and the Q-Former, pretrained on image-caption pairs with
three objectives that share one Q-Former and differ in its self-attention mask.

    ITC  image-text contrastive, unimodal mask: the queries' outputs Z (Q vectors per image) and
         the text's [CLS] output are projected and L2-normalised; the similarity of an image and
         a text is the MAX over the Q query similarities; symmetric cross-entropy with the
         learned temperature (init 0.07, clamped to [0.001, 0.5] after each step), label
         smoothing 0.1, and rows that show the same image counted as positives of each other.
    ITG  image-grounded text generation, multimodal causal mask: the first text token is
         replaced by [DEC] (<dec>); each text token predicts the next one through the BERT
         prediction head (tied to the word embeddings), label smoothing 0.1.
    ITM  image-text matching, bidirectional mask: hard negatives drawn from the ITC similarities
         (objectives/itm.py); the ITM head's 2-way logits of every query output are AVERAGED.

The model implements the fusion-model contract (`pretrain_losses`, `after_step`, embeddings,
`itm_logits`, `fused_features`), so `train/fusion_tasks.ImageTextTask` trains it with the one
Trainer. ITC and ITG rows run as one batched Q-Former call (each row with its own mask); ITM
needs the ITC similarities first, so it is a second call.

Parameter names follow Hugging Face's Blip2ForImageTextRetrieval where it has the part:
vision_model.*, query_tokens, embeddings.{word_embeddings, position_embeddings}, qformer.*,
vision_projection, text_projection, itm_head. Tessera / LAVIS additions: ln_vision (see
connectors/qformer.py), cls.predictions.* (BERT's LM head for ITG, as LAVIS's Qformer.cls), temp.
The shared parts (ln_vision, query_tokens, qformer) keep the connector's names, so stage 2 loads
them key for key (`QFormerBase.load_shared_state_dict`).

Shapes:
    B rows (image-text pairs)   N images   Q queries   L text tokens   S vision tokens per image
    E Q-Former width   E_v vision width   P projection width   V vocabulary
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.connectors.base import VisionTokens
from tessera.connectors.qformer import (
    QFormerBase,
    QFormerConfig,
    QFormerMode,
    qformer_attention_mask,
)
from tessera.data.templates import IGNORE_INDEX
from tessera.objectives.itm import ITMHead, itm_loss, itm_pair_indices, sample_hard_negatives
from tessera.objectives.lm import next_token_loss
from tessera.objectives.mlm import MLMHead
from tessera.text.bert import BertConfig
from tessera.vision.vit import VisionTransformer, ViTConfig

TEMP_MIN, TEMP_MAX = 0.001, 0.5  # LAVIS clamps BLIP-2's ITC temperature to this range


class Blip2PretrainConfig(Config):
    vision: ViTConfig = ViTConfig()
    qformer: QFormerConfig = QFormerConfig(text_input=True)
    vocab_size: int = 1024
    max_position_embeddings: int = 64  # text positions of the Q-Former's text transformer
    embed_dim: int = 64  # ITC projection width (paper: 256)
    # Which ViT layer feeds the Q-Former, counted as LVLMConfig counts it (-1: the last; LAVIS
    # drops EVA's last layer, i.e. -2 of the full tower). Every token is kept (class token too).
    vision_feature_layer: int = -1
    temp_init: float = 0.07
    itc_label_smoothing: float = 0.1
    itg_label_smoothing: float = 0.1
    pad_token_id: int = 0
    dec_token_id: int = 13  # the tokenizer's "<dec>" (train_fusion_tokenizer gives it id 13)

    @model_validator(mode="after")
    def _check(self) -> Blip2PretrainConfig:
        if not self.qformer.text_input:
            raise ValueError("qformer.text_input must be True: stage 1 runs text through the Q-Former")
        n = self.vision.num_layers
        if not -n - 1 <= self.vision_feature_layer <= n:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} outside [{-n - 1}, {n}]")
        for name in ("pad_token_id", "dec_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} outside the vocabulary of {self.vocab_size}")
        if not TEMP_MIN <= self.temp_init <= TEMP_MAX:
            raise ValueError(f"temp_init {self.temp_init} outside [{TEMP_MIN}, {TEMP_MAX}]")
        return self

    @property
    def vision_layers_run(self) -> int:
        k = self.vision_feature_layer
        return k if k >= 0 else self.vision.num_layers + 1 + k

    @property
    def text_bert(self) -> BertConfig:
        """The BERT sizes of the text transformer (for the shared BERT prediction head)."""
        q = self.qformer
        return BertConfig(vocab_size=self.vocab_size, hidden_size=q.hidden_size, num_layers=q.num_layers,
                          num_heads=q.num_heads, intermediate_size=q.intermediate_size,
                          max_position_embeddings=self.max_position_embeddings, type_vocab_size=0,
                          layer_norm_eps=q.layer_norm_eps, act=q.act)


class QFormerTextEmbeddings(nn.Module):
    """word + position embeddings of the text (Hugging Face's Blip2TextEmbeddings); the LayerNorm
    is the Q-Former's own, applied to [queries; text] together."""

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """(B, L) → (B, L, E), positions 0..L-1."""
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {length} tokens exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}")
        positions = torch.arange(length, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]


class Blip2QFormerPretrain(QFormerBase):
    """ViT (frozen by the recipe) + Q-Former with ITC / ITG / ITM heads."""

    def __init__(self, cfg: Blip2PretrainConfig) -> None:
        super().__init__(cfg.qformer, cfg.vision.hidden_size)
        self.cfg = cfg
        e = cfg.qformer.hidden_size
        self.vision_model = VisionTransformer(cfg.vision)
        self.embeddings = QFormerTextEmbeddings(cfg.vocab_size, e, cfg.max_position_embeddings)
        self.vision_projection = nn.Linear(e, cfg.embed_dim)
        self.text_projection = nn.Linear(e, cfg.embed_dim)
        self.itm_head = ITMHead(e)
        self.cls = MLMHead(cfg.text_bert, self.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(cfg.temp_init))

    # ------------------------------------------------------------------ building blocks

    @property
    def num_queries(self) -> int:
        return self.qformer_cfg.num_queries

    def vision_tokens(self, images: Sequence[Tensor] | Tensor) -> VisionTokens:
        """The frozen ViT's tokens at the feature layer, every token kept."""
        out = self.vision_model(images, num_layers=self.cfg.vision_layers_run)
        return VisionTokens(out.hidden, out.grids, int(self.cfg.vision.class_token))

    def encode_images(
        self, images: Sequence[Tensor] | Tensor, image_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(image_embeds (N, S, E_v) after ln_vision, padding mask (N, S) or None).

        image_ids (N,), optional: rows with equal ids show the same image, which the ViT then
        encodes once (a caption batch holds each image once per caption)."""
        if image_ids is None:
            return self.image_inputs(self.vision_tokens(images))
        unique, inverse = torch.unique(image_ids, return_inverse=True)
        first = torch.full((unique.shape[0],), len(images), dtype=torch.long, device=image_ids.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(images), device=image_ids.device), "amin")
        embeds, mask = self.image_inputs(self.vision_tokens([images[i] for i in first.tolist()]))
        return embeds[inverse], None if mask is None else mask[inverse]

    def joint(
        self, mode: QFormerMode, image_embeds: Tensor, image_mask: Tensor | None, input_ids: Tensor,
        text_mask: Tensor,
    ) -> Tensor:
        """One Q-Former pass over [queries; text] with the mode's mask → (B, Q+L, E)."""
        b = input_ids.shape[0]
        embeds = torch.cat([self.query_tokens.expand(b, -1, -1), self.embeddings(input_ids)], dim=1)
        mask = qformer_attention_mask(mode, self.num_queries, text_mask)
        return self.qformer(embeds, num_queries=self.num_queries, attn_mask=mask, image_embeds=image_embeds,
                            image_mask=image_mask)

    def _itc_features(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """ITC-mode output (B, Q+L, E) → (image feats (B, Q, P), text feats (B, P)), unit norm."""
        q = self.num_queries
        image = F.normalize(self.vision_projection(hidden[:, :q]), dim=-1)
        text = F.normalize(self.text_projection(hidden[:, q]), dim=-1)
        return image, text

    def decoder_input_ids(self, input_ids: Tensor) -> Tensor:
        """ITG's input: the first token ([CLS], i.e. <s>) replaced by [DEC]."""
        dec = input_ids.clone()
        dec[:, 0] = self.cfg.dec_token_id
        return dec

    @staticmethod
    def query_max_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """image_feats (N, Q, P), text_feats (M, P) → (N, M): max over queries of q · t."""
        return torch.einsum("nqp,mp->nmq", image_feats, text_feats).amax(dim=-1)

    # ----------------------------------------------------------- fusion-model contract

    def pretrain_losses(self, batch: Any, objectives: dict[str, float], step: int) -> dict[str, Tensor]:
        """Unweighted losses of the asked objectives ("itc", "itg", "itm") on an ImageTextBatch."""
        del step  # no schedule inside the objectives
        unknown = set(objectives) - {"itc", "itg", "itm"}
        if unknown:
            raise ValueError(f"BLIP-2 stage 1 has no objective {sorted(unknown)}; allowed: itc, itg, itm")
        if not batch.has_images or not batch.has_text:
            raise ValueError("BLIP-2 stage 1 needs image-text batches")
        ids, text_mask = batch.input_ids, batch.attention_mask.bool()
        b = ids.shape[0]
        image_embeds, image_mask = self.encode_images(batch.images, batch.image_ids)
        same_image = batch.same_image()

        # ITC (also needed for ITM's negatives) and ITG rows share one batched call.
        want_itc = "itc" in objectives or "itm" in objectives
        modes: list[QFormerMode] = (["itc"] if want_itc else []) + (["itg"] if "itg" in objectives else [])
        rows = [ids if mode == "itc" else self.decoder_input_ids(ids) for mode in modes]
        k = len(modes)
        hidden = self.qformer(
            torch.cat([self.query_tokens.expand(k * b, -1, -1), self.embeddings(torch.cat(rows))], dim=1),
            num_queries=self.num_queries,
            attn_mask=torch.cat([qformer_attention_mask(m, self.num_queries, text_mask) for m in modes]),
            image_embeds=image_embeds.repeat(k, 1, 1),
            image_mask=None if image_mask is None else image_mask.repeat(k, 1),
        )
        out = dict(zip(modes, hidden.split(b), strict=True))
        losses: dict[str, Tensor] = {}
        if want_itc:
            image_feats, text_feats = self._itc_features(out["itc"])
            sim_i2t = self.query_max_similarity(image_feats, text_feats) / self.temp  # (B, B)
            sim_t2i = sim_i2t.t()
            if "itc" in objectives:
                targets = same_image.float() / same_image.sum(dim=1, keepdim=True)
                smooth = self.cfg.itc_label_smoothing
                losses["itc"] = 0.5 * (F.cross_entropy(sim_i2t, targets, label_smoothing=smooth)
                                       + F.cross_entropy(sim_t2i, targets, label_smoothing=smooth))
        if "itg" in objectives:
            text_hidden = out["itg"][:, self.num_queries:]
            targets = ids[:, 1:].masked_fill(~text_mask[:, 1:], IGNORE_INDEX)
            targets = torch.cat([targets, torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
            losses["itg"] = next_token_loss(text_hidden, self.cls, targets,
                                            label_smoothing=self.cfg.itg_label_smoothing)
        if "itm" in objectives:
            same_text = (ids[:, None, :] == ids[None, :, :]).all(dim=-1)
            negatives = sample_hard_negatives(sim_i2t.detach(), sim_t2i.detach(), same_pair=same_image | same_text)
            image_index, text_index, labels = itm_pair_indices(negatives)
            hidden_itm = self.joint(
                "itm", image_embeds[image_index], None if image_mask is None else image_mask[image_index],
                ids[text_index], text_mask[text_index],
            )
            logits = self.itm_head(hidden_itm[:, : self.num_queries]).mean(dim=1)  # (P, 2)
            losses["itm"] = itm_loss(logits, labels)
            with torch.no_grad():
                losses["itm_acc"] = (logits.argmax(-1) == labels).float().mean()
        return losses

    @torch.no_grad()
    def after_step(self) -> None:
        self.temp.clamp_(TEMP_MIN, TEMP_MAX)

    def image_features(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        """(N, Q, P) unit-norm ITC features, one per query (BLIP-2's image side of ITC)."""
        image_embeds, image_mask = self.encode_images(images)
        z = self.query_outputs(image_embeds, image_mask)
        return F.normalize(self.vision_projection(z), dim=-1)

    def image_embeddings(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        """(N, Q, P): BLIP-2 keeps one ITC feature per query; score texts with `similarity`."""
        return self.image_features(images)

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(M, P) unit-norm [CLS] feature of the text transformer run alone (the ITC text side)."""
        hidden = self.qformer(self.embeddings(input_ids), num_queries=0, key_padding_mask=attention_mask.bool())
        return F.normalize(self.text_projection(hidden[:, 0]), dim=-1)

    def similarity(self, image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
        """(N, Q, P) × (M, P) → (N, M) ITC scores: max over the queries."""
        return self.query_max_similarity(image_embeddings, text_embeddings)

    def _itm_hidden(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds, image_mask = self.encode_images(images)
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images for {input_ids.shape[0]} texts; ITM pairs image i with text i")
        return self.joint("itm", image_embeds, image_mask, input_ids, attention_mask.bool())

    def itm_logits(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) match logit of image i with text i: the query-averaged 2-way logits, match minus no-match."""
        logits = self.itm_head(self._itm_hidden(images, input_ids, attention_mask)[:, : self.num_queries]).mean(1)
        return logits[:, 1] - logits[:, 0]

    def fused_features(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, E): the mean of the query outputs in the bidirectional (ITM) pass."""
        return self._itm_hidden(images, input_ids, attention_mask)[:, : self.num_queries].mean(dim=1)

    @property
    def fused_width(self) -> int:
        return self.qformer_cfg.hidden_size
