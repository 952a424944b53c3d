"""Conversation templates: turns → token ids with a label mask and expanded image placeholders.

One engine renders every template. A `ChatTemplate` only lists the strings around each
message; `encode_conversation` renders the whole conversation to one string and tokenizes it
once, the way transformers' `apply_chat_template` and every inference server do, so a model
trained here sees the ids it will be served with (and an imported model is fine-tuned on the
ids it was trained on). With byte-level BPE this matters: "? ASSISTANT: blue</s>" is
"?", " ASSISTANT", ":", " blue", "</s>" as a whole, not "?", " ", "ASSISTANT", ":", " ", "blue".

Labels come from character spans: while rendering, the span of every labelled region (an
answer's `answer_separator`, the answer, and the template's stop string: everything the model
must produce to finish its answer) is recorded, and a token is labelled iff its character span
overlaps one, so " blue" is labelled although its space is written by the template. Labels are
NOT shifted: `labels[i]` is `input_ids[i]` for labelled tokens and IGNORE_INDEX elsewhere. The
collator does the shift.

A generation prompt ends with `assistant_prefix` and must be an exact token prefix of the
training sequence, so the prompt has to end where the pre-tokenizer splits anyway: never with a
space, which would merge with the answer's first word. Templates whose answers follow a space
("ASSISTANT: blue") therefore write that space as `answer_separator`, which the model generates
as part of its answer (decoded answers are stripped).

Each "<image>" in a user message is rendered as the tokenizer's image token (inside the
template's marker strings `image_prefix` / `image_suffix`: Qwen-VL's "<img>…</img>",
MiniGPT-v2's "<Img>…</Img>"), and after tokenizing, the k-th image token becomes a run of
`image_token_counts[k]` image tokens, the count the model reports for the k-th image, so
features can later be scattered in 1:1. A template may carry a task identifier (MiniGPT-v2's
"[vqa]", "[caption]", ...: `with_task`) that opens the first user message after its images.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tessera.data.records import Turn
from tessera.text.tokenizer import BOS_TOKEN, IMAGE_TOKEN, Tokenizer

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


def _ends_at_a_boundary(prefix: str) -> bool:
    """Whether a prompt ending with `prefix` ends where byte-level pre-tokenizers split anyway:
    not on whitespace, except one newline after a non-space ("assistant\n"); a trailing space
    merges with the next word, and runs of whitespace split differently once text follows."""
    if not prefix or not prefix[-1].isspace():
        return True
    return prefix[-1] == "\n" and (len(prefix) == 1 or not prefix[-2].isspace())


class TemplateError(ValueError):
    """A conversation that cannot be encoded; datasets skip and count these."""


@dataclass(frozen=True)
class ChatTemplate:
    """Strings that surround each message. Rendering, for a conversation of turns:

    [BOS] [system block]  then per exchange:
    user_prefix [system block if system_inside_first_user and first turn] user user_suffix
    assistant_prefix answer_separator assistant assistant_suffix
    turn_separator (only before the next user turn)

    The system block is `system_prefix + system + system_suffix`, present only when the system
    prompt (a leading system turn, else `default_system`) is not empty. `assistant_suffix`
    must contain `stop`; the suffix up to and including `stop` is labelled, the rest is not.
    `answer_separator` is labelled too: it is text the model generates before its answer, kept
    out of `assistant_prefix` so that a generation prompt ends at a pre-tokenizer boundary
    (see the module docstring); `assistant_prefix` may therefore end with no whitespace but a
    single newline.

    Every image's run of image tokens is wrapped as image_prefix run image_suffix. When `task`
    is set (one of `task_identifiers`), the first user message becomes
    "<image>… [task] message" (images first, then the identifier, then the text).
    """

    name: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    stop: str
    system_prefix: str = ""
    system_suffix: str = ""
    turn_separator: str = ""
    add_bos: bool = False
    system_inside_first_user: bool = False
    default_system: str = ""
    image_prefix: str = ""
    image_suffix: str = ""
    task_identifiers: tuple[str, ...] = ()
    task: str = ""
    answer_separator: str = ""

    def __post_init__(self) -> None:
        if self.task and self.task not in self.task_identifiers:
            raise ValueError(
                f"template {self.name!r}: task {self.task!r} is not one of its task identifiers "
                f"{list(self.task_identifiers)}"
            )
        if not self.stop or self.stop not in self.assistant_suffix:
            raise ValueError(
                f"template {self.name!r}: stop {self.stop!r} must occur in assistant_suffix "
                f"{self.assistant_suffix!r}"
            )
        if not _ends_at_a_boundary(self.assistant_prefix):
            raise ValueError(
                f"template {self.name!r}: assistant_prefix {self.assistant_prefix!r} ends with "
                "whitespace other than one newline; a generation prompt ends there, and tokenizing "
                "the whole conversation would merge that whitespace with the answer's first word, "
                "so the prompt would not be a token prefix of the training sequence. Move it to "
                "answer_separator (e.g. assistant_prefix='ASSISTANT:', answer_separator=' ')"
            )
        fragments = (
            self.user_prefix,
            self.user_suffix,
            self.assistant_prefix,
            self.answer_separator,
            self.assistant_suffix,
            self.system_prefix,
            self.system_suffix,
            self.turn_separator,
            self.default_system,
            self.image_prefix,
            self.image_suffix,
        )
        if any(IMAGE_TOKEN in f for f in fragments):
            raise ValueError(
                f"template {self.name!r}: {IMAGE_TOKEN!r} may only occur in user messages"
            )

    @property
    def labelled_suffix(self) -> str:
        """The part of assistant_suffix the model must generate: up to and including `stop`."""
        end = self.assistant_suffix.index(self.stop) + len(self.stop)
        return self.assistant_suffix[:end]

    @property
    def unlabelled_suffix(self) -> str:
        return self.assistant_suffix[len(self.labelled_suffix) :]


TEMPLATES: dict[str, ChatTemplate] = {
    # LLaVA v1 / LLaVA-1.5 / Vicuna v1: "USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..."
    "vicuna": ChatTemplate(
        name="vicuna",
        add_bos=True,
        system_suffix=" ",
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT:",
        answer_separator=" ",
        assistant_suffix="</s>",
        stop="</s>",
    ),
    # LLaMA-2-chat: every exchange is "<s>[INST] {q} [/INST] {a} </s>"; the system prompt sits
    # inside the first [INST].
    "llama2": ChatTemplate(
        name="llama2",
        add_bos=True,
        system_prefix="<<SYS>>\n",
        system_suffix="\n<</SYS>>\n\n",
        system_inside_first_user=True,
        user_prefix="[INST] ",
        user_suffix=" ",
        assistant_prefix="[/INST]",
        answer_separator=" ",
        assistant_suffix=" </s>",
        stop="</s>",
        turn_separator=BOS_TOKEN,
    ),
    "chatml": ChatTemplate(
        name="chatml",
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>\n",
        stop="<|im_end|>",
    ),
    # MiniGPT-v2 (LLaMA-2-chat): "[INST] <Img><ImageHere></Img> [task] instruction [/INST]";
    # pick the task with `with_task` (none for non-visual instructions).
    "minigpt_v2": ChatTemplate(
        name="minigpt_v2",
        add_bos=True,
        system_prefix="<<SYS>>\n",
        system_suffix="\n<</SYS>>\n\n",
        system_inside_first_user=True,
        user_prefix="[INST] ",
        user_suffix=" ",
        assistant_prefix="[/INST]",
        answer_separator=" ",
        assistant_suffix=" </s>",
        stop="</s>",
        turn_separator=BOS_TOKEN,
        image_prefix="<Img>",
        image_suffix="</Img>",
        task_identifiers=("vqa", "caption", "grounding", "refer", "identify", "detection"),
    ),
    # Qwen-VL-Chat: ChatML with every image wrapped in <img> … </img>.
    "qwen_vl": ChatTemplate(
        name="qwen_vl",
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>\n",
        stop="<|im_end|>",
        image_prefix="<img>",
        image_suffix="</img>",
    ),
    # BLIP-2 (Tessera's, for a LLaMA-family LM): "<s>" + the Q-Former's query outputs + the text
    # "\n{question} Answer: {answer}</s>". The image opens the user message, so scattering the
    # queries into its placeholders equals BLIP-2's prepending them to the text embeddings.
    "blip2": ChatTemplate(
        name="blip2",
        add_bos=True,
        system_suffix=" ",
        user_prefix="",
        user_suffix=" ",
        assistant_prefix="Answer:",
        answer_separator=" ",
        assistant_suffix="</s>",
        stop="</s>",
        turn_separator=" ",
    ),
    # MiniGPT-4 (Vicuna v0 style): "###Human: <Img>…</Img> {instruction} ###Assistant: {answer}";
    # Tessera stops at </s> where MiniGPT-4 stops at "###".
    "minigpt4": ChatTemplate(
        name="minigpt4",
        add_bos=True,
        system_suffix=" ",
        user_prefix="###Human: ",
        user_suffix=" ",
        assistant_prefix="###Assistant:",
        answer_separator=" ",
        assistant_suffix="</s>",
        stop="</s>",
        image_prefix="<Img>",
        image_suffix="</Img>",
    ),
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}"
        ) from None


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids, unshifted, IGNORE_INDEX where not trained
    image_token_counts: list[int]


@dataclass(frozen=True)
class _Fragment:
    text: str
    role: str  # "template" for template strings, else the role of the message
    labelled: bool = False


def _resolve(template: ChatTemplate | str) -> ChatTemplate:
    return get_template(template) if isinstance(template, str) else template


def _split_system(template: ChatTemplate, turns: Sequence[Turn]) -> tuple[str, Sequence[Turn]]:
    if turns and turns[0].role == "system":
        system, dialogue = turns[0].text, turns[1:]
    else:
        system, dialogue = template.default_system, turns
    if not dialogue:
        raise TemplateError("conversation has no user turn")
    for position, turn in enumerate(dialogue):
        expected = "user" if position % 2 == 0 else "assistant"
        if turn.role != expected:
            raise TemplateError(
                f"turn {position} has role {turn.role!r}, expected {expected!r}: after an optional "
                "leading system turn, turns must alternate user/assistant starting with user"
            )
    return system, dialogue


_LEADING_IMAGES = re.compile(rf"^((?:\s*{re.escape(IMAGE_TOKEN)})*)\s*", re.S)


def _tag_task(text: str, task: str) -> str:
    """"<image>\nquestion" → "<image> [task] question"; without images "[task] question"."""
    match = _LEADING_IMAGES.match(text)
    images = IMAGE_TOKEN * match.group(1).count(IMAGE_TOKEN)
    rest = text[match.end() :]
    return f"{images} [{task}] {rest}" if images else f"[{task}] {rest}"


def _fragments(
    template: ChatTemplate, turns: Sequence[Turn], add_generation_prompt: bool
) -> list[_Fragment]:
    system, dialogue = _split_system(template, turns)
    if add_generation_prompt and dialogue[-1].role != "user":
        raise TemplateError("a generation prompt must end with a user turn")

    system_block: list[_Fragment] = []
    if system:
        system_block = [
            _Fragment(template.system_prefix, "template"),
            _Fragment(system, "system"),
            _Fragment(template.system_suffix, "template"),
        ]

    fragments: list[_Fragment] = []
    if template.add_bos:
        fragments.append(_Fragment(BOS_TOKEN, "template"))
    if not template.system_inside_first_user:
        fragments += system_block
    for position, turn in enumerate(dialogue):
        if turn.role == "user":
            if position > 0:
                fragments.append(_Fragment(template.turn_separator, "template"))
            fragments.append(_Fragment(template.user_prefix, "template"))
            if position == 0 and template.system_inside_first_user:
                fragments += system_block
            text = _tag_task(turn.text, template.task) if position == 0 and template.task else turn.text
            fragments.append(_Fragment(text, "user"))
            fragments.append(_Fragment(template.user_suffix, "template"))
        else:
            fragments.append(_Fragment(template.assistant_prefix, "template"))
            fragments.append(_Fragment(template.answer_separator, "template", labelled=True))
            fragments.append(_Fragment(turn.text, "assistant", labelled=True))
            fragments.append(_Fragment(template.labelled_suffix, "template", labelled=True))
            fragments.append(_Fragment(template.unlabelled_suffix, "template"))
    if add_generation_prompt:
        fragments.append(_Fragment(template.assistant_prefix, "template"))
    return [f for f in fragments if f.text]


def _render(
    fragments: Sequence[_Fragment], image: str
) -> tuple[str, list[tuple[int, int]]]:
    """The fragments as one string, each "<image>" of a user message written as `image`, and the
    [start, end) character spans of the labelled regions (adjacent ones merged)."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    position = 0
    for fragment in fragments:
        piece = fragment.text.replace(IMAGE_TOKEN, image) if fragment.role == "user" else fragment.text
        if fragment.labelled:
            if spans and spans[-1][1] == position:
                spans[-1] = (spans[-1][0], position + len(piece))
            else:
                spans.append((position, position + len(piece)))
        pieces.append(piece)
        position += len(piece)
    return "".join(pieces), spans


