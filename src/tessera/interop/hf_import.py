"""Import a local Hugging Face checkpoint folder into a Tessera model.

A folder holds config.json, the weights (model.safetensors, or shards listed by
model.safetensors.index.json), usually tokenizer files and an image processor config.
`load_hf` reads it into a Tessera model with its tokenizer and the preprocessing facts
(chat template, image size, mean, std); `import_hf` also writes it as a Tessera checkpoint.

Supported architectures and what they become (registry kind):
    LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM   LlamaDecoder ("llama")
    CLIPVisionModel, SiglipVisionModel                         VisionTransformer ("vit")
    CLIPTextModel, SiglipTextModel                             CLIPTextTransformer ("text_tower")
    CLIPModel                                                  DualEncoder ("dual_encoder")
    SiglipModel                                                SigLIPDualEncoder ("siglip_dual_encoder")
    LlavaForConditionalGeneration (CLIP or SigLIP tower, linear or MLP projector,
        LLaMA / Mistral / Qwen2 LM)                           LVLM ("lvlm")
    BertModel                                                  text.bert.BertModel ("bert")
    Blip2ForConditionalGeneration (LLaMA / Mistral / Qwen2 LM; OPT and T5 raise)
                                                               LVLM with a Q-Former connector ("lvlm")

Nothing is skipped silently: an unsupported architecture or config value, a missing shard, a
tensor whose dtype is not a float format, or a checkpoint whose keys or shapes do not match
the model raises HFImportError naming the file and the key. Everything the import had to
complete (a tokenizer role, a default chat template) is listed in `ImportedModel.notes`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from tessera.config import Config
from tessera.data.images import CLIP_MEAN, CLIP_STD
from tessera.data.templates import TemplateError, get_template, stop_token_ids
from tessera.interop.hf_keys import (
    bert_config_from_hf,
    bert_config_from_weights,
    bert_state_dict_from_hf,
    blip2_config_from_hf,
    blip2_config_from_weights,
    blip2_state_dict_from_hf,
    clip_dual_encoder_config_from_hf,
    clip_text_config_from_hf,
    clip_text_state_dict_from_hf,
    clip_vision_state_dict_from_hf,
    dual_encoder_state_dict_from_hf,
    is_derived_buffer,
    llama_config_from_hf,
    llama_state_dict_from_hf,
    load_state_dict_strict,
    lvlm_config_from_hf,
    lvlm_state_dict_from_hf,
    siglip_dual_encoder_config_from_hf,
    siglip_text_config_from_hf,
    vit_config_from_hf_clip_vision,
    vit_config_from_hf_siglip_vision,
)
from tessera.interop.hf_tokenizer import (
    find_chat_template,
    read_json,
    template_from_jinja,
    tokenizer_from_hf,
)
from tessera.models.dual_encoder import DualEncoder, SigLIPDualEncoder
from tessera.models.lvlm import LVLM
from tessera.models.registry import kind_of
from tessera.text.bert import BertModel
from tessera.text.clip_text import CLIPTextTransformer
from tessera.text.llama import LlamaDecoder
from tessera.text.tokenizer import IMAGE_TOKEN, TOKENIZER_FILE, Tokenizer
from tessera.train.checkpoint import save_checkpoint
from tessera.vision.vit import VisionTransformer, ViTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Float formats a checkpoint may store; anything else (int8, float8, packed 4-bit) is a
# quantized checkpoint, whose numbers would not mean what the float parameters mean.
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Architectures Tessera cannot build yet, with what is missing.
_NOT_YET_SUPPORTED = {
    "Bert": "a BERT head Tessera does not import; only BertModel (the encoder) is supported",
    "Blip2": "a BLIP-2 class Tessera does not import; only Blip2ForConditionalGeneration is supported",
}


class HFImportError(ValueError):
    """A Hugging Face folder that cannot be imported faithfully; the message names the file and key."""


@dataclass(frozen=True)
class _Family:
    config_from_hf: Callable[[Mapping[str, Any]], Config]
    model_cls: Callable[[Any], nn.Module]
    state_from_hf: Callable[[Mapping[str, Tensor], Any], dict[str, Tensor]]
    default_image_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # What the config leaves open and the weights settle (BERT's pooler, BLIP-2's text FFNs).
    config_from_weights: Callable[[Any, Mapping[str, Tensor]], Any] | None = None
    default_template: str | None = None  # the family's chat template when the folder names none


def _decoder_state(hf_state: Mapping[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    return llama_state_dict_from_hf(hf_state, tie_word_embeddings=cfg.tie_word_embeddings)


_DECODER = _Family(llama_config_from_hf, LlamaDecoder, _decoder_state)
_CLIP_STATS = (CLIP_MEAN, CLIP_STD)
_SIGLIP_STATS = (SIGLIP_MEAN, SIGLIP_STD)

ARCHITECTURES: dict[str, _Family] = {
    "LlamaForCausalLM": _DECODER,
    "MistralForCausalLM": _DECODER,
    "Qwen2ForCausalLM": _DECODER,
    "CLIPVisionModel": _Family(
        vit_config_from_hf_clip_vision, VisionTransformer,
        lambda s, _: clip_vision_state_dict_from_hf(s), _CLIP_STATS,
    ),
    "CLIPTextModel": _Family(
        clip_text_config_from_hf, CLIPTextTransformer, lambda s, _: clip_text_state_dict_from_hf(s)
    ),
    "CLIPModel": _Family(
        clip_dual_encoder_config_from_hf, DualEncoder,
        lambda s, _: dual_encoder_state_dict_from_hf(s), _CLIP_STATS,
    ),
    "SiglipVisionModel": _Family(
        vit_config_from_hf_siglip_vision, VisionTransformer,
        lambda s, _: clip_vision_state_dict_from_hf(s), _SIGLIP_STATS,
    ),
    "SiglipTextModel": _Family(
        siglip_text_config_from_hf, CLIPTextTransformer, lambda s, _: clip_text_state_dict_from_hf(s)
    ),
    "SiglipModel": _Family(
        siglip_dual_encoder_config_from_hf, SigLIPDualEncoder,
        lambda s, _: dual_encoder_state_dict_from_hf(s), _SIGLIP_STATS,
    ),
    "LlavaForConditionalGeneration": _Family(lvlm_config_from_hf, LVLM, lvlm_state_dict_from_hf),
    "BertModel": _Family(
        bert_config_from_hf, BertModel, lambda s, _: bert_state_dict_from_hf(s),
        config_from_weights=bert_config_from_weights,
    ),
    # BLIP-2 with a LLaMA-family language model (OPT / T5 language models raise).
    "Blip2ForConditionalGeneration": _Family(
        blip2_config_from_hf, LVLM, blip2_state_dict_from_hf, _CLIP_STATS,
        config_from_weights=blip2_config_from_weights, default_template="blip2",
    ),
}

# A config.json without "architectures" is read by its model_type.
_ARCHITECTURE_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "clip_vision_model": "CLIPVisionModel",
    "clip_text_model": "CLIPTextModel",
    "clip": "CLIPModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip_text_model": "SiglipTextModel",
    "siglip": "SiglipModel",
    "llava": "LlavaForConditionalGeneration",
    "bert": "BertModel",
    "blip-2": "Blip2ForConditionalGeneration",
}


@dataclass
class ImportedModel:
    model: nn.Module
    architecture: str  # the Hugging Face class it came from
    tokenizer: Tokenizer | None
    meta: dict[str, Any]  # template, image_size, image_mean, image_std, source
    notes: list[str] = field(default_factory=list)  # what the import completed or assumed

    @property
    def kind(self) -> str:
        return kind_of(self.model)


# ------------------------------------------------------------------------ weights


def read_hf_weights(
    folder: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """All tensors of a folder's safetensors weights, cast to `dtype`.

    Returns (key → tensor, key → the file it came from, the file describing the weights).
    A sharded checkpoint's index must list exactly the tensors each shard holds.
    """
    folder = Path(folder)
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX_FILE
    if single.is_file():
        shard_keys: dict[str, set[str] | None] = {WEIGHTS_FILE: None}
        source = single
    elif index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFImportError(f"{index}: key 'weight_map' is missing or empty")
        shard_keys = {}
        for key, shard in weight_map.items():
            shard_keys.setdefault(shard, set()).add(key)
        source = index
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(others)}: only safetensors weights are read)" if others else ""
        raise HFImportError(f"{folder}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}{hint}")

    tensors: dict[str, Tensor] = {}
    origins: dict[str, str] = {}
    for shard, listed in shard_keys.items():
        path = folder / shard
        if not path.is_file():
            example = sorted(listed or ())[:1]
            raise HFImportError(
                f"{source}: shard {shard!r} is missing from {folder} (it holds {len(listed or ())} "
                f"tensors, e.g. {example[0]!r})"
            )
        try:
            shard_tensors = _read_shard(path, listed, source.name)
        except SafetensorError as err:
            raise HFImportError(f"{path}: not a readable safetensors file ({err})") from None
        for key, tensor in shard_tensors.items():
            if tensor.dtype not in _FLOAT_DTYPES and not is_derived_buffer(key):
                raise HFImportError(
                    f"{path}: tensor {key!r} has dtype {tensor.dtype}; only float32 / float16 / "
                    "bfloat16 weights can be imported (quantized checkpoints are not supported)"
                )
            tensors[key] = tensor.to(dtype) if tensor.dtype in _FLOAT_DTYPES else tensor
            origins[key] = shard
    return tensors, origins, source.name


def _read_shard(path: Path, listed: set[str] | None, index_name: str) -> dict[str, Tensor]:
    """Every tensor of one safetensors file, which must hold exactly `listed` (when given)."""
    with safe_open(str(path), framework="pt") as f:
        held = set(f.keys())
        if listed is not None and held != listed:
            absent, unlisted = sorted(listed - held), sorted(held - listed)
            detail = f"lacks {absent[0]!r}" if absent else f"holds {unlisted[0]!r}, which the index does not list"
            raise HFImportError(f"{path}: shard does not match {index_name}: it {detail}")
        return {key: f.get_tensor(key) for key in sorted(held)}


# ------------------------------------------------------------------------- config


def read_hf_config(folder: str | Path) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, the architecture it describes); raises for unsupported ones."""
    config_file = Path(folder) / CONFIG_FILE
    if not config_file.is_file():
        raise HFImportError(f"{folder}: no {CONFIG_FILE}; not a Hugging Face model folder")
    d = read_json(config_file)
    if "quantization_config" in d:
        raise HFImportError(
            f"{config_file}: config key 'quantization_config': quantized checkpoints are not supported"
        )
    architectures = d.get("architectures") or []
    if len(set(architectures)) > 1:
        raise HFImportError(f"{config_file}: config key 'architectures' = {architectures} names several")
    architecture = architectures[0] if architectures else _ARCHITECTURE_OF_MODEL_TYPE.get(d.get("model_type", ""))
    if architecture in ARCHITECTURES:
        return d, architecture
    named = architecture or d.get("model_type")
    reason = next((why for prefix, why in _NOT_YET_SUPPORTED.items() if str(named).startswith(prefix)), None)
    key = "architectures" if architectures else "model_type"
    raise HFImportError(
        f"{config_file}: config key {key!r}: {named!r} is not supported"
        + (f" (it needs {reason})" if reason else "")
        + f"; supported: {', '.join(ARCHITECTURES)}"
    )


