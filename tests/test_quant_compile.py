"""A quantized model under the engine's compiled decode step (`torch.compile(fullgraph=True)`): the
same greedy tokens as the eager step, for int8 and int4, and the `palikit quantize demo` command end
to end (card with the measured quality table, the folder loads with `--model`, bad inputs refused)."""

from __future__ import annotations

import json

import pytest
import torch

from palikit.api import PaliGemma
from palikit.cli import main
from palikit.engine import Engine, GenerationOptions, Request
from palikit.model import quant as Q
from palikit.testing import make_tiny_checkpoint
from palikit.weights.hf import load_hf_checkpoint

pytestmark = pytest.mark.slow  # torch.compile, and the quantize command evaluates the demo model


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_decode_equals_eager_on_a_quantized_model(tmp_path, bits):
    folder = make_tiny_checkpoint(tmp_path / "m", "pg2", image_size=28)
    model = load_hf_checkpoint(folder)
    Q.quantize_model(model, Q.plan(model, bits, 32 if bits == 4 else None))
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    requests = [Request([cfg.bos_token_id] + torch.randint(3, 30, (n,), generator=g).tolist(),
                        pixel_values=torch.rand(1, 3, 28, 28, generator=g) * 2 - 1) for n in (3, 6, 4)]
    options = GenerationOptions(12, ignore_eos=True)
    outs = []
    for compile in (False, True):
        engine = Engine(model, compile=compile, max_slots=4, max_len=64)
        outs.append([list(x.tokens) for x in engine.generate(requests, options)])
        if not compile:  # admission timing decides what shares a prefill / step: each alone gives the same
            alone = [list(engine.generate([r], options)[0].tokens) for r in requests]
        engine.close()
    assert outs[0] == outs[1] == alone and all(len(t) == 12 for t in outs[0])


def test_quantize_demo_command_writes_a_card_with_measured_quality(tmp_path, capsys):
    out = tmp_path / "demo-int4"
    assert main(["quantize", "demo", "--to", "int4", "--out", str(out), "--eval-images", "24"]) == 0
    printed = capsys.readouterr().out
    assert "| detect | map50 |" in printed and "int4 same answers" in printed
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert block == {"format": "palikit", "version": 1, "bits": 4, "group_size": 64, "keep_vision": False,
                     "method": "rtn", "embedding_bits": 8, "int8_layers": [], "kept": []}
    card = (out / "README.md").read_text()
    assert "## Quality" in card and "first 24 images, every task" in card and "| segment | miou |" in card
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["tasks"]) == {"ocr", "count", "color", "caption", "detect", "segment"}
    assert quality["agreement"]["int4"]["all"] > 0.5
    pg = PaliGemma.from_pretrained(out, device="cpu")
    assert pg.quantization == "int4 (group 64)" and pg.mask_codec is not None
    assert main(["caption", "--model", str(out), "--json", str(tmp_path / "x.png")]) == 2  # no such image: clean error
    assert main(["quantize", str(out), "--to", "int8", "--out", str(tmp_path / "again")]) == 2
    assert main(["quantize", "demo", "--to", "int4", "--group-size", "128", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "already quantized (int4 (group 64)); quantize its float checkpoint instead" in err
    assert "--group-size 128 does not divide" in err and "Use --group-size 32 or 64" in err
