"""ViLT: one transformer over word embeddings and linear patch embeddings, no image encoder.

A caption's word embeddings (BERT-style: word + position + segment, LayerNorm) and the image's
linear patch embeddings (ViT-style: a stride-p convolution, a class token and learned positions)
each get a modality-type embedding (0 text, 1 image; 2 the second image of a pair, as in ViLT's
NLVR2 "pair" setting) and are concatenated, text first, into ONE pre-LayerNorm transformer
initialised from nothing. The pooled first token ([CLS], i.e. "<s>") feeds the ITM head and
the downstream heads; the text positions feed the MLM head. Pretraining objectives:
    itm   match / no match over B positives and 2B negatives drawn at random (ViLT has no ITC
          to mine hard ones from), never a row of the same image or the same caption;
    wpa   ViLT's word-patch alignment, read from the ITM pass: the optimal-transport distance
          (IPOT, cosine cost) between the caption's word states and the image's patch states,
          pulled down for matched pairs and up for mismatched ones (ViLT weights it 0.1);
    mlm   whole-word masking: every token of a word masked together
          (`word_starts_from_tokenizer` says where the words of a byte-level BPE, WordPiece or
          SentencePiece vocabulary begin).

Fusion-model contract (see train/fusion_tasks.py): `pretrain_losses`, `itm_logits`,
`fused_features`, `fused_width`; no ITC embeddings.

Parameter names follow Hugging Face's ViltForMaskedLM: vilt.embeddings.{text_embeddings.
{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}, cls_token,
patch_embeddings.projection, position_embeddings, token_type_embeddings},
vilt.encoder.layer.N.{layernorm_before, attention.attention.{query,key,value},
attention.output.dense, layernorm_after, intermediate.dense, output.dense}, vilt.layernorm,
vilt.pooler.dense, mlm_score.{transform.{dense, LayerNorm}, decoder (tied to the word
embeddings), bias}. Tessera adds itm_score (ITM head, 2 logits) and the buffer word_starts.

Shapes:
    B batch   L text tokens   N image tokens (1 + patches)   S = L + N   E hidden size
    V vocabulary   p patch size   P_i patches of image i = (H_i / p) * (W_i / p)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import tokenizers
import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.nn.layers import Activation
from tessera.objectives.itm import ITMHead, itm_loss, itm_pair_indices, sample_hard_negatives
from tessera.objectives.mlm import MLMPredictions, mask_tokens, mlm_loss
from tessera.text.bert import BertConfig, BertEmbeddings, BertIntermediate, BertSelfAttention

TEXT_TYPE, IMAGE_TYPE = 0, 1
# How Linear / Conv2d weights start (see init_weights): "normal" N(0, initializer_range) as BERT,
# ViT and Hugging Face do; "pytorch" PyTorch's own default, U(±1/√fan_in).
LinearInit = Literal["normal", "pytorch"]
_MASK_REDRAWS = 20  # a tiny batch may select no word at all; draw again a few times


class ViltConfig(Config):
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    act: Activation = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 40  # text positions
    type_vocab_size: int = 2  # BERT segment ids of the text; ViLT keeps BERT's two
    modality_type_vocab_size: int = 2  # 0 text, 1 image (3 for NLVR2's second image)
    image_size: int = 64  # the square grid the position table is learned for
    patch_size: int = 8
    num_channels: int = 3
    initializer_range: float = 0.02
    # "pytorch" for a tiny model trained from scratch: with N(0, 0.02) the attention and FFN
    # outputs are so small at width 128 that the [CLS] state hardly depends on the image or the
    # text, ITM sits at its label prior and never leaves it (ALBEF's init makes the same
    # choice). "normal" (BERT / ViT) for the published sizes, which start from imported weights.
    linear_init: LinearInit = "pytorch"
    # MLM: the tokenizer's "<mask>" id and the ids never masked (special tokens).
    mask_token_id: int | None = None
    special_token_ids: tuple[int, ...] = (0, 1, 2, 3, 4)  # Tessera's <pad> <unk> <s> </s> <image>
    mlm_probability: float = 0.15
    whole_word_masking: bool = True

    @model_validator(mode="after")
    def _check(self) -> ViltConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside the vocabulary 0..{self.vocab_size - 1}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.modality_type_vocab_size < 2:
            raise ValueError("modality_type_vocab_size must be at least 2 (text and image)")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def text_config(self) -> BertConfig:
        """The BERT sizes of the text embeddings and the MLM head."""
        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=1, num_heads=self.num_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps, act=self.act,
        )


# ------------------------------------------------------------------ helpers shared with VLMo


def as_image_list(images: Sequence[Tensor] | Tensor, num_channels: int = 3) -> list[Tensor]:
    """A (B, 3, H, W) tensor or a list of (3, H_i, W_i) tensors → a list; errors name the image."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be (B, {num_channels}, H, W) or a list of ({num_channels}, H, W), "
                             f"got shape {tuple(images.shape)}")
        images = list(images.unbind(0))
    images = list(images)
    if not images:
        raise ValueError("no images given")
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != num_channels:
            raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected ({num_channels}, H, W)")
    return images


