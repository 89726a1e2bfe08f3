"""Does an image tower tell the shapes v2 classes apart? (issue 19: the demo v2 model names the right
colours on 93 % of test images but the right shape classes on 1.5 %.)

The tower alone, no decoder: every image token predicts which class covers it. Targets come from the
generator's masks (`palikit.demo.shapes2`, images squashed to 224 px as the preprocessing does): a
fg / bg term on each token, plus a class cross-entropy on tokens a shape covers >= 20 % of (class
shares renormalised). Scored on held-out images, always on the 8x8 grid of 28 px cells (a 14 px tower's
probabilities are averaged over 2x2): class accuracy among the 6 on the cells a shape dominates (the
rows of `confusion` are the true class, in `shapes2.CLASSES` order), and fg / bg accuracy.

    python scripts/tower_probe.py --base work/v2cont/run/final --init tune --patch 28 --seconds 300

--init: frozen (a linear head on the base tower), tune (the base tower trained with the head), scratch
(a random tower). A 14 px tower from a 28 px base starts FlexiViT-style: the patch kernel average-pooled
2x2 and scaled by 4 (a flat patch embeds the same), the position table resampled bicubically to 16x16.
One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from palikit.config import VisionConfig
from palikit.demo import shapes2
from palikit.model.siglip import SiglipVisionTower

SIZE, CELL = 224, 28
CLASSES = shapes2.CLASSES
BASE_TOWER = VisionConfig(image_size=SIZE, patch_size=28, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=4)  # the v2 demo model's (palikit.demo.build.DEMO2_CONFIG)


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels [n, 3, 224, 224] and each class's (plus background, first) share of every 14 px
    cell [n, 7, 16, 16]."""
    pixels, shares = [], []
    for i in range(n):
        s = shapes2.make_sample(i, seed)
        img = s.image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
        pixels.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        cover = np.zeros((len(CLASSES) + 1, SIZE, SIZE), np.float32)
        for shape in s.shapes:
            m = Image.fromarray(shape.mask.astype(np.uint8) * 255).resize((SIZE, SIZE), Image.BILINEAR)
            cover[1 + CLASSES.index(shape.cls)] += np.asarray(m, np.float32) / 255
        cover[1:] = np.clip(cover[1:], 0, 1)
        cover[0] = np.clip(1 - cover[1:].sum(0), 0, 1)
        shares.append(F.avg_pool2d(torch.from_numpy(cover)[None], 14)[0])
    return torch.stack(pixels), torch.stack(shares)


