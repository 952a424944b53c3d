"""The quickstart end to end on CPU: make ShapesWorld, train every stage (shortened), evaluate,
write results.json; the run measurably learns, and `tessera chat` answers with its checkpoint.

Training happens once per module (about a minute on one core). The instruct stage is logged
at every step, so that its history shows the loss at the start and at the end of the stage;
logging changes nothing else in training.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import tessera.quickstart as quickstart_module
from tessera.cli import app
from tessera.data.datasets import ImageCache
from tessera.data.images import ImageTransform
from tessera.data.readers import read_llava, read_vqa, shapes_split_paths
from tessera.data.records import SkipStats, Turn, VQAItem
from tessera.eval.vqa_eval import predict_vqa
from tessera.infer.chat import ChatSession
from tessera.models.lvlm import LVLM
from tessera.pipeline import STAGES, PipelineResult, scaled, train_llava
from tessera.presets.llava import LLaVAPreset, get_preset
from tessera.quickstart import run_quickstart
from tessera.train.checkpoint import load_checkpoint

PRESET = "llava-1.5-tiny"
NUM_TRAIN = 200
STEP_SCALE = 0.04  # instruct: 40 steps of 16 images; every stage about a minute in all
EVAL_LIMIT = 40
SEED = 0
CHAT_QUESTION = "how many shapes are there?"

pytestmark = pytest.mark.slow


@dataclass
class QuickstartRun:
    out: Path
    results: dict[str, Any]  # what run_quickstart returned
    pipeline: PipelineResult  # what train_llava returned inside it
    seconds: float

    @property
    def data_dir(self) -> Path:
        return self.out / "data"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> QuickstartRun:
    out = tmp_path_factory.mktemp("quickstart")
    pipelines: list[PipelineResult] = []

    def train_and_keep_result(preset: LLaVAPreset, *args: Any, **kwargs: Any) -> PipelineResult:
        instruct = preset.instruct_stage.model_copy(update={"log_every": 1})
        result = train_llava(preset.model_copy(update={"instruct_stage": instruct}), *args, **kwargs)
        pipelines.append(result)
        return result

    torch.manual_seed(SEED)  # the models are built from the caller's RNG before each stage seeds it
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quickstart_module, "train_llava", train_and_keep_result)
        results = run_quickstart(out, PRESET, num_train=NUM_TRAIN, seed=SEED, step_scale=STEP_SCALE,
                                 eval_limit=EVAL_LIMIT, progress=False)
    seconds = time.perf_counter() - start
    assert len(pipelines) == 1, "run_quickstart no longer trains through tessera.pipeline.train_llava"
    return QuickstartRun(out=out, results=results, pipeline=pipelines[0], seconds=seconds)


def eval_items(data_dir: Path) -> list[VQAItem]:
    """The questions the quickstart scored: the first EVAL_LIMIT of each test split."""
    items: list[VQAItem] = []
    for split in ("test", "test_comp"):
        paths = shapes_split_paths(data_dir, split)
        split_items, _ = read_vqa(paths["vqa_questions"], paths["vqa_annotations"], data_dir)
        items += split_items[:EVAL_LIMIT]
    return items


def training_answers(data_dir: Path) -> set[str]:
    conversations, _ = read_llava(shapes_split_paths(data_dir, "train")["llava_instruct"], data_dir)
    return {turn.text for conv in conversations for turn in conv.turns if turn.role == "assistant"}


def test_results_json_has_accuracies_timings_and_every_stage(run: QuickstartRun) -> None:
    saved = json.loads((run.out / "results.json").read_text())
    assert saved == json.loads(json.dumps(run.results))
    for key in ("vqa_accuracy_in_distribution", "vqa_accuracy_compositional"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["vqa_accuracy_in_distribution"] == saved["vqa"]["in-distribution"]["accuracy"]
    assert saved["vqa_accuracy_compositional"] == saved["vqa"]["compositional"]["accuracy"]
    for scores in saved["vqa"].values():
        assert scores["count"] == EVAL_LIMIT and scores["missing"] == 0

    preset = get_preset(PRESET)
    stage_configs = [preset.clip_stage, preset.lm_stage, preset.align_stage, preset.instruct_stage]
    assert [s["stage"] for s in saved["stages"]] == list(STAGES)
    assert [s["steps"] for s in saved["stages"]] == [scaled(c, STEP_SCALE, SEED).steps for c in stage_configs]
    assert all(math.isfinite(s["final_loss"]) and s["trainable_params"] > 0 for s in saved["stages"])

    assert set(saved["seconds_by_step"]) == {"data", "eval", *(f"train {stage}" for stage in STAGES)}
    assert 0 < sum(saved["seconds_by_step"].values()) <= saved["wall_seconds"] <= run.seconds
    assert saved["skipped"] == {}  # generated data is clean
    checkpoint = Path(saved["checkpoint"])
    assert checkpoint == run.out / "llava" / "instruct" / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}


def test_instruct_stage_loss_falls_by_more_than_half(run: QuickstartRun) -> None:
    instruct = run.pipeline.stages[-1]
    assert instruct.stage == "instruct"
    losses = [row["loss"] for row in instruct.history]
    assert [row["step"] for row in instruct.history] == list(range(1, instruct.steps + 1))
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.5 * start, (start, end)


def share_of_answers_in(vocabulary: set[str], model: LVLM, run: QuickstartRun) -> tuple[float, list[str]]:
    """The share of held-out questions answered with an answer of the training set, and the
    answers that were not."""
    items = eval_items(run.data_dir)
    images = ImageCache(ImageTransform(size=(model.cfg.vision.image_size,) * 2), SkipStats())
    predictions = predict_vqa(model, run.pipeline.tokenizer, "vicuna", items, images, progress=False)
    outside = [predictions[item.question_id] for item in items if predictions[item.question_id] not in vocabulary]
    return 1 - len(outside) / len(items), outside


def test_instruct_tuning_teaches_the_answer_format(run: QuickstartRun) -> None:
    """After the align stage the model writes captions ("a picture with a large purple cross,");
    after instruct tuning it answers held-out questions with answers of the training set
    ("yes", "2", "red", ...)."""
    vocabulary = training_answers(run.data_dir)
    aligned = load_checkpoint(run.out / "llava" / "align" / "final").model
    before, _ = share_of_answers_in(vocabulary, aligned, run)
    after, outside = share_of_answers_in(vocabulary, run.pipeline.model, run)
    assert before <= 0.25, before
    assert after >= 0.9, outside


def test_chat_cli_answers_with_the_trained_checkpoint(run: QuickstartRun) -> None:
    image = run.data_dir / "images" / "test" / "test_000000.png"
    result = CliRunner().invoke(app, ["chat", run.results["checkpoint"], "--image", str(image), CHAT_QUESTION])
    assert result.exit_code == 0, result.output
    answer = result.output.strip()
    assert answer and "\n" not in answer
    # The checkpoint on disk is the model that was trained.
    session = ChatSession(run.pipeline.model, run.pipeline.tokenizer, "vicuna", ImageTransform(size=(64, 64)))
    assert session.ask([Turn("user", f"<image>\n{CHAT_QUESTION}")], [image]) == answer
