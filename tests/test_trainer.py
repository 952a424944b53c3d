"""The trainer: freezing, optimizer groups, schedule, checkpoints, exact resume, devices, and
data parallelism (2 gloo processes equal 1 process over the whole batches)."""

from __future__ import annotations

import json
import math
from collections import namedtuple
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tessera.config import ConfigError
from tessera.data.collate import Sample
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.pipeline import scaled
from tessera.text.llama import LlamaConfig, LlamaDecoder
from tessera.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tessera.train.freeze import set_trainable
from tessera.train.stage import StageConfig
from tessera.train.tasks import ConversationTask, LanguageModelTask
from tessera.train.trainer import (
    EpochSampler,
    Trainer,
    build_optimizer,
    lr_factor,
    move_to,
    resolve_device,
    training_device,
)
from tessera.vision.vit import ViTConfig

TINY_LLM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2)
TINY_VIT = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


class CharTokenizer:
    """Enough of the Tokenizer interface for LanguageModelTask: one id per character."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % 60) for c in text]


class FakeConversations:
    """A dataset of fixed samples with one 16×16 image each, for ConversationTask."""

    def __init__(self, model: LVLM, n: int = 24) -> None:
        from tessera.data.records import SkipStats

        g = torch.Generator().manual_seed(1)
        n_img = model.num_image_tokens(16, 16)
        self.samples = []
        for _ in range(n):
            text = torch.randint(10, 64, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            ids = [1] + [5] * n_img + text
            labels = [-100] * (1 + n_img) + text
            self.samples.append(Sample(ids, labels, [torch.randint(0, 255, (3, 16, 16), generator=g, dtype=torch.uint8)]))
        self.skips = SkipStats()
        self.tokenizer = CharTokenizer()

        class _Images:
            @staticmethod
            def normalize(px: torch.Tensor) -> torch.Tensor:
                return px.float() / 255

        self.images = _Images()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def tiny_lvlm() -> LVLM:
    return LVLM(LVLMConfig(vision=TINY_VIT, llm=TINY_LLM, image_token_id=5))


def stage(**kw) -> StageConfig:
    base = dict(name="s", trainable=["*"], steps=6, batch_size=4, lr=1e-2, warmup_steps=2, log_every=1)
    return StageConfig(**{**base, **kw})


def test_frozen_modules_keep_weights_get_no_grad_and_stay_in_eval(tmp_path: Path) -> None:
    model = tiny_lvlm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = ConversationTask(FakeConversations(model), packing=True)
    result = Trainer(model, stage(trainable=["connector"]), task, progress=False).fit()
    assert result.trainable.frozen_modules == ("language_model", "vision_tower")
    assert result.trainable.trainable == sum(p.numel() for p in model.connector.parameters())
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == name.startswith("connector"), name
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("connector"))
    set_trainable(model, ["connector"])
    assert model.connector.training and not model.vision_tower.training and not model.language_model.training


def test_unknown_trainable_prefix_is_an_error() -> None:
    with pytest.raises(ValueError, match="match no parameter"):
        set_trainable(tiny_lvlm(), ["projector"])


def test_optimizer_groups_decay_and_lr_scale() -> None:
    model = tiny_lvlm()
    set_trainable(model, ["*"])
    opt = build_optimizer(model, stage(weight_decay=0.1, lr_scale={"language_model": 0.1}))
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    emb = model.language_model.embed_tokens.weight
    norm = model.language_model.norm.weight
    q = model.language_model.layers[0].self_attn.q_proj.weight
    fc = model.connector.linear_1.weight
    assert by_param[id(emb)]["weight_decay"] == 0.0 and by_param[id(norm)]["weight_decay"] == 0.0
    assert by_param[id(q)]["weight_decay"] == 0.1
    assert math.isclose(by_param[id(q)]["base_lr"], 1e-3) and math.isclose(by_param[id(fc)]["base_lr"], 1e-2)


def test_schedule_warms_up_then_decays_to_min_ratio() -> None:
    s = stage(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    factors = [lr_factor(i, s) for i in range(10)]
    assert factors[0] == 0.5 and factors[1] == 1.0
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert math.isclose(lr_factor(10, s), 0.1)


def test_sampler_is_a_function_of_seed_and_batch_index() -> None:
    a, b = EpochSampler(10, 3, seed=4), EpochSampler(10, 3, seed=4)
    seq = [a.batch(k) for k in range(7)]
    assert seq == [b.batch(k) for k in range(7)]
    assert sorted(sum(seq[:3], [])) == sorted(set(sum(seq[:3], [])))  # no repeats within an epoch
    assert a.batch(5) == EpochSampler(10, 3, seed=4).batch(5)  # random access (resume)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_continues_bit_identically(tmp_path: Path, packing: bool) -> None:
    def fresh() -> LVLM:
        torch.manual_seed(0)
        return tiny_lvlm()

    cfg = stage(steps=6, trainable=["connector", "language_model"], packing=packing)
    straight = fresh()
    Trainer(straight, cfg, ConversationTask(FakeConversations(straight), packing=packing), progress=False).fit()

    interrupted = fresh()
    Trainer(interrupted, cfg, ConversationTask(FakeConversations(interrupted), packing=packing),
            out_dir=tmp_path, progress=False, stop_after=3).fit()
    assert (tmp_path / "step-000003" / "trainer_state.pt").is_file()
    torch.manual_seed(123)  # resume must not depend on the caller's RNG state
    resumed = fresh()
    Trainer(resumed, cfg, ConversationTask(FakeConversations(resumed), packing=packing), progress=False).fit(
        resume_from=tmp_path / "step-000003")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_language_model_task_learns() -> None:
    model = LlamaDecoder(TINY_LLM)
    texts = ["a red circle.", "a blue square.", "two green stars."] * 8
    task = LanguageModelTask(texts, CharTokenizer(), max_length=32)
    result = Trainer(model, stage(steps=40, batch_size=6, lr=1e-2, log_every=5), task, progress=False).fit()
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]


def test_checkpoint_round_trip_and_atomic_overwrite(tmp_path: Path) -> None:
    model = tiny_lvlm()
    path = save_checkpoint(tmp_path / "ck", model, meta={"template": "vicuna"})
    save_checkpoint(path, model, meta={"template": "chatml"})  # replaces in one rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    loaded = load_checkpoint(path)
    assert loaded.kind == "lvlm" and loaded.meta["template"] == "chatml"
    for (k, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_tied_embeddings_survive_a_round_trip(tmp_path: Path) -> None:
    model = LlamaDecoder(TINY_LLM.model_copy(update={"tie_word_embeddings": True}))
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ck", model)).model
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_missing_and_foreign_checkpoints_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="import-hf"):
        load_checkpoint(hf)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(empty)


def test_bad_config_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match="field 'batch_size'"):
        StageConfig.parse({"name": "x", "trainable": ["*"], "steps": 1, "batch_size": 0, "lr": 1e-3})
    with pytest.raises(ConfigError, match="field 'bogus'"):
        StageConfig.parse({"name": "x", "trainable": ["*"], "steps": 1, "batch_size": 1, "lr": 1e-3, "bogus": 1})
    with pytest.raises(ConfigError, match="act"):
        LlamaConfig.parse({"act": "swish2"})


def test_a_pipeline_stage_is_seeded_by_the_run_plus_its_own_seed() -> None:
    stage = StageConfig(name="s", trainable=["*"], steps=100, batch_size=2, lr=1e-3, warmup_steps=10)
    assert scaled(stage, 1.0, 5).seed == 5  # a stage without its own seed follows the run
    assert scaled(stage.model_copy(update={"seed": 3}), 1.0, 5).seed == 8  # one stage reseeded alone
    short = scaled(stage, 0.1, 5)
    assert (short.steps, short.warmup_steps) == (10, 1)


# ------------------------------------------------------------------------------ device


def test_move_to_moves_every_tensor_at_any_depth_and_nothing_else() -> None:
    """The batch shapes the tasks build: dataclasses holding tensors, lists of images, dicts of
    nested dataclasses, tuples and named tuples. `meta` stands in for a GPU (no CPU test can
    allocate on one)."""
    Pair = namedtuple("Pair", "ids mask")

    @dataclass
    class Labels:
        ids: torch.Tensor
        note: str = "kept"

    @dataclass
    class Nested:
        images: list[torch.Tensor]
        labels: dict[str, Labels]
        pair: Pair
        extra: tuple[torch.Tensor, int]
        count: int = 3
        cached: list[int] = field(default_factory=lambda: [1, 2], init=False)

    batch = Nested(images=[torch.zeros(3, 4, 4), torch.ones(3, 2, 2)], labels={"colour": Labels(torch.arange(4))},
                   pair=Pair(torch.ones(2), torch.zeros(2, dtype=torch.bool)), extra=(torch.ones(1), 7))
    moved = move_to(batch, torch.device("meta"))
    leaves = [*moved.images, moved.labels["colour"].ids, *moved.pair, moved.extra[0]]
    assert all(t.is_meta for t in leaves)
    assert not any(t.is_meta for t in [*batch.images, batch.labels["colour"].ids])  # the original is untouched
    assert isinstance(moved.pair, Pair) and moved.pair.mask.dtype == torch.bool
    assert (moved.labels["colour"].note, moved.extra[1], moved.count, moved.cached) == ("kept", 7, 3, [1, 2])


def test_devices_are_checked_before_any_training() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "mps", "not a device"):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="no CUDA GPU"), training_device("cuda"):
            pass


def test_a_trainer_takes_the_device_of_the_innermost_block(tmp_path: Path) -> None:
    model = LlamaDecoder(TINY_LLM)
    stage = StageConfig(name="lm", trainable=["*"], steps=1, batch_size=2, lr=1e-3)
    task = LanguageModelTask(["abc", "defg"], CharTokenizer(), max_length=8)
    assert Trainer(model, stage, task).device == torch.device("cpu")
    with training_device("cpu") as device:
        trainer = Trainer(model, stage, task)
        assert trainer.device == device == torch.device("cpu")
        trainer.fit()
    assert next(model.parameters()).device == torch.device("cpu")  # back where it came from


# ---------------------------------------------------------------------- data parallel

DP_TEXTS = ["abcdefgh", "bcdefghi", "cdefghij", "defghijk", "efghijkl", "fghijklm", "ghijklmn", "hijklmno"]


def _dp_stage(out: bool) -> StageConfig:
    # Texts of one length: the token-mean loss of the global batch is then the mean of the ranks'.
    return StageConfig(name="lm", trainable=["*"], steps=3, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=1,
                       max_grad_norm=1.0, log_every=1, save_every=2 if out else None)


def _dp_train(out_dir: Path | None) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    torch.manual_seed(0)
    model = LlamaDecoder(TINY_LLM)
    result = Trainer(model, _dp_stage(out_dir is not None), LanguageModelTask(DP_TEXTS, CharTokenizer(), max_length=12),
                     out_dir=out_dir, progress=False).fit()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result.history


def _dp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        state, history = _dp_train(Path(out_dir) / "run")
        torch.save({"state": state, "history": history}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_steps_one_process_takes_over_the_global_batch(tmp_path: Path, free_port: int) -> None:
    """gloo, 2 ranks × 2 examples per micro-batch, 2 micro-batches a step, clipping on: the
    weights after 3 steps and the logged losses equal one process's over batches of 4. Rank 0
    alone writes the checkpoints, complete, mid-stage and final."""
    mp.spawn(_dp_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    state, history = _dp_train(None)
    torch.manual_seed(0)
    before = LlamaDecoder(TINY_LLM).state_dict()
    assert len(history) == 3
    assert any(not torch.equal(before[k], v) for k, v in state.items())  # the single run did move
    for r in ranks:
        for name, value in state.items():
            torch.testing.assert_close(r["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert [h["step"] for h in r["history"]] == [h["step"] for h in history]
        for got, want in zip(r["history"], history, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    for name in ("step-000002", "final"):
        saved = load_checkpoint(tmp_path / "run" / name)
        assert saved.trainer_state_path.is_file()
    torch.testing.assert_close(load_checkpoint(tmp_path / "run" / "final").model.state_dict(), ranks[0]["state"])
