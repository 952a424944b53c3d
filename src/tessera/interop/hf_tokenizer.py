"""Tokenizers and chat templates across the Hugging Face boundary.

Import: `tokenizer_from_hf` builds a Tessera `Tokenizer` from a Hugging Face tokenizer folder
(tokenizer.json, with the special-token roles read from special_tokens_map.json and
tokenizer_config.json). Tessera needs every role (pad, unk, bos, eos, image); a folder that
lacks some is completed, and every completion is returned as a note for the caller to show:
- the image placeholder is added as a new special token when absent (its id is then past the
  end of a plain decoder's embedding table, which never embeds it);
- a missing pad token reuses unk, else eos; a missing bos or unk reuses eos. Adding new tokens
  for these would give ids outside the model's embedding table, and generation embeds pad
  ids; reused tokens are masked out wherever padding is.

Export: `save_hf_tokenizer` writes tokenizer.json, tokenizer_config.json (class
PreTrainedTokenizerFast, the roles, the image token, the chat template) and
special_tokens_map.json, which `AutoTokenizer` / `PreTrainedTokenizerFast` load without custom
code, and chat_template.jinja (where transformers >= 5 looks for the template).

`chat_template_jinja` writes a Tessera `ChatTemplate` as a Jinja chat template that renders
the same text as `tessera.data.templates.render_text`; `template_from_jinja` recognises such
a template again on import (a folder exported before `answer_separator` existed, whose
assistant prefix still ended with the separator, is not recognised and gets the family's usual
template, with a note). Messages take Hugging Face's shape: {"role", "content"} with
content a string (images written as the image token) or a list of {"type": "text", "text"} /
{"type": "image"} parts rendered in order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from tessera.data.templates import TEMPLATES, ChatTemplate, get_template
from tessera.text.tokenizer import (
    BOS_TOKEN,
    IMAGE_TOKEN,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    special_tokens_from_config,
)

SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Role → the roles whose token stands in for it when a tokenizer names none.
_ROLE_FALLBACKS: dict[str, tuple[str, ...]] = {
    "bos": ("eos",),
    "unk": ("eos",),
    "pad": ("unk", "eos"),
}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, with the file named in any error."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def tokenizer_from_hf(
    folder: str | Path, *, image_token_id: int | None = None
) -> tuple[Tokenizer, list[str]]:
    """A Tessera Tokenizer from a Hugging Face tokenizer folder, and notes on what was completed.

    `image_token_id` (e.g. LLaVA's image_token_index) names the image placeholder by id; else
    the folder's "image_token", else "<image>", added when absent.
    """
    folder = Path(folder)
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{folder}: no {TOKENIZER_FILE}; only fast (tokenizers-library) tokenizers can be imported"
        )
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    settings: dict[str, Any] = {}
    sources: dict[str, Path] = {}
    # tokenizer_config.json is read last: where both files name a role it is authoritative.
    for name in (SPECIAL_TOKENS_MAP_FILE, SPECIAL_TOKENS_FILE):
        if (folder / name).is_file():
            data = read_json(folder / name)
            settings.update(data)
            sources.update({key: folder / name for key in data})
    roles = special_tokens_from_config(settings)
    for role, token in roles.items():
        if backend.token_to_id(token) is None:
            raise ValueError(
                f"{sources[f'{role}_token']}: {role}_token {token!r} is not in {tokenizer_file.name}'s vocabulary"
            )
    notes: list[str] = []
    # BERT-style tokenizers (BertModel, the Q-Former's text side) name [CLS] and [SEP] where
    # Tessera's roles say bos and eos: a text is "[CLS] … [SEP]" as Tessera's is "<s> … </s>".
    for role, bert_role in (("bos", "cls"), ("eos", "sep")):
        bert_token = settings.get(f"{bert_role}_token")
        bert_token = bert_token.get("content") if isinstance(bert_token, Mapping) else bert_token
        if role not in roles and isinstance(bert_token, str) and backend.token_to_id(bert_token) is not None:
            roles[role] = bert_token
            notes.append(f"tokenizer: no {role}_token; using the {bert_role} token {bert_token!r} for it (BERT style)")
    if image_token_id is not None:
        image_token = backend.id_to_token(image_token_id)
        if image_token is None:
            raise ValueError(
                f"{tokenizer_file}: the image token id {image_token_id} is not in the vocabulary"
            )
        roles["image"] = image_token
    elif backend.token_to_id(roles.setdefault("image", IMAGE_TOKEN)) is None:
        backend.add_special_tokens([AddedToken(roles["image"], special=True, normalized=False)])
        notes.append(
            f"tokenizer: added the image placeholder {roles['image']!r} as special token id "
            f"{backend.token_to_id(roles['image'])}"
        )
    if "eos" not in roles:
        raise ValueError(f"{folder}: the tokenizer files name no eos_token")
    for role, fallbacks in _ROLE_FALLBACKS.items():
        if role in roles:
            continue
        stand_in = next(r for r in fallbacks if r in roles)
        roles[role] = roles[stand_in]
        notes.append(
            f"tokenizer: no {role}_token; using the {stand_in} token {roles[stand_in]!r} for it"
        )
    return Tokenizer(backend, roles), notes


def save_hf_tokenizer(
    tokenizer: Tokenizer,
    directory: str | Path,
    *,
    chat_template: str | None = None,
    model_max_length: int | None = None,
) -> None:
    """Write the tokenizer as a Hugging Face fast-tokenizer folder (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(directory / TOKENIZER_FILE))
    roles = {f"{role}_token": token for role, token in tokenizer.special_tokens.items()}
    image_token = roles.pop("image_token")
    special_map = {**roles, "additional_special_tokens": [image_token]}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        # transformers >= 5 reads a named extra token at the top level, 4.x from the dict.
        "image_token": image_token,
        "extra_special_tokens": {"image_token": image_token},
        "clean_up_tokenization_spaces": False,
        # Tessera's templates write BOS and EOS themselves.
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
        (directory / CHAT_TEMPLATE_FILE).write_text(chat_template)
    (directory / SPECIAL_TOKENS_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (directory / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map, indent=2) + "\n")


# ------------------------------------------------------------------ chat templates

# Renders like tessera.data.templates._fragments; the constants are set in front of it. The
# generation prompt ends at assistant_prefix: the model writes answer_separator itself.
_JINJA_BODY = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- image_token -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render(messages[0]['content']) -%}{%- set dialogue = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = default_system -%}{%- set dialogue = messages -%}"
    "{%- endif -%}"
    "{%- if not dialogue -%}{{- raise_exception('conversation has no user turn') -}}{%- endif -%}"
    "{%- set system_block = (system_prefix ~ system ~ system_suffix) if system else '' -%}"
    "{{- bos -}}"
    "{%- if not system_inside_first_user -%}{{- system_block -}}{%- endif -%}"
    "{%- for message in dialogue -%}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('after an optional leading system message, roles must alternate "
    "user/assistant starting with user') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if not loop.first -%}{{- turn_separator -}}{%- endif -%}"
    "{{- user_prefix -}}"
    "{%- if loop.first and system_inside_first_user -%}{{- system_block -}}{%- endif -%}"
    "{{- render(message['content']) -}}{{- user_suffix -}}"
    "{%- else -%}"
    "{{- assistant_prefix -}}{{- answer_separator -}}{{- render(message['content']) -}}"
    "{{- assistant_suffix -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if dialogue[-1]['role'] != 'user' -%}"
    "{{- raise_exception('a generation prompt must end with a user turn') -}}"
    "{%- endif -%}"
    "{{- assistant_prefix -}}"
    "{%- endif -%}"
)