def _image_meta(
    folder: Path, vision: ViTConfig, defaults: tuple[tuple[float, ...], tuple[float, ...]], notes: list[str]
) -> dict[str, Any]:
    """image_size [H, W], image_mean, image_std from the folder's image processor config."""
    processor: dict[str, Any] | None = None
    if (folder / IMAGE_PROCESSOR_FILE).is_file():
        processor = read_json(folder / IMAGE_PROCESSOR_FILE)
    elif (folder / PROCESSOR_FILE).is_file():
        processor = read_json(folder / PROCESSOR_FILE).get("image_processor")
    if not processor:
        notes.append(
            f"no image processor config: images are resized to {vision.image_size}x{vision.image_size} "
            f"with mean {list(defaults[0])}, std {list(defaults[1])}"
        )
        return {"image_size": [vision.image_size] * 2, "image_mean": list(defaults[0]),
                "image_std": list(defaults[1])}
    size = processor.get("size") or {}
    crop = processor.get("crop_size") or {}
    if processor.get("do_center_crop") and "height" in crop:
        height, width = crop["height"], crop["width"]
        if size != crop:
            notes.append(
                f"the Hugging Face processor resizes to {size} and center-crops {height}x{width}; "
                f"Tessera resizes the whole image to {height}x{width}"
            )
    elif "height" in size:
        height, width = size["height"], size["width"]
    else:
        edge = size.get("shortest_edge", vision.image_size)
        height = width = edge
        notes.append(f"image processor size {size}: Tessera resizes images to {edge}x{edge}")
    return {
        "image_size": [int(height), int(width)],
        "image_mean": list(processor.get("image_mean", defaults[0])),
        "image_std": list(processor.get("image_std", defaults[1])),
    }


