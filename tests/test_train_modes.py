"""Training modes: attention-only trains exactly the decoder's q/k/v/o (169,869,312 parameters on
PaliGemma 1 3B 224), LoRA trains only adapters and merges/exports to a checkpoint palikit and
transformers load, freeze switches keep their part bit-identical."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from palikit.config import PRESETS
from palikit.model import build_model
from palikit.train.modes import load_lora_adapter
from palikit.train.config import TrainConfig
from palikit.train.data import load_jsonl
from palikit.train.modes import apply_mode, count_trainable
from palikit.train.trainer import Trainer
from helpers.train import SimpleImageProcessor, WordTokenizer, tiny_model, write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_attention_only_count_pg1_3b_224():
    model = build_model(PRESETS["pg1-3b-224"])  # meta device
    names = apply_mode(model, "attention")
    assert count_trainable(model) == 169_869_312
    assert len(names) == 18 * 4
    assert all(".self_attn." in n and n.startswith("language_model.layers.") for n in names)
    assert apply_mode(model, "full", freeze_vision=True) and not any(
        p.requires_grad for n, p in model.named_parameters() if n.startswith(("vision_tower", "multi_modal")))


def _trainer(tmp_path, model, **over):
    ds = load_jsonl(write_dataset(tmp_path / "data"))
    kw = dict(output_dir=str(tmp_path / "out"), batch_size=2, max_steps=3, lr=1e-2, warmup=0, progress=False,
              plot=False, log_every=100)
    cfg = TrainConfig(**{**kw, **over})
    return Trainer(cfg, model=model, tokenizer=WordTokenizer(), image_processor=SimpleImageProcessor(28),
                   train_set=ds, log=lambda m: None)


def _changed(before, model):
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("mode,over,expect", [
    ("attention", {}, lambda n: ".self_attn." in n and n.startswith("language_model.")),
    ("full", {"freeze_vision": True}, lambda n: n.startswith("language_model.")),
    ("full", {"freeze_decoder": True}, lambda n: n.startswith(("vision_tower.", "multi_modal_projector."))),
])
def test_only_trainable_parts_change(tmp_path, mode, over, expect):
    model = tiny_model("pg1")
    before = copy.deepcopy(model.state_dict())
    tr = _trainer(tmp_path, model, mode=mode, **over)
    if mode == "attention":
        assert isinstance(tr.optimizer, torch.optim.SGD)  # the colab's plain SGD
    for s in range(3):
        tr.train_step(s)
    changed = _changed(before, model)
    expected = {k for k in before if expect(k)}
    assert changed == expected  # every trainable tensor moved, every frozen one is bit-identical


def test_lora_trains_adapters_merges_and_exports(tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    from palikit.weights.hf import load_hf_checkpoint

    model = tiny_model("pg2")
    base = copy.deepcopy(model.state_dict())
    tr = _trainer(tmp_path, model, mode="lora", lora_rank=4, lora_targets=r".*self_attn\.(q_proj|v_proj)|.*mlp\.down_proj")
    assert all(".lora_" in n for n in tr.trainable)
    assert any("mlp.down_proj.lora_A" in n for n in tr.trainable)
    for s in range(3):
        tr.train_step(s)
    sd = model.state_dict()
    for k, v in base.items():  # base weights untouched (peft renames them to ...base_layer.weight)
        mod, _, leaf = k.rpartition(".")
        k2 = k if k in sd else f"{mod}.base_layer.{leaf}"
        assert torch.equal(sd[k2], v), k
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 20, (2, 9), generator=g)
    ids[:, :4] = model.config.image_token_index
    pv = torch.rand(2, 3, 28, 28, generator=g) * 2 - 1
    model.eval()
    with torch.no_grad():
        ref = model(ids, pv)
    final = tr.export()  # saves the adapter, merges, writes the Hub layout atomically
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()  # PEFT format
    assert not any("lora" in k for k in model.state_dict())
    again = load_hf_checkpoint(final)
    with torch.no_grad():
        assert (again(ids, pv) - ref).abs().max() < 1e-4
        hf = PaliGemmaForConditionalGeneration.from_pretrained(final, attn_implementation="eager").eval()
        out = hf(input_ids=ids, pixel_values=pv, token_type_ids=torch.zeros_like(ids), position_ids=torch.arange(1, 10)[None].expand(2, -1)).logits
        assert (out[..., : ref.shape[-1]] - ref).abs().max() < 1e-4
    # the adapter alone, re-injected into the untouched base model, gives the same outputs
    fresh = tiny_model("pg2")
    load_lora_adapter(fresh, tmp_path / "out" / "adapter")
    with torch.no_grad():
        assert (fresh.eval()(ids, pv) - ref).abs().max() < 1e-5


def test_lora_without_match_is_an_error():
    with pytest.raises(ValueError, match="matched no module"):
        apply_mode(tiny_model("pg1"), "lora", lora_targets=r"nothing\.here")


def test_fit_with_progress_bar_metric_hook_bf16_and_plot(tmp_path):
    """The loop's other switches: rich progress bar, a metric hook picking the best checkpoint
    (max mode), bf16 autocast (on CPU here; CUDA in real runs), the PIL/matplotlib loss curve."""
    calls = []

    def metric(model, examples, trainer):
        calls.append(trainer.step)
        return {"score": float(trainer.step % 3)}  # best at step 2

    model = tiny_model("pg1")
    tr = _trainer(tmp_path, model, max_steps=4, eval_every=1, progress=True, plot=True, precision="bf16",
                  best_metric="score", best_mode="max", keep_last=1)
    tr.val_set = tr.train_set[:2]
    tr.metric_fn = metric
    final = tr.fit()
    out = tmp_path / "out"
    assert calls == [1, 2, 3, 4]
    assert tr.best == {"step": 2, "metric": "score", "value": 2.0}
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004"]  # best kept beside the last
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert all(math.isfinite(h["loss"]) for h in tr.history if "loss" in h)
    assert (final / "model.safetensors").exists()


@pytest.mark.parametrize("matplotlib", [True, False])
def test_loss_curve_png_with_and_without_matplotlib(tmp_path, monkeypatch, matplotlib):
    import sys

    from PIL import Image

    from palikit.train.plot import loss_curve_png

    if matplotlib:
        import matplotlib  # noqa: F401 - a test dependency
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    train = [(s, 3.0 / s) for s in range(1, 30)]
    path = loss_curve_png(train, [(10, 0.5), (20, 0.3)], tmp_path / "c.png", title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 300
