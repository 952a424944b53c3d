"""BERT-style (post-LayerNorm) transformer encoder: the text side of the fusion encoders.

One module covers what ALBEF, BLIP and VLMo ask of BERT, as config options and call-time
arguments:
    cross-attention   `cross_attention_layers` lists the layers with a cross-attention block to
                      image features of width `encoder_width` (ALBEF: the last 6 of 12; BLIP:
                      all). A call without `encoder_hidden_states` skips those blocks (BLIP's
                      unimodal text encoder), as Hugging Face's BlipTextModel does.
    layer ranges      `start_layer` / `end_layer` run part of the stack on given hidden states
                      (ALBEF: layers 0..5 are the text encoder, 6..11 the fusion encoder).
    causal            a call-time flag (BLIP's image-grounded decoder). With
                      `separate_decoder_attention` every layer also holds `decoder_attention`,
                      the self-attention block the causal mode uses; everything else (embeddings,
                      cross-attention, feed-forward) is one module, so BLIP's encoder and decoder
                      share those tensors as the very same Parameter objects, and no tie has to
                      be maintained or re-established after loading. `parameters_for(mode)`
                      names each mode's parameters as the matching Hugging Face checkpoint
                      (BlipTextModel as encoder, resp. as the decoder's `bert`) names them.
    modality experts  VLMo's mixture of modality experts: with `modality_experts` every layer
                      has a text FFN (the plain BERT `intermediate` / `output`) and an image FFN
                      (`image_expert`), and the top `vl_expert_layers` layers a vision-language
                      FFN (`vl_expert`); self-attention is shared. Each token goes to the expert
                      of its modality id (0 text, 1 image); a call with `fused=True` (one
                      sequence holding both modalities) sends every token of the top layers to
                      the VL-FFN, while the lower layers keep routing by modality, as VLMo does.

Parameter names match Hugging Face's BertModel (and BlipTextModel for cross-attention):
embeddings.{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm},
encoder.layer.N.attention.self.{query,key,value}, encoder.layer.N.attention.output.{dense,
LayerNorm}, encoder.layer.N.crossattention.{self.*, output.*}, encoder.layer.N.intermediate.dense,
encoder.layer.N.output.{dense, LayerNorm}, pooler.dense. Tessera-only additions:
encoder.layer.N.decoder_attention.* (BLIP's decoder self-attention), encoder.layer.N.
{image_expert, vl_expert}.{intermediate.dense, output.dense, output.LayerNorm} (VLMo).

Shapes:
    B batch   L tokens   E hidden size   N image tokens   E_v image feature width
    H heads   D = E / H   F intermediate size
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.nn.attention import attention
from tessera.nn.layers import Activation, activation_fn

TEXT_MODALITY = 0
IMAGE_MODALITY = 1
Mode = Literal["encode", "decode"]


class BertConfig(Config):
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 64
    type_vocab_size: int = 2  # 0: no token-type embeddings (BLIP's text model has none)
    layer_norm_eps: float = 1e-12
    act: Activation = "gelu"
    pooler: bool = False
    cross_attention_layers: tuple[int, ...] = ()
    encoder_width: int | None = None  # width of the cross-attended features; None: hidden_size
    separate_decoder_attention: bool = False  # BLIP: the causal mode has its own self-attention
    modality_experts: bool = False  # VLMo: text / image FFN experts in every layer
    vl_expert_layers: int = 0  # VLMo: the top layers that also hold a vision-language FFN

    @model_validator(mode="after")
    def _consistent(self) -> BertConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"cross_attention_layers {bad} outside 0..{self.num_layers - 1}")
        if len(set(self.cross_attention_layers)) != len(self.cross_attention_layers):
            raise ValueError(f"cross_attention_layers {self.cross_attention_layers} repeats a layer")
        if not 0 <= self.vl_expert_layers <= self.num_layers:
            raise ValueError(f"vl_expert_layers {self.vl_expert_layers} outside 0..{self.num_layers}")
        if self.vl_expert_layers and not self.modality_experts:
            raise ValueError("vl_expert_layers needs modality_experts")
        return self

    @property
    def cross_attention_width(self) -> int:
        return self.encoder_width if self.encoder_width is not None else self.hidden_size

    @property
    def first_vl_expert_layer(self) -> int:
        return self.num_layers - self.vl_expert_layers


class BertEmbeddings(nn.Module):
    """LayerNorm(word + position + token type) embeddings."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        if cfg.type_vocab_size:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.max_positions = cfg.max_position_embeddings

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, L) or inputs_embeds (B, L, E) → (B, L, E)."""
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        length = x.shape[1]
        if position_ids is None:
            if length > self.max_positions:
                raise ValueError(f"text of {length} tokens exceeds max_position_embeddings {self.max_positions}")
            position_ids = torch.arange(length, device=x.device)[None]
        x = x + self.position_embeddings(position_ids)
        if hasattr(self, "token_type_embeddings"):
            if token_type_ids is None:
                # Type 0 everywhere, as Hugging Face does without token_type_ids.
                x = x + self.token_type_embeddings.weight[0]
            else:
                x = x + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given but the config has type_vocab_size 0")
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """query / key / value projections and the attention itself (Hugging Face's `.self`).

    Keys and values come from the queries' own sequence, or from `context` (cross-attention,
    width `kv_dim`).
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)

    def forward(
        self, x: Tensor, *, context: Tensor | None = None, key_padding_mask: Tensor | None = None,
        causal: bool = False, attn_mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, L, E), context (B, N, E_v) or None → (B, L, E), heads merged, before `output`.

        attn_mask (B, L, N) bool, True = may attend: a mask no flag expresses (the Q-Former's
        per-objective masks), combined with the others."""
        source = x if context is None else context
        b, length, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.query(x).view(b, length, self.num_heads, head_dim).transpose(1, 2)
        k = self.key(source).view(b, source.shape[1], self.num_heads, head_dim).transpose(1, 2)
        v = self.value(source).view(b, source.shape[1], self.num_heads, head_dim).transpose(1, 2)
        mask = None if attn_mask is None else attn_mask[:, None]
        out = attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, length, dim)


class BertResidualOutput(nn.Module):
    """LayerNorm(dense(x) + residual): the post-LN closing of every BERT sub-block."""

    def __init__(self, in_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    """Self- or cross-attention block: `self` (projections) then `output` (dense, residual, LN)."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.self = BertSelfAttention(dim, kv_dim, num_heads)
        self.output = BertResidualOutput(dim, dim, eps)

    def forward(
        self, x: Tensor, *, context: Tensor | None = None, key_padding_mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        return self.output(self.self(x, context=context, key_padding_mask=key_padding_mask, causal=causal), x)


class BertIntermediate(nn.Module):
    def __init__(self, dim: int, hidden: int, act: Activation) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, hidden)
        self.act = activation_fn(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


def feed_forward(intermediate: BertIntermediate, output: BertResidualOutput, x: Tensor) -> Tensor:
    """BERT's FFN sub-block: LayerNorm(dense(act(dense(x))) + x)."""
    return output(intermediate(x), x)


class BertExpert(nn.Module):
    """One modality expert of VLMo: a feed-forward sub-block with BERT's names inside."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.intermediate = BertIntermediate(cfg.hidden_size, cfg.intermediate_size, cfg.act)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return feed_forward(self.intermediate, self.output, x)


class BertLayer(nn.Module):
    """attention → [crossattention] → feed-forward (or its modality experts), each post-LN."""

    def __init__(self, cfg: BertConfig, index: int) -> None:
        super().__init__()
        e, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = BertAttention(e, e, cfg.num_heads, eps)
        if cfg.separate_decoder_attention:
            self.decoder_attention = BertAttention(e, e, cfg.num_heads, eps)
        if index in cfg.cross_attention_layers:
            self.crossattention = BertAttention(e, cfg.cross_attention_width, cfg.num_heads, eps)
        self.intermediate = BertIntermediate(e, cfg.intermediate_size, cfg.act)
        self.output = BertResidualOutput(cfg.intermediate_size, e, eps)
        if cfg.modality_experts:
            self.image_expert = BertExpert(cfg)
            if index >= cfg.first_vl_expert_layer:
                self.vl_expert = BertExpert(cfg)

    @property
    def has_cross_attention(self) -> bool:
        return hasattr(self, "crossattention")

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        causal: bool = False,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        modality_ids: Tensor | None = None,
        fused: bool = False,
    ) -> Tensor:
        self_attention = self.decoder_attention if causal and hasattr(self, "decoder_attention") else self.attention
        x = self_attention(x, key_padding_mask=attention_mask, causal=causal)
        if encoder_hidden_states is not None and self.has_cross_attention:
            x = self.crossattention(x, context=encoder_hidden_states, key_padding_mask=encoder_attention_mask)
        if not hasattr(self, "image_expert"):
            return feed_forward(self.intermediate, self.output, x)
        if fused and hasattr(self, "vl_expert"):
            return self.vl_expert(x)
        return self._route_by_modality(x, modality_ids)

    def _route_by_modality(self, x: Tensor, modality_ids: Tensor | None) -> Tensor:
        if modality_ids is None:
            raise ValueError("a model with modality experts needs modality_ids (0 text, 1 image) per token")
        flat = x.reshape(-1, x.shape[-1])
        routes = modality_ids.reshape(-1)
        out = torch.empty_like(flat)
        for modality, ffn in ((TEXT_MODALITY, None), (IMAGE_MODALITY, self.image_expert)):
            rows = (routes == modality).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            tokens = flat.index_select(0, rows)
            y = feed_forward(self.intermediate, self.output, tokens) if ffn is None else ffn(tokens)
            out = out.index_copy(0, rows, y)
        return out.view_as(x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, i) for i in range(cfg.num_layers))


class BertPooler(nn.Module):
    """tanh(dense(first token))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        if cfg.pooler:
            self.pooler = BertPooler(cfg.hidden_size)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        causal: bool = False,
        modality_ids: Tensor | None = None,
        fused: bool = False,
        start_layer: int = 0,
        end_layer: int | None = None,
    ) -> Tensor:
        """Run layers start_layer .. end_layer - 1 and return their output (B, L, E).

        The input is exactly one of: input_ids (B, L); inputs_embeds (B, L, E), word embeddings
        to which positions and token types are still added; hidden_states (B, L, E), the output
        of an earlier layer range, which skips the embeddings.
        attention_mask (B, L): True / 1 = real token (key padding). encoder_hidden_states
        (B, N, E_v) with encoder_attention_mask (B, N) feed the cross-attention layers.
        modality_ids (B, L): 0 text, 1 image, for modality experts; fused: the top layers' tokens
        go to the vision-language expert.
        """
        end = self.cfg.num_layers if end_layer is None else end_layer
        if not 0 <= start_layer <= end <= self.cfg.num_layers:
            raise ValueError(f"layer range {start_layer}..{end} outside 0..{self.cfg.num_layers}")
        if sum(t is not None for t in (input_ids, inputs_embeds, hidden_states)) != 1:
            raise ValueError("give exactly one of input_ids, inputs_embeds, hidden_states")
        if hidden_states is None:
            x = self.embeddings(
                input_ids, inputs_embeds=inputs_embeds, token_type_ids=token_type_ids, position_ids=position_ids
            )
        elif token_type_ids is not None or position_ids is not None:
            raise ValueError("hidden_states are already embedded: token_type_ids / position_ids do not apply")
        else:
            x = hidden_states
        if encoder_hidden_states is None and encoder_attention_mask is not None:
            raise ValueError("encoder_attention_mask given without encoder_hidden_states")
        self._check_modality_ids(modality_ids)
        for layer in self.encoder.layer[start_layer:end]:
            x = layer(
                x, attention_mask=attention_mask, causal=causal, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, modality_ids=modality_ids, fused=fused,
            )
        return x

    def _check_modality_ids(self, modality_ids: Tensor | None) -> None:
        if modality_ids is None:
            return
        if not self.cfg.modality_experts:
            raise ValueError("modality_ids given but the config has no modality_experts")
        if bool(((modality_ids != TEXT_MODALITY) & (modality_ids != IMAGE_MODALITY)).any()):
            raise ValueError(
                "modality_ids must be 0 (text) or 1 (image); a fused sequence is a call with fused=True"
            )

    def pool(self, hidden: Tensor) -> Tensor:
        """(B, L, E) → (B, E): the pooler on the first token ([CLS])."""
        if not self.cfg.pooler:
            raise ValueError("this BertConfig has pooler=False")
        return self.pooler(hidden)

    def parameters_for(self, mode: Mode) -> dict[str, nn.Parameter]:
        """The parameters one mode runs with, under the names of that mode's own checkpoint.

        "encode": everything but decoder_attention. "decode": the same, with each layer's
        decoder_attention (when the config has it) standing in as `attention`, which is how
        BLIP's decoder checkpoint (BlipTextLMHeadModel's `bert`) names its self-attention.
        Shared tensors are the same Parameter objects in both dicts.
        """
        if mode not in ("encode", "decode"):
            raise ValueError(f"mode must be 'encode' or 'decode', got {mode!r}")
        separate = self.cfg.separate_decoder_attention
        named: dict[str, nn.Parameter] = {}
        for name, p in self.named_parameters():
            own_decoder_attention = ".decoder_attention." in name
            if mode == "encode" and own_decoder_attention:
                continue
            if mode == "decode" and separate:
                if ".attention." in name and not own_decoder_attention:
                    continue
                name = name.replace(".decoder_attention.", ".attention.")
            named[name] = p
        return named