def _choose_template(
    folder: Path, d: Mapping[str, Any], tokenizer: Tokenizer | None, template: str | None, notes: list[str],
    family_default: str | None = None,
) -> str:
    """The requested template, else the one a Tessera export wrote, else the family's usual one."""
    if template is not None:
        get_template(template)
        chosen = template
    else:
        shipped = find_chat_template(folder)
        image_token = tokenizer.special_tokens["image"] if tokenizer is not None else IMAGE_TOKEN
        recognised = template_from_jinja(shipped, image_token) if shipped else None
        text = d.get("text_config") or d
        chosen = recognised or family_default or ("chatml" if text.get("model_type") == "qwen2" else "vicuna")
        if recognised is None:
            found = "is not one Tessera wrote" if shipped else "is absent"
            notes.append(f"the chat template {found}; using Tessera's {chosen!r} (choose with --template or template=)")
    if tokenizer is not None:
        try:
            stop_token_ids(tokenizer, chosen)
        except TemplateError as err:
            if template is not None:
                raise HFImportError(f"{folder}: {err}") from None
            notes.append(f"template {chosen!r} does not fit this tokenizer: {err}")
    return chosen


# ------------------------------------------------------------------------- import


def load_hf(
    path: str | Path, *, template: str | None = None, dtype: torch.dtype = torch.float32
) -> ImportedModel:
    """Load a local Hugging Face folder into the Tessera model of the same computation."""
    folder = Path(path)
    d, architecture = read_hf_config(folder)
    family = ARCHITECTURES[architecture]
    try:
        cfg = family.config_from_hf(d)
    except ValueError as err:
        raise HFImportError(f"{folder / CONFIG_FILE}: {err}") from None
    hf_state, files, weights_source = read_hf_weights(folder, dtype)
    if family.config_from_weights is not None:
        cfg = family.config_from_weights(cfg, hf_state)
    model = family.model_cls(cfg)
    try:
        state = family.state_from_hf(hf_state, cfg)
    except ValueError as err:
        raise HFImportError(f"{folder / weights_source}: {err}") from None
    # The translations pass tensors through unchanged, so identity finds each one's source key.
    source_of = {id(t): f"{files[k]}: {k!r}" for k, t in hf_state.items()}
    origins = {k: source_of[id(t)] for k, t in state.items() if id(t) in source_of}
    load_state_dict_strict(model, state, str(folder / weights_source), origins=origins)
    model.to(dtype).eval()

    notes: list[str] = []
    tokenizer: Tokenizer | None = None
    if (folder / TOKENIZER_FILE).is_file():
        image_token_id = cfg.image_token_id if isinstance(model, LVLM) else None
        try:
            tokenizer, tokenizer_notes = tokenizer_from_hf(folder, image_token_id=image_token_id)
        except ValueError as err:
            raise HFImportError(str(err)) from None
        notes += tokenizer_notes
    else:
        notes.append(f"no {TOKENIZER_FILE} in {folder}: the tokenizer is not imported")

    meta: dict[str, Any] = {"source": str(folder.resolve()), "hf_architecture": architecture}
    decoder = model.language_model if isinstance(model, LVLM) else model
    if isinstance(decoder, LlamaDecoder):
        meta["template"] = _choose_template(folder, d, tokenizer, template, notes, family.default_template)
        if tokenizer is not None and tokenizer.vocab_size > decoder.cfg.vocab_size:
            notes.append(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
                f"{decoder.cfg.vocab_size}: ids from {decoder.cfg.vocab_size} on cannot be fed to the model"
            )
    elif template is not None:
        notes.append(f"template {template!r} ignored: a {architecture} has no language model")
    vision = getattr(model, "vision_tower", getattr(model, "vision_model", model))
    if isinstance(vision, VisionTransformer):
        defaults = family.default_image_stats or (
            _SIGLIP_STATS if not vision.cfg.class_token else _CLIP_STATS
        )
        meta.update(_image_meta(folder, vision.cfg, defaults, notes))
    return ImportedModel(model=model, architecture=architecture, tokenizer=tokenizer, meta=meta, notes=notes)


def import_hf(
    src: str | Path, out: str | Path, *, template: str | None = None, dtype: torch.dtype = torch.float32
) -> ImportedModel:
    """`load_hf(src)` written as a Tessera checkpoint at `out` (weights, config with the meta,
    tokenizer)."""
    imported = load_hf(src, template=template, dtype=dtype)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_file = imported.tokenizer.save(scratch) if imported.tokenizer is not None else None
        save_checkpoint(out, imported.model, meta=imported.meta, tokenizer_file=tokenizer_file)
    return imported
