"""The dual-encoder presets (CLIP, SigLIP, LiT) and ContrastiveTask: which loss a model gets,
CLIP's temperature (init, clamp after each step, no weight decay), SigLIP's t' and b, a tiny
CLIP run that learns, LiT's locked tower (bit-identical, eval mode) and the runners' results."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tessera.data.datasets import CaptionPairs, ImageCache, group_captions
from tessera.data.images import ImageTransform
from tessera.data.readers import read_coco_captions, shapes_split_paths
from tessera.data.records import SkipStats
from tessera.data.shapes import ShapesConfig, generate_shapes
from tessera.data.shapes_tasks import generate_classic_tasks
from tessera.data.templates import IGNORE_INDEX
from tessera.eval.retrieval import retrieval_recall
from tessera.models.dual_encoder import DualEncoder, DualEncoderConfig, SigLIPDualEncoder
from tessera.objectives.contrastive import clip_loss, siglip_loss
from tessera.presets import clip, lit, siglip
from tessera.text.clip_text import CLIPTextConfig
from tessera.text.tokenizer import train_bpe
from tessera.text.word_swaps import CountPhrases, WordSwapper
from tessera.train.checkpoint import load_checkpoint
from tessera.train.stage import StageConfig
from tessera.train.tasks import ContrastiveTask
from tessera.train.trainer import Trainer, build_optimizer
from tessera.vision.vit import ViTConfig
from tessera.zoo.core import SPLITS, ZooContext

MICRO_VISION = ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_layers=1, num_heads=2,
                         intermediate_size=64)
MICRO_TEXT = CLIPTextConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            max_position_embeddings=40)


@pytest.fixture(scope="module")
def shapes_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few dozen ShapesWorld images with every classic task file."""
    root = tmp_path_factory.mktemp("dual_shapes")
    generate_shapes(ShapesConfig(seed=0, num_train=40, num_val=2, num_test=12, num_test_comp=12), root,
                    progress=False)
    generate_classic_tasks(root, progress=False)
    return root


@pytest.fixture(scope="module")
def pairs_and_tokenizer(shapes_tasks: Path):
    captions, _ = read_coco_captions(shapes_split_paths(shapes_tasks, "train")["captions"], shapes_tasks)
    return group_captions(captions), train_bpe([c.caption for c in captions], vocab_size=300)


def micro_clip(vocab_size: int, eos_id: int) -> DualEncoder:
    text = MICRO_TEXT.model_copy(update={"vocab_size": vocab_size, "eos_token_id": eos_id})
    return DualEncoder(DualEncoderConfig(vision=MICRO_VISION, text=text, projection_dim=32))


def micro_siglip(vocab_size: int) -> SigLIPDualEncoder:
    config = siglip.tiny().model
    text = config.text.model_copy(update={"vocab_size": vocab_size, "max_position_embeddings": 40})
    return SigLIPDualEncoder(config.model_copy(update={"text": text}))


def images_cache() -> ImageCache:
    return ImageCache(ImageTransform(size=(64, 64)), SkipStats())


# --- ContrastiveTask: the loss follows the model or the objective name ---------------------------------


def test_contrastive_task_picks_the_loss(pairs_and_tokenizer) -> None:
    pairs, tok = pairs_and_tokenizer
    task = ContrastiveTask(pairs, tok, images_cache(), 40)
    batch = task.make_batch(list(range(8)))
    images, ids, mask = batch.pixels, batch.ids, batch.mask
    assert batch.negative_ids is None

    model = micro_clip(tok.vocab_size, tok.eos_id)
    loss, logs = task.loss(model, batch)
    expected = clip_loss(model.encode_image(images), model.encode_text(ids, mask), model.logit_scale)
    torch.testing.assert_close(loss, expected)
    assert task.objective(model) == ("itc", 1.0)

    sig = micro_siglip(tok.vocab_size)
    loss, logs = task.loss(sig, batch)
    expected = siglip_loss(sig.encode_image(images), sig.encode_text(ids, mask), sig.logit_scale, sig.logit_bias)
    torch.testing.assert_close(loss, expected)
    assert task.objective(sig) == ("sigmoid", 1.0) and logs["logit_bias"] == pytest.approx(-math.log(128))

    # An explicit objective wins, with its weight; the sigmoid loss needs a bias.
    itc_task = ContrastiveTask(pairs, tok, images_cache(), 40, {"itc": 0.5})
    loss, _ = itc_task.loss(sig, batch)
    expected = clip_loss(sig.encode_image(images), sig.encode_text(ids, mask), sig.logit_scale)
    torch.testing.assert_close(loss, 0.5 * expected)
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveTask(pairs, tok, images_cache(), 40, {"sigmoid": 1.0}).loss(model, batch)
    with pytest.raises(ValueError, match="no objective"):
        ContrastiveTask(pairs, tok, images_cache(), 40, {"mlm": 1.0})
    with pytest.raises(ValueError, match="one loss"):
        ContrastiveTask(pairs, tok, images_cache(), 40, {"itc": 1.0, "sigmoid": 1.0})


