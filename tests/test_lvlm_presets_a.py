"""MiniGPT-v2, Qwen-VL and InternVL presets: their templates (task identifiers, image
markers), placeholder/image count errors, preset validation, the visual token count and
trainable parameters of each stage, and a tiny run of each preset that learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tessera.data.boxes import parse_box
from tessera.data.datasets import ConversationDataset, ImageCache
from tessera.data.images import ImageTransform
from tessera.data.readers import read_llava, shapes_split_paths
from tessera.data.records import SkipStats, Turn
from tessera.data.shapes import ShapesConfig, generate_shapes
from tessera.data.shapes_reading import generate_reading_tasks
from tessera.data.templates import (
    IGNORE_INDEX,
    TemplateError,
    encode_conversation,
    encode_prompt,
    render_text,
    with_task,
)
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.nn.lora import lora_modules
from tessera.pipeline import (
    PipelineResult,
    build_lvlm,
    read_stage_conversations,
    stage_template,
    train_lvlm,
)
from tessera.presets import internvl, minigpt_v2, qwen_vl
from tessera.presets.base import PRETRAIN_STAGES, LVLMPreset
from tessera.presets.llava import get_preset
from tessera.text.clip_text import CLIPTextConfig
from tessera.text.llama import LlamaConfig
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.train.checkpoint import load_checkpoint
from tessera.train.freeze import set_trainable
from tessera.train.tasks import ConversationTask
from tessera.vision.vit import ViTConfig

PRESETS = {"minigpt-v2": minigpt_v2.tiny, "qwen-vl": qwen_vl.tiny, "internvl": internvl.tiny}
TURNS = (Turn("user", "<image>\nwhat colour is the circle?"), Turn("assistant", "red"))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(["what colour is the circle? red blue a square"] * 20, vocab_size=320)


# --- templates -------------------------------------------------------------------------------

def test_minigpt_v2_task_identifier_follows_the_image() -> None:
    vqa = with_task("minigpt_v2", "vqa")
    assert render_text(vqa, TURNS) == "<s>[INST] <Img><image></Img> [vqa] what colour is the circle? [/INST] red </s>"
    # no image: the identifier opens the message; no task: the plain LLaMA-2 layout
    assert render_text(with_task("minigpt_v2", "caption"), (Turn("user", "hi"), Turn("assistant", "a"))) == (
        "<s>[INST] [caption] hi [/INST] a </s>")
    assert "[vqa]" not in render_text("minigpt_v2", TURNS)
    # only the first user message carries the identifier
    multi = (*TURNS, Turn("user", "and the square?"), Turn("assistant", "blue"))
    assert render_text(vqa, multi).count("[vqa]") == 1
    with pytest.raises(ValueError, match="not one of its task identifiers"):
        with_task("minigpt_v2", "ocr")
    with pytest.raises(ValueError, match="not one of its task identifiers"):
        with_task("vicuna", "vqa")


@pytest.mark.parametrize(("name", "prefix", "suffix"), [("qwen_vl", "<img>", "</img>"), ("minigpt_v2", "<Img>", "</Img>")])
def test_image_markers_wrap_every_run_unlabelled(tokenizer: Tokenizer, name: str, prefix: str, suffix: str) -> None:
    turns = (Turn("user", "<image> and <image>\nsame?"), Turn("assistant", "red"))
    enc = encode_conversation(tokenizer, name, turns, image_token_counts=[3, 2])
    text = tokenizer.decode(enc.input_ids, skip_special=False)
    assert f"{prefix}{'<image>' * 3}{suffix} and {prefix}{'<image>' * 2}{suffix}" in text
    image = tokenizer.image_id
    first = enc.input_ids.index(image)
    before = tokenizer.encode(prefix)
    assert enc.input_ids[first - len(before) : first] == before
    assert enc.input_ids[first + 3 : first + 3 + len(tokenizer.encode(suffix))] == tokenizer.encode(suffix)
    labelled = [label for label in enc.labels if label != IGNORE_INDEX]
    expected = {"qwen_vl": "red<|im_end|>", "minigpt_v2": " red </s>"}[name]  # separator, answer, stop
    assert tokenizer.decode(labelled, skip_special=False) == expected
    prompt = encode_prompt(tokenizer, name, turns[:1], [3, 2])
    assert enc.input_ids[: len(prompt)] == prompt


def test_placeholder_and_image_counts_must_agree(tokenizer: Tokenizer) -> None:
    turns = (Turn("user", "<image> <image>\nq"), Turn("assistant", "a"))
    with pytest.raises(TemplateError, match=r"2 <image> placeholder\(s\) but 1 image token count"):
        encode_conversation(tokenizer, "qwen_vl", turns, image_token_counts=[4])
    with pytest.raises(TemplateError, match=r"1 <image> placeholder\(s\) but 2 image token count"):
        encode_conversation(tokenizer, "qwen_vl", TURNS, image_token_counts=[4, 4])


def test_lvlm_refuses_placeholders_that_do_not_match_the_images() -> None:
    vit = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    llm = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    model = LVLM(LVLMConfig(vision=vit, llm=llm, connector=minigpt_v2.CONCAT4, image_token_id=4))
    n = model.num_image_tokens(32, 32)
    image = torch.randn(3, 32, 32)
    ids_two = torch.tensor([[1, *[4] * n, 7, *[4] * n]])
    with pytest.raises(ValueError, match="more image-token slots than the images fill"):
        model(ids_two, [image])  # two placeholders, one image
    with pytest.raises(ValueError, match="fewer image-token slots than the images fill"):
        model(torch.tensor([[1, *[4] * n]]), [image, image])  # one placeholder, two images
    with pytest.raises(ValueError, match="no image was given"):
        model(ids_two, [])


# --- presets ---------------------------------------------------------------------------------

def test_preset_validation() -> None:
    base = qwen_vl.tiny()
    with pytest.raises(ValueError, match="not a task identifier of template 'qwen_vl'"):
        LVLMPreset.parse({**base.model_dump(), "task_by_data": {"llava_instruct": "vqa"}})
    with pytest.raises(ValueError, match="unique"):
        LVLMPreset.parse({**base.model_dump(), "stages": [base.stages[0].model_dump()] * 2})
    with pytest.raises(ValueError, match="unique and not"):
        LVLMPreset.parse({**base.model_dump(), "stages": [{**base.stages[0].model_dump(), "name": "clip"}]})
    with pytest.raises(ValueError, match="multiple of the patch size"):
        LVLMPreset.parse({**internvl.tiny().model_dump(), "input_image_size": 100})


def test_visual_tokens_and_trainable_parameters_per_stage(tokenizer: Tokenizer) -> None:
    expected_tokens = {"minigpt-v2": 16, "qwen-vl": 16, "internvl": 80}
    llava = build_lvlm(get_preset("llava-1.5-tiny"), tokenizer)
    assert llava.num_image_tokens(64, 64) == 64
    for name, make in PRESETS.items():
        preset = make()
        model = build_lvlm(preset, tokenizer)
        assert model.num_image_tokens(preset.image_size, preset.image_size) == expected_tokens[name]
        conn = sum(p.numel() for p in model.connector.parameters())
        llm = sum(p.numel() for p in model.language_model.parameters())
        counts = [set_trainable(model, s.trainable).trainable for s in preset.stages]
        if name == "qwen-vl":
            assert counts == [conn, conn + llm, conn + llm]  # the tiny ViT stays frozen (preset comments)
        if name == "internvl":
            assert counts == [conn, conn + llm]
        if name == "minigpt-v2":
            # the LLM's chat preparation alone, then the linear layer plus LoRA (which the trainer
            # adds, tiny run test) with the LLM frozen under the adapters
            assert counts == [llm] + [conn] * 3
            assert preset.stages[0].lora is None and all(s.lora == minigpt_v2.LORA for s in preset.stages[1:])


@pytest.fixture(scope="module")
def reading_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qwen_reading_shapes")
    generate_shapes(ShapesConfig(seed=3, num_train=20, num_val=2, num_test=4, num_test_comp=4), root, progress=False)
    generate_reading_tasks(root, progress=False)
    return root


def test_qwen_vl_trains_on_grounding_up_to_the_stage_the_zoo_scores(reading_shapes: Path) -> None:
    # The zoo scores grounding (rec_qwen) on the weights of the LAST stage. With instructions
    # alone in "sft", the model forgot the box format learnt in "multitask" and answered with
    # collapsed boxes such as <box>(343,434),(343,434)</box>: grounding_mean_iou 0.000.
    preset = qwen_vl.tiny()
    paths = shapes_split_paths(reading_shapes, "train")
    first_with_boxes = None
    for index, stage in enumerate(preset.stages):
        convs = read_stage_conversations(paths, stage.data, reading_shapes, SkipStats())
        with_boxes = [c for c in convs if parse_box(c.turns[-1].text, "qwen") is not None]
        if first_with_boxes is None and with_boxes:
            first_with_boxes = index
        if first_with_boxes is not None:
            assert with_boxes, f"stage {stage.name!r} drops the grounding data of stage {preset.stages[first_with_boxes].name!r}"
    assert first_with_boxes == 1  # the multi-task stage, as in Qwen-VL


def test_paper_dimensions_give_the_published_token_counts() -> None:
    from tessera.connectors.registry import build_connector

    for module, tokens in ((minigpt_v2, 256), (qwen_vl, 256), (internvl, 256)):
        paper = module.paper()
        grid = paper["vision"].grid  # 448 px / 14 = 32 patches a side
        assert grid == 32
        # the count is arithmetic on the grid: tiny widths build the same connector kind quickly
        assert build_connector(paper["connector"], 8, 64).num_output_tokens(grid, grid) == tokens
    assert minigpt_v2.paper()["lora"].rank == 64 and minigpt_v2.paper()["lora"].targets == ["q_proj", "v_proj"]
    assert [s.lr for s in qwen_vl.paper()["stages"]] == [2e-4, 5e-5, 1e-5]


def test_tiny_presets_share_one_pretraining() -> None:
    from tessera.presets.base import from_llava
    from tessera.presets.lvlm_runner import pretrain_key

    data = Path("data")
    keys = {pretrain_key(make(), data, 0, 1.0) for make in PRESETS.values()}
    keys.add(pretrain_key(from_llava(get_preset("llava-1.5-tiny")), data, 0, 1.0))
    assert len(keys) == 1  # same towers, tokenizer and pretraining stages
    preset = qwen_vl.tiny()
    longer = preset.model_copy(update={"clip_stage": preset.clip_stage.model_copy(update={"steps": 601})})
    assert pretrain_key(longer, data, 0, 1.0) not in keys
    assert pretrain_key(preset, data, 1, 1.0) not in keys and pretrain_key(preset, data, 0, 0.5) not in keys


# --- tiny runs that learn ----------------------------------------------------------------------

SMALL_TOWERS = {
    "vision": ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "text_tower": CLIPTextConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=64),
    "clip_projection_dim": 32,
    "llm": LlamaConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                       max_position_embeddings=512),
    "tokenizer_vocab_size": 400,
}
STEPS = 24
# Answer loss after the preset's stages relative to before them (measured: MiniGPT-v2 0.83, Qwen-VL
# 0.57, InternVL 0.63). MiniGPT-v2 trains only its linear layer and rank-64 LoRA on q and v, so its
# LLM moves least in 3 × 24 steps.
LEARNS = {"minigpt-v2": 0.9, "qwen-vl": 0.7, "internvl": 0.75}


def shrink(preset: LVLMPreset) -> LVLMPreset:
    """The preset's recipe (connector, template, stages, trainables, LoRA) on smaller towers."""
    update = {
        **SMALL_TOWERS,
        "clip_stage": preset.clip_stage.model_copy(update={"steps": 10, "batch_size": 32, "warmup_steps": 0}),
        "lm_stage": preset.lm_stage.model_copy(update={"steps": 60, "batch_size": 32, "warmup_steps": 5}),
        "stages": [s.model_copy(update={"steps": STEPS, "batch_size": 8, "warmup_steps": 2, "log_every": 1})
                   for s in preset.stages],
    }
    if preset.tiling is not None:
        update["input_image_size"] = 64  # 2x2 tiles of 32 + a thumbnail
    if preset.connector.kind == "resampler":
        update["connector"] = preset.connector.model_copy(update={"num_queries": 4, "num_heads": 2})
    return LVLMPreset.parse({**preset.model_dump(), **{k: v.model_dump() if hasattr(v, "model_dump") else v
                                                        for k, v in update.items()}})


