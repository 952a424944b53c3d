"""Downstream evaluation of any fusion model (ALBEF, BLIP, ViLT, VLMo) on the classic
ShapesWorld tasks, for the zoo: retrieval, closed-set VQA, visual reasoning, entailment.

What each task does with a model of the fusion-model contract (tessera.train.fusion_tasks):

retrieval   On the pretrained model, no fine-tuning. Models with ITC embeddings
            (`image_embeddings`, `text_embeddings`) rank the split's whole gallery by cosine
            similarity; with `itm_logits` too, each image's top-k texts and each text's top-k
            images are re-ranked by score = ITM match logit + ITC similarity
            (eval.retrieval.rerank_with_itm), ALBEF / BLIP's protocol. Models with ITM only
            (ViLT) score EVERY pair of a gallery subset by the ITM logit alone: the first
            `itm_only_images` images and their captions (ITM over all pairs is quadratic);
            chance is computed on the same subset. The gallery's captions repeat across
            images, so an identical caption string counts as a caption of every image it
            describes (`identical_texts_match`), on both sides (recall and chance alike).
vqa         FusionClassifier (MLP on fused_features) over the train split's answer vocabulary
            (vqa_answers.json), soft-score BCE; predicted answer = argmax; official VQA
            accuracy (eval.vqa_metrics.score_vqa). Baseline: the per-question-type prior.
reasoning   Pairs of images: fused states of (left, sentence) and (right, sentence)
            concatenated → MLP → {true, false}. Trained on contrast pairs
            (train.downstream.contrast_groups: each batch holds every sentence with both
            labels; the stage's batch_size counts pairs). Baseline: majority label of train.
entailment  3-way head (entailment / neutral / contradiction). Baseline: majority of train.
vqa_answer  Models that write answers (BLIP: `answer_model()` → models.blip.BLIPVQA, an answer
            decoder over the image-grounded question encoder), fine-tuned on the train split's
            questions and answers (train.downstream.AnswerGenerationTask), scored twice with the
            official VQA accuracy: vqa_rank_accuracy (the train answer vocabulary ranked by
            the answer's log-likelihood, BLIP's "rank" inference) and vqa_generate_accuracy
            (greedy, open-ended). Baseline: the per-question-type prior, as for vqa.

Each fine-tuning task starts from a deep copy of the given model (the caller's model is not
changed), trains on the train split with the one Trainer (a StageConfig per task; defaults in
`DEFAULT_FINETUNE_STAGES`, steps multiplied by `scale`), and is evaluated on every split of
`splits` (zoo: "test" → "in_distribution", "test_comp" → "compositional"). A task named in
`start_from` starts instead from the backbone another task's fine-tuning ended with
(intermediate-task transfer; by default reasoning starts from the VQA fine-tune, see
`DEFAULT_START_FROM`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tessera.data.datasets import ImageCache
from tessera.data.images import ImageTransform
from tessera.data.readers import read_vqa, shapes_split_paths
from tessera.data.records import SkipStats, VQAItem
from tessera.data.shapes_tasks import classic_task_paths
from tessera.data.task_readers import (
    ENTAILMENT_LABELS,
    REASONING_LABELS,
    AnswerVocabulary,
    RetrievalGallery,
    entailment_baseline,
    read_answer_vocabulary,
    read_entailment,
    read_reasoning,
    read_retrieval_gallery,
    reasoning_baseline,
    retrieval_chance_recall,
    vqa_prior_baseline,
)
from tessera.eval.classification import accuracy, per_class_accuracy
from tessera.eval.retrieval import RetrievalScores, rerank_with_itm, retrieval_recall
from tessera.eval.vqa_metrics import score_vqa
from tessera.pipeline import scaled
from tessera.text.tokenizer import Tokenizer
from tessera.train.downstream import (
    AnswerGenerationTask,
    ClassificationExample,
    ClassificationTask,
    FusionClassifier,
    contrast_groups,
    entailment_examples,
    reasoning_examples,
    vqa_examples,
)
from tessera.train.fusion_tasks import encode_captions, shapes_transform
from tessera.train.stage import StageConfig
from tessera.train.trainer import StageResult, Trainer, seed_everything
from tessera.zoo.core import ZooResult

TASKS: tuple[str, ...] = ("retrieval", "vqa", "reasoning", "entailment")  # every fusion model's
ANSWER_TASK = "vqa_answer"  # only for models with an answer decoder (`answer_model`)
KNOWN_TASKS: tuple[str, ...] = (*TASKS, ANSWER_TASK)
FINETUNE_TASKS: tuple[str, ...] = ("vqa", "reasoning", "entailment")
SPLITS: dict[str, str] = {"test": "in_distribution", "test_comp": "compositional"}
RECALL_KS: tuple[int, ...] = (1, 5, 10)


def _stage(name: str, steps: int, batch_size: int) -> StageConfig:
    return StageConfig(
        name=name, trainable=["*"], objectives={name: 1.0}, data=name, steps=steps, batch_size=batch_size,
        lr=3e-4, lr_scale={"head": 10.0}, warmup_steps=steps // 10, weight_decay=0.01, max_length=40,
        log_every=25,
    )


# Tiny CPU recipes, the same for every fusion preset; a preset passes its own (`stages=`) only
# when its model needs other settings. 1,500-2,000 steps at 3e-4, not the papers' fine-tuning rate of
# 1e-4: a tiny model trained from scratch on ShapesWorld is far from done after pretraining, and
# 150-250 steps at 1e-4 left the VQA heads near the majority answer (ViLT 0.43, VLMo 0.42, BLIP
# 0.39 against 0.36). From the same pretrained weights ViLT reached 0.53 after 1,000 steps at 3e-4
# (0.52 at 1e-3) and 0.62 after 2,500; VLMo 0.57 and BLIP 0.60 after 1,000; ViLT's image-pair
# reasoning 0.54 -> 0.58 (1,000 steps; issue 3 notes).
DEFAULT_FINETUNE_STAGES: dict[str, StageConfig] = {
    "vqa": _stage("finetune_vqa", 2000, 32),
    "reasoning": _stage("finetune_reasoning", 1500, 16),  # 16 contrast pairs = 32 examples
    "entailment": _stage("finetune_entailment", 1500, 32),
    ANSWER_TASK: _stage("finetune_vqa_answer", 2000, 32),
}

# Fine-tuning tasks that start from the backbone an earlier task's fine-tuning ended with, not
# from the pretrained model (intermediate-task transfer). Reasoning over image pairs needs the
# fused [CLS] of (image, sentence) to carry whether and how often the sentence's object is in the
# image, which is what VQA's existence and count questions train, with direct per-image labels.
# From the pretrained weights the reasoning head stayed near chance on every kind but
# all_one_color (train loss 0.60-0.67 after 1,500 steps); BLIP-tiny from its VQA fine-tune: 0.584 /
# 0.562 -> 0.774 / 0.768, while 3,500 reasoning steps from the pretrained weights (as many backbone
# steps) reached 0.690 / 0.678 (RESULTS.md, session 17).
DEFAULT_START_FROM: dict[str, str] = {"reasoning": "vqa"}


def shortened_finetune_stages(steps: int) -> dict[str, StageConfig]:
    """DEFAULT_FINETUNE_STAGES cut to `steps` each (warm-up a tenth), for smoke runs and tests."""
    return {task: stage.model_copy(update={"steps": steps, "warmup_steps": steps // 10})
            for task, stage in DEFAULT_FINETUNE_STAGES.items()}


@dataclass
class FusionEvaluation:
    """Metrics and baselines per split label, in the zoo's layout; unpacks as
    `metrics, baselines = evaluate_fusion_model(...)`.

    seconds_by_task: wall time of each task, fine-tuning and evaluation together;
    finetune_stages: the Trainer's StageResult of each fine-tuned head (stage "finetune_<task>").
    """

    metrics: dict[str, dict[str, float]]
    baselines: dict[str, dict[str, float]]
    seconds_by_task: dict[str, float] = field(default_factory=dict)
    finetune_stages: list[StageResult] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    skips: SkipStats = field(default_factory=SkipStats)

    def __iter__(self) -> Iterator[dict[str, dict[str, float]]]:
        return iter((self.metrics, self.baselines))

    def zoo_result(self, pretraining: Sequence[StageResult], notes: Mapping[str, Any] | None = None) -> ZooResult:
        """The ZooResult of a preset: its pretraining stages, then the fine-tuning stages, with
        their trainable parameters and seconds; evaluation seconds per task go to the notes."""
        stages = [*pretraining, *self.finetune_stages]
        return ZooResult(
            metrics=self.metrics,
            baselines=self.baselines,
            trainable_params_by_stage={s.stage: s.trainable.trainable for s in stages},
            seconds_by_stage={s.stage: s.seconds for s in stages},
            notes={**self.notes, "seconds_by_task": self.seconds_by_task,
                   "pretraining_final_loss": {s.stage: s.final_loss for s in pretraining}, **(notes or {})},
        )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def has_itc(model: nn.Module) -> bool:
    return callable(getattr(model, "image_embeddings", None)) and callable(getattr(model, "text_embeddings", None))


def has_itm(model: nn.Module) -> bool:
    return callable(getattr(model, "itm_logits", None))


# --- retrieval -------------------------------------------------------------------------------------


def gallery_subset(gallery: RetrievalGallery, num_images: int) -> RetrievalGallery:
    """The first `num_images` images of a gallery and their captions (indices renumbered)."""
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if num_images >= len(gallery.images):
        return gallery
    keep = [t for t, i in enumerate(gallery.text_to_image) if i < num_images]
    return RetrievalGallery(
        gallery.images[:num_images], tuple(gallery.captions[t] for t in keep),
        tuple(gallery.text_to_image[t] for t in keep), gallery.caption_kind,
    )


def _load_images(paths: Sequence[Path], images: ImageCache) -> list[Tensor]:
    out = []
    for path in paths:
        px = images.get(path)
        if px is None:
            raise ValueError(f"retrieval gallery image {path} is unreadable; galleries must be complete")
        out.append(images.normalize(px))
    return out


@torch.no_grad()
def itc_similarity(model: nn.Module, pixels: Sequence[Tensor], input_ids: Tensor, attention_mask: Tensor,
                   batch_size: int = 128) -> Tensor:
    """(N images, M texts) cosine similarities from the model's L2-normalised embeddings."""
    device = _device(model)
    img = torch.cat([model.image_embeddings([p.to(device) for p in pixels[s : s + batch_size]])
                     for s in range(0, len(pixels), batch_size)])
    txt = torch.cat([model.text_embeddings(input_ids[s : s + batch_size].to(device),
                                           attention_mask[s : s + batch_size].to(device))
                     for s in range(0, input_ids.shape[0], batch_size)])
    return (img.float() @ txt.float().t()).cpu()


