"""LLaVA and LLaVA-1.5 presets: the parts, their sizes and the training recipe.

A preset is data. `tiny` trains on a 2-core CPU in minutes on ShapesWorld: a CLIP-style
ViT pretrained contrastively, a LLaMA-style decoder pretrained on text, then LLaVA's two
stages (1: connector only, on captions; 2: connector + LLM, on instructions, ViT frozen).
`paper` records the published dimensions (CLIP ViT-L/14-336, Vicuna-7B) for use with
imported weights.
"""

from __future__ import annotations

from tessera.config import Config
from tessera.connectors.projector import ProjectorConfig
from tessera.text.clip_text import CLIPTextConfig
from tessera.text.llama import LlamaConfig
from tessera.train.stage import StageConfig
from tessera.vision.vit import ViTConfig


class LLaVAPreset(Config):
    name: str
    vision: ViTConfig
    text_tower: CLIPTextConfig  # only for contrastive pretraining of the ViT
    clip_projection_dim: int = 128
    llm: LlamaConfig
    connector: ProjectorConfig
    template: str = "vicuna"
    vision_feature_layer: int = -2
    tokenizer_vocab_size: int = 1024
    clip_stage: StageConfig | None = None
    # The clip stage also scores each caption against itself with one attribute word swapped
    # (NegCLIP); ShapesWorld's word lists come from the dataset's meta.json.
    clip_hard_negatives: bool = False
    # Fraction of clip-stage images shown in grayscale with colour-free texts (GrayscaleViews).
    clip_grayscale: float = 0.0
    lm_stage: StageConfig | None = None
    align_stage: StageConfig  # LLaVA stage 1
    instruct_stage: StageConfig  # LLaVA stage 2


def tiny(connector: str = "mlp", name: str = "llava-1.5-tiny") -> LLaVAPreset:
    return LLaVAPreset(
        name=name,
        # A convolutional stem instead of CLIP's one 8×8 patch convolution: a from-scratch ViT
        # then reads shape apart from colour. Centre-patch shape probe on colour×shape pairs never
        # seen in training: patch conv 0.15, stem widths 16/32/64 0.32 / 0.67 / 0.72; the LLaVA
        # stages on them: VQA compositional 0.53 / 0.59 / 0.72 / 0.69 (RESULTS.md, session 12).
        # Width 32 is the widest stem the 20-minute quickstart affords. Exporting to Hugging
        # Face needs the plain patch convolution (`tessera train --vit-patch-embed patch`).
        vision=ViTConfig(image_size=64, patch_size=8, hidden_size=128, num_layers=4, num_heads=4,
                         intermediate_size=512, patch_embed="conv_stem", stem_width=32),
        text_tower=CLIPTextConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                                  max_position_embeddings=64),
        llm=LlamaConfig(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2,
                        max_position_embeddings=512),
        connector=ProjectorConfig(kind=connector),
        # The LAST layer, not LLaVA-1.5's penultimate: the region objectives below supervise the
        # final layer's patch tokens, and in a 4-layer ViT the penultimate one only gets them
        # second-hand (LLaVA stages on one ViT, RESULTS.md: layer -2 0.799 / 0.581, -1 0.827 / 0.574;
        # with 1,300 instruct steps -1 0.843 / 0.573).
        vision_feature_layer=-1,
        # "region": object boxes against "a large red circle."; "region_patches": every patch of a
        # box against its phrase; "region_category": those patches against "a circle." (see
        # ContrastiveTask). ITC alone leaves shape out of the patch tokens. Linear shape probe of
        # a box's centre patch (what the LLM reads): ITC + region 0.52, + region_patches 0.70,
        # + region_category 0.86 (RESULTS.md).
        clip_stage=StageConfig(name="clip", trainable=["*"], data="captions",
                               objectives={"itc": 1.0, "region": 1.0, "region_patches": 1.0, "region_category": 1.0},
                               steps=600, batch_size=128, lr=1e-3, warmup_steps=50, weight_decay=0.1),
        lm_stage=StageConfig(name="lm", trainable=["*"], data="text", steps=200, batch_size=64, lr=2e-3,
                             warmup_steps=20, weight_decay=0.1),
        align_stage=StageConfig(name="align", trainable=["connector"], data="llava_pretrain", steps=100,
                                batch_size=32, lr=2e-3, warmup_steps=10),
        instruct_stage=StageConfig(name="instruct", trainable=["connector", "language_model"],
                                   data="llava_instruct", group_by_image=True, steps=1300, batch_size=16,
                                   lr=1e-3, warmup_steps=50, weight_decay=0.0),
    )


def paper_llava15() -> dict[str, Config]:
    """LLaVA-1.5-7B dimensions (CLIP ViT-L/14 at 336 px, 576 tokens; Vicuna-7B; 2-layer MLP)."""
    return {
        "vision": ViTConfig(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                            intermediate_size=4096),
        "llm": LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32,
                           num_heads=32, num_kv_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
        "connector": ProjectorConfig(kind="mlp"),
        "align_stage": StageConfig(name="align", trainable=["connector"], data="llava_pretrain", steps=2180,
                                   batch_size=256, lr=1e-3, warmup_steps=65, bf16=True, max_length=2048),
        "instruct_stage": StageConfig(name="instruct", trainable=["connector", "language_model"],
                                      data="llava_instruct", steps=5198, batch_size=128, lr=2e-5,
                                      warmup_steps=156, bf16=True, max_length=2048),
    }


PRESETS = {"llava-1.5-tiny": lambda: tiny("mlp"), "llava-tiny": lambda: tiny("linear", "llava-tiny")}


def get_preset(name: str) -> LLaVAPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]()
