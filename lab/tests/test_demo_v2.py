"""Demo model v2's build and scoring (issue 19): `build(version=2)` writes shapes v2 data (six classes,
free image sizes), a tokenizer that spells every target, a 224 px / patch 28 initial checkpoint with
the from-scratch structured init (smooth <loc> embeddings, 2-D sin-cos patch positions) or warm-started
from the v1 demo model (weights copied, rows by piece, positions resampled); the v2 scorecard's rows,
referring-expression and hand-made-image scores judged box by box (an oracle answering the truth
scores everything, the same oracle with shifted boxes nothing)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lab.demo import evaluate
from lab.demo.build import DEMO2_CONFIG, build
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
    assert (v.image_size, v.patch_size) == (DEMO2_CONFIG.vision.image_size, DEMO2_CONFIG.vision.patch_size) == (224, 28)
    assert pg.processor.size == 224
    emb = pg.model.language_model.embed_tokens.weight[torch.tensor(pg.tokenizer.loc_ids)]  # [1024, D]
    cos = torch.nn.functional.cosine_similarity
    near, far = cos(emb[500], emb[501], dim=0), cos(emb[500], emb[900], dim=0)
    assert near > 0.85 and far < 0.5, (near, far)  # neighbouring bins start alike, distant ones do not
    other = pg.model.language_model.embed_tokens.weight[:100].norm(dim=1).mean()
    assert torch.allclose(emb.norm(dim=1).mean(), other, rtol=0.2)  # at the norm of the random rows
    pos = pg.model.vision_tower.embeddings.position_embedding.weight  # [64, Dv], row-major 8x8 grid
    assert cos(pos[0], pos[1], dim=0) > cos(pos[0], pos[7], dim=0)  # right neighbour vs far right
    assert cos(pos[0], pos[8], dim=0) > cos(pos[0], pos[56], dim=0)  # below vs far below


def test_v2_warm_start_copies_v1_by_name_and_piece(built, tmp_path):
    from palikit.api import PaliGemma
    from lab.demo.build import SPECS, build_initial_checkpoint
    from palikit.assets import DEMO_MODEL_DIR

    root, _ = built
    tok = Tokenizer.from_file(root / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_bytes((root / "tokenizer.json").read_bytes())
    (tmp_path / "vae-oid.npz").write_bytes((root / "vae-oid.npz").read_bytes())
    v2 = PaliGemma.from_pretrained(build_initial_checkpoint(tmp_path, tok, 0, SPECS[2], DEMO_MODEL_DIR), device="cpu",
                                   dtype="float32")
    v1 = PaliGemma.from_pretrained(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    theirs = dict(v1.model.named_parameters())
    name = "language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(dict(v2.model.named_parameters())[name], theirs[name])
    e1, e2 = v1.model.language_model.embed_tokens.weight, v2.model.language_model.embed_tokens.weight
    for piece in (tok.id_to_token(tok.encode("circle")[0]), tok.id_to_token(tok.eos_id)):
        assert torch.equal(e2[tok.token_to_id(piece)], e1[v1.tokenizer.token_to_id(piece)]), piece
    assert v1.tokenizer.token_to_id(tok.id_to_token(tok.encode("hexagon")[0])) is None  # new in v2: random row
    p1 = v1.model.vision_tower.embeddings.position_embedding.weight.reshape(4, 4, -1)
    p2 = v2.model.vision_tower.embeddings.position_embedding.weight.reshape(8, 8, -1)
    cos = torch.nn.functional.cosine_similarity
    assert cos(p2[0, 0], p1[0, 0], dim=0) > cos(p2[0, 0], p1[3, 3], dim=0)  # resampled: corners stay corners
    loc = e2[torch.tensor(tok.loc_ids)]
    assert cos(loc[300], loc[301], dim=0) > 0.85  # smooth <loc> rows, not v1's grid bins


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
