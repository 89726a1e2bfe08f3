"""Presets match the published parameter counts; Hub config.json round-trips through transformers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from palikit.config import PRESETS, PaliGemmaConfig
from palikit.weights.resolve import get_config
from palikit.model import count_parameters

PUBLISHED = {
    "pg1-3b-224": 2_923_335_408, "pg1-3b-448": 2_924_220_144, "pg1-3b-896": 2_927_759_088,
    "pg2-3b-224": 3_032_094_960, "pg2-3b-448": 3_032_979_696, "pg2-3b-896": 3_036_518_640,
    "pg2-10b-224": 9_662_409_456, "pg2-10b-448": 9_663_294_192, "pg2-10b-896": 9_666_833_136,
    "pg2-28b-224": 27_650_192_112,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_equal_published(name):
    assert count_parameters(PRESETS[name]) == PUBLISHED[name]


def test_attention_only_parameter_count_pg1():
    from palikit.model import build_model

    model = build_model(PRESETS["pg1-3b-224"])
    n = sum(p.numel() for name, p in model.named_parameters() if name.startswith("language_model.") and ".self_attn." in name)
    assert n == 169_869_312


def test_hf_config_round_trip_through_transformers(tmp_path):
    from transformers import PaliGemmaConfig as HFConfig

    for name in ("pg1-3b-448", "pg2-28b-896", "tiny-pg2"):
        cfg = PRESETS[name]
        hf = HFConfig(**cfg.to_hf_dict())
        hf.save_pretrained(tmp_path / name)
        back = PaliGemmaConfig.from_json_file(tmp_path / name / "config.json")
        t = back.text
        layers = range(t.num_hidden_layers)
        assert [t.is_sliding(i) for i in layers] == [cfg.text.is_sliding(i) for i in layers]
        assert replace(t, layer_types=None) == cfg.text
        assert back.vision == cfg.vision
        assert back.image_token_index == cfg.image_token_index


def test_hub_style_config_with_missing_keys_and_257216_rows(tmp_path):
    """The shape of a published PaliGemma 1 config.json (sparse text_config)."""
    d = {
        "model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2048, "hidden_size": 2048,
        "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                        "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
                        "num_image_tokens": 1024, "vocab_size": 257216},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 448,
                          "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "projection_dim": 2048},
    }
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = get_config(tmp_path)
    assert cfg.vision.num_image_tokens == 1024
    assert cfg.output_vocab_size == 257152  # <image> and HF's padding rows are never predicted
    assert count_parameters(cfg) == 2_924_220_144 + 64 * 2048  # HF's 64 extra embedding rows


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="Unknown model 'pg3'"):
        get_config("pg3")
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match="model_type='llava'"):
        get_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_config(tmp_path)


def test_info_cli_prints_exact_count(capsys):
    from palikit.cli import main

    assert main(["info", "pg2-10b-224", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == 9_662_409_456
    assert main(["info", "nonexistent-model"]) == 2


def test_info_says_which_final_softcap_and_window_are_in_force(tmp_path, capsys):
    """A PaliGemma 2 transfer's config.json (as Google's say: cap 30, window 4096, no palikit block)."""
    from palikit.cli import main

    d = PRESETS["pg2-3b-448"].to_hf_dict()
    d.pop("palikit")
    d["text_config"]["sliding_window"] = 4096
    folder = tmp_path / "paligemma2-3b-mix-448"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(d))
    assert main(["info", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"]["final_logit_softcapping"] is None and out["text"]["sliding_window"] is None
    assert out["conventions"][0].startswith("final logit soft-cap: off (transfer checkpoint")
    assert main(["info", str(folder), "--json", "--final-logit-softcap", "30", "--sliding-window", "4096"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["text"]["final_logit_softcapping"], out["text"]["sliding_window"]) == (30.0, 4096)
    assert main(["info", str(folder)]) == 0
    table = capsys.readouterr().out
    assert "final off" in table and "transfer checkpoint" in table
    assert main(["info", str(folder), "--final-logit-softcap", "big"]) == 2


def test_palikit_block_keeps_the_conventions_through_transformers(tmp_path):
    from transformers import PaliGemmaConfig as HFConfig

    cfg = replace(PRESETS["tiny-pg2"], text=replace(PRESETS["tiny-pg2"].text, final_logit_softcapping=None,
                                                    sliding_window=8))
    HFConfig(**cfg.to_hf_dict()).save_pretrained(tmp_path / "paligemma2-tiny-pt")  # the name says pt
    back = get_config(tmp_path / "paligemma2-tiny-pt")
    assert (back.text.final_logit_softcapping, back.text.sliding_window) == (None, 8)
    assert "recorded by palikit's export" in back.conventions[0]


def test_resolution_comes_from_the_config_never_a_default_224(tmp_path):
    """A config.json without vision_config.image_size still gives its resolution (num_image_tokens)."""
    d = PRESETS["pg2-3b-896"].to_hf_dict()
    del d["vision_config"]["image_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = get_config(tmp_path)
    assert (cfg.vision.image_size, cfg.vision.num_image_tokens) == (896, 4096)


def test_info_on_a_preset_takes_the_overrides(capsys):
    from palikit.cli import main

    assert main(["info", "pg2-3b-896", "--json", "--final-logit-softcap", "off"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"]["final_logit_softcapping"] is None and out["parameters"] == 3_036_518_640
    assert out["conventions"] == ["final logit soft-cap: off (set by the caller)",
                                  "sliding window: off, full attention (the preset's value)"]
