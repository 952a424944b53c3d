"""Numerical parity with Hugging Face transformers, and of Tessera's fast paths with their references.

Every Hugging Face model is built here from a tiny config with random weights (no hub),
copied into the Tessera module through tessera.interop.hf_keys, and compared in float32:
LLaMA-family logits, CLIP vision and text towers. Tessera-only checks: KV-cache vs no-cache
generation, left padding vs a prompt alone, packed vs padded attention, packed vs single
images in the ViT.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tessera.connectors.projector import ProjectorConfig
from tessera.infer.generate import GenerationConfig, generate
from tessera.interop.hf_keys import (
    CheckpointMismatchError,
    clip_text_config_from_hf,
    clip_text_state_dict_from_hf,
    clip_vision_state_dict_from_hf,
    clip_vision_state_dict_to_hf,
    llama_config_from_hf,
    llama_key_from_hf,
    llama_key_to_hf,
    llama_state_dict_from_hf,
    llama_state_dict_to_hf,
    load_state_dict_strict,
    vit_config_from_hf_clip_vision,
)
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.objectives.lm import next_token_loss
from tessera.text.clip_text import CLIPTextTransformer
from tessera.text.llama import LlamaConfig, LlamaDecoder
from tessera.vision.vit import VisionTransformer, ViTConfig

transformers = pytest.importorskip("transformers")

HF_TOLERANCE = 1e-4
SELF_TOLERANCE = 1e-5
VOCAB = 256

TINY_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)
TINY_CLIP_VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
)




def max_abs_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_close(name: str, ours: Tensor, reference: Tensor, tolerance: float) -> None:
    diff = max_abs_diff(ours, reference)
    print(f"[parity] {name}: max abs diff {diff:.3e}")
    assert diff <= tolerance, f"{name}: max abs diff {diff:.3e} > {tolerance:.0e}"


def randomize_(model: nn.Module, seed: int) -> None:
    """Weights large enough that a wrong computation shows up far above float32 noise
    (the Hugging Face initialiser's std 0.02 makes every output nearly constant)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() <= 1:  # biases, gains, scalars such as a logit scale
                is_gain = "norm" in name and name.endswith("weight")
                p.copy_(1.0 + 0.2 * noise if is_gain else 0.1 * noise)
            elif "embed" in name and p.dim() == 2:
                p.copy_(noise)  # token and position tables
            else:
                p.copy_(noise / p[0].numel() ** 0.5)  # linear and conv kernels keep unit scale


def hf_eager(model_cls: type, config: Any) -> nn.Module:
    """The reference with Hugging Face's plain-PyTorch attention, independent of SDPA."""
    config._attn_implementation = "eager"
    return model_cls(config).eval()


# ------------------------------------------------------------------ LLaMA family


def build_decoder_pair(
    model_cls_name: str, config_cls_name: str, seed: int, **overrides: Any
) -> tuple[nn.Module, LlamaDecoder]:
    config = getattr(transformers, config_cls_name)(**{**TINY_DECODER, **overrides})
    hf = hf_eager(getattr(transformers, model_cls_name), config)
    randomize_(hf, seed)
    cfg = llama_config_from_hf(config.to_dict())
    hf_state = hf.state_dict()
    if cfg.tie_word_embeddings:
        # Saved checkpoints of tied models leave the head out; the loader must fill it.
        hf_state.pop("lm_head.weight")
    ours = LlamaDecoder(cfg).eval()
    load_state_dict_strict(
        ours, llama_state_dict_from_hf(hf_state, tie_word_embeddings=cfg.tie_word_embeddings), "hf"
    )
    return hf, ours


LLAMA_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "gqa-rope-linear": dict(
        num_key_value_heads=2,
        rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 500.0},
    ),
    "mlp-bias-headdim": dict(num_key_value_heads=2, mlp_bias=True, head_dim=32),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_logits_match_hf(case: str) -> None:
    hf, ours = build_decoder_pair("LlamaForCausalLM", "LlamaConfig", seed=1, **LLAMA_CASES[case])
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(input_ids=ids).logits
        logits = ours.logits(ours(ids))
    assert reference.abs().max() > 1.0  # the weights are not degenerate
    assert_close(f"llama[{case}] logits", logits, reference, HF_TOLERANCE)


