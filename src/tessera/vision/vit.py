"""Vision Transformer (CLIP and SigLIP styles) that takes a list of images of any size.

Parameter names match Hugging Face's CLIPVisionModel / SiglipVisionModel without their
"vision_model." prefix: embeddings.{class_embedding, patch_embedding, position_embedding},
pre_layrnorm, encoder.layers.N.*, post_layernorm, head.{probe, attention, layernorm, mlp}.

The two styles are config options of this one module:
    CLIP    class token, pre_layrnorm, patch embedding without bias; last hidden state =
            encoder output; pooled = post_layernorm(class token).
    SigLIP  no class token, no pre-norm, patch embedding with bias; last hidden state =
            post_layernorm over all tokens; pooled = the attention-pooling head ("MAP": a
            learned probe attends over the normed tokens, then layernorm + MLP residual).
LLaVA reads intermediate layers, which are always taken before post_layernorm.

Shapes:
    N   images in the call           (3, H_i, W_i) each; H_i, W_i multiples of the patch size
    P_i patches of image i           (H_i / p) * (W_i / p)
    S_i tokens of image i            P_i + 1 with a class token
    T   tokens of the call           sum S_i
    E   width

Images of one size run as a dense (N, S, E) batch; mixed sizes are packed into one
(1, T, E) row with cu_seqlens, so no token attends across images. Either way the output
is flat: hidden (T, E) with cu_seqlens (N+1,).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.nn.attention import attention
from tessera.nn.layers import MLP, Activation, ConvStem, check_conv_stem
from tessera.nn.positions import grid_positions, sincos_2d
from tessera.nn.transformer import EncoderLayer


class ViTConfig(Config):
    image_size: int = 64  # the square grid the position table is learned for
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    class_token: bool = True
    num_channels: int = 3
    pre_layernorm: bool = True  # CLIP's pre_layrnorm after the embeddings; SigLIP has none
    patch_bias: bool = False  # SigLIP's patch embedding has a bias
    # Where post_layernorm applies: CLIP norms only the pooled class token, SigLIP every token.
    post_layernorm_on: Literal["class_token", "all_tokens"] = "class_token"
    map_head: bool = False  # SigLIP's attention-pooling head ("MAP") gives the pooled output
    # Starting value of the learned position table: "normal" is Hugging Face CLIP's N(0, 0.02);
    # "sincos" the fixed 2D sin-cos code (MAE) times `position_init_scale`, so that where a patch
    # is survives into the last layer of a tiny ViT trained from scratch (see RESULTS.md).
    position_init: Literal["normal", "sincos"] = "normal"
    position_init_scale: float = 0.5
    # "patch": CLIP's one p×p stride-p convolution (embeddings.patch_embedding). "conv_stem": the
    # early-convolution stem (embeddings.patch_stem.*, `ConvStem`), same grid; no Hugging Face
    # CLIP or SigLIP checkpoint has one, so such a ViT does not export.
    patch_embed: Literal["patch", "conv_stem"] = "patch"
    stem_width: int | None = None  # the conv stem's first width (doubling up to hidden_size); None = E/2

    @field_validator("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _shapes(self) -> ViTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.position_init == "sincos" and self.hidden_size % 4:
            raise ValueError(f"position_init='sincos' needs a hidden_size divisible by 4, got {self.hidden_size}")
        if self.position_init_scale <= 0:
            raise ValueError(f"position_init_scale must be positive, got {self.position_init_scale}")
        if self.patch_embed == "conv_stem":
            check_conv_stem(self.patch_size, self.hidden_size, self.stem_width)
        if self.map_head and self.post_layernorm_on != "all_tokens":
            raise ValueError("map_head pools the post-normed tokens: it needs post_layernorm_on='all_tokens'")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + int(self.class_token)


@dataclass
class VisionOutput:
    hidden: Tensor  # (T, E)
    cu_seqlens: Tensor  # (N+1,) int32 offsets of each image's tokens in `hidden`
    grids: list[tuple[int, int]]  # (rows, cols) of patches per image
    has_class_token: bool

    @property
    def num_images(self) -> int:
        return len(self.grids)

    def patch_tokens(self) -> Tensor:
        """(sum P_i, E): every image's patch tokens, class tokens removed, in image order."""
        if not self.has_class_token:
            return self.hidden
        keep = torch.ones(self.hidden.shape[0], dtype=torch.bool, device=self.hidden.device)
        keep[self.cu_seqlens[:-1].long()] = False
        return self.hidden[keep]

    def class_states(self) -> Tensor:
        """(N, E): the class token of each image (first token of each segment)."""
        if not self.has_class_token:
            raise ValueError("this ViT has no class token")
        return self.hidden[self.cu_seqlens[:-1].long()]


