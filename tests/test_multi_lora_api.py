"""Multi-LoRA through the library (issue 34): `PaliGemma.from_pretrained(adapters={...})`,
`load_adapter` / `unload_adapter`, `adapter=` on predict / predict_batch / submit / stream and the task
methods, each equal to the same call on a model loaded with that adapter merged (`adapter=`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers.lora import targets, write_peft_adapter


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from palikit.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("mlora-api")
    base = make_tiny_checkpoint(root / "base", "pg2", seed=2)
    a = write_peft_adapter(base, root / "ocr", r=4, alpha=8.0, target_modules=targets(decoder="q_proj|v_proj|up_proj"))
    b = write_peft_adapter(base, root / "det", r=2, alpha=2.0, seed=1,
                           target_modules=targets(decoder="o_proj", tower="fc1", projector=True))
    return base, {"ocr": a, "det": b}


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8))


def test_adapter_option_equals_the_merged_model_on_every_entry_point(folders):
    from palikit import PaliGemma

    base, paths = folders
    pg = PaliGemma.from_pretrained(base, device="cpu", dtype="float32", adapters=paths, max_lora_rank=4)
    assert pg.adapters == ["det", "ocr"]
    images = [_image(i) for i in range(4)]
    opts = dict(max_new_tokens=6)
    for name, path in paths.items():
        merged = PaliGemma.from_pretrained(base, device="cpu", dtype="float32", adapter=path)
        want = [merged.predict(im, "caption en", **opts) for im in images]
        names = [name, None, name, None]  # mixed with base requests in one batch
        pend = [pg.submit(im, "caption en", adapter=n, **opts) for im, n in zip(images, names)]
        got = [p.result() for p in pend]
        for w, g, n in zip(want, got, names):
            if n is not None:
                assert g.tokens == w.tokens and np.allclose(g.token_logprobs, w.token_logprobs, atol=1e-4)
        assert [r.tokens for r in pg.predict_batch(images, ["caption en"] * 4, adapter=name, **opts)] == \
            [w.tokens for w in want]
        assert pg.caption(images[0], adapter=name, **opts).tokens == merged.caption(images[0], **opts).tokens
        assert pg.detect(images[1], "cat", adapter=name, **opts).tokens == merged.detect(images[1], "cat", **opts).tokens
        assert "".join(pg.stream(images[2], "ocr", adapter=name, **opts)) == merged.predict(images[2], "ocr", **opts).text
    plain = PaliGemma.from_pretrained(base, device="cpu", dtype="float32")
    assert pg.predict(images[3], "caption en", **opts).tokens == plain.predict(images[3], "caption en", **opts).tokens
    base_lp = plain.predict(images[0], "caption en", **opts).token_logprobs
    for name in paths:  # not vacuous: every adapter changes the answer's scores
        lp = pg.predict(images[0], "caption en", adapter=name, **opts).token_logprobs
        assert np.abs(np.array(lp[:2]) - np.array(base_lp[:2])).max() > 1e-3, name


def test_unknown_and_unloaded_adapters_are_refused_naming_the_loaded_ones(folders):
    from palikit import PaliGemma
    from palikit.engine.adapters import AdapterError, UnknownAdapter

    base, paths = folders
    pg = PaliGemma.from_pretrained(base, device="cpu", dtype="float32")
    with pytest.raises(UnknownAdapter, match=r"unknown adapter 'ocr'; loaded adapters: \(none\)"):
        pg.predict(_image(0), "caption en", adapter="ocr")
    pg.load_adapter("ocr", paths["ocr"])  # enables adapters with the defaults on first use
    assert pg.predict(_image(0), "caption en", adapter="ocr", max_new_tokens=3).tokens
    pg.unload_adapter("ocr")
    with pytest.raises(UnknownAdapter, match="loaded adapters: \\(none\\)"):
        pg.predict(_image(0), "caption en", adapter="ocr")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        pg.load_adapter("x", base)


@pytest.mark.slow
def test_eval_several_adapters_in_one_run_one_report_row_each(folders, tmp_path):
    """`palikit eval --adapter NAME=PATH ...`: the model loads once, each adapter is a row of the
    report, its predictions == the merged model's."""
    import json as js

    from palikit import PaliGemma
    from palikit.cli import main
    from palikit.demo import shapes
    from palikit.demo.splits import write_split

    base, paths = folders
    d = write_split(shapes, tmp_path / "data", "test", 8)
    rows = [r for r in map(js.loads, open(d / "test.jsonl")) if r["task"] == "ocr"][:3]
    (d / "ocr.jsonl").write_text("".join(js.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["eval", str(d / "ocr.jsonl"), "--task", "ocr", "--model", str(base), "--device", "cpu", "--dtype",
            "float32", "--out", str(out), "--max-new-tokens", "5", "--no-progress"]
    for name, path in paths.items():
        args += ["--adapter", f"{name}={path}"]
    assert main(args) in (0, None)
    report = js.loads((out / "report.json").read_text())
    assert [m["model"] for m in report["models"]][1:] == ["ocr", "det"]
    assert len(report["comparison"]) == 3
    merged = PaliGemma.from_pretrained(base, device="cpu", dtype="float32", adapter=paths["det"])
    preds = [js.loads(x) for x in (out / "baselines" / "det" / "predictions.jsonl").read_text().splitlines()]
    for p in preds:
        row = rows[int(p["id"])]
        want = merged.predict(d / row["image"], row["prompt"] if "prompt" in row else "ocr", max_new_tokens=5).text
        assert p["text"] == want


@pytest.mark.parametrize("values, merged, named", [
    ([], None, {}),
    (["runs/a/adapter"], "runs/a/adapter", {}),
    (["ocr=runs/a", "det=runs/b"], None, {"ocr": "runs/a", "det": "runs/b"}),
    (["./x=y/adapter"], "./x=y/adapter", {}),  # a path holding '=' stays a path
])
def test_adapter_flags_split_into_merged_and_named(values, merged, named):
    from palikit.cli.serve import split_adapters

    assert split_adapters(values) == (merged, named)


@pytest.mark.parametrize("values, message", [
    (["a", "b"], "a PATH alone merges that one adapter"),
    (["a", "x=b"], "a PATH alone merges that one adapter"),
    (["x=a", "x=b"], "the name 'x' is given twice"),
])
def test_adapter_flags_refused_with_the_reason(values, message):
    from palikit.cli.serve import split_adapters

    with pytest.raises(ValueError, match=message):
        split_adapters(values)
