"""The generic LLM-based (LVLM) preset: parts, sizes and a recipe as a list of stages.

Every LVLM preset (LLaVA, MiniGPT-v2, Qwen-VL, InternVL, ...) is one `LVLMPreset` and trains
through `tessera.pipeline.train_lvlm`: a tokenizer, a CLIP-style ViT pretrained contrastively
(`clip_stage`), a LLaMA-style decoder pretrained on text (`lm_stage`), then the system's own
stages in order (`stages`), each from the previous one's weights. `LLaVAPreset` converts with
`from_llava`, so `train_llava` is `train_lvlm` on the converted preset.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from tessera.config import Config
from tessera.connectors.registry import ConnectorConfig
from tessera.data.templates import get_template
from tessera.data.tiling import TilingConfig
from tessera.models.lvlm import VisionBranchConfig
from tessera.models.slot_reader import PRESENCE_OBJECTIVE, READING_OBJECTIVE, READING_OBJECTIVES
from tessera.presets.llava import LLaVAPreset
from tessera.text.clip_text import CLIPTextConfig
from tessera.text.llama import LlamaConfig
from tessera.train.stage import StageConfig
from tessera.vision.navit import NaViTConfig
from tessera.vision.vit import ViTConfig
from tessera.vision.vitdet import ViTDetConfig

PRETRAIN_STAGES = ("clip", "lm")


class LVLMPreset(Config):
    name: str
    vision: ViTConfig
    text_tower: CLIPTextConfig  # only for contrastive pretraining of the ViT
    clip_projection_dim: int = 128
    llm: LlamaConfig
    connector: ConnectorConfig
    template: str = "vicuna"
    vision_feature_layer: int = -2
    vision_feature_select: Literal["patch", "full"] = "patch"
    tiling: TilingConfig | None = None
    # Side of the square images the data pipeline feeds the model; the encoder's size when
    # unset. With tiling it is larger, so that an image is cut into several encoder-sized tiles.
    input_image_size: int | None = None
    tokenizer_vocab_size: int = 1024
    special_tokens: tuple[str, ...] = ()  # atomic template markers beyond the fixed ones ("<img>", ...)
    clip_stage: StageConfig | None = None
    # The clip stage also scores each caption against itself with one attribute word swapped
    # (NegCLIP); ShapesWorld's word lists come from the dataset's meta.json.
    clip_hard_negatives: bool = False
    # Fraction of clip-stage images shown in grayscale with colour-free texts (GrayscaleViews).
    clip_grayscale: float = 0.0
    lm_stage: StageConfig | None = None
    stages: list[StageConfig]  # the system's own stages, in order
    # Task identifier per stage data file (MiniGPT-v2: {"llava_pretrain": "caption", ...}) and
    # for VQA evaluation; only for templates with task identifiers.
    task_by_data: dict[str, str] = {}
    vqa_task: str | None = None
    folder: str = "lvlm"  # stage checkpoints go to out/<folder>/<stage name>
    # The LVLM's main vision tower when it is not the ViT `vision` itself (which the shared
    # "clip" stage still pretrains): a NaViT (POINTS, initialised from that ViT) or a ViTDet
    # (Vary-tiny's new vision vocabulary, trained from scratch).
    encoder: NaViTConfig | ViTDetConfig | None = None
    extra_towers: list[VisionBranchConfig] = []  # Vary-base: the new vocabulary beside CLIP
    tower_merge: Literal["sequence", "channels"] = "sequence"
    # CogVLM: the LLM gets a visual expert in every layer (`llm` stays the plain decoder the
    # "lm" stage pretrains; the expert starts as a copy of its text weights) and all image
    # tokens of an image share one position id.
    visual_expert: bool = False
    image_positions: Literal["per_token", "shared"] = "per_token"
    # Weights taken before the first own stage from an earlier stage's checkpoint
    # (out/<folder>/<stage>/final): module prefix here → "<stage>:<module prefix there>"
    # (Vary-base: {"extra_towers.0.vision_tower": "vary_tiny:vision_tower"}).
    init_from_stages: dict[str, str] = {}

    @model_validator(mode="after")
    def _check(self) -> LVLMPreset:
        if not self.stages:
            raise ValueError("an LVLM preset needs at least one stage")
        names = [s.name for s in self.stages]
        clash = sorted({n for n in names if names.count(n) > 1 or n in PRETRAIN_STAGES})
        if clash:
            raise ValueError(f"stage names must be unique and not {list(PRETRAIN_STAGES)}: {clash}")
        for stage in self.stages:
            reading = set(stage.objectives) & set(READING_OBJECTIVES)
            if reading and (READING_OBJECTIVE not in reading or set(stage.objectives) - reading):
                raise ValueError(f"stage {stage.name!r}: {READING_OBJECTIVE!r} trains the vision tower alone, "
                                 f"optionally with {PRESENCE_OBJECTIVE!r} and no other objective; "
                                 f"got {sorted(stage.objectives)}")
        template = get_template(self.template)
        for task in [*self.task_by_data.values(), self.vqa_task or ""]:
            if task and task not in template.task_identifiers:
                raise ValueError(f"task {task!r} is not a task identifier of template {self.template!r} "
                                 f"({list(template.task_identifiers)})")
        if self.input_image_size is not None and self.input_image_size % self.vision.patch_size:
            raise ValueError(f"input_image_size {self.input_image_size} is not a multiple of the patch size "
                             f"{self.vision.patch_size}")
        return self

    @property
    def image_size(self) -> int:
        """Side of the square images given to the model."""
        return self.input_image_size or (self.encoder or self.vision).image_size

    @property
    def stage_names(self) -> tuple[str, ...]:
        return (*PRETRAIN_STAGES, *(s.name for s in self.stages))


def from_llava(preset: LLaVAPreset) -> LVLMPreset:
    """The LLaVA preset as a generic one: stages align → instruct, checkpoints in out/llava/."""
    return LVLMPreset(
        name=preset.name, vision=preset.vision, text_tower=preset.text_tower,
        clip_projection_dim=preset.clip_projection_dim, llm=preset.llm, connector=preset.connector,
        template=preset.template, vision_feature_layer=preset.vision_feature_layer,
        tokenizer_vocab_size=preset.tokenizer_vocab_size, clip_stage=preset.clip_stage,
        lm_stage=preset.lm_stage, stages=[preset.align_stage, preset.instruct_stage], folder="llava",
        clip_hard_negatives=preset.clip_hard_negatives, clip_grayscale=preset.clip_grayscale,
    )


def tiny_towers() -> dict:
    """The tiny parts every LVLM preset shares with LLaVA's tiny preset (ViT, CLIP text tower,
    LLaMA, tokenizer size, the ViT and LM pretraining stages), so one pretraining serves all
    of them and the systems differ only in what the comparison is about."""
    from tessera.presets.llava import tiny

    base = tiny()
    return {"vision": base.vision, "text_tower": base.text_tower, "clip_projection_dim": base.clip_projection_dim,
            "llm": base.llm, "tokenizer_vocab_size": base.tokenizer_vocab_size,
            "clip_stage": base.clip_stage, "lm_stage": base.lm_stage, "clip_hard_negatives": base.clip_hard_negatives,
            "clip_grayscale": base.clip_grayscale}
