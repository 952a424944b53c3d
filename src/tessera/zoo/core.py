"""What a preset gives the zoo, and how the zoo finds presets.

A preset module in `tessera.presets` that takes part in the zoo defines a module-level dict
`ZOO: dict[str, ZooRunner]` mapping a zoo name ("clip", "albef", "blip2", ...) to a function
that trains the preset's tiny recipe on the prepared ShapesWorld folder and evaluates it:

    def run(ctx: ZooContext) -> ZooResult

The zoo discovers every such dict by importing the modules of `tessera.presets`, so adding a
system never edits a central list. Metric names are the ones the issue fixes
(`retrieval_i2t_r1`, `retrieval_t2i_r1`, `zeroshot_top1`, `vqa_accuracy`,
`reasoning_accuracy`, `entailment_accuracy`, `caption_cider`, `grounding_acc50`, `ocr_cer`, ...),
reported per split label (`SPLITS`). Every metric comes with its trivial baseline (chance or
majority answer) under the same name, so the table shows both.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# split folder → label used in results.json and the table
SPLITS: dict[str, str] = {"test": "in_distribution", "test_comp": "compositional"}


@dataclass(frozen=True)
class ZooContext:
    data_dir: Path  # ShapesWorld root with the classic (and grounding/reading) task files written
    out_dir: Path  # this preset's own folder: checkpoints and logs go here
    seed: int = 0
    scale: float = 1.0  # multiplies every stage's steps (tests use ~0.02 for a smoke run)
    progress: bool = True


@dataclass
class ZooResult:
    # split label → metric name → value (e.g. {"in_distribution": {"retrieval_i2t_r1": 0.81}})
    metrics: dict[str, dict[str, float]]
    # same layout: the trivial baseline of each metric (chance, or the majority answer)
    baselines: dict[str, dict[str, float]]
    trainable_params_by_stage: dict[str, int]  # stage name → trainable parameter count
    seconds_by_stage: dict[str, float]
    visual_tokens_per_image: int | None = None  # LLM-based presets: tokens one image costs
    notes: dict[str, Any] = field(default_factory=dict)  # anything else worth recording

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "baselines": self.baselines,
            "trainable_params_by_stage": self.trainable_params_by_stage,
            "seconds_by_stage": self.seconds_by_stage,
            "visual_tokens_per_image": self.visual_tokens_per_image,
            "notes": self.notes,
        }


ZooRunner = Callable[[ZooContext], ZooResult]


def discover_presets() -> dict[str, ZooRunner]:
    """zoo name → runner, from every `tessera.presets` module that defines `ZOO`."""
    import tessera.presets as package

    runners: dict[str, ZooRunner] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, runner in getattr(module, "ZOO", {}).items():
            if name in runners:
                raise ValueError(f"zoo name {name!r} defined twice (second time in {module.__name__})")
            runners[name] = runner
    return runners


@dataclass
class PresetDiscovery:
    runners: dict[str, ZooRunner]
    broken_modules: dict[str, str]  # module name → the error its import raised


def find_presets() -> PresetDiscovery:
    """`discover_presets`, except that a preset module which fails to import is recorded
    instead of stopping the discovery, so the zoo can still run every other preset and name
    the broken module. A zoo name defined twice still raises."""
    import tessera.presets as package

    found = PresetDiscovery({}, {})
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module_name = f"{package.__name__}.{info.name}"
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # a preset being written or broken must not hide the others
            found.broken_modules[module_name] = f"{type(err).__name__}: {err}"
            continue
        for name, runner in getattr(module, "ZOO", {}).items():
            if name in found.runners:
                raise ValueError(f"zoo name {name!r} defined twice (second time in {module_name})")
            found.runners[name] = runner
    return found