def embed_image_list(images: list[Tensor], embed: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor | None]:
    """Embed images of any sizes: `embed` maps (n, 3, H, W) of one size to (n, N_HW, E).

    Images of one size run as one batch; mixed sizes are embedded per size and right-padded to
    the longest. Returns tokens (B, N_max, E) and a key mask (B, N_max), True = real token, or
    None when nothing was padded.
    """
    sizes = [tuple(img.shape[-2:]) for img in images]
    if len(set(sizes)) == 1:
        return embed(torch.stack(images)), None
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(size, []).append(i)
    pieces = {size: embed(torch.stack([images[i] for i in idx])) for size, idx in groups.items()}
    longest = max(p.shape[1] for p in pieces.values())
    first = next(iter(pieces.values()))
    out = first.new_zeros(len(images), longest, first.shape[-1])
    mask = torch.zeros(len(images), longest, dtype=torch.bool, device=first.device)
    for size, idx in groups.items():
        rows = torch.tensor(idx, device=first.device)
        n = pieces[size].shape[1]
        out[rows, :n] = pieces[size]
        mask[rows, :n] = True
    return out, mask


def same_pair_mask(image_ids: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, B) bool: pair (i, j) would not be a true negative, because row j's image is row i's
    (same image id) or row j's text is row i's (identical tokens). The diagonal is True."""
    same_image = image_ids[:, None] == image_ids[None, :]
    ids = input_ids.masked_fill(~attention_mask.bool(), -1)
    same_text = (ids[:, None, :] == ids[None, :, :]).all(-1)
    return same_image | same_text


def word_starts_from_tokenizer(tokenizer: Any) -> Tensor:
    """(V,) bool: True where a vocabulary token begins a word, for whole-word masking.

    A word is the run of tokens between spaces. Byte-level BPE marks a leading space with "Ġ"
    and SentencePiece with "▁"; WordPiece marks a continuation with "##". Special tokens are
    never masked, so their entry does not matter. Accepts a Tessera Tokenizer or a
    `tokenizers.Tokenizer`.
    """
    backend: tokenizers.Tokenizer = getattr(tokenizer, "backend", tokenizer)
    vocab = backend.get_vocab(with_added_tokens=True)
    size = backend.get_vocab_size(with_added_tokens=True)
    starts = torch.zeros(size, dtype=torch.bool)
    wordpiece = isinstance(backend.model, tokenizers.models.WordPiece)
    for token, index in vocab.items():
        starts[index] = not token.startswith("##") if wordpiece else token.startswith(("Ġ", "▁"))
    return starts


def whole_word_ids(input_ids: Tensor, maskable: Tensor, word_starts: Tensor) -> Tensor:
    """(B, L) word index of each maskable token, -1 elsewhere. A new word begins at a token that
    starts one in the vocabulary (`word_starts`, (V,) bool) or follows a non-maskable token
    (the first caption token after "<s>" carries no space marker)."""
    previous_maskable = F.pad(maskable[:, :-1], (1, 0), value=False)
    begins = maskable & (word_starts[input_ids] | ~previous_maskable)
    ids = begins.long().cumsum(1) - 1
    return torch.where(maskable, ids, torch.full_like(ids, -1))


def mask_text_for_mlm(
    input_ids: Tensor, attention_mask: Tensor, *, mask_token_id: int | None, special_token_ids: Sequence[int],
    vocab_size: int, prob: float, word_starts: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """BERT masking of the caption tokens (never padding or special tokens), all tokens of a word
    together when `word_starts` is given. Draws again while nothing is selected, so the loss
    always has a target. Returns (masked ids, labels with -100 where not selected)."""
    if mask_token_id is None:
        raise ValueError("MLM needs the tokenizer's '<mask>' id: set mask_token_id in the model config")
    special = ~attention_mask.bool() | torch.isin(input_ids, torch.tensor(list(special_token_ids),
                                                                          device=input_ids.device))
    special = special | (input_ids == mask_token_id)
    if bool(special.all()):
        raise ValueError("MLM batch has no maskable token: every position is padding or a special token")
    word_ids = None if word_starts is None else whole_word_ids(input_ids, ~special, word_starts)
    for _ in range(_MASK_REDRAWS):
        masked, labels = mask_tokens(input_ids, special, vocab_size, mask_token_id, prob, whole_word_ids=word_ids)
        if bool((labels != -100).any()):
            return masked, labels
    raise ValueError(f"MLM selected no token in {_MASK_REDRAWS} draws (batch of {input_ids.shape[0]} rows)")


def check_objectives(objectives: dict[str, float], allowed: set[str], model: str) -> None:
    unknown = sorted(set(objectives) - allowed)
    if unknown:
        raise ValueError(f"{model} has no objective {unknown}; allowed: {sorted(allowed)}")


def init_weights(module: nn.Module, std: float, linear_init: LinearInit = "normal") -> None:
    """Embeddings normal(0, std), unit LayerNorm gains and zero shifts; Linear and Conv2d layers
    normal(0, std) with zero biases (linear_init "normal": BERT / ViT), or left as PyTorch built
    them (linear_init "pytorch": U(±1/√fan_in), as ALBEF's init). Embeddings stay N(0, std)
    either way: PyTorch's N(0, 1) would give a tied MLM head logits of size ~√E."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        if linear_init == "normal":
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def ipot_plan(cost: Tensor, x_mask: Tensor, y_mask: Tensor, beta: float = 0.5, iterations: int = 50) -> Tensor:
    """Transport plans (B, M, N) between uniform distributions over the real positions of x
    (x_mask (B, M)) and of y (y_mask (B, N)) under `cost` (B, M, N), by the inexact proximal
    point method (IPOT, Xie et al. 2019, one inner Sinkhorn step per iteration, as ViLT runs it):
    T ← diag(a) (exp(−C/β) ⊙ T) diag(b), with a, b rescaling rows and columns to the marginals.
    Padded positions carry no mass."""
    joint = x_mask[:, :, None] & y_mask[:, None, :]
    mu = x_mask.to(cost.dtype) / x_mask.sum(1, keepdim=True).clamp(min=1)  # (B, M) row marginals
    nu = y_mask.to(cost.dtype) / y_mask.sum(1, keepdim=True).clamp(min=1)  # (B, N) column marginals
    kernel = torch.exp(-cost / beta) * joint
    plan = joint.to(cost.dtype)
    col = torch.ones_like(nu)
    for _ in range(iterations):
        q = kernel * plan
        row = mu / (q @ col[:, :, None]).squeeze(-1).clamp(min=1e-30)
        col = nu / (q.transpose(1, 2) @ row[:, :, None]).squeeze(-1).clamp(min=1e-30)
        plan = row[:, :, None] * q * col[:, None, :]
    return plan


def optimal_transport_distance(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor) -> Tensor:
    """(B,) OT distances between the token sets x (B, M, E) and y (B, N, E) (real positions per
    mask) under the cosine cost 1 − cos(x_i, y_j); the plan is a constant (IPOT, no gradient),
    the cost carries the gradient, as in ViLT's word-patch alignment."""
    cost = 1.0 - F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).transpose(1, 2)
    plan = ipot_plan(cost.detach(), x_mask.bool(), y_mask.bool())
    return (cost * plan).sum(dim=(1, 2))


