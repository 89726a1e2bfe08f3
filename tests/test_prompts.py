"""Prompt builders write PaliGemma's exact task syntax; bad input fails clearly; hints for free-form prompts."""

from __future__ import annotations

import pytest

from palikit.tasks import prompts
from palikit.tasks.prompts import LANGUAGES, suggest_prompt


@pytest.mark.parametrize("call, expected", [
    (lambda: prompts.caption(), "caption en"),
    (lambda: prompts.caption("de"), "caption de"),
    (lambda: prompts.caption(" FR "), "caption fr"),
    (lambda: prompts.describe("zh"), "describe zh"),
    (lambda: prompts.ocr(), "ocr"),
    (lambda: prompts.answer("what colour is the car?"), "answer en what colour is the car?"),
    (lambda: prompts.answer("  wie viele?  ", "de"), "answer de wie viele?"),
    (lambda: prompts.question("two", "en"), "question en two"),
    (lambda: prompts.detect("dog"), "detect dog"),
    (lambda: prompts.detect(["dog", "cat"]), "detect dog ; cat"),
    (lambda: prompts.detect("dog ; cat"), "detect dog ; cat"),
    (lambda: prompts.detect([" t-shirt ", "mr.  smith"]), "detect t-shirt ; mr. smith"),
    (lambda: prompts.segment(["cat"]), "segment cat"),
    (lambda: prompts.segment(("left  cup", "plate")), "segment left cup ; plate"),
])
def test_builders_write_exact_syntax(call, expected):
    out = call()
    assert out == expected
    assert not out.endswith("\n")  # the separator is the tokenizer's job


@pytest.mark.parametrize("call, match", [
    (lambda: prompts.detect([]), "no labels"),
    (lambda: prompts.detect(["dog", "  "]), "blank label"),
    (lambda: prompts.detect(""), "blank label"),
    (lambda: prompts.segment(["a;b"]), "contains ';'"),
    (lambda: prompts.detect(["<loc0001>"]), "'<'"),
    (lambda: prompts.detect(["dog\ncat"]), "newline"),
    (lambda: prompts.detect([3]), "not a string"),
    (lambda: prompts.answer(""), "question is empty"),
    (lambda: prompts.answer("what\nis this"), "newline"),
    (lambda: prompts.question("   "), "answer is empty"),
    (lambda: prompts.caption("xx"), "supported: ar, bn"),
    (lambda: prompts.answer("hi", lang="english"), "unsupported language"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_language_list_is_the_35_codes():
    assert len(LANGUAGES) == 35 == len(set(LANGUAGES))
    assert {"en", "fil", "mi", "zh", "no"} <= set(LANGUAGES)
    for code in LANGUAGES:
        assert prompts.caption(code) == f"caption {code}"


@pytest.mark.parametrize("prompt, expected", [
    ("Read the serial number", 'use "ocr"'),
    ("what does the text say?", 'use "ocr"'),
    ("What is written on the sign", 'use "ocr"'),
    ("transcribe this receipt", 'use "ocr"'),
    ("find the dogs", 'use "detect dog"'),
    ("Where is the car?", 'use "detect car"'),
    ("where are the traffic lights in this image", 'use "detect traffic light"'),
    ("locate all boxes", 'use "detect box"'),
    ("find cats and dogs", 'use "detect cat ; dog"'),
    ("draw a bounding box around the person", 'use "detect person"'),
    ("outline the cat", 'use "segment cat"'),
    ("give me a mask of the puppies", 'use "segment puppy"'),
    ("describe this image", 'use "describe en"'),
    ("What is in this picture?", 'use "caption en"'),
    ("find the serial number", 'use "ocr"'),
    ("answer what is this", 'use "answer en what is this"'),
    # issue 37: case variants of task keywords, a bare task word, "the" / natural phrasings, questions
    ("Detect circle", 'use "detect circle": task keywords are lower case'),
    ("detect Circle", 'use "detect circle": class names in lower case'),
    ("DETECT CIRCLE", 'use "detect circle": task keywords are lower case, class names in lower case'),
    ("OCR", 'use "ocr": task keywords are lower case'),
    ("Ocr", 'use "ocr"'),
    ("ocr the serial number", 'use "ocr": ocr takes no text after it'),
    ("Caption en", 'use "caption en": task keywords are lower case'),
    ("caption EN", 'use "caption en": language codes are lower case'),
    ("Answer en what is this", 'use "answer en what is this": task keywords are lower case'),
    ("detect", 'name what to detect: "detect cat ; dog"'),
    ("Segment", 'name what to segment'),
    ("caption", 'use "caption en": caption needs a language code'),
    ("describe", 'use "describe en"'),
    ("answer", 'use "answer en QUESTION"'),
    ("caption this", 'use "caption en": caption takes only a language code'),
    ("detect the circle", 'use "detect circle": no "the" / "a" before a class name'),
    ("detect a red circle and the squares", 'use "detect red circle ; squares": class names are separated by " ; "'),
    ("detect circle, square", 'use "detect circle ; square": class names are separated by " ; "'),
    ("Detect the Circle", 'use "detect circle": task keywords are lower case, no "the" / "a" before a class name, '
                          'class names in lower case'),
    ("how many people are there?", 'use "answer en how many people are there?": mix checkpoints answer questions'),
    ("what colour is the bus", 'use "answer en what colour is the bus"'),
    ("is it raining", 'use "answer en is it raining"'),
    ("Why is the man smiling?", 'use "answer en why is the man smiling?"'),
])
def test_suggest_prompt_for_free_form_requests_keyword_variants_and_questions(prompt, expected):
    hint = suggest_prompt(prompt)
    assert hint is not None and hint.startswith(expected), hint
    assert "\n" not in hint


@pytest.mark.parametrize("prompt", [
    "ocr", "caption en", "cap en", "describe de", "detect dog ; cat", "detect traffic light", "segment cat",
    "answer en where is the car", "answer en How many?", "question en two", "", "   ", "a red circle", "hello",
])
def test_no_hint_for_well_formed_keyword_prompts(prompt):
    assert suggest_prompt(prompt) is None


@pytest.fixture(scope="module")
def demo_tokenizer():
    from palikit.assets import DEMO_MODEL_DIR
    from palikit.tokenizer import Tokenizer

    return Tokenizer.from_file(DEMO_MODEL_DIR)


def test_hint_for_class_names_the_tokenizer_cannot_write(demo_tokenizer):
    # the demo tokenizer knows "circle" as a word and spells "ring" / "diamond" letter by letter
    assert suggest_prompt("detect circle ; triangle", demo_tokenizer) is None
    hint = suggest_prompt("detect ring ; circle", demo_tokenizer)
    assert hint.startswith('the tokenizer cannot write "ring" (letter by letter: r i n g)'), hint
    assert "circle" not in hint.split("cannot write")[1].split(":")[0]
    both = suggest_prompt("Detect the Diamond", demo_tokenizer)  # keyword / case / article fixes, then vocabulary
    assert both.startswith('use "detect diamond": task keywords are lower case') and \
        '"diamond" (letter by letter: d i a m o n d)' in both
    assert 'use "detect ring"' in suggest_prompt("find the rings", demo_tokenizer)
    with pytest.warns(UserWarning, match="became <unk>"):
        assert '"\u732b" (<unk>' in suggest_prompt("detect \u732b", demo_tokenizer)
    assert suggest_prompt("ocr", demo_tokenizer) is None and suggest_prompt("caption en", demo_tokenizer) is None
