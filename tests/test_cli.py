"""The `tessera` command line through typer's CliRunner: help, `data shapes`, and clear errors
(exit code 2, a message naming the bad field or file) from `data`, `train`, `eval` and `chat`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner, Result

from tessera.cli import app
from tessera.data.readers import load_meta
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.text.llama import LlamaConfig, LlamaDecoder
from tessera.text.tokenizer import train_bpe
from tessera.train.checkpoint import save_checkpoint
from tessera.vision.vit import ViTConfig

IMAGE_SIZE = 16
SHAPES_COUNTS = ["--num-train", "10", "--num-val", "2", "--num-test", "2", "--num-test-comp", "2"]


def invoke(*args: str | Path, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin)


def assert_fails_with(result: Result, *fragments: str) -> None:
    """Exit code 2, an "error:" line and every fragment in the output, and no traceback."""
    assert result.exit_code == 2, result.output
    assert "error:" in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny untrained LVLM checkpoint (16×16 images, vicuna template, tokenizer included),
    the same without its tokenizer, and a checkpoint of a plain language model."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = train_bpe(["what color is the circle?", "red", "how many shapes are there?", "2"] * 4,
                          vocab_size=300)
    tokenizer_file = tokenizer.save(root / "tokenizer")
    torch.manual_seed(0)
    llm = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    vision = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=64)
    lvlm = LVLM(LVLMConfig(vision=vision, llm=llm, image_token_id=tokenizer.image_id))
    meta = {"template": "vicuna", "image_size": [IMAGE_SIZE, IMAGE_SIZE]}
    return {
        "lvlm": save_checkpoint(root / "lvlm", lvlm, meta=meta, tokenizer_file=tokenizer_file),
        "lvlm_without_tokenizer": save_checkpoint(root / "no-tokenizer", lvlm, meta=meta),
        "language_model": save_checkpoint(root / "lm", LlamaDecoder(llm), meta=meta, tokenizer_file=tokenizer_file),
    }


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-shapes") / "shapes"
    result = invoke("data", "shapes", "--out", out, "--image-size", "32", *SHAPES_COUNTS)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "circle.png"
    Image.new("RGB", (40, 32), (220, 40, 40)).save(path)
    return path


# --- help and data ----------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in ("data", "train", "eval", "chat", "quickstart"):
        assert command in result.output
    data_help = invoke("data", "--help")
    assert data_help.exit_code == 0 and "shapes" in data_help.output


def test_data_shapes_writes_a_shapes_world_folder(shapes_dir: Path) -> None:
    meta = load_meta(shapes_dir)
    assert {split: counts["images"] for split, counts in meta["splits"].items()} == {
        "train": 10, "val": 2, "test": 2, "test_comp": 2}
    assert (shapes_dir / "train" / "llava_instruct.json").is_file()


def test_data_shapes_reports_where_it_wrote(tmp_path: Path) -> None:
    result = invoke("data", "shapes", "--out", tmp_path / "ds", "--image-size", "32", *SHAPES_COUNTS)
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "ds") in result.output and "train: 10 images" in result.output


@pytest.mark.parametrize(("option", "value", "field"), [
    ("--max-objects", "0", "max_objects"),
    ("--aspect-ratio", "-1", "aspect_ratio"),
    ("--image-size", "8", "image_size"),
    ("--num-train", "-5", "num_train"),
])
def test_data_shapes_rejects_a_bad_value_naming_the_field(tmp_path: Path, option: str, value: str, field: str) -> None:
    out = tmp_path / "ds"
    result = invoke("data", "shapes", "--out", out, *SHAPES_COUNTS, option, value)
    assert_fails_with(result, field)
    assert not (out / "meta.json").exists()


def test_data_shapes_rejects_min_objects_above_max_objects(tmp_path: Path) -> None:
    result = invoke("data", "shapes", "--out", tmp_path / "ds", "--min-objects", "4", "--max-objects", "2",
                    *SHAPES_COUNTS)
    assert_fails_with(result, "min_objects", "max_objects")


# --- chat -------------------------------------------------------------------------------------


def test_chat_answers_with_a_checkpoint_and_an_image(checkpoints: dict[str, Path], image: Path) -> None:
    result = invoke("chat", checkpoints["lvlm"], "--image", image, "--max-new-tokens", "4",
                    "what color is the circle?")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_chat_interactive_answers_each_line_until_an_empty_one(checkpoints: dict[str, Path], image: Path) -> None:
    result = invoke("chat", checkpoints["lvlm"], "--image", image, "--max-new-tokens", "3",
                    stdin="what color is the circle?\nhow many shapes are there?\n\nnot read\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("tessera>") == 2


def test_chat_on_a_missing_checkpoint_exits_2(tmp_path: Path, image: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    assert_fails_with(invoke("chat", missing, "--image", image, "hi"), "checkpoint not found", str(missing))


def test_chat_with_an_unreadable_image_names_the_file(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(bytes(torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(0)).tolist()))
    result = invoke("chat", checkpoints["lvlm"], "--image", corrupt, "what is this?")
    assert_fails_with(result, "cannot load image", str(corrupt))


def test_chat_with_a_missing_image_names_the_file(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.png"
    assert_fails_with(invoke("chat", checkpoints["lvlm"], "--image", missing, "hi"), str(missing), "file not found")


def test_chat_needs_an_lvlm_checkpoint_with_its_tokenizer(checkpoints: dict[str, Path], image: Path) -> None:
    assert_fails_with(invoke("chat", checkpoints["language_model"], "--image", image, "hi"),
                      "chat needs an LVLM checkpoint")
    assert_fails_with(invoke("chat", checkpoints["lvlm_without_tokenizer"], "--image", image, "hi"),
                      "tokenizer.json is missing")


def test_chat_rejects_bad_generation_settings(checkpoints: dict[str, Path], image: Path) -> None:
    assert_fails_with(invoke("chat", checkpoints["lvlm"], "--image", image, "--top-p", "0", "hi"), "top_p")


# --- eval -------------------------------------------------------------------------------------


def test_eval_scores_an_lvlm_checkpoint_and_writes_json(
    checkpoints: dict[str, Path], shapes_dir: Path, tmp_path: Path,
) -> None:
    out = tmp_path / "scores.json"
    threads = torch.get_num_threads()
    try:
        result = invoke("eval", checkpoints["lvlm"], "--data", shapes_dir, "--limit", "3", "--out", out,
                        "--threads", "1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert invoke("eval", checkpoints["lvlm"], "--data", shapes_dir, "--threads", "0").exit_code == 2
    assert "in-distribution" in result.output and "compositional" in result.output
    scores = json.loads(out.read_text())
    assert set(scores["vqa"]) == {"in-distribution", "compositional"}
    assert all(0.0 <= split["accuracy"] <= 1.0 for split in scores["vqa"].values())


def test_eval_scores_a_reading_task_beside_its_baseline(
    checkpoints: dict[str, Path], tmp_path: Path,
) -> None:
    data = tmp_path / "shapes"
    assert invoke("data", "shapes", "--out", data, "--image-size", "32", *SHAPES_COUNTS).exit_code == 0
    made = invoke("data", "reading", "--root", data, "--text-images-per-image", "0", "--charts-per-image", "0",
                  "--pretrain-texts-per-image", "0")
    assert made.exit_code == 0, made.output
    out = tmp_path / "rec.json"
    result = invoke("eval", checkpoints["lvlm"], "--data", data, "--task", "rec_qwen", "--limit", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "grounding_acc50 (baseline)" in result.output
    scores = json.loads(out.read_text())
    assert scores["task"] == "rec_qwen"
    assert set(scores["results"]) == {"in-distribution", "compositional"}
    for split in scores["results"].values():
        assert split["task"] == "rec" and split["count"] == 2
        assert set(split["scores"]) == set(split["baseline"]) >= {"grounding_acc50", "grounding_mean_iou"}


def test_eval_names_the_allowed_reading_tasks(checkpoints: dict[str, Path], shapes_dir: Path) -> None:
    result = invoke("eval", checkpoints["lvlm"], "--data", shapes_dir, "--task", "captions")
    assert_fails_with(result, "unknown reading task 'captions'", "rec_qwen", "ocr")
    result = invoke("eval", checkpoints["lvlm"], "--data", shapes_dir, "--task", "ocr")
    assert_fails_with(result, "ocr.json not found", "tessera data reading")


def test_eval_on_a_missing_checkpoint_exits_2(tmp_path: Path, shapes_dir: Path) -> None:
    missing = tmp_path / "missing"
    assert_fails_with(invoke("eval", missing, "--data", shapes_dir), "checkpoint not found", str(missing))


def test_eval_on_a_non_lvlm_checkpoint_exits_2(checkpoints: dict[str, Path], shapes_dir: Path) -> None:
    result = invoke("eval", checkpoints["language_model"], "--data", shapes_dir)
    assert_fails_with(result, "VQA needs an LVLM checkpoint", "llama")


def test_eval_on_a_folder_that_is_not_shapes_world_exits_2(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    assert_fails_with(invoke("eval", checkpoints["lvlm"], "--data", tmp_path), "not found")


# --- train and quickstart ---------------------------------------------------------------------


def test_train_resume_needs_exactly_one_stage(tmp_path: Path, shapes_dir: Path) -> None:
    result = invoke("train", "--data", shapes_dir, "--out", tmp_path / "run", "--resume", tmp_path / "step")
    assert_fails_with(result, "--resume needs exactly one --stage")


def test_train_rejects_unknown_stages_and_presets(tmp_path: Path, shapes_dir: Path) -> None:
    result = invoke("train", "--data", shapes_dir, "--out", tmp_path / "run", "--stage", "finetune")
    assert_fails_with(result, "unknown stages", "finetune")
    result = invoke("train", "--data", shapes_dir, "--out", tmp_path / "run", "--preset", "llava-huge")
    assert_fails_with(result, "unknown preset", "llava-huge")


def test_train_on_a_missing_data_folder_exits_2(tmp_path: Path) -> None:
    result = invoke("train", "--data", tmp_path / "no-data", "--out", tmp_path / "run")
    assert_fails_with(result, str(tmp_path / "no-data"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_train_and_zoo_on_a_missing_gpu_exit_2_naming_the_device(tmp_path: Path, shapes_dir: Path) -> None:
    result = invoke("train", "--data", shapes_dir, "--out", tmp_path / "run", "--device", "cuda")
    assert_fails_with(result, "device 'cuda'", "no CUDA GPU")
    assert_fails_with(invoke("zoo", "--out", tmp_path / "zoo", "--only", "clip", "--device", "cuda:0"), "no CUDA GPU")
    assert not (tmp_path / "run").exists() and not (tmp_path / "zoo").exists()  # nothing started


def test_quickstart_rejects_an_unknown_preset(tmp_path: Path) -> None:
    assert_fails_with(invoke("quickstart", "--out", tmp_path / "qs", "--preset", "llava-huge"), "unknown preset")


def test_train_clip_stage_with_hard_negatives(tmp_path: Path, shapes_dir: Path) -> None:
    result = invoke("train", "--data", shapes_dir, "--out", tmp_path / "run", "--stage", "clip",
                    "--clip-hard-negatives", "--clip-count", "0.5", "--step-scale", "0.005")
    assert result.exit_code == 0, result.output
    assert "clip: 3 steps" in result.output
    state = torch.load(tmp_path / "run" / "clip" / "final" / "trainer_state.pt", weights_only=False)
    assert state["stage_config"]["objectives"]["count"] == 0.5  # the count objective joined the stage
    assert (tmp_path / "run" / "clip" / "final" / "model.safetensors").is_file()


def test_the_tiny_vit_exports_only_with_clips_patch_embedding(tmp_path: Path, shapes_dir: Path) -> None:
    """The tiny presets' ViT reads through a conv stem that CLIP lacks: export-hf refuses it by name, and
    `--vit-patch-embed patch` trains the exportable one."""
    for embed in ("conv_stem", "patch"):
        result = invoke("train", "--data", shapes_dir, "--out", tmp_path / embed, "--stage", "clip",
                        "--vit-patch-embed", embed, "--step-scale", "0.005")
        assert result.exit_code == 0, result.output
    refused = invoke("export-hf", tmp_path / "conv_stem" / "clip" / "final", tmp_path / "hf-stem")
    assert_fails_with(refused, "patch_embed='conv_stem'", "--vit-patch-embed patch")
    exported = invoke("export-hf", tmp_path / "patch" / "clip" / "final", tmp_path / "hf-patch")
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "hf-patch" / "config.json").is_file()
    bad = invoke("train", "--data", shapes_dir, "--out", tmp_path / "bad", "--vit-patch-embed", "conv")
    assert_fails_with(bad, "patch_embed")


# --- eval of a fusion checkpoint ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny untrained ViLT checkpoint (tokenizer and pixel statistics included) and a
    ShapesWorld folder with the classic tasks."""
    from tessera.models.vilt import ViLT, ViltConfig
    from tessera.presets.vilt import tokenizer_fields
    from tessera.train.fusion_tasks import train_fusion_tokenizer

    root = tmp_path_factory.mktemp("cli-fusion")
    shapes = root / "shapes"
    assert invoke("data", "shapes", "--out", shapes, "--image-size", "32", *SHAPES_COUNTS).exit_code == 0
    assert invoke("data", "tasks", "--root", shapes).exit_code == 0
    tokenizer = train_fusion_tokenizer(shapes, vocab_size=300)
    torch.manual_seed(0)
    model = ViLT(ViltConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, image_size=32,
                            patch_size=16, max_position_embeddings=40, **tokenizer_fields(tokenizer)))
    meta = {"image_size": [32, 32], "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    return save_checkpoint(root / "vilt", model, meta=meta, tokenizer_file=tokenizer.save(root / "tokenizer")), shapes


def test_eval_fine_tunes_a_fusion_checkpoint_and_reasoning_brings_its_vqa_start(
        fusion_run: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, shapes = fusion_run
    out = tmp_path / "scores.json"
    result = invoke("eval", checkpoint, "--data", shapes, "--task", "reasoning", "--finetune-steps", "2",
                    "--out", out, "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "reasoning_accuracy (baseline)" in result.output and "vqa_accuracy (baseline)" in result.output
    scores = json.loads(out.read_text())
    assert scores["tasks"] == ["vqa", "reasoning"]
    assert scores["notes"]["reasoning_starts_from"] == "the vqa fine-tune's backbone"
    for label in ("in-distribution", "compositional"):
        assert 0.0 <= scores["metrics"][label]["reasoning_accuracy"] <= 1.0
        assert scores["baselines"][label]["reasoning_accuracy"] == pytest.approx(0.5)  # each sentence true once, false once


def test_eval_names_the_tasks_of_a_fusion_checkpoint(fusion_run: tuple[Path, Path]) -> None:
    checkpoint, shapes = fusion_run
    assert_fails_with(invoke("eval", checkpoint, "--data", shapes, "--task", "ocr"),
                      "vilt checkpoint is a fusion model", "'reasoning'", "'ocr'")