# ------------------------------------------------------------------ the model


class ViltPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                    stride=cfg.patch_size)

    def forward(self, pixels: Tensor) -> Tensor:
        """(n, 3, H, W) → (n, E, H / p, W / p)."""
        return self.projection(pixels.to(self.projection.weight.dtype))


class ViltEmbeddings(nn.Module):
    """Text embeddings and patch embeddings, each plus its modality-type embedding."""

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_embeddings = BertEmbeddings(cfg.text_config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embeddings = ViltPatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, cfg.hidden_size))
        self.token_type_embeddings = nn.Embedding(cfg.modality_type_vocab_size, cfg.hidden_size)

    def positions(self, rows: int, cols: int) -> Tensor:
        """(1 + rows·cols, E): the learned table, bilinearly resized (align_corners, as ViLT and
        Hugging Face do) for a grid other than the square one it was learned for."""
        table = self.position_embeddings[0]
        g = self.cfg.grid
        if (rows, cols) == (g, g):
            return table
        grid = table[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=True)
        return torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(rows * cols, -1)])

    def _embed_same_size(self, pixels: Tensor) -> Tensor:
        x = self.patch_embeddings(pixels)  # (n, E, h, w)
        rows, cols = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        return x + self.positions(rows, cols)

    def image_tokens(self, images: Sequence[Tensor] | Tensor, modality_type: int = IMAGE_TYPE
                     ) -> tuple[Tensor, Tensor | None]:
        """(B, N, E) image tokens with their modality type, and their mask (None: no padding)."""
        p = self.cfg.patch_size
        images = as_image_list(images, self.cfg.num_channels)
        for i, img in enumerate(images):
            if img.shape[1] % p or img.shape[2] % p:
                raise ValueError(f"image {i} of size {img.shape[1]}x{img.shape[2]} is not a multiple of "
                                 f"the patch size {p}")
        x, mask = embed_image_list(images, self._embed_same_size)
        return x + self.token_type_embeddings.weight[modality_type], mask

    def text_tokens(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """(B, L, E) word embeddings with their modality type."""
        return self.text_embeddings(input_ids, token_type_ids=token_type_ids) + self.token_type_embeddings.weight[
            TEXT_TYPE]


class ViltSelfOutput(nn.Module):
    """The attention's output projection; ViltLayer adds the residual (pre-LN)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class ViltAttention(nn.Module):
    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(cfg.hidden_size, cfg.hidden_size, cfg.num_heads)
        self.output = ViltSelfOutput(cfg.hidden_size)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return self.output(self.attention(x, key_padding_mask=key_padding_mask))


class ViltOutput(nn.Module):
    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class ViltLayer(nn.Module):
    """x + attention(layernorm_before(x)); x + output(intermediate(layernorm_after(x)))."""

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = ViltAttention(cfg)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = BertIntermediate(cfg.hidden_size, cfg.intermediate_size, cfg.act)
        self.output = ViltOutput(cfg)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.layernorm_before(x), key_padding_mask)
        return x + self.output(self.intermediate(self.layernorm_after(x)))


class ViltEncoder(nn.Module):
    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(ViltLayer(cfg) for _ in range(cfg.num_layers))


class ViltPooler(nn.Module):
    """tanh(dense(first token))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class ViltModel(nn.Module):
    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = ViltEmbeddings(cfg)
        self.encoder = ViltEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.pooler = ViltPooler(cfg.hidden_size)

    def forward(
        self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
        token_type_ids: Tensor | None = None, image_modality_type: int = IMAGE_TYPE,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """B images and B texts (input_ids (B, L), attention_mask (B, L), True / 1 = real token)
        → (last hidden state (B, L + N, E) after the final LayerNorm, pooled (B, E), key mask
        (B, L + N) bool, True = real token). The first L positions are the text's."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        b, length = input_ids.shape
        if length > self.cfg.max_position_embeddings:
            raise ValueError(f"text of {length} tokens exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        if not 0 <= image_modality_type < self.cfg.modality_type_vocab_size:
            raise ValueError(f"image_modality_type {image_modality_type} outside 0.."
                             f"{self.cfg.modality_type_vocab_size - 1}")
        image, image_mask = self.embeddings.image_tokens(images, image_modality_type)
        if image.shape[0] != b:
            raise ValueError(f"{image.shape[0]} images for {b} texts: ViLT pairs image i with text i")
        text = self.embeddings.text_tokens(input_ids, token_type_ids)
        text_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if image_mask is None:
            image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        x = torch.cat([text, image], dim=1)
        mask = torch.cat([text_mask, image_mask], dim=1)
        # Without padding every key is real: pass no mask so attention takes its fastest path.
        key_mask = None if bool(mask.all()) else mask
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        x = self.layernorm(x)
        return x, self.pooler(x), mask


class ViLT(nn.Module):
    """ViltModel with the pretraining heads (MLM, ITM) and the fusion-model contract."""

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vilt = ViltModel(cfg)
        self.itm_score = ITMHead(cfg.hidden_size)
        # The decoder's weight IS the word-embedding Parameter (tied, as in Hugging Face's ViLT).
        self.mlm_score = MLMPredictions(cfg.text_config, self.vilt.embeddings.text_embeddings.word_embeddings)
        self.apply(lambda m: init_weights(m, cfg.initializer_range, cfg.linear_init))
        with torch.no_grad():
            nn.init.trunc_normal_(self.vilt.embeddings.cls_token, std=cfg.initializer_range)
            nn.init.trunc_normal_(self.vilt.embeddings.position_embeddings, std=cfg.initializer_range)
        # Which vocabulary tokens begin a word (whole-word masking); filled by set_word_starts and
        # saved with the weights. All False = not set yet.
        self.register_buffer("word_starts", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    # ---------------------------------------------------------------- setup

    def set_word_starts(self, tokenizer_or_table: Any) -> None:
        """Record where words begin in the vocabulary: a tokenizer or a (V,) bool table."""
        table = (tokenizer_or_table if isinstance(tokenizer_or_table, Tensor)
                 else word_starts_from_tokenizer(tokenizer_or_table))
        if table.shape != self.word_starts.shape:
            raise ValueError(f"word-start table of {tuple(table.shape)} entries for a vocabulary of "
                             f"{self.cfg.vocab_size}")
        self.word_starts.copy_(table.to(torch.bool))

    def _word_starts_for_masking(self) -> Tensor | None:
        if not self.cfg.whole_word_masking:
            return None
        if not bool(self.word_starts.any()):
            raise ValueError("whole-word masking needs the vocabulary's word starts: call "
                             "model.set_word_starts(tokenizer) (or set whole_word_masking=False)")
        return self.word_starts

    # ---------------------------------------------------------------- the contract

    @property
    def fused_width(self) -> int:
        return self.cfg.hidden_size

    def fused_features(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor,
                       image_modality_type: int = IMAGE_TYPE) -> Tensor:
        """(B, E): the pooled [CLS] state of image i read with text i."""
        return self.vilt(images, input_ids, attention_mask, image_modality_type=image_modality_type)[1]

    def itm_logits(self, images: Sequence[Tensor] | Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,): log-odds that image i matches text i (match logit minus no-match logit)."""
        logits = self.itm_score(self.fused_features(images, input_ids, attention_mask))
        return logits[:, 1] - logits[:, 0]

    def pretrain_losses(self, batch: Any, objectives: dict[str, float], step: int) -> dict[str, Tensor]:
        """Unweighted losses of an image-text batch: "itm", "wpa" (word-patch alignment, read from
        the same fused pass as ITM) and "mlm"."""
        check_objectives(objectives, {"itm", "wpa", "mlm"}, "ViLT")
        if batch.input_ids is None:
            raise ValueError("ViLT trains on image-text pairs; the batch has no texts")
        images = as_image_list(batch.images, self.cfg.num_channels)
        losses: dict[str, Tensor] = {}
        if "itm" in objectives or "wpa" in objectives:
            itm, wpa = self._itm_and_wpa_losses(images, batch.input_ids, batch.attention_mask, batch.image_ids)
            losses.update({name: value for name, value in (("itm", itm), ("wpa", wpa)) if name in objectives})
        if "mlm" in objectives:
            losses["mlm"] = self._mlm_loss(images, batch.input_ids, batch.attention_mask)
        return losses

    def after_step(self) -> None:
        pass

    # ---------------------------------------------------------------- objectives

    def _itm_and_wpa_losses(self, images: list[Tensor], input_ids: Tensor, attention_mask: Tensor,
                            image_ids: Tensor) -> tuple[Tensor, Tensor]:
        """ITM over B positives and 2B random negatives, and ViLT's word-patch alignment on the
        same pass: ½ (mean OT distance of matched pairs − mean of mismatched pairs)."""
        b, length = input_ids.shape
        # Equal similarities: each negative is drawn uniformly among the true negatives.
        flat = torch.zeros(b, b, device=input_ids.device)
        negatives = sample_hard_negatives(flat, flat, same_pair=same_pair_mask(image_ids, input_ids, attention_mask))
        image_index, text_index, labels = itm_pair_indices(negatives)
        text_mask = attention_mask[text_index].bool()
        hidden, pooled, mask = self.vilt([images[i] for i in image_index.tolist()], input_ids[text_index], text_mask)
        itm = itm_loss(self.itm_score(pooled), labels)
        # Words: the caption without <s> and </s>; patches: the image without its class token.
        words = text_mask.clone()
        words[:, 0] = False
        words[torch.arange(words.shape[0], device=words.device), text_mask.sum(1) - 1] = False
        patches = mask[:, length:].clone()
        patches[:, 0] = False
        distance = optimal_transport_distance(hidden[:, :length], hidden[:, length:], words, patches)
        # ViLT averages over an even split of matched and mismatched pairs; with twice as many
        # mismatched pairs here, the two means are weighed equally instead, or the loss would
        # push every distance up.
        wpa = 0.5 * (distance[labels == 1].mean() - distance[labels == 0].mean())
        return itm, wpa

    def _mlm_loss(self, images: list[Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        masked, labels = mask_text_for_mlm(
            input_ids, attention_mask, mask_token_id=self.cfg.mask_token_id,
            special_token_ids=self.cfg.special_token_ids, vocab_size=self.cfg.vocab_size,
            prob=self.cfg.mlm_probability, word_starts=self._word_starts_for_masking(),
        )
        hidden = self.vilt(images, masked, attention_mask)[0]
        return mlm_loss(hidden[:, : input_ids.shape[1]], self.mlm_score, labels)
