"""A LLaVA preset trained from imported parts: a random transformers CLIP vision tower and
Qwen2 decoder (tiny, saved with save_pretrained) stand in for the tiny ViT and LM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_interop_import import hf_tokenizer, save_hf
from test_parity_hf import HF_TOLERANCE, assert_close, hf_eager, randomize_
from typer.testing import CliRunner

from tessera.cli import app
from tessera.data.shapes import ShapesConfig, generate_shapes
from tessera.imported_parts import ImportedPartError, import_parts
from tessera.interop import load_hf
from tessera.pipeline import build_lvlm, train_llava
from tessera.presets.llava import get_preset
from tessera.train.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")

QWEN2 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=512)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)



@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("parts")
    vision = hf_eager(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**CLIP_VISION))
    randomize_(vision, seed=1)
    save_hf(vision, root / "clip")
    # Its preprocessing (statistics unlike CLIP's) must reach the data pipeline and the checkpoint.
    (root / "clip" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    # Qwen2-instruct roles and no image placeholder, which the import adds. "qwen2": the
    # embedding has exactly the tokenizer's rows, so it must grow by one; "qwen2_spare": it has
    # spare rows (as the released Qwen2 models do), so the placeholder fits without growth.
    roles = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    hf_tokenizer(root / "qwen2", roles, extra=("<|im_start|>",))
    vocab = len(transformers.AutoTokenizer.from_pretrained(root / "qwen2"))
    qwen = hf_eager(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**QWEN2, vocab_size=vocab))
    randomize_(qwen, seed=2)
    save_hf(qwen, root / "qwen2")
    spare = hf_eager(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**QWEN2, vocab_size=vocab + 8))
    save_hf(spare, root / "qwen2_spare")
    hf_tokenizer(root / "qwen2_spare", roles, extra=("<|im_start|>",))
    data = root / "shapes"
    generate_shapes(ShapesConfig(seed=0, num_train=16, num_val=2, num_test=2, num_test_comp=2, image_size=32), data)
    return {"vision": root / "clip", "language": root / "qwen2", "spare": root / "qwen2_spare", "data": data,
            "hf_lm": qwen, "vocab": vocab}


def chatml_preset():
    return get_preset("llava-1.5-tiny").model_copy(update={"template": "chatml"})


def test_llava_trains_from_imported_clip_and_qwen2(parts: dict, tmp_path: Path) -> None:
    imported = import_parts(chatml_preset(), vision=parts["vision"], language=parts["language"])
    assert imported.skipped_stages == ("clip", "lm")
    assert imported.preset.vision.hidden_size == 32 and imported.preset.llm.num_kv_heads == 1
    vocab = parts["vocab"]
    assert imported.preset.llm.vocab_size == vocab + 1  # grown by the added image placeholder
    assert imported.tokenizer.image_id == vocab
    assert any(f"grows from {vocab} to {vocab + 1}" in n for n in imported.notes)

    out = tmp_path / "run"
    result = train_llava(chatml_preset(), parts["data"], out, stages=["align"], step_scale=0.002, progress=False,
                         vision_from=parts["vision"], language_from=parts["language"])
    assert [r.stage for r in result.stages] == ["align"]
    assert not (out / "clip").exists() and not (out / "lm").exists()
    assert any("stage 'clip' is not run" in n for n in result.notes)
    model = result.model
    reference = load_hf(parts["vision"]).model.state_dict()
    for key, value in model.vision_tower.state_dict().items():  # frozen through the align stage
        assert torch.equal(value, reference[key]), key
    assert model.cfg.llm.hidden_size == 32 and model.cfg.llm.num_heads == 2 and model.cfg.llm.num_kv_heads == 1
    assert model.cfg.llm.attention_bias  # Qwen2's q/k/v biases
    assert model.cfg.image_token_id == result.tokenizer.image_id == vocab

    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.meta["image_size"] == [32, 32] and ckpt.meta["template"] == "chatml"
    assert ckpt.meta["image_mean"] == [0.5] * 3 and ckpt.meta["image_std"] == [0.25] * 3
    assert ckpt.tokenizer_path.is_file()
    for key, value in ckpt.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key

    # Stage instruct continues from align's checkpoint in the same run folder.
    result = train_llava(chatml_preset(), parts["data"], out, stages=["instruct"], step_scale=0.002,
                         progress=False, vision_from=parts["vision"], language_from=parts["language"])
    assert [r.stage for r in result.stages] == ["instruct"]
    assert load_checkpoint(result.checkpoint).model.cfg.llm.vocab_size == vocab + 1


def test_imported_llm_matches_transformers_before_training(parts: dict) -> None:
    imported = import_parts(chatml_preset(), vision=parts["vision"], language=parts["language"])
    model = build_lvlm(imported.preset, imported.tokenizer, vocab_size=imported.preset.llm.vocab_size)
    model.load_pretrained_parts(imported.vision, imported.language)
    vocab = parts["vocab"]
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = parts["hf_lm"](input_ids=ids).logits
        logits = model.language_model.logits(model.language_model(ids))
    assert logits.shape[-1] == vocab + 1  # the grown row for the image placeholder
    assert_close("imported qwen2 in the LVLM", logits[..., :vocab], reference, HF_TOLERANCE)
    for key, value in model.vision_tower.state_dict().items():
        assert torch.equal(value, imported.vision[key]), key


def test_spare_embedding_rows_take_the_placeholder_without_growth(parts: dict) -> None:
    imported = import_parts(chatml_preset(), language=parts["spare"])
    assert imported.preset.llm.vocab_size == parts["vocab"] + 8
    assert imported.tokenizer.image_id == parts["vocab"] < imported.preset.llm.vocab_size
    assert not any("grows" in n for n in imported.notes)
    assert imported.preset.vision == get_preset("llava-1.5-tiny").vision  # no vision part: the preset's ViT


def test_vision_only_keeps_the_presets_tokenizer_and_lm(parts: dict) -> None:
    imported = import_parts(get_preset("llava-1.5-tiny"), vision=parts["vision"])
    assert imported.skipped_stages == ("clip",)
    assert imported.tokenizer is None and imported.language is None
    assert imported.preset.llm == get_preset("llava-1.5-tiny").llm
    assert imported.image_meta["image_size"] == [32, 32]


def test_a_tessera_checkpoint_is_a_source_too(parts: dict, tmp_path: Path) -> None:
    from tessera.interop import import_hf

    import_hf(parts["vision"], tmp_path / "vit")
    imported = import_parts(get_preset("llava-1.5-tiny"), vision=tmp_path / "vit")
    reference = load_hf(parts["vision"]).model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in imported.vision.items())


def test_clear_errors(parts: dict, tmp_path: Path) -> None:
    preset = chatml_preset()
    with pytest.raises(ImportedPartError, match="not a vision tower"):
        import_parts(preset, vision=parts["language"])
    with pytest.raises(ImportedPartError, match="not a decoder LLM"):
        import_parts(preset, language=parts["vision"])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        import_parts(preset, vision=tmp_path / "missing")
    # LLaVA's vicuna template stops at "</s>", which the Qwen2 tokenizer does not have.
    with pytest.raises(ImportedPartError, match="does not fit its tokenizer"):
        import_parts(get_preset("llava-1.5-tiny"), language=parts["language"])
    with pytest.raises(ValueError, match="come from imported parts"):
        train_llava(preset, parts["data"], tmp_path / "run", stages=["clip", "align"], progress=False,
                    vision_from=parts["vision"])


def test_cli_train_from_imported_parts(parts: dict, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "train", "--data", str(parts["data"]), "--out", str(tmp_path / "run"), "--stage", "align",
        "--step-scale", "0.002", "--vision-from", str(parts["vision"]), "--language-from", str(parts["language"]),
        "--template", "chatml"])
    assert result.exit_code == 0, result.output
    assert "stage 'lm' is not run" in result.output and "checkpoint:" in result.output
    bad = CliRunner().invoke(app, ["train", "--data", str(parts["data"]), "--out", str(tmp_path / "bad"),
                                   "--vision-from", str(parts["language"])])
    assert bad.exit_code != 0 and "not a vision tower" in bad.output
