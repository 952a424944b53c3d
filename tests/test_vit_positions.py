"""The ViT's position table: HF CLIP's N(0, 0.02) start by default, the 2D sin-cos code on request."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tessera.nn.positions import grid_positions, sincos_2d
from tessera.vision.vit import VisionTransformer, ViTConfig


def test_sincos_start_puts_the_scaled_code_on_every_patch_row() -> None:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                    position_init="sincos", position_init_scale=0.25)
    table = VisionTransformer(cfg).embeddings.position_embedding.weight.detach()
    code = sincos_2d(*grid_positions(4, 4, 4), 32)
    torch.testing.assert_close(table[1:], code * 0.25)
    assert table[0].abs().max() < 0.2  # the class token keeps the N(0, 0.02) start
    # Neighbouring patches get nearby codes, distant ones differ: the code is about place.
    assert (table[1] - table[2]).norm() < (table[1] - table[16]).norm()


def test_default_start_is_hf_clip_normal() -> None:
    torch.manual_seed(0)
    table = VisionTransformer(ViTConfig(num_layers=1)).embeddings.position_embedding.weight.detach()
    assert table.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"hidden_size": 30, "num_heads": 5}, "hidden_size divisible by 4"),
    ({"position_init_scale": 0.0}, "position_init_scale must be positive"),
    ({"position_init": "learned"}, "position_init"),
])
def test_bad_position_settings_are_named(overrides: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ViTConfig(**{"position_init": "sincos", **overrides})
