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
# Each answer with the separator the model writes before it and the stop string after it.
LABELLED_RUNS = {
    "vicuna": [" answer one</s>", " answer two</s>"],
    "llama2": [" answer one </s>", " answer two </s>"],
    "chatml": ["answer one<|im_end|>", "answer two<|im_end|>"],
    "minigpt_v2": [" answer one </s>", " answer two </s>"],
    "qwen_vl": ["answer one<|im_end|>", "answer two<|im_end|>"],
    "blip2": [" answer one</s>", " answer two</s>"],
    "minigpt4": [" answer one</s>", " answer two</s>"],
}
# A generation prompt ends where the pre-tokenizer splits: no trailing space.
PROMPT_ENDS = {"vicuna": "? ASSISTANT:", "llama2": "? [/INST]", "chatml": "<|im_start|>assistant\n",
               "minigpt_v2": "? [/INST]", "qwen_vl": "<|im_start|>assistant\n", "blip2": "? Answer:",
               "minigpt4": "? ###Assistant:"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # Whole conversations too, so that BPE learns merges across template text and answers
    # (" ASSISTANT", " answer").
    sentences = ["what is shown in the image?", "answer one", "answer two", "and then? be brief.",
                 "USER: what is shown? ASSISTANT: answer one", "[/INST] answer two Answer: answer"]
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
@pytest.mark.parametrize("with_system_turn", [False, True])
def test_ids_are_the_whole_string_encoded(tokenizer: Tokenizer, name: str, with_system_turn: bool) -> None:
    """Like transformers' apply_chat_template: the rendered string, each image expanded into its
    run, tokenized at once; the prompt likewise."""
    turns = (SYSTEM, *TURNS) if with_system_turn else TURNS
    encoded = encode_conversation(tokenizer, name, turns, image_token_counts=[3])
    assert encoded.input_ids == tokenizer.encode(render_text(name, turns).replace("<image>", "<image>" * 3))
    prompt = encode_prompt(tokenizer, name, turns[:-1], image_token_counts=[3])
    rendered_prompt = render_text(name, turns[:-1]) + get_template(name).assistant_prefix
    assert prompt == tokenizer.encode(rendered_prompt.replace("<image>", "<image>" * 3))


def test_token_straddling_template_text_and_answer_is_labelled(tokenizer: Tokenizer) -> None:
    """vicuna writes the space before an answer; whole-string BPE makes it one token with the
    answer's first word, and that token is labelled."""
    encoded = encode_conversation(tokenizer, "vicuna", TURNS, image_token_counts=[3])
    straddling = tokenizer.token_id("Ġanswer")  # byte-level BPE writes the space as "Ġ"
    assert encoded.input_ids.count(straddling) == 2
    for position, token in enumerate(encoded.input_ids):
        if token == straddling:
            assert encoded.labels[position] == straddling
            assert tokenizer.decode([encoded.input_ids[position - 1]], skip_special=False) == ":"
    # Only answers, their separator and the stop string are labelled: the template's
    # " ASSISTANT" and ":" are not, though " ASSISTANT" also starts with a space.
    labelled = "".join(tokenizer.decode([label], skip_special=False) for label in encoded.labels
                       if label != IGNORE_INDEX)
    assert labelled == " answer one</s> answer two</s>"


def test_token_straddling_the_prefix_and_the_answer_is_labelled() -> None:
    """Without a separator, a merge can join template text (the user suffix " " and the
    assistant prefix "A") and the start of the answer into one token, " Aanswer", that no
    fragment-wise encoding produces; it overlaps the answer, so it is labelled."""
    tokenizer = train_bpe(["Q hi Aanswer one"] * 20, vocab_size=320)
    merged = tokenizer.token_id("ĠAanswer")  # byte-level BPE writes the space as "Ġ"
    template = ChatTemplate(name="tight", user_prefix="Q ", user_suffix=" ", assistant_prefix="A",
                            assistant_suffix="</s>", stop="</s>")
    encoded = encode_conversation(tokenizer, template, (Turn("user", "hi"), Turn("assistant", "answer one")),
                                  image_token_counts=[])
    assert encoded.input_ids == tokenizer.encode("Q hi Aanswer one</s>")
    position = encoded.input_ids.index(merged)
    assert encoded.labels[position] == merged and encoded.labels[position - 1] == IGNORE_INDEX
    assert labelled_runs(tokenizer, encoded) == [" Aanswer one</s>"]


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
        assistant_prefix="A:",
        answer_separator=" ",
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


@pytest.mark.parametrize("prefix", ["A: ", "A:\t", "A:\n\n", "A: \n"])
def test_assistant_prefix_must_end_at_a_split(prefix: str) -> None:
    with pytest.raises(ValueError, match="answer_separator"):
        ChatTemplate(name="bad", user_prefix="Q: ", user_suffix="\n", assistant_prefix=prefix,
                     assistant_suffix="</s>", stop="</s>")
    ChatTemplate(name="good", user_prefix="Q: ", user_suffix="\n", assistant_prefix="A:\n",
                 assistant_suffix="</s>", stop="</s>")


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


def test_placeholder_becomes_the_tokenizers_own_image_token() -> None:
    """A tokenizer whose image token is not "<image>" (an imported one): each placeholder is
    written as its token, and text that spells that token is refused, not taken for an image."""
    base = train_bpe(["what is shown? answer one"] * 10, vocab_size=300, extra_special_tokens=["<im_patch>"])
    tokenizer = Tokenizer(base.backend, {"image": "<im_patch>"})
    encoded = encode_conversation(tokenizer, "vicuna", TURNS, image_token_counts=[3])
    assert encoded.input_ids == tokenizer.encode(render_text("vicuna", TURNS).replace("<image>", "<im_patch>" * 3))
    assert encoded.input_ids.count(tokenizer.image_id) == 3
    spelled = (Turn("user", "<image>\nwhat is <im_patch>?"), Turn("assistant", "answer one"))
    with pytest.raises(TemplateError, match="occurs 2 time"):
        encode_conversation(tokenizer, "vicuna", spelled, image_token_counts=[3])


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
    assert labelled_runs(tokenizer, cut) == [" answer one</s>"]
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
