"""Reading pretraining of an image encoder: a non-autoregressive character-slot reader.

Vary makes its new vision vocabulary by training an encoder (SAM's ViTDet, pretrained on a
billion masks) through a small language model that transcribes rendered text. A tiny encoder
trained from scratch that way never learns to read: the decoder predicts the text from its own
prefix and learns to ignore the image (Vary-tiny on 32,000 rendered texts: loss flat at 1.56,
CER equal to always answering the commonest text; RESULTS.md, session 13). `SlotReader` gives
the encoder a direct reading signal first: K learned slot queries are read together with the
encoder's output tokens by a small transformer, and slot k classifies the k-th character of the
text (or "end" once it is over). The slots have no text context to lean on, so every correct
character must come from the image. The reader is thrown away afterwards; the encoder is
what a later stage starts from (`tessera.pipeline.train_lvlm`, Vary-tiny's "read" stage).

Layout of the reader's sequence: [encoder tokens + 2D sin-cos positions ; slot queries], run
through `num_layers` pre-LN encoder layers (`tessera.nn.transformer.EncoderLayer`, full
attention), then a linear layer over the slot positions.

Optional presence loss (`presence_head`, the stage objective "char_presence" beside
"char_slots"): a linear score per encoder token for each character, max over the tokens, binary
cross-entropy against the set of characters in the text. It gives the encoder a glyph signal from
the first step without having to find where the k-th character is: the plain slot loss waits on a
plateau (every slot predicting its character distribution) for a seed-dependent number of steps
(RESULTS.md, sessions 15 and 17).

Shapes:
    N   images, each (3, H, W), all of one size in a batch
    P   encoder output tokens per image (grid rows·cols; a ViT's class token left out), width E
    K   slots = `max_chars` (the longest text plus its end mark)
    V   len(charset) + 1 classes; class len(charset) = end of text
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.models.lvlm import build_vision_tower, vision_width
from tessera.nn.positions import grid_positions, sincos_2d
from tessera.nn.transformer import EncoderLayer
from tessera.vision.vit import ViTConfig
from tessera.vision.vitdet import ViTDetConfig

READING_OBJECTIVE = "char_slots"  # a stage objective: train the stage's encoder with a SlotReader
PRESENCE_OBJECTIVE = "char_presence"  # optional beside it: which characters the image shows, anywhere
READING_OBJECTIVES = (READING_OBJECTIVE, PRESENCE_OBJECTIVE)


class SlotReaderConfig(Config):
    vision: ViTDetConfig | ViTConfig
    charset: str  # every character the reader can write, each once
    max_chars: int  # slots: characters of the longest text plus the end mark
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    presence_head: bool = False  # a per-token character-presence classifier (PRESENCE_OBJECTIVE)

    @model_validator(mode="after")
    def _check(self) -> SlotReaderConfig:
        if not self.charset or len(set(self.charset)) != len(self.charset):
            raise ValueError(f"charset must be non-empty with no repeated character, got {self.charset!r}")
        if self.max_chars < 2:
            raise ValueError(f"max_chars must be ≥ 2 (a character and the end mark), got {self.max_chars}")
        if self.num_layers < 1 or self.width % self.num_heads:
            raise ValueError(f"reader: num_layers {self.num_layers} must be ≥ 1 and the encoder width "
                             f"{self.width} divisible by num_heads {self.num_heads}")
        if self.width % 4:
            raise ValueError(f"reader: encoder width {self.width} must be divisible by 4 (2D sin-cos positions)")
        return self

    @property
    def width(self) -> int:
        return vision_width(self.vision)

    @property
    def end_id(self) -> int:
        return len(self.charset)

    @classmethod
    def for_texts(cls, vision: ViTDetConfig | ViTConfig, texts: Sequence[str], **options: Any) -> SlotReaderConfig:
        """The charset and slot count that cover `texts` (a training set)."""
        if not texts:
            raise ValueError("a slot reader needs at least one training text to take its charset from")
        return cls(vision=vision, charset="".join(sorted(set("".join(texts)))),
                   max_chars=max(len(t) for t in texts) + 1, **options)


class SlotReader(nn.Module):
    """An image encoder (`encoder`, kept) + a character-slot reading head (`reader`, thrown away)."""

    def __init__(self, cfg: SlotReaderConfig, encoder: nn.Module | None = None) -> None:
        """`encoder` shares an existing tower (an LVLM's, trained in place); by default a new one."""
        super().__init__()
        self.cfg = cfg
        self.encoder = build_vision_tower(cfg.vision) if encoder is None else encoder
        e = cfg.width
        self.slots = nn.Parameter(torch.randn(cfg.max_chars, e) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(e, cfg.num_heads, cfg.mlp_ratio * e, "gelu", 1e-6)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(e, eps=1e-6)
        self.head = nn.Linear(e, cfg.end_id + 1)
        self.presence = nn.Linear(e, cfg.end_id) if cfg.presence_head else None
        self._char_ids = {c: i for i, c in enumerate(cfg.charset)}

    def forward(self, pixels: Tensor) -> Tensor:
        """(N, 3, H, W) normalised pixels → slot logits (N, K, V)."""
        tokens, grid = self._encode(pixels)
        return self._read_slots(tokens, grid)

    def _encode(self, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Encoder tokens (N, P, E) and their (rows, cols) grid."""
        vision = self.encoder(pixels)
        if len(set(vision.grids)) != 1:
            raise ValueError(f"a slot reader reads images of one size per batch, got grids {sorted(set(vision.grids))}")
        rows, cols = vision.grids[0]
        return vision.patch_tokens().reshape(vision.num_images, rows * cols, -1), (rows, cols)

    def _read_slots(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        rows, cols = grid
        x = tokens + sincos_2d(*grid_positions(rows, cols, max(rows, cols)), tokens.shape[-1]).to(tokens)
        x = torch.cat([x, self.slots.expand(len(x), -1, -1).to(x.dtype)], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x[:, rows * cols :]))

    def targets(self, texts: Sequence[str]) -> Tensor:
        """(N, K) class ids: each text's characters, then the end mark in every remaining slot.
        A character outside the charset or a text longer than K − 1 raises, naming it."""
        out = torch.full((len(texts), self.cfg.max_chars), self.cfg.end_id, dtype=torch.long)
        for row, text in enumerate(texts):
            if len(text) >= self.cfg.max_chars:
                raise ValueError(f"text {text!r} has {len(text)} characters; this reader writes at most "
                                 f"{self.cfg.max_chars - 1}")
            unknown = sorted(set(text) - set(self._char_ids))
            if unknown:
                raise ValueError(f"text {text!r} has characters outside the reader's charset: {unknown}")
            out[row, : len(text)] = torch.tensor([self._char_ids[c] for c in text], dtype=torch.long)
        return out

    def losses(self, pixels: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Each objective's loss, by name: the slots' cross-entropy (READING_OBJECTIVE) and, with
        a presence head, the character-presence BCE (PRESENCE_OBJECTIVE); targets (N, K) as
        `targets` writes them."""
        tokens, grid = self._encode(pixels)
        logits = self._read_slots(tokens, grid)
        out = {READING_OBJECTIVE: F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())}
        if self.presence is not None:
            scores = self.presence(tokens).amax(1).float()  # (N, V-1): best evidence of each character anywhere
            present = F.one_hot(targets, self.cfg.end_id + 1).amax(1)[:, : self.cfg.end_id].to(scores.dtype)
            out[PRESENCE_OBJECTIVE] = F.binary_cross_entropy_with_logits(scores, present)
        return out

    def loss(self, pixels: Tensor, targets: Tensor, weights: Mapping[str, float] | None = None) -> Tensor:
        """`weighted_total` of `losses` (default weights: the slot loss alone)."""
        return weighted_total(self.losses(pixels, targets), weights or {READING_OBJECTIVE: 1.0})

    @torch.no_grad()
    def read(self, pixels: Tensor) -> list[str]:
        """Greedy transcription of (N, 3, H, W) normalised pixels."""
        return self.decode(self(pixels))

    def decode(self, logits: Tensor) -> list[str]:
        """(N, K, V) slot logits → each slot's best class, up to the first end mark."""
        texts = []
        for row in logits.argmax(-1).tolist():
            end = row.index(self.cfg.end_id) if self.cfg.end_id in row else len(row)
            texts.append("".join(self.cfg.charset[c] for c in row[:end]))
        return texts


def weighted_total(parts: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Σ weight · loss over the named objectives; one that `parts` lacks raises, naming it."""
    missing = sorted(set(weights) - set(parts))
    if missing:
        hint = " (build the reader with presence_head=True)" if PRESENCE_OBJECTIVE in missing else ""
        raise ValueError(f"the SlotReader computes {sorted(parts)}, not {missing}{hint}")
    return torch.stack([w * parts[name] for name, w in weights.items()]).sum()
