"""Importing Hugging Face folders: parity with transformers, tokenizers, and clear failures.

Every reference model is built here by transformers from a tiny config, re-randomised (unit-scale
weights, see test_parity_hf.randomize_), written with save_pretrained into a temporary folder
and read back through `tessera.interop.load_hf`; outputs must match within 1e-4 in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_parity_hf import HF_TOLERANCE, assert_close, hf_eager, randomize_
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import nn

from tessera.interop import HFImportError, import_hf, load_hf
from tessera.interop.hf_keys import CheckpointMismatchError
from tessera.models.dual_encoder import DualEncoder, SigLIPDualEncoder
from tessera.models.lvlm import LVLM
from tessera.text.llama import LlamaDecoder
from tessera.text.tokenizer import Tokenizer
from tessera.train.checkpoint import load_checkpoint
from tessera.vision.vit import VisionTransformer

transformers = pytest.importorskip("transformers")

VOCAB = 320
IMAGE = 32  # square image side the tiny towers are built for
TINY_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)
TINY_TOWER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
)
TINY_VISION = dict(**TINY_TOWER, image_size=IMAGE, patch_size=8)
TINY_TEXT = dict(**TINY_TOWER, vocab_size=VOCAB, max_position_embeddings=16)
CORPUS = ["what color is the circle", "a red square left of a blue triangle", "USER: ASSISTANT:"] * 20



def save_hf(model: nn.Module, folder: Path, **kwargs: Any) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def hf_tokenizer(folder: Path, specials: dict[str, str | None], extra: tuple[str, ...] = ()) -> None:
    """A byte-level BPE tokenizer saved the way transformers saves one, with the given roles."""
    names = [t for t in specials.values() if t] + list(extra)
    tokens = list(dict.fromkeys(names))
    backend = BackendTokenizer(models.BPE(unk_token=specials.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, **{k: v for k, v in specials.items() if v}
    )
    fast.save_pretrained(folder)


def token_batch(seed: int, rows: int = 2, length: int = 12, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def images(seed: int, n: int = 2, height: int = IMAGE, width: int = IMAGE) -> torch.Tensor:
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ decoders

DECODER_CASES = {
    "llama-gqa": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2)),
    "llama-mqa-tied-rope-linear": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        ),
    ),
    "mistral-gqa": (
        "MistralForCausalLM",
        "MistralConfig",
        dict(num_key_value_heads=2, sliding_window=None),
    ),
    "qwen2-mha-tied": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(num_key_value_heads=4, tie_word_embeddings=True),
    ),
    "qwen2-gqa": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_key_value_heads=2)),
}


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_matches_hf(case: str, tmp_path: Path) -> None:
    model_cls, config_cls, overrides = DECODER_CASES[case]
    config = getattr(transformers, config_cls)(**{**TINY_DECODER, **overrides})
    hf = hf_eager(getattr(transformers, model_cls), config)
    randomize_(hf, seed=1)
    # A tiny shard size splits the weights over many files.
    shard = "40KB" if case == "llama-gqa" else None
    save_hf(hf, tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    imported = load_hf(tmp_path)
    assert isinstance(imported.model, LlamaDecoder) and imported.architecture == model_cls
    ids = token_batch(seed=2)
    with torch.no_grad():
        reference = hf(input_ids=ids).logits
        logits = imported.model.logits(imported.model(ids))
    assert_close(f"import {case} logits", logits, reference, HF_TOLERANCE)


def test_llama_tokenizer_is_completed_and_said_so(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(**TINY_DECODER, num_key_value_heads=2)
    save_hf(hf_eager(transformers.LlamaForCausalLM, config), tmp_path)
    # LLaMA's tokenizer: <unk>, <s>, </s>; no pad token and no image placeholder.
    hf_tokenizer(tmp_path, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"})
    imported = load_hf(tmp_path)
    tok = imported.tokenizer
    assert tok is not None
    assert tok.pad_id == tok.unk_id == tok.token_id("<unk>")
    assert tok.image_id == tok.vocab_size - 1  # added
    notes = "\n".join(imported.notes)
    assert "added the image placeholder '<image>'" in notes
    assert "no pad_token; using the unk token '<unk>'" in notes
    assert imported.meta["template"] == "vicuna"
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "USER: what color is the circle? ASSISTANT:"
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False)


def test_qwen2_roles_survive_a_tessera_checkpoint(tmp_path: Path) -> None:
    config = transformers.Qwen2Config(**TINY_DECODER, num_key_value_heads=2)
    hf = hf_eager(transformers.Qwen2ForCausalLM, config)
    randomize_(hf, seed=3)
    src = save_hf(hf, tmp_path / "hf")
    # Qwen2-instruct: eos <|im_end|>, pad <|endoftext|>, no bos, no unk.
    hf_tokenizer(
        src,
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        extra=("<|im_start|>",),
    )
    imported = import_hf(src, tmp_path / "tessera")
    assert imported.meta["template"] == "chatml"
    ckpt = load_checkpoint(tmp_path / "tessera")
    tok = Tokenizer.load(ckpt.tokenizer_path)
    assert tok.special_tokens["eos"] == "<|im_end|>" and tok.special_tokens["pad"] == "<|endoftext|>"
    assert tok.bos_id == tok.eos_id  # no BOS: the eos token stands in, as the notes say
    assert any("no bos_token" in n for n in imported.notes)
    ids = token_batch(seed=4)
    with torch.no_grad():
        reference = hf(input_ids=ids).logits
        logits = ckpt.model.logits(ckpt.model(ids))
    assert_close("qwen2 via tessera checkpoint", logits, reference, HF_TOLERANCE)


# --------------------------------------------------------------- CLIP towers


def test_clip_vision_and_text_towers_match_hf(tmp_path: Path) -> None:
    vision = hf_eager(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**TINY_VISION))
    randomize_(vision, seed=5)
    ours = load_hf(save_hf(vision, tmp_path / "vision")).model
    assert isinstance(ours, VisionTransformer)
    pixels = images(seed=6)
    wide = images(seed=7, n=1, width=48)
    with torch.no_grad():
        reference = vision(pixel_values=pixels)
        out = ours(pixels)
        reference_wide = vision(pixel_values=wide, interpolate_pos_encoding=True)
        out_wide = ours(wide)
    assert_close("clip vision last_hidden_state", out.hidden.view(2, 17, -1),
                 reference.last_hidden_state, HF_TOLERANCE)
    assert_close("clip vision pooled", ours.pooled(out), reference.pooler_output, HF_TOLERANCE)
    assert_close("clip vision 32x48 pooled", ours.pooled(out_wide), reference_wide.pooler_output,
                 HF_TOLERANCE)

    text_config = transformers.CLIPTextConfig(**TINY_TEXT, eos_token_id=VOCAB - 1, pad_token_id=0)
    text = hf_eager(transformers.CLIPTextModel, text_config)
    randomize_(text, seed=8)
    ours_text = load_hf(save_hf(text, tmp_path / "text")).model
    ids = token_batch(seed=9, length=10, vocab=VOCAB - 1)
    ids[0, 9], ids[1, 6] = VOCAB - 1, VOCAB - 1  # EOS ends each text; row 1 is padded after it
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        reference = text(input_ids=ids, attention_mask=mask.long())
        hidden, pooled = ours_text(ids, attention_mask=mask)
    assert_close("clip text last_hidden_state", hidden[mask], reference.last_hidden_state[mask],
                 HF_TOLERANCE)
    assert_close("clip text pooled", pooled, reference.pooler_output, HF_TOLERANCE)


def test_clip_model_matches_hf(tmp_path: Path) -> None:
    config = transformers.CLIPConfig(
        vision_config=TINY_VISION,
        text_config={**TINY_TEXT, "eos_token_id": VOCAB - 1, "pad_token_id": 0},
        projection_dim=24,
    )
    hf = hf_eager(transformers.CLIPModel, config)
    randomize_(hf, seed=10)
    with torch.no_grad():
        hf.logit_scale.fill_(2.3)
    ours = load_hf(save_hf(hf, tmp_path)).model
    assert isinstance(ours, DualEncoder)
    pixels = images(seed=11)
    ids = token_batch(seed=12, length=8, vocab=VOCAB - 1)
    ids[:, -1] = VOCAB - 1
    with torch.no_grad():
        reference = hf(input_ids=ids, pixel_values=pixels)
        image_emb, text_emb = ours.encode_image(pixels), ours.encode_text(ids)
        logits = ours.logit_scale.exp() * image_emb @ text_emb.t()
    assert_close("CLIPModel image_embeds", image_emb, reference.image_embeds, HF_TOLERANCE)
    assert_close("CLIPModel text_embeds", text_emb, reference.text_embeds, HF_TOLERANCE)
    assert_close("CLIPModel logit_scale", ours.logit_scale, hf.logit_scale, 0.0)
    assert_close("CLIPModel logits_per_image", logits, reference.logits_per_image, HF_TOLERANCE)


# ------------------------------------------------------------------------ SigLIP

SIGLIP_VISION = dict(**TINY_VISION, layer_norm_eps=1e-6)
SIGLIP_TEXT = dict(**TINY_TEXT, projection_size=32)


def test_siglip_vision_matches_hf(tmp_path: Path) -> None:
    hf = hf_eager(transformers.SiglipVisionModel, transformers.SiglipVisionConfig(**SIGLIP_VISION))
    randomize_(hf, seed=13)
    ours = load_hf(save_hf(hf, tmp_path)).model
    assert isinstance(ours, VisionTransformer) and not ours.cfg.class_token
    pixels = images(seed=14)
    with torch.no_grad():
        reference = hf(pixel_values=pixels)
        out = ours(pixels)
        last = ours.last_hidden_state(out)
        pooled = ours.pooled(out)
    assert_close("siglip vision last_hidden_state", last.view(2, 16, -1),
                 reference.last_hidden_state, HF_TOLERANCE)
    assert_close("siglip vision pooled (MAP head)", pooled, reference.pooler_output, HF_TOLERANCE)
    for height, width in [(32, 48), (48, 24)]:
        odd = images(seed=15, n=1, height=height, width=width)
        with torch.no_grad():
            reference = hf(pixel_values=odd, interpolate_pos_encoding=True)
            out = ours(odd)
        assert_close(f"siglip vision {height}x{width} last_hidden_state",
                     ours.last_hidden_state(out)[None], reference.last_hidden_state, HF_TOLERANCE)
        assert_close(f"siglip vision {height}x{width} pooled", ours.pooled(out),
                     reference.pooler_output, HF_TOLERANCE)
    # Mixed sizes are packed; the head pools each image over its own tokens only.
    mixed = [images(seed=16, n=1)[0], images(seed=17, n=1, height=16, width=40)[0]]
    with torch.no_grad():
        packed = ours.pooled(ours(mixed))
        alone = torch.cat([ours.pooled(ours([img])) for img in mixed])
    assert_close("siglip packed pooled vs alone", packed, alone, 1e-5)


def test_siglip_text_matches_hf(tmp_path: Path) -> None:
    hf = hf_eager(transformers.SiglipTextModel, transformers.SiglipTextConfig(**SIGLIP_TEXT))
    randomize_(hf, seed=18)
    ours = load_hf(save_hf(hf, tmp_path)).model
    assert not ours.cfg.causal and ours.cfg.pooling == "last"
    ids = token_batch(seed=19, length=16)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 11:] = False
    for name, attention_mask in (("no mask", None), ("padding mask", mask)):
        with torch.no_grad():
            reference = hf(
                input_ids=ids, attention_mask=None if attention_mask is None else mask.long()
            )
            hidden, pooled = ours(ids, attention_mask=attention_mask)
        assert_close(f"siglip text {name} last_hidden_state", hidden, reference.last_hidden_state,
                     HF_TOLERANCE)
        assert_close(f"siglip text {name} pooled", pooled, reference.pooler_output, HF_TOLERANCE)


def test_siglip_model_matches_hf(tmp_path: Path) -> None:
    config = transformers.SiglipConfig(vision_config=SIGLIP_VISION, text_config=SIGLIP_TEXT)
    hf = hf_eager(transformers.SiglipModel, config)
    randomize_(hf, seed=20)
    with torch.no_grad():
        hf.logit_scale.fill_(2.3)
        hf.logit_bias.fill_(-4.0)
    ours = load_hf(save_hf(hf, tmp_path)).model
    assert isinstance(ours, SigLIPDualEncoder)
    pixels, ids = images(seed=21), token_batch(seed=22, length=16)
    with torch.no_grad():
        reference = hf(input_ids=ids, pixel_values=pixels)
        image_emb, text_emb = ours.encode_image(pixels), ours.encode_text(ids)
        logits = ours.pair_logits(image_emb, text_emb)
    assert_close("SiglipModel image_embeds", image_emb, reference.image_embeds, HF_TOLERANCE)
    assert_close("SiglipModel text_embeds", text_emb, reference.text_embeds, HF_TOLERANCE)
    assert_close("SiglipModel logits_per_image", logits, reference.logits_per_image, HF_TOLERANCE)


# ------------------------------------------------------------------------- LLaVA

IMAGE_TOKEN_ID = 5


def build_llava(vision: dict, text: dict, seed: int, **llava: Any) -> nn.Module:
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, **llava
    )
    hf = hf_eager(transformers.LlavaForConditionalGeneration, config)
    randomize_(hf, seed=seed)
    return hf


def llava_prompt(image_tokens: int, seed: int) -> torch.Tensor:
    text = token_batch(seed=seed, rows=1, length=10)[0]
    text[text == IMAGE_TOKEN_ID] = IMAGE_TOKEN_ID + 1
    return torch.cat([text[:3], torch.full((image_tokens,), IMAGE_TOKEN_ID), text[3:]])[None]


LLAVA_CASES = {
    # LLaVA-1.5: CLIP tower, layer -2 without the class token, 2-layer MLP, LLaMA with GQA.
    "clip-mlp-llama": (
        {"model_type": "clip_vision_model", **TINY_VISION},
        {"model_type": "llama", **TINY_DECODER, "num_key_value_heads": 2},
        dict(),
        16,
    ),
    # SigLIP tower (no class token: "full"), last layer, LLaVA-v1 linear projector, tied Qwen2.
    "siglip-linear-qwen2": (
        {"model_type": "siglip_vision_model", **SIGLIP_VISION},
        {"model_type": "qwen2", **TINY_DECODER, "num_key_value_heads": 1, "tie_word_embeddings": True},
        dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
             projector_hidden_act="linear"),
        16,
    ),
    # CLIP tower keeping the class token ("full"), first layer, Mistral.
    "clip-full-mistral": (
        {"model_type": "clip_vision_model", **TINY_VISION},
        {"model_type": "mistral", **TINY_DECODER, "num_key_value_heads": 2, "sliding_window": None},
        dict(vision_feature_layer=1, vision_feature_select_strategy="full"),
        17,
    ),
}


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_llava_matches_hf(case: str, tmp_path: Path) -> None:
    vision, text, llava, image_tokens = LLAVA_CASES[case]
    hf = build_llava(vision, text, seed=23, **llava)
    if llava.get("projector_hidden_act") == "linear":
        with torch.no_grad():  # how a linear projector is stored in the two-layer one
            hf.model.multi_modal_projector.linear_2.weight.copy_(torch.eye(64))
            hf.model.multi_modal_projector.linear_2.bias.zero_()
    imported = load_hf(save_hf(hf, tmp_path))
    ours = imported.model
    assert isinstance(ours, LVLM)
    assert ours.num_image_tokens(IMAGE, IMAGE) == image_tokens
    if "linear" in case:
        assert ours.cfg.connector.kind == "linear"
    ids, pixels = llava_prompt(image_tokens, seed=24), images(seed=25, n=1)
    with torch.no_grad():
        reference = hf(input_ids=ids, pixel_values=pixels).logits
        logits = ours.language_model.logits(ours(ids, [pixels[0]]))
    assert_close(f"llava {case} logits", logits, reference, HF_TOLERANCE)

    # A non-square image: transformers' LLaVA forward has no interpolate_pos_encoding, so its
    # vision features are computed with it and passed in.
    wide = images(seed=26, n=1, width=48)
    wide_tokens = ours.num_image_tokens(IMAGE, 48)
    ids = llava_prompt(wide_tokens, seed=27)
    with torch.no_grad():
        features = hf.model.get_image_features(pixel_values=wide, interpolate_pos_encoding=True)
        reference = hf(input_ids=ids, mm_encoder_outputs={"image": features}).logits
        logits = ours.language_model.logits(ours(ids, [wide[0]]))
    assert_close(f"llava {case} 32x48 logits", logits, reference, HF_TOLERANCE)


def test_llava_tokenizer_and_meta(tmp_path: Path) -> None:
    hf = build_llava({"model_type": "clip_vision_model", **TINY_VISION},
                     {"model_type": "llama", **TINY_DECODER}, seed=28)
    save_hf(hf, tmp_path)
    hf_tokenizer(tmp_path, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                            "pad_token": "<pad>"}, extra=("<image>",))
    image_id = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"][-1]["id"]
    config = json.loads((tmp_path / "config.json").read_text())
    config["image_token_index"] = image_id
    (tmp_path / "config.json").write_text(json.dumps(config))
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
        image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4],
    )
    image_processor.save_pretrained(tmp_path)
    imported = load_hf(tmp_path)
    assert imported.tokenizer.image_id == imported.model.cfg.image_token_id == image_id
    assert imported.meta["image_size"] == [IMAGE, IMAGE]
    assert imported.meta["image_mean"] == [0.4, 0.5, 0.6]
    assert imported.meta["template"] == "vicuna"
    assert any("center-crops" in n for n in imported.notes)


# ------------------------------------------------------------------ clear failures


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(**TINY_DECODER, num_key_value_heads=2)
    return save_hf(hf_eager(transformers.LlamaForCausalLM, config), folder)


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        (config[section] if section else config)[name] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "architecture,needs",
    [("BertForMaskedLM", "only BertModel"), ("Blip2ForImageTextRetrieval", "only Blip2ForConditionalGeneration"),
     ("GPT2LMHeadModel", None)],
)
def test_unsupported_architecture_is_named(architecture: str, needs: str | None, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    with pytest.raises(HFImportError, match=rf"config.json: config key 'architectures': '{architecture}'") as err:
        load_hf(tmp_path)
    if needs:
        assert needs in str(err.value)


@pytest.mark.parametrize(
    "changes,key",
    [
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope_parameters"),
        (dict(hidden_act="gelu_10"), "hidden_act"),
        (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    ],
)
def test_unsupported_config_values_name_file_and_key(
    changes: dict, key: str, llama_folder: Path, tmp_path: Path
) -> None:
    folder = copy_folder(llama_folder, tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(HFImportError, match=rf"config.json: .*'{key}'"):
        load_hf(folder)


@pytest.mark.parametrize(
    "siglip,changes,key",
    [
        (False, dict(vision_feature_layer=[-2, -1]), "vision_feature_layer"),
        (False, dict(text_config__rope_scaling={"type": "yarn", "factor": 2.0},
                     text_config__rope_parameters=None), "text_config: config key 'rope_scaling'"),
        (False, dict(projector_hidden_act="tanh"), "projector_hidden_act"),
        (True, dict(vision_feature_select_strategy="default"), "vision_feature_select_strategy"),
        (False, dict(vision_config__model_type="dinov2"), "vision_config: config key 'model_type'"),
    ],
)
def test_unsupported_llava_config_values_are_named(
    siglip: bool, changes: dict, key: str, tmp_path: Path
) -> None:
    vision = {"model_type": "siglip_vision_model" if siglip else "clip_vision_model", **TINY_VISION}
    tiny_text = {**TINY_DECODER, "num_hidden_layers": 1}
    folder = save_hf(build_llava(vision, {"model_type": "llama", **tiny_text}, seed=29,
                                 vision_feature_select_strategy="full"), tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(HFImportError, match=key):
        load_hf(folder)


def test_linear_projector_must_be_exactly_linear(tmp_path: Path) -> None:
    hf = build_llava({"model_type": "clip_vision_model", **TINY_VISION},
                     {"model_type": "llama", **TINY_DECODER, "num_hidden_layers": 1}, seed=30,
                     projector_hidden_act="linear")
    with pytest.raises(HFImportError, match="linear_2 is exactly the identity"):
        load_hf(save_hf(hf, tmp_path))


def test_missing_shard_is_named(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(**TINY_DECODER, num_key_value_heads=2)
    save_hf(hf_eager(transformers.LlamaForCausalLM, config), tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(HFImportError, match=rf"model.safetensors.index.json: shard '{shard.name}' is missing"):
        load_hf(tmp_path)


def test_dtype_shape_and_key_mismatches_are_named(llama_folder: Path, tmp_path: Path) -> None:
    weights = load_file(llama_folder / "model.safetensors")
    quantized = copy_folder(llama_folder, tmp_path / "int8")
    bad = {**weights, "model.norm.weight": weights["model.norm.weight"].to(torch.int8)}
    save_file(bad, quantized / "model.safetensors")
    with pytest.raises(HFImportError, match=r"model.safetensors: tensor 'model.norm.weight' has dtype torch.int8"):
        load_hf(quantized)

    reshaped = copy_folder(llama_folder, tmp_path / "shape")
    edit_config(reshaped, intermediate_size=96)
    with pytest.raises(CheckpointMismatchError) as err:
        load_hf(reshaped)
    message = str(err.value)
    assert "model.safetensors" in message
    assert "layers.0.mlp.up_proj.weight [model.safetensors: 'model.layers.0.mlp.up_proj.weight']: " \
           "checkpoint (128, 64) vs model (96, 64)" in message

    extra = copy_folder(llama_folder, tmp_path / "extra")
    save_file({**weights, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)},
              extra / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(1\): layers.0.self_attn.o_proj.bias"):
        load_hf(extra)

    corrupt = copy_folder(llama_folder, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HFImportError, match=r"model.safetensors: not a readable safetensors file"):
        load_hf(corrupt)

    no_safetensors = tmp_path / "bin"
    no_safetensors.mkdir()
    (no_safetensors / "config.json").write_text((llama_folder / "config.json").read_text())
    torch.save(weights, no_safetensors / "pytorch_model.bin")
    with pytest.raises(HFImportError, match=r"no model.safetensors .*found pytorch_model.bin"):
        load_hf(no_safetensors)


def test_cli_import_hf(llama_folder: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tessera.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["import-hf", str(llama_folder), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output and "llama" in result.output
    ckpt = load_checkpoint(tmp_path / "out")
    weights = load_file(llama_folder / "model.safetensors")
    assert torch.equal(ckpt.model.norm.weight, weights["model.norm.weight"])

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    result = runner.invoke(app, ["import-hf", str(broken), str(tmp_path / "out2")])
    assert result.exit_code == 2
    assert "BertForMaskedLM" in result.output

