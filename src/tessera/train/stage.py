"""A training stage, declared as data: which modules train, their learning rates, the
objectives, the data, and how long. A recipe is a list of stages run in order."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import field_validator, model_validator

from tessera.config import Config
from tessera.nn.lora import LoraConfig


class StageConfig(Config):
    name: str
    # Module-name prefixes that train (e.g. ["connector"], ["connector", "language_model"]);
    # ["*"] trains everything. Every other parameter is frozen and its module put in eval mode.
    trainable: list[str]
    objectives: dict[str, float] = {"lm": 1.0}  # objective name → weight
    data: str = "llava_instruct"  # which file of the dataset the stage reads (the task resolves it)
    steps: int
    batch_size: int
    grad_accum: int = 1
    lr: float
    lr_scale: dict[str, float] = {}  # module-name prefix → multiplier of lr (longest prefix wins)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    packing: bool = True
    group_by_image: bool = False  # merge an image's single-turn conversations into multi-turn ones
    max_length: int = 512
    seed: int = 0  # in a pipeline, added to the run's seed (`pipeline.scaled`): reseeds this stage alone
    log_every: int = 10
    save_every: int | None = None  # also saves at the end when an output folder is given
    # LoRA adapters the trainer puts on the model before the stage (kept if the model already
    # carries the same ones); they train on top of `trainable`, which may then be empty.
    lora: LoraConfig | None = None

    @field_validator("steps", "batch_size", "grad_accum", "max_length", "log_every")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be ≥ 1")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError("must be in (0, 1)")
        return v

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if not self.trainable and self.lora is None:
            raise ValueError("trainable must name at least one module prefix (or '*'), unless lora is set")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be < steps {self.steps}")
        if not self.objectives or any(w <= 0 for w in self.objectives.values()):
            raise ValueError("objectives need at least one entry, each with a positive weight")
        return self


def check_stages(stages: Sequence[StageConfig], objectives: Sequence[str], system: str) -> None:
    """A recipe's stages: unique names, and only objectives that `system` (a model's name, for
    the message) trains."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names repeat: {names}")
    for stage in stages:
        unknown = sorted(set(stage.objectives) - set(objectives))
        if unknown:
            raise ValueError(f"stage {stage.name!r}: {system} has no objective {unknown}; allowed {list(objectives)}")
