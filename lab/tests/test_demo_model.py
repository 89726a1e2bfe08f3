"""The demo model's checkpoint format: the folders the v1 and v2 builds produce (our tokenizer.json,
preprocessor_config.json, DEMO_CONFIG / DEMO2_CONFIG weights in the Hub layout) and the bundled model
load in transformers and give palikit's answers token for token (v2 on free-size, non-square images).
The CLI around the bundled model: tests/test_demo_cli.py."""

from __future__ import annotations

import json

import pytest
import torch

from palikit.api import PaliGemma
from palikit.assets import bundled_demo_model
from palikit.demo import shapes2
from lab.demo.build import DEMO2_CONFIG, DEMO_CONFIG, build, build_initial_checkpoint, build_tokenizer
from palikit.demo.shapes import make_sample
from palikit.tasks.mask_codec import make_random_codec


@pytest.fixture(scope="module")
def recipe_checkpoint(tmp_path_factory):
    """What `python -m lab.demo.build` hands to `palikit train` (random weights, real files)."""
    out = tmp_path_factory.mktemp("demo-build")
    tok = build_tokenizer(out)
    make_random_codec(seed=0, embed_dim=64).to_npz(out / "vae-oid.npz")
    return build_initial_checkpoint(out, tok, seed=3)


@pytest.fixture(scope="module")
def v2_checkpoint(tmp_path_factory):
    """What `python -m lab.demo.build --version 2` hands to training: 224 px / patch 28, structured init."""
    out = tmp_path_factory.mktemp("demo2-build")
    build(out, n_train=4, n_val=2, n_test=2, codec_images=8, codec_steps=3, progress=False, version=2)
    return out / "init"


def _parity_images(v2: bool) -> list:
    """v1's square 112 px images for a v1 model; shapes v2's free sizes and aspect ratios (what the
    preprocessing squashes to 224 px, the same way in transformers' image processor) for a v2 one."""
    if v2:
        images = [shapes2.make_sample(i, seed=2_000_003).image for i in range(3)]
        assert len({im.size for im in images}) == 3 and any(w != h for w, h in (im.size for im in images))
        return images
    return [make_sample(i, seed=2_000_003).image for i in range(2)]


@pytest.mark.parametrize("which", ["recipe-init", "v2-init", "bundled"])
def test_the_demo_checkpoint_loads_in_transformers_and_answers_the_same(which, request):
    """transformers (eager, fp32) reads the folder -- weights, tokenizer.json, preprocessor_config.json
    -- and greedy generation gives palikit's tokens for every task prompt: v1's and v2's initial
    checkpoints (v2 on free-size images, with a referring prompt) and the trained model the package ships."""
    import transformers
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = (bundled_demo_model() if which == "bundled" else
              request.getfixturevalue({"recipe-init": "recipe_checkpoint", "v2-init": "v2_checkpoint"}[which]))
    assert folder is not None, "the package ships no demo model (src/palikit/assets/demo-model)"
    answered = 0
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf_proc = SiglipImageProcessorPil.from_pretrained(folder)
    ours = PaliGemma.from_pretrained(folder, device="cpu", dtype="float32")
    assert ours.model.config.vision.patch_size in (DEMO_CONFIG.vision.patch_size, DEMO2_CONFIG.vision.patch_size)
    assert ours.mask_codec is not None
    n_img, image_id = ours.model.config.vision.num_image_tokens, ours.model.config.image_token_index
    # PaliGemmaProcessor inserts image_seq_length <image> tokens: it must match the model's
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_seq_length"] == n_img
    prompts = ["caption en", "detect circle ; square ; triangle", "segment square", "ocr",
               "answer en how many circles are there", "answer en what color is the triangle"]
    v2 = ours.model.config.vision.image_size == DEMO2_CONFIG.vision.image_size
    if v2:
        prompts += ["detect the red circle", "segment the largest square"]
    for i, image in enumerate(_parity_images(v2)):
        pixels = hf_proc(images=image, return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
        assert torch.allclose(pixels, ours.processor.preprocess_with_sizes([image])[0], atol=1e-6)
        for prompt in prompts:
            text_ids = ours.tokenizer.encode_prompt(prompt).ids  # [BOS] prompt "\n"
            assert hf_tok(prompt + "\n", add_special_tokens=False).input_ids == text_ids[1:], prompt
            mine = ours.predict(image, prompt, max_new_tokens=12, constrained=False).tokens  # the raw model
            inp = torch.tensor([[image_id] * n_img + text_ids])
            with torch.no_grad():
                out = hf.generate(input_ids=inp, pixel_values=pixels, attention_mask=torch.ones_like(inp),
                                  token_type_ids=torch.zeros_like(inp), max_new_tokens=12, do_sample=False,
                                  eos_token_id=ours.tokenizer.eos_id, pad_token_id=ours.tokenizer.pad_id)
            theirs = out[0, inp.shape[1]:].tolist()
            eos = ours.tokenizer.eos_id
            theirs = theirs[:theirs.index(eos)] if eos in theirs else theirs
            assert mine == theirs, (which, i, prompt, mine, theirs)
            answered += bool(mine)
    assert answered >= len(prompts)  # not a model that stops at once everywhere
