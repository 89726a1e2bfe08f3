"""Everything the demo model's training recipe needs, built by our own code from the "shapes"
generator: a PaliGemma-style tokenizer (the data's words and characters + 1024 `<loc>` + 128 `<seg>`),
a mask codec with the vae-oid.npz architecture trained on the generator's masks, the train /
validation / test splits as JSONL (+ COCO json for detection and segmentation), and an initial
checkpoint (tiny PaliGemma 2 config, random weights) in the Hub layout that the three-stage recipe
trains: `lab/recipes/demo-ocr-warmup.yaml` (reading first), `lab/recipes/demo.yaml` (the task mix), then
`lab/recipes/demo-anneal.yaml` (more mix steps at a lower LR).

    python -m lab.demo.build --out work/demo            # then the three recipes, or: make demo-model

The output goes to a work folder: `--out`, by default `<checkout>/work/demo` (what the recipes read); a
folder inside the palikit package is refused.

Progress (a rich bar per stage, on stderr; one line per finished stage, also in logs) keeps the ~7 min
build from looking stuck; stdout stays the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import numpy as np

from palikit.config import PaliGemmaConfig, TextConfig, VisionConfig
from palikit.demo import shapes, shapes2
from palikit.demo.shapes import CLASSES, COLORS, NUMBER_WORDS, PLURALS, WORDS

from .paths import check_build_dir, default_build_dir
from palikit.demo.splits import codec_seg_fn, write_split

IMAGE_SIZE = 112
TASK_WORDS = ["caption", "en", "detect", "segment", "ocr", "answer", "how", "many", "are", "there", "what", "color",
              "is", "the", "and"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:?'-")

# A tiny PaliGemma 2 (post-norms, soft-caps, GQA): 112 px / patch 28 = 16 image tokens (one per cell of
# the shapes grid), so a CPU trains it in about an hour.
DEMO_CONFIG = PaliGemmaConfig(
    vision=VisionConfig(image_size=IMAGE_SIZE, patch_size=28, hidden_size=128, intermediate_size=512,
                        num_hidden_layers=4, num_attention_heads=4),
    text=TextConfig(vocab_size=0, hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=48, query_pre_attn_scalar=48, post_norms=True,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    name="palikit-demo-shapes",
)


# v2 (issue 19): free positions on any image size, resized to 224 px with v1's 28 px patches = 8x8 = 64
# image tokens (a token is 12.5 % of the side; the smallest shape, 10 % of it, is 22 px: v1's cell
# scale), v1's widths, so v1's trained weights start it (`warm_start`). From scratch at 160 px / patch
# 16 (100 tokens) the mix had not looked at the image after 64k examples (every caption the same at
# steps 1,000 and 2,000): v1's history needed ~300k examples for that, more than a CPU session holds.
V2_IMAGE_SIZE = 224
DEMO2_CONFIG = replace(DEMO_CONFIG, vision=replace(DEMO_CONFIG.vision, image_size=V2_IMAGE_SIZE, patch_size=28),
                       name="palikit-demo-shapes2")


def demo_pieces(version: int = 1) -> list[str]:
    if version == 2:
        return sorted(set(shapes2.vocabulary() + TASK_WORDS)) + CHARS
    words = list(CLASSES) + list(PLURALS.values()) + list(COLORS) + [w.upper() for w in WORDS] + list(NUMBER_WORDS)
    return sorted(set(words + TASK_WORDS)) + CHARS


@dataclass(frozen=True)
class DemoSpec:
    """What differs between the demo model's versions: the generator, the image size it draws at
    (None: v2's random sizes, the preprocessing resizes), the model's config and its init."""
    version: int
    generator: ModuleType
    draw_size: int | None
    config: PaliGemmaConfig
    structured_init: bool  # v2: smooth <loc> embeddings and 2-D sin-cos patch positions (`structured_init`)


SPECS = {1: DemoSpec(1, shapes, IMAGE_SIZE, DEMO_CONFIG, False),
         2: DemoSpec(2, shapes2, None, DEMO2_CONFIG, True)}


def build_tokenizer(out: Path, version: int = 1):
    from palikit.tokenizer import build_tokenizer as build

    return build(demo_pieces(version), out / "tokenizer.json")


STAGES = 5


class _Progress:
    """A rich progress bar on stderr plus one plain line per finished stage."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=self.console, disable=not enabled)
        self.enabled = enabled

    @contextmanager
    def stage(self, n: int, what: str, total: int | None = None, unit: str = ""):
        """Yields `advance(k=1, **fields)`; prints "[n/5] what: <summary> (s)" at the end (the summary is what
        the body stores in the returned dict's "done" key)."""
        t0 = time.perf_counter()
        task = self.bar.add_task(f"[{n}/{STAGES}] {what}{f' ({unit})' if unit else ''}", total=total)
        info: dict = {"done": ""}

        def advance(k: int = 1, description: str | None = None):
            self.bar.update(task, advance=k, **({"description": description} if description else {}))

        info["advance"] = advance
        try:
            yield info
        finally:
            self.bar.remove_task(task)
        if self.enabled:
            self.console.print(f"[{n}/{STAGES}] {what}: {info['done']} ({time.perf_counter() - t0:.1f} s)",
                               markup=False, highlight=False)

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()


def shape_masks(n_images: int, size: int | None = IMAGE_SIZE, advance=None, generator: ModuleType = shapes) -> np.ndarray:
    """64x64 crops of every shape's visible mask inside its box (the codec's training data)."""
    from palikit.tasks.mask_codec import _resize64

    crops = []
    for sample in generator.iter_split("train", n_images, size):
        if advance is not None:
            advance()
        for s in sample.shapes:
            x0, y0, x1, y1 = (int(round(v)) for v in s.box)
            crops.append(_resize64(s.mask[y0:y1, x0:x1].astype(np.float32)).clamp(0, 1).numpy())
    return np.stack(crops)


def build_codec(out: Path, n_images: int = 2000, steps: int = 1500, seed: int = 0, progress: _Progress | None = None,
                spec: DemoSpec = SPECS[1]):
    import torch

    from palikit.train.mask_codec import train_mask_codec

    progress = progress or _Progress(enabled=False)
    with progress.stage(2, "mask crops for the codec", n_images, "images") as st:
        masks = torch.from_numpy(shape_masks(n_images, spec.draw_size, st["advance"], spec.generator))
        st["done"] = f"{len(masks):,} masks from {n_images:,} images"
    with progress.stage(3, "mask codec training", steps, "steps") as st:
        stats = {}

        def on_step(step, s):
            stats.update(s)
            st["advance"](description=f"[3/{STAGES}] mask codec training (loss {s['loss']:.4f})")

        codec = train_mask_codec(masks, steps=steps, embed_dim=64, seed=seed, progress=on_step)
        st["done"] = f"{steps:,} steps, last loss {stats.get('loss', float('nan')):.4f}"
    codec.to_npz(out / "vae-oid.npz")
    return codec


def build_data(out: Path, codec, n_train: int, n_val: int, n_test: int, progress: _Progress | None = None,
               spec: DemoSpec = SPECS[1]) -> None:
    progress = progress or _Progress(enabled=False)
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        # write_split has no per-image hook; the bar counts the shapes whose mask is encoded (the slow part)
        with progress.stage(4, f"data: {split} split, {n:,} images", None, "masks encoded") as st:
            count = [0]

            def encoded(advance=st["advance"]):
                count[0] += 1
                advance()

            write_split(spec.generator, out / "data", split, n, spec.draw_size, seg_fn=codec_seg_fn(codec, encoded))
            st["done"] = f"{n:,} images, {count[0]:,} masks encoded"


def smooth_loc_embeddings(model, tokenizer) -> None:
    """`<loc>` embeddings (tied: also the output head) as sin/cos features of the bin value at log-spaced
    frequencies (1 to 256 cycles over the range), at the mean norm of the other rows: neighbouring bins
    start alike, so a gradient on one bin moves its neighbours (v1's history: spread-out bins learned
    from random rows reached detect mAP 0.000 on a CPU)."""
    import torch

    with torch.no_grad():
        emb = model.language_model.embed_tokens.weight  # [V, D]
        d = emb.shape[1]
        bins = torch.arange(1024, dtype=torch.float64) / 1023
        freqs = torch.logspace(0, math.log10(256), d // 2, dtype=torch.float64)  # [D/2] cycles over the range
        phase = 2 * math.pi * bins[:, None] * freqs[None]  # [1024, D/2]
        table = torch.cat([phase.sin(), phase.cos()], 1)  # [1024, D]
        emb[torch.tensor(tokenizer.loc_ids)] = (table / table.norm(dim=1, keepdim=True)
                                                * emb.norm(dim=1).mean()).to(emb.dtype)


def sincos_positions(model) -> None:
    """The vision tower's position embeddings as the 2-D sin-cos table (MAE / big_vision posemb), at
    the norm of the rows they replace."""
    import torch

    with torch.no_grad():
        pos = model.vision_tower.embeddings.position_embedding.weight  # [g*g, Dv]
        g, dv = int(round(math.sqrt(pos.shape[0]))), pos.shape[1]
        omega = 1.0 / 10000 ** (torch.arange(dv // 4, dtype=torch.float64) / (dv // 4))  # [Dv/4]
        ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64), indexing="ij")
        table = torch.cat([f(c.reshape(-1, 1) * omega[None]) for c in (xs, ys) for f in (torch.sin, torch.cos)], 1)
        pos.copy_((table / table.norm(dim=1, keepdim=True) * pos.norm(dim=1).mean()).to(pos.dtype))


def structured_init(model, tokenizer) -> None:
    """From-scratch v2 init: smooth `<loc>` embeddings and 2-D sin-cos patch positions."""
    smooth_loc_embeddings(model, tokenizer)
    sincos_positions(model)


def warm_start(model, tokenizer, source: str | Path) -> dict:
    """Start `model` from a trained demo checkpoint of the same widths (v1): every weight of the same
    shape is copied; embedding rows by piece (a piece the source lacks keeps its random row); the patch
    position table resampled to the new grid (bicubic, as big_vision's resample_posemb); then smooth
    `<loc>` rows (v1 only ever wrote grid-cell bins). Returns what was copied."""
    import torch
    import torch.nn.functional as F

    from palikit.api import PaliGemma

    src = PaliGemma.from_pretrained(source, device="cpu", dtype="float32")
    theirs = dict(src.model.named_parameters())
    copied, rows = 0, 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            q = theirs.get(name)
            if name.endswith("embed_tokens.weight"):
                for i in range(tokenizer.vocab_size):
                    j = src.tokenizer.token_to_id(tokenizer.id_to_token(i))
                    if j is not None and j < q.shape[0]:
                        p[i] = q[j]
                        rows += 1
            elif name.endswith("position_embedding.weight") and q is not None and q.shape != p.shape:
                g0, g1, dv = int(round(math.sqrt(q.shape[0]))), int(round(math.sqrt(p.shape[0]))), q.shape[1]
                grid = q.reshape(1, g0, g0, dv).permute(0, 3, 1, 2)  # [1, Dv, g0, g0]
                p.copy_(F.interpolate(grid, size=(g1, g1), mode="bicubic", align_corners=False)
                        .permute(0, 2, 3, 1).reshape(g1 * g1, dv))
            elif q is not None and q.shape == p.shape:
                p.copy_(q)
                copied += 1
            else:
                raise ValueError(f"{source}: {name} has shape {None if q is None else tuple(q.shape)}, the model "
                                 f"{tuple(p.shape)}: warm start needs a checkpoint of the same widths")
    smooth_loc_embeddings(model, tokenizer)
    return {"source": str(source), "tensors": copied, "embedding_rows": rows}


def build_initial_checkpoint(out: Path, tokenizer, seed: int = 0, spec: DemoSpec = SPECS[1],
                             warm: str | Path | None = None) -> Path:
    import torch

    from palikit.preprocess import ImageProcessor
    from palikit.testing import random_model
    from palikit.weights.export import save_hub_checkpoint

    cfg = replace(spec.config, text=replace(spec.config.text, vocab_size=tokenizer.vocab_size),
                  image_token_index=tokenizer.image_id)
    model = random_model(cfg, "cpu", torch.float32, seed=seed)
    if warm is not None:
        warm_start(model, tokenizer, warm)
    elif spec.structured_init:
        structured_init(model, tokenizer)
    folder = out / "init"
    save_hub_checkpoint(model, folder)
    (folder / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (out / name).exists():
            (folder / name).write_bytes((out / name).read_bytes())
    (folder / "vae-oid.npz").write_bytes((out / "vae-oid.npz").read_bytes())
    ImageProcessor(size=cfg.vision.image_size, patch_size=cfg.vision.patch_size).save(folder)
    return folder


def build(out: str | Path, *, n_train: int = 20_000, n_val: int = 300, n_test: int = 500, codec_images: int = 2000,
          codec_steps: int = 400, seed: int = 0, progress: bool = True, version: int = 1,
          warm: str | Path | None = None) -> dict:
    if version not in SPECS:
        raise ValueError(f"version must be one of {sorted(SPECS)}, got {version!r}")
    spec = SPECS[version]
    out = check_build_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    with _Progress(progress) as p:
        with p.stage(1, "tokenizer") as st:
            tok = build_tokenizer(out, version)
            st["done"] = f"{tok.vocab_size:,} pieces"
        codec = build_codec(out, codec_images, codec_steps, seed, progress=p, spec=spec)
        build_data(out, codec, n_train, n_val, n_test, progress=p, spec=spec)
        with p.stage(5, "initial checkpoint") as st:
            init = build_initial_checkpoint(out, tok, seed, spec, warm)
            st["done"] = str(init)
    summary = {"version": version, "tokenizer_size": tok.vocab_size, "init_checkpoint": str(init), "data": str(out / "data"),
               "splits": {"train": n_train, "validation": n_val, "test": n_test}}
    (out / "build.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description="Build the demo model's tokenizer, mask codec, data and initial checkpoint.")
    ap.add_argument("--out", default=str(default_build_dir()), help="work folder (default: %(default)s)")
    ap.add_argument("--train", type=int, default=20_000)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--codec-images", type=int, default=2000)
    ap.add_argument("--codec-steps", type=int, default=400)
    ap.add_argument("--version", type=int, default=1, choices=sorted(SPECS),
                    help="1: the 4x4-grid shapes at 112 px; 2: shapes v2 (free positions, any size, 6 classes)")
    ap.add_argument("--warm-start", default=None, help="a trained demo checkpoint of the same widths (v1's) "
                    "to start from instead of random weights (v2's recipe: work/demo/anneal/final)")
    ap.add_argument("--init-only", action="store_true", help="only (re)write the initial checkpoint in --out "
                    "(its tokenizer.json and vae-oid.npz must be there)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar or stage lines (stderr)")
    a = ap.parse_args()
    try:
        out = check_build_dir(a.out)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if a.init_only:
        from palikit.tokenizer import Tokenizer

        init = build_initial_checkpoint(out, Tokenizer.from_file(out / "tokenizer.json"), 0, SPECS[a.version], a.warm_start)
        print(json.dumps({"init_checkpoint": str(init), "warm_start": a.warm_start}))
        return
    print(json.dumps(build(a.out, n_train=a.train, n_val=a.val, n_test=a.test, codec_images=a.codec_images,
                           codec_steps=a.codec_steps, progress=not a.no_progress, version=a.version,
                           warm=a.warm_start), indent=2))


if __name__ == "__main__":
    main()
