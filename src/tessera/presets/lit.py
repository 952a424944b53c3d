"""LiT preset (locked-image text tuning): a pretrained image tower, locked, and a text tower
trained from scratch to map captions onto the image tower's fixed embeddings.

As in the LiT paper's main setting (Zhai et al. 2022), the locked tower is a SUPERVISED
classifier, not a contrastive model, and it is locked whole: parameters frozen, module in eval
mode, no image head (the image embedding is the normalised pre-logits feature: the
post-layernorm class token; `visual_projection` is the identity and locked too). Only the text
tower, its projection and the temperature train, with the softmax contrastive loss
(temperature init 10, as LiT's configs).

Tiny ShapesWorld recipe (two stages):
1. `pretrain`: ViT + linear head on the train images' object annotations (objects.json):
   multi-label presence of each colour, shape, size and colour×shape combination (BCE) plus
   the number of objects (cross-entropy). These labels come from a different source than the
   captions and are cheap to fit, and they make the tower encode exactly the attributes that
   captions and zero-shot prompts name, so a locked tower is useful after a short stage. The
   held-out combinations never occur in train, so their labels are never positive: the
   compositional split tests whether the text tower can reach them from colour and shape.
2. `lit`: the dual encoder with that tower locked and a freshly initialised text tower,
   trained on the train captions.

`paper()` records LiT-B16B's dimensions: ViT-B/16 image tower (224 px, width 768, 12 layers)
and a 12-layer text transformer 768 wide on 16 tokens; batch 4,096 in the public COCO config
(32k in the paper), lr 1e-3, image tower's learning rate 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tessera.config import Config
from tessera.data.datasets import ImageCache
from tessera.data.readers import _ImageResolver, shapes_split_paths
from tessera.data.records import SkipStats
from tessera.data.shapes import COLORS, MAX_OBJECTS, SHAPES, SIZES
from tessera.models.dual_encoder import DualEncoder, DualEncoderConfig
from tessera.pipeline import scaled
from tessera.presets.clip import (
    dual_encoder_result,
    image_cache,
    train_stage,
    with_tokenizer,
    zoo_tokenizer,
)
from tessera.text.clip_text import CLIPTextConfig
from tessera.train.checkpoint import save_checkpoint
from tessera.train.stage import StageConfig
from tessera.train.tasks import ContrastiveTask, count_phrases_for
from tessera.train.trainer import StageResult, Trainer, seed_everything
from tessera.vision.vit import VisionTransformer, ViTConfig
from tessera.zoo.core import ZooContext, ZooResult

# Multi-label targets of the supervised pretraining, in this order.
ATTRIBUTE_LABELS: tuple[str, ...] = (
    *(f"color={c}" for c in COLORS),
    *(f"shape={s}" for s in SHAPES),
    *(f"size={s}" for s in SIZES),
    *(f"combo={c} {s}" for c in COLORS for s in SHAPES),
)
_LABEL_INDEX = {name: i for i, name in enumerate(ATTRIBUTE_LABELS)}
LOCKED = ("vision_model", "visual_projection")  # LiT's locked image side
TRAINED = ["text_model", "text_projection", "logit_scale"]


class LiTPreset(Config):
    name: str
    vision: ViTConfig
    text: CLIPTextConfig
    logit_scale_init: float = math.log(10.0)
    tokenizer_vocab_size: int = 1024
    max_text_length: int = 40
    pretrain_stage: StageConfig | None  # None: the image tower comes from elsewhere (imported weights)
    lit_stage: StageConfig

    def dual_encoder_config(self, text: CLIPTextConfig | None = None) -> DualEncoderConfig:
        # projection_dim = image width: with an identity visual projection the image embedding
        # is the tower's own feature, as LiT without an image head.
        return DualEncoderConfig(vision=self.vision, text=text or self.text, projection_dim=self.vision.hidden_size,
                                 logit_scale_init=self.logit_scale_init)


def tiny() -> LiTPreset:
    """CLIP tiny's towers (ViT on 8-pixel patches, 2-layer text transformer, both 128 wide).
    The temperature starts at LiT's 10 and gets 25× the learning rate: at the base rate it can
    move only ~0.6 in log space per 300 steps, while the locked features need a sharper softmax."""
    return LiTPreset(
        name="lit-tiny",
        vision=ViTConfig(image_size=64, patch_size=8, hidden_size=128, num_layers=4, num_heads=4,
                         intermediate_size=512),
        text=CLIPTextConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                            max_position_embeddings=40),
        # 1,500 steps per stage, as CLIP's and SigLIP's tiny recipes (300 left zero-shot shape below
        # its constant baseline in all three).
        pretrain_stage=StageConfig(name="pretrain", trainable=["*"], objectives={"attributes": 1.0}, data="objects",
                                   steps=1500, batch_size=128, lr=2e-3, warmup_steps=100, weight_decay=0.05,
                                   log_every=25),
        # The count objective as in CLIP's and SigLIP's tiny recipes: the locked tower was trained to
        # count, but ITC alone never teaches the text tower what "3 shapes" means.
        lit_stage=StageConfig(name="lit", trainable=TRAINED, objectives={"itc": 1.0, "count": 1.0}, data="captions",
                              steps=1500, batch_size=128, lr=2e-3, lr_scale={"logit_scale": 25.0}, warmup_steps=150,
                              weight_decay=0.1, log_every=25),
    )


def paper() -> LiTPreset:
    """LiT-B16B: ViT-B/16 at 224 px (supervised ImageNet-21k tower, locked) and a 12-layer
    text transformer 768 wide on 16 tokens; no image head, text head to 768; temperature init
    10; public COCO config: batch 4,096, lr 1e-3, weight decay 0.01, 5,000 steps."""
    return LiTPreset(
        name="lit-b16b",
        vision=ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                         intermediate_size=3072, act="gelu"),
        text=CLIPTextConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                            max_position_embeddings=16, act="gelu"),
        tokenizer_vocab_size=30522,
        max_text_length=16,
        pretrain_stage=None,
        lit_stage=StageConfig(name="lit", trainable=TRAINED, objectives={"itc": 1.0}, data="captions", steps=5000,
                              batch_size=4096, lr=1e-3, warmup_steps=150, weight_decay=0.01, max_length=16),
    )


# --- supervised pretraining of the image tower ------------------------------------------------------


def read_object_labels(path: str | Path, image_root: str | Path) -> tuple[list[tuple[Path, list[str]]], SkipStats]:
    """Per image of a ShapesWorld objects.json (COCO instances plus "color" and "size"): its path
    and the attribute labels present ("color=red", "shape=circle", "size=small",
    "combo=red circle"), once per object. Malformed entries are skipped and counted; an image
    whose file is missing is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"objects file not found: {path}")
    try:
        data = json.loads(path.read_text())
        shape_of = {c["id"]: c["name"] for c in data["categories"]}
        entries = data["images"]
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a ShapesWorld objects file: {err!r}") from None
    stats = SkipStats()
    resolver = _ImageResolver(image_root)
    labels: dict[int, list[str]] = {}
    files: dict[int, Path] = {}
    for index, entry in enumerate(entries):
        where = f"{path}[images {index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not entry.get("file_name"):
            stats.skip("malformed image entry", where)
        elif not resolver.exists(image := resolver.resolve(entry["file_name"])):
            stats.skip("image file not found", where)
        else:
            files[entry["id"]], labels[entry["id"]] = image, []
    for index, a in enumerate(annotations):
        where = f"{path}[annotations {index}]"
        if not isinstance(a, dict) or a.get("image_id") not in labels:
            stats.skip("annotation of an unknown or skipped image", where)
            continue
        color, shape, size = a.get("color"), shape_of.get(a.get("category_id")), a.get("size")
        if color not in COLORS or shape not in SHAPES or size not in SIZES:
            stats.skip("unknown colour, shape or size", where)
            continue
        labels[a["image_id"]].extend((f"color={color}", f"shape={shape}", f"size={size}", f"combo={color} {shape}"))
    return [(files[i], labels[i]) for i in files], stats


