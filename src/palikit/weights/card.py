"""What a model says it knows: the `palikit_limits` block of its model card's YAML front matter
(`README.md` in the model folder, the Hugging Face card's metadata block), which the pre-flight
(`palikit check`, the start of `palikit train`) reads. Keys, all optional:

    palikit_limits:
      image_size: 112            # the input resolution it was trained at
      grid: 4                    # boxes it saw lie on a grid x grid lattice of cells (none: free positions)
      classes: [circle, ...]     # the object names it detects / segments
      words: [CAT, SUN, ...]     # the words it reads (OCR)
      prompts: [caption en, ...] # the task prompts it was trained with
      max_text_tokens: 128       # prompt + answer tokens per example it was trained near (training's max_len default)
      vocabulary: closed         # closed: its tokenizer holds whole pieces only for its own words
      reading: words             # words: it recognises rendered words it saw many times as wholes, not characters
      summary: "..."             # one sentence for people

A card without the block (or without front matter) has no limits: `read_limits` returns {}.
"""

from __future__ import annotations

import os
from pathlib import Path

KEY = "palikit_limits"


def front_matter(text: str) -> dict:
    """The YAML mapping between a leading `---` line and the next `---` line ({} when absent or bad)."""
    import yaml

    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i, ln in enumerate(lines[1:], 1) if ln.strip() == "---")
    except StopIteration:
        return {}
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def read_limits(model_dir: str | os.PathLike | None) -> dict:
    """The `palikit_limits` block of `model_dir/README.md` ({} when there is none)."""
    if model_dir is None:
        return {}
    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return {}
    limits = front_matter(card.read_text(encoding="utf-8", errors="replace")).get(KEY)
    return limits if isinstance(limits, dict) else {}
