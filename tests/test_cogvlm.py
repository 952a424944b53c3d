"""CogVLM: the visual expert routes image tokens (and only them) through its own QKV and FFN,
starts as a copy of the text weights, works padded, packed, with `keep` and with the KV cache;
all image tokens of an image share one position id; the preset's stages and a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tessera.data.collate import share_image_positions
from tessera.data.shapes import ShapesConfig, generate_shapes
from tessera.data.shapes_reading import generate_reading_tasks
from tessera.infer.generate import GenerationConfig, generate
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.nn.attention import attention
from tessera.nn.layers import apply_rotary
from tessera.pipeline import build_lvlm, train_lvlm
from tessera.presets import cogvlm
from tessera.presets.base import PRETRAIN_STAGES, LVLMPreset
from tessera.text.clip_text import CLIPTextConfig
from tessera.text.llama import LlamaConfig, LlamaDecoder
from tessera.text.tokenizer import train_bpe
from tessera.train.freeze import set_trainable
from tessera.train.trainer import build_optimizer
from tessera.vision.vit import ViTConfig

EXPERT_KEYS = ("vision_expert", "vision_mlp")


def expert_decoder(layers: int = 2) -> LlamaDecoder:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=layers, num_heads=4,
                      num_kv_heads=2, visual_expert=True)
    return LlamaDecoder(cfg).eval()


def randomize_expert(model: LlamaDecoder) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in EXPERT_KEYS):
                p.normal_(0, 0.2)


def plain_copy(model: LlamaDecoder, expert_weights: bool) -> LlamaDecoder:
    """A plain decoder with `model`'s text weights, or with its expert weights in the text slots."""
    plain = LlamaDecoder(model.cfg.model_copy(update={"visual_expert": False})).eval()
    state = {k: v for k, v in model.state_dict().items() if not any(e in k for e in EXPERT_KEYS)}
    if expert_weights:
        for i, layer in enumerate(model.layers):
            for n in ("q_proj", "k_proj", "v_proj"):
                state[f"layers.{i}.self_attn.{n}.weight"] = getattr(layer.self_attn.vision_expert, n).weight
            for n in ("gate_proj", "up_proj", "down_proj"):
                state[f"layers.{i}.mlp.{n}.weight"] = getattr(layer.vision_mlp, n).weight
    plain.load_state_dict(state)
    return plain


def test_default_off_keeps_llama_names() -> None:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    assert not cfg.visual_expert
    assert not any(k in n for n in LlamaDecoder(cfg).state_dict() for k in EXPERT_KEYS)


def test_fresh_expert_equals_plain_decoder() -> None:
    model = expert_decoder()
    plain = plain_copy(model, expert_weights=False)
    n_plain = sum(p.numel() for p in plain.parameters())
    per_layer = sum(p.numel() for p in model.layers[0].self_attn.vision_expert.parameters())
    per_layer += sum(p.numel() for p in model.layers[0].vision_mlp.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_plain + 2 * per_layer
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.rand(2, 9) < 0.5
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, 6:] = False
    with torch.no_grad():
        ours = model(ids, modality_mask=mask, attention_mask=pad)
        ref = plain(ids, attention_mask=pad)
    torch.testing.assert_close(ours[pad], ref[pad], atol=1e-6, rtol=0)


def test_all_image_or_all_text_tokens_run_one_set_of_weights() -> None:
    model = expert_decoder()
    randomize_expert(model)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        all_image = model(ids, modality_mask=torch.ones(2, 7, dtype=torch.bool))
        all_text = model(ids, modality_mask=torch.zeros(2, 7, dtype=torch.bool))
        no_mask = model(ids)
        expert_only = plain_copy(model, expert_weights=True)(ids)
        text_only = plain_copy(model, expert_weights=False)(ids)
    torch.testing.assert_close(all_image, expert_only, atol=1e-6, rtol=0)
    torch.testing.assert_close(all_text, text_only, atol=1e-6, rtol=0)
    torch.testing.assert_close(no_mask, text_only, atol=1e-6, rtol=0)
    assert (all_image - all_text).abs().max() > 1e-2  # the expert weights do differ


