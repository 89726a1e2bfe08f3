"""The ONNX export (`palikit.onnx`) against palikit itself: on tiny PaliGemma 1 and 2 checkpoints (one with a
sliding window shorter than the prompt) and the bundled demo model, onnxruntime's logits equal palikit's
engine (its slot cache) within 1e-4 at the prefill and at every decode step, fed the way transformers.js
feeds the graphs (`onnx/runtime.py`), and the greedy tokens are equal. Also: every prefix position (the
bidirectional prefix), a left-padded batch, and that the layout's files are what transformers.js reads."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from palikit.api import PaliGemma
from palikit.engine.request import Request
from palikit.engine.slots import SlotBatch
from palikit.testing import make_tiny_checkpoint
from palikit.weights.resolve import resolve

pytestmark = pytest.mark.slow  # each export traces three graphs with torch.export (seconds)

TOL = 1e-4
KINDS = ("pg1", "pg2", "pg2-sliding", "demo")


def load(kind: str, tmp_path_factory) -> tuple[PaliGemma, str]:
    """The model through palikit's own loader, and its source folder."""
    if kind == "demo":
        return PaliGemma.from_pretrained("demo", device="cpu", dtype="float32"), "demo"
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp(kind) / "ckpt", family=kind[:3])
    if kind == "pg2-sliding":  # a window shorter than the prompt on layers 0 and 2: the decode tokens slide
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        cfg["text_config"] |= {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"] * 2}
        cfg["text_config"]["layer_types"] = cfg["text_config"]["layer_types"][:3]
        cfg["palikit"]["sliding_window"] = 6
        path.write_text(json.dumps(cfg))
    pg = PaliGemma.from_pretrained(str(folder), device="cpu", dtype="float32")
    assert (pg.model.config.text.sliding_window == 6) == (kind == "pg2-sliding")
    return pg, str(folder)


@pytest.fixture(scope="module", params=KINDS)
def exported(request, tmp_path_factory):
    from palikit.onnx.export import export_onnx
    from palikit.onnx.runtime import OnnxPaliGemma

    pg, source = load(request.param, tmp_path_factory)
    out = tmp_path_factory.mktemp(f"onnx-{request.param}") / "export"
    export_onnx(pg.model, out, tokenizer_file=resolve(source).tokenizer, processor=pg.processor, log=lambda m: None)
    return request.param, pg, OnnxPaliGemma(out), out


def example(pg: PaliGemma, kind: str, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """pixel_values [1, 3, S, S] and prompt ids [<image> x N, BOS, prompt, "\\n"]."""
    if kind == "demo":
        from palikit.demo import shapes

        image = shapes.make_sample(seed, seed=shapes.SPLIT_SEEDS["test"], size=112).image
        pixels, prompt = pg.processor(image), "detect circle ; square"
    else:
        g = torch.Generator().manual_seed(seed)
        S = pg.model.config.vision.image_size
        pixels, prompt = torch.rand(1, 3, S, S, generator=g) * 2 - 1, "caption en what is the red circle"
    n = pg.model.config.vision.num_image_tokens
    return pixels, [pg.model.config.image_token_index] * n + pg.tokenizer.encode_prompt(prompt).ids


@torch.no_grad()
def palikit_steps(pg: PaliGemma, pixels: torch.Tensor, ids: list[int], steps: int) -> list[np.ndarray]:
    """palikit's engine path (slot cache): logits at the prefill, then after each greedy token."""
    n_img = pg.model.config.vision.num_image_tokens
    batch = SlotBatch(pg.model, 1, len(ids) + steps)
    logits = [batch.prefill([0], [Request(ids[n_img:], pg.model.embed_images(pixels)[0])])[0]]
    for _ in range(steps - 1):
        batch.set_tokens([0], logits[-1].argmax()[None])
        logits.append(batch.decode_logits()[0])
    return [x.numpy() for x in logits]


def test_logits_equal_palikit_at_prefill_and_every_decode_step(exported):
    kind, pg, rt, _ = exported
    for seed in (0, 1):
        pixels, ids = example(pg, kind, seed)
        steps = 12
        ours = palikit_steps(pg, pixels, ids, steps)
        onnx = rt.generate(pixels.numpy(), ids, steps, keep_logits=True, ignore_eos=True)
        assert len(onnx.logits) == len(ours) == steps
        diffs = [float(np.abs(a - b).max()) for a, b in zip(onnx.logits, ours)]
        assert max(diffs) < TOL, f"{kind}: max |logit diff| per step {diffs}"
        assert onnx.tokens == [int(x.argmax()) for x in ours]


def test_every_prefix_position_equals_the_bidirectional_forward(exported):
    kind, pg, rt, _ = exported
    pixels, ids = example(pg, kind)
    with torch.no_grad():
        ref = pg.model(torch.tensor([ids]), pixels).numpy()  # no ar_mask: the whole input is the prefix
    embeds = rt._embed(ids)
    (features,) = rt.sessions["vision_encoder"].run(None, {"pixel_values": pixels.numpy()})
    embeds[0, : features.shape[1]] = features[0]
    mask = np.ones((1, len(ids)), np.int64)
    logits, _ = decoder_call(rt, embeds, mask, np.arange(1, len(ids) + 1)[None])
    assert np.abs(logits - ref).max() < TOL


def decoder_call(rt, embeds, mask, positions, past=None):
    session = rt.sessions["decoder_model_merged"]
    B = embeds.shape[0]
    if past is None:
        past = {i.name: np.zeros((B, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
                if i.name.startswith("past_")}
    logits, *presents = session.run(None, {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                           "num_logits_to_keep": np.array(0, np.int64), **past})  # 0: all positions
    return logits, dict(zip(past, presents))


def test_a_left_padded_batch_equals_each_row_alone(exported):
    """Batched generation as transformers.js pads it (left): each row's logits are the row's alone."""
    kind, pg, rt, _ = exported
    (p0, ids0), (p1, ids1) = example(pg, kind, 0), example(pg, kind, 1)
    ids1 = ids1[:-3] + ids1[-1:]  # a shorter prompt: padded on the left
    pad = len(ids0) - len(ids1)
    rows = [ids0, [pg.model.config.pad_token_id] * pad + ids1]
    mask = np.array([[1] * len(ids0), [0] * pad + [1] * len(ids1)], np.int64)
    positions = np.where(mask == 1, np.cumsum(mask, 1), 1)  # transformers.js: cumsum, pads 1
    (features,) = rt.sessions["vision_encoder"].run(None, {"pixel_values": torch.cat([p0, p1]).numpy()})
    embeds = rt.sessions["embed_tokens"].run(None, {"input_ids": np.array(rows, np.int64)})[0]
    image = np.array(rows) == pg.model.config.image_token_index
    embeds[image] = features.reshape(-1, features.shape[-1])
    logits, past = decoder_call(rt, embeds, mask, positions)
    nxt = logits[:, -1].argmax(-1)
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    step, _ = decoder_call(rt, rt.sessions["embed_tokens"].run(None, {"input_ids": nxt[:, None]})[0], step_mask,
                           positions[:, -1:] + 1, past)
    for b, (pixels, ids) in enumerate([(p0, ids0), (p1, ids1)]):
        alone = palikit_steps(pg, pixels, ids, 2)
        assert np.abs(logits[b, -1] - alone[0]).max() < TOL
        assert np.abs(step[b, -1] - alone[1]).max() < TOL


def test_the_layout_is_what_transformersjs_reads(exported):
    kind, pg, _, out = exported
    assert sorted(p.name for p in (out / "onnx").iterdir()) == [
        "decoder_model_merged.onnx", "embed_tokens.onnx", "vision_encoder.onnx"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "paligemma" and cfg["image_token_index"] == pg.model.config.image_token_index
    assert "transformers.js_config" not in cfg  # small graphs: weights inside the .onnx files
    tok = json.loads((out / "tokenizer.json").read_text())
    assert "<bos>" not in json.dumps(tok["post_processor"])  # transformers.js must not add a BOS of its own
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
    proc = json.loads((out / "preprocessor_config.json").read_text())
    assert proc["image_seq_length"] == pg.model.config.vision.num_image_tokens
    session = ort.InferenceSession(str(out / "onnx" / "decoder_model_merged.onnx"))
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    t = pg.model.config.text
    assert len(past) == 2 * t.num_hidden_layers
    # transformers.js sizes the empty cache from these names: "batch_size" -> batch, other names -> 0
    assert past[0].shape == ["batch_size", t.num_key_value_heads, "past_sequence_length", t.head_dim]
    keep = next(i for i in session.get_inputs() if i.name == "num_logits_to_keep")  # transformers.js passes 1
    assert keep.shape == [] and keep.type == "tensor(int64)"
    # readable as any file the user writes (mkstemp and onnx's external-data writer make 0o600 files)
    from palikit.fileio import umask

    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask()), {k: oct(v) for k, v in modes.items()}
    # the tokenizer files give palikit's ids too
    from palikit.tokenizer import Tokenizer

    assert Tokenizer.from_file(out / "tokenizer.json").encode_prompt("caption en").ids == \
        pg.tokenizer.encode_prompt("caption en").ids
