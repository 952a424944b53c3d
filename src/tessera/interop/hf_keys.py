"""Translate Hugging Face state-dict keys and configs to and from Tessera's.

Tessera's parameter names are Hugging Face's with the model-level prefix removed, so the
mapping is a prefix rule per family:

- LLaMA-family decoders (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM):
  "model.X" <-> "X", and "lm_head.weight" unchanged. With tied word embeddings a Hugging
  Face checkpoint usually leaves lm_head.weight out; it is filled from the embedding.
- CLIP and SigLIP vision towers (CLIPVisionModel, SiglipVisionModel, or the vision half of
  CLIPModel / SiglipModel): "vision_model.X" <-> "X".
- CLIP and SigLIP text towers (CLIPTextModel, SiglipTextModel, or the text half of the whole
  models): "text_model.X" <-> "X".
  transformers >= 5 holds and saves a standalone tower without its prefix; loading accepts
  both layouts, exporting writes the prefixed one.
- Whole dual encoders (CLIPModel -> DualEncoder, SiglipModel -> SigLIPDualEncoder): the
  same keys on both sides.
- LLaVA (LlavaForConditionalGeneration -> LVLM): "vision_tower.vision_model.X" <->
  "vision_tower.X", "multi_modal_projector.X" <-> "connector.X", "language_model.model.X" <->
  "language_model.X", "language_model.lm_head.weight" <-> "language_model.lm_head.weight"
  (the hub's layout, which save_pretrained still writes); transformers >= 5's in-memory
  layout ("model.vision_tower.X", "model.language_model.X", "lm_head.weight", ...) is
  accepted too.
- BERT (BertModel -> text.bert.BertModel): the same keys ("bert." prefix optional).
- BLIP-2 (Blip2ForConditionalGeneration with a LLaMA-family LM -> LVLM with a Q-Former
  connector): "vision_model.X" -> "vision_tower.X" (fused qkv split into q/k/v_proj,
  projection -> out_proj), its post_layernorm also -> "connector.ln_vision";
  "query_tokens", "qformer.X", "language_projection.X" -> "connector.…" unchanged;
  "language_model.model.X" / "language_model.lm_head.weight" -> "language_model.…".

The config functions translate a Hugging Face config dict (config.json, or
`PretrainedConfig.to_dict()`) into the Tessera config of the same computation, and back
(`*_config_to_hf`). A value that changes the computation in a way Tessera (or, exporting,
transformers) cannot express raises ValueError naming the key; bookkeeping keys (token ids
other than CLIP's EOS, dtype, architectures) are ignored. Keys a config.json leaves out take
the defaults of the transformers config class.

`load_state_dict_strict` is how a translated checkpoint enters a module: every key and shape
must match, and a mismatch is reported with the source file and the offending keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tessera.connectors.projector import ProjectorConfig
from tessera.connectors.qformer import QFormerConfig
from tessera.models.dual_encoder import DualEncoderConfig, SigLIPDualEncoderConfig
from tessera.models.lvlm import LVLMConfig
from tessera.nn.layers import Activation
from tessera.text.bert import BertConfig
from tessera.text.clip_text import CLIPTextConfig
from tessera.text.llama import LlamaConfig
from tessera.vision.vit import ViTConfig

DECODER_PREFIX = "model."
CLIP_VISION_PREFIX = "vision_model."
CLIP_TEXT_PREFIX = "text_model."
LM_HEAD_KEY = "lm_head.weight"
EMBED_KEY = "embed_tokens.weight"

LLAMA_FAMILY = ("llama", "mistral", "qwen2")

# Buffers that older checkpoints saved but both libraries recompute at construction.
_DERIVED_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids", "embeddings.token_type_ids")

# Top-level parts of a whole CLIPModel / SiglipModel checkpoint; a tower's loader skips the others.
_CLIP_MODEL_PARTS = (
    CLIP_VISION_PREFIX,
    CLIP_TEXT_PREFIX,
    "visual_projection.",
    "text_projection.",
    "logit_scale",
    "logit_bias",
)

# LLaVA checkpoint layouts: the hub's (written by save_pretrained) and transformers >= 5's
# in-memory one. The vision tower may carry its own "vision_model." level inside.
LLAVA_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
LLAVA_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
LLAVA_DECODER_PREFIXES = ("model.language_model.", "language_model.model.")
LLAVA_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")

# Hugging Face activation names (transformers.activations.ACT2CLS) → Tessera's, for the
# activations that compute the same function.
_HF_ACTIVATIONS: dict[str, Activation] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}
# Tessera activation → the Hugging Face name written on export.
_TO_HF_ACTIVATION: dict[str, str] = {
    "silu": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}

# CLIPVisionConfig / CLIPTextConfig defaults: CLIP config.json files often store only the
# values that differ from them.
_HF_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_HF_CLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}

# SiglipVisionConfig / SiglipTextConfig defaults.
_HF_SIGLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "vision_use_head": True,
}
_HF_SIGLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 64,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# LlamaConfig / MistralConfig / Qwen2Config defaults (LLaVA's text_config often stores only a
# few keys). Llama's num_key_value_heads defaults to num_attention_heads.
_HF_DECODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
    },
}

# Hugging Face's CLIPTextModel treats eos_token_id == 2 as a legacy config and pools at the
# highest token id of each text instead of at the EOS token.
_CLIP_LEGACY_EOS_ID = 2


class CheckpointMismatchError(ValueError):
    """A state dict whose keys or shapes do not match the module it is loaded into."""


# ----------------------------------------------------------------------------- keys


def _strip(key: str, prefix: str, family: str) -> str:
    if not key.startswith(prefix):
        raise ValueError(f"{family} key {key!r} does not start with {prefix!r}")
    return key[len(prefix) :]


def llama_key_from_hf(key: str) -> str:
    """LlamaForCausalLM-style key → LlamaDecoder key ("model.norm.weight" → "norm.weight")."""
    if key == LM_HEAD_KEY:
        return key
    return _strip(key, DECODER_PREFIX, "decoder")


def llama_key_to_hf(key: str) -> str:
    """LlamaDecoder key → LlamaForCausalLM-style key ("norm.weight" → "model.norm.weight")."""
    return key if key == LM_HEAD_KEY else DECODER_PREFIX + key


def clip_vision_key_from_hf(key: str) -> str:
    return _strip(key, CLIP_VISION_PREFIX, "CLIP vision")


def clip_vision_key_to_hf(key: str) -> str:
    return CLIP_VISION_PREFIX + key


def clip_text_key_from_hf(key: str) -> str:
    return _strip(key, CLIP_TEXT_PREFIX, "CLIP text")


def clip_text_key_to_hf(key: str) -> str:
    return CLIP_TEXT_PREFIX + key


def is_derived_buffer(key: str) -> bool:
    """Whether `key` is a buffer that older checkpoints saved but both libraries recompute."""
    return key.endswith(_DERIVED_BUFFER_SUFFIXES)


# ----------------------------------------------------------------------- state dicts


def llama_state_dict_from_hf(
    hf_state: Mapping[str, Tensor], *, tie_word_embeddings: bool
) -> dict[str, Tensor]:
    """A LLaMA-family checkpoint → LlamaDecoder state dict.

    With tied embeddings a missing lm_head.weight is taken from the embedding, and a present
    one must equal it (the module has a single tensor for both).
    """
    state = {llama_key_from_hf(k): v for k, v in hf_state.items() if not is_derived_buffer(k)}
    if tie_word_embeddings and EMBED_KEY in state:
        head = state.setdefault(LM_HEAD_KEY, state[EMBED_KEY])
        if head is not state[EMBED_KEY] and not torch.equal(head, state[EMBED_KEY]):
            raise ValueError(
                "tie_word_embeddings is set but the checkpoint's lm_head.weight differs from "
                "model.embed_tokens.weight"
            )
    return state


def llama_state_dict_to_hf(
    state: Mapping[str, Tensor], *, tie_word_embeddings: bool
) -> dict[str, Tensor]:
    """LlamaDecoder state dict → LLaMA-family checkpoint keys; a tied lm_head.weight is left
    out, as Hugging Face's save_pretrained does."""
    return {
        llama_key_to_hf(k): v
        for k, v in state.items()
        if not (tie_word_embeddings and k == LM_HEAD_KEY)
    }


