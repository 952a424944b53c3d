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

Packed rows and selected queries are computed two ways. On CPU, one SDPA call per sample
does exactly the useful work. On a GPU each call is a kernel launch and the CPU-side loop
waits for the device, so there the samples are laid out as a padded batch for ONE call: the
padding's wasted arithmetic is far cheaper than S launches (a packed batch of 128 samples
took 483 ms per training step the per-sample way on an H100, 43 ms padded;
benchmarks/cuda_batch128.md).

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
    k, v = _shared_heads_for_kernel(q, k, v)
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


def _shared_heads_for_kernel(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Grouped key/value heads repeated for each query head where the fused kernel needs it:
    float32 on CUDA runs the memory-efficient kernel, which takes no grouped heads (SDPA would
    fall back to its unfused path). Elsewhere SDPA's enable_gqa shares them without copies."""
    group = q.shape[1] // k.shape[1]
    if group == 1 or q.device.type != "cuda" or q.dtype != torch.float32:
        return k, v
    return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)


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


def _per_segment(t: Tensor) -> bool:
    """Whether to call SDPA once per sample (CPU) rather than once over a padded batch (GPU)."""
    return t.device.type == "cpu"


def _packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool, dropout_p: float) -> Tensor:
    if not _per_segment(q):
        return _packed_attention_padded(q, k, v, cu_seqlens, causal, dropout_p)
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


def _packed_attention_padded(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool,
                             dropout_p: float) -> Tensor:
    """The packed row's S samples as a (S, H, Lmax, D) right-padded batch, one SDPA call, and
    back. Causal: a real query never reaches the padding after its sample, so is_causal alone
    is exact; bidirectional: a key-padding mask."""
    total = q.shape[2]
    lengths = _segment_lengths(cu_seqlens, total)
    segments, longest = len(lengths), max(lengths)
    starts = cu_seqlens.to(device=q.device, dtype=torch.long)
    sample = torch.repeat_interleave(torch.arange(segments, device=q.device), starts.diff(), output_size=total)
    slot = sample * longest + torch.arange(total, device=q.device) - starts[sample]  # (T,) padded position

    def padded(x: Tensor) -> Tensor:  # (1, H, T, D) → (S, H, Lmax, D)
        heads, dim = x.shape[1], x.shape[3]
        rows = x.new_zeros(heads, segments * longest, dim).index_copy(1, slot, x[0])
        return rows.view(heads, segments, longest, dim).transpose(0, 1)

    mask = None
    if not causal:
        sizes = starts.diff()[:, None]
        # An empty sample's row sees every (zero) key rather than none, which would be NaN.
        mask = ((torch.arange(longest, device=q.device) < sizes) | (sizes == 0))[:, None, None, :]
    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, is_causal=causal,
                                         dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1])
    heads, dim = out.shape[1], out.shape[3]
    return out.transpose(0, 1).reshape(heads, segments * longest, dim).index_select(1, slot)[None]


def _selected_query_attention_full(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, cu_seqlens: Tensor | None,
                                   key_padding_mask: Tensor | None) -> Tensor:
    """selected_query_attention as one call over every position (the GPU way): the kept
    queries are put back in place, the others are zeros whose outputs are dropped."""
    b, length = keep.shape
    full = q.new_zeros(b, length, q.shape[1], q.shape[2])
    full[keep] = q
    out = attention(full.transpose(1, 2), k, v, causal=True, cu_seqlens=cu_seqlens,
                    key_padding_mask=key_padding_mask)
    return out.transpose(1, 2)[keep]


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
    if not _per_segment(q):
        if int(keep.sum()) != q.shape[0]:
            raise ValueError(f"keep marks {int(keep.sum())} positions but q holds {q.shape[0]} queries")
        return _selected_query_attention_full(q, k, v, keep, cu_seqlens, key_padding_mask)
    if cu_seqlens is not None:
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
