"""The `tessera` command line: every capability of the library, one subcommand each.

    tessera data shapes --out DIR        make the ShapesWorld dataset
    tessera data reading --root DIR      add grounding / OCR / chart tasks to it
    tessera train --data DIR --out DIR   train the LLaVA pipeline (all stages or some)
    tessera eval CHECKPOINT --data DIR   VQA accuracy per question type and split
    tessera chat CHECKPOINT --image PATH "question"   (no question: interactive)
    tessera quickstart --out DIR         all of the above, end to end
    tessera import-hf SRC OUT            a local Hugging Face folder → a Tessera checkpoint
    tessera export-hf CHECKPOINT OUT     a Tessera checkpoint → a Hugging Face folder
    tessera capfilt CHECKPOINT --data DIR --out DIR2   BLIP's CapFilt: a cleaned caption dataset
    tessera zoo --only NAME --out DIR    train + evaluate presets' tiny recipes: results.json, ZOO.md
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from tessera.train.checkpoint import Checkpoint

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tessera: vision-language models in PyTorch.")
data_app = typer.Typer(no_args_is_help=True, help="Make datasets.")
app.add_typer(data_app, name="data")


DEVICE_HELP = "where the training steps run: cpu, cuda or cuda:N (data preparation and evaluation stay on the CPU)"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Option(help="output folder")],
    num_train: int = 8000, num_val: int = 500, num_test: int = 1000, num_test_comp: int = 1000,
    image_size: Annotated[int, typer.Option(help="image height in pixels")] = 64,
    aspect_ratio: Annotated[float, typer.Option(help="width / height")] = 1.0,
    min_objects: int = 1, max_objects: int = 6, seed: int = 0,
) -> None:
    """Generate ShapesWorld: images, COCO captions, VQA v2 questions, LLaVA conversations."""
    from pydantic import ValidationError

    from tessera.data.shapes import ShapesConfig, generate_shapes

    try:
        cfg = ShapesConfig(seed=seed, image_size=image_size, aspect_ratio=aspect_ratio, num_train=num_train,
                           num_val=num_val, num_test=num_test, num_test_comp=num_test_comp,
                           min_objects=min_objects, max_objects=max_objects)
    except ValidationError as err:
        _fail(str(err))
    meta = generate_shapes(cfg, out)
    counts = ", ".join(f"{k}: {v['images']} images" for k, v in meta["splits"].items())
    typer.echo(f"ShapesWorld written to {out} ({counts})")


@data_app.command("tasks")
def data_tasks(
    root: Annotated[Path, typer.Option(help="an existing ShapesWorld folder")],
    unique_captions: Annotated[bool, typer.Option(help="retrieval captions unique per image")] = False,
) -> None:
    """Add the classic tasks to a ShapesWorld folder: retrieval galleries, zero-shot labels,
    closed-set VQA answers, image-pair reasoning and visual entailment."""
    from tessera.data.shapes_tasks import generate_classic_tasks

    try:
        manifest = generate_classic_tasks(root, unique_captions=unique_captions)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"classic tasks written to {root} ({', '.join(sorted(manifest.get('files', {})))})")


@data_app.command("reading")
def data_reading(
    root: Annotated[Path, typer.Option("--root", "--out", help="an existing ShapesWorld folder")],
    rec_per_image: Annotated[int, typer.Option(help="referring expressions per image (at most)")] = 1,
    text_images_per_image: Annotated[float, typer.Option(help="rendered-text images per base image")] = 0.5,
    charts_per_image: Annotated[float, typer.Option(help="bar charts per base image")] = 0.5,
    pretrain_texts_per_image: Annotated[float, typer.Option(
        help="rendered-text images per train image for reading pretraining (train/ocr_pretrain.json)")] = 4.0,
) -> None:
    """Add grounding and reading tasks to a ShapesWorld folder: referring expressions (text → box,
    box → text) and grounded captions in the Qwen-VL and CogVLM box formats, rendered text (OCR)
    and bar charts (chart → Python dict), and a larger train-only rendered-text set for reading
    pretraining (Vary-tiny)."""
    from pydantic import ValidationError

    from tessera.data.shapes_reading import ReadingTasksConfig, generate_reading_tasks

    try:
        options = ReadingTasksConfig(rec_per_image=rec_per_image, text_images_per_image=text_images_per_image,
                                     charts_per_image=charts_per_image,
                                     pretrain_texts_per_image=pretrain_texts_per_image)
        manifest = generate_reading_tasks(root, config=options)
    except (ValidationError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    counts = ", ".join(f"{split}: {sum(c.values())} records" for split, c in manifest["splits"].items())
    typer.echo(f"reading tasks written to {root} ({counts})")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="ShapesWorld folder")],
    out: Annotated[Path, typer.Option(help="run folder (checkpoints per stage)")],
    preset: str = "llava-1.5-tiny",
    stage: Annotated[list[str] | None, typer.Option(help="stages to run (repeat); default all: clip lm align instruct")] = None,
    resume: Annotated[Path | None, typer.Option(help="step checkpoint of the (single) stage to resume")] = None,
    step_scale: float = 1.0, seed: int = 0,
    clip_hard_negatives: Annotated[bool | None, typer.Option(
        help="clip stage: also score each caption with one colour / shape / size word swapped (NegCLIP); "
             "default: the preset's")] = None,
    clip_grayscale: Annotated[float | None, typer.Option(
        help="clip stage: fraction of images shown in grayscale with colour words dropped from their texts; "
             "default: the preset's")] = None,
    clip_count: Annotated[float | None, typer.Option(
        help="clip stage: weight of the count objective (each image against 'there are N shapes.', read from its "
             "own count caption; CountCLIP); 0 drops it; default: the preset's")] = None,
    vit_patch_embed: Annotated[str | None, typer.Option(
        help="the ViT's patch embedding: conv_stem (the tiny presets') or patch (CLIP's single convolution, "
             "which export-hf needs); default: the preset's")] = None,
    vision_from: Annotated[Path | None, typer.Option(
        help="Hugging Face or Tessera folder of a vision tower (CLIP / SigLIP) to use instead of the "
             "preset's ViT; stage clip is then not run")] = None,
    language_from: Annotated[Path | None, typer.Option(
        help="Hugging Face or Tessera folder of a decoder LLM (LLaMA / Mistral / Qwen2) with its tokenizer "
             "to use instead of the preset's LM and BPE tokenizer; stage lm is then not run")] = None,
    template: Annotated[str | None, typer.Option(
        help="chat template instead of the preset's (e.g. chatml for an imported Qwen2)")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
) -> None:
    """Train the LLaVA pipeline: CLIP-style ViT, LM, then LLaVA stages 1 (align) and 2 (instruct).
    Under `torchrun --nproc_per_node N -m tessera.cli train ...` the N processes train data parallel
    (the recipe's batch sizes stay the global batches; see tessera.train.parallel)."""
    from tessera.pipeline import train_llava
    from tessera.presets.llava import get_preset
    from tessera.train.parallel import init_from_env, is_main_process
    from tessera.train.tasks import COUNT_OBJECTIVE
    from tessera.train.trainer import resolve_device, training_device
    from tessera.vision.vit import ViTConfig

    stages = stage or None  # None: all stages, less those of imported parts
    resume_map = None
    if resume is not None:
        if stages is None or len(stages) != 1:
            _fail("--resume needs exactly one --stage")
        resume_map = {stages[0]: resume}
    try:
        chosen = get_preset(preset)
        if clip_hard_negatives is not None:
            chosen = chosen.model_copy(update={"clip_hard_negatives": clip_hard_negatives})
        if clip_grayscale is not None:
            chosen = chosen.model_copy(update={"clip_grayscale": clip_grayscale})
        if clip_count is not None:
            objectives = {k: v for k, v in chosen.clip_stage.objectives.items() if k != COUNT_OBJECTIVE}
            if clip_count > 0:
                objectives[COUNT_OBJECTIVE] = clip_count
            clip_stage = chosen.clip_stage.model_copy(update={"objectives": objectives})
            chosen = chosen.model_copy(update={"clip_stage": clip_stage})
        if template is not None:
            chosen = chosen.model_copy(update={"template": template})
        if vit_patch_embed is not None:
            vision = ViTConfig.model_validate({**chosen.vision.model_dump(), "patch_embed": vit_patch_embed})
            chosen = chosen.model_copy(update={"vision": vision})
        init_from_env(resolve_device(device))
        with training_device(device):
            result = train_llava(chosen, data, out, stages=stages, step_scale=step_scale, seed=seed,
                                 resume=resume_map, vision_from=vision_from, language_from=language_from)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if not is_main_process():
        return
    for note in result.notes:
        typer.echo(note)
    for r in result.stages:
        typer.echo(f"{r.stage}: {r.steps} steps, {r.seconds:.0f}s, final loss {r.final_loss:.4f}; {r.trainable}")
    typer.echo(result.skips.summary())
    if result.checkpoint:
        typer.echo(f"checkpoint: {result.checkpoint}")


@app.command("eval")
def evaluate(
    checkpoint: Path,
    data: Annotated[Path, typer.Option(help="ShapesWorld folder")],
    split: Annotated[list[str] | None, typer.Option(help="splits (repeat); default test and test_comp")] = None,
    out: Annotated[Path | None, typer.Option(help="write the scores as JSON here")] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many questions per split")] = None,
    task: Annotated[str, typer.Option(
        help="vqa, or a reading task: rec_qwen, rec_cogvlm, reg_qwen, reg_cogvlm, grounded_caption_qwen, "
             "grounded_caption_cogvlm, ocr, chart; for a fusion checkpoint (ALBEF, BLIP, ViLT, VLMo): "
             "retrieval, vqa, reasoning, entailment, vqa_answer (BLIP's answer decoder)")] = "vqa",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: torch's)")] = None,
    finetune_steps: Annotated[int | None, typer.Option(
        min=1, help="fusion checkpoints: fine-tuning steps of each task's head (default: the zoo's)")] = None,
    device: Annotated[str, typer.Option(
        help="cpu, cuda or cuda:N: where an LVLM generates, or where a fusion checkpoint's heads are fine-tuned")] = "cpu",
) -> None:
    """VQA accuracy (official normalisation) per question type, in-distribution and compositional;
    or, with --task, a reading task's metrics (grounding Acc@IoU≥0.5, OCR character error rate,
    chart accuracy, ...) beside its trivial baseline. A fusion checkpoint gets the zoo's protocol
    (eval.fusion_eval): retrieval on the pretrained model; VQA, reasoning and entailment through a
    head fine-tuned on the train split (reasoning starts from the VQA fine-tune, so it runs both)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from tessera.eval.report import format_table, vqa_results_table, write_json_atomic
    from tessera.models.lvlm import LVLM
    from tessera.pipeline import SPLIT_LABELS, evaluate_shapes_reading, evaluate_shapes_vqa
    from tessera.text.tokenizer import Tokenizer
    from tessera.train.checkpoint import CheckpointError, load_checkpoint
    from tessera.train.trainer import resolve_device, training_device

    try:
        ckpt = load_checkpoint(checkpoint)
        if callable(getattr(ckpt.model, "fused_features", None)):
            with training_device(device):
                _evaluate_fusion_checkpoint(ckpt, data, task, split or list(SPLIT_LABELS), finetune_steps, out)
            return
        if not isinstance(ckpt.model, LVLM):
            raise CheckpointError(f"{checkpoint} holds a {ckpt.kind} model; VQA needs an LVLM checkpoint")
        ckpt.model.to(resolve_device(device))
        tokenizer = Tokenizer.load(ckpt.tokenizer_path)
        template = ckpt.meta.get("template", "vicuna")
        splits = split or list(SPLIT_LABELS)
        if task != "vqa":
            reading, seconds = evaluate_shapes_reading(ckpt.model, tokenizer, template, data, task,
                                                       splits=splits, limit=limit, meta=ckpt.meta)
        else:
            scores, seconds = evaluate_shapes_vqa(ckpt.model, tokenizer, template, data,
                                                  splits=splits, limit=limit, meta=ckpt.meta)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if task != "vqa":
        rows = [{"split": label, "items": r["count"],
                 **{f"{k} (baseline)": f"{v:.3f} ({r['baseline'][k]:.3f})" for k, v in r["scores"].items()}}
                for label, r in reading.items()]
        typer.echo(format_table(rows))
        if out is not None:
            write_json_atomic(out, {"checkpoint": str(checkpoint), "seconds": seconds, "task": task,
                                    "results": reading})
            typer.echo(f"written {out}")
        return
    typer.echo(vqa_results_table(scores))
    if out is not None:
        write_json_atomic(out, {"checkpoint": str(checkpoint), "seconds": seconds,
                                "vqa": {k: v.to_dict() for k, v in scores.items()}})
        typer.echo(f"written {out}")


def _evaluate_fusion_checkpoint(ckpt: Checkpoint, data: Path, task: str, splits: list[str], finetune_steps: int | None,
                                out: Path | None) -> None:
    """`tessera eval` on an ALBEF / BLIP / ViLT / VLMo checkpoint (eval.fusion_eval's protocol)."""
    from tessera.data.images import transform_from_meta
    from tessera.eval.fusion_eval import (
        DEFAULT_START_FROM,
        KNOWN_TASKS,
        evaluate_fusion_model,
        shortened_finetune_stages,
    )
    from tessera.eval.report import format_table, write_json_atomic
    from tessera.pipeline import SPLIT_LABELS
    from tessera.text.tokenizer import Tokenizer
    from tessera.train.fusion_tasks import shapes_transform

    if task not in KNOWN_TASKS:
        raise ValueError(f"a {ckpt.kind} checkpoint is a fusion model; its tasks are {list(KNOWN_TASKS)}, not {task!r}")
    tasks = [t for t in (DEFAULT_START_FROM.get(task), task) if t]  # reasoning runs the VQA fine-tune it starts from
    tokenizer = Tokenizer.load(ckpt.tokenizer_path)
    # the checkpoint's own pixels (the zoo records them); else the dataset's size with CLIP's statistics
    transform = transform_from_meta(ckpt.meta, 0) if "image_size" in ckpt.meta else shapes_transform(data)
    labels = {s: SPLIT_LABELS.get(s, s) for s in splits}
    evaluation = evaluate_fusion_model(
        ckpt.model, tokenizer, data, tasks, transform=transform, splits=labels,
        stages=shortened_finetune_stages(finetune_steps) if finetune_steps else None)
    rows = [{"split": label, **{f"{name} (baseline)": f"{value:.3f} ({evaluation.baselines[label][name]:.3f})"
                                for name, value in metrics.items()}}
            for label, metrics in evaluation.metrics.items()]
    typer.echo(format_table(rows))
    if out is not None:
        write_json_atomic(out, {"checkpoint": str(ckpt.path), "tasks": tasks, "metrics": evaluation.metrics,
                                "baselines": evaluation.baselines, "seconds": evaluation.seconds_by_task,
                                "notes": evaluation.notes})
        typer.echo(f"written {out}")


@app.command()
def chat(
    checkpoint: Path,
    question: Annotated[str | None, typer.Argument(help="omit for an interactive session")] = None,
    image: Annotated[Path | None, typer.Option(help="image file")] = None,
    max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N: where the model generates")] = "cpu",
) -> None:
    """Ask a trained LVLM about an image."""
    from tessera.data.images import ImageError
    from tessera.data.records import Turn
    from tessera.infer.chat import ChatSession
    from tessera.infer.generate import GenerationConfig
    from tessera.train.trainer import resolve_device

    try:
        session = ChatSession.from_checkpoint(
            checkpoint, GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         seed=seed))
        session.model.to(resolve_device(device))
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    images = [image] if image is not None else []
    prefix = "<image>\n" if image is not None else ""

    def reply(turns: list[Turn]) -> str:
        try:
            return session.ask(turns, images)
        except ImageError as err:
            _fail(str(err))
        return ""

    if question is not None:
        typer.echo(reply([Turn("user", prefix + question)]))
        return
    typer.echo("interactive chat; an empty line or Ctrl-D ends it")
    turns: list[Turn] = []
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), ""):
        line = line.strip()
        if not line:
            break
        turns.append(Turn("user", (prefix if not turns else "") + line))
        answer = reply(turns)
        turns.append(Turn("assistant", answer))
        typer.echo(f"tessera> {answer}")


