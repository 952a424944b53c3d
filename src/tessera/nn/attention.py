"""The one attention function of Tessera, and the KV cache it reads and writes.

Every model (ViT, text encoders, the LLM, connectors with queries) calls `attention`.
It is the only place that knows about SDPA and how sequences are laid out:

- padded batches: q, k, v are (B, H, L, D); an optional key-padding mask (B, Lk) says
  which keys are real;
- packed rows: B == 1 and `cu_seqlens` (S+1,) gives the start offset of each of the S
  samples in the row; no token ever attends across a sample boundary;
- causal or bidirectional; with a KV cache the queries are the LAST Lq positions of the
  Lk keys (bottom-right aligned causal mask).

`selected_query_attention` is the causal case for queries at only some positions (a
decoder's last layer, whose output is read at a few positions only).

Shape notation: B batch, Hq query heads, Hkv key/value heads (GQA: Hq % Hkv == 0),
Lq / Lk query / key length, D head dim, T total tokens of a packed row, S samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    cu_seqlens: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Scaled dot-product attention over padded or packed sequences.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D). Returns (B, Hq, Lq, D).
    key_padding_mask: (B, Lk) bool, True = real key. attn_mask: (B or 1, 1 or Hq, Lq, Lk)
    bool (True = may attend), for masks no flag expresses (e.g. the Q-Former's); it is
    combined with the others. bias: a float tensor broadcastable to (B, Hq, Lq, Lk) added to
    the scaled logits (SAM's decomposed relative positions); masked keys stay masked.
    """
    if cu_seqlens is not None:
        if q.shape[0] != 1 or q.shape[2] != k.shape[2]:
            raise ValueError("packed attention needs B == 1 and Lq == Lk (no KV cache)")
        if key_padding_mask is not None or attn_mask is not None or bias is not None:
            raise ValueError("packed attention takes no extra mask or bias: segments are the mask")
        return _packed_attention(q, k, v, cu_seqlens, causal, dropout_p)

    lq, lk = q.shape[2], k.shape[2]
    enable_gqa = q.shape[1] != k.shape[1]
    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError("bias must be a float tensor (a boolean mask goes in attn_mask)")
        if key_padding_mask is not None or attn_mask is not None or causal:
            allowed = _combine_masks(q, lq, lk, causal, key_padding_mask, attn_mask)
            bias = torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p,
                                              enable_gqa=enable_gqa)
    if key_padding_mask is None and attn_mask is None:
        if not causal or lq == 1:
            # A single query at the end of the cache may see every key.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=enable_gqa)
        if lq == lk:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=enable_gqa
            )
    mask = _combine_masks(q, lq, lk, causal, key_padding_mask, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=enable_gqa)


def _combine_masks(
    q: Tensor, lq: int, lk: int, causal: bool, key_padding_mask: Tensor | None, attn_mask: Tensor | None
) -> Tensor:
    device = q.device
    mask = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=device)
    if causal:
        # Bottom-right aligned: query i (of the last Lq) sees keys up to lk - lq + i.
        mask = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].to(torch.bool)
    if attn_mask is not None:
        mask = mask & attn_mask
    # A query that may see no key at all (a left-pad position) would give NaN; let it see
    # itself instead. Its output is never used.
    empty = ~mask.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        diag = torch.zeros(lq, lk, dtype=torch.bool, device=device)
        diag[torch.arange(lq, device=device), torch.arange(lk - lq, lk, device=device)] = True
        mask = mask | (empty & diag)
    return mask


def _segment_lengths(cu_seqlens: Tensor, total: int) -> list[int]:
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens {bounds} must run from 0 to the row length {total}")
    return [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]