def _clip_tower_from_hf(
    hf_state: Mapping[str, Tensor], prefix: str, family: str
) -> dict[str, Tensor]:
    keys = [k for k in hf_state if not is_derived_buffer(k)]
    if not any(k.startswith(prefix) for k in keys):
        if any(k.startswith(_CLIP_MODEL_PARTS) for k in keys):
            raise ValueError(
                f"the CLIP checkpoint has no {family} tower (no key starts with {prefix!r})"
            )
        # transformers >= 5 saves a standalone CLIPVisionModel / CLIPTextModel unprefixed.
        return {k: hf_state[k] for k in keys}
    state: dict[str, Tensor] = {}
    for key in keys:
        if not key.startswith(prefix) and key.startswith(_CLIP_MODEL_PARTS):
            continue  # the other tower or a projection of a CLIPModel checkpoint
        state[_strip(key, prefix, family)] = hf_state[key]
    return state


def clip_vision_state_dict_from_hf(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CLIPVisionModel / SiglipVisionModel (or whole CLIPModel / SiglipModel) checkpoint →
    VisionTransformer state dict.

    Keys carry "vision_model." in whole-model checkpoints and in tower checkpoints written by
    transformers < 5; a standalone tower saved by transformers >= 5 has none.
    """
    return _clip_tower_from_hf(hf_state, CLIP_VISION_PREFIX, "CLIP vision")


def clip_vision_state_dict_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """VisionTransformer state dict → prefixed keys, the layout every transformers version loads."""
    return {clip_vision_key_to_hf(k): v for k, v in state.items()}


def clip_text_state_dict_from_hf(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CLIPTextModel / SiglipTextModel (or whole-model) checkpoint → CLIPTextTransformer state
    dict ("text_model." prefix optional, as for the vision tower)."""
    return _clip_tower_from_hf(hf_state, CLIP_TEXT_PREFIX, "CLIP text")


def clip_text_state_dict_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {clip_text_key_to_hf(k): v for k, v in state.items()}


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    *,
    shown: int = 5,
    origins: Mapping[str, str] | None = None,
) -> None:
    """Load every tensor of `state_dict` into `module`, which must have exactly these keys and
    shapes; otherwise raise CheckpointMismatchError naming `source` (a file name) and the first
    `shown` missing, unexpected and mis-shaped keys. `origins` maps a key to where it came from
    (e.g. "model-00002-of-00003.safetensors: 'model.norm.weight'"), added to what is reported
    about it."""
    origins = origins or {}

    def described(key: str) -> str:
        return f"{key} [{origins[key]}]" if key in origins else key

    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(described(k) for k in set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{described(k)}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        lines = [f"{source}: checkpoint does not match {type(module).__name__}"]
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mis_shaped),
        ):
            if keys:
                more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
                lines.append(f"  {label} ({len(keys)}): {', '.join(keys[:shown])}{more}")
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(dict(state_dict), strict=True)


# -------------------------------------------------------------------------- configs


def _required(d: Mapping[str, Any], key: str, family: str) -> Any:
    if d.get(key) is None:
        raise ValueError(f"{family} config: required key {key!r} is missing")
    return d[key]