def test_contrastive_task_hard_negative_captions(pairs_and_tokenizer) -> None:
    pairs, tok = pairs_and_tokenizer
    task = ContrastiveTask(pairs[:12], tok, images_cache(), 40, hard_negatives=WordSwapper.for_shapesworld())
    torch.manual_seed(0)
    batch = task.make_batch(list(range(8)))
    assert batch is not None and batch.negative_ids is not None
    texts = [tok.decode(row[m].tolist()) for row, m in zip(batch.ids, batch.mask, strict=True)]
    negatives = [tok.decode(row[m].tolist()) for row, m in zip(batch.negative_ids, batch.negative_mask, strict=True)]
    # Captions cut at 40 tokens may lose their swap: those negatives are dropped, never kept as copies.
    assert 0 < len(negatives) <= len(texts) and not set(negatives) & set(texts)
    torch.manual_seed(0)
    again = task.make_batch(list(range(8)))  # the same draw gives the same negatives (resumable)
    assert again is not None and torch.equal(again.negative_ids, batch.negative_ids)

    model = micro_clip(tok.vocab_size, tok.eos_id)
    loss, _ = task.loss(model, batch)
    expected = clip_loss(model.encode_image(batch.pixels), model.encode_text(batch.ids, batch.mask), model.logit_scale,
                         hard_negative_texts=model.encode_text(batch.negative_ids, batch.negative_mask))
    torch.testing.assert_close(loss, expected)
    sig = micro_siglip(tok.vocab_size)
    sig_task = ContrastiveTask(pairs[:12], tok, images_cache(), 40, hard_negatives=WordSwapper.for_shapesworld())
    loss, _ = sig_task.loss(sig, batch)
    expected = siglip_loss(sig.encode_image(batch.pixels), sig.encode_text(batch.ids, batch.mask), sig.logit_scale,
                           sig.logit_bias, hard_negative_texts=sig.encode_text(batch.negative_ids, batch.negative_mask))
    torch.testing.assert_close(loss, expected)

    # A swap past the truncation point would make the positive its own negative: dropped.
    caption = "there are 2 shapes: a red circle and a blue square."
    short = [CaptionPairs(pairs[i].image, (caption,)) for i in range(2)]
    cut = ContrastiveTask(short, tok, images_cache(), len(tok.encode("there are 2 shapes:")) + 1,
                          hard_negatives=WordSwapper.for_shapesworld()).make_batch([0, 1])
    assert cut is not None and cut.negative_ids is None