def itm_scorer(model: nn.Module, pixels: Sequence[Tensor], input_ids: Tensor, attention_mask: Tensor,
               batch_size: int = 128) -> Callable[[int, list[int]], Tensor]:
    """itm_score_fn for rerank_with_itm: the match logits of one image with some texts."""
    device = _device(model)

    @torch.no_grad()
    def score(image: int, texts: list[int]) -> Tensor:
        out = []
        for s in range(0, len(texts), batch_size):
            chunk = texts[s : s + batch_size]
            ids, mask = input_ids[chunk], attention_mask[chunk]
            length = int(mask.sum(1).max())  # trim padding shared by the chunk
            out.append(model.itm_logits([pixels[image].to(device)] * len(chunk), ids[:, :length].to(device),
                                        mask[:, :length].to(device)).float().cpu())
        return torch.cat(out)

    return score


@torch.no_grad()
def itm_similarity(model: nn.Module, pixels: Sequence[Tensor], input_ids: Tensor, attention_mask: Tensor,
                   batch_size: int = 128) -> Tensor:
    """(N, M) ITM match logits of every image-text pair."""
    score = itm_scorer(model, pixels, input_ids, attention_mask, batch_size)
    texts = list(range(input_ids.shape[0]))
    return torch.stack([score(i, texts) for i in range(len(pixels))])