def _activation(d: Mapping[str, Any], default: str, key: str = "hidden_act") -> Activation:
    name = d.get(key, default)
    if name not in _HF_ACTIVATIONS:
        raise ValueError(
            f"config key {key!r} = {name!r} is not supported; supported: {', '.join(_HF_ACTIVATIONS)}"
        )
    return _HF_ACTIVATIONS[name]


def _activation_to_hf(act: Activation) -> str:
    return _TO_HF_ACTIVATION[act]


def _rope(d: Mapping[str, Any]) -> tuple[float, float]:
    """(theta, linear scaling factor) from either the transformers ≥ 5 `rope_parameters` dict
    or the older top-level `rope_theta` + `rope_scaling`."""
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    params = d.get(key) or {}
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"config key {key!r}: per-layer-type RoPE parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(
            f"config key 'partial_rotary_factor' = {partial!r} is not supported (only 1.0)"
        )
    if rope_type == "default":
        return theta, 1.0
    if rope_type == "linear":
        if "factor" not in params:
            raise ValueError(f"config key {key!r}: linear RoPE scaling without a 'factor'")
        return theta, float(params["factor"])
    raise ValueError(
        f"config key {key!r}: rope type {rope_type!r} is not supported (only default and linear)"
    )


def llama_config_from_hf(d: Mapping[str, Any]) -> LlamaConfig:
    """A LlamaConfig / MistralConfig / Qwen2Config dict → Tessera LlamaConfig."""
    family = d.get("model_type", "llama")
    if family not in LLAMA_FAMILY:
        raise ValueError(
            f"config key 'model_type' = {family!r} is not a LLaMA-family decoder ({', '.join(LLAMA_FAMILY)})"
        )
    d = {**_HF_DECODER_DEFAULTS[family], **d}
    num_heads = _required(d, "num_attention_heads", family)
    # Qwen2's attention_bias is implicit: q/k/v always have biases, o_proj never does.
    attention_bias = family == "qwen2"
    if family != "qwen2" and d.get("attention_bias", False):
        # Hugging Face's Llama puts the bias on o_proj too; Tessera's o_proj has none.
        raise ValueError(
            "config key 'attention_bias' = True is not supported for Llama/Mistral (o_proj bias)"
        )
    if family == "qwen2" and d.get("use_sliding_window", False):
        raise ValueError(
            "config key 'use_sliding_window' = True is not supported (sliding-window attention)"
        )
    max_positions = d.get("max_position_embeddings", 2048)
    window = d.get("sliding_window") if family == "mistral" else None
    if window is not None and window < max_positions:
        raise ValueError(
            f"config key 'sliding_window' = {window} is not supported (sliding-window attention "
            f"shorter than max_position_embeddings {max_positions})"
        )
    if d.get("layer_types") and any(t != "full_attention" for t in d["layer_types"]):
        raise ValueError("config key 'layer_types': only full_attention layers are supported")
    kv_heads = d.get("num_key_value_heads")
    if kv_heads is None:
        if family != "llama":
            raise ValueError(f"{family} config: required key 'num_key_value_heads' is missing")
        kv_heads = num_heads  # Llama's own default: multi-head attention
    theta, linear_scaling = _rope(d)
    return LlamaConfig(
        vocab_size=_required(d, "vocab_size", family),
        hidden_size=_required(d, "hidden_size", family),
        intermediate_size=_required(d, "intermediate_size", family),
        num_layers=_required(d, "num_hidden_layers", family),
        num_heads=num_heads,
        num_kv_heads=kv_heads,
        head_dim=d.get("head_dim"),
        rope_theta=theta,
        rope_linear_scaling=linear_scaling,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        max_position_embeddings=max_positions,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=attention_bias,
        mlp_bias=d.get("mlp_bias", False),
        act=_activation(d, "silu"),
    )


def _square(d: Mapping[str, Any], key: str) -> int:
    value = d[key]
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"config key {key!r} = {value!r} is not supported (only square sizes)")
        value = value[0]
    return int(value)


def _encoder_dims(d: Mapping[str, Any]) -> dict[str, int]:
    """The transformer sizes every CLIP / SigLIP tower config spells the same way."""
    return {
        "hidden_size": d["hidden_size"],
        "num_layers": d["num_hidden_layers"],
        "num_heads": d["num_attention_heads"],
        "intermediate_size": d["intermediate_size"],
    }


def vit_config_from_hf_clip_vision(d: Mapping[str, Any]) -> ViTConfig:
    """A CLIPVisionConfig dict (or a CLIPConfig dict, whose vision_config is used) → ViTConfig."""
    d = {**_HF_CLIP_VISION_DEFAULTS, **(d.get("vision_config") or d)}
    return ViTConfig(
        image_size=_square(d, "image_size"),
        patch_size=_square(d, "patch_size"),
        **_encoder_dims(d),
        act=_activation(d, "quick_gelu"),
        layer_norm_eps=d["layer_norm_eps"],
        class_token=True,
        num_channels=d["num_channels"],
    )


def clip_text_config_from_hf(d: Mapping[str, Any]) -> CLIPTextConfig:
    """A CLIPTextConfig dict (or a CLIPConfig dict, whose text_config is used) → CLIPTextConfig.

    A legacy eos_token_id of 2 makes Hugging Face pool at each text's highest token id; for
    CLIP's tokenizer that is the end-of-text token, the last id of the vocabulary, so the
    Tessera config pools at the first vocab_size - 1. Every text Tessera accepts contains that
    token, and there both rules pick the same position.
    """
    d = {**_HF_CLIP_TEXT_DEFAULTS, **(d.get("text_config") or d)}
    eos = d["eos_token_id"]
    if not isinstance(eos, int):
        raise ValueError(f"config key 'eos_token_id' = {eos!r} is not supported (one integer id)")
    if eos == _CLIP_LEGACY_EOS_ID:
        eos = d["vocab_size"] - 1
    return CLIPTextConfig(
        vocab_size=d["vocab_size"],
        **_encoder_dims(d),
        max_position_embeddings=d["max_position_embeddings"],
        act=_activation(d, "quick_gelu"),
        layer_norm_eps=d["layer_norm_eps"],
        eos_token_id=eos,
    )