def test_contrastive_task_count_objective(pairs_and_tokenizer) -> None:
    pairs, tok = pairs_and_tokenizer
    counts = CountPhrases(max_count=6)
    pairs = [*pairs[:7], CaptionPairs(pairs[7].image, ("a red circle.",))]  # an image without a count caption
    task = ContrastiveTask(pairs, tok, images_cache(), 40, {"itc": 1.0, "count": 0.5}, counts=counts)
    batch = task.make_batch(list(range(8)))
    assert batch is not None and batch.count_targets is not None and batch.count_ids is not None
    # Each image's target is the count its own captions state; no count caption: ignored.
    expected = [next(counts.count(c) for c in p.captions if counts.count(c)) - 1 for p in pairs[:7]]
    assert batch.count_targets.tolist() == [*expected, IGNORE_INDEX]
    phrases = [tok.decode(row[m].tolist()) for row, m in zip(batch.count_ids, batch.count_mask, strict=True)]
    assert phrases == counts.phrases()

    model = micro_clip(tok.vocab_size, tok.eos_id)
    loss, logs = task.loss(model, batch)
    img, txt = model.encode_image(batch.pixels), model.encode_text(batch.ids, batch.mask)
    count_logits = model.logit_scale.exp() * img[:7] @ model.encode_text(batch.count_ids, batch.count_mask).t()
    count_loss = F.cross_entropy(count_logits, torch.tensor(expected))
    torch.testing.assert_close(loss, clip_loss(img, txt, model.logit_scale) + 0.5 * count_loss)
    assert logs["count"] == pytest.approx(float(count_loss.detach()))
    # The same objective beside SigLIP's loss.
    sig = micro_siglip(tok.vocab_size)
    sig_task = ContrastiveTask(pairs, tok, images_cache(), 40, {"sigmoid": 1.0, "count": 1.0}, counts=counts)
    loss, logs = sig_task.loss(sig, batch)
    assert "count" in logs and "sigmoid" in logs
    with pytest.raises(ValueError, match="needs `counts`"):
        ContrastiveTask(pairs, tok, images_cache(), 40, {"itc": 1.0, "count": 1.0})
    with pytest.raises(ValueError, match="one loss"):
        ContrastiveTask(pairs, tok, images_cache(), 40, {"count": 1.0}, counts=counts)
    assert ContrastiveTask(pairs, tok, images_cache(), 40).make_batch([0, 1]).count_targets is None


def test_pad_to_max_length(pairs_and_tokenizer) -> None:
    pairs, tok = pairs_and_tokenizer
    ids, mask = ContrastiveTask(pairs, tok, images_cache(), 36, pad_to_max_length=True).encode_texts(["a red circle."])
    assert ids.shape == (1, 36) and int(mask.sum()) == len(tok.encode("a red circle.")) + 1
    ids, _ = ContrastiveTask(pairs, tok, images_cache(), 36).encode_texts(["a red circle."])
    assert ids.shape[1] == len(tok.encode("a red circle.")) + 1


# --- CLIP's temperature ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "after"), [(6.0, math.log(100.0)), (-0.5, 0.0)])
def test_temperature_is_clamped_after_each_step(pairs_and_tokenizer, start: float, after: float) -> None:
    pairs, tok = pairs_and_tokenizer
    model = micro_clip(tok.vocab_size, tok.eos_id)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))  # CLIP's init
    with torch.no_grad():
        model.logit_scale.fill_(start)
    stage = StageConfig(name="clip", trainable=["*"], objectives={"itc": 1.0}, steps=1, batch_size=8, lr=1e-4,
                        weight_decay=0.1)
    Trainer(model, stage, ContrastiveTask(pairs, tok, images_cache(), 40), progress=False).fit()
    assert float(model.logit_scale.detach()) == pytest.approx(after, abs=1e-7)


def test_temperature_gets_no_weight_decay(pairs_and_tokenizer) -> None:
    pairs, tok = pairs_and_tokenizer
    model = micro_clip(tok.vocab_size, tok.eos_id)
    optimizer = build_optimizer(model, clip.tiny().stage)
    (group,) = [g for g in optimizer.param_groups if any(p is model.logit_scale for p in g["params"])]
    assert group["weight_decay"] == 0.0
    assert any(g["weight_decay"] == clip.tiny().stage.weight_decay for g in optimizer.param_groups)


def test_siglip_initial_scale_and_bias() -> None:
    paper = SigLIPDualEncoder(siglip.paper().model.model_copy(update={
        "vision": siglip.tiny().model.vision, "text": siglip.tiny().model.text}))
    assert float(paper.logit_scale.detach()) == pytest.approx(math.log(10.0))
    assert float(paper.logit_bias.detach()) == -10.0
    # the tiny recipe keeps t' = ln 10 and starts b at the log-prior of its batch
    model = SigLIPDualEncoder(siglip.tiny().model)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(10.0))
    assert float(model.logit_bias.detach()) == pytest.approx(-math.log(siglip.tiny().stage.batch_size))
    assert model.cfg.vision.map_head and not model.cfg.text.causal
    assert siglip.tiny().stage.objectives == {"sigmoid": 1.0, "count": 1.0}


