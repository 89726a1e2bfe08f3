"""TrainConfig: YAML + key=value overrides with type conversion and clear errors."""

from __future__ import annotations

import pytest

from palikit.train.config import ConfigError, TrainConfig


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: /m\ntrain_data: d.jsonl\nlr: 3e-5\nbatch_size: 16\nmode: attention\n")
    cfg = TrainConfig.from_yaml(p, ["lr=1e-4", "mode=lora", "max_steps=20", "freeze_vision=true",
                                    "max_len=none", "warmup=0.1", "val_data=v.jsonl", "lora_targets=q_proj,v_proj"])
    assert (cfg.lr, cfg.mode, cfg.max_steps, cfg.freeze_vision, cfg.max_len) == (1e-4, "lora", 20, True, None)
    assert cfg.batch_size == 16 and cfg.warmup == 0.1 and cfg.val_data == "v.jsonl"
    assert cfg.lora_targets == "q_proj,v_proj"
    odd = TrainConfig.from_dict({}, [r"lora_targets=.*[qv]_proj", "tokenizer=none", "output_dir=runs/a=b", "model=123"])
    assert odd.lora_targets == ".*[qv]_proj" and odd.tokenizer is None and odd.output_dir == "runs/a=b"
    assert odd.model == "123"
    assert TrainConfig.from_yaml(p).optimizer_name == "sgd"  # attention mode -> the colab's SGD
    assert cfg.optimizer_name == "adamw"
    # every field is overridable and round-trips
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_unknown_keys_and_bad_values_are_clear(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-3\nlearning_rate: 2\n")
    with pytest.raises(ConfigError, match="unknown key.*'learning_rate'.*known keys: model"):
        TrainConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="unknown key 'btach_size'"):
        TrainConfig.from_dict({}, ["btach_size=3"])
    with pytest.raises(ConfigError, match="batch_size: cannot use 'eight' as int"):
        TrainConfig.from_dict({}, ["batch_size=eight"])
    with pytest.raises(ConfigError, match="freeze_vision: cannot use 'maybe' as bool"):
        TrainConfig.from_dict({}, ["freeze_vision=maybe"])
    with pytest.raises(ConfigError, match="mode='adapter': must be one of full, attention, lora"):
        TrainConfig.from_dict({}, ["mode=adapter"])
    with pytest.raises(ConfigError, match="not key=value"):
        TrainConfig.from_dict({}, ["lr"])
    with pytest.raises(ConfigError, match="No config file"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="pad_to_max_len=true needs max_len"):
        TrainConfig.from_dict({"pad_to_max_len": True})


def test_errors_name_the_file_line_or_override_and_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: /m\n\nbatch_size: eight\nmode: lora\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line 3: batch_size: cannot use 'eight' as int"):
        TrainConfig.from_yaml(p)
    # an override replaces the file's value, so the error points at the override
    with pytest.raises(ConfigError, match=r"^override 'batch_size=0': batch_size must be >= 1, got 0$"):
        TrainConfig.from_yaml(p, ["batch_size=0"])
    p.write_text("lr: 1e-3\nbtach_size: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'btach_size' \(line 2; did you mean 'batch_size'\?\); known keys: model"):
        TrainConfig.from_yaml(p)
    p.write_text("lr: 1e-3\nmode: lora\nlr: 2e-3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line 3: lr is already set on line 1"):
        TrainConfig.from_yaml(p)
    p.write_text("max_len: 32\npad_to_max_len: true\nmax_steps: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line 3: max_steps must be >= 1, got 0"):
        TrainConfig.from_yaml(p)
    p.write_text("pad_to_max_len: true\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line 1: pad_to_max_len=true needs max_len"):
        TrainConfig.from_yaml(p)
    # bounds and choices come from the annotations, for direct construction too
    for kw, msg in [(dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\), got 1.0"),
                    (dict(collapse_warn=2), r"collapse_warn must be in \[0, 1\] \(a fraction of the sample\), got 2"),
                    (dict(plateau_patience=-1), r"plateau_patience must be >= 0 \(0 disables the warning\)"),
                    (dict(lr=0), r"lr must be > 0, got 0"), (dict(loss="mse"), r"loss='mse': must be one of big_vision, hf"),
                    (dict(keep_last="two"), r"keep_last: cannot use 'two' as int")]:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**kw)
    # values are converted to the declared types on construction too
    cfg = TrainConfig(lr="2e-4", batch_size=4.0, freeze_vision="yes", max_steps="none", tasks="ocr, count")
    assert (cfg.lr, cfg.batch_size, cfg.freeze_vision, cfg.max_steps, cfg.tasks) == (2e-4, 4, True, None, ["ocr", "count"])
    assert type(cfg.batch_size) is int


def test_yaml_aliases_are_refused_with_their_line(tmp_path):
    """issue 38 T7: a 1.3 KB recipe of nested YAML aliases (billion laughs) in lora_targets grew past 4 GB
    on main and was still running after 90 s; now it is refused at once, naming the line."""
    import time

    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    # 10**7 leaves here (main spent seconds and ~100 MB on the repr in its error; two more levels: gigabytes)
    levels += [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 10) + "]" for p, c in zip("abcdef", "bcdefg")]
    p = tmp_path / "laughs.yaml"
    p.write_text("mode: lora\n" + "\n".join(f"# {ln}" for ln in levels) + "\nlora_targets: &t\n"
                 + "".join(f"  - {ln}\n" for ln in levels) + "val_data: *t\n")
    assert len(p.read_bytes()) < 2000
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"laughs\.yaml line \d+: YAML aliases \(\*a\) are not allowed"):
        TrainConfig.from_yaml(p)
    assert time.perf_counter() - t0 < 1.0


def test_resume_takes_force_and_says_its_forms():
    assert TrainConfig(resume="force").resume == "force"
    assert TrainConfig(resume="false").resume is False
    with pytest.raises(ConfigError, match="resume: cannot use 'forc'; use bool or force"):
        TrainConfig(resume="forc")
