"""Chat with a trained LVLM checkpoint: one question, or an interactive multi-turn session.

The checkpoint folder holds everything needed: weights, config (with the chat template
and image size) and tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tessera.data.images import ImageTransform, load_image, transform_from_meta
from tessera.data.records import Turn
from tessera.data.templates import encode_prompt, stop_token_ids
from tessera.infer.generate import GenerationConfig, generate
from tessera.models.lvlm import LVLM
from tessera.text.tokenizer import Tokenizer
from tessera.train.checkpoint import CheckpointError, load_checkpoint


class ChatSession:
    def __init__(self, model: LVLM, tokenizer: Tokenizer, template: str, transform: ImageTransform,
                 generation: GenerationConfig = GenerationConfig(max_new_tokens=64)) -> None:
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.transform, self.generation = transform, generation

    @classmethod
    def from_checkpoint(cls, path: str | Path, generation: GenerationConfig | None = None) -> ChatSession:
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt.model, LVLM):
            raise CheckpointError(f"{path} holds a {ckpt.kind} model; chat needs an LVLM checkpoint")
        if not ckpt.tokenizer_path.is_file():
            raise CheckpointError(f"{path}: tokenizer.json is missing")
        transform = transform_from_meta(ckpt.meta, ckpt.model.cfg.vision.image_size)
        return cls(ckpt.model, Tokenizer.load(ckpt.tokenizer_path), ckpt.meta.get("template", "vicuna"),
                   transform, generation or GenerationConfig(max_new_tokens=64))

    def ask(self, turns: Sequence[Turn], image_paths: Sequence[str | Path]) -> str:
        """The assistant's reply to a conversation ending with a user turn. Raises ImageError
        naming the file when an image cannot be read."""
        pixels = [self.transform(load_image(p)) for p in image_paths]
        counts = [self.model.num_image_tokens(px.shape[1], px.shape[2]) for px in pixels]
        prompt = encode_prompt(self.tokenizer, self.template, turns, counts)
        out = generate(self.model, [prompt], pixels, stop_ids=stop_token_ids(self.tokenizer, self.template),
                       pad_id=self.tokenizer.pad_id, config=self.generation)
        return self.tokenizer.decode(out[0]).strip()
