"""InternVL's dynamic high resolution: cut an image into a grid of encoder-sized tiles whose
shape is closest to the image's aspect ratio, plus a thumbnail of the whole image when there
is more than one tile.

The grid (cols × rows tiles, min_tiles ≤ cols·rows ≤ max_tiles) is chosen as InternVL's
`find_closest_aspect_ratio`: the smallest |width/height − cols/rows|; on a tie the grid with
more tiles wins when the image has more than half of that grid's pixels (so a large square
image gets 2×2 tiles, a small one 1×1). The image is resized (bicubic, antialiased) to exactly
cols·tile × rows·tile and cut row by row; the thumbnail is the whole image resized to one
tile. An LVLM with tiling treats an image's tiles as images of ONE placeholder group: the
placeholder expands to the sum of the tiles' token counts and the tiles' features fill it in
order (tiles row-major, thumbnail last).

Defined behaviour for odd inputs: any size works (tiny images are upsampled, huge ones
downsampled); an extreme aspect ratio gets the most elongated grid allowed (a 1×max_tiles
strip), so each tile is still squashed less than a single resize would squash it.

Shapes: image (C, H, W) float; tile t = the encoder's image size; output list of (C, t, t).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor

from tessera.config import Config


class TilingConfig(Config):
    max_tiles: int = 12  # InternVL-1.5: 12 (up to 40 at test time); tiny: 4
    min_tiles: int = 1
    thumbnail: bool = True  # add the whole image as one more tile when there are ≥ 2 tiles

    @model_validator(mode="after")
    def _check(self) -> TilingConfig:
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 ≤ min_tiles ≤ max_tiles, got min_tiles={self.min_tiles}, max_tiles={self.max_tiles}")
        return self


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (cols, rows) with min_tiles ≤ cols·rows ≤ max_tiles, fewest tiles first."""
    grids = {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles}
    return sorted(grids, key=lambda g: (g[0] * g[1], g))


def choose_grid(height: int, width: int, tile: int, cfg: TilingConfig) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of height × width pixels."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot tile an image of {height}x{width} pixels")
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(cfg.min_tiles, cfg.max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


def num_tiles(height: int, width: int, tile: int, cfg: TilingConfig) -> int:
    """Tiles (thumbnail included) an image of this size is cut into."""
    rows, cols = choose_grid(height, width, tile, cfg)
    n = rows * cols
    return n + 1 if cfg.thumbnail and n > 1 else n


def _resize(image: Tensor, height: int, width: int) -> Tensor:
    if tuple(image.shape[-2:]) == (height, width):
        return image
    out = F.interpolate(image[None].float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out[0].to(image.dtype)


def tile_image(image: Tensor, tile: int, cfg: TilingConfig) -> list[Tensor]:
    """(C, H, W) → the tiles, row-major, then the thumbnail (when more than one tile)."""
    if image.dim() != 3:
        raise ValueError(f"tile_image expects one (C, H, W) image, got shape {tuple(image.shape)}")
    rows, cols = choose_grid(image.shape[1], image.shape[2], tile, cfg)
    resized = _resize(image, rows * tile, cols * tile)
    tiles = [resized[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)]
    if cfg.thumbnail and len(tiles) > 1:
        tiles.append(_resize(image, tile, tile))
    return tiles
