"""`tessera zoo`: prepare ShapesWorld once, train and evaluate each named preset's tiny recipe,
write one results.json per preset and the Markdown table of all of them.

Layout under `out`::

    data/                 ShapesWorld with every task file (made once, reused while its config
                          and generators are unchanged; not made when a data folder is given)
    NAME/results.json     the preset's ZooResult, plus status, minutes (wall; cpu_minutes too),
                          machine, seed, scale, command
    NAME/...              the preset's own files (tokenizer, checkpoints)
    ZOO.md                the table (zoo.table) over every NAME/results.json under `out`

A preset that raises is recorded as failed (its error in results.json and in the table) and
the others still run.

Data generation is a list of steps (`DATA_STEPS`): the ShapesWorld base, then the task
generators that write files next to it. A later task family adds one `DataStep`, and a step
that starts writing more files raises its `version`; a folder prepared before either gets only
that step on the next run.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tessera.config import Config
from tessera.data.readers import load_meta
from tessera.data.shapes import META_FILE, ShapesConfig, generate_shapes
from tessera.data.shapes_reading import generate_reading_tasks
from tessera.data.shapes_tasks import TASKS_META_FILE, ClassicTasksConfig, generate_classic_tasks
from tessera.eval.report import write_json_atomic
from tessera.train.trainer import resolve_device, seed_everything, training_device
from tessera.zoo.core import PresetDiscovery, ZooContext, ZooResult, find_presets
from tessera.zoo.table import RESULTS_FILE, TABLE_FILE, collect_results, render_zoo_table

DATA_DIR = "data"
DATA_STAMP = "zoo_data.json"  # what prepared the data folder: config and steps done
DATA_FORMAT = "tessera-zoo-data"


class ZooDataConfig(Config):
    """The ShapesWorld every zoo row trains and is evaluated on."""

    shapes: ShapesConfig = ShapesConfig(seed=0, num_train=8000, num_val=200, num_test=500, num_test_comp=500)
    classic_tasks: ClassicTasksConfig = ClassicTasksConfig()
    unique_captions: bool = False  # retrieval galleries keep the COCO-style captions (they repeat)


@dataclass(frozen=True)
class DataStep:
    name: str
    run: Callable[[Path, ZooDataConfig, bool], Any]  # (data root, config, progress)
    version: int = 1  # raised when the step writes new files: folders made before redo the step

    @property
    def key(self) -> str:
        """The step's name in the stamp file."""
        return self.name if self.version == 1 else f"{self.name}@{self.version}"


def _shapes_step(root: Path, config: ZooDataConfig, progress: bool) -> None:
    generate_shapes(config.shapes, root, progress=progress)


def _classic_tasks_step(root: Path, config: ZooDataConfig, progress: bool) -> None:
    generate_classic_tasks(root, progress=progress, unique_captions=config.unique_captions,
                           config=config.classic_tasks)


def _reading_tasks_step(root: Path, config: ZooDataConfig, progress: bool) -> None:
    # Grounding (REC / REG / grounded captions, Qwen-VL and CogVLM boxes), OCR and charts, and
    # the train-only rendered texts for reading pretraining (version 2).
    generate_reading_tasks(root, progress=progress)


# In order; every step after the first writes task files next to the ShapesWorld base.
DATA_STEPS: list[DataStep] = [
    DataStep("shapes", _shapes_step),
    DataStep("classic_tasks", _classic_tasks_step),
    DataStep("reading_tasks", _reading_tasks_step, version=2),
]


def prepare_zoo_data(root: str | Path, config: ZooDataConfig | None = None, *, progress: bool = True) -> Path:
    """Make (or reuse) the zoo's ShapesWorld under `root`: every step of DATA_STEPS.

    The stamp file records the config and the steps done; with the same config only missing
    steps run, with another config everything is made again (files are overwritten in place).
    """
    root, config = Path(root), config or ZooDataConfig()
    stamp_path = root / DATA_STAMP
    done: list[str] = []
    if stamp_path.is_file():
        try:
            stamp = json.loads(stamp_path.read_text())
            if stamp.get("format") == DATA_FORMAT and stamp.get("config") == config.to_dict():
                done = [s for s in stamp.get("steps", []) if isinstance(s, str)]
        except json.JSONDecodeError:
            done = []
    if "shapes" not in done or not (root / META_FILE).is_file():
        done = []  # the base changed: every task file must be made again from it
    todo = [step for step in DATA_STEPS if step.key not in done]
    if not todo:
        return root
    root.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)  # written last: a folder with a stamp is complete
    for step in todo:
        step.run(root, config, progress)
        done.append(step.key)
    write_json_atomic(stamp_path, {"format": DATA_FORMAT, "config": config.to_dict(),
                                   "steps": [s.key for s in DATA_STEPS if s.key in done]})
    return root


