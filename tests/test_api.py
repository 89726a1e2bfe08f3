"""The user-facing PaliGemma object and CLI on a tiny random checkpoint in the real on-disk format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from palikit.api import PaliGemma
from palikit.engine import Generation, GenerationOptions, Request, Ticket


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)  # 90 wide, 60 high
    return path


def test_predict_equals_engine_on_the_same_inputs(pg, image):
    result = pg.predict(image, "caption en", max_new_tokens=8)
    pv = pg.processor([str(image)])
    feats = pg.model.embed_images(pv)[0].detach()
    gen = pg.engine.generate([Request(pg.tokenizer.encode_prompt("caption en").ids, feats)], GenerationOptions(8))[0]
    assert result.tokens == gen.tokens
    assert result.text == pg.tokenizer.decode(gen.tokens)
    assert result.image_size == (90, 60)
    assert set(result.timings) >= {"image_ms", "prefill_ms", "decode_step_ms"}
    json.loads(result.to_json())


def test_batch_equals_single_and_repeated_images_encode_once(pg, image, monkeypatch):
    prompts = ["caption en", "ocr", "answer en what is this", "detect circle"]
    pg.engine.scheduler.image_cache.clear()
    calls = []
    real = pg.model.vision_tower.forward
    monkeypatch.setattr(pg.model.vision_tower, "forward", lambda pv: calls.append(pv.shape) or real(pv))
    singles = [pg.predict(image, p, max_new_tokens=6).tokens for p in prompts]
    batched = pg.predict_batch([image] * len(prompts), prompts, max_new_tokens=6)
    assert [r.tokens for r in batched] == singles
    # one image, eight prompts: the tower ran once (the image-feature cache is keyed by content)
    assert len(calls) == 1
    with torch.no_grad():  # weights change (an optimizer step): the cache must not serve old features
        pg.model.multi_modal_projector.linear.bias.add_(0.0)
    pg.predict(image, prompts[0], max_new_tokens=6)
    assert len(calls) == 2


def test_stream_pieces_join_to_the_predicted_text(pg, image):
    pieces = list(pg.stream(image, "describe en", max_new_tokens=10))
    assert "".join(pieces) == pg.predict(image, "describe en", max_new_tokens=10).text


def test_detections_come_back_in_original_pixels_with_scores(pg, image, monkeypatch):
    tok = pg.tokenizer
    text_ids = tok.encode("<loc0256><loc0512><loc0768><loc1023> circle ; <loc0000><loc0000><loc0512><loc0512> dog")
    logprobs = [-0.1] * len(text_ids)
    def fake_submit(request, options, on_token=None):
        ticket = Ticket(request, options, None, frozenset(), 0)
        ticket.future.set_result(Generation(text_ids, logprobs, True, {}))
        return ticket

    monkeypatch.setattr(pg.engine, "submit", fake_submit)
    r = pg.detect(image, ["circle"])
    assert [d.label for d in r.detections] == ["circle", "dog"]
    x0, y0, x1, y1 = r.detections[0].box
    assert (x0, y0, x1, y1) == pytest.approx((0.5 * 90, 0.25 * 60, 1023 / 1024 * 90, 0.75 * 60))
    assert r.detections[0].score == pytest.approx(np.exp(-0.1), rel=1e-4)
    assert r.detections[0].requested and not r.detections[1].requested


def test_mismatched_tokenizer_is_refused(ckpt, tmp_path):
    from palikit.testing import WORDS
    from palikit.tokenizer import build_tokenizer

    big = build_tokenizer(WORDS + [f"extra{i}" for i in range(500)] + list("abcdefghijklmnopqrstuvwxyz"), tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="do not belong together"):
        PaliGemma.from_pretrained(ckpt, device="cpu", tokenizer=tmp_path / "tokenizer.json")
    del big


def test_missing_files_and_offline_hub_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        PaliGemma.from_pretrained(tmp_path / "nope" / "x" / "y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        PaliGemma.from_pretrained(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        PaliGemma.from_pretrained("google/paligemma2-3b-mix-224")


def test_bad_options_and_prompts(pg, image):
    with pytest.raises(ValueError, match="unknown option"):
        pg.predict(image, "ocr", max_tokens=3)
    with pytest.raises(ValueError, match="prompt must be a string"):
        pg.predict(image, None)
    with pytest.raises(ValueError, match="limit is"):
        pg.predict(image, "answer en " + "a " * 3000)
    with pytest.raises(ValueError, match="one prompt per image"):
        pg.predict_batch([image], ["ocr", "ocr"])


def test_cli_predict_json_and_annotated_png(ckpt, image, tmp_path, capsys):
    from palikit.cli import main

    out = tmp_path / "annotated.png"
    assert main(["detect", str(image), "circle ; square", "--model", str(ckpt), "--device", "cpu", "--json",
                 "--max-new-tokens", "6", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "detect circle ; square"
    w, h = Image.open(out).size  # drawn enlarged by a whole factor, short side >= 448 (legible labels)
    assert w % 90 == 0 and w // 90 == h // 60 and h % 60 == 0 and min(w, h) >= 448
    assert main(["caption", str(tmp_path / "missing.png"), "--model", str(ckpt)]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_multi_frame_example(pg, image, tmp_path):
    """Two different frames through `predict` == the engine-free reference: each frame encoded on its
    own, the tokens concatenated (big_vision's layout), greedy decoding by full recompute, and the
    same per-token log-probs; the frames' order is part of the input."""
    from palikit.engine import generate_naive

    other = tmp_path / "other.png"
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((70, 50)).save(other)
    prompt = "answer en what changed"
    text_ids = pg.tokenizer.encode_prompt(prompt).ids
    pv = pg.processor([str(image), str(other)])  # [2, 3, S, S]
    with torch.no_grad():
        frames = torch.cat([pg.model.embed_images(pv[i:i + 1])[0] for i in range(2)])  # [2N, H]
        together = pg.model.embed_images(pv[None])[0]  # [1, 2, 3, S, S] -> [2N, H]
    torch.testing.assert_close(together, frames, rtol=0, atol=1e-5)

    def reference(feats):
        tokens = generate_naive(pg.model, Request(text_ids, feats), 6, eos_ids=(pg.tokenizer.eos_id,))
        ids = [pg.model.config.image_token_index] * feats.shape[0] + text_ids + tokens
        ar = [0] * (len(ids) - len(tokens)) + [1] * len(tokens)
        with torch.no_grad():
            logits = pg.model(torch.tensor([ids]), image_features=feats[None], ar_mask=torch.tensor([ar]))[0]
        logp = logits.log_softmax(-1)  # [T, V]
        n = len(ids) - len(tokens)
        return tokens, [float(logp[n - 1 + k, t]) for k, t in enumerate(tokens)]

    n = frames.shape[0] // 2
    r = pg.predict([image, other], prompt, max_new_tokens=6)
    swapped = pg.predict([other, image], prompt, max_new_tokens=6)
    assert (r.image_size, swapped.image_size) == ((90, 60), (70, 50))  # the first frame's size
    for result, feats in ((r, frames), (swapped, torch.cat([frames[n:], frames[:n]]))):
        tokens, logprobs = reference(feats)
        assert result.tokens == tokens and len(tokens) == 6
        assert result.token_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(r.token_logprobs, swapped.token_logprobs)) > 1e-4
