"""The task table: one entry makes a task reachable through the API, the CLI, the HTTP server, Ray batch's
prompt building and eval, with no other edit; the built-in entries keep their prompts and names; one
label rule and one options type."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image, ImageDraw

from palikit.tasks.labels import clean_labels, plural, singular, split_labels
from palikit.tasks.options import PredictOptions
from palikit.tasks.registry import TASKS, Arg, EvalSpec, Task, eval_task, get_task, register, tasks_where, unregister


def _image() -> Image.Image:
    im = Image.new("RGB", (64, 48), (255, 255, 255))
    ImageDraw.Draw(im).ellipse((10, 8, 40, 38), fill=(220, 40, 40))
    return im


TOY = Task("colour_of", lambda shape, lang: f"answer {lang} what colour is the {shape}", "Colour of a shape.",
           (Arg("shape", help="The shape to ask about.", noun="a shape"),), lang=True, cli="colour-of", http=True,
           ray=True, eval=EvalSpec("exact", "answer {lang} what colour is the {question}"))


@pytest.fixture(scope="module")
def pg():
    from palikit.api import PaliGemma
    from palikit.assets import bundled_demo_model

    return PaliGemma.from_pretrained(bundled_demo_model(), device="cpu")


@pytest.fixture
def toy():
    register(TOY)
    try:
        yield TOY
    finally:
        unregister(TOY.name)


def test_toy_task_through_api_cli_http_ray_and_eval(pg, toy, tmp_path, monkeypatch):
    image = _image()
    want = pg.predict(image, "answer en what colour is the circle", max_new_tokens=6)
    # API: a method named after the entry, and PaliGemma.task
    got = pg.colour_of(image, "circle", max_new_tokens=6)
    assert (got.prompt, got.text, got.tokens) == (want.prompt, want.text, want.tokens)
    assert pg.task("colour_of", image, shape="circle", lang="en", max_new_tokens=6).text == want.text
    with pytest.raises(ValueError, match="needs a shape"):
        pg.colour_of(image)

    # CLI: one command per CLI entry, its argument named after the entry's Arg
    import typer
    from typer.testing import CliRunner

    import palikit.cli.predict as cli_predict

    path = tmp_path / "circle.png"
    image.save(path)
    monkeypatch.setattr(cli_predict, "load_model", lambda *a, **k: pg)
    app = typer.Typer()
    cli_predict.add_task_commands(app, [get_task("colour_of")])
    app.command("noop")(lambda: None)  # two commands, so typer keeps the command name
    run = CliRunner().invoke(app, ["colour-of", str(path), "circle", "--json", "--max-new-tokens", "6"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output.strip().splitlines()[-1])
    assert out["prompt"] == want.prompt and out["text"] == want.text
    assert "SHAPE" in CliRunner().invoke(app, ["colour-of", "--help"]).output

    # HTTP: POST /v1/colour_of with the entry's field names, validated like every task endpoint
    from fastapi.testclient import TestClient

    from palikit.serve import ServerSettings, create_app

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    with TestClient(create_app(pg, ServerSettings(warmup=False))) as client:
        r = client.post("/v1/colour_of", json={"image": b64, "shape": "circle", "max_new_tokens": 6})
        assert r.status_code == 200, r.text
        assert r.json()["prompt"] == want.prompt and r.json()["text"] == want.text
        bad = client.post("/v1/colour_of", json={"image": b64, "max_new_tokens": 6})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "shape"
        assert "/v1/colour_of" in client.get("/openapi.json").json()["paths"]

    # Ray batch: the entry is a batch task; rows give its argument by name (the Ray run itself: test_ray_batch)
    from palikit.distributed.ray_batch import prompt_for, ray_tasks

    assert "colour_of" in ray_tasks()
    assert prompt_for("colour_of", {"shape": "circle"}) == (want.prompt, None)
    assert prompt_for("colour_of", {}, shape="circle", lang="de") == ("answer de what colour is the circle", None)
    with pytest.raises(ValueError, match="needs a shape"):
        prompt_for("colour_of", {})

    # eval: the entry's template, metric ("exact") and primary metric, resumable predictions.jsonl
    from palikit.eval import Sample, evaluate

    samples = [Sample("a", str(path), "", [want.text], meta={"question": "circle"}),
               Sample("b", str(path), "", ["not this"], meta={"question": "circle"})]
    rep = evaluate(pg, samples, "colour_of", out_dir=tmp_path / "eval", progress=False, charts=False,
                   predict_options={"max_new_tokens": 6})
    assert rep.primary == "exact_match" and rep.score == pytest.approx(50.0)
    rows = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [want.prompt] * 2 and rows[0]["text"] == want.text


def test_registered_task_is_gone_after_unregister(pg):
    register(TOY)
    unregister(TOY.name)
    assert "colour_of" not in TASKS
    with pytest.raises(AttributeError):
        pg.colour_of  # noqa: B018
    with pytest.raises(ValueError, match="unknown task"):
        eval_task("colour_of")


def test_builtin_entries_keep_prompts_names_and_surfaces():
    t = TASKS
    assert t["caption"].prompt({}, "de") == ("caption de", None)
    assert t["answer"].prompt({"question": "what is it?"}) == ("answer en what is it?", None)
    assert t["question"].prompt({"answer": "two"}) == ("question en two", None)
    assert t["detect"].prompt({"labels": "dog ; cat"}) == ("detect dog ; cat", ["dog", "cat"])
    assert t["segment"].prompt({"labels": ["cat"]}) == ("segment cat", ["cat"])
    assert t["predict"].prompt({"prompt": "ocr"}) == ("ocr", None)
    assert t["predict"].prompt({"prompt": "detect a", "labels": "a"}) == ("detect a", ["a"])
    assert [x.cli for x in tasks_where("cli")] == ["predict", "caption", "describe", "ocr", "ask", "detect", "segment"]
    assert {x.name for x in tasks_where("http")} == {"predict", "caption", "describe", "ocr", "answer", "detect",
                                                     "segment"}
    assert {x.name for x in tasks_where("ray")} == {"ocr", "caption", "describe", "detect", "segment", "answer",
                                                    "predict"}
    assert {x.name for x in tasks_where("eval")} == {"ocr", "vqa", "anls", "caption", "count", "exact", "detect",
                                                     "segment"}
    assert eval_task("DocVQA").name == "anls" and eval_task("refcoco").name == "segment"
    with pytest.raises(ValueError, match="already registered"):
        register(Task("ocr", lambda: "ocr", "again"))


@pytest.mark.parametrize("value, expected", [
    ("dog ; cat", ["dog", "cat"]), ("dog, cat", ["dog", "cat"]), ("a, b ; c", ["a, b", "c"]),
    (["dog, brown", "cat"], ["dog, brown", "cat"]), ('["a","b"]', ["a", "b"]), (None, []), ("  dog  ", ["dog"]),
])
def test_one_label_rule(value, expected):
    assert split_labels(value) == expected


def test_label_rule_errors_and_limits():
    with pytest.raises(ValueError, match="at most 2"):
        split_labels("a ; b ; c", limit=2)
    with pytest.raises(ValueError, match="not valid JSON"):
        split_labels('["a", ')
    with pytest.raises(ValueError, match="no labels"):
        clean_labels([])
    assert clean_labels(" big   dog ; cat ") == ["big dog", "cat"]


@pytest.mark.parametrize("one, many", [("circle", "circles"), ("box", "boxes"), ("glass", "glasses"),
                                       ("berry", "berries"), ("red square", "red squares")])
def test_singular_plural_round_trip(one, many):
    assert plural(one) == many and singular(many) == one


def test_predict_options_is_the_one_converter():
    from palikit.api import _engine_options, _options

    opts = _options(None, {"temperature": 0.5, "top_k": 3, "max_new_tokens": 7, "dedupe_iou": 0.6})
    gen = _engine_options(opts)
    assert (gen.max_new_tokens, gen.sampling.temperature, gen.sampling.top_k) == (7, 0.5, 3)
    assert (opts.coord_denominator, opts.dedupe_iou) == (1024, 0.6)  # the parser's, kept on the options
    given = PredictOptions(max_new_tokens=7, temperature=0.5, top_k=3, dedupe_iou=0.6)
    assert _options(given, {}) is given and _engine_options(given) == gen  # travels as is, no dict in between
    with pytest.raises(ValueError, match="not both"):
        _options(given, {"temperature": 0.1})
    with pytest.raises(ValueError, match="unknown option"):
        _options(None, {"temprature": 1})
    with pytest.raises(ValueError, match="1024"):
        PredictOptions(coord_denominator=1000)
    assert hash(PredictOptions()) == hash(PredictOptions.from_kwargs(PredictOptions().as_kwargs()))


def test_eval_refuses_an_unknown_option_before_the_run(pg, tmp_path):
    from palikit.eval import Sample, evaluate

    with pytest.raises(ValueError, match="unknown option.*temprature"):
        evaluate(pg, [Sample("a", "nope.png", "", ["x"])], "ocr", out_dir=tmp_path, progress=False, charts=False,
                 predict_options={"temprature": 1.0})
    assert not (tmp_path / "predictions.jsonl").exists() or not (tmp_path / "predictions.jsonl").read_text()


@pytest.mark.parametrize("given", ["circle, square", "circle ; square", '["circle", "square"]'])
def test_palikit_batch_and_palikit_detect_split_labels_alike(given, monkeypatch):
    import palikit.distributed.ray_batch as ray_batch
    from palikit.cli import main

    seen = {}

    def fake_run_batch(*args, labels=None, **kw):
        seen["labels"] = labels
        raise ValueError("stop here")  # nothing else of the run is needed

    monkeypatch.setattr(ray_batch, "run_batch", fake_run_batch)
    monkeypatch.setattr("palikit.cli.predict.default_model", lambda m: "unused")
    assert main(["batch", "-i", "in", "-o", "out", "--task", "detect", "--labels", given]) == 2
    batch_prompt = ray_batch.prompt_for("detect", {"image": "x.png"}, labels=seen["labels"])
    detect_prompt = get_task("detect").prompt({"labels": given})  # what `palikit detect IMAGE LABELS` builds
    assert batch_prompt == detect_prompt == ("detect circle ; square", ["circle", "square"])
