"""Safe image loading and the image-to-tensor transform used by every Tessera dataset.

Decoding is done eagerly so that a truncated or corrupt file fails here, with the file named,
instead of deep inside a DataLoader worker. Transforms use only Pillow and numpy; datasets can
keep small uint8 tensors in memory (``ImageTransform.to_uint8``) and normalise whole batches
later (``ImageTransform.normalize_uint8``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Transparent pixels are shown over white, which is what a viewer would show.
_TRANSPARENCY_BACKGROUND = (255, 255, 255)


class ImageError(Exception):
    """An image file could not be read; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


def _to_rgb(img: Image.Image) -> Image.Image:
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_TRANSPARENCY_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode and convert an image to RGB; raise ``ImageError`` on any failure."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except Exception as error:
        # Pillow signals bad data with many unrelated exception types (OSError, SyntaxError,
        # ValueError, struct.error, DecompressionBombError, ...); all mean "unreadable file".
        raise ImageError(path, f"{type(error).__name__}: {error}") from error


@dataclass(frozen=True)
class ImageTransform:
    """Resize (bicubic) to ``size`` = (height, width), scale to [0, 1] and normalise per channel."""

    size: tuple[int, int]
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(int(s) != s or s <= 0 for s in self.size):
            raise ValueError(
                f"ImageTransform.size must be two positive ints (height, width), got {self.size}"
            )
        if len(self.mean) != 3:
            raise ValueError(f"ImageTransform.mean must have 3 values (RGB), got {self.mean}")
        if len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(
                f"ImageTransform.std must have 3 positive values (RGB), got {self.std}"
            )

    @property
    def height(self) -> int:
        return int(self.size[0])

    @property
    def width(self) -> int:
        return int(self.size[1])

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """Resized RGB pixels as a (3, H, W) uint8 tensor, small enough to cache in memory."""
        img = _to_rgb(img)
        if img.size != (self.width, self.height):
            img = img.resize((self.width, self.height), resample=Image.Resampling.BICUBIC)
        pixels = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()

    def normalize_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalise a (3, H, W) or (B, 3, H, W) uint8 tensor to float32."""
        if pixels.dtype != torch.uint8:
            raise ValueError(f"normalize_uint8 expects a uint8 tensor, got {pixels.dtype}")
        if pixels.dim() not in (3, 4) or pixels.shape[-3] != 3:
            raise ValueError(
                f"normalize_uint8 expects shape (3, H, W) or (B, 3, H, W), got {tuple(pixels.shape)}"
            )
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        return (pixels.to(torch.float32) / 255.0 - mean) / std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """A (3, H, W) float32 tensor ready for a vision encoder."""
        return self.normalize_uint8(self.to_uint8(img))


def transform_from_meta(meta: dict, fallback_size: int) -> ImageTransform:
    """The ImageTransform a checkpoint was trained or imported with (its meta's image_size,
    image_mean, image_std), CLIP's statistics and a square `fallback_size` where absent."""
    size = meta.get("image_size") or [fallback_size, fallback_size]
    return ImageTransform(
        size=(int(size[0]), int(size[1])),
        mean=tuple(meta.get("image_mean", CLIP_MEAN)),
        std=tuple(meta.get("image_std", CLIP_STD)),
    )
