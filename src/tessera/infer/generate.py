"""Autoregressive generation with a KV cache: greedy or top-p sampling, batched with left padding.

Works for any model that maps (input_ids, images) to hidden states through a LlamaDecoder:
the LVLM, or the decoder alone (images ignored). Prompts are left-padded so every row's
next token sits in the last column; positions start at 0 at each row's first real token,
so a padded row computes exactly what it would alone.

Shapes: B prompts, L_p longest prompt, N new tokens at most, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tessera.models.lvlm import LVLM
from tessera.text.llama import LlamaDecoder


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _decoder(model: nn.Module) -> LlamaDecoder:
    return model.language_model if isinstance(model, LVLM) else model


def _embed(model: nn.Module, ids: Tensor, images: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Prompt embeddings and the image-token mask (None without an LVLM)."""
    if isinstance(model, LVLM):
        return model.embed(ids, [image.to(ids.device) for image in images])  # images come from the CPU
    return model.embed_tokens(ids), None


def sample_next(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """logits (B, V) → next token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Tensor] = (),
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    config: GenerationConfig = GenerationConfig(),
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each row, stop token excluded.

    `images` are all rows' images in order of their placeholders (already expanded in the
    prompts). With use_cache=False every step reruns the whole sequence (the reference the
    tests compare the cache against).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    decoder = _decoder(model)
    device = decoder.embed_tokens.weight.device
    b, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(b, longest, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(list(p), device=device)
        mask[i, longest - len(p):] = True
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    stop = {int(t) for t in stop_ids}
    finished = [False] * b
    out: list[list[int]] = [[] for _ in range(b)]

    embeds, is_image = _embed(model, ids, images)
    total = longest + config.max_new_tokens
    cache = decoder.new_cache(b, total, embeds.dtype) if use_cache else None
    # Real-token mask over the prompt and every position to come (new tokens are all real):
    # each step reads a prefix view instead of concatenating a new mask.
    full_mask = torch.ones(b, total, dtype=torch.bool, device=device)
    full_mask[:, :longest] = mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    if is_image is not None:  # CogVLM: one position per image; later tokens continue from the last
        positions = model.position_ids(positions, is_image)
    # The prefill's last layer runs only for the last column, the one position read next
    # (the uncached path stays the full computation the tests compare against).
    last = torch.zeros_like(mask)
    last[:, -1] = True
    hidden = decoder(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, kv_cache=cache,
                     keep=last if cache is not None else None, modality_mask=is_image)
    hidden = hidden if hidden.dim() == 2 else hidden[:, -1]  # (B, E)
    next_pos = positions[:, -1:]
    length = longest
    for _ in range(config.max_new_tokens):
        token = sample_next(decoder.logits(hidden), config, generator)
        # One transfer to Python per step; the bookkeeping below is plain Python.
        for i, t in enumerate(token.tolist()):
            if not finished[i]:
                if t in stop:
                    finished[i] = True
                else:
                    out[i].append(t)
        if all(finished):
            break
        if any(finished):
            # Finished rows keep running (their rows of the batch are independent) on padding.
            token = token.masked_fill(torch.tensor(finished, device=device), pad_id)
        next_pos = next_pos + 1
        length += 1
        new_embed = decoder.embed_tokens(token[:, None])
        if cache is not None:
            hidden = decoder(inputs_embeds=new_embed, position_ids=next_pos, attention_mask=full_mask[:, :length],
                             kv_cache=cache)
        else:
            positions = torch.cat([positions, next_pos], dim=1)
            embeds = torch.cat([embeds, new_embed], dim=1)
            if is_image is not None:  # generated tokens are text
                is_image = torch.cat([is_image, torch.zeros_like(next_pos, dtype=torch.bool)], dim=1)
            hidden = decoder(inputs_embeds=embeds, position_ids=positions, attention_mask=full_mask[:, :length],
                             modality_mask=is_image)
        hidden = hidden[:, -1]
    return out
