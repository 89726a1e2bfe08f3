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
])
def test_suggest_prompt_for_free_form_task_requests(prompt, expected):
    hint = suggest_prompt(prompt)
    assert hint is not None and hint.startswith(expected), hint
    assert "\n" not in hint


@pytest.mark.parametrize("prompt", [
    "ocr", "caption en", "describe de", "detect dog ; cat", "segment cat", "answer en where is the car",
    "question en two", "how many people are there?", "what colour is the bus", "is it raining", "", "   ",
    "why is the man smiling",
])
def test_no_hint_for_keyword_prompts_and_ordinary_questions(prompt):
    assert suggest_prompt(prompt) is None
