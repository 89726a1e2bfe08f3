"""`choices` on `/v1/answer` and `/v1/predict` against a real `palikit serve` process: the closed-set
answer equals `PaliGemma.answer(..., choices=)` in-process (JSON and multipart); a bad choice set is a
400 naming `choices`, answered before the image is read."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image
from serve_helpers import b64, one_thread, png_bytes
from serve_helpers import pg, server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow  # a real server process

CHOICES = ["red", "a blue car", "7", "what"]


def _same(body: dict, expected) -> None:
    assert body["text"] == expected.text
    assert [c["text"] for c in body["choices"]] == CHOICES
    for got, want in zip(body["choices"], expected.choices):
        assert set(got) == {"text", "logprob", "probability"}
        assert got["logprob"] == pytest.approx(want.logprob, abs=1e-4)
        assert got["probability"] == pytest.approx(want.probability, abs=1e-4)
    assert math.isclose(sum(c["probability"] for c in body["choices"]), 1.0, abs_tol=1e-6)
    assert body["text"] == max(body["choices"], key=lambda c: c["probability"])["text"]


def test_answer_and_predict_with_choices_equal_the_library(server, pg):
    data = png_bytes(80, 50, seed=21)
    with one_thread():
        expected = pg.answer(Image.open(io.BytesIO(data)), "what color is the car", choices=CHOICES)
    with server.client() as c:
        r_json = c.post("/v1/answer", json={"image": b64(data), "question": "what color is the car", "choices": CHOICES})
        r_form = c.post("/v1/answer", files={"image": ("x.png", data, "image/png")},
                        data={"question": "what color is the car", "choices": " ; ".join(CHOICES)})
        r_predict = c.post("/v1/predict", json={"image": b64(data), "prompt": "answer en what color is the car",
                                                 "choices": CHOICES})
        plain = c.post("/v1/answer", json={"image": b64(data), "question": "what color is the car",
                                           "max_new_tokens": 4})
    for r in (r_json, r_form, r_predict):
        assert r.status_code == 200, r.text
        _same(r.json(), expected)
    assert plain.status_code == 200 and "choices" not in plain.json()


@pytest.mark.parametrize("choices, message", [
    ([], "choices is empty"),
    ([f"c{i}" for i in range(65)], "at most 64"),
    (["yes", "no", "yes"], "given twice"),
    (["yes", ""], "choice 1 is empty"),
])
def test_bad_choice_sets_are_a_400_naming_choices(server, choices, message):
    with server.client() as c:
        r = c.post("/v1/answer", json={"image": "not an image at all", "question": "what", "choices": choices})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "choices" and message in err["message"]
