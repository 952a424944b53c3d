"""Export a Tessera checkpoint as a Hugging Face folder that transformers loads without custom code.

What each model kind becomes:
    lvlm                  LlavaForConditionalGeneration: config.json, model.safetensors,
                          generation_config.json, tokenizer files with a Jinja chat template
                          rendering the checkpoint's Tessera template, and a LlavaProcessor
                          (preprocessor_config.json: a CLIPImageProcessor resizing to the
                          checkpoint's image size with its mean / std; processor_config.json:
                          patch_size, vision_feature_select_strategy, image token).
    dual_encoder          CLIPModel (+ tokenizer, image processor)
    siglip_dual_encoder   SiglipModel (+ tokenizer, image processor)
    llama                 LlamaForCausalLM, or Qwen2ForCausalLM for q/k/v biases (+ tokenizer)
    vit / text_tower      CLIPVisionModel / SiglipVisionModel, CLIPTextModel / SiglipTextModel

A model transformers cannot express (e.g. a ViT mixing CLIP and SigLIP options) raises
ValueError naming the option. The folder is written atomically (see atomic_directory).

LoRA adapters (tessera.nn.lora) of lvlm and llama checkpoints are merged into the exported
weights, or, with `adapter_out`, written there in the PEFT adapter format (adapter_config.json,
adapter_model.safetensors with PEFT's key names) next to the un-merged base model, so that
`peft.PeftModel.from_pretrained(transformers_model, adapter_out)` computes what Tessera does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from tessera.data.images import CLIP_MEAN, CLIP_STD
from tessera.data.templates import stop_token_ids
from tessera.interop.hf_keys import (
    DECODER_ARCHITECTURES,
    clip_config_to_hf,
    clip_text_state_dict_to_hf,
    clip_vision_state_dict_to_hf,
    llama_config_to_hf,
    llama_state_dict_to_hf,
    lvlm_config_to_hf,
    lvlm_state_dict_to_hf,
    siglip_config_to_hf,
    text_tower_config_to_hf,
    vit_config_to_hf,
)
from tessera.interop.hf_tokenizer import chat_template_jinja, save_hf_tokenizer, special_token_ids
from tessera.models.lvlm import LVLM
from tessera.nn.lora import LoraConfig, lora_config, lora_state_dict, merge_lora, remove_lora
from tessera.text.tokenizer import Tokenizer
from tessera.train.checkpoint import Checkpoint, atomic_directory, load_checkpoint
from tessera.vision.vit import ViTConfig

_TOWER_ARCHITECTURES = {
    "clip_vision_model": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "clip_text_model": "CLIPTextModel",
    "siglip_text_model": "SiglipTextModel",
}


def _dtype_name(state: Mapping[str, Tensor]) -> str:
    return str(next(iter(state.values())).dtype).removeprefix("torch.")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_weights(path: Path, state: Mapping[str, Tensor]) -> None:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _image_processor_config(meta: Mapping[str, Any], vision: ViTConfig) -> dict[str, Any]:
    """A CLIPImageProcessor that does what Tessera's ImageTransform does: a bicubic resize of
    the whole image to (H, W), scaling to [0, 1], per-channel normalisation."""
    height, width = meta.get("image_size") or [vision.image_size] * 2
    size = {"height": int(height), "width": int(width)}
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": size,
        "resample": 3,  # PIL bicubic
        "do_center_crop": False,
        "crop_size": size,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(meta.get("image_mean", CLIP_MEAN)),
        "image_std": list(meta.get("image_std", CLIP_STD)),
        "do_convert_rgb": True,
    }


def _require_tokenizer(ckpt: Checkpoint, what: str) -> Tokenizer:
    if not ckpt.tokenizer_path.is_file():
        raise ValueError(f"{ckpt.path}: {ckpt.tokenizer_path.name} is missing; {what} needs the tokenizer")
    return Tokenizer.load(ckpt.tokenizer_path)


def _optional_tokenizer(ckpt: Checkpoint) -> Tokenizer | None:
    return Tokenizer.load(ckpt.tokenizer_path) if ckpt.tokenizer_path.is_file() else None


def _generation_config(tokenizer: Tokenizer, template: str) -> dict[str, Any]:
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stop_token_ids(tokenizer, template),
        "pad_token_id": tokenizer.pad_id,
    }


def _export_llava(ckpt: Checkpoint, out: Path) -> None:
    model = ckpt.model
    assert isinstance(model, LVLM)
    cfg = model.cfg
    tokenizer = _require_tokenizer(ckpt, "a LLaVA processor")
    if tokenizer.image_id != cfg.image_token_id:
        raise ValueError(
            f"{ckpt.path}: the tokenizer's image token id {tokenizer.image_id} differs from the "
            f"model's image_token_id {cfg.image_token_id}"
        )
    height, width = (int(s) for s in ckpt.meta.get("image_size") or [cfg.vision.image_size] * 2)
    if (height, width) != (cfg.vision.image_size, cfg.vision.image_size):
        raise ValueError(
            f"{ckpt.path}: meta image_size {height}x{width}: transformers' LLaVA runs its vision "
            f"tower only at the square image_size {cfg.vision.image_size} it was built for (its "
            "forward does not interpolate position embeddings)"
        )
    template = ckpt.meta.get("template", "vicuna")
    state = lvlm_state_dict_to_hf(model.state_dict(), cfg)
    config = lvlm_config_to_hf(cfg)
    config["text_config"].update(special_token_ids(tokenizer))
    config["image_seq_length"] = model.num_image_tokens(height, width)
    config["dtype"] = _dtype_name(state)
    _write_json(out / "config.json", config)
    _write_weights(out / "model.safetensors", state)
    _write_json(out / "generation_config.json", _generation_config(tokenizer, template))
    image_token = tokenizer.special_tokens["image"]
    save_hf_tokenizer(
        tokenizer, out, chat_template=chat_template_jinja(template, image_token),
        model_max_length=cfg.llm.max_position_embeddings,
    )
    _write_json(out / "preprocessor_config.json", _image_processor_config(ckpt.meta, cfg.vision))
    _write_json(out / "processor_config.json", {
        "processor_class": "LlavaProcessor",
        "patch_size": cfg.vision.patch_size,
        "vision_feature_select_strategy": config["vision_feature_select_strategy"],
        "image_token": image_token,
        # The class token the tower adds; "default" then removes it again.
        "num_additional_image_tokens": int(cfg.vision.class_token),
    })


def _export_decoder(ckpt: Checkpoint, out: Path) -> None:
    cfg = ckpt.model.cfg
    tokenizer = _optional_tokenizer(ckpt)
    state = llama_state_dict_to_hf(ckpt.model.state_dict(), tie_word_embeddings=cfg.tie_word_embeddings)
    config = llama_config_to_hf(cfg)
    config["architectures"] = [DECODER_ARCHITECTURES[config["model_type"]]]
    config["dtype"] = _dtype_name(state)
    template = ckpt.meta.get("template")
    if tokenizer is not None:
        config.update(special_token_ids(tokenizer))
        chat_template = None
        if template is not None:
            _write_json(out / "generation_config.json", _generation_config(tokenizer, template))
            chat_template = chat_template_jinja(template, tokenizer.special_tokens["image"])
        save_hf_tokenizer(tokenizer, out, chat_template=chat_template,
                          model_max_length=cfg.max_position_embeddings)
    _write_json(out / "config.json", config)
    _write_weights(out / "model.safetensors", state)


def _export_dual_encoder(ckpt: Checkpoint, out: Path) -> None:
    cfg = ckpt.model.cfg
    config = clip_config_to_hf(cfg) if ckpt.kind == "dual_encoder" else siglip_config_to_hf(cfg)
    state = dict(ckpt.model.state_dict())
    tokenizer = _optional_tokenizer(ckpt)
    if tokenizer is not None:
        config["text_config"].update(
            bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id
        )
        save_hf_tokenizer(tokenizer, out, model_max_length=cfg.text.max_position_embeddings)
    config["dtype"] = _dtype_name(state)
    _write_json(out / "config.json", config)
    _write_weights(out / "model.safetensors", state)
    _write_json(out / "preprocessor_config.json", _image_processor_config(ckpt.meta, cfg.vision))


def _export_tower(ckpt: Checkpoint, out: Path) -> None:
    cfg = ckpt.model.cfg
    state = ckpt.model.state_dict()
    if ckpt.kind == "vit":
        config = vit_config_to_hf(cfg)
        hf_state = clip_vision_state_dict_to_hf(state)
        _write_json(out / "preprocessor_config.json", _image_processor_config(ckpt.meta, cfg))
    else:
        config = text_tower_config_to_hf(cfg)
        hf_state = clip_text_state_dict_to_hf(state)
        tokenizer = _optional_tokenizer(ckpt)
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, out, model_max_length=cfg.max_position_embeddings)
    config["architectures"] = [_TOWER_ARCHITECTURES[config["model_type"]]]
    config["dtype"] = _dtype_name(hf_state)
    _write_json(out / "config.json", config)
    _write_weights(out / "model.safetensors", hf_state)


_EXPORTERS: dict[str, Callable[[Checkpoint, Path], None]] = {
    "lvlm": _export_llava,
    "llama": _export_decoder,
    "dual_encoder": _export_dual_encoder,
    "siglip_dual_encoder": _export_dual_encoder,
    "vit": _export_tower,
    "text_tower": _export_tower,
}


PEFT_ADAPTER_CONFIG = "adapter_config.json"
PEFT_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PeftModel wraps the transformers model under this path


def peft_module_name(kind: str, name: str) -> str:
    """A Tessera module path → the module path in the transformers model `export_hf` writes
    (the module layout of transformers ≥ 4.52: LLaVA's decoder under model.language_model)."""
    if kind == "lvlm":
        part, _, rest = name.partition(".")
        if part == "language_model":
            return "lm_head" if rest == "lm_head" else f"model.language_model.{rest}"
        if part == "connector":
            return f"model.multi_modal_projector.{rest}"
    elif kind == "llama":
        return name if name == "lm_head" else f"model.{name}"
    raise ValueError(f"LoRA on {name!r} of a {kind} model has no PEFT export (supported: the language model "
                     "and the connector of lvlm checkpoints, any layer of llama checkpoints)")


def peft_adapter(model: torch.nn.Module, kind: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config.json contents, adapter_model.safetensors tensors) of the model's LoRA."""
    config: LoraConfig | None = lora_config(model)
    if config is None:
        raise ValueError("the model carries no LoRA adapters")
    state: dict[str, Tensor] = {}
    targets: list[str] = []
    for key, value in lora_state_dict(model).items():
        module, _, leaf = key.removesuffix(".weight").rpartition(".")  # leaf: lora_A / lora_B
        hf_module = peft_module_name(kind, module)
        state[f"{_PEFT_PREFIX}{hf_module}.{leaf}.weight"] = value.detach().contiguous()
        if leaf == "lora_A":
            targets.append(hf_module)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        # Full module paths: PEFT matches a name equal to an entry (or ending in "." + entry).
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return peft_config, state


def export_hf(checkpoint: str | Path, out: str | Path, adapter_out: str | Path | None = None) -> Path:
    """Write the Tessera checkpoint at `checkpoint` as a Hugging Face folder at `out`. A
    checkpoint with LoRA adapters is exported merged, or, with `adapter_out`, as the base model
    at `out` plus a PEFT adapter folder at `adapter_out`."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.kind not in _EXPORTERS:
        raise ValueError(f"{checkpoint}: model kind {ckpt.kind!r} has no Hugging Face export")
    if adapter_out is not None and lora_config(ckpt.model) is None:
        raise ValueError(f"{checkpoint}: no LoRA adapters in this checkpoint, nothing to write to {adapter_out}")
    with torch.no_grad():
        if adapter_out is not None:
            peft_config, peft_state = peft_adapter(ckpt.model, ckpt.kind)
            with atomic_directory(adapter_out) as tmp:
                _write_json(tmp / PEFT_ADAPTER_CONFIG, peft_config)
                _write_weights(tmp / PEFT_ADAPTER_WEIGHTS, peft_state)
            remove_lora(ckpt.model)
        elif lora_config(ckpt.model) is not None:
            merge_lora(ckpt.model)
        with atomic_directory(out) as tmp:
            _EXPORTERS[ckpt.kind](ckpt, tmp)
    return Path(out)
