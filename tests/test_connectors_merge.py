"""Token merging (MiniGPT-v2's concatenation of 4 adjacent tokens, InternVL's pixel shuffle):
exact layouts, equality with the original systems' reshapes, counts for several image sizes,
and the connector contract inside the LVLM."""

from __future__ import annotations

import pytest
import torch

from tessera.connectors.base import VisionTokens
from tessera.connectors.projector import Projector, ProjectorConfig
from tessera.connectors.token_merge import TokenMerge, TokenMergeConfig, merge_blocks
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.text.llama import LlamaConfig
from tessera.vision.vit import ViTConfig

VIT = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
LLM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
CONCAT4 = TokenMergeConfig(block=(1, 4), projector="linear")  # MiniGPT-v2
PIXEL_SHUFFLE = TokenMergeConfig(block=(2, 2), projector="mlp", norm=True)  # InternVL


def internvl_pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's pixel_shuffle (ps_version v2), step by step, as the reference."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def test_pixel_shuffle_exact_layout_on_a_small_grid() -> None:
    # a 4x4 grid of 1-wide tokens numbered row-major: token (r, c) holds 10r + c
    grid = torch.tensor([[10.0 * r + c for c in range(4)] for r in range(4)])[..., None]
    merged = merge_blocks(grid, (2, 2))
    assert merged.tolist() == [
        [0, 1, 10, 11], [2, 3, 12, 13],
        [20, 21, 30, 31], [22, 23, 32, 33],
    ]
    # 1x4 runs (MiniGPT-v2): each row of 4 becomes one token
    assert merge_blocks(grid, (1, 4)).tolist() == [[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]


def test_pixel_shuffle_equals_internvl_and_is_a_pure_rearrangement() -> None:
    rows, cols, dim = 6, 8, 5
    grid = torch.randn(rows, cols, dim)
    ours = merge_blocks(grid, (2, 2))
    ref = internvl_pixel_shuffle(grid[None]).reshape(-1, 4 * dim)
    assert torch.equal(ours, ref)
    # values moved, never mixed: the same multiset of numbers
    assert torch.equal(ours.flatten().sort().values, grid.flatten().sort().values)
    assert ours.shape == (rows * cols // 4, 4 * dim)


def test_concat4_equals_minigpt_v2_view() -> None:
    rows, cols, dim = 4, 8, 3
    grid = torch.randn(rows, cols, dim)
    # MiniGPT-v2: image_embeds.view(bs, pn / 4, hs * 4) over the raster order
    ref = grid.reshape(1, rows * cols, dim).view(1, rows * cols // 4, dim * 4)[0]
    assert torch.equal(merge_blocks(grid, (1, 4)), ref)


def test_merge_needs_a_divisible_grid() -> None:
    with pytest.raises(ValueError, match=r"5x8 token grid cannot be merged in 2x2 blocks"):
        merge_blocks(torch.zeros(5, 8, 2), (2, 2))
    conn = TokenMerge(CONCAT4, 16, 32)
    with pytest.raises(ValueError, match="cannot be merged in 1x4"):
        conn.num_output_tokens(4, 6)


@pytest.mark.parametrize(
    ("cfg", "size", "expected"),
    [
        (CONCAT4, (32, 32), 4),  # 4x4 grid → 4 runs of 4
        (CONCAT4, (64, 64), 16),
        (CONCAT4, (32, 64), 8),  # wide
        (CONCAT4, (96, 32), 12),  # tall: 12x4 grid → 12 runs
        (PIXEL_SHUFFLE, (32, 32), 4),
        (PIXEL_SHUFFLE, (64, 32), 8),
        (PIXEL_SHUFFLE, (16, 96), 6),  # 2x12 grid, aspect 6
    ],
)
def test_token_counts_for_image_sizes(cfg: TokenMergeConfig, size: tuple[int, int], expected: int) -> None:
    model = LVLM(LVLMConfig(vision=VIT, llm=LLM, connector=cfg, image_token_id=4))
    assert model.num_image_tokens(*size) == expected
    feats = model.image_features([torch.randn(3, *size)])
    assert feats.shape == (expected, LLM.hidden_size)


def test_batch_of_mixed_sizes_keeps_each_image_apart() -> None:
    model = LVLM(LVLMConfig(vision=VIT, llm=LLM, connector=PIXEL_SHUFFLE, image_token_id=4)).eval()
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 64), torch.randn(3, 32, 32)]
    with torch.no_grad():
        together = model.image_features(images)
        alone = torch.cat([model.image_features([img]) for img in images])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_prefix_tokens_are_dropped_before_merging() -> None:
    conn = TokenMerge(CONCAT4, 4, 8)
    grid_tokens = torch.randn(8, 4)  # a 2x4 grid
    with_class = VisionTokens(torch.cat([torch.randn(1, 4), grid_tokens]), [(2, 4)], prefix_tokens=1)
    without = VisionTokens(grid_tokens, [(2, 4)], prefix_tokens=0)
    assert torch.equal(conn(with_class), conn(without))
    assert conn.num_output_tokens(2, 4) == 2


def test_parameter_names_follow_hf_internvl_projector() -> None:
    assert sorted(n for n, _ in TokenMerge(PIXEL_SHUFFLE, 16, 32).named_parameters()) == [
        "layer_norm.bias", "layer_norm.weight", "linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    assert sorted(n for n, _ in TokenMerge(CONCAT4, 16, 32).named_parameters()) == ["linear_1.bias", "linear_1.weight"]
    assert TokenMerge(CONCAT4, 16, 32).linear_1.in_features == 64


def test_projector_counts_prefix_tokens_it_keeps() -> None:
    proj = Projector(ProjectorConfig(kind="linear"), 4, 8, prefix_tokens=1)
    assert proj.num_output_tokens(3, 5) == 16
    vision = VisionTokens(torch.randn(2 * 16, 4), [(3, 5), (3, 5)], prefix_tokens=1)
    assert proj(vision).shape == (32, 8)
    model = LVLM(LVLMConfig(vision=VIT, llm=LLM, image_token_id=4, vision_feature_select="full"))
    assert model.num_image_tokens(32, 48) == 1 + 4 * 6 == model.image_features([torch.randn(3, 32, 48)]).shape[0]


def test_vision_tokens_check_their_bookkeeping() -> None:
    with pytest.raises(ValueError, match="need 17"):
        VisionTokens(torch.randn(16, 4), [(4, 4)], prefix_tokens=1)


def test_connector_config_union_round_trips() -> None:
    for cfg in (CONCAT4, PIXEL_SHUFFLE, ProjectorConfig(kind="linear")):
        full = LVLMConfig(vision=VIT, llm=LLM, connector=cfg, image_token_id=4)
        assert LVLMConfig.parse(full.to_dict()) == full
    legacy = LVLMConfig(vision=VIT, llm=LLM, image_token_id=4).to_dict()
    legacy["connector"].pop("kind")  # a config without "kind" is a projector
    assert LVLMConfig.parse(legacy).connector == ProjectorConfig()
    bad = {**legacy, "connector": {"kind": "nope"}}
    with pytest.raises(ValueError, match="connector"):
        LVLMConfig.parse(bad)


def test_only_projector_lvlms_export_to_hf_llava() -> None:
    from tessera.interop.hf_keys import lvlm_config_to_hf

    assert lvlm_config_to_hf(LVLMConfig(vision=VIT, llm=LLM, image_token_id=4))["model_type"] == "llava"
    with pytest.raises(ValueError, match="'token_merge' connector"):
        lvlm_config_to_hf(LVLMConfig(vision=VIT, llm=LLM, connector=CONCAT4, image_token_id=4))
