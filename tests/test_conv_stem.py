"""The early-convolution patch stem (`ConvStem`) shared by the ViT and ViTDet: same token grid as
the patch convolution, widths doubling up to the model width, and a clear refusal to export it."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tessera.interop.hf_keys import vit_config_to_hf
from tessera.nn.layers import ConvStem
from tessera.vision.vit import VisionTransformer, ViTConfig


@pytest.mark.parametrize(("first_width", "widths"), [
    (None, [64, 128, 128, 128]),  # E/2, then E: the ViTDet stem of Vary's tiny vocabulary network
    (16, [16, 32, 64, 128]),  # doubling at every halving
    (8, [8, 16, 32, 64, 128]),  # three halvings reach 64 only: a 1×1 convolution makes up the width
])
def test_stem_widths_double_up_to_the_model_width(first_width: int | None, widths: list[int]) -> None:
    stem = ConvStem(3, 128, 8, first_width)
    assert [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)] == widths
    assert stem(torch.zeros(2, 3, 64, 48)).shape == (2, 128, 8, 6)


def test_stem_refuses_patch_sizes_it_cannot_reach_and_bad_widths() -> None:
    with pytest.raises(ValueError, match="power of 2"):
        ConvStem(3, 128, 6)
    with pytest.raises(ValueError, match="first_width"):
        ConvStem(3, 128, 8, 256)
    with pytest.raises(ValidationError, match="power of 2"):
        ViTConfig(image_size=48, patch_size=12, patch_embed="conv_stem")


def test_vit_with_a_conv_stem_keeps_its_grid_and_reads_neighbouring_pixels() -> None:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                    patch_embed="conv_stem", stem_width=8)
    vit = VisionTransformer(cfg).eval()
    names = set(dict(vit.named_parameters()))
    assert "embeddings.patch_stem.0.weight" in names and not any("patch_embedding" in n for n in names)
    x = torch.randn(1, 3, 32, 40)  # another grid than the table's 4×4: positions are interpolated
    with torch.no_grad():
        out = vit([x[0]])
        assert out.grids == [(4, 5)] and out.patch_tokens().shape == (20, 32)
        # A pixel of patch (0, 0) next to its border reaches patch (0, 1)'s features only through the 3×3 convolutions.
        y = x.clone()
        y[:, :, 3, 7] += 1.0
        before, after = vit.embeddings.embed_patches(x), vit.embeddings.embed_patches(y)
    assert not torch.allclose(before[..., 0, 1], after[..., 0, 1])
    assert torch.equal(before[..., 2:, :], after[..., 2:, :])  # rows of patches two away are untouched


def test_a_conv_stem_vit_does_not_export_to_clip() -> None:
    with pytest.raises(ValueError, match="patch_embed='conv_stem'"):
        vit_config_to_hf(ViTConfig(patch_embed="conv_stem"))


def test_navit_takes_a_conv_stem_vits_weights_and_packs_images_of_any_size() -> None:
    from tessera.presets.points import navit_like
    from tessera.vision.navit import NaViT

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                    patch_embed="conv_stem", stem_width=8)
    vit = VisionTransformer(cfg)
    navit = NaViT(navit_like(cfg)).eval()
    navit.init_from_vit(vit.state_dict())
    for name, value in navit.embeddings.patch_stem.state_dict().items():
        assert torch.equal(value, vit.embeddings.patch_stem.state_dict()[name])
    images = [torch.randn(3, 32, 48), torch.randn(3, 16, 24)]
    with torch.no_grad():
        packed = navit(images).hidden
        alone = torch.cat([navit([image]).hidden for image in images])
    torch.testing.assert_close(packed, alone)
