"""InternVL's dynamic tiling: the grid chosen for ordinary and extreme aspect ratios (checked
against InternVL's own selection rule), exact tiles and thumbnail, and an LVLM that fills one
placeholder group with all of an image's tiles."""

from __future__ import annotations

import pytest
import torch

from tessera.connectors.token_merge import TokenMergeConfig
from tessera.data.tiling import TilingConfig, candidate_grids, choose_grid, num_tiles, tile_image
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.text.llama import LlamaConfig
from tessera.vision.vit import ViTConfig

TILE = 32
VIT = ViTConfig(image_size=TILE, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
LLM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)


def internvl_choice(width: int, height: int, tile: int, min_num: int, max_num: int) -> tuple[int, int]:
    """InternVL's dynamic_preprocess grid choice, as the reference: (cols, rows)."""
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda x: x[0] * x[1])
    aspect, best_diff, best = width / height, float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * tile * tile * ratio[0] * ratio[1]:
            best = ratio
    return best


@pytest.mark.parametrize(
    ("height", "width", "max_tiles", "grid"),
    [
        (64, 64, 4, (2, 2)),  # square, big enough for 2x2
        (32, 32, 4, (1, 1)),  # square, small: one tile
        (40, 40, 4, (1, 1)),  # square but under half of 2x2's pixels
        (32, 64, 4, (1, 2)),  # wide 2:1
        (96, 32, 6, (3, 1)),  # tall 3:1
        (100, 250, 6, (1, 3)),  # 2.5: tie between 2:1 and 3:1 → more tiles, the image is big enough
        (10, 1000, 4, (1, 4)),  # extreme wide: the most elongated grid allowed
        (5000, 20, 12, (12, 1)),  # extreme tall
        (1, 1, 12, (1, 1)),  # a single pixel
        (3000, 4000, 12, (3, 4)),  # large photo 4:3
    ],
)
def test_grid_choice(height: int, width: int, max_tiles: int, grid: tuple[int, int]) -> None:
    cfg = TilingConfig(max_tiles=max_tiles)
    assert choose_grid(height, width, TILE, cfg) == grid
    cols, rows = internvl_choice(width, height, TILE, 1, max_tiles)
    assert (rows, cols) == grid


def test_grid_choice_matches_internvl_everywhere() -> None:
    for max_tiles, min_tiles in ((4, 1), (6, 1), (12, 1), (12, 2)):
        cfg = TilingConfig(max_tiles=max_tiles, min_tiles=min_tiles)
        for h in (7, 20, 32, 45, 64, 100, 333, 1000):
            for w in (5, 31, 32, 48, 64, 99, 250, 640, 2048):
                cols, rows = internvl_choice(w, h, TILE, min_tiles, max_tiles)
                assert choose_grid(h, w, TILE, cfg) == (rows, cols), (h, w, max_tiles, min_tiles)


def test_candidate_grids_respect_the_tile_budget() -> None:
    grids = candidate_grids(2, 4)
    assert (1, 1) not in grids and (2, 2) in grids and (1, 4) in grids and (3, 2) not in grids
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)


def test_tiles_are_exact_crops_and_the_thumbnail_comes_last() -> None:
    image = torch.arange(3 * 64 * 96, dtype=torch.float32).reshape(3, 64, 96)  # already 2x3 tiles of 32
    cfg = TilingConfig(max_tiles=6)
    tiles = tile_image(image, TILE, cfg)
    assert len(tiles) == 6 + 1 == num_tiles(64, 96, TILE, cfg)
    for index in range(6):
        r, c = divmod(index, 3)
        assert torch.equal(tiles[index], image[:, r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32])
    assert tiles[-1].shape == (3, TILE, TILE)
    # no thumbnail when one tile suffices, or when switched off
    assert len(tile_image(torch.zeros(3, 32, 32), TILE, cfg)) == 1
    assert len(tile_image(image, TILE, TilingConfig(max_tiles=6, thumbnail=False))) == 6


def test_small_and_odd_images_are_resized_to_whole_tiles() -> None:
    cfg = TilingConfig(max_tiles=4)
    tiles = tile_image(torch.rand(3, 10, 77), TILE, cfg)  # aspect 7.7 → a 1x4 strip + thumbnail
    assert len(tiles) == 5 and all(t.shape == (3, TILE, TILE) for t in tiles)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="min_tiles"):
        TilingConfig(max_tiles=2, min_tiles=3)
    with pytest.raises(ValueError, match="cannot tile an image of 0x10"):
        choose_grid(0, 10, TILE, TilingConfig())
    with pytest.raises(ValueError, match=r"one \(C, H, W\) image"):
        tile_image(torch.zeros(1, 3, 32, 32), TILE, TilingConfig())


def test_lvlm_fills_one_placeholder_group_with_every_tile() -> None:
    cfg = LVLMConfig(vision=VIT, llm=LLM, image_token_id=4, connector=TokenMergeConfig(block=(2, 2)),
                     tiling=TilingConfig(max_tiles=4))
    model = LVLM(cfg).eval()
    plain = LVLM(cfg.model_copy(update={"tiling": None})).eval()
    plain.load_state_dict(model.state_dict())
    wide, square = torch.randn(3, 32, 64), torch.randn(3, 64, 64)
    # 32x64: 1x2 tiles + thumbnail = 3 tiles of 4 tokens; 64x64: 2x2 + thumbnail = 5 tiles
    assert model.num_image_tokens(32, 64) == 12 and model.num_image_tokens(64, 64) == 20
    with torch.no_grad():
        feats = model.image_features([wide, square])
        # the same as encoding the tiles as separate images, in order
        tiles = tile_image(wide, TILE, cfg.tiling) + tile_image(square, TILE, cfg.tiling)
        torch.testing.assert_close(feats, plain.image_features(tiles), rtol=1e-5, atol=1e-5)
        ids = torch.tensor([[1, 7, *[4] * 12, 8, *[4] * 20, 9]])
        hidden = model(ids, [wide, square])
    assert hidden.shape == (1, ids.shape[1], LLM.hidden_size)
    with pytest.raises(ValueError, match="more image-token slots"):
        model(torch.tensor([[1, *[4] * 40]]), [wide, square])
