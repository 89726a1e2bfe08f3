"""All evaluation metrics in one namespace (text metrics in `metrics_text`, detection and segmentation
in `metrics_detection`). Every function is pure and documents the definition it follows."""

from __future__ import annotations

from .metrics_detection import (
    box_iou,
    coco_map,
    mask_iou,
    referring_segmentation_scores,
    segmentation_sample_iou,
)
from .metrics_text import (
    anls,
    caption_tokenize,
    cer,
    cider_d,
    corpus_cer,
    count_accuracy,
    edit_distance,
    exact_match,
    mean,
    normalize_text,
    normalized_edit_distance,
    ocr_accuracy,
    parse_count,
    vqa_accuracy,
    vqa_normalize,
)

__all__ = [
    "anls", "box_iou", "caption_tokenize", "cer", "cider_d", "coco_map", "corpus_cer", "count_accuracy",
    "edit_distance", "exact_match", "mask_iou", "mean", "normalize_text", "normalized_edit_distance",
    "ocr_accuracy", "parse_count", "referring_segmentation_scores",
    "segmentation_sample_iou", "vqa_accuracy", "vqa_normalize",
]
