"""Exporting Tessera checkpoints to Hugging Face folders: transformers loads them without custom
code and computes the same thing (logits and embeddings within 1e-4 in float32, the same greedy
generation), and the processor / tokenizer / chat template reproduce Tessera's preprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_parity_hf import HF_TOLERANCE, assert_close, randomize_
from torch import nn

from tessera.connectors.projector import ProjectorConfig
from tessera.data.images import ImageTransform
from tessera.data.records import Turn
from tessera.data.templates import TEMPLATES, encode_prompt, render_text, stop_token_ids
from tessera.infer.generate import GenerationConfig, generate
from tessera.interop import export_hf, load_hf
from tessera.interop.hf_tokenizer import chat_template_jinja, save_hf_tokenizer
from tessera.models.dual_encoder import (
    SIGLIP_TEXT,
    SIGLIP_VISION,
    DualEncoder,
    DualEncoderConfig,
    SigLIPDualEncoder,
    SigLIPDualEncoderConfig,
)
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.text.clip_text import CLIPTextConfig, CLIPTextTransformer
from tessera.text.llama import LlamaConfig, LlamaDecoder
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.train.checkpoint import save_checkpoint
from tessera.vision.vit import VisionTransformer, ViTConfig

transformers = pytest.importorskip("transformers")

IMAGE = 32
CLIP_VIT = ViTConfig(image_size=IMAGE, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=64)
SIGLIP_VIT = SIGLIP_VISION.model_copy(update=dict(image_size=IMAGE, patch_size=8, hidden_size=32,
                                                  num_layers=2, num_heads=4, intermediate_size=64))
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
CORPUS = [
    "what color is the circle? blue",
    "USER: is there a red square? ASSISTANT: yes",
    "how many triangles are there? three",
] * 30



@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe(CORPUS, vocab_size=320).save(tmp_path_factory.mktemp("tok"))


def llm_config(vocab_size: int, **overrides: object) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, max_position_embeddings=256).model_copy(update=overrides)


def save(model: nn.Module, folder: Path, tokenizer_file: Path | None, **meta: object) -> Path:
    return save_checkpoint(folder, model.eval(), meta=meta, tokenizer_file=tokenizer_file)


def pil_image(seed: int, height: int = 40, width: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------- LLaVA

LLAVA_CASES = {
    # LLaVA-1.5: CLIP tower, layer -2 without the class token, MLP connector, LLaMA with GQA.
    "clip-mlp-llama": dict(vision=CLIP_VIT, connector=ProjectorConfig(kind="mlp"), llm={},
                           vision_feature_layer=-2, vision_feature_select="patch", template="vicuna"),
    # SigLIP tower, last layer, linear connector, tied Qwen2-style LM (q/k/v biases), ChatML.
    "siglip-linear-qwen2": dict(vision=SIGLIP_VIT, connector=ProjectorConfig(kind="linear"),
                                llm=dict(attention_bias=True, tie_word_embeddings=True, num_kv_heads=1),
                                vision_feature_layer=-1, vision_feature_select="patch",
                                template="chatml"),
}


@pytest.fixture(scope="module", params=list(LLAVA_CASES))
def exported_llava(request: pytest.FixtureRequest, tokenizer_file: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[str, LVLM, Tokenizer, Path]:
    case = LLAVA_CASES[request.param]
    tokenizer = Tokenizer.load(tokenizer_file)
    cfg = LVLMConfig(
        vision=case["vision"], connector=case["connector"],
        llm=llm_config(tokenizer.vocab_size, **case["llm"]), image_token_id=tokenizer.image_id,
        vision_feature_layer=case["vision_feature_layer"],
        vision_feature_select=case["vision_feature_select"],
    )
    torch.manual_seed(0)
    model = LVLM(cfg)
    randomize_(model, seed=1)
    root = tmp_path_factory.mktemp(request.param)
    save(model, root / "tessera", tokenizer_file, template=case["template"], image_size=[IMAGE, IMAGE],
         image_mean=list(MEAN), image_std=list(STD))
    export_hf(root / "tessera", root / "hf")
    return case["template"], model, tokenizer, root / "hf"


def test_llava_export_loads_and_matches(exported_llava: tuple[str, LVLM, Tokenizer, Path]) -> None:
    template, ours, tokenizer, folder = exported_llava
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "LlavaProcessor"

    image = pil_image(seed=2)
    pixels = ImageTransform(size=(IMAGE, IMAGE), mean=MEAN, std=STD)(image)
    turns = [Turn("user", "<image>\nwhat color is the circle?")]
    prompt = encode_prompt(tokenizer, template, turns, [ours.num_image_tokens(IMAGE, IMAGE)])
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nwhat color is the circle?"}]}],
        add_generation_prompt=True,
    )
    assert rendered == render_text(template, turns) + TEMPLATES[template].assistant_prefix
    inputs = processor(images=[image], text=[rendered], return_tensors="pt")
    assert_close("processor pixel_values", inputs["pixel_values"][0], pixels, 1e-6)
    hf_ids = inputs["input_ids"][0].tolist()
    assert hf_ids.count(tokenizer.image_id) == prompt.count(tokenizer.image_id)
    # Both tokenize the whole rendered string, so a user of the export sees Tessera's ids
    # (vicuna's "? ASSISTANT:" included, where the space merges with "AS" into one token).
    assert hf_ids == prompt

    ids = torch.tensor([prompt])
    with torch.no_grad():
        reference = hf(input_ids=ids, pixel_values=pixels[None]).logits
        logits = ours.language_model.logits(ours(ids, [pixels]))
    assert_close(f"exported llava ({template}) logits", logits, reference, HF_TOLERANCE)

    with torch.no_grad():
        hf_new = hf.generate(input_ids=ids, pixel_values=pixels[None], attention_mask=torch.ones_like(ids),
                             max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    stops = stop_token_ids(tokenizer, template)
    ours_new = generate(ours, [prompt], [pixels], stop_ids=stops, pad_id=tokenizer.pad_id,
                        config=GenerationConfig(max_new_tokens=12))[0]
    if hf_new and hf_new[-1] in stops:  # transformers keeps the stop token, Tessera drops it
        hf_new = hf_new[:-1]
    assert hf_new == ours_new
    # A random model with tied embeddings tends to repeat the last token; untied ones vary.
    assert len(set(ours_new)) > 1 or ours.cfg.llm.tie_word_embeddings


def test_llava_export_non_square_image_features(exported_llava: tuple[str, LVLM, Tokenizer, Path]) -> None:
    """transformers' LLaVA forward cannot interpolate positions, so the exported tower's features
    for a non-square image are computed with interpolate_pos_encoding and passed in."""
    _, ours, tokenizer, folder = exported_llava
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    wide = torch.randn(1, 3, IMAGE, 48, generator=torch.Generator().manual_seed(3))
    prompt = [tokenizer.bos_id, 7, 8] + [tokenizer.image_id] * ours.num_image_tokens(IMAGE, 48) + [9, 10]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        features = hf.model.get_image_features(pixel_values=wide, interpolate_pos_encoding=True)
        reference = hf(input_ids=ids, mm_encoder_outputs={"image": features}).logits
        logits = ours.language_model.logits(ours(ids, [wide[0]]))
    assert_close("exported llava 32x48 logits", logits, reference, HF_TOLERANCE)


def test_llava_round_trip_through_import(exported_llava: tuple[str, LVLM, Tokenizer, Path]) -> None:
    template, ours, tokenizer, folder = exported_llava
    imported = load_hf(folder)
    assert imported.meta["template"] == template
    assert imported.meta["image_size"] == [IMAGE, IMAGE] and imported.meta["image_mean"] == list(MEAN)
    assert imported.model.cfg == ours.cfg
    expected = ours.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in imported.model.state_dict().items())
    assert imported.tokenizer.special_tokens == tokenizer.special_tokens
    assert not imported.notes


# -------------------------------------------------------------- tokenizer, template


def test_exported_tokenizer_loads_with_its_roles(exported_llava: tuple[str, LVLM, Tokenizer, Path]) -> None:
    _, _, tokenizer, folder = exported_llava
    for loader in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        hf_tok = loader.from_pretrained(folder)
        assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (
            tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id)
        assert hf_tok.convert_tokens_to_ids("<image>") == tokenizer.image_id
        text = "USER: <image>\nwhat color is the circle? ASSISTANT: blue</s>"
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert json.loads((folder / "special_tokens_map.json").read_text())["pad_token"] == "<pad>"


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_renders_like_tessera(name: str, tokenizer_file: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(tokenizer_file)
    save_hf_tokenizer(tokenizer, tmp_path, chat_template=chat_template_jinja(name))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    conversations = [
        [Turn("user", "<image>\nwhat is it?")],
        [Turn("system", "Be brief."), Turn("user", "<image>\nq1"), Turn("assistant", "a1"),
         Turn("user", "q2"), Turn("assistant", "a2")],
        [Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "bye")],
    ]
    for turns in conversations:
        messages = [{"role": t.role, "content": t.text} for t in turns]
        rendered = hf_tok.apply_chat_template(messages, tokenize=False)
        assert rendered == render_text(name, turns)
        if turns[-1].role == "user":
            prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert prompt == render_text(name, turns) + TEMPLATES[name].assistant_prefix
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


# ---------------------------------------------------------------- dual encoders


def test_clip_dual_encoder_exports_to_clip_model(tokenizer_file: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(tokenizer_file)
    cfg = DualEncoderConfig(
        vision=CLIP_VIT,
        text=CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, max_position_embeddings=16, eos_token_id=tokenizer.eos_id),
        projection_dim=24,
    )
    model = DualEncoder(cfg)
    randomize_(model, seed=4)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    save(model, tmp_path / "tessera", tokenizer_file, image_size=[IMAGE, IMAGE])
    export_hf(tmp_path / "tessera", tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    texts = [tokenizer.encode(t) + [tokenizer.eos_id] for t in ("what color is the circle?", "a red square")]
    width = max(len(t) for t in texts)
    ids = torch.tensor([t + [tokenizer.pad_id] * (width - len(t)) for t in texts])
    mask = ids != tokenizer.pad_id
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask.long(), pixel_values=pixels)
        image_emb, text_emb = model.encode_image(pixels), model.encode_text(ids, mask)
    assert_close("exported CLIPModel image_embeds", image_emb, reference.image_embeds, HF_TOLERANCE)
    assert_close("exported CLIPModel text_embeds", text_emb, reference.text_embeds, HF_TOLERANCE)
    assert_close("exported CLIPModel logit_scale", hf.logit_scale, model.logit_scale, 0.0)
    assert_close("exported CLIPModel logits_per_image", model.logit_scale.exp() * image_emb @ text_emb.t(),
                 reference.logits_per_image, HF_TOLERANCE)
    image_processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    image = pil_image(seed=6)
    assert_close("exported CLIP image processor",
                 image_processor(images=image, return_tensors="pt")["pixel_values"][0],
                 ImageTransform(size=(IMAGE, IMAGE))(image), 1e-6)


def test_siglip_dual_encoder_exports_to_siglip_model(tmp_path: Path) -> None:
    text = SIGLIP_TEXT.model_copy(update=dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                                              intermediate_size=64, max_position_embeddings=16, head_size=32))
    model = SigLIPDualEncoder(SigLIPDualEncoderConfig(vision=SIGLIP_VIT, text=text))
    randomize_(model, seed=7)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-3.0)
    save(model, tmp_path / "tessera", None)
    export_hf(tmp_path / "tessera", tmp_path / "hf")
    hf = transformers.SiglipModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(8))
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = hf(input_ids=ids, pixel_values=pixels)
        logits = model.pair_logits(model.encode_image(pixels), model.encode_text(ids))
    assert_close("exported SiglipModel logits_per_image", logits, reference.logits_per_image, HF_TOLERANCE)


def test_single_towers_export(tmp_path: Path) -> None:
    vit = VisionTransformer(SIGLIP_VIT)
    randomize_(vit, seed=12)
    save(vit, tmp_path / "vit", None, image_size=[IMAGE, IMAGE])
    export_hf(tmp_path / "vit", tmp_path / "hf-vit")
    hf = transformers.SiglipVisionModel.from_pretrained(tmp_path / "hf-vit", attn_implementation="eager").eval()
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        reference, out = hf(pixel_values=pixels), vit(pixels)
    assert_close("exported SiglipVisionModel pooled", vit.pooled(out), reference.pooler_output, HF_TOLERANCE)

    text = CLIPTextTransformer(CLIPTextConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                                              intermediate_size=64, max_position_embeddings=16, eos_token_id=99))
    randomize_(text, seed=14)
    save(text, tmp_path / "text", None)
    export_hf(tmp_path / "text", tmp_path / "hf-text")
    hf = transformers.CLIPTextModel.from_pretrained(tmp_path / "hf-text", attn_implementation="eager").eval()
    ids = torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(15))
    ids[:, -1] = 99
    with torch.no_grad():
        assert_close("exported CLIPTextModel pooled", text(ids)[1], hf(input_ids=ids).pooler_output, HF_TOLERANCE)


# ---------------------------------------------------------------------- decoders


@pytest.mark.parametrize("overrides,architecture", [
    (dict(tie_word_embeddings=True, rope_linear_scaling=2.0), "LlamaForCausalLM"),
    (dict(attention_bias=True, num_kv_heads=1), "Qwen2ForCausalLM"),
])
def test_decoder_export(overrides: dict, architecture: str, tokenizer_file: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(tokenizer_file)
    model = LlamaDecoder(llm_config(tokenizer.vocab_size, **overrides))
    randomize_(model, seed=10)
    save(model, tmp_path / "tessera", tokenizer_file, template="chatml")
    export_hf(tmp_path / "tessera", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(hf).__name__ == architecture
    ids = torch.randint(0, tokenizer.vocab_size, (2, 12), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert_close(f"exported {architecture} logits", model.logits(model(ids)), hf(input_ids=ids).logits,
                     HF_TOLERANCE)


# ------------------------------------------------------------------ clear failures


def test_exports_transformers_cannot_express_are_refused(tokenizer_file: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(tokenizer_file)
    mixed = CLIP_VIT.model_copy(update=dict(patch_bias=True))
    model = LVLM(LVLMConfig(vision=mixed, llm=llm_config(tokenizer.vocab_size), image_token_id=tokenizer.image_id))
    save(model, tmp_path / "mixed", tokenizer_file, template="vicuna")
    with pytest.raises(ValueError, match="patch_bias"):
        export_hf(tmp_path / "mixed", tmp_path / "hf-mixed")
    assert not (tmp_path / "hf-mixed").exists()  # nothing half-written

    model = LVLM(LVLMConfig(vision=CLIP_VIT, llm=llm_config(tokenizer.vocab_size), image_token_id=tokenizer.image_id))
    save(model, tmp_path / "wide", tokenizer_file, template="vicuna", image_size=[IMAGE, 48])
    with pytest.raises(ValueError, match="image_size"):
        export_hf(tmp_path / "wide", tmp_path / "hf-wide")

    clip = DualEncoder(DualEncoderConfig(vision=CLIP_VIT, text=CLIPTextConfig(eos_token_id=2)))
    save(clip, tmp_path / "clip", None)
    with pytest.raises(ValueError, match="eos_token_id 2"):
        export_hf(tmp_path / "clip", tmp_path / "hf-clip")


def test_cli_export_hf(tokenizer_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tessera.cli import app

    tokenizer = Tokenizer.load(tokenizer_file)
    model = LlamaDecoder(llm_config(tokenizer.vocab_size))
    save(model, tmp_path / "tessera", tokenizer_file)
    runner = CliRunner()
    result = runner.invoke(app, ["export-hf", str(tmp_path / "tessera"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    result = runner.invoke(app, ["export-hf", str(tmp_path / "missing"), str(tmp_path / "hf2")])
    assert result.exit_code == 2 and "checkpoint not found" in result.output
