"""LLaMA-style decoder-only language model: RMSNorm, RoPE, SwiGLU, grouped-query attention,
KV cache, packed sequences.

Parameter names match Hugging Face's LlamaForCausalLM with the "model." prefix removed:
embed_tokens, layers.N.self_attn.{q,k,v,o}_proj, layers.N.mlp.{gate,up,down}_proj,
layers.N.{input,post_attention}_layernorm, norm, lm_head. Mistral and Qwen2 are the same
graph (Qwen2 adds q/k/v biases: `attention_bias`).

With `visual_expert` (CogVLM) every layer also holds a visual expert: image tokens (marked by
the modality mask) go through their own query/key/value projections,
layers.N.self_attn.vision_expert.{q,k,v}_proj, and their own feed-forward,
layers.N.vision_mlp.{gate,up,down}_proj, of the same shapes as the text weights and initialised
as copies of them; text tokens use the original weights. Attention runs over all tokens at once
and the output projection is shared (the CogVLM paper's expert is "a QKV matrix and an MLP";
the released checkpoints also split the output projection). Off by default, so LLaMA
checkpoints load unchanged.

Shapes:
    B batch (1 for a packed row)   L tokens per row   E hidden size   V vocabulary
    Hq query heads   Hkv key/value heads   D head dim
"""

from __future__ import annotations

import torch
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.nn.attention import KVCache, attention, selected_query_attention
from tessera.nn.layers import Activation, GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary


class LlamaConfig(Config):
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_linear_scaling: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    act: Activation = "silu"
    visual_expert: bool = False  # CogVLM: own QKV and FFN for image tokens in every layer

    @model_validator(mode="after")
    def _shapes(self) -> LlamaConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


def route_by_modality(x: Tensor, is_image: Tensor | None, text: nn.Module, image: nn.Module | None) -> Tensor:
    """`text` on the rows of x (..., E) where `is_image` (...) is False, `image` where it is
    True; `text` everywhere when there is no mask or no image module (plain LLaMA)."""
    if image is None or is_image is None or not bool(is_image.any()):
        return text(x)
    if bool(is_image.all()):
        return image(x)
    from_text, from_image = text(x[~is_image]), image(x[is_image])
    out = from_text.new_empty(*is_image.shape, from_text.shape[-1])
    out[~is_image] = from_text
    out[is_image] = from_image.to(out.dtype)
    return out


