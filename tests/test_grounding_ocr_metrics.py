"""Grounding and reading metrics on hand-computed cases: Acc@IoU≥0.5 with the tolerant parser
(unparsable and missing predictions are misses, and counted), REG accuracy, grounded-caption
F1, edit distance, CER, ANLS and chart-dict accuracy; and the LVLM prediction loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tessera.data.datasets import ImageCache
from tessera.data.images import ImageTransform
from tessera.data.records import SkipStats
from tessera.data.shapes_reading import ReadingItem
from tessera.eval.grounding import (
    normalize_phrase,
    predict_reading,
    reading_baseline,
    score_grounded_captions,
    score_reading_task,
    score_rec,
    score_reg,
)
from tessera.eval.ocr_metrics import (
    anls,
    anls_single,
    character_error_rate,
    chart_text,
    edit_distance,
    parse_chart,
    score_cer,
    score_charts,
)


def item(item_id: str, task: str = "rec", **fields: object) -> ReadingItem:
    base: dict = dict(
        id=item_id,
        image=Path("x.png"),
        task=task,
        prompt="<image>\nq",
        answer="a",
        box_format="qwen",
        width=64,
        height=64,
    )
    base.update(fields)
    return ReadingItem(**base)


# --- edit distance, CER, ANLS -------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "abc", 3),
        ("abc", "", 3),
        ("same", "same", 0),
        ("ab", "ba", 2),
        ("red circle", "red circles", 1),
    ],
)
def test_edit_distance(a: str, b: str, distance: int) -> None:
    assert edit_distance(a, b) == distance
    assert edit_distance(b, a) == distance


def test_character_error_rate() -> None:
    assert character_error_rate("red circles", "red circle") == pytest.approx(1 / 10)
    assert (
        character_error_rate("red\ncircle", "red  circle ") == 0.0
    )  # whitespace runs are one space
    assert character_error_rate(
        "red\ncircle", "red circle", normalize_whitespace=False
    ) == pytest.approx(1 / 10)
    assert character_error_rate("", "") == 0.0
    assert character_error_rate("x", "") == 1.0
    assert character_error_rate("a much longer text", "ab") > 1  # insertions can exceed 1


def test_corpus_cer_counts_missing_predictions() -> None:
    scores = score_cer({"a": "abed", "c": "unused"}, {"a": "abcd", "b": "xy"})
    assert scores.edits == 1 + 2  # one substitution; "b" missing: both characters deleted
    assert scores.reference_chars == 6
    assert scores.cer == pytest.approx(3 / 6)
    assert scores.mean_cer == pytest.approx((1 / 4 + 2 / 2) / 2)
    assert (scores.exact, scores.missing, scores.count) == (0.0, 1, 2)
    assert score_cer({"a": "abcd"}, {"a": "abcd"}).exact == 1.0


def test_anls() -> None:
    assert anls_single("Hello", ["hello"]) == 1.0
    assert anls_single("helo", ["hello"]) == pytest.approx(1 - 1 / 5)
    assert anls_single("ab", ["ac"]) == 0.0  # NL = 0.5 is not below the threshold
    assert anls_single("abc", ["xyz", "abd"]) == pytest.approx(1 - 1 / 3)  # best answer counts
    assert anls(["hello", "abc"], [["hello"], ["xyz"]]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        anls(["a", "b"], [["a"]])


def test_chart_parsing_and_scores() -> None:
    text = chart_text({"red": 3, "blue": 7})
    assert text == "{'red': 3, 'blue': 7}"
    assert parse_chart(text) == {"red": 3.0, "blue": 7.0}
    assert parse_chart("here: {'red': 3, 'blue': 7") == {"red": 3.0, "blue": 7.0}  # missing brace
    assert parse_chart("{'red': 3, 'blue': 7} and more words") == {"red": 3.0, "blue": 7.0}
    assert parse_chart("{'red': 'x', 'blue': 2}") == {"blue": 2.0}
    assert parse_chart("red 3 blue 7") is None
    scores = score_charts(
        ["{'red': 3, 'blue': 7.3}", "{'red': 3, 'blue': 8}", "no idea"],
        [text, text, text],
    )
    # chart 1: both within 5 % (7.3 vs 7: 0.3 ≤ 0.35); chart 2: one of two; chart 3: unparsable
    assert scores.relaxed_accuracy == pytest.approx(3 / 6)
    assert scores.exact_match == 0.0
    assert scores.unparsable == 1
    assert score_charts([text], [text]).exact_match == 1.0


# --- grounding ---------------------------------------------------------------------------------


def test_rec_accuracy_by_hand() -> None:
    items = [item(f"i{k}", box=(0.0, 0.0, 32.0, 32.0)) for k in range(6)]
    predictions = {
        "i0": "<ref>the circle</ref><box>(0,0),(500,500)</box>",  # IoU 1
        "i1": "[[000,000,250,500]]",  # 16×32 inside 32×32: IoU exactly 0.5, a hit
        "i2": "[[0,0,240,500]",  # 15.36×32: IoU 0.48, a miss (brackets tolerated)
        "i3": "I think it is the circle",  # no box: a miss, counted as unparsable
        "i4": "<box>(500,500),(999,999)</box>",  # disjoint
        # i5: no prediction at all
    }
    scores = score_rec(predictions, items)
    assert (scores.hits, scores.count, scores.unparsable, scores.missing) == (2, 6, 1, 1)
    assert scores.acc50 == pytest.approx(2 / 6)
    assert scores.mean_iou == pytest.approx((1 + 0.5 + 0.48) / 6)
    assert (
        score_rec(predictions, items, fmt="qwen").hits == 1
    )  # CogVLM boxes unread when Qwen-VL is asked
    assert score_reading_task("rec", predictions, items)["grounding_acc50"] == pytest.approx(2 / 6)


def test_rec_non_square_images_compare_in_pixels() -> None:
    wide = item("w", width=128, height=32, box=(64.0, 0.0, 128.0, 32.0))
    assert score_rec({"w": "[[500,000,999,999]]"}, [wide]).hits == 1
    assert score_rec({"w": "[[000,000,499,999]]"}, [wide]).hits == 0


def test_reg_accuracy() -> None:
    refs = ("the square", "the red square")
    items = [item(str(k), task="reg", box=(0.0, 0.0, 8.0, 8.0), references=refs) for k in range(4)]
    predictions = {"0": "The square.", "1": "red square", "2": "the circle"}
    assert normalize_phrase("The  Red square.") == "red square"
    assert score_reg(predictions, items) == pytest.approx(2 / 4)


def test_grounded_caption_f1_by_hand() -> None:
    objects = (
        ("a small red circle", (0.0, 0.0, 32.0, 32.0)),
        ("a blue square", (32.0, 32.0, 64.0, 64.0)),
    )
    it = item("g", task="grounded_caption", objects=objects)
    perfect = "<ref>a small red circle</ref><box>(0,0),(500,500)</box> and <ref>a blue square</ref><box>(500,500),(999,999)</box>."
    assert score_grounded_captions({"g": perfect}, [it]).f1 == pytest.approx(1.0)
    # right phrase wrong place, right place wrong phrase, one extra: 1 match of 3 predicted, 2 references
    partial = "a small red circle[[0,0,500,500]], a blue square[[0,0,500,500]] and a green cross[[500,500,999,999]]."
    scores = score_grounded_captions({"g": partial}, [it])
    assert (scores.precision, scores.recall) == pytest.approx((1 / 3, 1 / 2))
    assert scores.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    # the same pair twice matches once
    twice = "a small red circle[[0,0,500,500]], a small red circle[[0,0,500,500]]."
    assert score_grounded_captions({"g": twice}, [it]).precision == pytest.approx(1 / 2)


def test_baselines_are_trivial_answers() -> None:
    train = [
        item(f"t{k}", box=(0.0, 0.0, 32.0, 32.0), answer="[[000,000,500,500]]") for k in range(3)
    ]
    train.append(item("odd", box=(40.0, 40.0, 60.0, 60.0), answer="[[625,625,937,937]]"))
    evaluated = [item("e0", box=(0.0, 0.0, 32.0, 32.0)), item("e1", box=(40.0, 40.0, 60.0, 60.0))]
    assert reading_baseline("rec", train, evaluated)["grounding_acc50"] == pytest.approx(0.5)
    ocr_train = [item(f"o{k}", task="ocr", answer=a) for k, a in enumerate(["red", "red", "blue"])]
    ocr_eval = [item("x", task="ocr", answer="red"), item("y", task="ocr", answer="rod")]
    assert reading_baseline("ocr", ocr_train, ocr_eval)["ocr_cer"] == pytest.approx(1 / 6)


def test_predict_reading_runs_an_lvlm(tmp_path: Path) -> None:
    from tessera.models.lvlm import LVLM, LVLMConfig
    from tessera.text.llama import LlamaConfig
    from tessera.text.tokenizer import train_bpe
    from tessera.vision.vit import ViTConfig

    tokenizer = train_bpe(
        ["read the text in the image. red circle", "[[1,2,3,4]] <ref>x</ref>"] * 20, vocab_size=300
    )
    model = LVLM(
        LVLMConfig(
            vision=ViTConfig(
                image_size=16,
                patch_size=8,
                hidden_size=16,
                num_layers=1,
                num_heads=2,
                intermediate_size=32,
            ),
            llm=LlamaConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=32,
                intermediate_size=64,
                num_layers=1,
                num_heads=2,
                num_kv_heads=1,
            ),
            image_token_id=tokenizer.image_id,
            vision_feature_layer=-1,
        )
    )
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "a.png")
    items = [
        item(
            "a", task="ocr", image=tmp_path / "a.png", prompt="<image>\nRead the text in the image."
        ),
        item("b", task="ocr", image=tmp_path / "missing.png"),
    ]
    cache = ImageCache(ImageTransform(size=(16, 16)), SkipStats())
    torch.manual_seed(0)
    predictions = predict_reading(
        model, tokenizer, "vicuna", items, cache, max_new_tokens=4, progress=False
    )
    assert set(predictions) == {"a"}  # the unreadable image gets no prediction
    assert isinstance(predictions["a"], str)
    assert (
        score_reading_task("ocr", predictions, items)["ocr_cer"] >= 0.5
    )  # "b" counted as all deleted