def vit_config_from_hf_siglip_vision(d: Mapping[str, Any]) -> ViTConfig:
    """A SiglipVisionConfig dict (or a SiglipConfig dict, whose vision_config is used) → ViTConfig
    in SigLIP style: no class token, no pre-norm, biased patch embedding, post_layernorm over all
    tokens, and the attention-pooling head when vision_use_head is set."""
    d = {**_HF_SIGLIP_VISION_DEFAULTS, **(d.get("vision_config") or d)}
    return ViTConfig(
        image_size=_square(d, "image_size"),
        patch_size=_square(d, "patch_size"),
        **_encoder_dims(d),
        act=_activation(d, "gelu_pytorch_tanh"),
        layer_norm_eps=d["layer_norm_eps"],
        class_token=False,
        num_channels=d["num_channels"],
        pre_layernorm=False,
        patch_bias=True,
        post_layernorm_on="all_tokens",
        map_head=bool(d["vision_use_head"]),
    )


_VISION_CONFIG_READERS = {
    "clip_vision_model": vit_config_from_hf_clip_vision,
    "siglip_vision_model": vit_config_from_hf_siglip_vision,
}


def vit_config_from_hf(d: Mapping[str, Any]) -> ViTConfig:
    """A vision tower config dict of any supported family, chosen by its model_type."""
    family = d.get("model_type")
    if family not in _VISION_CONFIG_READERS:
        raise ValueError(
            f"config key 'model_type' = {family!r} is not a supported vision tower "
            f"({', '.join(_VISION_CONFIG_READERS)})"
        )
    return _VISION_CONFIG_READERS[family](d)


def siglip_text_config_from_hf(d: Mapping[str, Any]) -> CLIPTextConfig:
    """A SiglipTextConfig dict (or a SiglipConfig dict, whose text_config is used) → a
    bidirectional CLIPTextConfig pooled at the last position through `head`."""
    d = {**_HF_SIGLIP_TEXT_DEFAULTS, **(d.get("text_config") or d)}
    eos = d.get("eos_token_id")
    return CLIPTextConfig(
        vocab_size=d["vocab_size"],
        **_encoder_dims(d),
        max_position_embeddings=d["max_position_embeddings"],
        act=_activation(d, "gelu_pytorch_tanh"),
        layer_norm_eps=d["layer_norm_eps"],
        # Not used for pooling (SigLIP pools the last position); kept for the export.
        eos_token_id=eos if isinstance(eos, int) else CLIPTextConfig().eos_token_id,
        causal=False,
        pooling="last",
        head_size=d.get("projection_size") or d["hidden_size"],
    )


def _section(key: str, read: Any, d: Mapping[str, Any]) -> Any:
    """Translate the nested config `d` under `key`, naming the section in any error."""
    if not isinstance(d, Mapping):
        raise ValueError(f"config key {key!r} is missing or not an object")
    try:
        return read(d)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None


def clip_dual_encoder_config_from_hf(d: Mapping[str, Any]) -> DualEncoderConfig:
    """A CLIPConfig dict → DualEncoderConfig (the learned logit scale comes with the weights)."""
    return DualEncoderConfig(
        vision=_section("vision_config", vit_config_from_hf_clip_vision, d.get("vision_config") or {}),
        text=_section("text_config", clip_text_config_from_hf, d.get("text_config") or {}),
        projection_dim=d.get("projection_dim", 512),
        logit_scale_init=d.get("logit_scale_init_value", 2.6592),
    )


def siglip_dual_encoder_config_from_hf(d: Mapping[str, Any]) -> SigLIPDualEncoderConfig:
    """A SiglipConfig dict → SigLIPDualEncoderConfig (logit scale and bias come with the weights)."""
    vision = _section(
        "vision_config", vit_config_from_hf_siglip_vision, d.get("vision_config") or {}
    )
    if not vision.map_head:
        raise ValueError(
            "vision_config: config key 'vision_use_head' = False is not supported for a whole "
            "SiglipModel (its image embedding is the head's output)"
        )
    return SigLIPDualEncoderConfig(
        vision=vision,
        text=_section("text_config", siglip_text_config_from_hf, d.get("text_config") or {}),
    )


