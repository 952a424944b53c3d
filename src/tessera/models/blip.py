"""BLIP: the Multimodal mixture of Encoder-Decoder (MED) and its three pretraining objectives.

One ViT and ONE BERT-style text transformer (`text.bert.BertModel` with
`separate_decoder_attention`) serve three functionalities:

    unimodal text encoder       first token <s> ([CLS]), no cross-attention; its [CLS] state,
                                projected, is compared with the ViT's projected class token
                                (ITC, learnable temperature clamped to [0.001, 0.5]).
    image-grounded encoder      first token <enc> ([ENC]), bidirectional self-attention and
                                cross-attention to the image tokens; a linear ITM head on its
                                [ENC] state says match / no match (ITM with hard negatives drawn
                                from the ITC similarities, `objectives.itm`).
                                Rows of a batch that show the same image OR carry the very
                                same caption are matches: ITC spreads its target over them
                                and ITM never draws them as negatives (as ALBEF, ViLT, VLMo).
    image-grounded decoder      first token <dec> ([DEC]), CAUSAL self-attention with its own
                                weights (`decoder_attention`), the same cross-attention and
                                feed-forward as the encoder; next-token loss with label
                                smoothing 0.1 (captioning).

Encoder and decoder share every parameter except self-attention: the shared ones are the very
same Parameter objects (they live once, in `text_encoder`), so no tie has to be kept up.
Optionally (config `momentum`), ITC uses BLIP's momentum encoders (EMA copies of the ViT, the
text encoder and both projections), a queue of their past features with image ids, and
momentum distillation: targets α·softmax(momentum similarities) + (1 − α)·(same-image
targets; in the batch, same-caption ones too), α ramped up from 0.

Parameter names follow Hugging Face's BLIP (BlipForImageTextRetrieval / BlipForConditional-
Generation) where they exist: vision_model.*, text_encoder.* (BlipTextModel; the decoder's
`text_decoder.bert.*` is `text_encoder.parameters_for("decode")`), vision_proj, text_proj,
itm_head, and `cls.predictions.*` for the decoder's LM head (HF: text_decoder.cls.*; its output
matrix is the shared word embedding). `temp` and the momentum modules (vision_model_m,
vision_proj_m, text_encoder_m, text_proj_m, queue) follow the original BLIP code.

Shapes:
    B pairs in a batch (image i with text i)    L text tokens     V vocabulary
    N image tokens (class token + patches)      E_v ViT width     E text width
    P projection (ITC embedding) width          K queue size      P3 ≤ 3B ITM pairs
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.data.templates import IGNORE_INDEX
from tessera.models.vilt import LinearInit, same_pair_mask
from tessera.nn.attention import attention
from tessera.objectives.itm import ITMHead, itm_batch, itm_loss, sample_hard_negatives
from tessera.objectives.lm import next_token_loss
from tessera.objectives.mlm import MLMHead
from tessera.objectives.momentum import (
    FeatureQueue,
    alpha_ramp,
    distillation_targets,
    ema_update_,
    momentum_copy,
)
from tessera.text.bert import BertConfig, BertModel, feed_forward
from tessera.train.fusion_tasks import DEC_TOKEN, ENC_TOKEN
from tessera.vision.vit import VisionTransformer, ViTConfig, _pad_segments

if TYPE_CHECKING:
    from tessera.text.tokenizer import Tokenizer

OBJECTIVES: tuple[str, ...] = ("itc", "itm", "lm")

# BLIP's image tower: class token, biased patch embedding, no pre-norm, the final LayerNorm over
# every token (the cross-attention reads all of them), GELU.
BLIP_VISION = ViTConfig(
    pre_layernorm=False, patch_bias=True, post_layernorm_on="all_tokens", act="gelu", layer_norm_eps=1e-6,
)


class MomentumConfig(Config):
    """BLIP's momentum encoders for ITC: EMA rate, queue length, distillation weight α and the
    number of steps over which α ramps up from 0 (BLIP: the first epoch)."""

    momentum: float = 0.995
    queue_size: int = 57600
    alpha: float = 0.4
    alpha_ramp_steps: int = 0

    @model_validator(mode="after")
    def _ranges(self) -> MomentumConfig:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be ≥ 1, got {self.queue_size}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.alpha_ramp_steps < 0:
            raise ValueError(f"alpha_ramp_steps must be ≥ 0, got {self.alpha_ramp_steps}")
        return self


class BLIPConfig(Config):
    vision: ViTConfig = BLIP_VISION
    text: BertConfig  # needs cross_attention_layers = every layer and separate_decoder_attention
    embed_dim: int = 256  # ITC projection width
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    label_smoothing: float = 0.1
    momentum: MomentumConfig | None = None
    # Linear layers: "pytorch" keeps PyTorch's U(±1/√fan_in) (ALBEF's init; what a tiny model
    # trained from scratch needs: under N(0, 0.02) every [CLS] / [ENC] state is nearly the same
    # vector, ITC learns slowly and ITM not at all); "normal" is BERT's / BLIP's N(0, 0.02).
    linear_init: LinearInit = "pytorch"
    # Token ids (from the tokenizer): texts come as "<s> caption </s>" + padding.
    pad_id: int
    bos_id: int
    eos_id: int
    enc_id: int
    dec_id: int

    @model_validator(mode="after")
    def _consistent(self) -> BLIPConfig:
        t = self.text
        if not t.separate_decoder_attention:
            raise ValueError("text.separate_decoder_attention must be true: BLIP's decoder has its own self-attention")
        if tuple(sorted(t.cross_attention_layers)) != tuple(range(t.num_layers)):
            raise ValueError(
                f"text.cross_attention_layers must list every layer 0..{t.num_layers - 1} (BLIP cross-attends in "
                f"each), got {t.cross_attention_layers}"
            )
        if t.cross_attention_width != self.vision.hidden_size:
            raise ValueError(
                f"text.encoder_width {t.cross_attention_width} must equal vision.hidden_size {self.vision.hidden_size}"
            )
        if not self.vision.class_token:
            raise ValueError("vision.class_token must be true: ITC reads the ViT's class token")
        if self.vision.post_layernorm_on != "all_tokens":
            raise ValueError("vision.post_layernorm_on must be 'all_tokens': BLIP's ViT normalises every token")
        if not 0.0 < self.temp_min <= self.temp_init <= self.temp_max:
            raise ValueError(f"need 0 < temp_min ≤ temp_init ≤ temp_max, got {self.temp_min}, "
                             f"{self.temp_init}, {self.temp_max}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "enc_id": self.enc_id,
               "dec_id": self.dec_id}
        bad = {k: v for k, v in ids.items() if not 0 <= v < t.vocab_size}
        if bad:
            raise ValueError(f"token ids {bad} outside the vocabulary 0..{t.vocab_size - 1}")
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"token ids must be distinct, got {ids}")
        return self


def blip_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The config's token-id fields from a tokenizer that has <enc> and <dec>
    (train_fusion_tokenizer's FUSION_SPECIAL_TOKENS)."""
    return {"pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "enc_id": tokenizer.token_id(ENC_TOKEN), "dec_id": tokenizer.token_id(DEC_TOKEN)}


def soft_contrastive_loss(sim: Tensor, targets: Tensor) -> Tensor:
    """mean over rows of −Σ_j targets[i, j] · log softmax(sim[i])_j; sim and targets (B, C)."""
    return -(F.log_softmax(sim.float(), dim=1) * targets).sum(dim=1).mean()


def _init_weights(module: nn.Module, linear_init: LinearInit = "normal") -> None:
    """Embeddings N(0, 0.02) (PyTorch's N(0, 1) would give the tied LM head logits of size ~√E);
    linear weights N(0, 0.02) with zero biases as BERT / BLIP (linear_init "normal"), or left as
    PyTorch built them ("pytorch", see BLIPConfig.linear_init)."""
    if isinstance(module, nn.Linear):
        if linear_init == "normal":
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class BLIP(nn.Module):
    def __init__(self, cfg: BLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.text_encoder = BertModel(cfg.text)
        self.vision_proj = nn.Linear(cfg.vision.hidden_size, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim)
        self.itm_head = ITMHead(cfg.text.hidden_size)
        # The decoder's LM head; its output matrix IS the shared word embedding.
        self.cls = MLMHead(cfg.text, self.text_encoder.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(cfg.temp_init))
        self.apply(lambda m: _init_weights(m, cfg.linear_init))
        if cfg.momentum is not None:
            self.vision_model_m = momentum_copy(self.vision_model)
            self.vision_proj_m = momentum_copy(self.vision_proj)
            self.text_encoder_m = momentum_copy(self.text_encoder)
            self.text_proj_m = momentum_copy(self.text_proj)
            self.queue = FeatureQueue(cfg.momentum.queue_size, {"image": cfg.embed_dim, "text": cfg.embed_dim},
                                      ids=("idx",))
        self.tokenizer: Tokenizer | None = None  # attached by loaders; caption() decodes with it

    # --- towers -------------------------------------------------------------------------------

    @property
    def fused_width(self) -> int:
        return self.cfg.text.hidden_size

    @property
    def momentum_modules(self) -> tuple[str, ...]:
        """Names of the EMA copies; they never train (a stage's trainable list leaves them out)."""
        return ("vision_model_m", "vision_proj_m", "text_encoder_m", "text_proj_m") if self.cfg.momentum else ()

    @staticmethod
    def _image_tokens(vit: VisionTransformer, images: Sequence[Tensor] | Tensor) -> tuple[Tensor, Tensor | None]:
        out = vit(images)
        return _pad_segments(vit.last_hidden_state(out), out.cu_seqlens)

    def encode_images(self, images: Sequence[Tensor] | Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, N, E_v) image tokens (class token first, post-normed) and a (B, N) real-token mask,
        None when every image has the same size."""
        return self._image_tokens(self.vision_model, images)

    def _check_text(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                             "must both be (B, L)")
        if input_ids.shape[1] == 0 or not bool((input_ids[:, 0] == self.cfg.bos_id).all()):
            raise ValueError(f"every text must start with <s> (id {self.cfg.bos_id}): texts are '<s> caption </s>'")

    def _with_first_token(self, input_ids: Tensor, token_id: int) -> Tensor:
        ids = input_ids.clone()
        ids[:, 0] = token_id
        return ids

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unimodal text encoder: (B, L, E), first token <s> ([CLS]), no cross-attention."""
        self._check_text(input_ids, attention_mask)
        return self.text_encoder(input_ids, attention_mask=attention_mask.bool())

    def image_embeddings(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        """(N, P) unit-norm ITC embeddings of the images."""
        tokens, _ = self.encode_images(images)
        return F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(M, P) unit-norm ITC embeddings of "<s> caption </s>" texts."""
        return F.normalize(self.text_proj(self.text_features(input_ids, attention_mask)[:, 0]), dim=-1)

    def grounded_encoder(
        self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor, image_mask: Tensor | None
    ) -> Tensor:
        """Image-grounded text encoder on texts that start with <s>: (B, L, E); <enc> replaces <s>."""
        self._check_text(input_ids, attention_mask)
        return self.text_encoder(
            self._with_first_token(input_ids, self.cfg.enc_id), attention_mask=attention_mask.bool(),
            encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask,
        )

    def grounded_decoder(
        self, input_ids: Tensor, attention_mask: Tensor | None, image_tokens: Tensor, image_mask: Tensor | None
    ) -> Tensor:
        """Image-grounded text decoder (causal, its own self-attention) on ids that already start
        with <dec>: (B, L, E)."""
        return self.text_encoder(
            input_ids, attention_mask=None if attention_mask is None else attention_mask.bool(), causal=True,
            encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask,
        )

    # --- the fusion-model contract -----------------------------------------------------------

    def _paired_image_tokens(self, images: Sequence[Tensor] | Tensor, rows: int) -> tuple[Tensor, Tensor | None]:
        """Image tokens for `rows` texts; one image object repeated for every text (re-ranking
        scores one image against many texts) runs through the ViT once."""
        if len(images) != rows:
            raise ValueError(f"{len(images)} images for {rows} texts")
        if not isinstance(images, Tensor) and rows > 1 and all(img is images[0] for img in images):
            tokens, mask = self.encode_images([images[0]])
            return tokens.expand(rows, -1, -1), None
        return self.encode_images(images)

    def fused_features(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, E): the image-grounded encoder's [ENC] state, image i with text i."""
        tokens, mask = self._paired_image_tokens(images, input_ids.shape[0])
        return self.grounded_encoder(input_ids, attention_mask, tokens, mask)[:, 0]

    def itm_logits(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) match log-odds of image i with text i: logit(match) − logit(no match), so that its
        sigmoid is the ITM head's softmax probability of a match."""
        logits = self.itm_head(self.fused_features(images, input_ids, attention_mask)).float()
        return logits[:, 1] - logits[:, 0]

    def itm_logits_from_tokens(
        self, image_tokens: Tensor, image_mask: Tensor | None, input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """itm_logits for image tokens already encoded (re-ranking and CapFilt score one image
        against many texts without re-running the ViT)."""
        logits = self.itm_head(self.grounded_encoder(input_ids, attention_mask, image_tokens, image_mask)[:, 0])
        return (logits[:, 1] - logits[:, 0]).float()

    def lm_targets(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) next-token targets of the decoder: position t predicts token t+1 ("caption
        </s>"), -100 at padding and at the last position."""
        targets = torch.full_like(input_ids, IGNORE_INDEX)
        targets[:, :-1] = input_ids[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), IGNORE_INDEX)
        return targets

    def pretrain_losses(self, batch: Any, objectives: dict[str, float], step: int) -> dict[str, Tensor]:
        """Unweighted losses of the objectives asked for ("itc", "itm", "lm"); `batch` is an
        ImageTextBatch (images, input_ids, attention_mask, image_ids)."""
        unknown = sorted(set(objectives) - set(OBJECTIVES))
        if unknown or not objectives:
            raise ValueError(f"BLIP has no objective {unknown or '(none asked)'}; allowed: {list(OBJECTIVES)}")
        ids, mask = batch.input_ids, batch.attention_mask.bool()
        self._check_text(ids, mask)
        image_ids = batch.image_ids.to(ids.device)
        tokens, image_mask = self.encode_images(batch.images)
        if tokens.shape[0] != ids.shape[0]:
            raise ValueError(f"batch has {tokens.shape[0]} images for {ids.shape[0]} texts")
        losses: dict[str, Tensor] = {}
        # (B, B): rows i and j show the same image or carry the very same caption (ShapesWorld's
        # captions repeat across images, as web alt-texts do). Such a pair is a match: ITC
        # spreads its target over it and ITM never draws it as a negative.
        same = same_pair_mask(image_ids, ids, mask)
        if "itc" in objectives or "itm" in objectives:
            image_feat = F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)
            text_feat = F.normalize(self.text_proj(self.text_features(ids, mask)[:, 0]), dim=-1)
            sim_i2t = image_feat @ text_feat.t() / self.temp
            if "itc" in objectives:
                losses["itc"] = self._itc_loss(batch.images, ids, mask, image_ids, same, image_feat, text_feat, step)
            if "itm" in objectives:
                negatives = sample_hard_negatives(sim_i2t, sim_i2t.t(), same_pair=same)
                pairs = itm_batch(tokens, ids, mask, negatives, image_mask)
                fused = self.grounded_encoder(pairs.text, pairs.text_mask, pairs.image_embeds, pairs.image_mask)
                losses["itm"] = itm_loss(self.itm_head(fused[:, 0]), pairs.labels)
        if "lm" in objectives:
            hidden = self.grounded_decoder(self._with_first_token(ids, self.cfg.dec_id), mask, tokens, image_mask)
            losses["lm"] = next_token_loss(hidden, self.cls, self.lm_targets(ids, mask),
                                           label_smoothing=self.cfg.label_smoothing)
        return losses

    def _itc_loss(self, images: Any, ids: Tensor, mask: Tensor, image_ids: Tensor, same: Tensor,
                  image_feat: Tensor, text_feat: Tensor, step: int) -> Tensor:
        """In-batch ITC with targets spread over every pair of the same image or the same caption
        (`same`, (B, B) bool); with momentum, BLIP's version against the momentum features of the
        batch and the queue (queued candidates are positives by image id)."""
        if self.cfg.momentum is None:
            targets = same.float() / same.float().sum(dim=1, keepdim=True)
            sim_i2t = image_feat @ text_feat.t() / self.temp
            return 0.5 * (soft_contrastive_loss(sim_i2t, targets) + soft_contrastive_loss(sim_i2t.t(), targets.t()))
        m = self.cfg.momentum
        with torch.no_grad():
            tokens_m, _ = self._image_tokens(self.vision_model_m, images)
            image_feat_m = F.normalize(self.vision_proj_m(tokens_m[:, 0]), dim=-1)
            text_m = self.text_encoder_m(ids, attention_mask=mask)
            text_feat_m = F.normalize(self.text_proj_m(text_m[:, 0]), dim=-1)
            image_all = torch.cat([image_feat_m, self.queue.get("image").to(image_feat_m.dtype)])  # (B+K', P)
            text_all = torch.cat([text_feat_m, self.queue.get("text").to(text_feat_m.dtype)])
            idx_all = torch.cat([image_ids, self.queue.get("idx")])
            positives = image_ids[:, None] == idx_all[None, :]  # (B, B+K')
            positives[:, : same.shape[1]] |= same
            positives = positives.float()
            hard = positives / positives.sum(dim=1, keepdim=True)
            alpha = alpha_ramp(step, m.alpha_ramp_steps, m.alpha)
            targets_i2t = distillation_targets(image_feat_m @ text_all.t() / self.temp, hard, alpha)
            targets_t2i = distillation_targets(text_feat_m @ image_all.t() / self.temp, hard, alpha)
        sim_i2t = image_feat @ text_all.t() / self.temp
        sim_t2i = text_feat @ image_all.t() / self.temp
        loss = 0.5 * (soft_contrastive_loss(sim_i2t, targets_i2t) + soft_contrastive_loss(sim_t2i, targets_t2i))
        if self.training:
            self.queue.enqueue(image=image_feat_m, text=text_feat_m, idx=image_ids)
        return loss

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the temperature to [temp_min, temp_max]; move the momentum encoders (EMA)."""
        self.temp.clamp_(self.cfg.temp_min, self.cfg.temp_max)
        if self.cfg.momentum is not None:
            for name in ("vision_model", "vision_proj", "text_encoder", "text_proj"):
                ema_update_(getattr(self, name + "_m"), getattr(self, name), self.cfg.momentum.momentum)

    # --- captioning ---------------------------------------------------------------------------

    @torch.no_grad()
    def caption_ids(
        self, images: Sequence[Tensor] | Tensor, max_new_tokens: int = 30, use_cache: bool = True
    ) -> list[list[int]]:
        """Greedy captions as token ids (the closing </s> left out), one list per image.

        With `use_cache` each step feeds only the newest token, reading the earlier tokens'
        decoder keys / values and the image's cross-attention keys / values from a cache;
        without it every step re-runs the decoder over the whole prefix (the reference the
        cache is tested against). Finished rows are padded and no longer change.
        """
        tokens, image_mask = self.encode_images(images)
        return greedy_decode(self.text_encoder, self.cls, tokens, image_mask, self.cfg, max_new_tokens, use_cache)

    def answer_model(self) -> BLIPVQA:
        """A BLIPVQA over a copy of this model's weights (this model is not changed)."""
        return BLIPVQA(copy.deepcopy(self))

    def caption(self, images: Sequence[Tensor] | Tensor, max_new_tokens: int = 30,
                tokenizer: Tokenizer | None = None) -> list[str]:
        """Greedy captions, decoded with `tokenizer` or the attached one (`self.tokenizer`)."""
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise ValueError("caption() needs a tokenizer: pass one or attach it as model.tokenizer")
        return [tok.decode(row).strip() for row in self.caption_ids(images, max_new_tokens)]


def greedy_decode(
    bert: BertModel, head: nn.Module, states: Tensor, states_mask: Tensor | None, cfg: BLIPConfig,
    max_new_tokens: int, use_cache: bool = True,
) -> list[list[int]]:
    """Greedy decoding from <dec> by `bert` in decoder mode, cross-attending to `states` (B, N, E_v)
    (image tokens for captions, question states for BLIPVQA's answers), through the LM `head`:
    token ids per row, the closing </s> left out.

    With `use_cache` each step feeds only the newest token, reading the earlier tokens' decoder
    keys / values and the states' cross-attention keys / values from a cache; without it every
    step re-runs the decoder over the whole prefix (the reference the cache is tested against).
    Finished rows are padded and no longer change.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    steps = min(max_new_tokens, bert.cfg.max_position_embeddings - 1)
    b = states.shape[0]
    ids = torch.full((b, 1), cfg.dec_id, dtype=torch.long, device=states.device)
    done = torch.zeros(b, dtype=torch.bool, device=states.device)
    # Never emit the control tokens; </s> ends a text.
    banned = [cfg.pad_id, cfg.bos_id, cfg.enc_id, cfg.dec_id]
    cache = _DecoderCache(bert, states, states_mask) if use_cache else None
    for _ in range(steps):
        if cache is None:
            last = bert(ids, attention_mask=None, causal=True, encoder_hidden_states=states,
                        encoder_attention_mask=states_mask)[:, -1]
        else:
            last = cache.step(ids[:, -1:])[:, 0]
        logits = head(last).float()
        logits[:, banned] = float("-inf")
        nxt = logits.argmax(dim=-1).masked_fill(done, cfg.pad_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == cfg.eos_id
        if bool(done.all()):
            break
    out: list[list[int]] = []
    for row in ids[:, 1:].tolist():
        out.append(row[: row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    return out


class BLIPVQA(nn.Module):
    """BLIP's VQA model (Li et al. 2022, section 5.3): the image-grounded encoder reads the
    question with the image ([ENC] first); an answer decoder, a copy of the pretrained
    image-grounded decoder (its self-attention, cross-attention, feed-forward and LM head, with
    weights of its own from then on), cross-attends to the question encoder's states, not to the
    image, and writes "<dec> answer </s>".

    Training: each question's distinct answers, each weighted by its VQA accuracy among the
    annotators' answers; loss = Σ weight · (summed token cross-entropy of the answer) / questions,
    as BLIP. Inference: `rank` scores candidate answers (an answer list) by their log-likelihood,
    `generate` writes one greedily (open-ended).

    Shapes: B questions, Lq question tokens, R answer rows (R ≥ B: a question's answers), La
    answer tokens, C candidate answers, E text width (= the ViT's width: the decoder's
    cross-attention reads the question states where it read image tokens).
    """

    def __init__(self, blip: BLIP) -> None:
        """`blip` becomes the question encoder (it is trained in place: pass a copy to keep it)."""
        super().__init__()
        if blip.cfg.text.hidden_size != blip.cfg.vision.hidden_size:
            raise ValueError(f"the answer decoder cross-attends to question states of width {blip.cfg.text.hidden_size} "
                             f"where it read image tokens of width {blip.cfg.vision.hidden_size}: they must be equal")
        self.blip = blip
        # One deepcopy call keeps the LM head's output matrix tied to the copied word embeddings.
        self.answer_decoder, self.answer_head = copy.deepcopy((blip.text_encoder, blip.cls))

    @property
    def cfg(self) -> BLIPConfig:
        return self.blip.cfg

    def question_states(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor,
                        attention_mask: Tensor) -> Tensor:
        """(B, Lq, E): the image-grounded encoder over "<s> question </s>" (<enc> replaces <s>)."""
        tokens, mask = self.blip.encode_images(images)
        return self.blip.grounded_encoder(input_ids, attention_mask, tokens, mask)

    def _answer_log_likelihoods(self, states: Tensor, question_mask: Tensor, answer_ids: Tensor,
                                answer_mask: Tensor) -> Tensor:
        """(R,) summed log-probabilities of each answer row's tokens after <dec> (</s> included),
        row r reading states[r]."""
        ids = self.blip._with_first_token(answer_ids, self.cfg.dec_id)
        hidden = self.answer_decoder(ids, attention_mask=answer_mask.bool(), causal=True,
                                     encoder_hidden_states=states, encoder_attention_mask=question_mask.bool())
        logp = self.answer_head(hidden[:, :-1]).float().log_softmax(-1)
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        return (token_logp * answer_mask[:, 1:].to(token_logp.dtype)).sum(1)

    def loss(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor,
             answer_ids: Tensor, answer_mask: Tensor, answer_question: Tensor, answer_weights: Tensor) -> Tensor:
        """answer_ids / answer_mask (R, La) "<s> answer </s>" rows; answer_question (R,) the
        question each row answers; answer_weights (R,) its weight."""
        states = self.question_states(images, input_ids, attention_mask)
        nll = -self._answer_log_likelihoods(states[answer_question], attention_mask[answer_question],
                                            answer_ids, answer_mask)
        return (answer_weights.to(nll.dtype) * nll).sum() / input_ids.shape[0]

    @torch.no_grad()
    def rank(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor,
             candidate_ids: Tensor, candidate_mask: Tensor) -> Tensor:
        """(B, C) log-likelihood of every candidate answer (rows "<s> answer </s>") per question."""
        states = self.question_states(images, input_ids, attention_mask)
        b, c = states.shape[0], candidate_ids.shape[0]
        rows = torch.arange(b, device=states.device).repeat_interleave(c)
        scores = self._answer_log_likelihoods(states[rows], attention_mask[rows], candidate_ids.repeat(b, 1),
                                              candidate_mask.repeat(b, 1))
        return scores.view(b, c)

    @torch.no_grad()
    def generate(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor,
                 max_new_tokens: int = 8) -> list[list[int]]:
        """Greedy answers as token ids (</s> left out), one list per question."""
        states = self.question_states(images, input_ids, attention_mask)
        return greedy_decode(self.answer_decoder, self.answer_head, states, attention_mask.bool(), self.cfg,
                             max_new_tokens)


class _DecoderCache:
    """Incremental decoding through BertModel's decoder mode, one new token per step.

    It runs the same submodules BertLayer.forward runs in causal mode (decoder_attention,
    crossattention, the feed-forward), keeping each layer's self-attention keys / values of the
    tokens so far and computing the image's cross-attention keys / values once. A causal layer
    sees exactly the earlier tokens, which is what the cache holds, so the result equals a full
    causal forward over the prefix (tests check that).
    """

    def __init__(self, bert: BertModel, image_tokens: Tensor, image_mask: Tensor | None) -> None:
        """`image_tokens` (B, N, E_v): whatever the decoder cross-attends to (image tokens, question states)."""
        if bert.cfg.modality_experts:
            raise ValueError("the decoder cache supports no modality experts")
        self.bert, self.image_mask, self.length = bert, image_mask, 0
        self.keys: list[Tensor | None] = [None] * bert.cfg.num_layers
        self.values: list[Tensor | None] = [None] * bert.cfg.num_layers
        self.cross = [
            (self._heads(layer.crossattention.self.key(image_tokens)),
             self._heads(layer.crossattention.self.value(image_tokens)))
            for layer in bert.encoder.layer
        ]

    def _heads(self, x: Tensor) -> Tensor:
        """(B, T, E) → (B, H, T, D)."""
        h = self.bert.cfg.num_heads
        return x.view(x.shape[0], x.shape[1], h, x.shape[2] // h).transpose(1, 2)

    @staticmethod
    def _merge(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    def step(self, new_ids: Tensor) -> Tensor:
        """new_ids (B, T) at the next positions → their decoder outputs (B, T, E)."""
        t = new_ids.shape[1]
        positions = torch.arange(self.length, self.length + t, device=new_ids.device)[None]
        x = self.bert.embeddings(new_ids, position_ids=positions)
        for i, layer in enumerate(self.bert.encoder.layer):
            block = layer.decoder_attention
            q = self._heads(block.self.query(x))
            k, v = self._heads(block.self.key(x)), self._heads(block.self.value(x))
            if self.keys[i] is not None:
                k, v = torch.cat([self.keys[i], k], dim=2), torch.cat([self.values[i], v], dim=2)
            self.keys[i], self.values[i] = k, v
            x = block.output(self._merge(attention(q, k, v, causal=True)), x)
            cross = layer.crossattention
            ck, cv = self.cross[i]
            q = self._heads(cross.self.query(x))
            x = cross.output(self._merge(attention(q, ck, cv, causal=False, key_padding_mask=self.image_mask)), x)
            x = feed_forward(layer.intermediate, layer.output, x)
        self.length += t
        return x
