"""NaViT-style vision encoder ("Patch n' Pack"): images at their native resolution and aspect
ratio, the patches of many images packed into one sequence (POINTS-1.5's encoder).

- Packing: every image's patches go into ONE row (1, T, E); `cu_seqlens` holds each image's
  start offset, and `tessera.nn.attention.attention` keeps attention block-diagonal, so an
  image computes exactly what it computes alone.
- Factorised positions: a row table and a column table (G entries each), summed.
- Fractional positions: patch (r, c) of an R×C grid reads entries ⌊r·G/R⌋ and ⌊c·G/C⌋, i.e.
  its position normalised to [0, 1) by its own image's grid, so a resolution or aspect ratio
  never seen in training still lands inside the tables (absolute positions, the alternative,
  need R, C ≤ G).
- Token dropping: during training a share `drop_rate` of each image's patches (one rate for
  all images or one per image) is removed after the position embeddings are added, so the
  kept tokens keep their positions; `NaViTOutput.kept` says which patches survived and
  `cu_seqlens` counts only those.
- Masked pooling: `pooled` averages each image's kept tokens only (one vector per image).

Resolution sampling (NaViT's other speed-up) belongs to the data side. Inside an LVLM the
encoder runs without dropping: the image placeholders are expanded before the model runs,
so each image's token count must be the one `num_tokens` promised.

Parameter names follow `tessera.vision.vit` (HF CLIP names) wherever the part is the same:
embeddings.patch_embedding (or embeddings.patch_stem.*, the ViT's conv stem), pre_layrnorm,
encoder.layers.N.*, post_layernorm; the factorised tables are embeddings.row_embedding and
embeddings.col_embedding. `init_from_vit` therefore takes a pretrained CLIP-style ViT's weights
directly.

Shapes:
    N       images                         (3, H_i, W_i), H_i and W_i multiples of the patch size p
    R_i×C_i patch grid of image i          (H_i / p) × (W_i / p), P_i = R_i·C_i patches
    K_i     patches kept of image i        P_i without dropping
    T       tokens of the packed row       Σ K_i
    E       width      G  entries of each position table
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.nn.layers import Activation, ConvStem, check_conv_stem
from tessera.vision.vit import VisionOutput, ViTEncoder, checked_inputs


class NaViTConfig(Config):
    kind: Literal["navit"] = "navit"
    # Side of the square images the data pipeline feeds by default; any size that is a
    # multiple of the patch size runs (the point of NaViT).
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    pre_layernorm: bool = True
    patch_bias: bool = False
    patch_embed: Literal["patch", "conv_stem"] = "patch"  # as ViTConfig: one p×p convolution or `ConvStem`
    stem_width: int | None = None
    position_buckets: int = 8  # G: entries of the row table and of the column table
    fractional_positions: bool = True
    token_drop_rate: float = 0.0  # share of each image's patches dropped in training mode
    max_patches: int = 4096  # per image; a larger image is refused (resize it first)

    @field_validator("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "position_buckets", "max_patches")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("token_drop_rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _shapes(self) -> NaViTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.patch_embed == "conv_stem":
            check_conv_stem(self.patch_size, self.hidden_size, self.stem_width)
        return self

    @property
    def class_token(self) -> bool:
        return False  # one pooled vector per image comes from masked pooling instead

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class NaViTOutput(VisionOutput):
    # Per image: the raster indices (r·C_i + c, ascending) of the patches that were kept.
    kept: list[Tensor] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each image in `hidden` (kept patches)."""
        return [int(k.numel()) for k in self.kept]

    def coords(self, image: int) -> Tensor:
        """(K_i, 2) long: (row, col) of image i's kept patches in its R_i×C_i grid."""
        cols = self.grids[image][1]
        k = self.kept[image]
        return torch.stack([k // cols, k % cols], dim=1)


class NaViTEmbeddings(nn.Module):
    def __init__(self, cfg: NaViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.patch_embed == "conv_stem":
            self.patch_stem = ConvStem(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.stem_width)
        else:
            self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                             stride=cfg.patch_size, bias=cfg.patch_bias)
        self.row_embedding = nn.Embedding(cfg.position_buckets, cfg.hidden_size)
        self.col_embedding = nn.Embedding(cfg.position_buckets, cfg.hidden_size)

    def position_index(self, n: int, axis: str) -> Tensor:
        """(n,) table entries of the n patches along one axis."""
        g = self.cfg.position_buckets
        idx = torch.arange(n, device=self.row_embedding.weight.device)
        if self.cfg.fractional_positions:
            return idx * g // n  # ⌊(i / n) · G⌋: the position normalised to [0, 1), exactly
        if n > g:
            raise ValueError(f"an image {n} patches {axis} exceeds the {g}-entry absolute position table; "
                             "use fractional_positions or more position_buckets")
        return idx

    def positions(self, rows: int, cols: int) -> Tensor:
        """(rows·cols, E), raster order: row table + column table."""
        r = self.row_embedding(self.position_index(rows, "high"))
        c = self.col_embedding(self.position_index(cols, "wide"))
        return (r[:, None, :] + c[None, :, :]).reshape(rows * cols, -1)

    def forward(self, image: Tensor) -> Tensor:
        """(3, H, W) → (R·C, E) patch embeddings with positions."""
        embed = self.patch_stem if self.cfg.patch_embed == "conv_stem" else self.patch_embedding
        x = embed(image[None].to(self.row_embedding.weight.dtype))[0]  # (E, R, C); a stem sees one image at a time
        rows, cols = x.shape[-2:]
        return x.flatten(1).transpose(0, 1) + self.positions(rows, cols).to(x.dtype)


class NaViT(nn.Module):
    def __init__(self, cfg: NaViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = NaViTEmbeddings(cfg)
        self.pre_layrnorm: nn.Module = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_layernorm else nn.Identity()
        )
        # The same layers as the ViT (one EncoderLayer implementation), so weights transfer.
        self.encoder = ViTEncoder(cfg)  # type: ignore[arg-type]  # reads only the fields both configs have
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the patch grid of an image of this size; errors name the problem."""
        p = self.cfg.patch_size
        if height < p or width < p:
            raise ValueError(f"image size {height}x{width} is smaller than one {p}x{p} patch")
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}; resize it")
        rows, cols = height // p, width // p
        if rows * cols > self.cfg.max_patches:
            raise ValueError(f"image size {height}x{width} gives {rows * cols} patches, more than max_patches "
                             f"{self.cfg.max_patches}; resize it")
        return rows, cols

    def num_tokens(self, height: int, width: int) -> int:
        """Tokens an image of this size produces without dropping."""
        rows, cols = self.token_grid(height, width)
        return rows * cols

    @staticmethod
    def kept_count(patches: int, rate: float) -> int:
        """Patches kept of `patches` at drop rate `rate`: round((1 - rate)·P), at least 1."""
        return max(1, round(patches * (1.0 - rate)))

    def forward(
        self, images: Sequence[Tensor] | Tensor, num_layers: int | None = None, *,
        drop_rate: float | Sequence[float] | None = None, generator: torch.Generator | None = None,
    ) -> NaViTOutput:
        """Encode a list of (3, H_i, W_i) images packed into one row.

        drop_rate: the share of each image's patches to drop (one value, or one per image);
        None means `cfg.token_drop_rate` in training mode and no dropping in eval mode.
        The kept patches of an image are a uniform random subset (from `generator`), kept in
        raster order. Runs the first `num_layers` layers (all by default).
        """
        images, n_layers = checked_inputs(images, self.cfg.num_channels, num_layers, self.cfg.num_layers)
        grids = [self.token_grid(img.shape[1], img.shape[2]) for img in images]
        if drop_rate is None:
            drop_rate = self.cfg.token_drop_rate if self.training else 0.0
        rates = [float(drop_rate)] * len(images) if isinstance(drop_rate, int | float) else [float(r) for r in drop_rate]
        if len(rates) != len(images) or any(not 0 <= r < 1 for r in rates):
            raise ValueError(f"drop_rate must be one value or one per image, each in [0, 1); got {drop_rate}")

        pieces, kept = [], []
        for img, (rows, cols), rate in zip(images, grids, rates, strict=True):
            tokens = self.embeddings(img)  # positions added before dropping: kept tokens keep theirs
            n = rows * cols
            if rate > 0:
                keep = torch.randperm(n, generator=generator)[: self.kept_count(n, rate)].sort().values
                keep = keep.to(tokens.device)
                tokens = tokens[keep]
            else:
                keep = torch.arange(n, device=tokens.device)
            pieces.append(tokens)
            kept.append(keep)
        lengths = [int(k.numel()) for k in kept]
        cu = torch.tensor([0, *lengths], device=pieces[0].device).cumsum(0).to(torch.int32)
        x = self.pre_layrnorm(torch.cat(pieces)[None])  # (1, T, E)
        for layer in self.encoder.layers[:n_layers]:
            x = layer(x, cu_seqlens=cu)
        return NaViTOutput(hidden=x[0], cu_seqlens=cu, grids=grids, has_class_token=False, kept=kept)

    def pooled(self, out: NaViTOutput) -> Tensor:
        """(N, E): the mean of each image's kept tokens (masked pooling), post-normed."""
        lengths = torch.tensor(out.lengths, device=out.hidden.device)
        segment = torch.repeat_interleave(torch.arange(len(out.lengths), device=out.hidden.device), lengths)
        sums = out.hidden.new_zeros(len(out.lengths), out.hidden.shape[-1]).index_add_(0, segment, out.hidden)
        return self.post_layernorm(sums / lengths[:, None].to(sums.dtype))

    @torch.no_grad()
    def init_from_vit(self, vit_state: dict[str, Tensor]) -> None:
        """Start from a CLIP-style ViT's weights (`tessera.vision.vit` names): the patch
        embedding, pre-norm, layers and post-norm as they are; the row and column tables as
        the best additive fit of the ViT's 2D position table (row means, and column means minus
        the overall mean), resampled to G entries. The class token and its position go unused."""
        own = self.state_dict()
        taken = {k: v for k, v in vit_state.items() if k in own and not k.startswith("embeddings.")}
        taken.update({k: v for k, v in vit_state.items()
                      if k in own and k.startswith(("embeddings.patch_embedding.", "embeddings.patch_stem."))})
        table = vit_state["embeddings.position_embedding.weight"]
        if "embeddings.class_embedding" in vit_state:
            table = table[1:]
        g = math.isqrt(table.shape[0])
        if g * g != table.shape[0]:
            raise ValueError(f"the ViT's position table has {table.shape[0]} patch entries, not a square grid")
        grid = table.reshape(g, g, -1).float()
        rows, cols = grid.mean(1), grid.mean(0) - grid.mean((0, 1))
        buckets = self.cfg.position_buckets
        if g != buckets:
            rows, cols = (F.interpolate(t.T[None], size=buckets, mode="linear", align_corners=False)[0].T
                          for t in (rows, cols))
        taken["embeddings.row_embedding.weight"] = rows.to(table.dtype)
        taken["embeddings.col_embedding.weight"] = cols.to(table.dtype)
        missing = sorted(set(own) - set(taken))
        if missing:
            raise ValueError(f"the ViT weights do not cover this NaViT: missing {missing[:5]}")
        for k, v in taken.items():
            if own[k].shape != v.shape:
                raise ValueError(f"ViT weight {k} has shape {tuple(v.shape)}, this NaViT needs {tuple(own[k].shape)}")
        self.load_state_dict(taken)
