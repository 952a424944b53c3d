"""Pre-LayerNorm transformer encoder layer of CLIP-style towers (ViT and CLIP text).

Parameter names match Hugging Face's CLIPEncoderLayer: self_attn.{q,k,v,out}_proj,
layer_norm1, mlp.fc1, mlp.fc2, layer_norm2.

Shapes: B batch, L tokens, E width, H heads, D = E / H.
"""

from __future__ import annotations

from torch import Tensor, nn

from tessera.nn.attention import attention
from tessera.nn.layers import MLP, Activation


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, *, causal: bool = False, cu_seqlens: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        b, length, dim = x.shape
        shape = (b, length, self.num_heads, dim // self.num_heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, dim))


class EncoderLayer(nn.Module):
    """x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: Activation, eps: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(
        self, x: Tensor, *, causal: bool = False, cu_seqlens: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.self_attn(
            self.layer_norm1(x), causal=causal, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask
        )
        return x + self.mlp(self.layer_norm2(x))