class AttributeClassifier(nn.Module):
    """ViT + one linear head: logits of ATTRIBUTE_LABELS (multi-label) then of the object count
    1..MAX_OBJECTS (one class)."""

    def __init__(self, vision: ViTConfig) -> None:
        super().__init__()
        self.vision_model = VisionTransformer(vision)
        self.head = nn.Linear(vision.hidden_size, len(ATTRIBUTE_LABELS) + MAX_OBJECTS)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.head(self.vision_model.pooled(self.vision_model(images)))
        return logits[:, : len(ATTRIBUTE_LABELS)], logits[:, len(ATTRIBUTE_LABELS) :]


class ObjectAttributesTask:
    """Supervised pretraining data for AttributeClassifier (see trainer.Task)."""

    def __init__(self, examples: Sequence[tuple[Path, list[str]]], images: ImageCache) -> None:
        self.examples, self.images = examples, images
        self.skips = images.skips

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def make_batch(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor] | None:
        pixels, targets, counts = [], [], []
        for i in indices:
            image, present = self.examples[i]
            px = self.images.get(image)
            if px is None:
                continue
            if not 1 <= len(present) // 4 <= MAX_OBJECTS:  # four labels per object
                self.skips.skip("image with no or too many objects", str(image))
                continue
            target = torch.zeros(len(ATTRIBUTE_LABELS))
            target[[_LABEL_INDEX[name] for name in present]] = 1.0
            pixels.append(px)
            targets.append(target)
            counts.append(len(present) // 4 - 1)
        if not pixels:
            return None
        return self.images.normalize(torch.stack(pixels)), torch.stack(targets), torch.tensor(counts)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        images, targets, counts = batch
        attr_logits, count_logits = model(images)
        attributes = F.binary_cross_entropy_with_logits(attr_logits.float(), targets)
        count = F.cross_entropy(count_logits.float(), counts)
        with torch.no_grad():
            exact = float(((attr_logits > 0) == (targets > 0.5)).all(dim=1).float().mean())
            count_acc = float((count_logits.argmax(1) == counts).float().mean())
        return attributes + count, {"attributes_exact": exact, "count_acc": count_acc}

    def after_step(self, model: nn.Module) -> None:
        pass


def pretrain_image_tower(preset: LiTPreset, ctx: ZooContext, images: ImageCache) -> tuple[VisionTransformer, StageResult]:
    """Stage 1 of the tiny recipe; the tower is saved alone (kind "vit") in out_dir/pretrain."""
    if preset.pretrain_stage is None:
        raise ValueError(f"preset {preset.name} has no pretrain stage: load its image tower from a checkpoint")
    examples, skips = read_object_labels(shapes_split_paths(ctx.data_dir, "train")["objects"], ctx.data_dir)
    images.skips.merge(skips)
    if not examples:
        raise ValueError(f"{ctx.data_dir}: no train image with object annotations ({skips.summary()})")
    classifier = AttributeClassifier(preset.vision)
    stage = scaled(preset.pretrain_stage, ctx.scale, ctx.seed)
    result = Trainer(classifier, stage, ObjectAttributesTask(examples, images), progress=ctx.progress).fit()
    save_checkpoint(ctx.out_dir / stage.name / "final", classifier.vision_model,
                    meta={"preset": preset.name, "stage": stage.name, "image_size": [preset.vision.image_size] * 2})
    return classifier.vision_model, result


def lock_image_tower(model: DualEncoder, tower: VisionTransformer) -> None:
    """Copy the pretrained tower in and make the visual projection the identity (no image
    head); the stage's `trainable` list then freezes both and keeps them in eval mode."""
    if model.visual_projection.weight.shape[0] != model.visual_projection.weight.shape[1]:
        raise ValueError("LiT's image embedding is the tower's feature: projection_dim must equal the image width")
    model.vision_model.load_state_dict(tower.state_dict())
    with torch.no_grad():
        model.visual_projection.weight.copy_(torch.eye(model.visual_projection.weight.shape[0]))


def run(ctx: ZooContext, preset: LiTPreset | None = None) -> ZooResult:
    """Pretrain the image tower (supervised), lock it, train a fresh text tower to it with ITC,
    then evaluate retrieval and zero-shot."""
    preset = preset or tiny()
    if any(name in preset.lit_stage.trainable for name in ("*", *LOCKED)):
        raise ValueError(f"the lit stage must not train the image side {LOCKED}; got {preset.lit_stage.trainable}")
    seed_everything(ctx.seed)
    images = image_cache(preset.vision)
    tower, pretrain = pretrain_image_tower(preset, ctx, images)
    tokenizer, tokenizer_file, pairs = zoo_tokenizer(ctx.data_dir, preset.tokenizer_vocab_size, ctx.out_dir)
    model = DualEncoder(preset.dual_encoder_config(with_tokenizer(preset.text, tokenizer)))
    lock_image_tower(model, tower)
    task = ContrastiveTask(pairs, tokenizer, images, preset.max_text_length, preset.lit_stage.objectives,
                           counts=count_phrases_for(ctx.data_dir, preset.lit_stage.objectives))
    meta = {"preset": preset.name, "image_size": [preset.vision.image_size] * 2}
    lit = train_stage(model, preset.lit_stage, task, ctx, tokenizer_file, meta)
    notes: dict[str, Any] = {
        "recipe": preset.name,
        "locked": list(LOCKED),
        "pretrain_final": pretrain.history[-1] if pretrain.history else {},
    }
    return dual_encoder_result(model, tokenizer, task, ctx, images, [pretrain, lit], notes=notes)


ZOO = {"lit": run}