@pytest.mark.parametrize(
    "model_cls_name,config_cls_name,overrides",
    [
        (
            "Qwen2ForCausalLM",
            "Qwen2Config",
            dict(
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
            ),
        ),
        ("MistralForCausalLM", "MistralConfig", dict(num_key_value_heads=1, sliding_window=None)),
    ],
)
def test_llama_family_logits_match_hf(
    model_cls_name: str, config_cls_name: str, overrides: dict
) -> None:
    if not hasattr(transformers, model_cls_name):
        pytest.skip(f"transformers has no {model_cls_name}")
    hf, ours = build_decoder_pair(model_cls_name, config_cls_name, seed=2, **overrides)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(
            f"{model_cls_name} logits",
            ours.logits(ours(ids)),
            hf(input_ids=ids).logits,
            HF_TOLERANCE,
        )


def test_llama_left_padded_batch_matches_hf() -> None:
    hf, ours = build_decoder_pair("LlamaForCausalLM", "LlamaConfig", seed=3, num_key_value_heads=2)
    lengths = [16, 11, 5]
    width = max(lengths)
    gen = torch.Generator().manual_seed(2)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = True
    # Hugging Face's forward numbers positions 0..L-1 whatever the mask (only its generate()
    # derives them from the mask), so both sides get the mask-derived positions explicitly.
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits
        logits = ours.logits(ours(ids, attention_mask=mask, position_ids=positions))
        alone = ours.logits(ours(ids[2:, width - lengths[2] :]))
    assert_close(
        "llama left-padded logits (real tokens)", logits[mask], reference[mask], HF_TOLERANCE
    )
    assert_close(
        "llama left-padded row vs alone", logits[2, width - lengths[2] :], alone[0], SELF_TOLERANCE
    )


def test_llama_keys_round_trip() -> None:
    for tied in (False, True):
        cfg = LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            tie_word_embeddings=tied,
        )
        state = LlamaDecoder(cfg).state_dict()
        hf_state = llama_state_dict_to_hf(state, tie_word_embeddings=tied)
        assert ("lm_head.weight" in hf_state) is not tied
        assert all(k == "lm_head.weight" or k.startswith("model.") for k in hf_state)
        back = llama_state_dict_from_hf(hf_state, tie_word_embeddings=tied)
        assert back.keys() == state.keys()
    assert llama_key_from_hf("model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"
    assert llama_key_to_hf("norm.weight") == "model.norm.weight"
    with pytest.raises(ValueError, match="does not start with 'model.'"):
        llama_key_from_hf("transformer.h.0.attn.weight")
    # Old checkpoints carry the rotary frequencies; they are recomputed, not loaded.
    assert (
        llama_state_dict_from_hf(
            {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)},
            tie_word_embeddings=False,
        )
        == {}
    )


def test_tied_head_must_equal_the_embedding() -> None:
    embedding = torch.randn(4, 2)
    saved_with_head = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding.clone()}
    assert llama_state_dict_from_hf(saved_with_head, tie_word_embeddings=True).keys() == {
        "embed_tokens.weight",
        "lm_head.weight",
    }
    state = {"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.ones(4, 2)}
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        llama_state_dict_from_hf(state, tie_word_embeddings=True)


def test_load_state_dict_strict_lists_missing_and_unexpected_keys() -> None:
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )
    model = LlamaDecoder(cfg)
    state = dict(model.state_dict())
    state.pop("norm.weight")
    state["layers.0.self_attn.o_proj.bias"] = torch.zeros(16)
    state["embed_tokens.weight"] = torch.zeros(33, 16)
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_strict(model, state, "model-00001.safetensors")
    message = str(err.value)
    assert "model-00001.safetensors" in message
    assert "missing (1): norm.weight" in message
    assert "unexpected (1): layers.0.self_attn.o_proj.bias" in message
    assert "embed_tokens.weight: checkpoint (33, 16) vs model (32, 16)" in message