def test_paper_dimensions() -> None:
    c = clip.paper().model
    assert (c.vision.image_size, c.vision.patch_size, c.vision.hidden_size, c.vision.num_layers) == (224, 16, 768, 12)
    assert (c.text.hidden_size, c.text.num_layers, c.text.max_position_embeddings, c.projection_dim) == (512, 12, 77, 512)
    s = siglip.paper().model
    assert s.vision.map_head and s.vision.hidden_size == 768 and s.text.max_position_embeddings == 64
    assert lit.paper().vision.hidden_size == 768 and lit.paper().pretrain_stage is None


# --- a tiny CLIP run learns ---------------------------------------------------------------------------------


def test_tiny_clip_learns(pairs_and_tokenizer) -> None:
    """Eight image-caption pairs, one caption each: 40 ITC steps pull the pairs together."""
    pairs, tok = pairs_and_tokenizer
    probe = [CaptionPairs(p.image, p.captions[:1]) for p in pairs[:8]]
    model = micro_clip(tok.vocab_size, tok.eos_id)
    task = ContrastiveTask(probe, tok, images_cache(), 40)

    @torch.no_grad()
    def scores() -> tuple[float, float, float]:
        model.eval()
        images = task.images.normalize(torch.stack([task.images.get(p.image) for p in probe]))
        ids, mask = task.encode_texts([p.captions[0] for p in probe])
        img, txt = model.encode_image(images), model.encode_text(ids, mask)
        loss = float(clip_loss(img, txt, torch.tensor(math.log(1 / 0.07))))  # at a fixed scale
        recall = retrieval_recall(img @ txt.t(), list(range(len(probe))), ks=(1,))
        return loss, recall.image_to_text[1], recall.text_to_image[1]

    loss_before, _, _ = scores()
    stage = StageConfig(name="clip", trainable=["*"], objectives={"itc": 1.0}, steps=40, batch_size=8, lr=3e-3,
                        warmup_steps=5, weight_decay=0.1)
    Trainer(model, stage, task, progress=False).fit()
    loss_after, i2t_r1, t2i_r1 = scores()
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert i2t_r1 >= 0.5 and t2i_r1 >= 0.5, (i2t_r1, t2i_r1)  # chance is 1/8


# --- LiT: the locked tower --------------------------------------------------------------------------------


def micro_lit(steps: int = 4) -> lit.LiTPreset:
    preset = lit.tiny()
    return preset.model_copy(update={
        "vision": MICRO_VISION, "text": MICRO_TEXT, "tokenizer_vocab_size": 300,
        "pretrain_stage": preset.pretrain_stage.model_copy(update={"steps": steps, "batch_size": 16, "warmup_steps": 1}),
        "lit_stage": preset.lit_stage.model_copy(update={"steps": steps, "batch_size": 16, "warmup_steps": 1}),
    })


def test_lit_keeps_the_locked_tower_bit_identical(shapes_tasks: Path, tmp_path: Path) -> None:
    result = lit.run(ZooContext(shapes_tasks, tmp_path, progress=False), micro_lit())
    pretrained = load_checkpoint(tmp_path / "pretrain" / "final").model.state_dict()
    after = load_checkpoint(tmp_path / "lit" / "final").model
    for name, tensor in after.vision_model.state_dict().items():
        assert torch.equal(tensor, pretrained[name]), name
    assert torch.equal(after.visual_projection.weight, torch.eye(MICRO_VISION.hidden_size))
    # the text side did train
    assert result.trainable_params_by_stage["lit"] == sum(
        p.numel() for n, p in after.named_parameters() if not n.startswith(lit.LOCKED)
    )
    assert set(result.trainable_params_by_stage) == {"pretrain", "lit"}