def chat_template_jinja(template: ChatTemplate | str, image_token: str = IMAGE_TOKEN) -> str:
    """A Jinja chat template rendering `template` as Tessera does (see the module docstring)."""
    t = get_template(template) if isinstance(template, str) else template
    constants = {
        "bos": BOS_TOKEN if t.add_bos else "",
        "image_token": image_token,
        "default_system": t.default_system,
        "system_prefix": t.system_prefix,
        "system_suffix": t.system_suffix,
        "user_prefix": t.user_prefix,
        "user_suffix": t.user_suffix,
        "assistant_prefix": t.assistant_prefix,
        "answer_separator": t.answer_separator,
        "assistant_suffix": t.assistant_suffix,
        "turn_separator": t.turn_separator,
    }
    # JSON string literals are valid Jinja string literals (same escapes).
    header = "".join(
        "{%- set " + name + " = " + json.dumps(value) + " -%}" for name, value in constants.items()
    )
    header += "{%- set system_inside_first_user = " + str(t.system_inside_first_user).lower() + " -%}"
    if t.task:
        raise ValueError(f"template {t.name!r} with task {t.task!r}: export the template without a task "
                         "(the task identifier belongs to the user text)")
    body = _JINJA_BODY
    if t.image_prefix or t.image_suffix:  # Qwen-VL / MiniGPT markers around each image
        wrapped = json.dumps(t.image_prefix) + " ~ image_token ~ " + json.dumps(t.image_suffix)
        plain = "{{- render(message['content']) -}}{{- user_suffix -}}"
        body = body.replace(plain, "{{- render(message['content']) | replace(image_token, " + wrapped + ") -}}"
                            "{{- user_suffix -}}")
    return "{#- Tessera chat template " + json.dumps(t.name) + " -#}" + header + body


def template_from_jinja(jinja: str, image_token: str = IMAGE_TOKEN) -> str | None:
    """The name of the Tessera template that `chat_template_jinja` turned into `jinja`, if any."""
    for name, template in TEMPLATES.items():
        if chat_template_jinja(template, image_token) == jinja.strip():
            return name
    return None


def find_chat_template(folder: Path) -> str | None:
    """The chat template a Hugging Face folder ships, wherever transformers versions put it."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text()
    for name in ("chat_template.json", "processor_config.json", SPECIAL_TOKENS_FILE):
        if (folder / name).is_file():
            value = read_json(folder / name).get("chat_template")
            if isinstance(value, str):
                return value
    return None


def special_token_ids(tokenizer: Tokenizer) -> Mapping[str, int]:
    """The bos / eos / pad ids in the names Hugging Face configs use."""
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