@pytest.fixture(scope="module")
def pretrained(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pretrain")
    train_lvlm(shrink(qwen_vl.tiny()), tiny_shapes, folder, stages=PRETRAIN_STAGES, progress=False)
    return folder


def run_preset(name: str, data: Path, pretrained: Path, out: Path) -> tuple[LVLMPreset, PipelineResult]:
    preset = shrink(PRESETS[name]())
    result = train_lvlm(preset, data, out, stages=[s.name for s in preset.stages], pretrained=pretrained,
                        progress=False)
    return preset, result


def vqa_loss(model: LVLM, preset: LVLMPreset, tokenizer: Tokenizer, data: Path, count: int = 48) -> float:
    """Answer loss on a fixed set of training VQA conversations, in the preset's VQA template."""
    convs, _ = read_llava(shapes_split_paths(data, "train")["llava_instruct"], data)
    images = ImageCache(ImageTransform(size=(preset.image_size, preset.image_size)), SkipStats())
    dataset = ConversationDataset(convs[:count], tokenizer, stage_template(preset, "llava_instruct"), images,
                                  model.num_image_tokens, 512)
    task = ConversationTask(dataset, packing=False)
    model.eval()
    with torch.no_grad():
        loss, _ = task.loss(model, task.make_batch(list(range(count))))
    return float(loss)


def pretrained_only(preset: LVLMPreset, tokenizer: Tokenizer, pretrained: Path) -> LVLM:
    """The LVLM as its first stage starts: pretrained ViT and LLM, fresh connector."""
    model = build_lvlm(preset, tokenizer)
    model.vision_tower.load_state_dict(load_checkpoint(pretrained / "clip" / "final").model.vision_model.state_dict())
    model.language_model.load_state_dict(load_checkpoint(pretrained / "lm" / "final").model.state_dict())
    return model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tiny_run_learns(name: str, tiny_shapes: Path, pretrained: Path, tmp_path: Path) -> None:
    preset, result = run_preset(name, tiny_shapes, pretrained, tmp_path)
    assert [r.stage for r in result.stages] == [s.name for s in preset.stages]
    for stage in result.stages:
        losses = [h["loss"] for h in stage.history]
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    before = vqa_loss(pretrained_only(preset, result.tokenizer, pretrained), preset, result.tokenizer, tiny_shapes)
    after = vqa_loss(result.model, preset, result.tokenizer, tiny_shapes)
    assert after < LEARNS[name] * before, f"{name}: VQA answer loss {before:.3f} → {after:.3f}"
    final = result.checkpoint
    assert final is not None and (final / "model.safetensors").is_file()
    if name == "minigpt-v2":
        # LoRA rank 64 on every q and v of the LLM, trained with the linear layer in every stage
        adapted = lora_modules(result.model)
        assert sorted(adapted) == sorted(f"language_model.layers.{i}.self_attn.{p}"
                                         for i in range(2) for p in ("q_proj", "v_proj"))
        lora_params = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in adapted.values())
        conn = sum(p.numel() for p in result.model.connector.parameters())
        llm = sum(p.numel() for n, p in result.model.language_model.named_parameters() if "lora_" not in n)
        assert [r.trainable.trainable for r in result.stages] == [llm] + [conn + lora_params] * 3
        assert all(m.lora_B.weight.abs().sum() > 0 for m in adapted.values())  # the adapters moved
        # rerunning only the last stage starts from the previous stage's checkpoint, adapters included
        last = preset.stages[-1].model_copy(update={"steps": 2, "warmup_steps": 0})
        rerun = train_lvlm(preset.model_copy(update={"stages": [*preset.stages[:-1], last]}), tiny_shapes, tmp_path,
                           stages=[last.name], pretrained=pretrained, progress=False)
        stage2 = load_checkpoint(tmp_path / "lvlm" / preset.stages[-2].name / "final").model
        assert sorted(lora_modules(rerun.model)) == sorted(adapted)
        assert lora_modules(stage2)  # the checkpoint re-applies its adapters
