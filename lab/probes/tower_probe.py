"""Does an image tower tell the shapes v2 classes apart? (issue 19: the demo v2 model names the right
colours on 93 % of test images but the right shape classes on 1.5 %.)

The tower alone, no decoder: every image token predicts which class covers it. Targets come from the
generator's masks (`palikit.demo.shapes2`, images squashed to 224 px as the preprocessing does): a
fg / bg term on each token, plus a class cross-entropy on tokens a shape covers >= 20 % of (class
shares renormalised). Scored on held-out images, always on the 8x8 grid of 28 px cells (a 14 px tower's
probabilities are averaged over 2x2): class accuracy among the 6 on the cells a shape dominates (the
rows of `confusion` are the true class, in `shapes2.CLASSES` order), and fg / bg accuracy. With
--word-weight w > 0 the tower also learns to read: every token the image's word covers >= 20 % of
predicts which word it is (one of the 20 words, or "a code" for the 3-4 character codes; `WORD_CLASSES`),
a cross-entropy weighted w; scored per held-out image that holds a word (`word_accuracy`: the mean
probabilities of its text cells, argmax). With --char-weight c > 0 each text token also names the
character under it (the word's box split evenly among its characters: `CHAR_CLASSES`, a soft
cross-entropy weighted c), the part a code needs; scored on the cells one character dominates
(`char_accuracy`).

    python -m lab.probes.tower_probe --base work/demo2/init --init tune --patch 28 --seconds 300
    python -m lab.probes.tower_probe --base work/demo2/run/final --init tune --word-weight 1 --char-weight 1 \
        --fresh --make-size 224 --workers 1 --threads 1 --seconds 1500   # can it learn to read?

--init: frozen (a linear head on the base tower), tune (the base tower trained with the head), scratch
(a random tower; any --image-size / --patch / --width / --layers whose grid is 8x8 or 16x16). A 14 px
tower from a 28 px base starts FlexiViT-style: the patch kernel average-pooled 2x2 and scaled by 4 (a
flat patch embeds the same), the position table resampled bicubically to 16x16.

Training images: --train-images made once (by --workers processes; --cache keeps them in a file) and
drawn at random, --augment giving each batch a random flip / quarter turn; or with --fresh a new image
for every example, made by the --workers while the tower trains (making an image costs ~18 ms on one
core at the generator's free sides, ~7 ms drawn at --make-size 224; held-out images always keep the free
sizes, so the score says whether a tower trained on square images carries over).
--into CHECKPOINT --out DIR writes that Hub-layout checkpoint with its vision tower replaced by the
trained one (a 28 px / 224 px tower of the checkpoint's widths): the demo v2 model's tower
pretraining. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
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
WORD_CLASSES = tuple(w.upper() for w in shapes2.WORDS) + ("<code>",)  # what a text token names
CHAR_CLASSES = tuple(sorted(set(shapes2.CODE_CHARS) | set("".join(shapes2.WORDS).upper())))
K, W = len(CLASSES) + 1, len(WORD_CLASSES)  # shape channels (background first), then word channels
CHANNELS = K + W + len(CHAR_CLASSES)  # ... then character channels
BASE_TOWER = VisionConfig(image_size=SIZE, patch_size=28, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=4)  # the v2 demo model's (lab.demo.build.DEMO2_CONFIG)


def make_images(n: int, seed: int, start: int = 0, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels [n, 3, 224, 224] and the shares of every 14 px cell [n, CHANNELS, 16, 16] of the samples
    start .. start + n - 1, drawn at `size` x `size` (None: the generator's free sides and aspect ratios,
    squashed to 224 as the preprocessing does): each class's (plus background, first) share, the word's
    box in the channel of its `WORD_CLASSES` entry, then each character's part of that box (split
    evenly along x) in its `CHAR_CLASSES` channel."""
    if n == 0:
        return torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8), torch.zeros(0, CHANNELS, 16, 16)
    pixels, shares = [], []
    for i in range(start, start + n):
        s = shapes2.make_sample(i, seed, size)
        img = s.image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
        pixels.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        cover = np.zeros((CHANNELS, SIZE, SIZE), np.float32)
        for shape in s.shapes:
            m = Image.fromarray(shape.mask.astype(np.uint8) * 255).resize((SIZE, SIZE), Image.BILINEAR)
            cover[1 + CLASSES.index(shape.cls)] += np.asarray(m, np.float32) / 255
        cover[1:K] = np.clip(cover[1:K], 0, 1)
        cover[0] = np.clip(1 - cover[1:K].sum(0), 0, 1)
        if s.word:
            (x0, y0, x1, y1), (w, h) = s.text_box, s.image.size
            word = WORD_CLASSES.index(s.word) if s.word in WORD_CLASSES else W - 1
            rows, left, right = slice(round(y0 * SIZE / h), round(y1 * SIZE / h)), x0 * SIZE / w, x1 * SIZE / w
            cover[K + word, rows, round(left):round(right)] = 1
            step = (right - left) / len(s.word)
            for j, char in enumerate(s.word):
                cover[K + W + CHAR_CLASSES.index(char), rows, round(left + j * step):round(left + (j + 1) * step)] = 1
        shares.append(F.avg_pool2d(torch.from_numpy(cover)[None], 14)[0])
    return torch.stack(pixels), torch.stack(shares)