def checked_inputs(images: Sequence[Tensor] | Tensor, num_channels: int, num_layers: int | None,
                   max_layers: int) -> tuple[list[Tensor], int]:
    """The common input contract of the vision encoders: a (N, 3, H, W) batch or a list of
    (3, H, W) images becomes a non-empty list, and `num_layers` (None: all) is checked against
    the encoder's depth. Returns (images, number of layers to run)."""
    n_layers = max_layers if num_layers is None else num_layers
    if not 0 <= n_layers <= max_layers:
        raise ValueError(f"num_layers {n_layers} outside [0, {max_layers}]")
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images.unbind(0)) if images.shape[0] else []
    images = list(images)
    if len(images) == 0:
        raise ValueError("the vision encoder got no images")
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != num_channels:
            raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected ({num_channels}, H, W)")
    return images, n_layers


def box_pool(patch_grid: Tensor, image_index: Tensor, boxes: Tensor, patch_size: int) -> Tensor:
    """Mean patch token under each box: patch_grid (N, R, C, E) of N images, image_index (M,)
    the image of each box, boxes (M, 4) as (x, y, width, height) in pixels → (M, E). A patch
    counts when it overlaps the box by at least one pixel."""
    if boxes.ndim != 2 or boxes.shape[1] != 4 or image_index.shape != boxes.shape[:1]:
        raise ValueError(f"expected boxes (M, 4) and image_index (M,), got {tuple(boxes.shape)} and "
                         f"{tuple(image_index.shape)}")
    rows, cols = patch_grid.shape[1:3]
    starts_r = torch.arange(rows, device=boxes.device) * patch_size
    starts_c = torch.arange(cols, device=boxes.device) * patch_size
    x, y, w, h = boxes.unbind(1)
    in_rows = (starts_r[None] < (y + h)[:, None]) & (starts_r[None] + patch_size > y[:, None])  # (M, R)
    in_cols = (starts_c[None] < (x + w)[:, None]) & (starts_c[None] + patch_size > x[:, None])  # (M, C)
    cells = (in_rows[:, :, None] & in_cols[:, None, :]).to(patch_grid.dtype)  # (M, R, C)
    counts = cells.sum(dim=(1, 2))
    if bool((counts == 0).any()):
        raise ValueError("a box lies outside its image's patch grid")
    pooled = torch.einsum("mrc,mrce->me", cells, patch_grid[image_index])
    return pooled / counts[:, None]


