"""Fine-tuning PaliGemma on custom data: data loading (JSONL, COCO), big_vision-layout batches and
losses, training modes (full / attention-only / LoRA, freeze switches), the loop with atomic
resumable checkpoints, `train(config)` for `palikit train` and `torchrun`, and the mask VQ-VAE trainer.

Names are imported lazily so `import palikit.train` does not pull peft or the loop's imports.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# peft imports bitsandbytes when it is installed, and its CPU backend logs a warning about an optional
# `kernels` package at every import: noise for every mode but qlora on a CPU (4-bit matmul speed only)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_LAZY = {
    "TrainConfig": "palikit.train.config",
    "ConfigError": "palikit.train.config",
    "Example": "palikit.train.data",
    "Dataset": "palikit.train.data",
    "DataError": "palikit.datafiles",
    "Problem": "palikit.datafiles",
    "load_jsonl": "palikit.train.data",
    "load_coco": "palikit.train.data",
    "load_examples": "palikit.train.data",
    "Collator": "palikit.train.collate",
    "batch_loss": "palikit.train.collate",
    "apply_mode": "palikit.train.modes",
    "merge_lora": "palikit.train.modes",
    "count_trainable": "palikit.train.modes",
    "save_lora_adapter": "palikit.weights.adapter",
    "load_lora_adapter": "palikit.train.modes",
    "all_linear_targets": "palikit.train.modes",
    "TrainingInterrupted": "palikit.train.interrupt",
    "TrainingDiverged": "palikit.train.guard",
    "export_checkpoint": "palikit.train.export",
    "latest_checkpoint": "palikit.train.checkpoint",
    "train_mask_codec": "palikit.train.mask_codec",
    "Trainer": "palikit.train.trainer",
    "train": "palikit.train.trainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'palikit.train' has no attribute {name!r}")
