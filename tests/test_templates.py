"""Chat templates: golden renderings, exact label masks, image expansion and error cases."""

from __future__ import annotations

import pytest

from tessera.data.records import Turn
from tessera.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    ChatTemplate,
    EncodedConversation,
    TemplateError,
    encode_conversation,
    encode_prompt,
    get_template,
    render_text,
    stop_token_ids,
    with_system,
)
from tessera.text.tokenizer import Tokenizer, train_bpe

TURNS = (
    Turn("user", "<image>\nWhat is shown?"),
    Turn("assistant", "answer one"),
    Turn("user", "And then?"),
    Turn("assistant", "answer two"),
)
SYSTEM = Turn("system", "Be brief.")

GOLDEN = {
    "vicuna": (
        "<s>USER: <image>\nWhat is shown? ASSISTANT: answer one</s>"
        "USER: And then? ASSISTANT: answer two</s>"
    ),
    "llama2": (
        "<s>[INST] <image>\nWhat is shown? [/INST] answer one </s>"
        "<s>[INST] And then? [/INST] answer two </s>"
    ),
    "chatml": (
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\nanswer one<|im_end|>\n"
        "<|im_start|>user\nAnd then?<|im_end|>\n"
        "<|im_start|>assistant\nanswer two<|im_end|>\n"
    ),
    "minigpt_v2": (
        "<s>[INST] <Img><image></Img>\nWhat is shown? [/INST] answer one </s>"
        "<s>[INST] And then? [/INST] answer two </s>"
    ),
    "qwen_vl": (
        "<|im_start|>user\n<img><image></img>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\nanswer one<|im_end|>\n"
        "<|im_start|>user\nAnd then?<|im_end|>\n"
        "<|im_start|>assistant\nanswer two<|im_end|>\n"
    ),
    "blip2": "<s><image>\nWhat is shown? Answer: answer one</s> And then? Answer: answer two</s>",
    "minigpt4": (
        "<s>###Human: <Img><image></Img>\nWhat is shown? ###Assistant: answer one</s>"
        "###Human: And then? ###Assistant: answer two</s>"
    ),
}
GOLDEN_WITH_SYSTEM = {
    "vicuna": "<s>Be brief. USER: <image>\nWhat is shown? ASSISTANT: answer one</s>USER: ",
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is shown? [/INST] answer one </s><s>",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\n",
    "minigpt_v2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<Img><image></Img>\nWhat is shown? [/INST] answer one </s><s>",
    "qwen_vl": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<img><image></img>\n",
    "blip2": "<s>Be brief. <image>\nWhat is shown? Answer: answer one</s> And then? ",
    "minigpt4": "<s>Be brief. ###Human: <Img><image></Img>\nWhat is shown? ###Assistant: answer one</s>###Human: ",
}
LABELLED_RUNS = {
    "vicuna": ["answer one</s>", "answer two</s>"],
    "llama2": ["answer one </s>", "answer two </s>"],
    "chatml": ["answer one<|im_end|>", "answer two<|im_end|>"],
    "minigpt_v2": ["answer one </s>", "answer two </s>"],
    "qwen_vl": ["answer one<|im_end|>", "answer two<|im_end|>"],
    "blip2": ["answer one</s>", "answer two</s>"],
    "minigpt4": ["answer one</s>", "answer two</s>"],
}
PROMPT_ENDS = {"vicuna": " ASSISTANT: ", "llama2": " [/INST] ", "chatml": "<|im_start|>assistant\n",
               "minigpt_v2": " [/INST] ", "qwen_vl": "<|im_start|>assistant\n", "blip2": " Answer: ",
               "minigpt4": " ###Assistant: "}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    sentences = ["what is shown in the image?", "answer one", "answer two", "and then? be brief."]
    return train_bpe(sentences * 10, vocab_size=320)