def lvlm_config_from_hf(d: Mapping[str, Any]) -> LVLMConfig:
    """A LlavaConfig dict → LVLMConfig.

    vision_feature_select_strategy "default" drops the first token of every image: Tessera's
    "patch" for a tower with a class token; a tower without one (SigLIP) would lose a real patch,
    which Tessera does not do, so only "full" is accepted there. projector_hidden_act "linear"
    is Tessera's linear connector (see `lvlm_state_dict_from_hf`).
    """
    if not isinstance(d.get("vision_config"), Mapping) or not d["vision_config"]:
        raise ValueError("config key 'vision_config' is missing or empty")
    # LlavaConfig's vision tower is CLIP's unless the section says otherwise.
    vision_d = {"model_type": "clip_vision_model", **d["vision_config"]}
    vision = _section("vision_config", vit_config_from_hf, vision_d)
    text = dict(d.get("text_config") or {})
    if not text:
        raise ValueError("config key 'text_config' is missing or empty")
    # LlavaConfig ties the head when either level asks for it.
    text["tie_word_embeddings"] = bool(
        text.get("tie_word_embeddings", False) or d.get("tie_word_embeddings", False)
    )
    llm = _section("text_config", llama_config_from_hf, text)

    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(
            f"config key 'vision_feature_layer' = {layer!r} is not supported (one layer index, "
            "not a list of layers to concatenate)"
        )
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy == "default" and vision.class_token:
        select = "patch"
    elif strategy == "full":
        # Without a class token Tessera's two selections keep the same tokens; "patch" is its default.
        select = "full" if vision.class_token else "patch"
    elif strategy == "default":
        raise ValueError(
            "config key 'vision_feature_select_strategy' = 'default' drops the first patch of a "
            "vision tower without a class token; not supported (use 'full')"
        )
    else:
        raise ValueError(
            f"config key 'vision_feature_select_strategy' = {strategy!r} is not supported "
            "(default, full)"
        )
    bias = bool(d.get("multimodal_projector_bias", True))
    if d.get("projector_hidden_act", "gelu") == "linear":
        connector = ProjectorConfig(kind="linear", bias=bias)
    else:
        connector = ProjectorConfig(
            kind="mlp", act=_activation(d, "gelu", key="projector_hidden_act"), bias=bias
        )
    return LVLMConfig(
        vision=vision,
        connector=connector,
        llm=llm,
        image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
        vision_feature_layer=layer,
        vision_feature_select=select,
    )


# ------------------------------------------------------------- whole-model state dicts


def dual_encoder_state_dict_from_hf(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CLIPModel / SiglipModel checkpoint → DualEncoder / SigLIPDualEncoder state dict: the
    same keys, minus the buffers both libraries recompute."""
    return {k: v for k, v in hf_state.items() if not is_derived_buffer(k)}


def _strip_any(key: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def lvlm_state_dict_from_hf(hf_state: Mapping[str, Tensor], cfg: LVLMConfig) -> dict[str, Tensor]:
    """A LlavaForConditionalGeneration checkpoint (either layout, see the module docstring) →
    LVLM state dict.

    Hugging Face's projector always has two layers; a linear connector is stored with an
    identity second layer and no activation ("linear"). That layer must be exactly the
    identity (and its bias zero): it is then left out, as the linear connector computes the
    same. Anything else raises rather than being approximated.
    """
    vision: dict[str, Tensor] = {}
    projector: dict[str, Tensor] = {}
    decoder: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        if is_derived_buffer(key):
            continue
        if key in LLAVA_HEAD_KEYS:
            decoder[LM_HEAD_KEY] = value
        elif (rest := _strip_any(key, LLAVA_DECODER_PREFIXES)) is not None:
            decoder[DECODER_PREFIX + rest] = value
        elif (rest := _strip_any(key, LLAVA_VISION_PREFIXES)) is not None:
            vision[rest.removeprefix(CLIP_VISION_PREFIX)] = value
        elif (rest := _strip_any(key, LLAVA_PROJECTOR_PREFIXES)) is not None:
            projector[rest] = value
        else:
            raise ValueError(
                f"LLaVA key {key!r} belongs to no part (vision tower, multi_modal_projector, "
                "language model)"
            )
    if cfg.connector.kind == "linear":
        _drop_identity_layer(projector, cfg.llm.hidden_size)
    state = {f"vision_tower.{k}": v for k, v in vision.items()}
    state.update({f"connector.{k}": v for k, v in projector.items()})
    llm = llama_state_dict_from_hf(decoder, tie_word_embeddings=cfg.llm.tie_word_embeddings)
    state.update({f"language_model.{k}": v for k, v in llm.items()})
    return state


def _drop_identity_layer(projector: dict[str, Tensor], dim: int) -> None:
    weight = projector.pop("linear_2.weight", None)
    bias = projector.pop("linear_2.bias", None)
    identity = weight is not None and weight.shape == (dim, dim)
    identity = identity and torch.equal(weight, torch.eye(dim, dtype=weight.dtype))
    if not identity or (bias is not None and bool(bias.any())):
        raise ValueError(
            "config key 'projector_hidden_act' = 'linear' is supported only as a linear connector, "
            "whose multi_modal_projector.linear_2 is exactly the identity with zero bias; this "
            "checkpoint's is not"
        )


def _check_llava_parts(cfg: LVLMConfig) -> None:
    """LLaVA has one ViT tower and a plain decoder: refuse the LVLM parts it cannot express."""
    extras = [what for what, present in (
        (f"a {getattr(cfg.vision, 'kind', 'vit')!r} vision tower", not isinstance(cfg.vision, ViTConfig)),
        ("extra vision towers", bool(cfg.extra_towers)), ("a visual expert", cfg.llm.visual_expert),
        ("shared image positions", cfg.image_positions != "per_token"),
        ("vision_image_size", cfg.vision_image_size is not None)) if present]
    if extras:
        raise ValueError(f"Hugging Face's LlavaForConditionalGeneration cannot express {', '.join(extras)}")


def lvlm_state_dict_to_hf(state: Mapping[str, Tensor], cfg: LVLMConfig) -> dict[str, Tensor]:
    """LVLM state dict → LlavaForConditionalGeneration keys in the hub's layout. A linear
    connector gets the identity second layer Hugging Face's projector needs."""
    _check_llava_parts(cfg)
    hf_state: dict[str, Tensor] = {}
    decoder: dict[str, Tensor] = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part == "vision_tower":
            hf_state[f"vision_tower.{CLIP_VISION_PREFIX}{rest}"] = value
        elif part == "connector":
            hf_state[f"multi_modal_projector.{rest}"] = value
        elif part == "language_model":
            decoder[rest] = value
        else:
            raise ValueError(f"LVLM key {key!r} belongs to no part")
    for key, value in llama_state_dict_to_hf(
        decoder, tie_word_embeddings=cfg.llm.tie_word_embeddings
    ).items():
        hf_state[f"language_model.{key}"] = value
    if cfg.connector.kind == "linear":
        like = state["connector.linear_1.weight"]
        dim = cfg.llm.hidden_size
        hf_state["multi_modal_projector.linear_2.weight"] = torch.eye(dim, dtype=like.dtype)
        if cfg.connector.bias:
            hf_state["multi_modal_projector.linear_2.bias"] = torch.zeros(dim, dtype=like.dtype)
    return hf_state


# ------------------------------------------------------------------ configs → HF


def llama_config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """LlamaConfig → a LlamaConfig dict, or a Qwen2Config dict when q/k/v have biases (Qwen2's
    layout; Llama's attention_bias would add one to o_proj too). RoPE is written as
    rope_theta + rope_scaling, which every transformers version reads."""
    family = "qwen2" if cfg.attention_bias else "llama"
    if family == "qwen2" and cfg.mlp_bias:
        raise ValueError(
            "cannot export: q/k/v biases (Qwen2) together with MLP biases match no transformers decoder"
        )
    d: dict[str, Any] = {
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": _activation_to_hf(cfg.act),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
    }
    if cfg.head_dim is not None:
        d["head_dim"] = cfg.head_dim
    if cfg.rope_linear_scaling != 1.0:
        d["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_linear_scaling}
    if family == "llama":
        d.update(attention_bias=False, mlp_bias=cfg.mlp_bias)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return d


DECODER_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def vit_config_to_hf(cfg: ViTConfig) -> dict[str, Any]:
    """ViTConfig → a CLIPVisionConfig or SiglipVisionConfig dict, whichever computes it."""
    if cfg.patch_embed != "patch":
        raise ValueError(f"cannot export: patch_embed={cfg.patch_embed!r}; CLIP and SigLIP vision towers have "
                         "only the single patch convolution ('patch'; `tessera train --vit-patch-embed patch`)")
    d: dict[str, Any] = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": _activation_to_hf(cfg.act),
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
    }
    options = (cfg.class_token, cfg.pre_layernorm, cfg.patch_bias, cfg.post_layernorm_on)
    if options == (True, True, False, "class_token") and not cfg.map_head:
        return {"model_type": "clip_vision_model", **d}
    if options == (False, False, True, "all_tokens"):
        return {"model_type": "siglip_vision_model", **d, "vision_use_head": cfg.map_head}
    raise ValueError(
        "cannot export: the ViT options class_token, pre_layernorm, patch_bias, "
        f"post_layernorm_on = {options} are neither CLIP's (True, True, False, 'class_token') "
        "nor SigLIP's (False, False, True, 'all_tokens')"
    )


def text_tower_config_to_hf(cfg: CLIPTextConfig) -> dict[str, Any]:
    """CLIPTextConfig → a CLIPTextConfig or SiglipTextConfig dict, whichever computes it."""
    d: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": _activation_to_hf(cfg.act),
        "layer_norm_eps": cfg.layer_norm_eps,
        "eos_token_id": cfg.eos_token_id,
        "attention_dropout": 0.0,
    }
    if (cfg.causal, cfg.pooling, cfg.head_size) == (True, "eos", None):
        if cfg.eos_token_id == _CLIP_LEGACY_EOS_ID:
            raise ValueError(
                f"cannot export: CLIP text eos_token_id {_CLIP_LEGACY_EOS_ID} is read by "
                "transformers as the legacy rule 'pool at the highest token id'"
            )
        return {"model_type": "clip_text_model", **d}
    if not cfg.causal and cfg.pooling == "last" and cfg.head_size is not None:
        return {"model_type": "siglip_text_model", **d, "projection_size": cfg.head_size}
    raise ValueError(
        f"cannot export: a text tower with causal={cfg.causal}, pooling={cfg.pooling!r}, "
        f"head_size={cfg.head_size} is neither CLIP's (causal, eos, no head) nor SigLIP's "
        "(bidirectional, last, head)"
    )


