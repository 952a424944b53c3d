"""The one attention function: an additive bias (SAM's relative positions) is added to the scaled
logits, combined with the boolean masks, and refused where it has no meaning (packed rows); the
GPU layout of packed rows and selected queries (one padded call) equals the CPU one (a call per
sample), values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.nn.attention import (
    _packed_attention,
    _packed_attention_padded,
    _selected_query_attention_full,
    attention,
    selected_query_attention,
)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(-1) @ v


def test_bias_is_added_to_the_scaled_logits() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5) * 3
    torch.testing.assert_close(attention(q, k, v, causal=False, bias=bias), _reference(q, k, v, bias))
    assert not torch.allclose(attention(q, k, v, causal=False, bias=bias), attention(q, k, v, causal=False))


def test_bias_keeps_padding_and_causal_masks() -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 4, 4) for _ in range(3))
    bias = torch.randn(2, 2, 4, 4)
    keys = torch.tensor([[True, True, True, True], [True, True, False, False]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    allowed = keys[:, None, None, :] & causal
    out = attention(q, k, v, causal=True, key_padding_mask=keys, bias=bias)
    # rows of the second sample that may see some key (all do: key 0 is real and visible)
    torch.testing.assert_close(out, _reference(q, k, v, bias, allowed))


def test_bias_is_refused_on_packed_rows_and_when_boolean() -> None:
    q = k = v = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="packed attention"):
        attention(q, k, v, causal=True, cu_seqlens=torch.tensor([0, 3, 6]), bias=torch.zeros(1, 1, 6, 6))
    with pytest.raises(TypeError, match="float"):
        attention(q, k, v, causal=False, bias=torch.ones(1, 1, 6, 6, dtype=torch.bool))


def _grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("causal", [True, False])
def test_packed_rows_as_one_padded_call_equal_a_call_per_sample(causal: bool) -> None:
    """GQA (4 query heads, 2 key/value heads) and an empty sample in the middle of the row."""
    torch.manual_seed(0)
    lengths = [5, 0, 9, 1, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    q, k, v = torch.randn(1, 4, total, 8), torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8)
    per_sample, grads = _grads(lambda a, b, c: _packed_attention(a, b, c, cu, causal, 0.0), q, k, v)
    padded, padded_grads = _grads(lambda a, b, c: _packed_attention_padded(a, b, c, cu, causal, 0.0), q, k, v)
    torch.testing.assert_close(padded, per_sample)
    for got, want in zip(padded_grads, grads, strict=True):
        torch.testing.assert_close(got, want)


def test_selected_queries_as_one_full_call_equal_the_per_row_calls() -> None:
    """Packed rows, right-padded rows with a key-padding mask, and queries after a cached
    prefix: the full-attention layout gives the kept rows (and gradients) the CPU path gives."""
    torch.manual_seed(1)
    heads, kv_heads, dim = 4, 2, 8

    def check(keep: torch.Tensor, keys: int, **kwargs: torch.Tensor | None) -> None:
        q = torch.randn(int(keep.sum()), heads, dim)
        k, v = torch.randn(keep.shape[0], kv_heads, keys, dim), torch.randn(keep.shape[0], kv_heads, keys, dim)
        want, want_grads = _grads(lambda a, b, c: selected_query_attention(a, b, c, keep, **kwargs), q, k, v)
        got, got_grads = _grads(lambda a, b, c: _selected_query_attention_full(
            a, b, c, keep, kwargs.get("cu_seqlens"), kwargs.get("key_padding_mask")), q, k, v)
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)

    packed_keep = torch.zeros(1, 12, dtype=torch.bool)
    packed_keep[0, [1, 2, 6, 10, 11]] = True
    check(packed_keep, 12, cu_seqlens=torch.tensor([0, 4, 7, 12], dtype=torch.int32))
    real = torch.tensor([[True] * 7 + [False] * 3, [True] * 10, [True] * 4 + [False] * 6])
    keep = torch.zeros(3, 10, dtype=torch.bool)
    keep[0, [3, 6]] = keep[1, [0, 5, 8, 9]] = keep[2, 2] = True
    check(keep, 10, key_padding_mask=real)
    cached = torch.zeros(2, 3, dtype=torch.bool)
    cached[0, 2] = cached[1, [0, 2]] = True
    check(cached, 7)  # 4 cached keys, then the 3 new positions