def labelled_runs(tokenizer: Tokenizer, encoded: EncodedConversation) -> list[str]:
    runs: list[list[int]] = []
    previous_labelled = False
    for label in encoded.labels:
        labelled = label != IGNORE_INDEX
        if labelled and not previous_labelled:
            runs.append([])
        if labelled:
            runs[-1].append(label)
        previous_labelled = labelled
    return [tokenizer.decode(run, skip_special=False) for run in runs]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_golden_rendering_and_labels(tokenizer: Tokenizer, name: str) -> None:
    template = get_template(name)
    assert render_text(template, TURNS) == GOLDEN[name]

    encoded = encode_conversation(tokenizer, template, TURNS, image_token_counts=[3])
    assert len(encoded.input_ids) == len(encoded.labels)
    assert encoded.image_token_counts == [3]
    expected = GOLDEN[name].replace("<image>", "<image>" * 3)
    assert tokenizer.decode(encoded.input_ids, skip_special=False) == expected
    assert encoded.input_ids.count(tokenizer.image_id) == 3
    assert labelled_runs(tokenizer, encoded) == LABELLED_RUNS[name]
    # Labels equal the ids wherever they are set.
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        assert label in (IGNORE_INDEX, token)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_answer_tokens_are_the_answer_encoded_alone(tokenizer: Tokenizer, name: str) -> None:
    template = get_template(name)
    encoded = encode_conversation(tokenizer, template, TURNS, image_token_counts=[3])
    labelled = [label for label in encoded.labels if label != IGNORE_INDEX]
    stop_part = tokenizer.encode(template.labelled_suffix)
    expected = [
        *tokenizer.encode("answer one"),
        *stop_part,
        *tokenizer.encode("answer two"),
        *stop_part,
    ]
    assert labelled == expected


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_system_prompt(tokenizer: Tokenizer, name: str) -> None:
    assert render_text(name, (SYSTEM, *TURNS)).startswith(GOLDEN_WITH_SYSTEM[name])
    assert render_text(with_system(name, "Be brief."), TURNS) == render_text(name, (SYSTEM, *TURNS))
    # An empty system prompt leaves no trace.
    assert render_text(name, (Turn("system", ""), *TURNS)) == GOLDEN[name]
    encoded = encode_conversation(tokenizer, name, (SYSTEM, *TURNS), image_token_counts=[3])
    assert labelled_runs(tokenizer, encoded) == LABELLED_RUNS[name]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompt_is_a_prefix_of_the_training_sequence(tokenizer: Tokenizer, name: str) -> None:
    prompt = encode_prompt(tokenizer, name, TURNS[:3], image_token_counts=[3])
    full = encode_conversation(tokenizer, name, TURNS, image_token_counts=[3])
    assert full.input_ids[: len(prompt)] == prompt
    assert full.labels[len(prompt) - 1] == IGNORE_INDEX and full.labels[len(prompt)] != IGNORE_INDEX
    assert tokenizer.decode(prompt, skip_special=False).endswith(PROMPT_ENDS[name])
    with pytest.raises(TemplateError, match="end with a user turn"):
        encode_prompt(tokenizer, name, TURNS, image_token_counts=[3])


def test_stop_token_ids(tokenizer: Tokenizer) -> None:
    assert stop_token_ids(tokenizer, "vicuna") == [tokenizer.eos_id]
    assert stop_token_ids(tokenizer, "llama2") == [tokenizer.eos_id]
    assert stop_token_ids(tokenizer, "chatml") == [
        tokenizer.token_id("<|im_end|>"),
        tokenizer.eos_id,
    ]
    multi = ChatTemplate(
        name="multi",
        user_prefix="Q: ",
        user_suffix="\n",
        assistant_prefix="A: ",
        assistant_suffix="###",
        stop="###",
    )
    with pytest.raises(TemplateError, match="single"):
        stop_token_ids(tokenizer, multi)


def test_unknown_template_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"'alpaca'.*chatml.*llama2.*vicuna"):
        get_template("alpaca")