def reference_layer(model: LlamaDecoder, x: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """One expert layer by hand: each projection computed with both weight sets for every
    position and the image rows taken from the expert's, then the final norm."""
    layer = model.layers[0]
    attn = layer.self_attn
    m = is_image[..., None]
    b, length, _ = x.shape

    def pick(text: torch.nn.Module, image: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        return torch.where(m, image(h), text(h))

    h = layer.input_layernorm(x)
    cos, sin = model.rotary(torch.arange(length).expand(b, length), x.dtype)
    q = pick(attn.q_proj, attn.vision_expert.q_proj, h).view(b, length, 4, 8).transpose(1, 2)
    k = pick(attn.k_proj, attn.vision_expert.k_proj, h).view(b, length, 2, 8).transpose(1, 2)
    v = pick(attn.v_proj, attn.vision_expert.v_proj, h).view(b, length, 2, 8).transpose(1, 2)
    out = attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, causal=True)
    x = x + attn.o_proj(out.transpose(1, 2).reshape(b, length, -1))
    x = x + pick(layer.mlp, layer.vision_mlp, layer.post_attention_layernorm(x))
    return model.norm(x)


def test_mixed_sequence_routes_each_position_to_its_weights() -> None:
    model = expert_decoder(layers=1)
    randomize_expert(model)
    x = torch.randn(2, 10, 32)
    is_image = torch.zeros(2, 10, dtype=torch.bool)
    is_image[0, 2:6] = True
    is_image[1, 0:3] = True
    is_image[1, 7] = True
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=x, modality_mask=is_image), reference_layer(model, x, is_image),
                                   atol=1e-5, rtol=0)
        # text before the first image token cannot see expert weights; every later position
        # does (image tokens compute with them, later text attends to their values)
        before = model(inputs_embeds=x, modality_mask=is_image)
        model.layers[0].self_attn.vision_expert.v_proj.weight.add_(0.5)
        after = model(inputs_embeds=x, modality_mask=is_image)
    assert torch.equal(before[0, :2], after[0, :2])
    assert (before[0, 2:] - after[0, 2:]).abs().amax(-1).min() > 1e-4


def test_packed_padded_and_keep_agree() -> None:
    model = expert_decoder()
    randomize_expert(model)
    lengths = (7, 5)
    ids = [torch.randint(0, 64, (n,)) for n in lengths]
    masks = [torch.tensor([0, 1, 1, 1, 0, 0, 0]).bool(), torch.tensor([1, 1, 0, 0, 0]).bool()]
    padded_ids = torch.zeros(2, 7, dtype=torch.long)
    padded_mask = torch.zeros(2, 7, dtype=torch.bool)
    real = torch.zeros(2, 7, dtype=torch.bool)
    for i, n in enumerate(lengths):
        padded_ids[i, :n], padded_mask[i, :n], real[i, :n] = ids[i], masks[i], True
    packed_pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 12], dtype=torch.int32)
    with torch.no_grad():
        padded = model(padded_ids, modality_mask=padded_mask, attention_mask=real)
        packed = model(torch.cat(ids)[None], modality_mask=torch.cat(masks)[None], position_ids=packed_pos,
                       cu_seqlens=cu)
        kept = model(padded_ids, modality_mask=padded_mask, attention_mask=real, keep=real)
    torch.testing.assert_close(packed[0], padded[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(kept, padded[real], atol=1e-5, rtol=0)


def test_load_text_weights_copies_them_into_the_expert() -> None:
    model = expert_decoder()
    randomize_expert(model)
    source = plain_copy(expert_decoder(), expert_weights=False)
    model.load_text_weights(source.state_dict())
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, modality_mask=torch.ones(1, 6, dtype=torch.bool)), source(ids),
                                   atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="modality_mask must be a bool mask"):
        model(ids, modality_mask=torch.ones(1, 5, dtype=torch.bool))
    broken = {k: v for k, v in source.state_dict().items() if k != "norm.weight"}
    with pytest.raises(ValueError, match="do not fit"):
        model.load_text_weights(broken)


# --- one position id per image -----------------------------------------------------------------

def test_shared_image_positions_padded_packed_and_left_padded() -> None:
    # packed row of two samples: the shift restarts with the second sample
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    img = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0]]).bool()
    assert share_image_positions(pos, img).tolist() == [[0, 1, 1, 1, 2, 3, 4, 0, 1, 2, 2, 3]]
    # two images in one sample, right padding stays 0
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 0]])
    img = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0, 0, 0]]).bool()
    assert share_image_positions(pos, img).tolist() == [[0, 0, 0, 1, 2, 2, 3, 4, 0, 0]]
    # left padding (generation): pads and the first real token are position 0
    pos = torch.tensor([[0, 0, 0, 1, 2, 3, 4]])
    img = torch.tensor([[0, 0, 0, 1, 1, 1, 0]]).bool()
    assert share_image_positions(pos, img).tolist() == [[0, 0, 0, 1, 1, 1, 2]]


def tiny_lvlm(image_positions: str = "shared") -> LVLM:
    cfg = LVLMConfig(
        vision=ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32),
        llm=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, visual_expert=True),
        image_token_id=5, image_positions=image_positions,
    )
    model = LVLM(cfg).eval()
    randomize_expert(model.language_model)
    return model


def test_lvlm_runs_the_expert_with_shared_positions() -> None:
    model = tiny_lvlm()
    ids = torch.tensor([[1, 7, 5, 5, 5, 5, 9, 10, 11]])
    images = [torch.randn(3, 16, 16)]
    with torch.no_grad():
        out = model(ids, images)
        embeds, is_image = model.embed(ids, images)
        shared = torch.tensor([[0, 1, 2, 2, 2, 2, 3, 4, 5]])
        ref = model.language_model(inputs_embeds=embeds, position_ids=shared, modality_mask=is_image)
        per_token = model.language_model(inputs_embeds=embeds, modality_mask=is_image)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert (out[0, -1] - per_token[0, -1]).abs().max() > 1e-4
    assert tiny_lvlm("per_token").position_ids(None, is_image) is None  # LLaVA behaviour unchanged


