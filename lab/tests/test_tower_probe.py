"""lab/probes/tower_probe.py (issue 19): the dense per-token class probe of an image tower, and the demo v2
tower pretraining. Its targets pool right, its loss and score agree (a tower that memorises a few
images scores them ~1.0), augmentation turns pixels and targets together, fresh batches never repeat,
a trained tower put into a checkpoint replaces exactly the tower, bad shapes are refused with a
message, and a run ends with the fields the README's tables quote. With --word-weight / --char-weight the word's
box lands in its word's channel and its characters split it, and a tower that memorises a few images
reads their words and characters."""

import argparse

import pytest
import torch
from safetensors.torch import load_file

from lab.demo.paths import CHECKOUT
from lab.probes import tower_probe

pytestmark = pytest.mark.slow  # a research probe: trains image towers (and starts its script)


@pytest.fixture(scope="module")
def probe():
    return tower_probe


def args(**kw):
    base = dict(base=None, init="scratch", image_size=112, patch=14, width=64, layers=2, cache=None, seconds=60.0,
                steps=2, train_images=4, val_images=3, batch=4, lr=1e-3, threads=1, score_every=1, augment=False,
                save=None, fresh=False, fresh_from=0, make_size=None, workers=0, device="cpu", into=None, out=None,
                word_weight=0.0, char_weight=0.0)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("grid", [16, 8])
def test_cell_shares_sum_to_one_on_each_grid(probe, grid):
    _, shares = probe.make_images(3, 777)
    cells = probe.cell_shares(shares, grid)
    assert cells.shape == (3, probe.CHANNELS, grid, grid)
    assert torch.allclose(cells[:, :probe.K].sum(1), torch.ones(3, grid, grid), atol=1e-5)
    # an 8x8 cell is the mean of its 2x2 block of 14 px cells
    if grid == 8:
        block = shares[:, :probe.K, :2, :2].mean((2, 3))
        assert torch.allclose(cells[:, :probe.K, 0, 0], block / block.sum(1, keepdim=True), atol=1e-5)
        assert torch.allclose(cells[:, probe.K:], torch.nn.functional.avg_pool2d(shares[:, probe.K:], 2))  # text shares: not renormalised


