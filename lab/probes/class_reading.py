"""Where does the demo v2 model lose the shape class? (issue 19) Two measures, one JSON line each.

    python -m lab.probes.class_reading tower work/v2pt/run/final --cache work/probe/vprobe_data9k.pt
    python -m lab.probes.class_reading decoder work/v2pt/run/final --data work/demo2/data/validation.jsonl

tower CHECKPOINT: how well the image tower's tokens name the class of each shape. For every image and
class present (at least half a token of it), the tower's output tokens averaged with that class's
share of each token as weight; a logistic regression over the 6 classes (L-BFGS, standardised
features) fit on the first --fit images of tower_probe's training set and scored on its held-out
images (`lab/probes/tower_probe.py` makes them, or --cache holds them).

decoder MODEL: how well the whole model names them. On the --rows first caption rows of --data,
teacher-forced, at each position whose target is a class word (singular or plural), the likeliest of
the six classes: with the right image, and with the batch's images rolled by one ("rolled": what the
caption's class order and colours alone give). --trainable adds a training checkpoint's
trainable.safetensors (a run with a frozen tower saves only the rest).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from palikit.demo import shapes2

sys.path.insert(0, str(Path(__file__).parent))  # its neighbour, also when this file is loaded by path
import tower_probe as probe  # noqa: E402  (the images, the tower and its input)

K = len(shapes2.CLASSES)


@torch.no_grad()
def pooled_features(tower, pixels: torch.Tensor, shares14: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X [P, D] share-weighted mean tokens of each (image, class present), Y [P] the class index."""
    xs, ys = [], []
    for i in range(0, len(pixels), 64):
        tokens = tower(probe.tower_input(pixels[i:i + 64], probe.SIZE))  # [B, 64, D]
        weights = probe.cell_shares(shares14[i:i + 64], 8).flatten(2)[:, 1:probe.K]  # [B, 6, 64], background dropped
        mass = weights.sum(-1)  # [B, 6]: tokens' worth of each class
        pooled = weights @ tokens / mass.clamp_min(1e-6)[..., None]  # [B, 6, D]
        keep = mass >= 0.5
        xs.append(pooled[keep])
        ys.append(keep.nonzero()[:, 1])
    return torch.cat(xs), torch.cat(ys)


def fit_and_score(x_fit, y_fit, x_val, y_val) -> dict:
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-5
    x_fit, x_val = (x_fit - mean) / std, (x_val - mean) / std
    torch.manual_seed(0)  # the head's start: the same figure on every call
    head = torch.nn.Linear(x_fit.shape[1], K)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=500)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x_fit), y_fit) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        fit_acc = (head(x_fit).argmax(-1) == y_fit).float().mean().item()
        val_acc = (head(x_val).argmax(-1) == y_val).float().mean().item()
    return {"fit_pairs": len(y_fit), "val_pairs": len(y_val), "fit_accuracy": round(fit_acc, 3),
            "val_accuracy": round(val_acc, 3), "majority": round(torch.bincount(y_val).max().item() / len(y_val), 3)}


def tower_reading(args) -> dict:
    made = argparse.Namespace(cache=args.cache, fresh=False, train_images=args.fit, val_images=args.val_images,
                              workers=args.workers, make_size=None)
    (fit_px, fit_sh), (val_px, val_sh) = probe.probe_images(made)
    tower = probe.build_tower(args.checkpoint, "tune", probe.BASE_TOWER).eval()
    x_fit, y_fit = pooled_features(tower, fit_px[:args.fit], fit_sh[:args.fit])
    return {"measure": "tower", "checkpoint": args.checkpoint, **fit_and_score(x_fit, y_fit, *pooled_features(tower, val_px, val_sh))}


def class_word_ids(tokenizer) -> torch.Tensor:
    """[12]: the six classes' word pieces, then their plurals' (each one piece in the v2 tokenizer)."""
    words = [*shapes2.CLASSES, *(shapes2.PLURALS2[c] for c in shapes2.CLASSES)]
    pieces = [tokenizer.encode(" " + w) for w in words]
    if any(len(p) != 1 for p in pieces):
        raise SystemExit(f"{words} are not one piece each in this tokenizer: not a demo v2 model")
    return torch.tensor([p[0] for p in pieces])


@torch.no_grad()
def class_word_accuracy(model, collate, examples, ids: torch.Tensor) -> tuple[float, float, int]:
    """(accuracy with the right images, with the batch's images rolled by one, class words scored);
    each batch collated once for both."""
    right, total = [0, 0], 0
    for i in range(0, len(examples), 16):
        batch = collate(examples[i:i + 16])
        target = batch["input_ids"][:, 1:]  # hidden[:, t] predicts token t + 1
        scored = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).bool() & torch.isin(target, ids)
        rows, cols = scored.nonzero(as_tuple=True)
        truth = (target[rows, cols][:, None] == ids).float().argmax(-1) % K
        for roll in (0, 1):
            hidden = model(batch["input_ids"], batch["pixel_values"].roll(roll, 0), attention_mask=batch["attention_mask"],
                           ar_mask=batch["ar_mask"], return_hidden=True)
            logits = model.logits(hidden[rows, cols]).float()[:, ids]  # [W, 12]
            guess = logits[:, :K].maximum(logits[:, K:]).argmax(-1)  # a class, singular or plural
            right[roll] += (guess == truth).sum().item()
        total += len(truth)
    return right[0] / max(total, 1), right[1] / max(total, 1), total


def decoder_reading(args) -> dict:
    from palikit.tokenizer import Tokenizer
    from palikit.train.collate import Collator, default_image_processor
    from palikit.train.data import load_examples
    from palikit.train.loading import load_model

    model = load_model(args.checkpoint, final_logit_softcap=30).eval()
    if args.trainable:
        from safetensors.torch import load_file

        _, unexpected = model.load_state_dict(load_file(f"{args.trainable}/trainable.safetensors"), strict=False)
        if unexpected:
            raise SystemExit(f"--trainable {args.trainable}: keys this model lacks, e.g. {unexpected[:3]}")
    tokenizer = Tokenizer.from_file(f"{args.checkpoint}/tokenizer.json")
    rows = [e for e in load_examples(args.data).examples if e.task == "caption"][:args.rows]
    if not rows:
        raise SystemExit(f"--data {args.data}: no caption rows")
    collate, ids = Collator(tokenizer, default_image_processor(model.config, args.checkpoint), model.config), class_word_ids(tokenizer)
    image, rolled, words = class_word_accuracy(model, collate, rows, ids)
    return {"measure": "decoder", "checkpoint": args.checkpoint, "trainable": args.trainable, "captions": len(rows),
            "class_words": words, "right_image": round(image, 3), "rolled_image": round(rolled, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("measure", choices=("tower", "decoder"))
    ap.add_argument("checkpoint", help="a v2 demo model (Hub layout)")
    ap.add_argument("--cache", help="tower: tower_probe's image file (made and written when absent)")
    ap.add_argument("--fit", type=int, default=3000, help="tower: training images to fit the probe on")
    ap.add_argument("--val-images", type=int, default=300)
    ap.add_argument("--workers", type=int, default=0, help="tower: processes making the images")
    ap.add_argument("--data", default="work/demo2/data/validation.jsonl", help="decoder: rows with caption rows")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--trainable", help="decoder: a training checkpoint folder to load on top")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(tower_reading(args) if args.measure == "tower" else decoder_reading(args)))


if __name__ == "__main__":
    main()
