"""The one trainer. It runs a stage (StageConfig) of any recipe on any model through a
Task, which owns the data and the objectives:

    task.num_examples                      examples in one epoch
    task.make_batch(indices) -> batch      None when every example was skipped
    task.loss(model, batch) -> (loss, logs)
    task.after_step(model)                 e.g. clamp CLIP's logit scale
    task.skips                             SkipStats of bad examples
    task.start_at(step)                    optional: told the step a stage starts (0) or resumes at

The trainer owns freezing, AdamW with per-module learning rates, warm-up + cosine
schedule, gradient accumulation and clipping, bf16 autocast, seeding, checkpoints and an
exact resume (model, optimizer, schedule, RNG and data position).

Device: a stage trains where `device` says (the Trainer argument, else the innermost
`training_device(...)` block, else the CPU). The model moves there for the stage, every batch
follows it (`move_to`), and the model goes back to the device it came on when the stage ends,
so that data preparation and evaluation, which run on the CPU, never see a GPU tensor.

Data parallel (under torchrun, `tessera.train.parallel`): every rank draws the same global
batch of `stage.batch_size` examples and builds its strided slice; gradients are averaged
over ranks after the step's micro-batches (one all-reduce), so N processes take the step one
process takes over the whole batch (exactly, when the loss is a mean over examples and the
slices are equal; a loss averaged over tokens weighs each rank's slice alike, as DDP does). A
batch is skipped on every rank when any rank's slice has no usable example. The logged loss is
the global mean (other logs are rank 0's); rank 0 alone shows progress and writes checkpoints.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tessera.data.records import SkipStats
from tessera.nn.lora import apply_lora, lora_trainable_prefixes
from tessera.objectives.distributed import (
    all_ranks,
    average_gradients,
    mean_over_ranks,
    world_size_and_rank,
)
from tessera.train.checkpoint import load_checkpoint, save_checkpoint
from tessera.train.freeze import TrainableReport, set_trainable
from tessera.train.parallel import is_main_process, wait_for_everyone
from tessera.train.stage import StageConfig


class Task(Protocol):
    skips: SkipStats

    @property
    def num_examples(self) -> int: ...

    def make_batch(self, indices: list[int]) -> Any | None: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]: ...

    def after_step(self, model: nn.Module) -> None: ...


@dataclass
class StageResult:
    stage: str
    steps: int
    seconds: float
    final_loss: float
    trainable: TrainableReport
    history: list[dict[str, float]] = field(default_factory=list)
    skips: SkipStats = field(default_factory=SkipStats)


_TRAINING_DEVICE: ContextVar[torch.device | None] = ContextVar("training_device", default=None)  # None: the CPU


def resolve_device(spec: str | torch.device) -> torch.device:
    """A torch.device from "cpu", "cuda", "cuda:1", ...; a clear error when it is not there."""
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"unknown device {spec!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: this PyTorch sees no CUDA GPU (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif device.type != "cpu":
        raise ValueError(f"device {spec!r}: Tessera trains on cpu or cuda")
    return device


@contextmanager
def training_device(spec: str | torch.device) -> Iterator[torch.device]:
    """Every Trainer made inside the block trains on this device (the CLI's --device)."""
    device = resolve_device(spec)
    token = _TRAINING_DEVICE.set(device)
    try:
        yield device
    finally:
        _TRAINING_DEVICE.reset(token)


def move_to(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor on `device`: tensors inside dataclasses, lists, tuples and
    dicts, at any depth; everything else as it is."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if is_dataclass(batch) and not isinstance(batch, type):
        return replace(batch, **{f.name: move_to(getattr(batch, f.name), device) for f in fields(batch) if f.init})
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        moved = [move_to(v, device) for v in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    return batch


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_multiplier(name: str, scales: dict[str, float]) -> float:
    best, best_len = 1.0, -1
    for prefix, scale in scales.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = scale, len(prefix)
    return best


def build_optimizer(model: nn.Module, stage: StageConfig) -> torch.optim.AdamW:
    """AdamW with one group per (lr multiplier, decay) pair. Biases, norms, scalars (the
    logit scale) and embeddings get no weight decay."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and id(p) not in embedding_params
        groups.setdefault((_lr_multiplier(name, stage.lr_scale), decay), []).append(p)
    param_groups = [
        {"params": ps, "lr": stage.lr * mult, "base_lr": stage.lr * mult,
         "weight_decay": stage.weight_decay if decay else 0.0}
        for (mult, decay), ps in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=stage.lr, betas=stage.betas)


def lr_factor(step: int, stage: StageConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * cosine


class EpochSampler:
    """Seeded shuffling by epoch: batch k of the run is a pure function of (seed, k), so the
    data position after resume is just the batch counter."""

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if num_examples == 0:
            raise ValueError("the stage's dataset is empty")
        self.n, self.bs, self.seed = num_examples, batch_size, seed
        self.per_epoch = max(1, num_examples // batch_size)  # drop the ragged last batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def batch(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.bs : (i + 1) * self.bs].tolist()


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        stage: StageConfig,
        task: Task,
        *,
        out_dir: str | Path | None = None,
        checkpoint_meta: dict[str, Any] | None = None,
        tokenizer_file: str | Path | None = None,
        progress: bool = True,
        stop_after: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.model, self.stage, self.task = model, stage, task
        self.device = resolve_device(device) if device is not None else _TRAINING_DEVICE.get() or torch.device("cpu")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_meta = checkpoint_meta or {}
        self.tokenizer_file = tokenizer_file
        self.progress = progress
        self.stop_after = stop_after  # for tests: stop (and save) early, as if interrupted

    def _state(self, step: int, optimizer: torch.optim.Optimizer, batches_seen: int) -> dict[str, Any]:
        return {
            "stage": self.stage.name,
            "stage_config": self.stage.to_dict(),
            "step": step,
            "batches_seen": batches_seen,
            "optimizer": optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                **({"cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
            },
        }

    def save(self, path: Path, step: int, optimizer: torch.optim.Optimizer, batches_seen: int) -> Path:
        """Rank 0 writes (the ranks hold the same weights); the others wait until it is complete."""
        if is_main_process():
            save_checkpoint(
                path, self.model, meta={**self.checkpoint_meta, "stage": self.stage.name, "step": step},
                tokenizer_file=self.tokenizer_file, trainer_state=self._state(step, optimizer, batches_seen),
            )
        wait_for_everyone()
        return path

    def fit(self, resume_from: str | Path | None = None) -> StageResult:
        home = _model_device(self.model)
        try:
            return self._fit(resume_from)
        finally:
            self.model.to(home)

    def _fit(self, resume_from: str | Path | None) -> StageResult:
        stage, model, device = self.stage, self.model, self.device
        seed_everything(stage.seed)
        trainable = list(stage.trainable)
        if stage.lora is not None:
            # Before the optimizer exists, so it holds the adapters; a model that already carries
            # these adapters (an earlier stage) keeps them, and a resume loads them below.
            apply_lora(model, stage.lora)
            trainable += lora_trainable_prefixes(model)
        model.to(device)  # before the optimizer, whose state lives beside the parameters
        report = set_trainable(model, trainable)
        optimizer = build_optimizer(model, stage)
        params = [p for p in model.parameters() if p.requires_grad]
        world, rank = world_size_and_rank()
        if stage.batch_size % world:
            raise ValueError(f"stage {stage.name!r}: batch_size {stage.batch_size} (the global batch) does not "
                             f"split over {world} processes")
        sampler = EpochSampler(self.task.num_examples, stage.batch_size, stage.seed)
        step = batches_seen = 0
        if resume_from is not None:
            step, batches_seen = self._resume(Path(resume_from), optimizer)
        start_at = getattr(self.task, "start_at", None)
        if callable(start_at):
            start_at(step)  # tasks whose objectives follow the step (ALBEF's α ramp) resume in place
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=stage.bf16)
        history: list[dict[str, float]] = []
        bar = tqdm(total=stage.steps, initial=step, desc=f"train {stage.name}",
                   disable=not self.progress or rank != 0, dynamic_ncols=True, leave=True)
        start, last_loss, window = time.perf_counter(), float("nan"), []
        # Data in which nothing is usable would otherwise draw empty batches forever.
        max_empty_in_a_row, empty_in_a_row = 10 * sampler.per_epoch, 0
        while step < stage.steps:
            factor = lr_factor(step, stage)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            logs_acc: dict[str, float] = {}
            micro = 0
            while micro < stage.grad_accum:
                batch = self.task.make_batch(sampler.batch(batches_seen)[rank::world])
                batches_seen += 1
                if not all_ranks(batch is not None, device):
                    self.task.skips.skip("batch with no usable example", f"batch {batches_seen - 1}")
                    empty_in_a_row += 1
                    if empty_in_a_row >= max_empty_in_a_row:
                        raise ValueError(f"stage {stage.name!r}: {empty_in_a_row} batches in a row (10 epochs) had "
                                         f"no usable example; {self.task.skips.summary()}")
                    continue
                empty_in_a_row = 0
                if device.type != "cpu":
                    batch = move_to(batch, device)
                with autocast:
                    loss, logs = self.task.loss(model, batch)
                (loss / stage.grad_accum).backward()
                for k, v in {"loss": float(loss.detach()), **logs}.items():
                    logs_acc[k] = logs_acc.get(k, 0.0) + v / stage.grad_accum
                micro += 1
            if world > 1:
                average_gradients(params)
                logs_acc["loss"] = mean_over_ranks(logs_acc["loss"], device)
            if stage.max_grad_norm is not None:
                logs_acc["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.task.after_step(model)
            step += 1
            last_loss = logs_acc["loss"]
            window.append(last_loss)
            if step % stage.log_every == 0 or step == stage.steps:
                # "loss" is the mean over the steps since the last entry; the other logs are this step's.
                mean_loss = sum(window) / len(window)
                history.append({"step": step, "lr": stage.lr * factor, **logs_acc, "loss": mean_loss})
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                window = []
            bar.update(1)
            at_save = stage.save_every is not None and step % stage.save_every == 0
            stopping = self.stop_after is not None and step >= self.stop_after
            if self.out_dir is not None and (at_save or stopping) and step < stage.steps:
                self.save(self.out_dir / f"step-{step:06d}", step, optimizer, batches_seen)
            if stopping:
                break
        bar.close()
        if self.out_dir is not None and step == stage.steps:
            self.save(self.out_dir / "final", step, optimizer, batches_seen)
        model.eval()
        return StageResult(
            stage=stage.name, steps=step, seconds=time.perf_counter() - start, final_loss=last_loss,
            trainable=report, history=history, skips=self.task.skips,
        )

    def _resume(self, path: Path, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        ckpt = load_checkpoint(path)
        if not ckpt.trainer_state_path.is_file():
            raise FileNotFoundError(f"{path}: no trainer_state.pt, cannot resume training from it")
        self.model.load_state_dict(ckpt.model.state_dict())
        # On the CPU first: a run saved on a GPU resumes anywhere (the optimizer moves its state
        # to the parameters' device itself).
        state = torch.load(ckpt.trainer_state_path, weights_only=False, map_location="cpu")
        if state["stage"] != self.stage.name:
            raise ValueError(f"{path} was saved by stage {state['stage']!r}, not {self.stage.name!r}")
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        return state["step"], state["batches_seen"]
