"""Qwen-VL's resampler: a fixed token count for any image size and aspect ratio, the same
computation as Qwen-VL's Resampler (torch MultiheadAttention with positions on the queries and
keys only), 2D sin-cos positions that line up keys with queries, and per-image independence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tessera.connectors.base import VisionTokens
from tessera.connectors.resampler import Resampler, ResamplerConfig
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.nn.positions import grid_positions, sincos_2d
from tessera.text.llama import LlamaConfig
from tessera.vision.vit import ViTConfig

VIT = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
LLM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
CFG = ResamplerConfig(num_queries=4, num_heads=4)


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (16, 16), (32, 96), (128, 16), (8, 200)])
def test_fixed_token_count_for_any_size(size: tuple[int, int]) -> None:
    model = LVLM(LVLMConfig(vision=VIT, llm=LLM, connector=CFG, image_token_id=4))
    h, w = size[0] // 8 * 8, size[1] // 8 * 8
    assert model.num_image_tokens(h, w) == 4
    assert model.image_features([torch.randn(3, h, w), torch.randn(3, 32, 32)]).shape == (8, LLM.hidden_size)


def qwen_reference(conn: Resampler, grid: torch.Tensor) -> torch.Tensor:
    """Qwen-VL's Resampler.forward + ln_post + proj, with torch's MultiheadAttention holding our
    weights and Qwen's get_abs_pos replaced by our exact key positions."""
    rows, cols, _ = grid.shape
    dim = conn.query.shape[1]
    mha = nn.MultiheadAttention(dim, conn.cfg.num_heads)
    mha.load_state_dict({"in_proj_weight": conn.attn.in_proj_weight, "in_proj_bias": conn.attn.in_proj_bias,
                         "out_proj.weight": conn.attn.out_proj.weight, "out_proj.bias": conn.attn.out_proj.bias})
    x = conn.ln_kv(conn.kv_proj(grid.reshape(rows * cols, -1)))[:, None]  # (S, 1, E): seq-first like Qwen
    pos = conn.key_positions(rows, cols)[:, None]
    q = conn.ln_q(conn.query)[:, None]
    out = mha(q + conn.pos_embed[:, None], x + pos, x, need_weights=False)[0][:, 0]
    return conn.ln_post(out) @ conn.proj


def test_matches_qwen_resampler_computation() -> None:
    conn = Resampler(ResamplerConfig(num_queries=9, num_heads=4), 12, 32).eval()
    grids = [torch.randn(4, 6, 12), torch.randn(3, 3, 12)]
    vision = VisionTokens(torch.cat([g.reshape(-1, 12) for g in grids]), [(4, 6), (3, 3)])
    with torch.no_grad():
        ours = conn(vision)
        ref = torch.cat([qwen_reference(conn, g) for g in grids])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_mixed_sizes_equal_each_image_alone() -> None:
    model = LVLM(LVLMConfig(vision=VIT, llm=LLM, connector=CFG, image_token_id=4)).eval()
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 48), torch.randn(3, 40, 8)]
    with torch.no_grad():
        together = model.image_features(images)
        alone = torch.cat([model.image_features([img]) for img in images])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_sincos_layout_and_frame() -> None:
    dim = 8
    rows, cols = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0])
    enc = sincos_2d(rows, cols, dim)
    omega = torch.tensor([1.0, 1 / 100.0])  # 10000^(-k/2) for k = 0, 1 at quarter width 2
    # first half: the column, as [sin, cos]; second half: the row
    torch.testing.assert_close(enc[:, :2], torch.sin(cols[:, None] * omega))
    torch.testing.assert_close(enc[:, 2:4], torch.cos(cols[:, None] * omega))
    torch.testing.assert_close(enc[:, 4:6], torch.sin(rows[:, None] * omega))
    torch.testing.assert_close(enc[:, 6:8], torch.cos(rows[:, None] * omega))
    # a key grid equal to the query grid sits exactly on it; a 2x finer grid straddles it
    r, c = grid_positions(3, 3, 3)
    assert r.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and c.tolist() == [0, 1, 2] * 3
    r, c = grid_positions(2, 4, 2)
    assert r.tolist() == [0.0] * 4 + [1.0] * 4 and c.tolist() == [-0.25, 0.25, 0.75, 1.25] * 2


def test_key_positions_make_it_position_aware() -> None:
    conn = Resampler(CFG, 12, 32).eval()
    grid = torch.randn(4, 4, 12)
    flipped = grid.flip(0)
    with torch.no_grad():
        a = conn(VisionTokens(grid.reshape(16, 12), [(4, 4)]))
        b = conn(VisionTokens(flipped.reshape(16, 12), [(4, 4)]))
    assert not torch.allclose(a, b, atol=1e-4)  # a permutation-invariant pool would give a == b


def test_parameter_names_and_shapes_follow_qwen_vl() -> None:
    conn = Resampler(ResamplerConfig(num_queries=16, num_heads=4), 48, 32)
    shapes = {n: tuple(p.shape) for n, p in conn.named_parameters()}
    assert shapes == {
        "query": (16, 32), "proj": (32, 32), "kv_proj.weight": (32, 48),
        "attn.in_proj_weight": (96, 32), "attn.in_proj_bias": (96,),
        "attn.out_proj.weight": (32, 32), "attn.out_proj.bias": (32,),
        "ln_q.weight": (32,), "ln_q.bias": (32,), "ln_kv.weight": (32,), "ln_kv.bias": (32,),
        "ln_post.weight": (32,), "ln_post.bias": (32,),
    }
    assert "pos_embed" not in conn.state_dict()  # fixed: a function of the config
    assert isinstance(Resampler(CFG, 32, 32).kv_proj, nn.Identity)  # Qwen-VL: no kv_proj when widths agree


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        ResamplerConfig(num_queries=12)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Resampler(ResamplerConfig(num_queries=4, num_heads=3), 16, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(torch.zeros(1), torch.zeros(1), 6)


def test_queries_grid_positions_match_query_table() -> None:
    conn = Resampler(ResamplerConfig(num_queries=9, num_heads=4), 16, 32)
    g = math.isqrt(9)
    # keys on the query grid get exactly the queries' encodings
    torch.testing.assert_close(conn.key_positions(g, g), conn.pos_embed)
    assert conn.pos_embed.abs().max() <= 1