def patches_in_boxes(image_index: Tensor, boxes: Tensor, grid: tuple[int, int], num_images: int,
                     patch_size: int) -> tuple[Tensor, Tensor]:
    """The patches each box owns: those whose centre lies inside the box and inside no other box
    of the same image (a patch two objects share would get two targets). image_index (M,),
    boxes (M, 4) as (x, y, width, height) in pixels, grid (R, C) → (box (K,), patch (K,)) where
    patch indexes the flat (N · R · C) patch tokens of `patch_tokens()`."""
    if boxes.ndim != 2 or boxes.shape[1] != 4 or image_index.shape != boxes.shape[:1]:
        raise ValueError(f"expected boxes (M, 4) and image_index (M,), got {tuple(boxes.shape)} and "
                         f"{tuple(image_index.shape)}")
    rows, cols = grid
    centres_r = torch.arange(rows, device=boxes.device) * patch_size + patch_size / 2
    centres_c = torch.arange(cols, device=boxes.device) * patch_size + patch_size / 2
    x, y, w, h = boxes.unbind(1)
    in_rows = (centres_r[None] >= y[:, None]) & (centres_r[None] < (y + h)[:, None])  # (M, R)
    in_cols = (centres_c[None] >= x[:, None]) & (centres_c[None] < (x + w)[:, None])  # (M, C)
    cells = in_rows[:, :, None] & in_cols[:, None, :]  # (M, R, C)
    cover = torch.zeros(num_images, rows, cols, device=boxes.device).index_add_(0, image_index, cells.float())
    owned = cells & (cover[image_index] == 1)
    box, r, c = owned.nonzero(as_tuple=True)
    return box, (image_index[box] * rows + r) * cols + c


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        if cfg.patch_embed == "conv_stem":
            self.patch_stem = ConvStem(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.stem_width)
        else:
            self.patch_embedding = nn.Conv2d(
                cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                bias=cfg.patch_bias,
            )
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)
        # Hugging Face CLIP's initializer_range. nn.Embedding's N(0, 1) would swamp the patch
        # content: a tiny ViT trained from scratch then learns colour at once but object shape
        # only slowly (measured on ShapesWorld, see RESULTS.md).
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        if cfg.position_init == "sincos":
            # Each row has norm √(E/2)·scale (E/4 sin-cos pairs per axis), comparable with a patch's content.
            code = sincos_2d(*grid_positions(cfg.grid, cfg.grid, cfg.grid), cfg.hidden_size)
            with torch.no_grad():
                self.position_embedding.weight[int(cfg.class_token):] = code * cfg.position_init_scale

    def positions(self, rows: int, cols: int) -> Tensor:
        """(S, E) position embeddings for a rows×cols patch grid, bicubic-interpolated when it
        differs from the learned square grid (as Hugging Face's interpolate_pos_encoding)."""
        table = self.position_embedding.weight
        n_cls = int(self.cfg.class_token)
        g = self.cfg.grid
        if (rows, cols) == (g, g):
            return table
        patch = table[n_cls:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(rows, cols), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(rows * cols, -1)
        return torch.cat([table[:n_cls], patch], dim=0)

    def embed_patches(self, pixels: Tensor) -> Tensor:
        """pixels (N, 3, H, W), one size → (N, E, H/p, W/p) patch features, before positions."""
        embed = self.patch_stem if self.cfg.patch_embed == "conv_stem" else self.patch_embedding
        return embed(pixels.to(self.position_embedding.weight.dtype))

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (N, 3, H, W), one size → (N, S, E)."""
        x = self.embed_patches(pixels)
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if self.cfg.class_token:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        return x + self.positions(rows, cols)


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.act, cfg.layer_norm_eps)
            for _ in range(cfg.num_layers)
        )


class PoolingAttention(nn.Module):
    """Multi-head attention of a few queries over the tokens of each image. Parameters are laid
    out as torch.nn.MultiheadAttention's (in_proj_weight holds q, k, v stacked), which is what
    SigLIP checkpoints store; the computation goes through Tessera's `attention`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self, queries: Tensor, tokens: Tensor, key_padding_mask: Tensor | None, values: Tensor | None = None
    ) -> Tensor:
        """queries (N, Q, E), tokens (N, S, E), key_padding_mask (N, S) True = real → (N, Q, E).
        Keys come from `tokens`, values from `values` when given (Qwen-VL's resampler adds
        position encodings to the keys only), else from `tokens`."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        n, dim = tokens.shape[0], tokens.shape[-1]

        def heads(x: Tensor) -> Tensor:
            return x.view(n, x.shape[1], self.num_heads, dim // self.num_heads).transpose(1, 2)

        q = heads(F.linear(queries, w_q, b_q))
        k = heads(F.linear(tokens, w_k, b_k))
        v = heads(F.linear(tokens if values is None else values, w_v, b_v))
        out = attention(q, k, v, causal=False, key_padding_mask=key_padding_mask)
        return self.out_proj(out.transpose(1, 2).reshape(n, queries.shape[1], dim))


class AttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling (MAP): one learned probe per image attends over the
    image's tokens; then x + mlp(layernorm(x)). Names match SiglipMultiheadAttentionPoolingHead."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.hidden_size) * 0.02)
        self.attention = PoolingAttention(cfg.hidden_size, cfg.num_heads)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.act)

    def forward(self, hidden: Tensor, cu_seqlens: Tensor) -> Tensor:
        """hidden (T, E) of N images with offsets cu_seqlens (N+1,) → (N, E)."""
        tokens, mask = _pad_segments(hidden, cu_seqlens)
        x = self.attention(self.probe.expand(tokens.shape[0], -1, -1), tokens, mask)
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


def _pad_segments(hidden: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor | None]:
    """(T, E) packed segments → (N, S_max, E) and a (N, S_max) real-token mask (None when every
    segment has the same length, so attention needs no mask)."""
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    if len(set(lengths)) == 1:
        return hidden.reshape(len(lengths), lengths[0], -1), None
    longest = max(lengths)
    padded = hidden.new_zeros(len(lengths), longest, hidden.shape[-1])
    mask = torch.zeros(len(lengths), longest, dtype=torch.bool, device=hidden.device)
    for i, (start, length) in enumerate(zip(bounds[:-1], lengths, strict=True)):
        padded[i, :length] = hidden[start : start + length]
        mask[i, :length] = True
    return padded, mask


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        # Identity holds no parameters, so a SigLIP state dict has no pre_layrnorm keys.
        self.pre_layrnorm: nn.Module = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_layernorm else nn.Identity()
        )
        self.encoder = ViTEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.map_head:
            self.head = AttentionPoolingHead(cfg)

    def num_tokens(self, height: int, width: int) -> int:
        """Tokens (class token included) that an image of this size produces."""
        p = self.cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        return (height // p) * (width // p) + int(self.cfg.class_token)

    def forward(self, images: Sequence[Tensor] | Tensor, num_layers: int | None = None) -> VisionOutput:
        """Run the first `num_layers` layers (all by default) over a list of (3, H, W) images.

        LLaVA reads the second-to-last layer: num_layers = L - 1 computes exactly that and
        skips the last layer instead of computing and discarding it.
        """
        images, n_layers = checked_inputs(images, self.cfg.num_channels, num_layers, self.cfg.num_layers)
        for img in images:
            self.num_tokens(img.shape[1], img.shape[2])
        p = self.cfg.patch_size
        grids = [(img.shape[1] // p, img.shape[2] // p) for img in images]
        lengths = [r * c + int(self.cfg.class_token) for r, c in grids]
        cu = torch.tensor([0, *lengths], device=images[0].device).cumsum(0).to(torch.int32)

        if len(set(grids)) == 1:
            x = self.pre_layrnorm(self.embeddings(torch.stack(list(images))))  # (N, S, E)
            for layer in self.encoder.layers[:n_layers]:
                x = layer(x)
            hidden = x.reshape(-1, x.shape[-1])
        else:
            x = torch.cat([self.embeddings(img[None])[0] for img in images])[None]  # (1, T, E)
            x = self.pre_layrnorm(x)
            for layer in self.encoder.layers[:n_layers]:
                x = layer(x, cu_seqlens=cu)
            hidden = x[0]
        return VisionOutput(hidden=hidden, cu_seqlens=cu, grids=grids, has_class_token=self.cfg.class_token)

    def last_hidden_state(self, out: VisionOutput) -> Tensor:
        """(T, E): Hugging Face's last_hidden_state, the encoder output, post-normed in SigLIP
        style (post_layernorm_on="all_tokens") and as it is in CLIP style."""
        if self.cfg.post_layernorm_on == "all_tokens":
            return self.post_layernorm(out.hidden)
        return out.hidden

    def pooled(self, out: VisionOutput) -> Tensor:
        """(N, E): the pooled output, CLIP's post_layernorm of each class token or SigLIP's
        attention pooling over each image's normed tokens."""
        if self.cfg.map_head:
            return self.head(self.last_hidden_state(out), out.cu_seqlens)
        if self.cfg.post_layernorm_on == "all_tokens":
            raise ValueError("this ViT has no pooled output: no class-token pooling and no map_head")
        return self.post_layernorm(out.class_states())
