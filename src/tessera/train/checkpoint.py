"""Checkpoints: a folder with model.safetensors, config.json, tokenizer.json (plus its
special-token roles, tokenizer_config.json, for tokenizers not spelled Tessera's way) and, for
resumable training, trainer_state.pt. Written atomically: everything goes into a temporary
sibling folder that replaces the target in one rename, so a crash never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from tessera import __version__
from tessera.models.registry import build_model, kind_of
from tessera.nn.lora import LoraConfig, apply_lora, lora_config
from tessera.text.tokenizer import SPECIAL_TOKENS_FILE, TOKENIZER_FILE

FORMAT = "tessera-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A missing, foreign or damaged checkpoint; the message names the folder and file."""


@dataclass
class Checkpoint:
    path: Path
    model: nn.Module
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)  # template, image transform, preset, ...

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def trainer_state_path(self) -> Path:
        return self.path / "trainer_state.pt"


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `path` in one rename
    (files fsynced first), on any error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    meta: dict[str, Any] | None = None,
    tokenizer_file: str | Path | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint folder atomically. `tokenizer_file` is copied as tokenizer.json,
    with the special-token roles file (tokenizer_config.json) beside it when it has one."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tessera_version": __version__,
            "kind": kind_of(model),
            "model": model.cfg.to_dict(),
            "meta": meta or {},
        }
        if lora_config(model) is not None:  # unmerged adapters: load_checkpoint re-applies them
            config["lora"] = lora_config(model).to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # save_model handles tied weights (one tensor stored once).
        save_model(model, str(tmp / "model.safetensors"))
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            roles_file = Path(tokenizer_file).parent / SPECIAL_TOKENS_FILE
            if roles_file.is_file():
                shutil.copyfile(roles_file, tmp / SPECIAL_TOKENS_FILE)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    cfg_file = path / "config.json"
    if not path.is_dir() or not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a Tessera checkpoint: no config.json in it")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({err})") from None
    if config.get("format") != FORMAT:
        hint = " (a Hugging Face folder? use `tessera import-hf`)" if "architectures" in config else ""
        raise CheckpointError(f"{cfg_file}: not a Tessera checkpoint config{hint}")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format_version {config.get('format_version')} unsupported")
    return config


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> Checkpoint:
    path = Path(path)
    config = read_config(path)
    model = build_model(config["kind"], config["model"], where=str(path / "config.json"))
    if config.get("lora") is not None:
        apply_lora(model, LoraConfig.parse(config["lora"], where=f"{path / 'config.json'}: lora"))
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path}: model.safetensors is missing")
    missing, unexpected = load_model(model, str(weights), strict=False, device=map_location)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: weights do not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return Checkpoint(path=path, model=model, kind=config["kind"], meta=config.get("meta", {}))
