"""CLIP-style Vision Transformer that takes a list of images of any size.

Parameter names match Hugging Face's CLIPVisionModel without its "vision_model." prefix:
embeddings.{class_embedding, patch_embedding, position_embedding}, pre_layrnorm,
encoder.layers.N.*, post_layernorm.

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

import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch import Tensor, nn

from tessera.config import Config
from tessera.nn.layers import Activation
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


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

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

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (N, 3, H, W), one size → (N, S, E)."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
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


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = ViTEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

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
        n_layers = self.cfg.num_layers if num_layers is None else num_layers
        if not 0 <= n_layers <= self.cfg.num_layers:
            raise ValueError(f"num_layers {n_layers} outside [0, {self.cfg.num_layers}]")
        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images.unbind(0)) if images.shape[0] else []
        if len(images) == 0:
            raise ValueError("the vision encoder got no images")
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != self.cfg.num_channels:
                raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected ({self.cfg.num_channels}, H, W)")
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

    def pooled(self, out: VisionOutput) -> Tensor:
        """(N, E): the CLIP pooled output, post_layernorm of each class token."""
        return self.post_layernorm(out.class_states())
