"""High-resolution ViTDet / SAM-style image encoder with a convolutional neck (Vary's "new vision
vocabulary" network).

Blocks are pre-norm transformer blocks; most attend within non-overlapping windows of
`window_size`×`window_size` patches (the grid is zero-padded to a multiple of the window, as
SAM does, and the padding is attended to, as SAM does), a few (`global_attn_indexes`) attend
over the whole grid. The neck maps the width down to `neck_channels` (1×1 conv + LayerNorm2d,
3×3 conv + LayerNorm2d), then Vary's two stride-2 3×3 convs halve the grid twice while widening
the channels: SAM-base at 1024 px gives a 64×64×256 map and Vary turns it into 16×16 = 256
tokens of width 1024. Every attention call is `tessera.nn.attention.attention`. Positions:
absolute (`pos_embed`, interpolated for other input sizes) and, with `use_rel_pos` (SAM's
setting), SAM's decomposed relative positions: per block, a table per axis of 2·size − 1 rows
(size = the window, or the whole grid in global blocks) whose rows are looked up by each
query-key offset, dotted with the (unscaled) query and added to the attention logits. They
make attention depend on where a key is relative to the query; on rendered text a from-scratch
tiny encoder generalises better with them (first-word probe 0.23 → 0.36; RESULTS.md, session 10).

Parameter names follow SAM's ImageEncoderViT as Vary ships it: patch_embed.proj (or patch_embed.stem.*), pos_embed,
blocks.N.{norm1, attn.qkv, attn.proj, attn.rel_pos_h, attn.rel_pos_w, norm2, mlp.lin1, mlp.lin2},
neck.{0,1,2,3}, net_2, net_3.

Shapes:
    N   images, (3, H, W) each, H and W multiples of the patch size p
    g   patch grid (H/p × W/p), E width, w window side
    T   output tokens per image: ⌈⌈H/p / 2⌉ / 2⌉ × ⌈⌈W/p / 2⌉ / 2⌉, C = downsample_channels[1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.nn.attention import attention
from tessera.nn.layers import Activation, ConvStem, activation_fn, check_conv_stem
from tessera.vision.vit import VisionOutput, checked_inputs


class ViTDetConfig(Config):
    kind: Literal["vitdet"] = "vitdet"
    image_size: int = 64  # the square size pos_embed is learned for (SAM / Vary: 1024)
    patch_size: int = 4
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    act: Activation = "gelu"
    layer_norm_eps: float = 1e-6
    num_channels: int = 3
    window_size: int = 4  # 0: every block global
    global_attn_indexes: tuple[int, ...] = (1, 3)
    use_rel_pos: bool = False  # SAM's decomposed relative positions (SAM and Vary: True)
    # "patch": SAM's one p×p stride-p convolution (patch_embed.proj). "conv_stem": a 3×3 convolution
    # at full resolution, then log2(p) stride-2 3×3 convolutions (patch_embed.stem.*), the early-
    # convolution stem of Xiao et al. 2021, for a network trained from scratch on little data.
    patch_embed: Literal["patch", "conv_stem"] = "patch"
    neck_channels: int = 32
    downsample_channels: tuple[int, int] = (64, 128)  # Vary's net_2 and net_3

    @field_validator("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "neck_channels")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _shapes(self) -> ViTDetConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside [0, {self.num_layers})")
        if self.window_size < 0 or any(c <= 0 for c in self.downsample_channels):
            raise ValueError("window_size must be ≥ 0 and downsample_channels positive")
        if self.patch_embed == "conv_stem":
            check_conv_stem(self.patch_size, self.hidden_size)
        return self

    @property
    def class_token(self) -> bool:
        return False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def output_width(self) -> int:
        return self.downsample_channels[1]


def _halve(n: int) -> int:
    return (n + 1) // 2  # a 3×3 conv with stride 2 and padding 1


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (N, C, H, W) map (SAM's neck)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """SAM's patch embedding (`proj`), or with patch_embed="conv_stem" a convolutional stem (`stem`)
    with the same output grid: on rendered text the tiny from-scratch network memorises its
    training images with one p×p convolution and reads words in new places with the stem
    (first-word probe 0.23 → 0.67 on the same 4,000 images; RESULTS.md, session 11)."""

    def __init__(self, cfg: ViTDetConfig) -> None:
        super().__init__()
        self.uses_stem = cfg.patch_embed == "conv_stem"
        if not self.uses_stem:
            self.proj = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            return
        self.stem = ConvStem(cfg.num_channels, cfg.hidden_size, cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) → (N, g_h, g_w, E)."""
        return (self.stem(x) if self.uses_stem else self.proj(x)).permute(0, 2, 3, 1)


def relative_table(q_size: int, k_size: int, table: Tensor) -> Tensor:
    """(q_size, k_size, D): the row of `table` ((2·size − 1, D), offset −(size − 1) first) for
    each query-key offset along one axis; the table is linearly resized when the axis has
    another length than it was made for, and offsets are scaled when q and k lengths differ
    (SAM's get_rel_pos)."""
    rows = 2 * max(q_size, k_size) - 1
    if table.shape[0] != rows:
        table = F.interpolate(table.t()[None], size=rows, mode="linear")[0].t()
    q_coords = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[offsets.long()]