def _dual_towers_to_hf(
    cfg: DualEncoderConfig | SigLIPDualEncoderConfig, family: str, architecture: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both towers' HF config dicts, checked to be of `family` ("clip" or "siglip")."""
    vision, text = vit_config_to_hf(cfg.vision), text_tower_config_to_hf(cfg.text)
    if (vision["model_type"], text["model_type"]) != (f"{family}_vision_model", f"{family}_text_model"):
        raise ValueError(
            f"cannot export as {architecture}: towers are {vision['model_type']} and {text['model_type']}"
        )
    return vision, text


def clip_config_to_hf(cfg: DualEncoderConfig) -> dict[str, Any]:
    """DualEncoderConfig → a CLIPConfig dict (both towers must be CLIP style)."""
    vision, text = _dual_towers_to_hf(cfg, "clip", "CLIPModel")
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "vision_config": vision,
        "text_config": text,
    }


def siglip_config_to_hf(cfg: SigLIPDualEncoderConfig) -> dict[str, Any]:
    """SigLIPDualEncoderConfig → a SiglipConfig dict (both towers must be SigLIP style)."""
    vision, text = _dual_towers_to_hf(cfg, "siglip", "SiglipModel")
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "vision_config": vision,
        "text_config": text,
    }


def lvlm_config_to_hf(cfg: LVLMConfig) -> dict[str, Any]:
    """LVLMConfig → a LlavaConfig dict. Tessera's "patch" selection is LLaVA's "default" for a
    tower with a class token and "full" (nothing to drop) for one without."""
    _check_llava_parts(cfg)
    if not isinstance(cfg.connector, ProjectorConfig) or cfg.tiling is not None:
        raise ValueError(
            f"only LLaVA-style LVLMs (linear or MLP projector, no tiling) export to Hugging Face's "
            f"LlavaForConditionalGeneration; this one has a {cfg.connector.kind!r} connector"
            + (" and tiling" if cfg.tiling is not None else "")
        )
    vision = vit_config_to_hf(cfg.vision)
    text = llama_config_to_hf(cfg.llm)
    drops_class_token = cfg.vision_feature_select == "patch" and cfg.vision.class_token
    linear = cfg.connector.kind == "linear"
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": text,
        "image_token_index": cfg.image_token_id,
        "projector_hidden_act": "linear" if linear else _activation_to_hf(cfg.connector.act),
        "multimodal_projector_bias": cfg.connector.bias,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": "default" if drops_class_token else "full",
        "tie_word_embeddings": cfg.llm.tie_word_embeddings,
    }


