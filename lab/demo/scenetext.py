"""A scene-text OCR set closer to the field report's benchmark than the shapes demo: cropped words
and codes as a text detector would hand them to an OCR model, generated here with their ground truth.

Domains (the `domain` field): `serial` (serial numbers on metal labels), `plate` (licence plates),
`sign` (street / shop signs), `receipt` (receipt lines on paper), `container` (shipping-container
codes, ISO 6346 style). Each crop varies the font (DejaVu / STIX / Computer Modern faces that
matplotlib bundles, plus any TrueType font under /usr/share/fonts), size (12-44 px), text and
background colours (a luminance gap of 80 or more, halved for one crop in five: faded paint),
background texture (gradient, noise, stray lines), rotation (+-8 degrees), shear, blur, JPEG re-compression and crop padding (a detector's box around the rotated
text). Deterministic for a seed and the same installed fonts.

    python -m lab.demo.scenetext --out data/scenetext --n 200
    palikit eval data/scenetext/scenetext.jsonl --task ocr --baseline tesseract

Writes `DIR/images/NNNNNN.png` and `DIR/scenetext.jsonl` with rows {"id", "image", "prefix": "ocr",
"suffix": text, "domain", "font", "font_px"}: palikit eval JSONL (and palikit train JSONL).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import string
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from palikit.demo.fonts import font_files
from palikit.fileio import atomic_write_bytes

DOMAINS = ("serial", "plate", "sign", "receipt", "container")
SIGN_WORDS = ["EXIT", "PARKING", "OPEN", "CLOSED", "PHARMACY", "BAKERY", "STOP", "HOTEL", "Main St", "Station Rd",
              "NO ENTRY", "Platform 3", "Gate B12", "Coffee", "Books", "Toilets", "Museum", "Bus Stop", "Taxi",
              "Elm Avenue", "Car Wash", "Market", "Oak Lane", "One Way", "Pizza", "Dentist", "Library", "Police"]
RECEIPT_ITEMS = ["MILK", "BREAD", "EGGS", "COFFEE", "APPLES", "RICE", "TEA", "BUTTER", "CHEESE", "SOAP", "TOTAL",
                 "SUBTOTAL", "CASH", "CHANGE", "VAT 20%", "BANANAS", "PASTA", "WATER"]
def make_text(domain: str, rng: random.Random) -> str:
    up, dig = string.ascii_uppercase, string.digits
    pick = lambda chars, n: "".join(rng.choice(chars) for _ in range(n))  # noqa: E731
    if domain == "serial":
        return rng.choice([f"SN {pick(dig, 6)}", f"S/N {pick(up, 2)}{pick(dig, 5)}", f"{pick(up, 3)}-{pick(dig, 4)}-{pick(up + dig, 2)}",
                           f"LOT {pick(dig, 4)}{pick(up, 1)}", f"P/N {pick(dig, 3)}-{pick(dig, 3)}"])
    if domain == "plate":
        return rng.choice([f"{pick(up, 2)}{pick(dig, 2)} {pick(up, 3)}", f"{pick(up, 3)} {pick(dig, 3)}",
                           f"{pick(dig, 1)}{pick(up, 3)}{pick(dig, 3)}", f"{pick(up, 2)}-{pick(dig, 4)}"])
    if domain == "sign":
        return rng.choice(SIGN_WORDS)
    if domain == "receipt":
        return f"{rng.choice(RECEIPT_ITEMS)} {rng.randint(0, 49)}.{rng.randint(0, 99):02d}"
    if domain == "container":
        return f"{pick(up, 3)}U {pick(dig, 6)} {pick(dig, 1)}"
    raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")


def _lum(c: tuple[int, int, int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _colours(domain: str, rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(background, text) colours typical of the domain, with a luminance gap of at least 80."""
    presets = {"plate": [((250, 250, 245), (20, 20, 20)), ((245, 200, 30), (15, 15, 15)), ((30, 60, 150), (240, 240, 240))],
               "sign": [((20, 110, 60), (245, 245, 245)), ((30, 70, 160), (250, 250, 250)), ((190, 30, 30), (250, 250, 250)),
                        ((240, 240, 235), (30, 30, 30))],
               "receipt": [((245, 242, 232), (40, 40, 45)), ((250, 250, 250), (70, 70, 80))],
               "serial": [((170, 172, 175), (25, 25, 30)), ((60, 62, 66), (220, 220, 220)), ((200, 190, 160), (30, 30, 30))],
               "container": [((150, 40, 30), (245, 245, 245)), ((30, 90, 140), (250, 250, 250)), ((40, 110, 60), (245, 245, 245))]}
    bg, fg = rng.choice(presets[domain])
    jit = lambda c: tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in c)  # noqa: E731
    bg, fg = jit(bg), jit(fg)
    if abs(_lum(bg) - _lum(fg)) < 80:
        fg = (0, 0, 0) if _lum(bg) > 128 else (255, 255, 255)
    return bg, fg