def test_generation_with_cache_matches_full_recompute() -> None:
    model = tiny_lvlm()
    prompts = [[1, 7, 5, 5, 5, 5, 9], [1, 5, 5, 5, 5, 12, 13, 9]]
    images = [torch.randn(3, 16, 16), torch.randn(3, 16, 16)]
    cfg = GenerationConfig(max_new_tokens=6)
    cached = generate(model, prompts, images, stop_ids=[], pad_id=0, config=cfg, use_cache=True)
    full = generate(model, prompts, images, stop_ids=[], pad_id=0, config=cfg, use_cache=False)
    assert cached == full and all(len(o) == 6 for o in cached)
    # the first generated token is what the model's own forward predicts for the prompt alone
    with torch.no_grad():
        hidden = model(torch.tensor([prompts[1]]), images[1:])
    assert cached[1][0] == int(model.language_model.logits(hidden[0, -1]).argmax())


# --- preset -----------------------------------------------------------------------------------

def test_preset_trains_the_expert_first_and_the_llm_slowly_in_sft() -> None:
    preset = cogvlm.tiny()
    assert preset.visual_expert and preset.image_positions == "shared" and preset.vision_feature_layer == -2
    assert [s.name for s in preset.stages] == ["pretrain", "pretrain_rec", "sft"]
    tok = train_bpe(["a red circle left of a blue square"] * 10, vocab_size=300)
    model = build_lvlm(preset, tok)
    conn = sum(p.numel() for p in model.connector.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in EXPERT_KEYS))
    for stage in preset.stages[:2]:
        assert set_trainable(model, stage.trainable).trainable == conn + expert
    sft = preset.stages[2]
    report = set_trainable(model, sft.trainable)
    assert report.frozen == sum(p.numel() for p in model.vision_tower.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: group["lr"] for group in build_optimizer(model, sft).param_groups for p in group["params"]}
    assert lrs["connector.linear_1.weight"] == sft.lr
    assert lrs["language_model.layers.0.vision_mlp.up_proj.weight"] == sft.lr
    assert lrs["language_model.layers.0.self_attn.vision_expert.q_proj.weight"] == sft.lr
    assert lrs["language_model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.1 * sft.lr)
    assert lrs["language_model.embed_tokens.weight"] == pytest.approx(0.1 * sft.lr)
    paper = cogvlm.paper()
    assert paper["vision"].grid ** 2 == 1225 and paper["llm"].visual_expert


SMALL = {
    "vision": ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "text_tower": CLIPTextConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=64),
    "clip_projection_dim": 32,
    "llm": LlamaConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                       max_position_embeddings=512),
    "tokenizer_vocab_size": 400,
}


@pytest.fixture(scope="module")
def reading_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cog_shapes")
    generate_shapes(ShapesConfig(seed=1, num_train=60, num_val=4, num_test=8, num_test_comp=8), root, progress=False)
    generate_reading_tasks(root, progress=False)
    return root


@pytest.mark.slow
def test_tiny_run_learns(reading_shapes: Path, tmp_path: Path) -> None:
    base = cogvlm.tiny()
    steps = (20, 20, 60)
    small_stages = cogvlm.stages(SMALL["llm"], steps=steps, batch=(8, 8, 8), lr=(2e-3, 1e-3, 4e-3))
    preset = LVLMPreset.parse({
        **base.model_dump(), **{k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in SMALL.items()},
        "clip_stage": base.clip_stage.model_copy(update={"steps": 6, "batch_size": 16, "warmup_steps": 0}).model_dump(),
        "lm_stage": base.lm_stage.model_copy(update={"steps": 120, "batch_size": 16, "warmup_steps": 4}).model_dump(),
        "stages": [s.model_copy(update={"log_every": 1}).model_dump() for s in small_stages],
    })
    train_lvlm(preset, reading_shapes, tmp_path, stages=PRETRAIN_STAGES, progress=False)
    result = train_lvlm(preset, reading_shapes, tmp_path, stages=[s.name for s in preset.stages],
                        pretrained=tmp_path, progress=False)
    assert [r.stage for r in result.stages] == ["pretrain", "pretrain_rec", "sft"]
    assert result.skips.reasons.get("optional stage data missing", 0) == 0  # REC was mixed in
    for stage, n in zip(result.stages, steps, strict=True):
        losses = [h["loss"] for h in stage.history]
        assert len(losses) == n and all(math.isfinite(x) for x in losses)
    sft = [h["loss"] for h in result.stages[-1].history]
    first, last = sum(sft[:8]) / 8, sum(sft[-8:]) / 8
    assert last < 0.8 * first, f"SFT loss {first:.3f} → {last:.3f}"
    assert result.model.language_model.cfg.visual_expert