def test_template_validation() -> None:
    with pytest.raises(ValueError, match="stop"):
        ChatTemplate(
            name="bad",
            user_prefix="",
            user_suffix="",
            assistant_prefix="",
            assistant_suffix="\n",
            stop="</s>",
        )


def test_several_images_get_their_own_counts(tokenizer: Tokenizer) -> None:
    turns = (Turn("user", "<image> and <image>?"), Turn("assistant", "answer one"))
    encoded = encode_conversation(tokenizer, "vicuna", turns, image_token_counts=[2, 5])
    ids = encoded.input_ids
    first = ids.index(tokenizer.image_id)
    assert (
        ids[first : first + 2] == [tokenizer.image_id] * 2 and ids[first + 2] != tokenizer.image_id
    )
    second = ids.index(tokenizer.image_id, first + 2)
    assert (
        ids[second : second + 5] == [tokenizer.image_id] * 5
        and ids[second + 5] != tokenizer.image_id
    )


def test_count_mismatch(tokenizer: Tokenizer) -> None:
    with pytest.raises(TemplateError, match=r"1 <image> placeholder.*2 image token count"):
        encode_conversation(tokenizer, "vicuna", TURNS, image_token_counts=[3, 3])
    with pytest.raises(TemplateError, match=r"1 <image> placeholder.*0 image token count"):
        encode_conversation(tokenizer, "vicuna", TURNS, image_token_counts=[])
    with pytest.raises(TemplateError, match="positive"):
        encode_conversation(tokenizer, "vicuna", TURNS, image_token_counts=[0])


def test_image_in_assistant_turn(tokenizer: Tokenizer) -> None:
    turns = (Turn("user", "<image>\nq"), Turn("assistant", "look: <image>"))
    with pytest.raises(TemplateError, match="assistant"):
        encode_conversation(tokenizer, "chatml", turns, image_token_counts=[3])


def test_role_order(tokenizer: Tokenizer) -> None:
    with pytest.raises(TemplateError, match="alternate"):
        encode_conversation(tokenizer, "vicuna", (Turn("assistant", "hi"),), image_token_counts=[])
    with pytest.raises(TemplateError, match="no user turn"):
        render_text("vicuna", (SYSTEM,))


def test_truncation(tokenizer: Tokenizer) -> None:
    full = encode_conversation(tokenizer, "vicuna", TURNS, image_token_counts=[3])
    first_answer_end = full.labels.index(tokenizer.eos_id) + 1
    cut = encode_conversation(tokenizer, "vicuna", TURNS, [3], max_length=first_answer_end)
    assert cut.input_ids == full.input_ids[:first_answer_end]
    assert cut.labels == full.labels[:first_answer_end]
    assert labelled_runs(tokenizer, cut) == ["answer one</s>"]
    # Not longer than max_length: unchanged.
    same = encode_conversation(tokenizer, "vicuna", TURNS, [3], max_length=len(full.input_ids))
    assert same == full


def test_truncation_through_an_image(tokenizer: Tokenizer) -> None:
    full = encode_conversation(tokenizer, "vicuna", TURNS, image_token_counts=[3])
    image_start = full.input_ids.index(tokenizer.image_id)
    for max_length in (image_start, image_start + 1, image_start + 2):
        with pytest.raises(TemplateError, match="truncation through an image"):
            encode_conversation(tokenizer, "vicuna", TURNS, [3], max_length=max_length)


def test_truncation_leaving_no_labels(tokenizer: Tokenizer) -> None:
    full = encode_conversation(tokenizer, "vicuna", TURNS, image_token_counts=[3])
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    with pytest.raises(TemplateError, match="no answer tokens"):
        encode_conversation(tokenizer, "vicuna", TURNS, [3], max_length=first_label)


def test_no_assistant_turn_is_an_error(tokenizer: Tokenizer) -> None:
    with pytest.raises(TemplateError, match="no assistant answer"):
        encode_conversation(tokenizer, "vicuna", TURNS[:1], image_token_counts=[3])
