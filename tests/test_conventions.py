"""Per-checkpoint conventions (weights/conventions.py) against transformers, both ways: the final
soft-cap on (a `pt` checkpoint) equals transformers as it ships; off (a transfer) equals transformers
with `final_logit_softcapping=None` in its text config. The sliding window: full attention by default
equals transformers with the window removed, at a sequence longer than the window; the window on
request equals transformers as it ships. Plus the SigLIP pooling head that transformers writes."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers.models import TINY, hf_logits, hf_model, make_batch
from palikit.weights.big_vision import load_npz_checkpoint, npz_image_size, state_dict_to_npz
from palikit.weights.conventions import PT_FINAL_SOFTCAP, checkpoint_names, parse_override, stage_from_names
from palikit.weights.export import save_hub_checkpoint
from palikit.weights.hf import CheckpointError, load_hf_checkpoint

ATOL = 1e-4


def hf_dict(kind: str, **text) -> dict:
    """The config.json transformers would write for `kind`: no palikit block (not palikit's export)."""
    d = TINY[kind].to_hf_dict()
    d.pop("palikit", None)
    d["text_config"].update(text)
    return d


def hf_variant(kind: str, **text):
    """transformers model with `kind`'s random weights and a changed text config (eager)."""
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    cfg = HFConfig(**hf_dict(kind, **text))
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    model.load_state_dict(hf_model(kind).state_dict())
    return model


def write_hf(kind: str, folder, **text):
    """A checkpoint written by transformers' own save_pretrained, config without a palikit block."""
    hf_variant(kind, **text).save_pretrained(folder)
    assert "palikit" not in json.loads((folder / "config.json").read_text())
    return folder


def max_diff(model, ref, batch) -> float:
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        mine = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                     ar_mask=batch["ar_mask"])
    theirs = hf_logits(ref, batch)[..., : mine.shape[-1]]
    return (mine[valid] - theirs[valid]).abs().max().item()


# ------------------------------------------------------------------------------ final soft-cap
def test_pt_checkpoint_is_capped_and_equals_transformers_as_shipped(tmp_path):
    folder = write_hf("pg2", tmp_path / "paligemma2-tiny-pt-28")
    model = load_hf_checkpoint(folder)
    assert model.config.text.final_logit_softcapping == 3.0  # the config's value (tiny-pg2 uses 3)
    assert "pretrained checkpoint" in model.config.conventions[0]
    batch = make_batch(TINY["pg2"])
    shipped = hf_model("pg2")
    assert max_diff(model, shipped, batch) < ATOL
    # transformers as it ships (>= 5.23) does apply the cap: uncapped transformers differs
    assert max_diff(model, hf_variant("pg2", final_logit_softcapping=None), batch) > 1e-2


def test_transfer_checkpoint_is_uncapped_and_equals_transformers_with_cap_disabled(tmp_path):
    folder = write_hf("pg2", tmp_path / "paligemma2-tiny-mix-28")  # config.json still says 3.0
    model = load_hf_checkpoint(folder)
    assert model.config.text.final_logit_softcapping is None
    assert "transfer checkpoint ('paligemma2-tiny-mix-28')" in model.config.conventions[0]
    batch = make_batch(TINY["pg2"], seed=3, pad=(2, 0))
    assert max_diff(model, hf_variant("pg2", final_logit_softcapping=None), batch) < ATOL
    assert max_diff(model, hf_model("pg2"), batch) > 1e-2


def test_user_override_wins_both_ways(tmp_path):
    batch = make_batch(TINY["pg2"])
    mix = write_hf("pg2", tmp_path / "paligemma2-tiny-mix-28")
    capped = load_hf_checkpoint(mix, final_logit_softcap=3.0)
    assert capped.config.conventions[0] == "final logit soft-cap: 3 (set by the caller)"
    assert max_diff(capped, hf_model("pg2"), batch) < ATOL
    pt = write_hf("pg2", tmp_path / "paligemma2-tiny-pt-28")
    assert max_diff(load_hf_checkpoint(pt, final_logit_softcap=None), hf_variant("pg2", final_logit_softcapping=None),
                    batch) < ATOL
    assert load_hf_checkpoint(pt, final_logit_softcap="off").config.text.final_logit_softcapping is None
    with pytest.raises(ValueError, match="final_logit_softcap must be 'auto', a positive number or None"):
        load_hf_checkpoint(pt, final_logit_softcap="thirty")