@pytest.mark.parametrize(
    "overrides,key",
    [
        (
            dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
            "rope_parameters",
        ),
        (
            dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
            "rope_parameters",
        ),
        (dict(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling"),
        (dict(hidden_act="gelu_10"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (
            dict(model_type="mistral", sliding_window=4096, max_position_embeddings=32768),
            "sliding_window",
        ),
        (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
        (dict(model_type="gpt2"), "model_type"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ],
)
def test_unsupported_llama_config_values_are_named(overrides: dict, key: str) -> None:
    d = {**transformers.LlamaConfig(**TINY_DECODER).to_dict(), **overrides}
    with pytest.raises(ValueError, match=key):
        llama_config_from_hf(d)


def test_legacy_rope_scaling_keys_are_read() -> None:
    d = {
        **TINY_DECODER,
        "model_type": "llama",
        "rope_theta": 500.0,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    cfg = llama_config_from_hf(d)
    assert (cfg.rope_theta, cfg.rope_linear_scaling, cfg.num_kv_heads) == (500.0, 4.0, 4)


# --------------------------------------------------------------------- CLIP vision


@pytest.fixture(scope="module")
def clip_vision_pair() -> tuple[nn.Module, VisionTransformer]:
    config = transformers.CLIPVisionConfig(**TINY_CLIP_VISION)
    hf = hf_eager(transformers.CLIPVisionModel, config)
    randomize_(hf, seed=4)
    ours = VisionTransformer(vit_config_from_hf_clip_vision(config.to_dict())).eval()
    # transformers >= 5 holds the tower unprefixed; hub checkpoints carry "vision_model.".
    checkpoint = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    load_state_dict_strict(ours, clip_vision_state_dict_from_hf(checkpoint), "hf")
    return hf, ours


def test_clip_vision_matches_hf(clip_vision_pair: tuple[nn.Module, VisionTransformer]) -> None:
    hf, ours = clip_vision_pair
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    layers = ours.cfg.num_layers
    with torch.no_grad():
        reference = hf(pixel_values=pixels, output_hidden_states=True)
        out = ours(pixels)
        # num_layers = k stops where Hugging Face's hidden_states[k] is taken (LLaVA reads k = L - 1).
        truncated = {k: ours(pixels, num_layers=k).hidden.reshape(2, 17, -1) for k in range(layers)}
    assert_close(
        "clip vision last_hidden_state",
        out.hidden.reshape(2, 17, -1),
        reference.last_hidden_state,
        HF_TOLERANCE,
    )
    assert_close(
        "clip vision pooler_output", ours.pooled(out), reference.pooler_output, HF_TOLERANCE
    )
    assert_close(
        "clip vision hidden_states[-2]",
        truncated[layers - 1],
        reference.hidden_states[-2],
        HF_TOLERANCE,
    )
    for k in range(layers):
        assert_close(
            f"clip vision hidden_states[{k}]",
            truncated[k],
            reference.hidden_states[k],
            HF_TOLERANCE,
        )


@pytest.mark.parametrize("height,width", [(32, 48), (48, 32), (48, 48), (16, 40)])
def test_clip_vision_interpolated_positions_match_hf(
    clip_vision_pair: tuple[nn.Module, VisionTransformer], height: int, width: int
) -> None:
    hf, ours = clip_vision_pair
    pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = hf(pixel_values=pixels, interpolate_pos_encoding=True)
        out = ours(pixels)
    assert_close(
        f"clip vision {height}x{width} interpolated",
        out.hidden[None],
        reference.last_hidden_state,
        HF_TOLERANCE,
    )
    assert_close(
        f"clip vision {height}x{width} pooled",
        ours.pooled(out),
        reference.pooler_output,
        HF_TOLERANCE,
    )


def test_vit_packed_images_equal_each_image_alone(
    clip_vision_pair: tuple[nn.Module, VisionTransformer],
) -> None:
    _, ours = clip_vision_pair
    gen = torch.Generator().manual_seed(5)
    images = [
        torch.randn(3, 32, 32, generator=gen),
        torch.randn(3, 32, 48, generator=gen),
        torch.randn(3, 16, 8, generator=gen),
    ]
    with torch.no_grad():
        packed = ours(images)
        alone = torch.cat([ours([img]).hidden for img in images])
    assert packed.cu_seqlens.tolist() == [0, 17, 42, 45]
    assert_close("vit packed vs alone", packed.hidden, alone, SELF_TOLERANCE)


def test_clip_vision_keys_skip_the_other_tower() -> None:
    state = {
        "vision_model.post_layernorm.weight": torch.ones(2),
        "vision_model.embeddings.position_ids": torch.arange(5),
        "text_model.final_layer_norm.weight": torch.ones(2),
        "visual_projection.weight": torch.ones(2, 2),
        "logit_scale": torch.ones(()),
    }
    assert clip_vision_state_dict_from_hf(state).keys() == {"post_layernorm.weight"}
    assert clip_text_state_dict_from_hf(state).keys() == {"final_layer_norm.weight"}
    assert clip_vision_state_dict_to_hf({"pre_layrnorm.bias": torch.ones(2)}).keys() == {
        "vision_model.pre_layrnorm.bias"
    }
    # A standalone tower saved by transformers >= 5 has no prefix.
    unprefixed = {"encoder.layers.0.mlp.fc1.weight": torch.ones(1)}
    assert clip_vision_state_dict_from_hf(unprefixed).keys() == unprefixed.keys()
    with pytest.raises(ValueError, match="does not start with 'vision_model.'"):
        clip_vision_state_dict_from_hf(
            {**unprefixed, "vision_model.post_layernorm.weight": torch.ones(2)}
        )
    with pytest.raises(ValueError, match="no CLIP vision tower"):
        clip_vision_state_dict_from_hf({"text_model.final_layer_norm.weight": torch.ones(2)})


def test_unsupported_clip_vision_config_values_are_named() -> None:
    with pytest.raises(ValueError, match="image_size"):
        vit_config_from_hf_clip_vision({**TINY_CLIP_VISION, "image_size": [32, 48]})
    with pytest.raises(ValueError, match="hidden_act"):
        vit_config_from_hf_clip_vision({**TINY_CLIP_VISION, "hidden_act": "tanh"})
    # A CLIPConfig dict is read through its vision_config; absent keys take CLIP's defaults.
    cfg = vit_config_from_hf_clip_vision(
        {"vision_config": {"hidden_size": 64, "num_attention_heads": 4}}
    )
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.act) == (224, 32, 64, "quick_gelu")


# ----------------------------------------------------------------------- CLIP text

TEXT_VOCAB = 100


def build_clip_text_pair(eos_token_id: int) -> tuple[nn.Module, CLIPTextTransformer]:
    config = transformers.CLIPTextConfig(
        vocab_size=TEXT_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=TEXT_VOCAB - 2,
        eos_token_id=eos_token_id,
    )
    hf = hf_eager(transformers.CLIPTextModel, config)
    randomize_(hf, seed=6)
    ours = CLIPTextTransformer(clip_text_config_from_hf(config.to_dict())).eval()
    checkpoint = {f"text_model.{k}": v for k, v in hf.state_dict().items()}
    load_state_dict_strict(ours, clip_text_state_dict_from_hf(checkpoint), "hf")
    return hf, ours


def clip_text_batch(eos: int) -> tuple[Tensor, Tensor]:
    """Right-padded texts: BOS, words, EOS, then padding (pad id 0)."""
    lengths = [12, 7, 16]
    gen = torch.Generator().manual_seed(7)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, 0] = TEXT_VOCAB - 2
        ids[row, 1 : n - 1] = torch.randint(3, TEXT_VOCAB - 3, (n - 2,), generator=gen)
        ids[row, n - 1] = eos
        mask[row, :n] = True
    return ids, mask


@pytest.mark.parametrize("hf_eos", [TEXT_VOCAB - 1, 2])
def test_clip_text_matches_hf(hf_eos: int) -> None:
    # hf_eos == 2 is the legacy config: Hugging Face then pools at the highest token id, which
    # the translated config expresses as EOS = vocab_size - 1 (the token the texts end with).
    hf, ours = build_clip_text_pair(hf_eos)
    assert ours.cfg.eos_token_id == TEXT_VOCAB - 1
    ids, mask = clip_text_batch(eos=TEXT_VOCAB - 1)
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask.long())
        hidden, pooled = ours(ids, attention_mask=mask)
    assert_close(
        f"clip text (eos {hf_eos}) last_hidden_state",
        hidden[mask],
        reference.last_hidden_state[mask],
        HF_TOLERANCE,
    )
    assert_close(
        f"clip text (eos {hf_eos}) pooler_output", pooled, reference.pooler_output, HF_TOLERANCE
    )


# ------------------------------------------------------------ Tessera-only checks


def tiny_lvlm() -> LVLM:
    torch.manual_seed(8)
    cfg = LVLMConfig(
        vision=ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
        ),
        connector=ProjectorConfig(),
        llm=LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
        ),
        image_token_id=5,
    )
    model = LVLM(cfg).eval()
    randomize_(model, seed=9)
    return model


def test_kv_cache_generation_equals_no_cache_and_rows_alone() -> None:
    model = tiny_lvlm()
    gen = torch.Generator().manual_seed(10)
    images = [torch.randn(3, 16, 16, generator=gen), torch.randn(3, 16, 24, generator=gen)]
    prompt_a = [1, *[5] * model.num_image_tokens(16, 16), 7, 8, 9, 10, 11]
    prompt_b = [1, *[5] * model.num_image_tokens(16, 24), 12]
    settings = dict(stop_ids=[63], pad_id=0, config=GenerationConfig(max_new_tokens=8))
    cached = generate(model, [prompt_a, prompt_b], images, **settings)
    uncached = generate(model, [prompt_a, prompt_b], images, use_cache=False, **settings)
    alone_b = generate(model, [prompt_b], images[1:], **settings)
    alone_a = generate(model, [prompt_a], images[:1], **settings)
    assert cached == uncached
    assert cached[1] == alone_b[0]  # row b is left-padded in the batch
    assert cached[0] == alone_a[0]
    assert len(set(cached[0] + cached[1])) > 1  # not a degenerate model repeating one token


def test_packed_attention_equals_padded_batch() -> None:
    torch.manual_seed(11)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    model = LlamaDecoder(cfg).eval()
    randomize_(model, seed=12)
    lengths = [5, 3, 7]
    gen = torch.Generator().manual_seed(13)
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    packed_ids = torch.cat(sequences)[None]
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    packed_positions = torch.cat([torch.arange(n) for n in lengths])[None]
    padded_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded_ids, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        padded_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = True
    with torch.no_grad():
        packed = model(packed_ids, position_ids=packed_positions, cu_seqlens=cu_seqlens)
        padded = model(padded_ids, attention_mask=mask)
    assert_close("llama packed vs padded hidden", packed[0], padded[mask], SELF_TOLERANCE)


def test_last_layer_keep_equals_full_computation() -> None:
    """`keep` runs the last layer's queries and MLP only at the kept positions; the states
    there, their gradients and the cached keys must equal the full computation's."""
    torch.manual_seed(14)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
    )
    model = LlamaDecoder(cfg).eval()
    randomize_(model, seed=15)
    gen = torch.Generator().manual_seed(16)
    lengths = [5, 9, 3, 7]
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]

    # Packed row, kept positions scattered over the samples; gradients too.
    ids = torch.cat(sequences)[None]
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    keep = torch.rand(ids.shape, generator=gen) < 0.4
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("lm_head")]
    params = [p for _, p in named]
    full = model(ids, position_ids=positions, cu_seqlens=cu_seqlens)[keep]
    kept = model(ids, position_ids=positions, cu_seqlens=cu_seqlens, keep=keep)
    assert_close("keep packed", kept, full, SELF_TOLERANCE)
    grads_full = torch.autograd.grad(full.square().sum(), params)
    grads_kept = torch.autograd.grad(kept.square().sum(), params)
    for (name, _), a, b in zip(named, grads_kept, grads_full, strict=True):
        assert_close(f"keep packed grad {name}", a, b, 1e-4)
    # next_token_loss takes the kept rows as they come.
    targets = torch.where(keep, ids, -100)
    with torch.no_grad():
        all_rows = model(ids, position_ids=positions, cu_seqlens=cu_seqlens)
        loss_full = next_token_loss(all_rows, model.lm_head, targets)
        loss_kept = next_token_loss(kept, model.lm_head, targets)
    assert_close("keep loss", loss_kept[None], loss_full[None], SELF_TOLERANCE)

    # Right-padded rows with a mask, different counts per row; dense rows.
    width = max(lengths)
    padded = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(padded, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        padded[row, : len(seq)] = seq
        mask[row, : len(seq)] = True
    keep = (torch.rand(mask.shape, generator=gen) < 0.5) & mask
    with torch.no_grad():
        assert_close("keep padded", model(padded, attention_mask=mask, keep=keep),
                     model(padded, attention_mask=mask)[keep], SELF_TOLERANCE)
        dense = padded[:, :3]
        keep = torch.rand(dense.shape, generator=gen) < 0.5
        assert_close("keep dense", model(dense, keep=keep), model(dense)[keep], SELF_TOLERANCE)

        # Left-padded prefill into a cache keeping each row's last token, then a chunk of two
        # new tokens per row on top of the cache.
        left = torch.zeros_like(padded)
        left_mask = torch.zeros_like(mask)
        for row, seq in enumerate(sequences):
            left[row, width - len(seq) :] = seq
            left_mask[row, width - len(seq) :] = True
        left_positions = (left_mask.long().cumsum(-1) - 1).clamp(min=0)
        last = torch.zeros_like(left_mask)
        last[:, -1] = True
        cache_full, cache_kept = model.new_cache(4, width + 2), model.new_cache(4, width + 2)
        reference = model(left, position_ids=left_positions, attention_mask=left_mask, kv_cache=cache_full)
        kept = model(left, position_ids=left_positions, attention_mask=left_mask, kv_cache=cache_kept, keep=last)
        assert_close("keep prefill", kept, reference[:, -1], SELF_TOLERANCE)
        for layer in range(cfg.num_layers):
            assert_close(f"keep prefill cache {layer}", cache_kept.keys[layer][:, :, :width],
                         cache_full.keys[layer][:, :, :width], SELF_TOLERANCE)
        chunk = torch.randint(0, VOCAB, (4, 2), generator=gen)
        chunk_mask = torch.cat([left_mask, torch.ones(4, 2, dtype=torch.bool)], dim=1)
        chunk_positions = left_positions[:, -1:] + torch.arange(1, 3)
        keep = torch.tensor([[True, False], [False, True], [True, True], [False, True]])
        reference = model(chunk, position_ids=chunk_positions, attention_mask=chunk_mask, kv_cache=cache_full)
        kept = model(chunk, position_ids=chunk_positions, attention_mask=chunk_mask, kv_cache=cache_kept, keep=keep)
        assert_close("keep on a cache", kept, reference[keep], SELF_TOLERANCE)