@dataclass
class RetrievalEvaluation:
    scores: RetrievalScores
    chance: dict[str, float]  # retrieval_chance_recall keys (text_to_image@k, image_to_text@k)
    method: str  # "itc", "itc+itm_rerank@k" or "itm_all_pairs"
    gallery_images: int
    gallery_texts: int


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    tokenizer: Tokenizer,
    gallery: RetrievalGallery,
    images: ImageCache,
    *,
    max_length: int = 40,
    rerank_k: int = 16,
    itm_only_images: int = 100,
    max_gallery_images: int | None = None,
    batch_size: int = 128,
) -> RetrievalEvaluation:
    """Recall@1/5/10 both directions (see the module docstring for the method per model kind).
    `rerank_k=0` turns the ITM re-ranking of ITC models off; `max_gallery_images` keeps only
    the first images of the gallery (and their captions) for every model kind."""
    if not gallery.images or not gallery.captions:
        raise ValueError("empty retrieval gallery: it needs images and captions")
    model.eval()
    itc, itm = has_itc(model), has_itm(model)
    if not itc and not itm:
        raise TypeError(f"{type(model).__name__} has neither ITC embeddings nor itm_logits: it cannot retrieve")
    if max_gallery_images is not None:
        gallery = gallery_subset(gallery, max_gallery_images)
    if not itc:
        gallery = gallery_subset(gallery, itm_only_images)
    pixels = _load_images(gallery.images, images)
    input_ids, attention_mask = encode_captions(tokenizer, gallery.captions, max_length)
    if itc:
        sim = itc_similarity(model, pixels, input_ids, attention_mask, batch_size)
        t2i_sim = None
        method = "itc"
        if itm and rerank_k > 0:
            sim, t2i_sim = rerank_with_itm(sim, itm_scorer(model, pixels, input_ids, attention_mask, batch_size),
                                           rerank_k)
            method = f"itc+itm_rerank@{rerank_k}"
    else:
        sim, t2i_sim, method = itm_similarity(model, pixels, input_ids, attention_mask, batch_size), None, "itm_all_pairs"
    scores = retrieval_recall(sim, gallery.text_to_image, RECALL_KS, t2i_sim=t2i_sim, texts=gallery.captions,
                              identical_texts_match=True)
    chance = retrieval_chance_recall(gallery, RECALL_KS, duplicate_aware=True)
    return RetrievalEvaluation(scores, chance, method, len(gallery.images), len(gallery.captions))