def _packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool, dropout_p: float) -> Tensor:
    # On CPU, one SDPA call per segment does exactly the useful work (no T×T mask). The
    # segments are taken with split, not slicing: the backward of split concatenates the
    # segments' gradients once, where each slice's backward would zero-fill a full-row tensor.
    enable_gqa = q.shape[1] != k.shape[1]
    lengths = _segment_lengths(cu_seqlens, q.shape[2])
    if len(lengths) == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, enable_gqa=enable_gqa)
    outs = [
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, dropout_p=dropout_p, enable_gqa=enable_gqa)
        for qs, ks, vs, n in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), lengths, strict=True)
        if n
    ]
    return torch.cat(outs, dim=2)


def selected_query_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Causal attention computed only for the queries at the positions `keep` marks.

    A decoder's last layer needs its output only where a loss or the next token is read
    (the supervised positions in training, each row's last token in a prefill), while its
    keys and values still come from every position. keep: (B, L) bool over the L newest of
    the Lk keys (with a KV cache the first Lk - L keys are the cached prefix); every kept
    position must be a real token. q: (N, Hq, D), the queries at the N kept positions in the
    order of `keep.nonzero()`; k, v: (B, Hkv, Lk, D). Packed rows (B == 1, cu_seqlens) and
    key-padding masks mean what they mean in `attention`. Returns (N, Hq, D): the rows
    `attention(..., causal=True)` gives at those positions.
    """
    b, length = keep.shape
    lk = k.shape[2]
    enable_gqa = q.shape[1] != k.shape[1]
    if cu_seqlens is not None:
        if b != 1 or lk != length:
            raise ValueError("packed attention needs B == 1 and Lq == Lk (no KV cache)")
        # Segments of the packed row; with split (see _packed_attention) rather than slices.
        lengths = _segment_lengths(cu_seqlens, length)
        keeps = keep[0].split(lengths)
        ks, vs = k.split(lengths, 2), v.split(lengths, 2)
        offset = 0
    else:
        keeps, ks, vs = keep.unbind(0), k.split(1), v.split(1)
        # With a cache, the L new columns follow Lk - L cached keys.
        offset = lk - length
    cols = [row.nonzero().squeeze(1) + offset for row in keeps]  # kept key index per segment
    counts = [c.numel() for c in cols]
    if sum(counts) != q.shape[0]:
        raise ValueError(f"keep marks {sum(counts)} positions but q holds {q.shape[0]} queries")
    if cu_seqlens is None and len(set(counts)) == 1:
        # The same number of queries in every row (a prefill keeping each row's last token):
        # one batched call.
        m = counts[0]
        if m == 0:
            return q.new_empty(0, q.shape[1], q.shape[2])
        mask = torch.arange(lk, device=q.device) <= torch.stack(cols)[:, :, None]  # (B, m, Lk)
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(
            q.reshape(b, m, *q.shape[1:]).transpose(1, 2), k, v, attn_mask=mask[:, None], enable_gqa=enable_gqa
        )
        return out.transpose(1, 2).reshape(q.shape)
    pads = key_padding_mask.to(torch.bool).unbind(0) if key_padding_mask is not None else [None] * len(cols)
    outs = []
    for qs, k_seg, v_seg, col, pad in zip(q.split(counts), ks, vs, cols, pads, strict=True):
        if not col.numel():
            continue
        mask = torch.arange(k_seg.shape[2], device=q.device) <= col[:, None]  # (m, keys of the segment)
        if pad is not None:
            mask = mask & pad
        out = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], k_seg, v_seg, attn_mask=mask,
                                             enable_gqa=enable_gqa)
        outs.append(out[0].transpose(0, 1))
    if not outs:
        return q.new_empty(0, q.shape[1], q.shape[2])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class KVCache:
    """Preallocated keys and values for every layer of a decoder.

    k, v per layer: (B, Hkv, max_len, D). `length` counts the positions filled so far; a
    layer's `update` writes the new positions and returns the filled prefix. The decoder
    calls `advance` once per forward, after its last layer.
    """

    def __init__(
        self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
        dtype: torch.dtype, device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