def check_zoo_data(root: Path) -> None:
    """A data folder given by the user must hold ShapesWorld and the classic task files."""
    load_meta(root)  # raises, naming the folder, when it is not ShapesWorld
    if not (root / TASKS_META_FILE).is_file():
        raise FileNotFoundError(f"{root} has no {TASKS_META_FILE}: add the task files with `tessera data tasks --root {root}`")


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model, cores, torch version and threads, and the GPU when training ran on one: the
    table's header states them."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cores": cores, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}
    if device is not None and device.type == "cuda":
        info |= {"device": str(device), "gpu": torch.cuda.get_device_name(device)}
    return info


def zoo_command(names: Sequence[str], out: Path, scale: float, seed: int, data_dir: Path | None,
                threads: int | None = None, device: str = "cpu") -> str:
    """The `tessera zoo` command line equivalent to a run_zoo call."""
    parts = ["tessera", "zoo"]
    for name in names:
        parts += ["--only", name]
    parts += ["--out", str(out)]
    if scale != 1.0:
        parts += ["--scale", f"{scale:g}"]
    if seed != 0:
        parts += ["--seed", str(seed)]
    if data_dir is not None:
        parts += ["--data", str(data_dir)]
    if threads is not None:
        parts += ["--threads", str(threads)]
    if device != "cpu":
        parts += ["--device", device]
    return shlex.join(parts)


@dataclass
class ZooRun:
    results: dict[str, dict[str, Any]]  # name → the results.json payload of this run
    table: Path
    data_dir: Path

    @property
    def failed(self) -> list[str]:
        return [name for name, r in self.results.items() if r["status"] != "ok"]


def run_zoo(
    names: Sequence[str] | None,
    out: str | Path,
    *,
    scale: float = 1.0,
    seed: int = 0,
    data_dir: str | Path | None = None,
    progress: bool = True,
    data_config: ZooDataConfig | None = None,
    threads: int | None = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = print,
) -> ZooRun:
    """Train and evaluate each named preset (all when `names` is None or empty) and write
    out/NAME/results.json and out/ZOO.md. `data_dir`: an existing ShapesWorld folder with the
    task files; by default one is prepared in out/data with `data_config`. `threads` sets
    torch's CPU threads (one is much faster than two on a machine other jobs keep busy).
    `device`: where the training stages run (cpu, cuda, cuda:N; the Trainer's device)."""
    found = find_presets()
    runners = found.runners
    names = list(dict.fromkeys(names)) if names else list(runners)
    unknown = [n for n in names if n not in runners]
    if unknown:
        raise ValueError(f"unknown zoo preset(s) {unknown}; available: {sorted(runners)}{_broken(found)}")
    if found.broken_modules and log:
        log(f"zoo: warning: {_broken(found).strip()}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("the zoo runs in one process (every rank would evaluate and write the same files): "
                         "run it without torchrun, with --device cuda for a GPU")
    train_on = resolve_device(device)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data_dir is not None:
        data = Path(data_dir)
        check_zoo_data(data)
    else:
        data = prepare_zoo_data(out / DATA_DIR, data_config, progress=progress)
    machine = machine_info(train_on)
    command = zoo_command(names, out, scale, seed, Path(data_dir) if data_dir is not None else None, threads,
                          device)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        preset_dir = out / name
        preset_dir.mkdir(parents=True, exist_ok=True)
        if log:
            log(f"zoo: {name} ...")
        seed_everything(seed)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            with training_device(train_on):
                result = runners[name](ZooContext(data_dir=data, out_dir=preset_dir, seed=seed, scale=scale,
                                                  progress=progress))
            if not isinstance(result, ZooResult):
                raise TypeError(f"the runner of {name!r} returned {type(result).__name__}, not a ZooResult")
            payload: dict[str, Any] = {"status": "ok", **result.to_json()}
        except Exception as err:  # a failing preset is recorded; the others still run
            payload = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc()}
        # cpu_minutes (this process, all threads) tells a slow row from a busy machine
        payload.update(name=name, minutes=(time.perf_counter() - start) / 60,
                       cpu_minutes=(time.process_time() - cpu_start) / 60, machine=machine, seed=seed,
                       scale=scale, command=command, data_dir=str(data))
        write_json_atomic(preset_dir / RESULTS_FILE, payload)
        results[name] = payload
        if log:
            status = "ok" if payload["status"] == "ok" else f"FAILED ({payload['error']})"
            log(f"zoo: {name} {status} in {payload['minutes']:.1f} min")
    table = out / TABLE_FILE
    order = list(runners)
    table.write_text(render_zoo_table(collect_results(out, order)))
    return ZooRun(results=results, table=table, data_dir=data)


def _broken(found: PresetDiscovery) -> str:
    if not found.broken_modules:
        return ""
    return "; preset modules that failed to import: " + "; ".join(
        f"{module} ({error})" for module, error in found.broken_modules.items())


def list_presets() -> tuple[list[str], dict[str, str]]:
    """(zoo names, broken preset modules → their import error)."""
    found = find_presets()
    return sorted(found.runners), found.broken_modules
