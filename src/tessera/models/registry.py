"""Model kinds a checkpoint can hold: name → (config class, model class).

A checkpoint's config.json names its kind; loading never depends on folder names.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tessera.config import Config
from tessera.models.albef import ALBEF, ALBEFConfig
from tessera.models.blip import BLIP, BLIPConfig
from tessera.models.blip2 import Blip2PretrainConfig, Blip2QFormerPretrain
from tessera.models.dual_encoder import (
    DualEncoder,
    DualEncoderConfig,
    SigLIPDualEncoder,
    SigLIPDualEncoderConfig,
)
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.models.slot_reader import SlotReader, SlotReaderConfig
from tessera.models.vilt import ViLT, ViltConfig
from tessera.models.vlmo import VLMo, VLMoConfig
from tessera.text.bert import BertConfig, BertModel
from tessera.text.clip_text import CLIPTextConfig, CLIPTextTransformer
from tessera.text.llama import LlamaConfig, LlamaDecoder
from tessera.vision.navit import NaViT, NaViTConfig
from tessera.vision.vit import VisionTransformer, ViTConfig
from tessera.vision.vitdet import ViTDet, ViTDetConfig

MODEL_KINDS: dict[str, tuple[type[Config], type[nn.Module]]] = {
    "lvlm": (LVLMConfig, LVLM),
    "dual_encoder": (DualEncoderConfig, DualEncoder),
    "siglip_dual_encoder": (SigLIPDualEncoderConfig, SigLIPDualEncoder),
    "llama": (LlamaConfig, LlamaDecoder),
    "albef": (ALBEFConfig, ALBEF),
    "blip": (BLIPConfig, BLIP),
    "blip2_qformer": (Blip2PretrainConfig, Blip2QFormerPretrain),  # BLIP-2 stage 1
    "vilt": (ViltConfig, ViLT),
    "slot_reader": (SlotReaderConfig, SlotReader),  # an encoder's reading pretraining (Vary-tiny)
    "vlmo": (VLMoConfig, VLMo),
    # Single towers, e.g. a pretrained image encoder imported on its own.
    "vit": (ViTConfig, VisionTransformer),
    "navit": (NaViTConfig, NaViT),  # POINTS' native-resolution encoder
    "vitdet": (ViTDetConfig, ViTDet),  # Vary's new vision vocabulary
    "text_tower": (CLIPTextConfig, CLIPTextTransformer),
    "bert": (BertConfig, BertModel),  # e.g. a BERT imported to initialise a Q-Former's text side
}


def kind_of(model: nn.Module) -> str:
    for kind, (_, cls) in MODEL_KINDS.items():
        if type(model) is cls:
            return kind
    raise ValueError(f"{type(model).__name__} is not a registered model kind ({sorted(MODEL_KINDS)})")


def build_model(kind: str, config: dict[str, Any], where: str = "config") -> nn.Module:
    if kind not in MODEL_KINDS:
        raise ValueError(f"{where}: unknown model kind {kind!r}; allowed: {sorted(MODEL_KINDS)}")
    cfg_cls, model_cls = MODEL_KINDS[kind]
    return model_cls(cfg_cls.parse(config, where=where))