def cell_shares(shares14: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 7, g, g] shares on the tower's grid, summing to 1 per cell."""
    t = shares14 if patch == 14 else F.avg_pool2d(shares14, patch // 14)
    return t / t.sum(1, keepdim=True).clamp_min(1e-6)


def build_tower(base: str | None, init: str, patch: int) -> SiglipVisionTower:
    tower = SiglipVisionTower(replace(BASE_TOWER, patch_size=patch))
    if init == "scratch":
        return tower
    from safetensors.torch import load_file

    sd = load_file(f"{base}/model.safetensors")
    prefix = next(k for k in sd if k.endswith("embeddings.patch_embedding.weight")).split("embeddings.")[0]
    own = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    kernel, pos = own["embeddings.patch_embedding.weight"], own["embeddings.position_embedding.weight"]
    if kernel.shape[-1] != patch:
        own["embeddings.patch_embedding.weight"] = F.avg_pool2d(kernel, kernel.shape[-1] // patch) * (kernel.shape[-1] // patch) ** 2
        g0, g1 = int(pos.shape[0] ** 0.5), SIZE // patch
        grid = pos.T.reshape(1, -1, g0, g0)  # [1, D, g0, g0]
        own["embeddings.position_embedding.weight"] = F.interpolate(grid, size=(g1, g1), mode="bicubic",
                                                                    align_corners=False).reshape(-1, g1 * g1).T
    tower.load_state_dict(own)
    return tower


def probe_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits, target [B, N, 7] (target: shares, background first)."""
    fg = 1 - target[..., 0]
    loss = F.binary_cross_entropy_with_logits(torch.logsumexp(logits[..., 1:], -1) - logits[..., 0], fg)
    m = fg >= 0.2
    if m.any():
        tc = target[..., 1:][m] / fg[m, None]
        loss = loss - (tc * logits[..., 1:][m].log_softmax(-1)).sum(-1).mean()
    return loss


@torch.no_grad()
def score(tower, head, patch: int, pixels: torch.Tensor, shares14: torch.Tensor) -> dict:
    tower.eval()
    k = len(CLASSES)
    confusion, fg_ok, cells = torch.zeros(k, k, dtype=torch.long), 0, 0
    for i in range(0, len(pixels), 64):
        x, g = pixels[i:i + 64].float() / 127.5 - 1, SIZE // patch
        p = head(tower(x)).softmax(-1).transpose(1, 2).reshape(len(x), k + 1, g, g)  # [B, 7, g, g]
        if patch != CELL:
            p = F.avg_pool2d(p, CELL // patch)
        truth = cell_shares(shares14[i:i + 64], CELL).argmax(1)  # [B, 8, 8]; 0 = background
        shape = truth > 0
        fg_ok += ((p.argmax(1) > 0) == shape).sum().item()
        cells += shape.numel()
        pred = p[:, 1:].argmax(1)
        confusion += torch.bincount((truth[shape] - 1) * k + pred[shape], minlength=k * k).reshape(k, k)
    tower.train()
    return {"class_accuracy": round(confusion.diag().sum().item() / max(confusion.sum().item(), 1), 3),
            "fg_bg_accuracy": round(fg_ok / cells, 3), "shape_cells": confusion.sum().item(),
            "confusion": confusion.tolist()}


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train_px, train_sh = make_images(args.train_images, 777)
    val_px, val_sh = make_images(args.val_images, 778)
    made_s = time.perf_counter() - t0
    tower, head = build_tower(args.base, args.init, args.patch), torch.nn.Linear(BASE_TOWER.hidden_size, len(CLASSES) + 1)
    tower.requires_grad_(args.init != "frozen")
    opt = torch.optim.AdamW([p for p in (*tower.parameters(), *head.parameters()) if p.requires_grad], lr=args.lr)
    curve, step, gen = [(0, score(tower, head, args.patch, val_px, val_sh)["class_accuracy"])], 0, torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds and (not args.steps or step < args.steps):
        idx = torch.randint(0, len(train_px), (args.batch,), generator=gen)
        target = cell_shares(train_sh[idx], args.patch).flatten(2).transpose(1, 2)  # [B, N, 7]
        loss = probe_loss(head(tower(train_px[idx].float() / 127.5 - 1)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % args.score_every == 0:
            curve.append((step, score(tower, head, args.patch, val_px, val_sh)["class_accuracy"]))
    train_s = time.perf_counter() - t0
    final = score(tower, head, args.patch, val_px, val_sh)
    return {"init": args.init, "patch": args.patch, "base": args.base, "threads": args.threads, "steps": step,
            "batch": args.batch, "lr": args.lr, "images_made_s": round(made_s, 1), "s_per_step": round(train_s / max(step, 1), 3),
            "train_images": args.train_images, "val_images": args.val_images, "curve": curve, **final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="work/v2cont/run/final", help="a v2 demo checkpoint (Hub layout)")
    ap.add_argument("--init", choices=("frozen", "tune", "scratch"), default="tune")
    ap.add_argument("--patch", type=int, choices=(14, 28), default=28)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps too (0: time only)")
    ap.add_argument("--train-images", type=int, default=3000)
    ap.add_argument("--val-images", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score-every", type=int, default=500)
    print(json.dumps(run(ap.parse_args())))


if __name__ == "__main__":
    main()
