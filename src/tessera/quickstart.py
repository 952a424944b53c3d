"""The quickstart: make ShapesWorld, train the tiny LLaVA-1.5 pipeline end to end,
evaluate VQA in-distribution and compositionally, print a table, write OUT/results.json,
and show the trained model answering questions about a test image."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from tessera.data.records import Turn
from tessera.data.shapes import ShapesConfig, generate_shapes
from tessera.eval.report import format_table, vqa_results_table, write_json_atomic
from tessera.infer.chat import ChatSession
from tessera.pipeline import evaluate_shapes_vqa, train_llava
from tessera.presets.llava import get_preset


def _say(msg: str) -> None:
    print(f"[tessera] {msg}", flush=True)


def run_quickstart(
    out: str | Path, preset_name: str = "llava-1.5-tiny", *, num_train: int = 8000, seed: int = 0,
    progress: bool = True, step_scale: float = 1.0, eval_limit: int | None = None,
) -> dict[str, Any]:
    """`step_scale` < 1 shortens every stage and `eval_limit` caps the questions per split
    (tests use both); the defaults are the real quickstart."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    preset = get_preset(preset_name)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    data_dir = out / "data"
    n_eval = max(50, num_train // 8)
    _say(f"generating ShapesWorld ({num_train} train images) in {data_dir}")
    generate_shapes(ShapesConfig(seed=seed, image_size=preset.vision.image_size, num_train=num_train,
                                 num_val=n_eval // 2, num_test=n_eval, num_test_comp=n_eval),
                    data_dir, progress=progress)
    timings["data"] = time.perf_counter() - t

    result = train_llava(preset, data_dir, out, step_scale=step_scale, seed=seed, progress=progress)
    for r in result.stages:
        timings[f"train {r.stage}"] = r.seconds
        _say(f"stage {r.stage}: {r.steps} steps, {r.seconds:.0f}s, final loss {r.final_loss:.4f}; {r.trainable}")

    scores, timings["eval"] = evaluate_shapes_vqa(result.model, result.tokenizer, preset.template, data_dir,
                                                  limit=eval_limit, progress=progress, skips=result.skips)
    wall = time.perf_counter() - start
    results = {
        "preset": preset.name,
        "vqa_accuracy_in_distribution": scores["in-distribution"].accuracy,
        "vqa_accuracy_compositional": scores["compositional"].accuracy,
        "vqa": {k: v.to_dict() for k, v in scores.items()},
        "wall_seconds": wall,
        "seconds_by_step": timings,
        "stages": [{"stage": r.stage, "steps": r.steps, "seconds": r.seconds, "final_loss": r.final_loss,
                    "trainable_params": r.trainable.trainable, "frozen_params": r.trainable.frozen}
                   for r in result.stages],
        "skipped": dict(result.skips.reasons),
        "checkpoint": str(result.checkpoint),
        "machine": {"torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    write_json_atomic(out / "results.json", results)
    print("\nVQA accuracy (%)\n" + vqa_results_table(scores) + "\n")
    print(format_table([{"step": k, "seconds": v} for k, v in timings.items()]
                       + [{"step": "total (wall)", "seconds": wall}], floatfmt=".1f"))
    _say(result.skips.summary())

    image = data_dir / "images" / "test" / "test_000000.png"
    session = ChatSession.from_checkpoint(result.checkpoint)
    print(f"\nThe trained model on {image}:")
    for question in ("describe the image.", "how many shapes are there?"):
        answer = session.ask([Turn("user", f"<image>\n{question}")], [image])
        print(f"  Q: {question}\n  A: {answer}")
    _say(f"results: {out / 'results.json'}; model: {result.checkpoint}")
    _say(f'chat with it: tessera chat {result.checkpoint} --image {image} "what color is the circle?"')
    return results