# --- fine-tuned heads ------------------------------------------------------------------------------


def finetune_classifier(
    model: nn.Module,
    task: ClassificationTask,
    stage: StageConfig,
    *,
    progress: bool = False,
) -> tuple[FusionClassifier, StageResult]:
    """A FusionClassifier on a deep copy of `model`, trained on `task` with the one Trainer."""
    seed_everything(stage.seed)  # the head's initialisation follows the run's seed
    classifier = FusionClassifier(copy.deepcopy(model), task.num_classes, task.images_per_example)
    result = Trainer(classifier, stage, task, progress=progress).fit()
    return classifier, result


def _class_accuracy(task: ClassificationTask, predictions: Sequence[int | None]) -> float:
    """Accuracy over every example; a skipped example (None) counts as wrong."""
    labels = [e.target for e in task.examples]
    return accuracy([-1 if p is None else p for p in predictions], labels)


def _vqa_predictions(classifier: nn.Module, task: ClassificationTask, items: Sequence[VQAItem],
                     answers: Sequence[str], batch_size: int) -> dict[int, str]:
    """question_id → predicted answer; questions whose example was skipped get none (score 0)."""
    predictions = task.predict(classifier, batch_size)
    return {item.question_id: answers[p] for item, p in zip(items, predictions, strict=True) if p is not None}