# ------------------------------------------------------------------ BERT and BLIP-2 (import)

# BertConfig defaults (config.json files often store only what differs).
_HF_BERT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
}
BERT_PREFIX = "bert."  # BertFor* checkpoints nest the BertModel under it
BERT_POOLER_KEY = "pooler.dense.weight"

# Blip2VisionConfig / Blip2QFormerConfig defaults.
_HF_BLIP2_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
}
_HF_BLIP2_QFORMER_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "cross_attention_frequency": 2,
    "encoder_hidden_size": 1408,
    "use_qformer_text_input": False,
}
BLIP2_VISION_PREFIX = "vision_model."
BLIP2_QFORMER_PARTS = ("query_tokens", "qformer.")
BLIP2_PROJECTION_PREFIX = "language_projection."
BLIP2_DECODER_PREFIX = "language_model.model."
BLIP2_HEAD_KEY = "language_model.lm_head.weight"
_BLIP2_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


def bert_config_from_hf(d: Mapping[str, Any]) -> BertConfig:
    """A BertConfig dict → Tessera BertConfig (a bidirectional encoder with BERT's pooler).

    Only BertModel's encoder computation is expressed: a decoder (`is_decoder`), cross-attention
    (`add_cross_attention`) and relative position embeddings raise, naming the key. Whether the
    checkpoint holds the pooler is read from the weights (`bert_config_from_weights`)."""
    family = d.get("model_type", "bert")
    if family != "bert":
        raise ValueError(f"config key 'model_type' = {family!r} is not 'bert'")
    d = {**_HF_BERT_DEFAULTS, **d}
    for key in ("is_decoder", "add_cross_attention"):
        if d.get(key):
            raise ValueError(f"config key {key!r} = True is not supported (only BertModel as an encoder)")
    position = d.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"config key 'position_embedding_type' = {position!r} is not supported (only 'absolute')")
    return BertConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d["max_position_embeddings"],
        type_vocab_size=d["type_vocab_size"],
        layer_norm_eps=d["layer_norm_eps"],
        act=_activation(d, "gelu"),
        pooler=True,
    )


def _bert_keys(hf_state: Mapping[str, Tensor]) -> list[str]:
    return [k for k in hf_state if not is_derived_buffer(k)]


def bert_config_from_weights(cfg: BertConfig, hf_state: Mapping[str, Tensor]) -> BertConfig:
    """The pooler exists exactly when the checkpoint holds it (BertModel(add_pooling_layer=False)
    saves none)."""
    has_pooler = any(k.removeprefix(BERT_PREFIX) == BERT_POOLER_KEY for k in _bert_keys(hf_state))
    return cfg.model_copy(update={"pooler": has_pooler})


