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

Shapes:
    N   images, each (3, H, W), all of one size in a batch
    P   encoder output tokens per image (grid rows·cols; a ViT's class token left out), width E
    K   slots = `max_chars` (the longest text plus its end mark)
    V   len(charset) + 1 classes; class len(charset) = end of text
"""

from __future__ import annotations

from collections.abc import Sequence

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


class SlotReaderConfig(Config):
    vision: ViTDetConfig | ViTConfig
    charset: str  # every character the reader can write, each once
    max_chars: int  # slots: characters of the longest text plus the end mark
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4

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
    def for_texts(cls, vision: ViTDetConfig | ViTConfig, texts: Sequence[str], **options: int) -> SlotReaderConfig:
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
        self._char_ids = {c: i for i, c in enumerate(cfg.charset)}

    def forward(self, pixels: Tensor) -> Tensor:
        """(N, 3, H, W) normalised pixels → slot logits (N, K, V)."""
        vision = self.encoder(pixels)
        if len(set(vision.grids)) != 1:
            raise ValueError(f"a slot reader reads images of one size per batch, got grids {sorted(set(vision.grids))}")
        rows, cols = vision.grids[0]
        tokens = vision.patch_tokens().reshape(vision.num_images, rows * cols, -1)
        tokens = tokens + sincos_2d(*grid_positions(rows, cols, max(rows, cols)), tokens.shape[-1]).to(tokens)
        x = torch.cat([tokens, self.slots.expand(len(tokens), -1, -1).to(tokens.dtype)], dim=1)
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

    def loss(self, pixels: Tensor, targets: Tensor) -> Tensor:
        logits = self(pixels)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

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