class WindowAttention(nn.Module):
    """Multi-head self-attention over (N, h, w, E) maps, with SAM's fused qkv projection and,
    given `rel_pos_size` (the (h, w) it attends over), SAM's decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, rel_pos_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = rel_pos_size is not None
        if rel_pos_size is not None:
            head_dim = dim // num_heads
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, head_dim))

    def relative_bias(self, q: Tensor, h: int, w: int) -> Tensor:
        """(n, H, h·w, h·w) bias: query (i, j) to key (k, l) gets q·Rh[i−k] + q·Rw[j−l]."""
        n, heads, _, d = q.shape
        r_q = q.reshape(n, heads, h, w, d)
        rel_h = torch.einsum("nHhwd,hkd->nHhwk", r_q, relative_table(h, h, self.rel_pos_h).to(q.dtype))
        rel_w = torch.einsum("nHhwd,wkd->nHhwk", r_q, relative_table(w, w, self.rel_pos_w).to(q.dtype))
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(n, heads, h * w, h * w)

    def forward(self, x: Tensor) -> Tensor:
        n, h, w, dim = x.shape
        q, k, v = self.qkv(x).view(n, h * w, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_bias(q, h, w) if self.use_rel_pos else None
        out = attention(q, k, v, causal=False, bias=bias)  # (n, H, h·w, D)
        return self.proj(out.transpose(1, 2).reshape(n, h, w, dim))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, act: Activation) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = activation_fn(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """(N, h, w, E) → (N·nW, window, window, E), zero-padding h and w up to multiples of window."""
    n, h, w, e = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(n, hp // window, window, wp // window, window, e).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, e), (hp, wp)


def window_unpartition(windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of window_partition: (N·nW, window, window, E) → (N, h, w, E)."""
    hp, wp = padded
    n = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(n, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hp, wp, -1)[:, : size[0], : size[1]]


class Block(nn.Module):
    def __init__(self, cfg: ViTDetConfig, window: int) -> None:
        super().__init__()
        self.window = window  # 0: global attention
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        size = (window, window) if window else (cfg.grid, cfg.grid)
        self.attn = WindowAttention(cfg.hidden_size, cfg.num_heads, size if cfg.use_rel_pos else None)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLPBlock(cfg.hidden_size, cfg.intermediate_size, cfg.act)

    def forward(self, x: Tensor) -> Tensor:
        """(N, h, w, E) → (N, h, w, E)."""
        h = self.norm1(x)
        if self.window:
            windows, padded = window_partition(h, self.window)
            h = window_unpartition(self.attn(windows), self.window, padded, (x.shape[1], x.shape[2]))
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class ViTDet(nn.Module):
    def __init__(self, cfg: ViTDetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.hidden_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.num_layers)
        )
        c = cfg.neck_channels
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.hidden_size, c, kernel_size=1, bias=False), LayerNorm2d(c),
            nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False), LayerNorm2d(c),
        )
        c2, c3 = cfg.downsample_channels
        self.net_2 = nn.Conv2d(c, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1, bias=False)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the output token grid for an image of this size."""
        p = self.cfg.patch_size
        if height < p or width < p or height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a positive multiple of the patch size {p}; resize it")
        return _halve(_halve(height // p)), _halve(_halve(width // p))

    def num_tokens(self, height: int, width: int) -> int:
        rows, cols = self.token_grid(height, width)
        return rows * cols

    def positions(self, rows: int, cols: int) -> Tensor:
        """(1, rows, cols, E): pos_embed, bicubic-interpolated for grids other than the learned one."""
        if (rows, cols) == (self.cfg.grid, self.cfg.grid):
            return self.pos_embed
        table = F.interpolate(self.pos_embed.permute(0, 3, 1, 2), size=(rows, cols), mode="bicubic",
                              align_corners=False)
        return table.permute(0, 2, 3, 1)

    def neck_map(self, pixels: Tensor, num_layers: int | None = None) -> Tensor:
        """(N, 3, H, W) of one size → (N, neck_channels, H/p, W/p): SAM's image embedding."""
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))
        x = x + self.positions(x.shape[1], x.shape[2]).to(x.dtype)
        for block in self.blocks[: self.cfg.num_layers if num_layers is None else num_layers]:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))

    def feature_map(self, pixels: Tensor, num_layers: int | None = None) -> Tensor:
        """(N, 3, H, W) of one size → (N, C, rows, cols) after the neck and Vary's two stride-2 convs."""
        return self.net_3(self.net_2(self.neck_map(pixels, num_layers)))

    def forward(self, images: Sequence[Tensor] | Tensor, num_layers: int | None = None) -> VisionOutput:
        """Encode a list of (3, H, W) images; hidden (T, C) holds each image's output tokens in
        raster order, image after image. Images of one size run as one batch."""
        images, n_layers = checked_inputs(images, self.cfg.num_channels, num_layers, self.cfg.num_layers)
        grids = [self.token_grid(img.shape[1], img.shape[2]) for img in images]
        if len({tuple(img.shape) for img in images}) == 1:
            maps = [self.feature_map(torch.stack(list(images)), n_layers)]
        else:
            maps = [self.feature_map(img[None], n_layers) for img in images]
        hidden = torch.cat([m.flatten(2).transpose(1, 2).reshape(-1, m.shape[1]) for m in maps])
        lengths = [r * c for r, c in grids]
        cu = torch.tensor([0, *lengths], device=hidden.device).cumsum(0).to(torch.int32)
        return VisionOutput(hidden=hidden, cu_seqlens=cu, grids=grids, has_class_token=False)
