"""The task commands (`palikit ask | detect | predict | caption ...`) against the library calls they stand
for, on a tiny PaliGemma 2 checkpoint (conftest's `ckpt` and `pg`): `--choices` scores a closed set, `--constrained` turns detect/segment's
constraint on/off, and a mistyped option is a usage line, not a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from palikit.cli import main


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("command, text, choices", [
    ("ask", "what is it?", "yes ; no ; maybe"),
    ("ask", "how many?", '["1", "2", "three things"]'),
    ("predict", "answer en what colour?", "red , green"),
])
def test_choices_on_the_cli_equal_the_library_call(ckpt, pg, image, capsys, command, text, choices):
    assert main([command, str(image), text, "--model", str(ckpt), "--device", "cpu", "--choices", choices,
                 "--json"]) == 0
    got = _json(capsys)
    from palikit.tasks.labels import split_labels

    prompt = f"answer en {text}" if command == "ask" else text
    want = pg.choose(str(image), prompt, split_labels(choices))
    assert got["prompt"] == prompt and got["text"] == want.text
    assert [c["text"] for c in got["choices"]] == [c.text for c in want.choices]
    assert np.allclose([c["logprob"] for c in got["choices"]], [c.logprob for c in want.choices], atol=1e-4)
    assert sum(c["probability"] for c in got["choices"]) == pytest.approx(1.0)


@pytest.mark.parametrize("flag, constrained", [("off", False), ("on", True), ("auto", None)])
def test_constrained_flag_equals_the_library_option(ckpt, pg, image, capsys, flag, constrained):
    assert main(["detect", str(image), "circle ; square", "--model", str(ckpt), "--device", "cpu",
                 "--max-new-tokens", "24", "--constrained", flag, "--json"]) == 0
    got = _json(capsys)
    want = pg.detect(str(image), "circle ; square", max_new_tokens=24, constrained=constrained)
    assert got["text"] == want.text and got["tokens"] == list(want.tokens)


def test_constrained_output_holds_only_requested_labels_where_the_raw_one_need_not(ckpt, image, capsys):
    assert main(["detect", str(image), "circle", "--model", str(ckpt), "--device", "cpu", "--max-new-tokens", "30",
                 "--json"]) == 0
    labels = {d["label"] for d in _json(capsys)["detections"]}
    assert labels <= {"circle"}


@pytest.mark.parametrize("argv, says", [
    (["caption", "IMG", "--choices", "a ; b"], "No such option: --choices"),  # caption takes no closed set
    (["ask", "IMG", "q", "--constrained", "on"], "No such option: --constrained"),  # nor does ask a constraint
    (["caption", "IMG", "--bogus"], "No such option: --bogus"),
    (["ask", "IMG", "q", "--num-beams", "x"], "Invalid value for '--num-beams'"),
    (["detect", "IMG", "circle", "--constrained", "maybe"], "--constrained must be one of auto, on, off"),
    (["ask", "IMG", "q", "--choices", ""], "choice 0 is empty"),
])
def test_bad_flags_are_one_clear_line_not_a_traceback(ckpt, image, capsys, argv, says):
    argv = [str(image) if a == "IMG" else a for a in argv] + ["--model", str(ckpt), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
