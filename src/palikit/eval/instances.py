"""Judging one detect / segment answer against the expected instances: detections matched to the
truth one-to-one by IoU (box or mask), the answer right when nothing is missing or extra. What
`palikit demo` and the demo model's hand-made-image score (the checkout's `lab.demo.evaluate`) count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IOU_THRESHOLD = 0.5


@dataclass
class Expected:
    """One expected instance when no generator `Shape` stands for it (hand-made truth, a referring
    expression's one box): what `judge_instances` reads."""

    cls: str
    box: Sequence[float]
    mask: object = None


@dataclass
class Verdict:
    """How one detect/segment answer compares with the ground truth: `ious[k]` is the IoU of
    detection k with the expected instance it is matched to (or, when unmatched, its best IoU with an
    expected instance of its label, 0.0 if none); `matched[k]` whether it counts; `missed` how many
    expected instances no detection matched."""

    ok: bool
    ious: list[float]
    matched: list[bool]
    missed: int


def judge_instances(detections: Sequence, truth: Sequence, *, by: str = "box",
                    threshold: float = IOU_THRESHOLD) -> Verdict:
    """Match detections to the expected shapes (each with `.cls`, `.box`, `.mask`) one-to-one, greedily
    by descending IoU among same-label pairs with IoU >= threshold. `by="box"` uses box IoU, `by="mask"`
    mask IoU (a detection without a mask, or of another size, scores 0). The answer is right when every
    detection and every expected instance is matched."""
    from .metrics import mask_iou
    from ..tasks.boxes import box_iou

    if by not in ("box", "mask"):
        raise ValueError(f"by must be 'box' or 'mask', got {by!r}")

    def iou(d, t) -> float:
        return box_iou(d.box, t.box) if by == "box" else mask_iou(d.mask, t.mask)

    table = [[iou(d, t) if d.label == t.cls else 0.0 for t in truth] for d in detections]  # [D][T]
    pairs = sorted(((table[i][j], i, j) for i in range(len(detections)) for j in range(len(truth))
                    if detections[i].label == truth[j].cls and table[i][j] >= threshold), reverse=True)
    det_to, used = {}, set()
    for value, i, j in pairs:
        if i not in det_to and j not in used:
            det_to[i] = j
            used.add(j)
    ious = [table[i][det_to[i]] if i in det_to else max(table[i], default=0.0) for i in range(len(detections))]
    matched = [i in det_to for i in range(len(detections))]
    missed = len(truth) - len(used)
    return Verdict(all(matched) and missed == 0, ious, matched, missed)