class FreshBatches(torch.utils.data.IterableDataset):
    """Endless batches of never-seen images (seed 779), from batch `first` on (a run that continues an
    earlier one's tower starts where it stopped); worker w of W makes batches first + w, first + w + W, ..."""

    def __init__(self, batch: int, size: int | None = None, first: int = 0):
        self.batch, self.size, self.first = batch, size, first

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for b in itertools.count(self.first + worker, workers):
            yield make_images(self.batch, 779, b * self.batch, self.size)


class ImageChunks(torch.utils.data.Dataset):
    """`make_images` in chunks, so --workers processes make a training set together."""

    def __init__(self, n: int, seed: int, chunk: int = 250, size: int | None = None):
        self.n, self.seed, self.chunk, self.size = n, seed, chunk, size

    def __len__(self):
        return -(-self.n // self.chunk)

    def __getitem__(self, i):
        return make_images(min(self.chunk, self.n - i * self.chunk), self.seed, i * self.chunk, self.size)


def made_in_parallel(n: int, seed: int, workers: int, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same images as make_images(n, seed, size=size), made by `workers` processes (0: this one)."""
    if n == 0 or workers == 0:
        return make_images(n, seed, size=size)
    chunks = list(torch.utils.data.DataLoader(ImageChunks(n, seed, size=size), batch_size=None, num_workers=workers))
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


def cached_batches(pixels: torch.Tensor, shares: torch.Tensor, batch: int, augment: bool):
    """Endless random batches of a made image set (a random flip / quarter turn each with augment)."""
    gen = torch.Generator().manual_seed(1)
    while True:
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        yield dihedral(pixels[idx], shares[idx], gen) if augment else (pixels[idx], shares[idx])


def cell_shares(shares14: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, CHANNELS, grid, grid] shares on a tower's token grid (16 or 8 cells a side): the shape channels
    sum to 1 per cell, a word or character channel is the share of the cell its box covers."""
    t = shares14 if grid == 16 else F.avg_pool2d(shares14, 16 // grid)
    return torch.cat([t[:, :K] / t[:, :K].sum(1, keepdim=True).clamp_min(1e-6), t[:, K:]], 1)


def tower_config(args) -> VisionConfig:
    """The probed tower: the v2 demo model's, at --image-size / --patch / --width / --layers."""
    return replace(BASE_TOWER, image_size=args.image_size, patch_size=args.patch, hidden_size=args.width,
                   intermediate_size=4 * args.width, num_hidden_layers=args.layers)


def tower_prefix(weights: dict) -> str:
    """The key prefix of a Hub-layout checkpoint's vision tower (e.g. "vision_tower.vision_model.")."""
    return next(k for k in weights if k.endswith("embeddings.patch_embedding.weight")).split("embeddings.")[0]


def build_tower(base: str | None, init: str, config: VisionConfig) -> SiglipVisionTower:
    tower, patch = SiglipVisionTower(config), config.patch_size
    if init == "scratch":
        return tower
    if (config.image_size, config.hidden_size, config.num_hidden_layers) != (SIZE, BASE_TOWER.hidden_size,
                                                                             BASE_TOWER.num_hidden_layers):
        raise SystemExit("--init frozen / tune start from the base's tower: keep --image-size 224 and its "
                         "width and depth, or use --init scratch")
    from safetensors.torch import load_file

    sd = load_file(f"{base}/model.safetensors")
    prefix = tower_prefix(sd)
    own = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    kernel, pos = own["embeddings.patch_embedding.weight"], own["embeddings.position_embedding.weight"]
    if kernel.shape[-1] != patch:
        own["embeddings.patch_embedding.weight"] = F.avg_pool2d(kernel, kernel.shape[-1] // patch) * (kernel.shape[-1] // patch) ** 2
        g0, g1 = int(pos.shape[0] ** 0.5), config.image_size // patch
        grid = pos.T.reshape(1, -1, g0, g0)  # [1, D, g0, g0]
        own["embeddings.position_embedding.weight"] = F.interpolate(grid, size=(g1, g1), mode="bicubic",
                                                                    align_corners=False).reshape(-1, g1 * g1).T
    tower.load_state_dict(own)
    return tower


def probe_images(args):
    """((train pixels, shares), (val pixels, shares)): made, or read from --cache (written when absent)."""
    from pathlib import Path

    if args.cache and Path(args.cache).exists():
        made = torch.load(args.cache)
        if made[1][1].shape[1] != CHANNELS:
            raise SystemExit(f"--cache {args.cache} was made before the word and character channels: give a new "
                             "--cache file")
        return made
    made = (made_in_parallel(0 if args.fresh else args.train_images, 777, args.workers, args.make_size),
            made_in_parallel(args.val_images, 778, args.workers))
    if args.cache:
        torch.save(made, args.cache)
    return made


def dihedral(pixels: torch.Tensor, shares: torch.Tensor, gen: torch.Generator):
    """The same random flip / quarter turn of a batch's pixels [B, 3, H, W] and shares [B, 7, g, g]: every
    shapes v2 class keeps its name under them (squares and crosses tilt <= 15 degrees either way)."""
    k, flip = int(torch.randint(0, 4, (1,), generator=gen)), bool(torch.randint(0, 2, (1,), generator=gen))
    pixels, shares = pixels.rot90(k, (2, 3)), shares.rot90(k, (2, 3))
    return (pixels.flip(3), shares.flip(3)) if flip else (pixels, shares)


def probe_loss(logits: torch.Tensor, target: torch.Tensor, word_weight: float = 0.0,
               char_weight: float = 0.0) -> torch.Tensor:
    """logits [B, N, 7 (+ words and characters when reading)], target [B, N, CHANNELS] (`cell_shares`)."""
    loss = shape_loss(logits[..., :K], target[..., :K])
    words, chars = target[..., K:K + W], target[..., K + W:]  # [B, N, 21], [B, N, 34]
    m = words.sum(-1) >= 0.2
    if word_weight and m.any():
        loss = loss + word_weight * F.cross_entropy(logits[..., K:K + W][m], words[m].argmax(-1))
    m = chars.sum(-1) >= 0.2
    if char_weight and m.any():
        share = chars[m] / chars[m].sum(-1, keepdim=True)
        loss = loss - char_weight * (share * logits[..., K + W:][m].log_softmax(-1)).sum(-1).mean()
    return loss


def shape_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits, target [B, N, 7] (target: shares, background first)."""
    fg = 1 - target[..., 0]
    loss = F.binary_cross_entropy_with_logits(torch.logsumexp(logits[..., 1:], -1) - logits[..., 0], fg)
    m = fg >= 0.2
    if m.any():
        tc = target[..., 1:][m] / fg[m, None]
        loss = loss - (tc * logits[..., 1:][m].log_softmax(-1)).sum(-1).mean()
    return loss


def tower_input(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [B, 3, 224, 224] -> the tower's input in [-1, 1], resized (antialiased) to image_size."""
    x = pixels.float() / 127.5 - 1
    return x if image_size == SIZE else F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                                      antialias=True, align_corners=False)


@torch.no_grad()
def score(tower, head, config: VisionConfig, pixels: torch.Tensor, shares14: torch.Tensor) -> dict:
    tower.eval()
    k, g = len(CLASSES), config.image_size // config.patch_size
    confusion, fg_ok, cells, words, chars = torch.zeros(k, k, dtype=torch.long), 0, 0, [], [0, 0]
    device = next(tower.parameters()).device
    for i in range(0, len(pixels), 64):
        x = tower_input(pixels[i:i + 64].to(device), config.image_size)
        logits = head(tower(x)).float().transpose(1, 2).reshape(len(x), -1, g, g).cpu()  # [B, 7 or CHANNELS, g, g]
        if g != SIZE // CELL:
            logits = F.avg_pool2d(logits, g // (SIZE // CELL))
        p, shares = logits[:, :K].softmax(1), cell_shares(shares14[i:i + 64], SIZE // CELL)
        if logits.shape[1] > K:
            words += read_words(logits[:, K:K + W].softmax(1), shares[:, K:K + W])
            read = shares[:, K + W:].max(1).values >= 0.5  # [B, 8, 8]: cells one character dominates
            chars[0] += (logits[:, K + W:].argmax(1) == shares[:, K + W:].argmax(1))[read].sum().item()
            chars[1] += read.sum().item()
        truth = shares[:, :K].argmax(1)  # [B, 8, 8]; 0 = background
        shape = truth > 0
        fg_ok += ((p.argmax(1) > 0) == shape).sum().item()
        cells += shape.numel()
        pred = p[:, 1:].argmax(1)
        confusion += torch.bincount((truth[shape] - 1) * k + pred[shape], minlength=k * k).reshape(k, k)
    tower.train()
    word_part = {"word_accuracy": round(sum(words) / max(len(words), 1), 3), "word_images": len(words),
                 "char_accuracy": round(chars[0] / max(chars[1], 1), 3), "char_cells": chars[1]} if words else {}
    return {"class_accuracy": round(confusion.diag().sum().item() / max(confusion.sum().item(), 1), 3),
            "fg_bg_accuracy": round(fg_ok / cells, 3), "shape_cells": confusion.sum().item(), **word_part,
            "confusion": confusion.tolist()}


def read_words(p: torch.Tensor, text: torch.Tensor) -> list[bool]:
    """Per image that holds a word: is the argmax of its text cells' mean probability the word? p, text
    [B, 21, 8, 8] (the word probabilities; the word box's share of each cell in its word's channel)."""
    out = []
    for pi, ti in zip(p, text):
        cover = ti.sum(0)  # [8, 8]
        if cover.max() == 0:
            continue
        cells = (cover >= 0.2) | (cover == cover.max())
        out.append(int(pi[:, cells].mean(1).argmax()) == int(ti.sum((1, 2)).argmax()))
    return out


def progress(scored: dict) -> tuple:
    """A curve point: (class accuracy,) or (class accuracy, word accuracy, character accuracy)."""
    reading = ("word_accuracy", "char_accuracy") if "word_accuracy" in scored else ()
    return (scored["class_accuracy"], *(scored[k] for k in reading))


def training_batches(args, train_px: torch.Tensor, train_sh: torch.Tensor):
    """Endless (pixels, shares) batches: of the made set, or --fresh ones from the --workers."""
    if not args.fresh:
        return cached_batches(train_px, train_sh, args.batch, args.augment)
    stream = FreshBatches(args.batch, args.make_size, args.fresh_from)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                         prefetch_factor=4 if args.workers else None)
    if not args.augment:
        return iter(loader)
    gen = torch.Generator().manual_seed(1)
    return (dihedral(px, sh, gen) for px, sh in loader)


def put_tower(checkpoint: str, tower: SiglipVisionTower, out: str) -> int:
    """Write the Hub-layout `checkpoint` to `out` with its vision tower's weights replaced by `tower`'s
    (same shapes, the checkpoint's dtype); returns how many tensors were replaced."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from palikit.fileio import atomic_dir

    weights = load_file(f"{checkpoint}/model.safetensors")
    prefix = tower_prefix(weights)
    for name, value in tower.state_dict().items():
        old = weights[prefix + name]
        if old.shape != value.shape:
            raise SystemExit(f"--into {checkpoint}: its {prefix + name} is {tuple(old.shape)}, the trained tower's "
                             f"{tuple(value.shape)}: train a tower of the checkpoint's widths (its --image-size, --patch, "
                             f"--width and --layers)")
        weights[prefix + name] = value.detach().to("cpu", old.dtype).contiguous()

    def fill(folder: Path) -> None:
        for f in Path(checkpoint).iterdir():
            if f.is_file() and f.name != "model.safetensors":
                shutil.copy(f, folder / f.name)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    atomic_dir(Path(out), fill)  # the whole folder appears at once, or not at all
    return len(tower.state_dict())


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    (train_px, train_sh), (val_px, val_sh) = probe_images(args)
    made_s = time.perf_counter() - t0
    config = tower_config(args)
    if config.image_size % config.patch_size or (config.image_size // config.patch_size) not in (8, 16):
        raise SystemExit(f"--image-size / --patch must give an 8x8 or 16x16 token grid, not "
                         f"{config.image_size} / {config.patch_size}")
    tower = build_tower(args.base, args.init, config).to(device)
    reading = bool(args.word_weight or args.char_weight)
    head = torch.nn.Linear(config.hidden_size, CHANNELS if reading else K).to(device)
    tower.requires_grad_(args.init != "frozen")
    opt = torch.optim.AdamW([p for p in (*tower.parameters(), *head.parameters()) if p.requires_grad], lr=args.lr)
    curve, step = [(0, *progress(score(tower, head, config, val_px, val_sh)))], 0
    batches, t0 = training_batches(args, train_px, train_sh), time.perf_counter()
    while time.perf_counter() - t0 < args.seconds and (not args.steps or step < args.steps):
        px, sh = next(batches)
        target = cell_shares(sh.to(device), config.image_size // config.patch_size).flatten(2).transpose(1, 2)  # [B, N, CHANNELS]
        loss = probe_loss(head(tower(tower_input(px.to(device), config.image_size))), target, args.word_weight,
                          args.char_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % args.score_every == 0:
            curve.append((step, *progress(score(tower, head, config, val_px, val_sh))))
    train_s = time.perf_counter() - t0
    final = score(tower, head, config, val_px, val_sh)
    seen = None if args.fresh else score(tower, head, config, train_px[:len(val_px)], train_sh[:len(val_px)])["class_accuracy"]
    if args.save:
        torch.save({"tower": tower.state_dict(), "head": head.state_dict(), "config": vars(args)}, args.save)
    replaced = put_tower(args.into, tower, args.out) if args.into else 0
    return {**{k: getattr(args, k) for k in ("init", "image_size", "patch", "width", "layers", "base", "threads",
                                             "batch", "lr", "word_weight", "char_weight", "augment", "fresh", "fresh_from", "make_size", "workers", "into", "out")},
            "device": str(device), "parameters": sum(p.numel() for p in tower.parameters()), "steps": step,
            "images_seen": step * args.batch, "images_made_s": round(made_s, 1),
            "s_per_step": round(train_s / max(step, 1), 3), "train_images": 0 if args.fresh else len(train_px),
            "val_images": len(val_px), "curve": curve, "train_class_accuracy": seen, "tensors_replaced": replaced, **final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="work/demo2/init", help="a v2 demo checkpoint (Hub layout; default: the v2 "
                    "build's initial one)")
    ap.add_argument("--init", choices=("frozen", "tune", "scratch"), default="tune")
    ap.add_argument("--image-size", type=int, choices=(112, 224), default=224)
    ap.add_argument("--patch", type=int, choices=(7, 14, 28), default=28)
    ap.add_argument("--width", type=int, default=BASE_TOWER.hidden_size, help="hidden size (MLP: 4x)")
    ap.add_argument("--layers", type=int, default=BASE_TOWER.num_hidden_layers)
    ap.add_argument("--cache", help="a .pt file holding the made images (written the first time, read after)")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps too (0: time only)")
    ap.add_argument("--train-images", type=int, default=3000)
    ap.add_argument("--val-images", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score-every", type=int, default=500)
    ap.add_argument("--word-weight", type=float, default=0.0, help="> 0: the tower learns to read the word "
                    "too, its cross-entropy weighted so (0: shape classes only)")
    ap.add_argument("--char-weight", type=float, default=0.0, help="> 0: each text token names the character "
                    "under it too (the codes' part), weighted so")
    ap.add_argument("--augment", action="store_true", help="a random flip / quarter turn of each batch")
    ap.add_argument("--save", help="write the trained tower and head here (torch.save of their state dicts)")
    ap.add_argument("--fresh", action="store_true", help="a new image for every example (no --train-images)")
    ap.add_argument("--fresh-from", type=int, default=0, help="with --fresh: start at this batch of the stream "
                    "(an earlier --fresh run's steps, when --base holds the tower it wrote with --into)")
    ap.add_argument("--make-size", type=int, help="draw the training images at this side, square (the generator "
                    "costs ~7 ms an image at 224 against ~18 ms at its free sides); held-out images keep the free sizes")
    ap.add_argument("--workers", type=int, default=0, help="processes making the images (0: this one)")
    ap.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda")
    ap.add_argument("--into", help="a Hub-layout checkpoint to write with the trained tower put in (needs --out)")
    ap.add_argument("--out", help="where --into writes")
    args = ap.parse_args()
    if bool(args.into) != bool(args.out):
        ap.error("--into and --out go together")
    if (args.word_weight or args.char_weight) and args.augment:
        ap.error("--augment flips and turns the words too: leave it off with --word-weight / --char-weight")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
