"""POINTS-1.5 preset: a NaViT-style encoder (native resolution and aspect ratio, the patches of
all images packed into one sequence with block-diagonal attention, factorised fractional
position embeddings; `tessera.vision.navit`) → two-layer GELU MLP → LLM, ChatML template
(Qwen2.5-Instruct's).

Three stages, as POINTS-1.5 trains:
    1 "align"     encoder alignment on image-caption pairs: the NaViT encoder and the MLP train
                  (the encoder at a tenth of the rate), the LLM frozen; `tiny` trains the MLP only
                  (its 4-layer encoder degrades under the caption loss, see `tiny`)
    2 "warmup"    warm-up of the modality embedding layer (the MLP) alone, a short stage
                  on instruction data (POINTS uses a small curated set)
    3 "instruct"  instruction tuning of the MLP and the LLM
Every image costs as many tokens as it has patches at its own size: the data pipeline asks
`LVLM.num_image_tokens(h, w)` for each image. `tiny` shares the ViT, LLM and their
pretraining with the other tiny LVLM presets; its NaViT has the ViT's dimensions and starts
from the pretrained ViT (`NaViT.init_from_vit`: same patch embedding and layers, the row and
column tables fitted to the ViT's 2D position table), as POINTS-1.5 starts from a pretrained
NaViT. Inside the LVLM the encoder drops no tokens (placeholders are expanded before the
model runs); dropping and masked pooling serve encoder-only training. `paper` records the
published dimensions (Qwen2-VL's 675M NaViT, Qwen2.5-7B-Instruct).
"""

from __future__ import annotations

from tessera.config import Config
from tessera.connectors.projector import ProjectorConfig
from tessera.presets.base import LVLMPreset, tiny_towers
from tessera.presets.lvlm_runner import zoo_runner
from tessera.text.llama import LlamaConfig
from tessera.train.stage import StageConfig
from tessera.vision.navit import NaViTConfig
from tessera.vision.vit import ViTConfig


def navit_like(vit: ViTConfig) -> NaViTConfig:
    """A NaViT with the ViT's dimensions (so `init_from_vit` takes its weights), one position
    entry per patch row / column of the ViT's grid."""
    return NaViTConfig(image_size=vit.image_size, patch_size=vit.patch_size, hidden_size=vit.hidden_size,
                       num_layers=vit.num_layers, num_heads=vit.num_heads, intermediate_size=vit.intermediate_size,
                       act=vit.act, layer_norm_eps=vit.layer_norm_eps, pre_layernorm=vit.pre_layernorm,
                       patch_bias=vit.patch_bias, patch_embed=vit.patch_embed, stem_width=vit.stem_width,
                       position_buckets=vit.grid)


def tiny() -> LVLMPreset:
    towers = tiny_towers()
    return LVLMPreset(
        name="points-tiny",
        **towers,
        encoder=navit_like(towers["vision"]),
        connector=ProjectorConfig(kind="mlp", act="gelu"),
        template="chatml",
        vision_feature_layer=-1,
        folder="points",
        stages=[
            # The tiny recipe keeps the encoder FROZEN in stage 1 (POINTS-1.5 trains it at a tenth of
            # the rate): trained on the caption loss the tiny ViT's features degrade, and VQA after
            # 1,200 instruction steps was 0.488 / 0.429 with it trainable against 0.828 / 0.598
            # frozen (ZOO.md). 1,200 instruction steps, not 300, as LLaVA's 1,300.
            StageConfig(name="align", trainable=["connector"], data="llava_pretrain", steps=120,
                        batch_size=32, lr=2e-3, warmup_steps=10),
            StageConfig(name="warmup", trainable=["connector"], data="llava_instruct", group_by_image=True,
                        steps=40, batch_size=16, lr=1e-3, warmup_steps=4),
            StageConfig(name="instruct", trainable=["connector", "language_model"], data="llava_instruct",
                        group_by_image=True, steps=1200, batch_size=16, lr=1e-3, warmup_steps=40),
        ],
    )


def paper() -> dict[str, Config]:
    """POINTS-1.5 dimensions: Qwen2-VL's NaViT (32 layers of width 1280, 14 px patches; Qwen2-VL
    itself uses 2D rotary positions where this encoder learns factorised tables) and
    Qwen2.5-7B-Instruct."""
    return {
        "encoder": NaViTConfig(image_size=448, patch_size=14, hidden_size=1280, num_layers=32, num_heads=16,
                               intermediate_size=5120, act="quick_gelu", position_buckets=64, max_patches=16384),
        "connector": ProjectorConfig(kind="mlp", act="gelu"),
        "llm": LlamaConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                           num_heads=28, num_kv_heads=4, attention_bias=True, rope_theta=1_000_000.0,
                           max_position_embeddings=32768, rms_norm_eps=1e-6),
    }


ZOO = {"points": zoo_runner(tiny)}
