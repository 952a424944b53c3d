"""Small building blocks shared by every model: norms, activations, rotary embeddings, MLPs,
the convolutional patch stem.

Parameter names follow the Hugging Face modules of the same family so that checkpoints map
one-to-one (fc1/fc2 for CLIP MLPs, gate_proj/up_proj/down_proj for LLaMA MLPs).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Activation = Literal["gelu", "gelu_tanh", "quick_gelu", "silu", "relu"]


def activation_fn(name: Activation):
    """The activation for a config name (HF spellings: gelu_pytorch_tanh → gelu_tanh)."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}; allowed: gelu, gelu_tanh, quick_gelu, silu, relu")


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalised in float32, scaled in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """Two linear layers with an activation between (CLIP / ViT / BERT feed-forward)."""

    def __init__(self, dim: int, hidden: int, act: Activation, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.act = activation_fn(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """SwiGLU feed-forward of LLaMA: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, act: Activation = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation_fn(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (the non-interleaved "rotate half" layout of LLaMA / HF).

    `linear_scaling` > 1 divides positions (HF rope_type "linear").
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, linear_scaling: float = 1.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq / linear_scaling, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids (B, L) → cos, sin of shape (B, 1, L, D), ready to broadcast over heads."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, D) rotated by the angles in cos/sin (B, 1, L, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def check_conv_stem(patch_size: int, width: int, first_width: int | None = None) -> None:
    """Refuse a conv stem that cannot be built: it halves the image log2(patch_size) times, and its
    first width (ConvStem's `first_width`, the configs' `stem_width`) lies in [1, width]."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"patch_embed 'conv_stem' halves the image log2(patch_size) times; patch_size must be a "
                         f"power of 2 (>= 2), got {patch_size}")
    if first_width is not None and not 0 < first_width <= width:
        raise ValueError(f"the conv stem's first width (stem_width / first_width) must be in [1, width={width}], "
                         f"got {first_width}")


class ConvStem(nn.Sequential):
    """The "early convolutions" patch stem of Xiao et al. 2021, a drop-in for one p×p stride-p patch
    convolution: a 3×3 convolution at full resolution to `first_width` channels (default width/2),
    then log2(p) stride-2 3×3 convolutions (GELU between) that double the channels up to `width`.
    (N, C, H, W) → (N, width, H/p, W/p) for H, W multiples of p. A from-scratch ViT trained on
    little data gets a locality bias from it (the first-word probe on rendered text went 0.23 →
    0.67 on the same images; RESULTS.md, session 11). Parameters are `0.*`, `2.*`, `4.*`, …: an
    nn.Sequential's names."""

    def __init__(self, in_channels: int, width: int, patch_size: int, first_width: int | None = None) -> None:
        check_conv_stem(patch_size, width, first_width)
        channels = width // 2 if first_width is None else first_width
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)]
        for _ in range(patch_size.bit_length() - 1):
            wider = min(2 * channels, width)
            layers += [nn.GELU(), nn.Conv2d(channels, wider, kernel_size=3, stride=2, padding=1)]
            channels = wider
        if channels != width:  # too few halvings to double up to the width
            layers += [nn.GELU(), nn.Conv2d(channels, width, kernel_size=1)]
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # oneDNN's convolutions run 1.6× faster (forward + backward, 2 CPU threads, batch 128 of 64 px)
        # on channels-last input; the weights keep their usual layout, so checkpoints are unchanged.
        return super().forward(x.contiguous(memory_format=torch.channels_last))
