"""Byte-level BPE tokenizer: training, encoding, decoding, saving and loading.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` and adds what the rest of Tessera
needs: named ids of the special tokens (padding, BOS/EOS, the image placeholder) and a
single-file save format (`tokenizer.json`).

Special-token roles. Each role (pad, unk, bos, eos, image) names a token string; by default
Tessera's own spellings ("<pad>", "<unk>", "<s>", "</s>", "<image>"). A tokenizer taken from
elsewhere (e.g. Qwen2's, whose EOS is "<|endoftext|>") passes its own `special_tokens`; such
a mapping is saved beside tokenizer.json as `tokenizer_config.json` in Hugging Face's layout
("bos_token": "...", "image_token": "..."), and `load` reads it back. Building a Tessera
tokenizer from a Hugging Face tokenizer folder (resolving missing roles) is
`tessera.interop.hf_tokenizer.tokenizer_from_hf`.

Whitespace convention. The pre-tokenizer is ByteLevel with `add_prefix_space=False`: no
space is invented in front of a text. The chat templates tokenize a whole rendered
conversation at once, like transformers' `apply_chat_template` and inference servers, so an
answer is tokenized in context: after "ASSISTANT:" the answer "blue" with the space the
template writes before it is the one token " blue", not " " + "blue". `encode_with_offsets`
gives each token's character span, from which the templates label the tokens that overlap an
answer. A generation prompt must end where the pre-tokenizer splits (no trailing space), so
that it stays a token prefix of the training sequence; see `tessera.data.templates`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"

# Fixed order: a token's position here is its id in every tokenizer `train_bpe` builds.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    UNK_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    # Role and format markers of the chat templates; atomic so that a template string
    # never merges with the message next to it.
    "<|im_start|>",
    "<|im_end|>",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
)

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "tokenizer_config.json"  # Hugging Face's name for the roles' file

# Role → token string of Tessera's own tokenizers.
DEFAULT_SPECIAL_TOKENS: dict[str, str] = {
    "pad": PAD_TOKEN,
    "unk": UNK_TOKEN,
    "bos": BOS_TOKEN,
    "eos": EOS_TOKEN,
    "image": IMAGE_TOKEN,
}
_BYTE_ALPHABET_SIZE = 256


def special_tokens_from_config(config: Mapping[str, Any]) -> dict[str, str]:
    """Role → token string from a Hugging Face tokenizer_config.json / special_tokens_map.json
    dict: "<role>_token" keys, whose value is a string or an AddedToken dict with "content".
    Roles the dict does not name are left out."""
    roles: dict[str, str] = {}
    for role in DEFAULT_SPECIAL_TOKENS:
        value = config.get(f"{role}_token")
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str) and value:
            roles[role] = value
    return roles


class Tokenizer:
    """Text ↔ token ids. Never adds BOS/EOS by itself; templates decide where they go."""

    def __init__(
        self, backend: tokenizers.Tokenizer, special_tokens: Mapping[str, str] | None = None
    ) -> None:
        """`special_tokens` maps roles (pad, unk, bos, eos, image) to token strings; roles it
        leaves out keep Tessera's spellings. Every role's token must be in the vocabulary."""
        unknown = sorted(set(special_tokens or {}) - set(DEFAULT_SPECIAL_TOKENS))
        if unknown:
            raise ValueError(
                f"unknown special-token roles {unknown}; roles are {list(DEFAULT_SPECIAL_TOKENS)}"
            )
        self._special_tokens = {**DEFAULT_SPECIAL_TOKENS, **(special_tokens or {})}
        missing = [t for t in self._special_tokens.values() if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks required special tokens: {missing}")
        self._backend = backend
        self._pad_id = self.token_id(self._special_tokens["pad"])
        self._unk_id = self.token_id(self._special_tokens["unk"])
        self._bos_id = self.token_id(self._special_tokens["bos"])
        self._eos_id = self.token_id(self._special_tokens["eos"])
        self._image_id = self.token_id(self._special_tokens["image"])

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def special_tokens(self) -> dict[str, str]:
        """Role (pad, unk, bos, eos, image) → token string."""
        return dict(self._special_tokens)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def image_id(self) -> int:
        return self._image_id

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it ("<image>", "</s>") map to their id."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `encode(text)` and each token's [start, end) character span in `text`, so
        that callers can tell which part of a rendered string a token came from."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        return encoding.ids, [(int(start), int(end)) for start, end in encoding.offsets]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        # int() accepts plain ints as well as 0-d tensors / numpy scalars from a model's output.
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return token_id

    def save(self, directory: str | Path) -> Path:
        """Write `<directory>/tokenizer.json` and return its path; special-token roles other
        than Tessera's spellings go beside it into tokenizer_config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self._backend.save(str(path))
        if self._special_tokens != DEFAULT_SPECIAL_TOKENS:
            roles = {f"{role}_token": token for role, token in self._special_tokens.items()}
            (directory / SPECIAL_TOKENS_FILE).write_text(json.dumps(roles, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a `tokenizer.json` file or a directory that contains one, with the roles of
        a tokenizer_config.json beside it if there is one."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer found: {file} does not exist")
        roles_file = file.parent / SPECIAL_TOKENS_FILE
        roles: dict[str, str] = {}
        if roles_file.is_file():
            try:
                roles = special_tokens_from_config(json.loads(roles_file.read_text()))
            except json.JSONDecodeError as err:
                raise ValueError(f"{roles_file}: not valid JSON ({err})") from None
        try:
            return cls(tokenizers.Tokenizer.from_file(str(file)), roles)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 1024,
    min_frequency: int = 2,
    extra_special_tokens: Sequence[str] = (),
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`.

    All 256 bytes are in the vocabulary, so every string round-trips through
    encode/decode and `<unk>` is never produced; `vocab_size` counts the bytes, the
    special tokens and the learned merges.

    `extra_special_tokens` (e.g. "<mask>", "<enc>", "<dec>" of the fusion models) get the ids
    right after `SPECIAL_TOKENS`, in the order given, so the fixed tokens keep their ids; like
    them they are atomic, skipped by `decode(skip_special=True)`, and saved in tokenizer.json
    (look them up with `Tokenizer.token_id`). Empty, repeated or already-special strings are
    refused.
    """
    if isinstance(extra_special_tokens, str):
        raise TypeError("extra_special_tokens must be a sequence of strings, not one string")
    extra = list(extra_special_tokens)
    bad = [t for t in extra if not isinstance(t, str) or not t or t != t.strip()]
    if bad:
        raise ValueError(f"extra_special_tokens must be non-empty strings without outer spaces, got {bad}")
    clashes = sorted({t for t in extra if t in SPECIAL_TOKENS or extra.count(t) > 1})
    if clashes:
        raise ValueError(f"extra_special_tokens repeat a special token: {clashes}")
    smallest = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS) + len(extra)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size must be at least {smallest} (bytes + special tokens), got {vocab_size}"
        )
    backend = tokenizers.Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, *extra)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)