@app.command()
def quickstart(
    out: Path = Path("runs/quickstart"), preset: str = "llava-1.5-tiny", num_train: int = 8000, seed: int = 0,
    step_scale: Annotated[float, typer.Option(help="shorten every stage (smoke runs)")] = 1.0,
    eval_limit: Annotated[int | None, typer.Option(help="questions per split")] = None,
) -> None:
    """Make data, train the tiny LLaVA-1.5 end to end, evaluate, chat: OUT/results.json."""
    from tessera.quickstart import run_quickstart

    try:
        run_quickstart(out, preset, num_train=num_train, seed=seed, step_scale=step_scale, eval_limit=eval_limit)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))


@app.command("import-hf")
def import_hf_command(
    src: Annotated[Path, typer.Argument(help="local Hugging Face folder (config.json, safetensors, tokenizer)")],
    out: Annotated[Path, typer.Argument(help="Tessera checkpoint folder to write")],
    template: Annotated[str | None, typer.Option(help="chat template (default: detected, else by family)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
) -> None:
    """Import CLIP / SigLIP (towers or whole), LLaMA / Mistral / Qwen2 or LLaVA weights."""
    import torch

    from tessera.interop import import_hf

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        _fail(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    try:
        imported = import_hf(src, out, template=template, dtype=dtypes[dtype])
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    for note in imported.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"imported {imported.architecture} as a Tessera {imported.kind} checkpoint: {out}")


@app.command("export-hf")
def export_hf_command(
    checkpoint: Annotated[Path, typer.Argument(help="Tessera checkpoint folder")],
    out: Annotated[Path, typer.Argument(help="Hugging Face folder to write")],
    adapter_out: Annotated[Path | None, typer.Option(
        help="write LoRA adapters here in the PEFT format (base model unmerged in OUT); "
             "without it adapters are merged")] = None,
) -> None:
    """Write a checkpoint as a transformers folder (LLaVA, CLIP, SigLIP, LLaMA / Qwen2, towers)."""
    from tessera.interop import export_hf

    try:
        export_hf(checkpoint, out, adapter_out=adapter_out)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"exported {checkpoint} to {out} (load it with transformers' from_pretrained)")


@app.command("capfilt")
def capfilt_command(
    checkpoint: Annotated[Path, typer.Argument(help="BLIP checkpoint folder (captioner and ITM filter)")],
    data: Annotated[Path, typer.Option(help="dataset root: <split>/captions.json, image paths relative to it")],
    out: Annotated[Path, typer.Option(help="output folder: <split>/captions.json and capfilt_summary.json")],
    split: str = "train",
    captions: Annotated[Path | None, typer.Option(help="COCO captions file instead of DATA/<split>/captions.json")] = None,
    threshold: Annotated[float, typer.Option(help="ITM match probability a caption needs to stay")] = 0.5,
    max_new_tokens: int = 30, batch_size: int = 64,
    max_images: Annotated[int | None, typer.Option(help="only the first N images")] = None,
) -> None:
    """BLIP's CapFilt: caption every image, drop captions the ITM filter rejects, write the cleaned set."""
    from tessera.capfilt import capfilt_checkpoint

    try:
        summary = capfilt_checkpoint(checkpoint, data, out, split=split, captions_file=captions, threshold=threshold,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, max_images=max_images)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"{summary.images} images: original captions kept {summary.original_kept}, removed "
               f"{summary.original_removed}; synthetic kept {summary.synthetic_kept}, removed "
               f"{summary.synthetic_removed}")
    if summary.noisy_total is not None:
        typer.echo(f"noisy captions removed {summary.noisy_removed}/{summary.noisy_total}, clean removed "
                   f"{summary.clean_removed}/{summary.clean_total}")
    typer.echo(f"written {out / split / 'captions.json'} and {out / 'capfilt_summary.json'}")