def memorise(probe, n: int, outputs: int, **weights) -> tuple[dict, dict]:
    """A small scratch tower and head trained 150 steps on `n` made images; their scores before and after."""
    torch.manual_seed(0)
    pixels, shares = probe.make_images(n, 777)
    config = probe.tower_config(args())
    tower, head = probe.build_tower(None, "scratch", config), torch.nn.Linear(config.hidden_size, outputs)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=3e-3)
    target = probe.cell_shares(shares, 8).flatten(2).transpose(1, 2)  # [n, 64, CHANNELS]
    before = probe.score(tower, head, config, pixels, shares)
    for _ in range(150):
        loss = probe.probe_loss(head(tower(probe.tower_input(pixels, 112))), target, **weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, probe.score(tower, head, config, pixels, shares)


def test_a_tower_that_memorises_its_images_scores_them_near_one(probe):
    before, after = memorise(probe, 16, probe.K)
    assert after["shape_cells"] == sum(map(sum, after["confusion"])) > 20
    assert after["class_accuracy"] >= 0.9 > before["class_accuracy"]
    assert after["fg_bg_accuracy"] >= 0.95


def test_a_grid_the_score_cannot_pool_is_refused(probe):
    with pytest.raises(SystemExit, match="8x8 or 16x16 token grid"):
        probe.run(args(image_size=224, patch=7))


def test_frozen_or_tuned_towers_keep_the_base_shape(probe):
    with pytest.raises(SystemExit, match="--init scratch"):
        probe.build_tower("unused", "tune", probe.tower_config(args()))


def test_a_run_reports_its_curve_and_confusion(probe, tmp_path):
    out = probe.run(args(cache=str(tmp_path / "images.pt")))
    assert (tmp_path / "images.pt").exists()
    assert out["steps"] == 2 and [s for s, _ in out["curve"]] == [0, 1, 2]
    assert out["shape_cells"] == sum(map(sum, out["confusion"])) > 0
    assert out["image_size"] == 112 and out["patch"] == 14 and out["parameters"] > 0
    again = probe.run(args(cache=str(tmp_path / "images.pt")))  # read back from the cache: the same images
    assert again["shape_cells"] == out["shape_cells"]


def test_augmentation_turns_pixels_and_targets_together(probe):
    pixels = torch.zeros(1, 3, 224, 224, dtype=torch.uint8)
    pixels[..., 0:14, 14:28] = 255  # a bright 14 px cell at row 0, column 1
    shares = torch.zeros(1, probe.K, 16, 16)
    shares[0, 0] = 1
    shares[0, :, 0, 1] = torch.tensor([0, 0, 0, 1.0, 0, 0, 0])  # its target: a triangle
    gen, placements = torch.Generator().manual_seed(3), set()
    for _ in range(24):
        px, sh = probe.dihedral(pixels, shares, gen)
        bright = torch.nn.functional.avg_pool2d(px.float(), 14)[0, 0]  # [16, 16]
        where = divmod(int(bright.argmax()), 16)
        assert divmod(int(sh[0, 3].argmax()), 16) == where and sh[0, 3].sum() == 1
        placements.add(where)
    assert len(placements) >= 6  # the 8 flips / quarter turns put the cell in 8 places


def test_fresh_batches_are_new_images_and_differ_between_workers(probe):
    batches = iter(probe.FreshBatches(3))
    first, second = next(batches), next(batches)
    assert first[0].shape == (3, 3, 224, 224) and first[1].shape == (3, probe.CHANNELS, 16, 16)
    assert not torch.equal(first[0], second[0])
    cached, _ = probe.make_images(3, 777)  # the --train-images set
    assert not torch.equal(first[0], cached)
    assert torch.equal(first[0], probe.make_images(3, 779)[0])  # batch b of the stream is samples 3b .. 3b + 2
    assert torch.equal(second[0], probe.make_images(3, 779, 3)[0])
    assert torch.equal(next(iter(probe.FreshBatches(3, first=1)))[0], second[0])  # a continued run starts where one stopped


def test_augment_turns_fresh_batches_too(probe):
    plain = probe.training_batches(args(fresh=True, batch=3), None, None)
    turned = probe.training_batches(args(fresh=True, batch=3, augment=True), None, None)
    pairs = [(next(plain), next(turned)) for _ in range(4)]
    assert all(torch.equal(p[0].flip(3), t[0]) or any(torch.equal(p[0].rot90(k, (2, 3)), t[0]) or
                                                      torch.equal(p[0].rot90(k, (2, 3)).flip(3), t[0]) for k in range(4))
               for p, t in pairs)  # the same images, each batch flipped / turned
    assert any(not torch.equal(p[0], t[0]) for p, t in pairs)


def test_make_size_draws_the_training_images_at_that_side(probe):
    import numpy as np

    from palikit.demo import shapes2

    pixels, shares = probe.make_images(2, 779, 0, 224)  # drawn at 224: nothing resampled
    assert torch.equal(pixels[1], torch.from_numpy(np.asarray(shapes2.make_sample(1, 779, 224).image.convert("RGB")).copy()).permute(2, 0, 1))
    assert not torch.equal(pixels, probe.make_images(2, 779)[0])  # the free sizes are other images
    assert torch.allclose(shares[:, :probe.K].sum(1), torch.ones(2, 16, 16))
    assert torch.equal(next(iter(probe.FreshBatches(2, 224)))[0], pixels)
    out = probe.run(args(fresh=True, make_size=224))
    assert out["make_size"] == 224 and out["images_seen"] == 8


def test_a_fresh_run_trains_without_a_training_set(probe):
    out = probe.run(args(fresh=True))
    assert out["train_images"] == 0 and out["images_seen"] == 8 and out["train_class_accuracy"] is None


def test_put_tower_replaces_the_tower_and_nothing_else(probe, tmp_path):
    from lab.demo.build import DEMO_CONFIG
    from palikit.assets import bundled_demo_model
    from palikit.model.siglip import SiglipVisionTower

    base = bundled_demo_model()
    before = load_file(f"{base}/model.safetensors")
    prefix = next(k for k in before if k.endswith("embeddings.patch_embedding.weight")).split("embeddings.")[0]
    torch.manual_seed(5)
    tower = SiglipVisionTower(DEMO_CONFIG.vision)  # the bundled model's tower shapes, random weights
    n = probe.put_tower(str(base), tower, str(tmp_path / "out"))
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert n == len(tower.state_dict()) > 20 and set(after) == set(before)
    for name, value in before.items():
        if name.startswith(prefix):
            assert torch.equal(after[name], tower.state_dict()[name[len(prefix):]].to(value.dtype)), name
            assert not torch.equal(after[name], value) or value.abs().sum() == 0 or "norm" in name, name
        else:
            assert torch.equal(after[name], value), name
    assert {p.name for p in (tmp_path / "out").iterdir()} == {p.name for p in base.iterdir() if p.is_file()}


def test_put_tower_refuses_a_tower_of_other_widths(probe, tmp_path):
    from palikit.assets import bundled_demo_model
    from palikit.model.siglip import SiglipVisionTower

    from lab.demo.build import DEMO_CONFIG

    wide = SiglipVisionTower(probe.replace(DEMO_CONFIG.vision, hidden_size=64, intermediate_size=256))
    with pytest.raises(SystemExit, match="train a tower of the checkpoint.s widths .its --image-size"):
        probe.put_tower(str(bundled_demo_model()), wide, str(tmp_path / "out"))


def test_images_made_by_workers_are_the_serial_ones(probe):
    pixels, shares = probe.made_in_parallel(7, 777, 2)  # chunks of 250: one chunk, but through a worker
    serial = probe.make_images(7, 777)
    assert torch.equal(pixels, serial[0]) and torch.equal(shares, serial[1])
    chunks = probe.ImageChunks(7, 777, chunk=3)
    assert len(chunks) == 3 and torch.equal(torch.cat([chunks[i][0] for i in range(3)]), serial[0])


def test_the_word_box_fills_its_words_channel_and_its_characters_split_it(probe):
    from palikit.demo import shapes2

    seen = set()
    for i in range(40):
        sample = shapes2.make_sample(i, 777)
        _, shares = probe.make_images(1, 777, i)
        words, chars = shares[0, probe.K:probe.K + probe.W], shares[0, probe.K + probe.W:]  # [21, 16, 16], [34, 16, 16]
        if sample.word is None:
            assert words.sum() == chars.sum() == 0
            continue
        word = probe.WORD_CLASSES.index(sample.word) if sample.word in probe.WORD_CLASSES else probe.W - 1
        seen.add(word == probe.W - 1)
        assert words.sum((1, 2)).argmax() == word and words.sum() == words[word].sum() > 0
        (x0, y0, x1, y1), (w, h) = sample.text_box, sample.image.size
        area = (round(x1 * 224 / w) - round(x0 * 224 / w)) * (round(y1 * 224 / h) - round(y0 * 224 / h))
        assert abs(words[word].sum().item() * 14 * 14 - area) < 1  # the box's pixels, pooled into 14 px cells
        assert abs(chars.sum().item() - words.sum().item()) < 1e-3  # the characters tile the box
        assert {probe.CHAR_CLASSES[c] for c in range(len(probe.CHAR_CLASSES)) if chars[c].sum() > 0} == set(sample.word)
        columns = [int(chars[probe.CHAR_CLASSES.index(c)].sum(0).nonzero().float().mean()) for c in sample.word]
        assert columns == sorted(columns)  # left to right, in the word's order
    assert seen == {True, False}  # both a word and a code among them


def test_a_tower_that_memorises_its_images_reads_their_words_and_characters(probe):
    before, after = memorise(probe, 24, probe.CHANNELS, word_weight=1.0, char_weight=1.0)
    assert after["word_images"] == before["word_images"] >= 8 and after["char_cells"] >= 10
    assert after["word_accuracy"] >= 0.9 > before["word_accuracy"]
    assert after["char_accuracy"] >= 0.8 > before["char_accuracy"]
    assert after["class_accuracy"] >= 0.9


def test_a_reading_run_reports_its_accuracies_and_refuses_an_older_cache(probe, tmp_path):
    out = probe.run(args(word_weight=1.0, char_weight=0.5, val_images=12))
    assert out["word_weight"] == 1.0 and out["char_weight"] == 0.5
    assert out["word_images"] > 0 and 0 <= out["word_accuracy"] <= 1 and 0 <= out["char_accuracy"] <= 1
    assert all(len(point) == 4 for point in out["curve"])  # (step, class, word, character accuracy)
    old = tmp_path / "old.pt"
    pixels, shares = probe.make_images(2, 777)
    torch.save(((pixels, shares[:, :probe.K]), (pixels, shares[:, :probe.K])), old)  # a cache made before the text channels
    with pytest.raises(SystemExit, match="before the word and character channels"):
        probe.run(args(cache=str(old)))


def test_augment_with_words_is_refused_before_any_work():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lab.probes.tower_probe", "--char-weight", "1", "--augment"],
                          capture_output=True, text=True, timeout=120, cwd=CHECKOUT)
    assert done.returncode == 2 and "leave it off with --word-weight" in done.stderr
