"""Open-ended VQA evaluation of an LVLM: generate a short answer per question (greedy,
batched), score with the official VQA accuracy, per question type and overall."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from tessera.data.datasets import ImageCache
from tessera.data.records import Turn, VQAItem
from tessera.data.templates import ChatTemplate, encode_prompt, stop_token_ids
from tessera.eval.vqa_metrics import VQAScores, score_vqa
from tessera.infer.generate import GenerationConfig, generate
from tessera.models.lvlm import LVLM
from tessera.text.tokenizer import Tokenizer


def vqa_prompt_turns(question: str) -> list[Turn]:
    return [Turn("user", f"<image>\n{question}")]


def predict_vqa(
    model: LVLM,
    tokenizer: Tokenizer,
    template: ChatTemplate | str,
    items: Sequence[VQAItem],
    images: ImageCache,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    progress: bool = True,
    desc: str = "eval",
) -> dict[int, str]:
    """question_id → predicted answer text. Items whose image cannot be read get no
    prediction (score_vqa counts them as missing)."""
    model.eval()
    stops = stop_token_ids(tokenizer, template)
    predictions: dict[int, str] = {}
    usable = [it for it in items if images.get(it.image) is not None]
    for start in tqdm(range(0, len(usable), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        chunk = usable[start : start + batch_size]
        pixels = [images.get(it.image) for it in chunk]
        prompts = [
            encode_prompt(tokenizer, template, vqa_prompt_turns(it.question),
                          [model.num_image_tokens(px.shape[1], px.shape[2])])
            for it, px in zip(chunk, pixels, strict=True)
        ]
        outs = generate(
            model, prompts, [images.normalize(px) for px in pixels], stop_ids=stops,
            pad_id=tokenizer.pad_id, config=GenerationConfig(max_new_tokens=max_new_tokens),
        )
        for it, out in zip(chunk, outs, strict=True):
            predictions[it.question_id] = tokenizer.decode(out).strip()
    return predictions


def evaluate_vqa(
    model: LVLM, tokenizer: Tokenizer, template: ChatTemplate | str, items: Sequence[VQAItem],
    images: ImageCache, **kwargs,
) -> tuple[VQAScores, dict[int, str]]:
    predictions = predict_vqa(model, tokenizer, template, items, images, **kwargs)
    return score_vqa(predictions, items), predictions
