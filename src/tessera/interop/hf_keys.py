"""Translate Hugging Face state-dict keys and configs to and from Tessera's.

Tessera's parameter names are Hugging Face's with the model-level prefix removed, so the
mapping is a prefix rule per family:

- LLaMA-family decoders (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM):
  "model.X" <-> "X", and "lm_head.weight" unchanged. With tied word embeddings a Hugging
  Face checkpoint usually leaves lm_head.weight out; it is filled from the embedding.
- CLIP vision tower (CLIPVisionModel, or the vision half of CLIPModel): "vision_model.X" <-> "X".
- CLIP text tower (CLIPTextModel, or the text half of CLIPModel): "text_model.X" <-> "X".
  transformers >= 5 holds and saves a standalone CLIP tower without its prefix; loading
  accepts both layouts, exporting writes the prefixed one.

The config functions translate a Hugging Face config dict (config.json, or
`PretrainedConfig.to_dict()`) into the Tessera config of the same computation. A value that
changes the computation in a way Tessera cannot express raises ValueError naming the key;
bookkeeping keys (token ids other than CLIP's EOS, dtype, architectures) are ignored.

`load_state_dict_strict` is how a translated checkpoint enters a module: every key and shape
must match, and a mismatch is reported with the source file and the offending keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tessera.nn.layers import Activation
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
_DERIVED_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")

# Top-level parts of a combined CLIPModel checkpoint; a tower's loader skips the others.
_CLIP_MODEL_PARTS = (
    CLIP_VISION_PREFIX,
    CLIP_TEXT_PREFIX,
    "visual_projection.",
    "text_projection.",
    "logit_scale",
)

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


def _is_derived_buffer(key: str) -> bool:
    return key.endswith(_DERIVED_BUFFER_SUFFIXES)


# ----------------------------------------------------------------------- state dicts


def llama_state_dict_from_hf(
    hf_state: Mapping[str, Tensor], *, tie_word_embeddings: bool
) -> dict[str, Tensor]:
    """A LLaMA-family checkpoint → LlamaDecoder state dict.

    With tied embeddings a missing lm_head.weight is taken from the embedding, and a present
    one must equal it (the module has a single tensor for both).
    """
    state = {llama_key_from_hf(k): v for k, v in hf_state.items() if not _is_derived_buffer(k)}
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
    keys = [k for k in hf_state if not _is_derived_buffer(k)]
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
    """A CLIPVisionModel or CLIPModel checkpoint → VisionTransformer state dict.

    Keys carry "vision_model." in CLIPModel checkpoints and in CLIPVisionModel checkpoints
    written by transformers < 5; a standalone tower saved by transformers >= 5 has none.
    """
    return _clip_tower_from_hf(hf_state, CLIP_VISION_PREFIX, "CLIP vision")


def clip_vision_state_dict_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """VisionTransformer state dict → prefixed keys, the layout every transformers version loads."""
    return {clip_vision_key_to_hf(k): v for k, v in state.items()}


def clip_text_state_dict_from_hf(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CLIPTextModel or CLIPModel checkpoint → CLIPTextTransformer state dict ("text_model."
    prefix optional, as for the vision tower)."""
    return _clip_tower_from_hf(hf_state, CLIP_TEXT_PREFIX, "CLIP text")


def clip_text_state_dict_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {clip_text_key_to_hf(k): v for k, v in state.items()}


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, Tensor], source: str, *, shown: int = 5
) -> None:
    """Load every tensor of `state_dict` into `module`, which must have exactly these keys and
    shapes; otherwise raise CheckpointMismatchError naming `source` (a file name) and the first
    `shown` missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
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


def _activation(d: Mapping[str, Any], default: str) -> Activation:
    name = d.get("hidden_act", default)
    if name not in _HF_ACTIVATIONS:
        raise ValueError(
            f"config key 'hidden_act' = {name!r} is not supported; supported: {', '.join(_HF_ACTIVATIONS)}"
        )
    return _HF_ACTIVATIONS[name]


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


def vit_config_from_hf_clip_vision(d: Mapping[str, Any]) -> ViTConfig:
    """A CLIPVisionConfig dict (or a CLIPConfig dict, whose vision_config is used) → ViTConfig."""
    d = {**_HF_CLIP_VISION_DEFAULTS, **(d.get("vision_config") or d)}
    return ViTConfig(
        image_size=_square(d, "image_size"),
        patch_size=_square(d, "patch_size"),
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
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
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d["max_position_embeddings"],
        act=_activation(d, "quick_gelu"),
        layer_norm_eps=d["layer_norm_eps"],
        eos_token_id=eos,
    )
