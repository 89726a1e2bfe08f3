"""Parse PaliGemma's output into boxes, seg-token runs, labels and confidences; never raises.

Two entry points share one assembler: `detections_from_ids` (generated token ids + log-probs; the
API's path) and `parse_detections` (a string from elsewhere: a results file, another server).

Output format (detect / segment), instances separated by " ; ":

    <locY0><locX0><locY1><locX1> label                      detection
    <locY0><locX0><locY1><locX1><seg000>…<seg127>×16 label  segmentation (label may be absent)

Coordinates (defined in `boxes.py`). Each `<locNNNN>` is a bin v in 0..1023 in the order (y_min,
x_min, y_max, x_max). By default (official demo, HF blog, supervision) y = v / 1024 * H and
x = v / 1024 * W, where (W, H) is the ORIGINAL image size. `coord_denominator=1023` gives big_vision's
RefCOCO convention (v / 1023, so bin 1023 is the far edge). Boxes come back as float pixel
(x0, y0, x1, y1), clipped to the image.

Malformed output is skipped and described in `ParseResult.errors`: fewer than 4 locs (truncated or
interrupted), boxes with y1 <= y0 or x1 <= x0 (degenerate: dropped), seg runs shorter than 16 (box
kept, mask dropped), more than 16 segs (first 16 kept), out-of-range or malformed tokens, segs outside
an instance. Text before the first loc token and other plain text end up in `ParseResult.text`.

Confidence. From token ids (`detections_from_ids`) every `<loc>`/`<seg>` is its own token, scored by
its index; the label's character span is mapped back to the tokens that wrote it. From text, when
`token_texts` (the text each generated token contributed, joining to `text`) and `token_logprobs`
(natural-log probability of each generated token) are given, every span is mapped back that way. Then

    score      = exp(mean log-prob of the 4 loc tokens and the tokens of the label)
    mask_score = exp(mean log-prob of the 16 seg tokens)

i.e. the geometric-mean per-token probability. Without them both are None.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .boxes import box_iou, check_denominator, decode_loc
from .labels import label_forms as _forms
from .labels import normalize_label as _norm
from .labels import requested_labels as _requested

__all__ = ["Detection", "ParseResult", "box_iou", "dedupe", "detection_to_dict", "detections_from_ids",
           "parse_detections"]

_LEX = re.compile(
    r"<loc(?P<loc>\d{4})>|<seg(?P<seg>\d{3})>|(?P<bad><(?:loc|seg)[^<>;]{0,8}>?)|(?P<special><[^<>;\s]{1,16}>)"
    r"|(?P<sep>;)|(?P<text>[^<;]+|<)"
)
_TOKEN = re.compile(r"<loc\d{4}>|<seg\d{3}>")


@dataclass(eq=False)
class Detection:
    """One parsed instance. `box` is pixel (x0, y0, x1, y1) in the original image; `loc` the raw bins
    (y0, x0, y1, x1); `seg_tokens` the 16 mask codes (0..127) when present; `mask` a bool [H, W] array
    once the mask codec has decoded it; `requested` False when the label was not asked for."""

    label: str
    box: tuple[float, float, float, float]
    loc: tuple[int, int, int, int]
    score: float | None = None
    seg_tokens: tuple[int, ...] | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    requested: bool = True
    mask_score: float | None = None


@dataclass
class ParseResult:
    detections: list[Detection]
    errors: list[str]
    text: str  # the plain text: the output without its <loc>/<seg> tokens
    decoded: str = ""  # the whole output as text (from ids: the token texts joined; the Result's text)


@dataclass
class _Instance:
    locs: list[tuple[int, int, int, int | None]] = field(default_factory=list)  # (value, start, end, token)
    segs: list[tuple[int, int, int, int | None]] = field(default_factory=list)
    label: list[tuple[str, int]] = field(default_factory=list)  # (text piece, start)
    extra_segs: int = 0
    stray: int = 0


class _Scorer:
    """Maps character spans of `text` to generated tokens and averages their log-probs."""

    def __init__(self, text: str, token_texts: Sequence[str] | None, token_logprobs: Sequence[float] | None,
                 errors: list[str], joined: bool = False):
        """`joined`: `text` was made by joining `token_texts` (from ids), nothing to check."""
        self.ok = False
        if token_texts is None or token_logprobs is None:
            return
        try:
            texts = [str(t) for t in token_texts]
            lps = [float(x) for x in token_logprobs]
        except (TypeError, ValueError):
            errors.append("token_texts/token_logprobs are not sequences of str/float; scores not computed")
            return
        if len(texts) != len(lps):
            errors.append(f"{len(texts)} token_texts but {len(lps)} token_logprobs; scores not computed")
            return
        if not joined and "".join(texts) != text:
            errors.append("token_texts do not join to the text; scores not computed")
            return
        self.starts, pos = [], 0
        for t in texts:
            self.starts.append(pos)
            pos += len(t)
        self.ends = self.starts[1:] + [pos]
        self.lps = lps
        self.ok = True

    def tokens(self, start: int, end: int) -> set[int]:
        """Indices of non-empty tokens overlapping text[start:end]."""
        if not self.ok or end <= start:
            return set()
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        out = set()
        while i < len(self.starts) and self.starts[i] < end:
            if self.ends[i] > start and self.ends[i] > self.starts[i]:
                out.add(i)
            i += 1
        return out

    def score(self, spans: list[tuple[int, int, int | None]]) -> float | None:
        """exp(mean log-prob) of the tokens of `spans` (start, end, token index or None: by the span)."""
        if not self.ok:
            return None
        idx: set[int] = set()
        for s, e, tok in spans:
            idx |= {tok} if tok is not None else self.tokens(s, e)
        vals = [self.lps[i] for i in idx if math.isfinite(self.lps[i])]
        if not vals:
            return None
        return float(math.exp(min(sum(vals) / len(vals), 0.0)))


def parse_detections(
    text: str,
    image_size: tuple[int, int],
    *,
    requested_labels: str | Sequence[str] | None = None,
    coord_denominator: int = 1024,
    token_texts: Sequence[str] | None = None,
    token_logprobs: Sequence[float] | None = None,
) -> ParseResult:
    """Parse detect/segment output into `Detection`s (pixel boxes in `image_size` = (width, height)).
    Never raises on any `text`; bad arguments (image size, denominator) raise ValueError."""
    w, h = _size(image_size)
    check_denominator(coord_denominator)
    if not isinstance(text, str):
        return ParseResult([], [f"expected text, got {type(text).__name__}"], "")
    errors: list[str] = []
    scorer = _Scorer(text, token_texts, token_logprobs, errors)
    return _assemble(_lex(text), text, (w, h), requested_labels, coord_denominator, scorer, errors)


def detections_from_ids(
    ids: Sequence[int],
    token_logprobs: Sequence[float] | None,
    tokenizer: Any,
    image_size: tuple[int, int],
    *,
    requested_labels: str | Sequence[str] | None = None,
    coord_denominator: int = 1024,
    token_texts: Sequence[str] | None = None,
) -> ParseResult:
    """`parse_detections` for generated token ids and their log-probs (what `PaliGemma` uses): the
    `<loc>`/`<seg>` values come from the ids (`tokenizer.loc_value` / `seg_value`), never from text,
    and are scored by their token index; only the runs of other tokens (labels, ';', stray text) are
    lexed, from their token texts. The ids are turned into text once, here (`tokenizer.token_texts`,
    unless the caller has them: a streamed request's texts): `decoded` is that text, joined. Same
    result as `parse_detections(tokenizer.decode(ids), ..., token_texts=tokenizer.token_texts(ids),
    token_logprobs=...)` (tested)."""
    w, h = _size(image_size)
    check_denominator(coord_denominator)
    ids = [int(i) for i in ids]
    texts = list(token_texts) if token_texts is not None else tokenizer.token_texts(ids)  # joins to decode(ids)
    if len(texts) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(texts)} token_texts")
    text = "".join(texts)
    errors: list[str] = []
    scorer = _Scorer(text, texts, token_logprobs, errors, joined=True)
    return _assemble(_id_events(ids, texts, tokenizer), text, (w, h), requested_labels, coord_denominator, scorer,
                     errors)


def _size(image_size) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return w, h


def _lex(text: str, offset: int = 0) -> Iterator[tuple[str, str, int, int, None]]:
    """(kind, raw, start, end, None) events of `text` (loc/seg: raw = the digits), offsets shifted by
    `offset`; the last field is the token index, which text does not know."""
    for m in _LEX.finditer(text):
        kind = m.lastgroup
        raw = m.group(kind) if kind in ("loc", "seg", "bad") else m.group()
        yield kind, raw, m.start() + offset, m.end() + offset, None


def _id_events(ids: list[int], texts: list[str], tokenizer: Any) -> Iterator[tuple[str, str, int, int, int | None]]:
    """Events from token ids: a loc/seg id is its own event, with its token index; a run of other
    tokens is lexed as text (every lexer match ends before a '<', so no match spans a loc/seg token:
    same events as the text)."""
    pos, run_start, run = 0, 0, []
    for n, (i, t) in enumerate(zip(ids, texts)):
        loc, seg = tokenizer.loc_value(i), tokenizer.seg_value(i)
        if loc is None and seg is None:
            if not run:
                run_start = pos
            run.append(t)
        else:
            if run:
                yield from _lex("".join(run), run_start)
                run = []
            raw = ("loc", f"{loc:04d}") if loc is not None else ("seg", f"{seg:03d}")
            yield (*raw, pos, pos + len(t), n)
        pos += len(t)
    if run:
        yield from _lex("".join(run), run_start)


def _assemble(events, text: str, size: tuple[int, int], requested_labels, coord_denominator: int, scorer: _Scorer,
              errors: list[str]) -> ParseResult:
    """Instances from lexer events -> `ParseResult` (the rules in the module docstring)."""
    w, h = size
    requested = _requested(requested_labels)
    wanted = set().union(*(_forms(r) for r in requested)) if requested else set()
    instances: list[_Instance] = []
    cur: _Instance | None = None
    stray_segs = 0
    specials: list[str] = []

    for kind, raw, start, end, tok in events:
        if kind == "loc":
            v = int(raw)
            if v > 1023:
                errors.append(f"<loc{raw}> is out of range (0..1023); ignored")
                continue
            if cur is not None and (len(cur.locs) == 4 or cur.label):  # complete, or interrupted by text
                instances.append(cur)
                cur = None
            if cur is None:
                cur = _Instance()
            cur.locs.append((v, start, end, tok))
        elif kind == "seg":
            v = int(raw)
            if v > 127:
                errors.append(f"<seg{raw}> is out of range (0..127); ignored")
            elif cur is not None and len(cur.locs) == 4 and not cur.label:
                if len(cur.segs) < 16:
                    cur.segs.append((v, start, end, tok))
                else:
                    cur.extra_segs += 1
            else:
                stray_segs += 1
        elif kind == "bad":
            errors.append(f"malformed token {raw!r}; ignored")
        elif kind == "special":
            specials.append(raw)
        elif kind == "sep":
            if cur is not None:
                instances.append(cur)
                cur = None
        elif cur is not None:
            piece = raw
            if piece.strip() or cur.label:
                cur.label.append((piece, start))
        elif instances and raw.strip():
            errors.append(f"text {raw.strip()!r} after ';' has no <loc> box; ignored")
    if cur is not None:
        instances.append(cur)
    if specials:
        errors.append(f"ignored {len(specials)} other special token(s): {', '.join(dict.fromkeys(specials))}")
    if stray_segs:
        errors.append(f"{stray_segs} <seg> token(s) outside a 4-<loc> box (or after its label); ignored")

    detections: list[Detection] = []
    for n, inst in enumerate(instances, 1):
        raw_label = "".join(p for p, _ in inst.label).replace("<", " ").replace(">", " ")
        label = " ".join(raw_label.split())
        if len(inst.locs) < 4:
            errors.append(f"instance {n}: only {len(inst.locs)} of 4 <loc> tokens (truncated or malformed); skipped")
            continue
        y0, x0, y1, x1 = (v for v, *_ in inst.locs)
        if y1 <= y0 or x1 <= x0:
            errors.append(f"instance {n} ({label or 'no label'}): degenerate box y0={y0} x0={x0} y1={y1} x1={x1}; "
                          "skipped")
            continue
        seg: tuple[int, ...] | None = None
        if inst.segs and len(inst.segs) < 16:
            errors.append(f"instance {n} ({label or 'no label'}): only {len(inst.segs)} of 16 <seg> tokens; "
                          "box kept, mask dropped")
        elif inst.segs:
            seg = tuple(v for v, *_ in inst.segs)
        if inst.extra_segs:
            errors.append(f"instance {n}: {inst.extra_segs} <seg> token(s) beyond 16; ignored")
        if not label and requested and len(requested) == 1:
            label = requested[0]
        box = decode_loc((y0, x0, y1, x1), (w, h), coord_denominator)
        spans = [(s, e, tok) for _, s, e, tok in inst.locs]
        if raw_label.strip():  # the label is text: its span maps back to the tokens that wrote it
            start = inst.label[0][1] + (len(raw_label) - len(raw_label.lstrip()))
            spans.append((start, start + len(raw_label.strip()), None))
        detections.append(Detection(
            label=label, box=box, loc=(y0, x0, y1, x1), score=scorer.score(spans), seg_tokens=seg,
            requested=requested is None or bool(_forms(label) & wanted),
            mask_score=scorer.score([(s, e, tok) for _, s, e, tok in inst.segs]) if seg is not None else None,
        ))
    return ParseResult(detections, errors, re.sub(r"[ \t]{2,}", " ", _TOKEN.sub("", text)).strip(), text)


def dedupe(detections: Sequence[Detection], iou_threshold: float = 0.7) -> list[Detection]:
    """Drop boxes that overlap an already kept box of the same label (case-insensitive) with
    IoU > iou_threshold. Higher scores win; without scores the earlier box wins. Order is kept."""
    order = sorted(range(len(detections)),
                   key=lambda i: (-(detections[i].score if detections[i].score is not None else -1.0), i))
    kept: list[int] = []
    for i in order:
        d = detections[i]
        if all(_norm(detections[k].label) != _norm(d.label) or box_iou(detections[k].box, d.box) <= iou_threshold
               for k in kept):
            kept.append(i)
    return [detections[i] for i in sorted(kept)]


def detection_to_dict(d: Detection, ndigits: int = 2) -> dict[str, Any]:
    """Plain-JSON form of a detection, without the mask (see results.py for masks)."""
    return {
        "label": d.label,
        "box": [round(float(v), ndigits) for v in d.box],
        "loc": list(d.loc),
        "score": None if d.score is None else round(float(d.score), 6),
        "mask_score": None if d.mask_score is None else round(float(d.mask_score), 6),
        "seg_tokens": None if d.seg_tokens is None else list(d.seg_tokens),
        "requested": bool(d.requested),
    }