@app.command("zoo")
def zoo_command(
    out: Annotated[Path | None, typer.Option(help="zoo folder: data/, NAME/results.json, ZOO.md")] = None,
    only: Annotated[list[str] | None, typer.Option(help="presets to run (repeat, or comma-separated); default all")] = None,
    scale: Annotated[float, typer.Option(help="multiply every stage's steps (e.g. 0.02 for a smoke run)")] = 1.0,
    seed: int = 0,
    data: Annotated[Path | None, typer.Option(help="existing ShapesWorld folder with task files (default OUT/data)")] = None,
    list_presets: Annotated[bool, typer.Option("--list", help="list the zoo's presets and exit")] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's)")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
) -> None:
    """Train each preset's tiny recipe on ShapesWorld, evaluate every task it supports, write
    OUT/NAME/results.json and the table OUT/ZOO.md."""
    from tessera.zoo.runner import list_presets as zoo_presets
    from tessera.zoo.runner import run_zoo

    if list_presets:
        names, broken = zoo_presets()
        typer.echo("\n".join(names))
        for module, error in broken.items():
            typer.secho(f"warning: preset module {module} failed to import: {error}", fg=typer.colors.YELLOW, err=True)
        return
    if out is None:
        _fail("--out is required (the zoo folder)")
    names = [n.strip() for item in only or [] for n in item.split(",") if n.strip()]
    try:
        run = run_zoo(names, out, scale=scale, seed=seed, data_dir=data, threads=threads, device=device,
                      log=typer.echo)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"table: {run.table}")
    if run.failed:
        _fail(f"failed presets: {', '.join(run.failed)} (errors in their results.json and the table)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