def _vqa_eval_examples(items: Sequence[VQAItem]) -> list[ClassificationExample]:
    # Every question is scored, in or out of vocabulary: the target is unused at prediction.
    return [ClassificationExample(str(i.question_id), (i.image,), i.question, ()) for i in items]


def evaluate_fusion_model(
    model: nn.Module,
    tokenizer: Tokenizer,
    data_dir: str | Path,
    tasks: Sequence[str] = TASKS,
    *,
    scale: float = 1.0,
    seed: int = 0,
    transform: ImageTransform | None = None,
    max_length: int = 40,
    stages: Mapping[str, StageConfig] | None = None,
    rerank_k: int = 16,
    itm_only_images: int = 100,
    max_gallery_images: int | None = None,
    splits: Mapping[str, str] = SPLITS,
    progress: bool = False,
    batch_size: int = 64,
    start_from: Mapping[str, str] | None = None,
) -> FusionEvaluation:
    """Evaluate `model` on each named task of the ShapesWorld folder `data_dir` (classic task
    files written), per split label. Metric names: retrieval_{i2t,t2i}_r{1,5,10},
    vqa_accuracy, reasoning_accuracy, entailment_accuracy, vqa_rank_accuracy and
    vqa_generate_accuracy (task vqa_answer); baselines under the same names (chance recall; VQA
    prior per question type; majority label of train).

    `stages` overrides the fine-tuning StageConfig of a task ("vqa", "reasoning",
    "entailment", "vqa_answer"); every stage's steps are multiplied by `scale`. `start_from` maps a task to
    the earlier task whose fine-tuned backbone it starts from (default `DEFAULT_START_FROM`;
    `{}`: every task from `model`); that earlier task must be among `tasks`. Retrieval options: see
    `evaluate_retrieval` (ITM re-ranking depth, gallery caps). `transform` defaults to the
    dataset's image size. Fine-tuned classifiers are not saved (FusionClassifier is no
    checkpoint kind); the metrics are the product.
    """
    unknown = sorted(set(tasks) - set(KNOWN_TASKS))
    if unknown:
        raise ValueError(f"unknown fusion tasks {unknown}; known: {list(KNOWN_TASKS)}")
    if ANSWER_TASK in tasks and not callable(getattr(model, "answer_model", None)):
        raise ValueError(f"{ANSWER_TASK} needs a model that writes answers (answer_model(), BLIP's answer decoder); "
                         f"{type(model).__name__} has none")
    data_dir = Path(data_dir)
    transform = transform or shapes_transform(data_dir)
    skips = SkipStats()
    images = ImageCache(transform, skips)
    result = FusionEvaluation({label: {} for label in splits.values()}, {label: {} for label in splits.values()},
                              skips=skips)
    chosen = {**DEFAULT_FINETUNE_STAGES, **(stages or {})}
    start_from = dict(DEFAULT_START_FROM if start_from is None else start_from)
    check_start_from(start_from, tasks)
    finetuned: dict[str, nn.Module] = {}  # task → its fine-tuned backbone, kept while a later task starts from it

    def record(label: str, name: str, value: float, baseline: float) -> None:
        result.metrics[label][name] = float(value)
        result.baselines[label][name] = float(baseline)

    def fit(task_name: str, task: ClassificationTask) -> FusionClassifier:
        stage = scaled(chosen[task_name], scale, seed)
        origin = start_from.get(task_name)  # the earlier task whose fine-tuned backbone this one starts from
        classifier, stage_result = finetune_classifier(finetuned[origin] if origin else model, task, stage,
                                                       progress=progress)
        result.finetune_stages.append(stage_result)
        result.notes[f"{task_name}_final_loss"] = stage_result.final_loss
        if origin:
            result.notes[f"{task_name}_starts_from"] = f"the {origin} fine-tune's backbone"
        if task_name in start_from.values():
            finetuned[task_name] = classifier.backbone
        return classifier

    if "retrieval" in tasks:
        start = time.perf_counter()
        for split, label in splits.items():
            gallery, read_skips = read_retrieval_gallery(classic_task_paths(data_dir, split)["retrieval"], data_dir)
            skips.merge(read_skips)
            ev = evaluate_retrieval(model, tokenizer, gallery, images, max_length=max_length, rerank_k=rerank_k,
                                    itm_only_images=itm_only_images, max_gallery_images=max_gallery_images,
                                    batch_size=batch_size)
            for k in RECALL_KS:
                record(label, f"retrieval_i2t_r{k}", ev.scores.image_to_text[k], ev.chance[f"image_to_text@{k}"])
                record(label, f"retrieval_t2i_r{k}", ev.scores.text_to_image[k], ev.chance[f"text_to_image@{k}"])
            result.notes[f"retrieval_{label}"] = {"method": ev.method, "images": ev.gallery_images,
                                                  "texts": ev.gallery_texts}
        result.seconds_by_task["retrieval"] = time.perf_counter() - start

    if "vqa" in tasks:
        start = time.perf_counter()
        vocabulary, train_items = _read_vqa_train(data_dir, skips)
        train = ClassificationTask(vqa_examples(train_items, vocabulary, skips), tokenizer, images,
                                   chosen["vqa"].max_length, len(vocabulary), loss="bce")
        classifier = fit("vqa", train)
        for split, label in splits.items():
            items = _read_vqa_split(data_dir, split, skips)
            task = ClassificationTask(_vqa_eval_examples(items), tokenizer, images, chosen["vqa"].max_length,
                                      len(vocabulary), loss="bce")
            scores = score_vqa(_vqa_predictions(classifier, task, items, vocabulary.answers, batch_size), items)
            record(label, "vqa_accuracy", scores.accuracy, vqa_prior_baseline(train_items, items).accuracy)
            result.notes[f"vqa_accuracy_by_type_{label}"] = scores.accuracy_by_type
        result.seconds_by_task["vqa"] = time.perf_counter() - start

    if ANSWER_TASK in tasks:
        start = time.perf_counter()
        vocabulary, train_items = _read_vqa_train(data_dir, skips)
        stage = scaled(chosen[ANSWER_TASK], scale, seed)
        seed_everything(stage.seed)
        answerer = model.answer_model()
        stage_result = Trainer(answerer, stage, AnswerGenerationTask(train_items, tokenizer, images, stage.max_length),
                               progress=progress).fit()
        result.finetune_stages.append(stage_result)
        result.notes[f"{ANSWER_TASK}_final_loss"] = stage_result.final_loss
        for split, label in splits.items():
            items = _read_vqa_split(data_dir, split, skips)
            task = AnswerGenerationTask(items, tokenizer, images, stage.max_length)
            baseline = vqa_prior_baseline(train_items, items).accuracy
            for metric, candidates in (("vqa_rank_accuracy", vocabulary.answers), ("vqa_generate_accuracy", None)):
                answers = task.predict(answerer, candidates, batch_size)
                scores = score_vqa({i.question_id: a for i, a in zip(items, answers, strict=True) if a is not None},
                                   items)
                record(label, metric, scores.accuracy, baseline)
                result.notes[f"{metric}_by_type_{label}"] = scores.accuracy_by_type
        result.seconds_by_task[ANSWER_TASK] = time.perf_counter() - start

    for name, reader, to_examples, baseline_fn, labels in (
        ("reasoning", read_reasoning, reasoning_examples, reasoning_baseline, REASONING_LABELS),
        ("entailment", read_entailment, entailment_examples, entailment_baseline, ENTAILMENT_LABELS),
    ):
        if name not in tasks:
            continue
        start = time.perf_counter()
        train_items, read_skips = reader(classic_task_paths(data_dir, "train")[name], data_dir)
        skips.merge(read_skips)
        stage_length = chosen[name].max_length
        examples = to_examples(train_items)
        # Reasoning's sentences say nothing about the label on their own: train on contrast pairs.
        groups = contrast_groups(examples) if name == "reasoning" else None
        classifier = fit(name, ClassificationTask(examples, tokenizer, images, stage_length, len(labels),
                                                  groups=groups))
        for split, label in splits.items():
            items, read_skips = reader(classic_task_paths(data_dir, split)[name], data_dir)
            skips.merge(read_skips)
            task = ClassificationTask(to_examples(items), tokenizer, images, stage_length, len(labels))
            predictions = task.predict(classifier, batch_size)
            record(label, f"{name}_accuracy", _class_accuracy(task, predictions),
                   baseline_fn(train_items, items).accuracy)
            by_kind: dict[str, list[bool]] = {}
            for item, p in zip(items, predictions, strict=True):
                by_kind.setdefault(item.kind or "-", []).append(p is not None and labels[p] == item.label)
            result.notes[f"{name}_accuracy_by_kind_{label}"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
            result.notes[f"{name}_accuracy_by_class_{label}"] = {
                str(labels[c]).lower(): acc for c, acc in per_class_accuracy(
                    [-1 if p is None else p for p in predictions], [e.target for e in task.examples]).items()}
        result.seconds_by_task[name] = time.perf_counter() - start
    result.notes["skipped"] = skips.summary()
    return result


def _read_vqa_train(data_dir: Path, skips: SkipStats) -> tuple[AnswerVocabulary, list[VQAItem]]:
    """The train split's answer vocabulary (never empty) and questions, for the VQA tasks."""
    vocabulary, vocab_skips = read_answer_vocabulary(classic_task_paths(data_dir, "train")["vqa_answers"])
    skips.merge(vocab_skips)
    if not len(vocabulary):
        raise ValueError(f"{data_dir}: the VQA answer vocabulary is empty")
    return vocabulary, _read_vqa_split(data_dir, "train", skips)


def _read_vqa_split(data_dir: Path, split: str, skips: SkipStats) -> list[VQAItem]:
    paths = shapes_split_paths(data_dir, split)
    items, read_skips = read_vqa(paths["vqa_questions"], paths["vqa_annotations"], data_dir)
    skips.merge(read_skips)
    if not items:
        raise ValueError(f"{paths['vqa_questions']}: no usable VQA question")
    return items


def check_start_from(start_from: Mapping[str, str], tasks: Sequence[str]) -> None:
    """Each task of `start_from` starts from a fine-tuning task run before it (FINETUNE_TASKS
    order) and, when the task itself is run, also among `tasks`."""
    for task, start in start_from.items():
        if task not in FINETUNE_TASKS or start not in FINETUNE_TASKS:
            raise ValueError(f"start_from {{{task!r}: {start!r}}}: both must be fine-tuning tasks {list(FINETUNE_TASKS)}")
        if FINETUNE_TASKS.index(start) >= FINETUNE_TASKS.index(task):
            raise ValueError(f"start_from {{{task!r}: {start!r}}}: {start} is fine-tuned after {task} "
                             f"(order {list(FINETUNE_TASKS)})")
        if task in tasks and start not in tasks:
            raise ValueError(f"{task} starts from the {start} fine-tune (start_from), but {start} is not among "
                             f"the tasks {list(tasks)}; add it or pass start_from={{}}")


def check_finetune(finetune: Mapping[str, object]) -> None:
    """A preset's fine-tuning overrides name only known downstream tasks."""
    unknown = sorted(set(finetune) - set(DEFAULT_FINETUNE_STAGES))
    if unknown:
        raise ValueError(f"finetune names unknown tasks {unknown}; known: {sorted(DEFAULT_FINETUNE_STAGES)}")