def test_config_that_turns_the_cap_off_and_unknown_stage_follow_config_json(tmp_path):
    off = write_hf("pg2", tmp_path / "paligemma2-tiny-pt-28", final_logit_softcapping=None)
    assert load_hf_checkpoint(off).config.text.final_logit_softcapping is None
    unknown = write_hf("pg2", tmp_path / "my-model")  # stage cannot be told: config.json's value
    cfg = load_hf_checkpoint(unknown).config
    assert cfg.text.final_logit_softcapping == 3.0 and "stage unknown" in cfg.conventions[0]
    pg1 = write_hf("pg1", tmp_path / "paligemma-tiny-pt-28")
    assert load_hf_checkpoint(pg1).config.text.final_logit_softcapping is None


def test_export_records_the_convention_transformers_agrees_and_card_says_it(tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    model = load_hf_checkpoint(write_hf("pg2", tmp_path / "paligemma2-tiny-mix-28"))
    out = save_hub_checkpoint(model, tmp_path / "export-pt")  # a misleading name: the metadata wins
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["palikit"] == {"final_logit_softcap": None, "sliding_window": None}
    assert cfg["text_config"]["final_logit_softcapping"] is None
    card = (out / "README.md").read_text()
    assert "| final logit soft-cap | off |" in card and "transfer checkpoint" in card
    again = load_hf_checkpoint(out)
    assert again.config.text.final_logit_softcapping is None
    assert "recorded by palikit's export" in again.config.conventions[0]
    hf = PaliGemmaForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert max_diff(again, hf, make_batch(TINY["pg2"])) < ATOL  # transformers reads the same: no cap


def test_npz_stage_from_name_else_documented_default_with_one_log_line(tmp_path, caplog):
    model = load_hf_checkpoint(write_hf("pg2", tmp_path / "hf"))
    arrays = state_dict_to_npz(model.state_dict(), model.config)
    for name in ("ckpt.npz", "paligemma2-tiny-pt-28.b16.npz", "paligemma2-tiny-ft-docci-28.npz"):
        np.savez(tmp_path / name, **arrays)
    with caplog.at_level(logging.INFO, logger="palikit"):
        unknown = load_npz_checkpoint(tmp_path / "ckpt.npz")
    notes = [r for r in caplog.records if "cannot tell" in r.getMessage()]
    assert len(notes) == 1 and "final_logit_softcap=30" in notes[0].getMessage()
    assert unknown.config.text.final_logit_softcapping is None
    # the decided value gives big_vision's logits (= transformers uncapped); the tiny vocabulary's
    # <image> id is not inferable from an .npz, so the rest of the config is given
    decided = replace(model.config, text=replace(model.config.text, final_logit_softcapping=None))
    uncapped = load_npz_checkpoint(tmp_path / "ckpt.npz", config=decided)
    assert max_diff(uncapped, hf_variant("pg2", final_logit_softcapping=None), make_batch(TINY["pg2"])) < ATOL
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="palikit"):
        pt = load_npz_checkpoint(tmp_path / "paligemma2-tiny-pt-28.b16.npz")
        ft = load_npz_checkpoint(tmp_path / "paligemma2-tiny-ft-docci-28.npz")
    assert not caplog.records
    assert pt.config.text.final_logit_softcapping == PT_FINAL_SOFTCAP
    assert ft.config.text.final_logit_softcapping is None
    assert load_npz_checkpoint(tmp_path / "ckpt.npz", final_logit_softcap=3.0).config.text.final_logit_softcapping == 3.0


