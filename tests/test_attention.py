"""The one attention function: an additive bias (SAM's relative positions) is added to the scaled
logits, combined with the boolean masks, and refused where it has no meaning (packed rows)."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.nn.attention import attention


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
