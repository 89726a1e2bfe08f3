"""Demo model v2's build and scoring (issue 19): `build(version=2)` writes shapes v2 data (six classes,
free image sizes), a tokenizer that spells every target, a 160 px / patch 16 initial checkpoint with
the structured init (smooth <loc> embeddings, 2-D sin-cos patch positions); the v2 scorecard's rows,
referring-expression and hand-made-image scores judged box by box (an oracle answering the truth
scores everything, the same oracle with shifted boxes nothing)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from palikit.demo import evaluate
from palikit.demo.build import DEMO2_CONFIG, build
from palikit.demo.shapes2 import CLASSES
from palikit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo2")
    summary = build(root, n_train=12, n_val=3, n_test=6, codec_images=12, codec_steps=5, progress=False, version=2)
    return root, summary


def test_v2_build_writes_free_size_data_that_the_tokenizer_spells(built):
    root, summary = built
    assert summary["version"] == 2
    tok = Tokenizer.from_file(root / "tokenizer.json")
    rows = [json.loads(x) for x in (root / "data" / "train.jsonl").read_text().splitlines()]
    assert {"caption", "detect", "segment", "ocr", "count", "color", "refer_detect", "refer_segment"} >= {r["task"] for r in rows}
    assert {"refer_detect", "segment", "detect"} <= {r["task"] for r in rows}
    for r in rows:
        assert tok.unk_id not in tok.encode_prompt(r["prefix"], r["suffix"]).ids, r
    coco = json.loads((root / "data" / "train_coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    assert len({(im["width"], im["height"]) for im in coco["images"]}) > 6  # free sizes, not one square


def test_v2_initial_checkpoint_has_the_v2_shape_and_structured_init(built):
    from palikit.api import PaliGemma

    root, _ = built
    pg = PaliGemma.from_pretrained(root / "init", device="cpu", dtype="float32")
    v = pg.model.config.vision
    assert (v.image_size, v.patch_size) == (DEMO2_CONFIG.vision.image_size, DEMO2_CONFIG.vision.patch_size) == (160, 16)
    assert pg.processor.size == 160
    emb = pg.model.language_model.embed_tokens.weight[torch.tensor(pg.tokenizer.loc_ids)]  # [1024, D]
    cos = torch.nn.functional.cosine_similarity
    near, far = cos(emb[500], emb[501], dim=0), cos(emb[500], emb[900], dim=0)
    assert near > 0.85 and far < 0.5, (near, far)  # neighbouring bins start alike, distant ones do not
    other = pg.model.language_model.embed_tokens.weight[:100].norm(dim=1).mean()
    assert torch.allclose(emb.norm(dim=1).mean(), other, rtol=0.2)  # at the norm of the random rows
    pos = pg.model.vision_tower.embeddings.position_embedding.weight  # [100, Dv], row-major 10x10 grid
    assert cos(pos[0], pos[1], dim=0) > cos(pos[0], pos[9], dim=0)  # right neighbour vs far right
    assert cos(pos[0], pos[10], dim=0) > cos(pos[0], pos[90], dim=0)  # below vs far below


def test_v2_targets_and_missed_keys():
    results = {"detect": {"map50": 0.8, "map": 0.3}, "segment": {"miou": 0.7}, "ocr": {"exact_match": 0.95},
               "count": {"accuracy": 0.95}, "color": {"exact_match": 0.95}, "caption": {"exact_match": 0.75},
               "handmade": {"images_ok": 15}}
    assert evaluate.missed_targets(results, 2) == {"detect map": (0.3, 0.4), "handmade": (15, 16)}
    table = evaluate.markdown(results, 2)
    assert "| detect | map | 0.300 | >= 0.4 | **no** |" in table and "| handmade | images_ok | 15 | >= 16 | **no** |" in table
    assert "| refer_detect | accuracy | n/a |  |  |" in table  # reported, no target


class Oracle:
    """Answers each hand-made image with its true boxes (shifted by `shift` pixels), as predict_batch."""

    def __init__(self, truth: dict, shift: float = 0.0):
        self.truth, self.shift = truth, shift

    def predict_batch(self, images, prompts, *, batch_size=16, labels=None, **options):
        out = []
        for image in images:
            objs = self.truth[image.rsplit("/", 1)[-1]]
            dets = [SimpleNamespace(label=o["label"], box=[v + self.shift for v in o["box"]], mask=None) for o in objs]
            out.append(SimpleNamespace(detections=dets, text=""))
        return out


def test_handmade_score_counts_images_with_every_object_found():
    truth = {t["image"]: t["objects"] for t in json.loads((evaluate.HANDMADE / "truth.json").read_text())}
    assert len(truth) == 20
    right = evaluate.handmade_score(Oracle(truth), coco=False)
    assert right["images_ok"] == 20 and right["objects_found"] == right["objects"] == 46
    off = evaluate.handmade_score(Oracle(truth, shift=40.0), coco=False)
    assert off["images_ok"] == 0


def test_refer_score_needs_the_one_box_or_nothing(tmp_path):
    rows = [{"image": "a.png", "prefix": "detect the red circle", "box": [10, 10, 50, 50]},
            {"image": "b.png", "prefix": "detect the blue star", "box": None}]
    path = tmp_path / "refer.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    class Model:
        def predict_batch(self, images, prompts, **kw):
            box = SimpleNamespace(label="the red circle", box=[12, 11, 50, 52], mask=None)
            return [SimpleNamespace(detections=[box] if i == "a.png" else [], text="") for i in images]

    assert evaluate.refer_score(Model(), path)["refer_detect"] == {"accuracy": 1.0, "n": 2}
