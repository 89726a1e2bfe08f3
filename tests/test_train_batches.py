"""Step batches (`palikit.train.batches`): ranks split a step's batch exactly, `data_workers`
processes give the very batches (and so the very losses and weights) the training process makes
itself, a failing example in a worker is one clear error naming the step, and `train_source`
hooks feed the trainer."""

from __future__ import annotations

import pytest
import torch

from palikit.train.batches import StepPlan, batch_indices, step_batches
from palikit.train.config import ConfigError, TrainConfig
from palikit.train.data import Example, load_jsonl
from palikit.train.loading import import_hook
from palikit.train.trainer import Trainer

from helpers.train import SimpleImageProcessor, WordTokenizer, tiny_model, write_dataset
pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_epoch_is_a_permutation_and_ranks_split_each_step_exactly():
    n, bs = 10, 4  # 2 steps per epoch, 2 examples dropped
    epoch0 = batch_indices(0, n, bs, seed=5) + batch_indices(1, n, bs, seed=5)
    assert len(set(epoch0)) == 8 and set(epoch0) <= set(range(n))
    assert batch_indices(2, n, bs, seed=5) != batch_indices(0, n, bs, seed=5)  # a new order per epoch
    data = [Example(f"img{i}", f"p{i}", f"s{i}") for i in range(n)]
    whole = StepPlan(data, bs, micro_batch=2, seed=5).examples(3)
    ranks = [StepPlan(data, bs, micro_batch=1, seed=5, rank=r, world=2).examples(3) for r in range(2)]
    assert [len(m) for m in whole] == [2, 2] and [[len(m) for m in r] for r in ranks] == [[1, 1], [1, 1]]
    flat = [ex for m in whole for ex in m]
    assert sorted(ex.prefix for r in ranks for m in r for ex in m) == sorted(ex.prefix for ex in flat)


class Broken(list):
    """A training set whose example 'bad' cannot be made (like an unreadable generated image)."""

    def __getitem__(self, i):
        ex = super().__getitem__(i)
        if ex.prefix == "bad":
            raise ValueError("example #%d: the generator broke" % i)
        return ex


def _collate(exs):
    return {"n": torch.tensor([len(ex.prefix) for ex in exs])}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_example_is_one_error_naming_the_step(workers):
    data = Broken([Example("x", "fine", "s")] * 3 + [Example("x", "bad", "s")])
    plan = StepPlan(data, batch_size=4, micro_batch=4, seed=0)
    with pytest.raises(ValueError) as err:
        list(step_batches(plan, _collate, 0, 2, workers=workers))
    assert str(err.value) == "step 1: example #3: the generator broke"  # the message, no worker traceback


def _trainer(tmp_path, out, **over):
    ds = load_jsonl(write_dataset(tmp_path / "data"))
    cfg = TrainConfig(output_dir=str(tmp_path / out), batch_size=2, max_steps=6, lr=1e-2, warmup=0, progress=False,
                      plot=False, log_every=100, seed=3, **over)
    return Trainer(cfg, model=tiny_model("pg1"), tokenizer=WordTokenizer(), image_processor=SimpleImageProcessor(28),
                   train_set=ds, log=lambda m: None)


@pytest.mark.slow
def test_data_workers_give_the_same_run(tmp_path):
    """Worker processes prepare the batches: same losses to the bit and the same weights."""
    runs = {}
    for workers in (0, 2):
        tr = _trainer(tmp_path, f"w{workers}", data_workers=workers)
        tr.fit()
        runs[workers] = ([h["loss"] for h in tr.history if "loss" in h], tr.model.state_dict())
    assert len(runs[0][0]) == 6 and runs[0][0] == runs[2][0]
    assert all(torch.equal(runs[0][1][k], runs[2][1][k]) for k in runs[0][1])


def four_examples(cfg):
    """A `train_source` hook for the test below."""
    return [Example(str(cfg.output_dir), f"caption en {c}", f"a {c} square") for c in ("red", "blue", "green", "yellow")]


def test_train_source_hook_feeds_the_trainer(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    from PIL import Image

    img = tmp_path / "one.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(img)
    cfg = TrainConfig(output_dir=str(img), train_source="test_train_batches:four_examples", batch_size=2, max_steps=2)
    tr = Trainer(cfg, model=tiny_model("pg1"), tokenizer=WordTokenizer(), image_processor=SimpleImageProcessor(28),
                 log=lambda m: None)
    assert [ex.suffix for ex in tr.train_set] == ["a red square", "a blue square", "a green square", "a yellow square"]
    assert tr.train_step(0)["loss"] > 0


def test_train_source_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="train_data .* or train_source .*, not both"):
        TrainConfig(train_data="a.jsonl", train_source="m:f")
    with pytest.raises(ValueError, match=r"train_source='nomodule': use 'package.module:function'"):
        import_hook("nomodule", "train_source")
    with pytest.raises(ValueError, match=r"train_source='palikit.train.batches:nothing': cannot import it"):
        import_hook("palikit.train.batches:nothing", "train_source")


def test_max_minutes_ends_the_run_as_a_last_step_and_running_again_continues(tmp_path):
    """The time budget is spent after step 1: that step is evaluated, saved and exported like a last
    one; the same config again resumes there and ends with the losses of an uninterrupted run."""
    from palikit.train import checkpoint as ck

    val = load_jsonl(write_dataset(tmp_path / "val"))
    whole = _trainer(tmp_path, "whole")
    whole.fit()
    lines: list[str] = []
    part = _trainer(tmp_path, "budget", max_minutes=1e-9)
    part.val_set, part.log = val, lines.append
    final = part.fit()
    assert part.step == 1 and (final / "model.safetensors").is_file()
    assert ck.latest_checkpoint(part.out).name.endswith("00000001")
    assert [h["step"] for h in part.history if "val_loss" in h] == [1]
    assert any("time budget (max_minutes=1e-09) spent" in m and "stopped at step 1/6" in m and "5 steps left" in m
               for m in lines), lines
    again = _trainer(tmp_path, "budget")  # no budget now: resumes at step 1 and runs to 6
    again.fit()
    losses = [h["loss"] for h in whole.history if "loss" in h]
    assert again.step == 6 and [h["loss"] for h in again.history if "loss" in h] == losses  # step 1's from the checkpoint
    with pytest.raises(ConfigError, match="max_minutes"):
        TrainConfig(max_minutes=0)
