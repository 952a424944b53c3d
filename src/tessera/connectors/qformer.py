"""BLIP-2's Querying Transformer (Q-Former): a fixed set of learned queries reads a frozen image
encoder through cross-attention, so every image becomes `num_queries` tokens whatever its size.

One BERT-style (post-LayerNorm) stack holds two transformers that share their self-attention:
    image transformer   the queries; after self-attention they cross-attend to the image
                        features in every `cross_attention_frequency`-th layer (layer 0, 2, …:
                        "every other block"), then run the QUERY feed-forward
    text transformer    text tokens; self-attention (shared weights), no cross-attention, then
                        the TEXT feed-forward (present with `text_input`, i.e. for stage-1
                        pretraining; BLIP-2's stage 2 never feeds text to the Q-Former)
Queries and text sit in one sequence [queries; text]; which of them see which is the
self-attention mask of the objective (`qformer_attention_mask`):
    "itc"  unimodal: queries see queries, text sees text (no leak between the modalities)
    "itg"  multimodal causal: queries see queries, text sees every query and earlier text
    "itm"  bidirectional: everything sees everything
Padding keys (text_mask False) are never seen.

As a connector (`QFormerConnector`, the contract of `tessera.connectors.base`): the image's
vision tokens (prefix tokens included: BLIP-2 cross-attends to the class token too) pass
`ln_vision`, the queries read them, and `language_projection` maps the query outputs Z (Q × E)
to the LLM width: (N·Q, E_llm). BLIP-2 prepends these as soft visual prompts; Tessera's LVLM
scatters them into an image's Q placeholder tokens instead, which is the same computation when
the template puts the image first (the "blip2" template does).

Parameter names follow Hugging Face's Blip2ForConditionalGeneration / Blip2QFormerModel, so
import maps one to one:
    query_tokens                                           (1, Q, E)
    qformer.layernorm                                      on [queries; text embeddings]
    qformer.encoder.layer.N.attention.attention.{query,key,value}, .output.{dense,LayerNorm}
    qformer.encoder.layer.N.crossattention.{attention.*, output.*}      (cross-attention layers)
    qformer.encoder.layer.N.intermediate_query.dense, output_query.{dense,LayerNorm}   query FFN
    qformer.encoder.layer.N.intermediate.dense, output.{dense,LayerNorm}   text FFN (text_input)
    language_projection                                    (connector only)
Tessera addition: `ln_vision`, LAVIS's LayerNorm on the frozen image features (trained with the
Q-Former); Hugging Face folds it into its vision model's post_layernorm.

Shapes:
    N images   Q queries   L text tokens   S_i vision tokens of image i (S = max S_i)
    E Q-Former width   E_v vision width   E_llm LLM width   H heads
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.connectors.base import VisionTokens
from tessera.nn.layers import Activation
from tessera.text.bert import BertIntermediate, BertResidualOutput, BertSelfAttention, feed_forward
from tessera.vision.vit import _pad_segments

QFormerMode = Literal["itc", "itg", "itm"]
_TEXT_FFN_KEY = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
MODES: tuple[str, ...] = ("itc", "itg", "itm")


class QFormerConfig(Config):
    kind: Literal["qformer"] = "qformer"
    num_queries: int = 8  # paper: 32
    hidden_size: int = 128  # paper: 768 (BERT-base)
    num_layers: int = 2  # paper: 12
    num_heads: int = 4  # paper: 12
    intermediate_size: int = 512  # paper: 3072
    cross_attention_frequency: int = 2  # a cross-attention block in layers 0, f, 2f, …
    layer_norm_eps: float = 1e-12
    act: Activation = "gelu"
    text_input: bool = False  # text feed-forward blocks (stage-1 pretraining needs them)
    vision_layernorm_eps: float = 1e-5  # ln_vision (Hugging Face: the vision config's eps)

    @model_validator(mode="after")
    def _check(self) -> QFormerConfig:
        for name in ("num_queries", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "cross_attention_frequency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


def qformer_attention_mask(mode: QFormerMode, num_queries: int, text_mask: Tensor) -> Tensor:
    """The self-attention mask of one stage-1 objective over [queries; text].

    text_mask (B, L) bool, True at real text tokens. Returns (B, Q+L, Q+L) bool, True where the
    row position may attend to the column position (see the module docstring). Padding columns
    are False in every mode.
    """
    if mode not in MODES:
        raise ValueError(f"Q-Former mask mode must be one of {list(MODES)}, got {mode!r}")
    if text_mask.dim() != 2:
        raise ValueError(f"text_mask must be (B, L), got shape {tuple(text_mask.shape)}")
    b, length = text_mask.shape
    n = num_queries + length
    device = text_mask.device
    is_query = torch.arange(n, device=device) < num_queries
    if mode == "itm":
        allowed = torch.ones(n, n, dtype=torch.bool, device=device)
    elif mode == "itc":
        allowed = is_query[:, None] == is_query[None, :]
    else:  # itg: query rows see queries; text rows see queries and text up to themselves
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        allowed = torch.where(is_query[:, None], is_query[None, :].expand(n, n), causal)
    real_keys = torch.cat([torch.ones(b, num_queries, dtype=torch.bool, device=device), text_mask.bool()], dim=1)
    return allowed[None] & real_keys[:, None, :]


class QFormerAttention(nn.Module):
    """Self- or cross-attention sub-block with Hugging Face's Q-Former names: `attention`
    (query / key / value, Tessera's BertSelfAttention) then `output` (dense, residual, LN)."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.attention = BertSelfAttention(dim, kv_dim, num_heads)
        self.output = BertResidualOutput(dim, dim, eps)

    def forward(
        self, x: Tensor, *, context: Tensor | None = None, key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        attended = self.attention(x, context=context, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        return self.output(attended, x)


class QFormerLayer(nn.Module):
    """Shared self-attention → (queries only) cross-attention → query FFN | text FFN."""

    def __init__(self, cfg: QFormerConfig, index: int, vision_dim: int) -> None:
        super().__init__()
        e, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = QFormerAttention(e, e, cfg.num_heads, eps)
        if cfg.has_cross_attention(index):
            self.crossattention = QFormerAttention(e, vision_dim, cfg.num_heads, eps)
        if cfg.text_input:
            self.intermediate = BertIntermediate(e, cfg.intermediate_size, cfg.act)
            self.output = BertResidualOutput(cfg.intermediate_size, e, eps)
        self.intermediate_query = BertIntermediate(e, cfg.intermediate_size, cfg.act)
        self.output_query = BertResidualOutput(cfg.intermediate_size, e, eps)

    @property
    def has_cross_attention(self) -> bool:
        return hasattr(self, "crossattention")

    def forward(
        self, x: Tensor, *, num_queries: int, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
        image_embeds: Tensor | None, image_mask: Tensor | None,
    ) -> Tensor:
        x = self.attention(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        parts = []
        if num_queries:
            queries = x[:, :num_queries]
            if self.has_cross_attention:
                queries = self.crossattention(queries, context=image_embeds, key_padding_mask=image_mask)
            parts.append(feed_forward(self.intermediate_query, self.output_query, queries))
        if x.shape[1] > num_queries:
            if not hasattr(self, "intermediate"):
                raise ValueError("text given to a Q-Former without text feed-forward blocks (text_input=False)")
            parts.append(feed_forward(self.intermediate, self.output, x[:, num_queries:]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, vision_dim: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i, vision_dim) for i in range(cfg.num_layers))


class QFormerModel(nn.Module):
    """Hugging Face's Blip2QFormerModel: LayerNorm over the input embeddings, then the layers."""

    def __init__(self, cfg: QFormerConfig, vision_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = QFormerEncoder(cfg, vision_dim)

    def forward(
        self,
        embeds: Tensor,
        *,
        num_queries: int,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """embeds (B, Q+L, E): the first `num_queries` rows are queries, the rest text embeddings
        (word + position). attn_mask (B, Q+L, Q+L) bool or key_padding_mask (B, Q+L). image_embeds
        (B, S, E_v) with image_mask (B, S) (None: every key real) feed the queries' cross-attention.
        Returns (B, Q+L, E)."""
        if not 0 <= num_queries <= embeds.shape[1]:
            raise ValueError(f"num_queries {num_queries} outside 0..{embeds.shape[1]}")
        if num_queries and image_embeds is None:
            raise ValueError("queries need image_embeds to cross-attend to")
        x = self.layernorm(embeds)
        if image_embeds is not None:
            image_embeds = image_embeds.to(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, num_queries=num_queries, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                      image_embeds=image_embeds, image_mask=image_mask)
        return x


class QFormerBase(nn.Module):
    """The image side every Q-Former holder shares: ln_vision, query_tokens, qformer.

    Subclasses (the connector, BLIP-2's stage-1 model) add their heads; the shared parts keep
    the same names in both, so stage-1 weights move into the connector key for key.
    """

    SHARED_PREFIXES: tuple[str, ...] = ("ln_vision.", "query_tokens", "qformer.")

    def __init__(self, cfg: QFormerConfig, vision_dim: int) -> None:
        super().__init__()
        self.qformer_cfg = cfg
        self.vision_dim = vision_dim
        self.ln_vision = nn.LayerNorm(vision_dim, eps=cfg.vision_layernorm_eps)
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden_size) * 0.02)
        self.qformer = QFormerModel(cfg, vision_dim)

    def num_output_tokens(self, rows: int, cols: int) -> int:
        """Tokens one image becomes: always the number of queries."""
        if rows < 1 or cols < 1:
            raise ValueError(f"an image needs a patch grid of at least 1x1, got {rows}x{cols}")
        return self.qformer_cfg.num_queries

    def image_inputs(self, vision: VisionTokens) -> tuple[Tensor, Tensor | None]:
        """Every image's tokens, ln_vision applied, padded to (N, S, E_v), with a (N, S) mask of
        real tokens (None when all images have the same token count)."""
        if vision.tokens.shape[-1] != self.vision_dim:
            raise ValueError(f"vision tokens are {vision.tokens.shape[-1]} wide; this Q-Former reads {self.vision_dim}")
        lengths = vision.lengths
        cu = torch.tensor([0, *lengths], device=vision.tokens.device).cumsum(0)
        return _pad_segments(self.ln_vision(vision.tokens), cu)

    def query_outputs(self, image_embeds: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """Z: image_embeds (N, S, E_v) (already through ln_vision) → (N, Q, E)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(queries, num_queries=self.qformer_cfg.num_queries, image_embeds=image_embeds,
                            image_mask=image_mask)

    def shared_state_dict(self) -> dict[str, Tensor]:
        """The tensors of ln_vision, query_tokens and qformer (text FFNs included when present)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.SHARED_PREFIXES)}

    def load_shared_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load another holder's `shared_state_dict`. Text FFN tensors this module has no place
        for (a connector without text_input) are the only keys left out; anything else must match."""
        own = self.shared_state_dict()
        extra = [k for k in state if k not in own and not _TEXT_FFN_KEY.match(k)]
        missing = [k for k in own if k not in state]
        if extra or missing:
            raise ValueError(f"Q-Former weights do not match: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, value in own.items():
            if state[key].shape != value.shape:
                raise ValueError(f"Q-Former weight {key}: shape {tuple(state[key].shape)} vs {tuple(value.shape)}")
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(state[key])


class QFormerConnector(QFormerBase):
    """VisionTokens → (N·Q, E_llm): the BLIP-2 / MiniGPT-4 connector."""

    def __init__(self, cfg: QFormerConfig, vision_dim: int, llm_dim: int) -> None:
        super().__init__(cfg, vision_dim)
        self.cfg = cfg
        self.language_projection = nn.Linear(cfg.hidden_size, llm_dim)

    def forward(self, vision: VisionTokens) -> Tensor:
        embeds, mask = self.image_inputs(vision)
        z = self.query_outputs(embeds, mask)  # (N, Q, E)
        return self.language_projection(z).reshape(vision.num_images * self.cfg.num_queries, -1)