def bert_state_dict_from_hf(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A BertModel checkpoint → Tessera BertModel state dict: the same names, minus an optional
    "bert." prefix (the layout of BertModel inside BertFor* models)."""
    keys = _bert_keys(hf_state)
    prefixed = all(k.startswith(BERT_PREFIX) for k in keys)
    return {(k[len(BERT_PREFIX) :] if prefixed else k): hf_state[k] for k in keys}


def blip2_vision_config_from_hf(d: Mapping[str, Any]) -> ViTConfig:
    """A Blip2VisionConfig dict → ViTConfig: class token, no pre-norm, biased patch embedding,
    post_layernorm over every token (Hugging Face's last_hidden_state, which feeds the Q-Former)."""
    d = {**_HF_BLIP2_VISION_DEFAULTS, **d}
    return ViTConfig(
        image_size=_square(d, "image_size"),
        patch_size=_square(d, "patch_size"),
        **_encoder_dims(d),
        act=_activation(d, "gelu"),
        layer_norm_eps=d["layer_norm_eps"],
        class_token=True,
        pre_layernorm=False,
        patch_bias=True,
        post_layernorm_on="all_tokens",
    )


def blip2_vision_state_dict_from_hf(hf_state: Mapping[str, Tensor], hidden_size: int) -> dict[str, Tensor]:
    """Blip2VisionModel keys (without "vision_model.") → VisionTransformer keys.

    The fused qkv projection is split into q_proj / k_proj / v_proj (a checkpoint without
    qkv.bias, qkv_bias=False, gets zero biases, which compute the same), `projection` is
    out_proj, and the (1, S, E) / (1, 1, E) embeddings lose their leading 1."""
    state: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        if key == "embeddings.class_embedding":
            state[key] = value.reshape(-1)
        elif key == "embeddings.position_embedding":
            state["embeddings.position_embedding.weight"] = value.reshape(-1, value.shape[-1])
        elif key.endswith(".self_attn.qkv.weight"):
            base = key.removesuffix("qkv.weight")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                state[f"{base}{name}.weight"] = part
            if key.replace(".weight", ".bias") not in hf_state:
                for name in ("q_proj", "k_proj", "v_proj"):
                    state[f"{base}{name}.bias"] = value.new_zeros(hidden_size)
        elif key.endswith(".self_attn.qkv.bias"):
            base = key.removesuffix("qkv.bias")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                state[f"{base}{name}.bias"] = part
        elif ".self_attn.projection." in key:
            state[key.replace(".self_attn.projection.", ".self_attn.out_proj.")] = value
        else:
            state[key] = value
    return state


def blip2_config_from_hf(d: Mapping[str, Any]) -> LVLMConfig:
    """A Blip2Config dict (Blip2ForConditionalGeneration) → LVLMConfig with a Q-Former connector.

    The vision tower's last_hidden_state (every layer, every token, post_layernorm) feeds the
    Q-Former: Tessera runs all layers, keeps the class token (vision_feature_select "full") and
    applies the post-norm as the connector's ln_vision. The language model must be LLaMA-family
    (llama, mistral, qwen2); OPT and T5 (the other BLIP-2 checkpoints) raise. image_token_index
    is required: Tessera, like transformers ≥ 4.47, scatters the query outputs into the prompt's
    image-token placeholders."""
    for key in ("vision_config", "qformer_config", "text_config"):
        if not isinstance(d.get(key), Mapping) or not d[key]:
            raise ValueError(f"config key {key!r} is missing or empty")
    vision = _section("vision_config", blip2_vision_config_from_hf, d["vision_config"])
    q = {**_HF_BLIP2_QFORMER_DEFAULTS, **d["qformer_config"]}
    if q["encoder_hidden_size"] != vision.hidden_size:
        raise ValueError(
            f"qformer_config: config key 'encoder_hidden_size' = {q['encoder_hidden_size']} differs from the "
            f"vision tower's hidden_size {vision.hidden_size}"
        )
    position = q.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"qformer_config: config key 'position_embedding_type' = {position!r} is not supported")
    qformer = QFormerConfig(
        num_queries=d.get("num_query_tokens", 32),
        hidden_size=q["hidden_size"],
        num_layers=q["num_hidden_layers"],
        num_heads=q["num_attention_heads"],
        intermediate_size=q["intermediate_size"],
        cross_attention_frequency=q["cross_attention_frequency"],
        layer_norm_eps=q["layer_norm_eps"],
        act=_section("qformer_config", lambda s: _activation(s, "gelu"), q),
        text_input=bool(q["use_qformer_text_input"]),
        vision_layernorm_eps=vision.layer_norm_eps,
    )
    text = dict(d["text_config"])
    text["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", False) or d.get("tie_word_embeddings", False))
    llm = _section("text_config", llama_config_from_hf, text)
    image_token = d.get("image_token_index", d.get("image_token_id"))
    if not isinstance(image_token, int):
        raise ValueError(
            "config key 'image_token_index' is missing: Tessera places the query outputs at the prompt's "
            "image-token placeholders (checkpoints converted for transformers ≥ 4.47 have it)"
        )
    return LVLMConfig(vision=vision, connector=qformer, llm=llm, image_token_id=image_token,
                      vision_feature_layer=-1, vision_feature_select="full")


def blip2_config_from_weights(cfg: LVLMConfig, hf_state: Mapping[str, Tensor]) -> LVLMConfig:
    """Hub checkpoints written before transformers had `use_qformer_text_input` store the
    Q-Former's text feed-forward blocks although the config says False; the connector then keeps
    them (unused by the computation), so no tensor of the checkpoint is dropped."""
    has_text_ffn = any(_BLIP2_TEXT_FFN.match(k) for k in hf_state)
    assert isinstance(cfg.connector, QFormerConfig)
    if has_text_ffn == cfg.connector.text_input:
        return cfg
    return cfg.model_copy(update={"connector": cfg.connector.model_copy(update={"text_input": has_text_ffn})})


def blip2_state_dict_from_hf(hf_state: Mapping[str, Tensor], cfg: LVLMConfig) -> dict[str, Tensor]:
    """A Blip2ForConditionalGeneration checkpoint → LVLM state dict:
    vision_model.X → vision_tower.X (see blip2_vision_state_dict_from_hf), and its post_layernorm
    ALSO → connector.ln_vision; query_tokens, qformer.X, language_projection.X → connector.*;
    language_model.model.X / language_model.lm_head.weight → language_model.*."""
    vision: dict[str, Tensor] = {}
    state: dict[str, Tensor] = {}
    decoder: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        if is_derived_buffer(key):
            continue
        if key.startswith(BLIP2_VISION_PREFIX):
            vision[key[len(BLIP2_VISION_PREFIX) :]] = value
        elif key.startswith(BLIP2_QFORMER_PARTS) or key.startswith(BLIP2_PROJECTION_PREFIX):
            state[f"connector.{key}"] = value
        elif key == BLIP2_HEAD_KEY:
            decoder[LM_HEAD_KEY] = value
        elif key.startswith(BLIP2_DECODER_PREFIX):
            decoder[DECODER_PREFIX + key[len(BLIP2_DECODER_PREFIX) :]] = value
        else:
            raise ValueError(
                f"BLIP-2 key {key!r} belongs to no part (vision_model, query_tokens, qformer, "
                "language_projection, language_model)"
            )
    for key in ("weight", "bias"):
        if f"post_layernorm.{key}" in vision:
            state[f"connector.ln_vision.{key}"] = vision[f"post_layernorm.{key}"]
    state.update({f"vision_tower.{k}": v for k, v in
                  blip2_vision_state_dict_from_hf(vision, cfg.vision.hidden_size).items()})
    llm = llama_state_dict_from_hf(decoder, tie_word_embeddings=cfg.llm.tie_word_embeddings)
    state.update({f"language_model.{k}": v for k, v in llm.items()})
    return state
