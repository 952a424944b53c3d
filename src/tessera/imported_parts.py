"""Start an LVLM preset from imported parts instead of its tiny pretrained ones.

`import_parts(preset, vision=..., language=...)` reads a vision tower and / or a decoder LLM
from a local Hugging Face folder (through `tessera.interop.load_hf`) or a Tessera checkpoint
folder, and returns the preset with its `vision` / `llm` configs replaced by the imported
ones (so `build_lvlm` makes modules of the imported sizes and the connector follows their
widths), the weights `LVLM.load_pretrained_parts` loads instead of the "clip" / "lm" stage
results, the imported LLM's tokenizer and the imported tower's image preprocessing.
`train_lvlm(..., vision_from=, language_from=)` uses it; the stages of imported parts are
not run.

An imported tokenizer that lacks the image placeholder gets it as a new id past the end of
the decoder's embedding table (`tokenizer_from_hf`); the embedding (and an untied LM head)
then grows by the missing rows, initialised to the mean of the existing rows, so every
original logit is unchanged. This is said in `ImportedParts.notes`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tessera.data.images import ImageTransform, transform_from_meta
from tessera.data.templates import TemplateError, stop_token_ids
from tessera.interop.hf_import import CONFIG_FILE, load_hf
from tessera.models.dual_encoder import DualEncoder, SigLIPDualEncoder
from tessera.presets.base import LVLMPreset, from_llava
from tessera.presets.llava import LLaVAPreset
from tessera.text.llama import LlamaDecoder
from tessera.text.tokenizer import Tokenizer
from tessera.train.checkpoint import FORMAT, load_checkpoint
from tessera.vision.vit import VisionTransformer


class ImportedPartError(ValueError):
    """A part that cannot stand in for the preset's own (wrong kind, unusable preset)."""


@dataclass
class ImportedParts:
    preset: LVLMPreset  # vision / llm configs replaced by the imported parts'
    vision: dict[str, Tensor] | None = None  # ViT weights (tessera.vision.vit names)
    language: dict[str, Tensor] | None = None  # decoder weights, embedding grown if needed
    tokenizer: Tokenizer | None = None  # the imported LLM's; None: the preset's own BPE
    image_meta: dict[str, Any] | None = None  # image_size [H, W], image_mean, image_std of the tower
    skipped_stages: tuple[str, ...] = ()  # "clip" / "lm": their parts are imported
    notes: list[str] = field(default_factory=list)

    def image_transform(self, fallback_size: int) -> ImageTransform:
        """The imported tower's preprocessing; the preset's square size and CLIP statistics without one."""
        return transform_from_meta(self.image_meta or {}, fallback_size)


def _load_source(path: str | Path) -> tuple[nn.Module, Tokenizer | None, dict[str, Any], list[str]]:
    """(model, tokenizer, meta, notes) of a Hugging Face folder or a Tessera checkpoint folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"imported part {folder}: no such folder")
    config_file = folder / CONFIG_FILE
    is_tessera = config_file.is_file() and json.loads(config_file.read_text()).get("format") == FORMAT
    if is_tessera:
        ckpt = load_checkpoint(folder)
        tokenizer = Tokenizer.load(ckpt.tokenizer_path) if ckpt.tokenizer_path.is_file() else None
        return ckpt.model, tokenizer, dict(ckpt.meta), []
    imported = load_hf(folder)
    return imported.model, imported.tokenizer, imported.meta, [f"{folder}: {n}" for n in imported.notes]


def _grow_vocab(state: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """The decoder weights with embedding / LM-head rows added up to `vocab_size` (mean of the rows)."""
    grown = dict(state)
    for key in ("embed_tokens.weight", "lm_head.weight"):
        if key in grown:
            w = grown[key]
            extra = w.mean(dim=0, keepdim=True).expand(vocab_size - w.shape[0], -1)
            grown[key] = torch.cat([w, extra])
    return grown


def import_parts(
    preset: LLaVAPreset | LVLMPreset, *, vision: str | Path | None = None, language: str | Path | None = None,
) -> ImportedParts:
    """The preset set up to start from an imported vision tower and / or decoder LLM (see the
    module docstring); raises ImportedPartError for a part of the wrong kind."""
    if isinstance(preset, LLaVAPreset):
        preset = from_llava(preset)
    parts = ImportedParts(preset=preset)
    update: dict[str, Any] = {}
    if vision is not None:
        if preset.encoder is not None:
            raise ImportedPartError(
                f"preset {preset.name!r}: its main vision tower is a {preset.encoder.kind} encoder, not a ViT; "
                "an imported ViT cannot replace it")
        model, _, meta, notes = _load_source(vision)
        tower = model.vision_model if isinstance(model, DualEncoder | SigLIPDualEncoder) else model
        if not isinstance(tower, VisionTransformer):
            raise ImportedPartError(f"vision part {vision}: a {type(model).__name__} is not a vision tower "
                                    "(expected a CLIP / SigLIP vision model or dual encoder)")
        if preset.input_image_size is not None and preset.input_image_size % tower.cfg.patch_size:
            raise ImportedPartError(f"preset {preset.name!r}: input_image_size {preset.input_image_size} is not a "
                                    f"multiple of the imported tower's patch size {tower.cfg.patch_size}")
        update["vision"] = tower.cfg
        parts.vision = {k: v.detach().clone() for k, v in tower.state_dict().items()}
        size = tower.cfg.image_size
        parts.image_meta = {k: meta[k] for k in ("image_size", "image_mean", "image_std") if k in meta}
        parts.image_meta.setdefault("image_size", [size, size])
        parts.notes += notes + [f"vision tower from {vision}: stage 'clip' is not run"]
        parts.skipped_stages += ("clip",)
    if language is not None:
        model, tokenizer, _, notes = _load_source(language)
        if not isinstance(model, LlamaDecoder):
            raise ImportedPartError(f"language part {language}: a {type(model).__name__} is not a decoder LLM "
                                    "(expected a LLaMA / Mistral / Qwen2 causal LM)")
        if tokenizer is None:
            raise ImportedPartError(f"language part {language}: it has no tokenizer, which the LLM needs")
        try:
            stop_token_ids(tokenizer, preset.template)
        except TemplateError as err:
            raise ImportedPartError(f"language part {language}: preset template {preset.template!r} "
                                    f"does not fit its tokenizer: {err}") from None
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        vocab = max(model.cfg.vocab_size, tokenizer.vocab_size)
        if vocab > model.cfg.vocab_size:
            state = _grow_vocab(state, vocab)
            notes.append(f"{language}: the embedding grows from {model.cfg.vocab_size} to {vocab} rows for "
                         f"tokens past its end (the image placeholder id {tokenizer.image_id}), "
                         "initialised to the mean row")
        update["llm"] = model.cfg.model_copy(update={"vocab_size": vocab})
        parts.language, parts.tokenizer = state, tokenizer
        parts.notes += notes + [f"language model and tokenizer from {language}: stage 'lm' is not run"]
        parts.skipped_stages += ("lm",)
    parts.preset = preset.model_copy(update=update)
    return parts