def render_text(template: ChatTemplate | str, turns: Sequence[Turn]) -> str:
    """The conversation as plain text, image placeholders left as "<image>" (inside the
    template's image markers, if it has any)."""
    template = _resolve(template)
    fragments = _fragments(template, turns, add_generation_prompt=False)
    text, _ = _render(fragments, template.image_prefix + IMAGE_TOKEN + template.image_suffix)
    return text


def _overlaps(spans: Sequence[tuple[int, int]], ends: Sequence[int], start: int, end: int) -> bool:
    """Whether [start, end) overlaps one of the sorted, disjoint `spans` (`ends` their ends)."""
    k = bisect.bisect_right(ends, start)  # the first span ending after `start`
    return k < len(spans) and spans[k][0] < end


def _encode(
    tokenizer: Tokenizer, template: ChatTemplate, fragments: Sequence[_Fragment],
    image_token_counts: Sequence[int],
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Ids, unshifted labels and the [start, end) span of every image run: the rendered string
    is tokenized as a whole, then each image token is expanded into its run."""
    for fragment in fragments:
        if fragment.role != "user" and IMAGE_TOKEN in fragment.text:
            raise TemplateError(
                f"{IMAGE_TOKEN} placeholder in a {fragment.role} turn; images belong in user turns"
            )
    placeholders = sum(f.text.count(IMAGE_TOKEN) for f in fragments if f.role == "user")
    if placeholders != len(image_token_counts):
        raise TemplateError(
            f"conversation has {placeholders} {IMAGE_TOKEN} placeholder(s) but "
            f"{len(image_token_counts)} image token count(s) were given"
        )
    if any(count < 1 for count in image_token_counts):
        raise TemplateError(f"image token counts must be positive, got {list(image_token_counts)}")

    image = tokenizer.special_tokens["image"]
    text, labelled = _render(fragments, template.image_prefix + image + template.image_suffix)
    ids, offsets = tokenizer.encode_with_offsets(text)
    found = ids.count(tokenizer.image_id)
    if found != placeholders:
        raise TemplateError(
            f"the image token {image!r} occurs {found} time(s) in the encoded conversation but it "
            f"has {placeholders} {IMAGE_TOKEN} placeholder(s): the text spells the image token, "
            "or the tokenizer does not encode it as one token"
        )
    ends = [end for _, end in labelled]
    counts = iter(image_token_counts)
    input_ids: list[int] = []
    labels: list[int] = []
    image_spans: list[tuple[int, int]] = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        if token == tokenizer.image_id:
            run = next(counts)
            image_spans.append((len(input_ids), len(input_ids) + run))
            input_ids += [token] * run
            labels += [IGNORE_INDEX] * run
        else:
            input_ids.append(token)
            labels.append(token if _overlaps(labelled, ends, start, end) else IGNORE_INDEX)
    return input_ids, labels, image_spans


def encode_conversation(
    tokenizer: Tokenizer,
    template: ChatTemplate | str,
    turns: Sequence[Turn],
    image_token_counts: Sequence[int],
    max_length: int | None = None,
) -> EncodedConversation:
    """Encode a training conversation; raises TemplateError for anything it cannot encode faithfully.

    Sequences longer than `max_length` are cut at the end, unless the cut would remove any
    image token (the image's features could no longer be placed) or every label.
    """
    template = _resolve(template)
    fragments = _fragments(template, turns, add_generation_prompt=False)
    input_ids, labels, image_spans = _encode(tokenizer, template, fragments, image_token_counts)
    if max_length is not None and len(input_ids) > max_length:
        for image_index, (start, end) in enumerate(image_spans):
            if end > max_length:
                raise TemplateError(
                    f"truncation through an image: image {image_index} occupies tokens "
                    f"[{start}, {end}) but max_length is {max_length} (sequence has {len(input_ids)})"
                )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise TemplateError(
                f"no answer tokens left after truncation to max_length {max_length}"
            )
    if all(label == IGNORE_INDEX for label in labels):
        raise TemplateError("conversation has no assistant answer to learn from")
    return EncodedConversation(input_ids, labels, list(image_token_counts))


def encode_prompt(
    tokenizer: Tokenizer,
    template: ChatTemplate | str,
    turns: Sequence[Turn],
    image_token_counts: Sequence[int],
) -> list[int]:
    """Ids of `turns` (ending with a user turn) plus the assistant prefix, for generation.

    The prompt ends at `assistant_prefix` (LLaVA's "... ASSISTANT:"), where the pre-tokenizer
    splits, so it is exactly a prefix of what `encode_conversation` produces once the answer is
    appended, and the model continues the token sequence it was trained on (it generates the
    `answer_separator` itself).
    """
    template = _resolve(template)
    fragments = _fragments(template, turns, add_generation_prompt=True)
    input_ids, _, _ = _encode(tokenizer, template, fragments, image_token_counts)
    return input_ids


def stop_token_ids(tokenizer: Tokenizer, template: ChatTemplate | str) -> list[int]:
    """Token ids that end an answer: the template's stop token, and EOS if it differs."""
    template = _resolve(template)
    ids = tokenizer.encode(template.stop)
    if len(ids) != 1:
        raise TemplateError(
            f"template {template.name!r}: stop string {template.stop!r} is {len(ids)} tokens for "
            "this tokenizer; it must be a single (special) token"
        )
    return ids if ids[0] == tokenizer.eos_id else ids + [tokenizer.eos_id]


def with_system(template: ChatTemplate | str, system: str) -> ChatTemplate:
    """A copy of `template` whose default system prompt is `system`."""
    return dataclasses.replace(_resolve(template), default_system=system)


def with_task(template: ChatTemplate | str, task: str | None) -> ChatTemplate:
    """A copy of `template` that opens the first user message with the task identifier
    "[task]" (MiniGPT-v2); None or "" for none. Raises ValueError for a task the template
    does not know (a template without identifiers accepts only None / "")."""
    return dataclasses.replace(_resolve(template), task=task or "")
