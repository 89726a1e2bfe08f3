"""Issue 20 item 5: no `model:` (or model=demo) trains the bundled demo model; `palikit train --keys`,
`--help` and the README list every recipe key with its default, generated from TrainConfig."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from palikit.cli import main
from palikit.assets import bundled_demo_model
from palikit.train.config import TrainConfig
from helpers.train import write_dataset

ROOT = Path(__file__).resolve().parent.parent


def _default(f) -> str:
    if f.default is None:
        return "none"
    if isinstance(f.default, bool):
        return str(f.default).lower()
    return str(f.default) if f.default != "" else '""'


def test_keys_listing_and_help_come_from_train_config(capsys):
    assert main(["train", "--keys"]) == 0
    listing = capsys.readouterr().out
    lines = {ln.split("=", 1)[0].strip(): ln for ln in listing.splitlines() if "=" in ln and ln.startswith("  ")}
    fields = dataclasses.fields(TrainConfig)
    assert set(lines) == {f.name for f in fields}
    for f in fields:
        assert lines[f.name].strip().startswith(f"{f.name}={_default(f)}"), (f.name, lines[f.name])
    assert "every Linear of the decoder" in lines["lora_targets"] and "reference notebook" in lines["optimizer"]
    assert main(["train", "--help"]) == 0
    help_text = capsys.readouterr().out
    for f in fields:
        assert f"{f.name}=" in help_text, f.name


def test_readme_and_notes_hold_the_generated_table():
    from palikit.train.config import recipe_keys_markdown

    table = recipe_keys_markdown()
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- recipe-keys:start")
    body = readme[readme.index("\n", start) + 1:readme.index("<!-- recipe-keys:end -->")]
    assert body == table, "README is stale: rerun `python -m palikit.train.config` and paste it between the markers"
    assert (ROOT / "notes" / "recipe-keys.md").read_text() == table
    assert all(f"| `{f.name}` |" in table for f in dataclasses.fields(TrainConfig))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model_line", ["", "model: demo\n"])
def test_no_model_or_model_demo_trains_the_bundled_demo_model(tmp_path, capsys, model_line):
    demo = bundled_demo_model()
    assert demo is not None
    write_dataset(tmp_path / "data")
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"{model_line}train_data: {tmp_path / 'data' / 'train.jsonl'}\noutput_dir: {tmp_path / 'run'}\n"
                   "batch_size: 2\nmax_steps: 1\nprogress: false\nplot: false\n")
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"the bundled demo model {demo}" in out
    final = tmp_path / "run" / "final"
    exported, shipped = json.loads((final / "config.json").read_text()), json.loads((demo / "config.json").read_text())
    # palikit's fine-tunes train without PaliGemma 2's final soft-cap (TrainConfig.final_logit_softcap=None),
    # and the export says so; everything else is the demo model's config
    assert exported["text_config"].pop("final_logit_softcapping") is None
    shipped["text_config"].pop("final_logit_softcapping")
    assert exported.pop("palikit")["final_logit_softcap"] is None
    shipped.pop("palikit", None)
    assert exported == shipped | {"torch_dtype": exported["torch_dtype"]}
    assert (final / "tokenizer.json").read_bytes() == (demo / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["model"] == str(demo)


@pytest.mark.usefixtures("one_thread")
def test_key_value_overrides_alone_need_no_yaml(tmp_path, capsys):
    """The README's newcomer loop: `palikit train train_data=... mode=lora ...` with no recipe file
    (it read the first override as the YAML path: "No config file at train_data=...")."""
    write_dataset(tmp_path / "data")
    args = [f"train_data={tmp_path / 'data' / 'train.jsonl'}", f"output_dir={tmp_path / 'run'}", "batch_size=2",
            "max_steps=1", "progress=false", "plot=false", "mode=lora", "lora_targets=all-linear"]
    assert main(["train", *args]) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["model"], saved["mode"], saved["max_steps"]) == (str(bundled_demo_model()), "lora", 1)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["train", str(tmp_path / "missing.yaml"), "lr=1e-3"]) == 2  # a recipe path is still a recipe path
    assert "No config file at" in capsys.readouterr().err
    assert main(["train", "no_such_key=1"]) == 2
    assert "override 'no_such_key=1': unknown key 'no_such_key'" in capsys.readouterr().err