def test_lit_tower_stays_in_eval_mode_and_frozen(pairs_and_tokenizer) -> None:
    pairs, tok = pairs_and_tokenizer
    model = DualEncoder(micro_lit().dual_encoder_config(MICRO_TEXT.model_copy(
        update={"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id})))
    tower = lit.AttributeClassifier(MICRO_VISION).vision_model
    lit.lock_image_tower(model, tower)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes: list[tuple[bool, bool]] = []

    class Recording(ContrastiveTask):
        def loss(self, m, batch):
            modes.append((m.vision_model.training, m.text_model.training))
            return super().loss(m, batch)

    stage = micro_lit(steps=3).lit_stage
    Trainer(model, stage, Recording(pairs, tok, images_cache(), 40), progress=False).fit()
    assert modes == [(False, True)] * 3
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and not any(k.startswith(lit.LOCKED) for k in changed)
    assert any(k.startswith("text_model") for k in changed)


def test_lit_refuses_a_stage_that_trains_the_image_side(shapes_tasks: Path, tmp_path: Path) -> None:
    preset = micro_lit()
    bad = preset.model_copy(update={"lit_stage": preset.lit_stage.model_copy(update={"trainable": ["*"]})})
    with pytest.raises(ValueError, match="must not train the image side"):
        lit.run(ZooContext(shapes_tasks, tmp_path, progress=False), bad)


def test_object_labels_skip_bad_annotations(shapes_tasks: Path, tmp_path: Path) -> None:
    import json

    data = json.loads((shapes_tasks / "train" / "objects.json").read_text())
    data["annotations"][0]["color"] = "mauve"
    data["annotations"][1]["image_id"] = 12345
    data["images"][2]["file_name"] = "images/train/nope.png"
    path = tmp_path / "objects.json"
    path.write_text(json.dumps(data))
    examples, skips = lit.read_object_labels(path, shapes_tasks)
    assert len(examples) == 39
    assert skips.reasons == {"unknown colour, shape or size": 1, "image file not found": 1,
                             "annotation of an unknown or skipped image": 1 + sum(
                                 a["image_id"] == data["images"][2]["id"] for a in data["annotations"])}
    assert all(len(labels) % 4 == 0 for _, labels in examples)


# --- every runner returns the zoo's metrics with baselines ---------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_runner_reports_every_metric_with_its_baseline(shapes_tasks: Path, tmp_path: Path, name: str) -> None:
    module = {"clip": clip, "siglip": siglip}[name]
    preset = module.tiny()
    model = preset.model.model_copy(update={
        "vision": preset.model.vision.model_copy(update={"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                                         "intermediate_size": 64}),
        "text": preset.model.text.model_copy(update={"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                                     "intermediate_size": 64,
                                                     **({"head_size": 32} if name == "siglip" else {})}),
    })
    small = preset.model_copy(update={"model": model, "tokenizer_vocab_size": 300,
                                      "stage": preset.stage.model_copy(update={"steps": 2, "batch_size": 16,
                                                                               "warmup_steps": 1})})
    result = module.run(ZooContext(shapes_tasks, tmp_path, progress=False), small)
    expected = {f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    expected |= {"zeroshot_top1", "zeroshot_shape_top1", "zeroshot_color_top1", "zeroshot_count_top1"}
    assert set(result.metrics) == set(result.baselines) == set(SPLITS.values())
    for label in SPLITS.values():
        assert set(result.metrics[label]) == set(result.baselines[label]) == expected
        assert all(0.0 <= v <= 1.0 for v in result.metrics[label].values())
        assert result.baselines[label]["retrieval_i2t_r10"] > result.baselines[label]["retrieval_i2t_r1"]
    assert (tmp_path / name / "final" / "model.safetensors").is_file()
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize(("objective", "loss_name"), [("itc", "clip_loss"), ("sigmoid", "siglip_loss")])
def test_distributed_flag_reaches_the_loss(pairs_and_tokenizer, monkeypatch: pytest.MonkeyPatch,
                                           objective: str, loss_name: str) -> None:
    import tessera.train.tasks as tasks

    pairs, tok = pairs_and_tokenizer
    seen: list[bool] = []
    real = getattr(tasks, loss_name)

    def spy(*args, distributed: bool = False, **kwargs):
        seen.append(distributed)
        return real(*args, distributed=distributed, **kwargs)

    monkeypatch.setattr(tasks, loss_name, spy)
    model = micro_clip(tok.vocab_size, tok.eos_id) if objective == "itc" else SigLIPDualEncoder(
        siglip.tiny().model.model_copy(update={"text": siglip.tiny().model.text.model_copy(
            update={"vocab_size": tok.vocab_size, "max_position_embeddings": 40})}))
    for distributed in (False, True):
        task = ContrastiveTask(pairs, tok, images_cache(), 40, {objective: 1.0}, distributed=distributed)
        task.loss(model, task.make_batch([0, 1, 2]))  # one process: the global batch is the local one
    assert seen == [False, True]