def _background(size: tuple[int, int], colour: tuple[int, ...], rng: random.Random) -> Image.Image:
    import numpy as np

    w, h = size
    nrng = np.random.default_rng(rng.randint(0, 2**31))
    base = np.array(colour, dtype=np.float32)[None, None, :]
    grad = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(0, 30)
    noise = nrng.normal(0, rng.uniform(2, 12), (h, w, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(base + grad + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 3)):  # scratches, panel edges
        shade = tuple(int(min(255, max(0, v + rng.randint(-60, 60)))) for v in colour)
        draw.line([(rng.randint(0, w), rng.randint(0, h)), (rng.randint(0, w), rng.randint(0, h))], fill=shade,
                  width=rng.randint(1, 2))
    return img


def render(text: str, domain: str, font: Path, rng: random.Random) -> tuple[Image.Image, int]:
    """One cropped word / code image and the font size used."""
    px = rng.randint(12, 44)
    f = ImageFont.truetype(str(font), px)
    x0, y0, x1, y1 = f.getbbox(text)
    tw, th = x1 - x0, y1 - y0
    margin = px
    bg, fg = _colours(domain, rng)
    if rng.random() < 0.2:  # faded paint, glare: text colour pulled half-way to the background
        fg = tuple((a + b) // 2 for a, b in zip(fg, bg))
    w, h = tw + 2 * margin, th + 2 * margin
    canvas = _background((w, h), bg, rng)
    ink = Image.new("L", (w, h), 0)  # where the text is, rotated with it, for the crop box
    ImageDraw.Draw(canvas).text((margin - x0, margin - y0), text, font=f, fill=fg)
    ImageDraw.Draw(ink).text((margin - x0, margin - y0), text, font=f, fill=255)
    angle = rng.uniform(-8, 8) if rng.random() < 0.7 else 0.0
    canvas = canvas.rotate(angle, resample=Image.BICUBIC, expand=False, fillcolor=bg)
    bx0, by0, bx1, by1 = ink.rotate(angle, resample=Image.BILINEAR, expand=False).getbbox() or (0, 0, w, h)
    pad = lambda: rng.randint(2, max(3, px // 3))  # noqa: E731 - a detector's loose / tight box
    box = (max(0, bx0 - pad()), max(0, by0 - pad()), min(w, bx1 + pad()), min(h, by1 + pad()))
    img = canvas.crop(box)
    if rng.random() < 0.4:  # seen from the side: a horizontal shear
        k = rng.uniform(-0.3, 0.3)
        img = img.transform(img.size, Image.AFFINE, (1, k, -k * img.height / 2, 0, 1, 0), Image.BICUBIC,
                            fillcolor=bg)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.3)))
    if rng.random() < 0.3:  # a low-resolution camera
        s = rng.uniform(0.45, 0.8)
        small = img.resize((max(8, int(img.width * s)), max(8, int(img.height * s))), Image.BILINEAR)
        img = small.resize(img.size, Image.BILINEAR)
    if rng.random() < 0.5:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(35, 90))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img, px


def write_set(out: str | Path, n: int = 200, seed: int = 0, domains: tuple[str, ...] = DOMAINS) -> Path:
    """Write `n` crops (domains in turn) and `scenetext.jsonl`; returns the JSONL path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    fonts = font_files()
    rows = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        domain = domains[i % len(domains)]
        text = make_text(domain, rng)
        font = fonts[rng.randrange(len(fonts))]
        img, px = render(text, domain, font, rng)
        rel = f"images/{i:06d}.png"
        img.save(out / rel)
        rows.append({"id": f"{domain}-{i:06d}", "image": rel, "prefix": "ocr", "suffix": text, "domain": domain,
                     "font": font.name, "font_px": px})
    return atomic_write_bytes(out / "scenetext.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.demo.scenetext", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--n", type=int, default=200, help="number of crops (domains in turn)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domains", default=",".join(DOMAINS), help=f"comma-separated subset of {','.join(DOMAINS)}")
    a = ap.parse_args(argv)
    domains = tuple(d.strip() for d in a.domains.split(",") if d.strip())
    bad = [d for d in domains if d not in DOMAINS]
    if bad or a.n < 1:
        ap.error(f"unknown domain(s) {bad}; choose from {', '.join(DOMAINS)}" if bad else "--n must be >= 1")
    path = write_set(a.out, a.n, a.seed, domains)
    print(f"wrote {a.n} crops ({', '.join(domains)}) -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