class VisionExpertQKV(nn.Module):
    """The visual expert's query/key/value projections (CogVLM), shaped as the text ones."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d = cfg.dim_per_head
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)


class DecoderAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d = cfg.dim_per_head
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)
        self.vision_expert = VisionExpertQKV(cfg) if cfg.visual_expert else None

    def _project(self, name: str, x: Tensor, is_image: Tensor | None) -> Tensor:
        expert = getattr(self.vision_expert, name) if self.vision_expert is not None else None
        return route_by_modality(x, is_image, getattr(self, name), expert)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, *, layer_idx: int, cu_seqlens: Tensor | None,
        key_padding_mask: Tensor | None, kv_cache: KVCache | None, keep: Tensor | None = None,
        modality_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, L, E) → (B, L, E); with `keep` (B, L) only the kept positions' outputs, (N, E).
        modality_mask (B, L) marks image tokens, which use the visual expert's projections."""
        b, length, _ = x.shape
        k = self._project("k_proj", x, modality_mask).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self._project("v_proj", x, modality_mask).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        if keep is None:
            q = self._project("q_proj", x, modality_mask).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
            q = apply_rotary(q, cos, sin)
            out = attention(q, k, v, causal=True, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask)
            return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))
        # Queries only where the output is read; each rotated at its own position's angle.
        kept_image = modality_mask[keep] if modality_mask is not None else None
        q = self._project("q_proj", x[keep], kept_image).view(-1, self.num_heads, self.head_dim)  # (N, Hq, D)
        angles = (b, length, cos.shape[-1])
        q = apply_rotary(q, cos[:, 0].expand(angles)[keep][:, None], sin[:, 0].expand(angles)[keep][:, None])
        out = selected_query_attention(q, k, v, keep, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask)
        return self.o_proj(out.reshape(out.shape[0], -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = DecoderAttention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.act, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.vision_mlp = (
            GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.act, bias=cfg.mlp_bias) if cfg.visual_expert else None
        )

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, *, cu_seqlens: Tensor | None,
        key_padding_mask: Tensor | None, kv_cache: KVCache | None, keep: Tensor | None = None,
        modality_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, L, E) → (B, L, E); with `keep` (B, L) only the kept positions, (N, E): keys and
        values still see every position, the rest of the layer runs on the N kept rows.
        modality_mask (B, L) routes image tokens to the visual expert (if the layer has one)."""
        attn = self.self_attn(
            self.input_layernorm(x), cos, sin, layer_idx=self.layer_idx, cu_seqlens=cu_seqlens,
            key_padding_mask=key_padding_mask, kv_cache=kv_cache, keep=keep, modality_mask=modality_mask,
        )
        x = (x if keep is None else x[keep]) + attn
        rows_image = modality_mask if modality_mask is None or keep is None else modality_mask[keep]
        return x + route_by_modality(self.post_attention_layernorm(x), rows_image, self.mlp, self.vision_mlp)


class LlamaDecoder(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.dim_per_head, cfg.rope_theta, cfg.rope_linear_scaling)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.visual_expert:
            self.copy_text_weights_to_visual_expert()

    @torch.no_grad()
    def copy_text_weights_to_visual_expert(self) -> None:
        """Initialise every layer's visual expert as a copy of its text weights (CogVLM), so
        that the model computes exactly what the plain decoder does until the expert trains."""
        if not self.cfg.visual_expert:
            raise ValueError("this decoder has no visual expert (LlamaConfig.visual_expert is False)")
        for layer in self.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn.vision_expert, name).load_state_dict(getattr(layer.self_attn, name).state_dict())
            layer.vision_mlp.load_state_dict(layer.mlp.state_dict())

    def visual_expert_prefixes(self, root: str = "") -> list[str]:
        """Parameter-name prefixes of the visual expert (for a stage's `trainable` or
        `lr_scale`), under `root` (e.g. "language_model" inside an LVLM)."""
        if not self.cfg.visual_expert:
            return []
        base = f"{root}.layers" if root else "layers"
        return [f"{base}.{i}.{part}" for i in range(self.cfg.num_layers) for part in ("self_attn.vision_expert", "vision_mlp")]

    def load_text_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load a plain decoder's weights (e.g. a pretrained LLaMA); with a visual expert, the
        expert keys it lacks are initialised as copies of the text weights just loaded."""
        if not self.cfg.visual_expert:
            self.load_state_dict(state_dict)
            return
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        expert = set(self.visual_expert_prefixes())
        stray = [k for k in missing if not any(k.startswith(p + ".") for p in expert)]
        if stray or unexpected:
            raise ValueError(f"decoder weights do not fit: missing {stray[:5]}, unexpected {list(unexpected)[:5]}")
        if missing:
            self.copy_text_weights_to_visual_expert()

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(
            self.cfg.num_layers, batch, self.cfg.num_kv_heads, self.cfg.dim_per_head, max_len,
            dtype or w.dtype, w.device,
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        attention_mask: Tensor | None = None,
        modality_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (B, L, E), after the last norm; `logits` maps them to (.., V).

        attention_mask (B, Lk) marks real tokens (True) over the cache AND the new tokens.
        modality_mask (B, L) bool marks image tokens; plain LLaMA layers treat every token
        alike, layers with a visual expert (CogVLM) route image tokens to it. With a KV cache,
        the mask covers the new tokens only (generated tokens are text: None).
        keep (B, L) bool, optional: the only positions whose final state the caller reads (the
        supervised ones for a loss, each row's last token for the next one; real tokens only).
        The last layer then runs its queries, attention output and MLP on those rows alone and
        the result is (N, E) in the order of `keep.nonzero()`, equal to `hidden[keep]` of the
        full computation. Every position still writes its keys and values to the cache.
        """
        if not self.cfg.visual_expert:
            modality_mask = None  # no expert layers in the plain decoder
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, length = x.shape[:2]
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=x.device).expand(b, length)
        cos, sin = self.rotary(position_ids, x.dtype)
        if keep is not None and (keep.dtype != torch.bool or keep.shape != (b, length)):
            raise ValueError(f"keep must be a bool mask of shape {(b, length)}, got {keep.dtype} {tuple(keep.shape)}")
        if modality_mask is not None and (modality_mask.dtype != torch.bool or modality_mask.shape != (b, length)):
            raise ValueError(f"modality_mask must be a bool mask of shape {(b, length)}, "
                             f"got {modality_mask.dtype} {tuple(modality_mask.shape)}")
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cu_seqlens=cu_seqlens, key_padding_mask=attention_mask, kv_cache=kv_cache,
                      keep=keep if i == last else None, modality_mask=modality_mask)
        if keep is not None and last < 0:
            x = x[keep]
        if kv_cache is not None:
            kv_cache.advance(length)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)