def test_info_reads_an_npz_from_its_headers(tmp_path, capsys):
    from palikit.cli import main
    from palikit.weights.resolve import get_config
    from palikit.weights.big_vision import config_from_npz, read_npz

    model = load_hf_checkpoint(write_hf("pg2", tmp_path / "hf"))
    arrays = state_dict_to_npz(model.state_dict(), model.config)
    bf16 = {k: torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view("V2") for k, a in arrays.items()}
    np.savez(tmp_path / "paligemma2-tiny-mix-28.npz", **bf16)
    cfg = get_config(tmp_path / "paligemma2-tiny-mix-28.npz")
    full = config_from_npz(read_npz(tmp_path / "paligemma2-tiny-mix-28.npz"), "paligemma2-tiny-mix-28.npz")
    assert cfg.vision == full.vision and replace(cfg.text, final_logit_softcapping=30.0) == full.text
    assert cfg.text.final_logit_softcapping is None
    assert main(["info", str(tmp_path / "paligemma2-tiny-mix-28.npz"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["conventions"][0].startswith("final logit soft-cap: off (transfer checkpoint")


@pytest.mark.parametrize("names, stage", [
    (["paligemma2-3b-pt-224"], "pt"), (["paligemma2-10b-mix-448"], "transfer"),
    (["paligemma2-3b-ft-docci-448.b16"], "transfer"), (["paligemma2-3b-pt-224-finetuned"], "transfer"),
    (["paligemma2_3b_pt_896"], "pt"), (["my-checkpoint"], None), (["mixture-of-things"], None),
    (["run-1", "paligemma2-3b-pt-448"], "pt"), (["lora-run", "paligemma2-3b-pt-448"], "transfer"),
])
def test_stage_from_names(names, stage):
    assert stage_from_names(names)[0] == stage


def test_checkpoint_names_see_the_hub_cache_repo_and_trainer_exports(tmp_path):
    snap = tmp_path / "hub" / "models--google--paligemma2-3b-pt-224" / "snapshots" / ("ab" * 20)
    assert checkpoint_names(snap) == ["paligemma2-3b-pt-224"]
    final = tmp_path / "runs" / "docci-lora" / "final"
    assert checkpoint_names(final) == ["docci-lora"]
    assert parse_override("30", "x") == 30.0 and parse_override("auto", "x") == "auto"
    assert parse_override("off", "x") is None and parse_override(0, "x") is None


# ------------------------------------------------------------------------------ sliding window
def test_sliding_window_off_by_default_and_on_request_past_the_window(tmp_path):
    kind = "pg2-sliding"  # window 6; the batch below is 4 image + 8 prefix + 10 suffix tokens (+ pads)
    window = TINY[kind].text.sliding_window
    folder = write_hf(kind, tmp_path / "paligemma2-tiny-pt-28")
    batch = make_batch(TINY[kind], seed=2, prefix_len=8, suffix_len=10, pad=(0, 2))
    assert batch["input_ids"].shape[1] > 3 * window
    full_ref = hf_variant(kind, sliding_window=None, layer_types=["full_attention"] * 3)
    model = load_hf_checkpoint(folder)
    assert model.config.text.sliding_window is None
    assert "window 6 (inherited from Gemma 2) not applied" in model.config.conventions[1]
    assert max_diff(model, full_ref, batch) < ATOL
    assert max_diff(model, hf_model(kind), batch) > 1e-3  # the window bites at this length
    windowed = load_hf_checkpoint(folder, sliding_window=window)
    assert max_diff(windowed, hf_model(kind), batch) < ATOL
    assert [windowed.config.text.is_sliding(i) for i in range(3)] == [True, False, True]


# ------------------------------------------------------------------------------ SigLIP pooling head
def test_siglip_pooling_head_written_by_transformers_loads_with_one_log_line(tmp_path, caplog):
    from safetensors.torch import load_file, save_file
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    d = hf_dict("pg2")
    del d["vision_config"]["vision_use_head"]  # transformers' SigLIP default: build the pooling head
    hcfg = HFConfig(**d)
    for c in (hcfg, hcfg.text_config, hcfg.vision_config):
        c._attn_implementation = "eager"
    hm = PaliGemmaForConditionalGeneration(hcfg).eval()
    missing, _ = hm.load_state_dict(hf_model("pg2").state_dict(), strict=False)
    assert missing and all(".head." in k for k in missing)
    folder = tmp_path / "paligemma2-tiny-pt-28"
    hm.save_pretrained(folder)
    written = load_file(folder / "model.safetensors")
    heads = sorted(k for k in written if ".head." in k)
    assert len(heads) == 11
    with caplog.at_level(logging.INFO, logger="palikit"):
        model = load_hf_checkpoint(folder)
    lines = [r.getMessage() for r in caplog.records if "pooling head" in r.getMessage()]
    assert len(lines) == 1 and all(k in lines[0] for k in heads)
    assert max_diff(model, hm, make_batch(TINY["pg2"])) < ATOL
    head_prefix = heads[0][: heads[0].index(".head.") + 6]
    for extra in (head_prefix + "extra", "vision_tower.encoder.layers.0.extra.weight"):
        save_file({**written, extra: torch.zeros(2)}, folder / "model.safetensors")
        with pytest.raises(CheckpointError, match="unexpected tensor"):
            load_hf_checkpoint(folder)


def test_npz_image_size_reads_the_resolution_from_shapes(tmp_path):
    cfg = TINY["pg1"].with_image_size(56)  # 16 patches
    from palikit.model import build_model

    model = build_model(replace(cfg, name="x"), device="cpu")
    np.savez(tmp_path / "ckpt.npz", **state_dict_to_npz(model.state_dict(), model.config))
    assert npz_image_size(tmp_path / "ckpt.npz") == 56
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(CheckpointError, match="is this a PaliGemma big_vision checkpoint"):
        npz_image_size(tmp_path / "other.npz")
