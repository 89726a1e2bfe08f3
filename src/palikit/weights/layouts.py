"""Checkpoint key layouts, the one table: for every PaliGemma key layout in use, the prefix each of
palikit's three top modules carries in it and the key of the stored (tied) head. `weights/hf.py`
reads any layout through `internal_key`, `weights/export.py` writes the published one through
`to_layout(name, "hub")`, and `palikit.testing.hf_model_from` writes transformers' in-memory one.
Below the prefixes every layout uses the same module names as palikit (`layers.3.self_attn.q_proj`).

| layout | language model | vision tower | projector | head |
|---|---|---|---|---|
| `hub`: published Hub files (transformers <= 4.51 writer) | `language_model.model.` | `vision_tower.vision_model.` | `multi_modal_projector.` | `language_model.lm_head.weight` (optional) |
| `transformers`: transformers >= 5.6 in memory (`state_dict()`) | `model.language_model.` | `model.vision_tower.` | `model.multi_modal_projector.` | `lm_head.weight` |
| `transformers-4.52`: transformers 4.52-5.5 in memory | `model.language_model.` | `model.vision_tower.vision_model.` | `model.multi_modal_projector.` | `lm_head.weight` |
| `hf5-save`: transformers 5.x `save_pretrained` (hybrid) | `language_model.model.` | `vision_tower.` | `multi_modal_projector.` | none |
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

LANGUAGE, VISION, PROJECTOR = "language_model.", "vision_tower.", "multi_modal_projector."
MODULES = (LANGUAGE, VISION, PROJECTOR)  # palikit's own prefixes (PaliGemmaModel's children)


@dataclass(frozen=True)
class KeyLayout:
    name: str
    description: str
    prefixes: dict[str, str]  # palikit prefix (one of MODULES) -> this layout's prefix
    head: str | None  # where the layout stores the tied head, None when it leaves it out


def _layout(name: str, description: str, language: str, vision: str, projector: str, head: str | None):
    return KeyLayout(name, description, {LANGUAGE: language, VISION: vision, PROJECTOR: projector}, head)


LAYOUTS: dict[str, KeyLayout] = {layout.name: layout for layout in (
    _layout("hub", "published Hub files (transformers <= 4.51 writer)",
            "language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.",
            "language_model.lm_head.weight"),
    _layout("transformers", "transformers >= 5.6 in memory (state_dict())",
            "model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head.weight"),
    _layout("transformers-4.52", "transformers 4.52-5.5 in memory (state_dict())",
            "model.language_model.", "model.vision_tower.vision_model.", "model.multi_modal_projector.",
            "lm_head.weight"),
    _layout("hf5-save", "transformers 5.x save_pretrained (hybrid)",
            "language_model.model.", "vision_tower.", "multi_modal_projector.", None),
)}

HEAD_KEYS = tuple(dict.fromkeys(layout.head for layout in LAYOUTS.values() if layout.head))

# (layout prefix, palikit prefix), longest first so "model.vision_tower.vision_model." wins over
# "model.vision_tower."; prefixes equal to palikit's own are no-ops and left out
_READ_RULES = tuple(sorted(
    {(theirs, ours) for layout in LAYOUTS.values() for ours, theirs in layout.prefixes.items() if theirs != ours},
    key=lambda rule: -len(rule[0])))


def internal_key(key: str) -> str:
    """A key of any layout above -> palikit's name (keys already in palikit's names stay as they are)."""
    for theirs, ours in _READ_RULES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def to_layout(name: str, layout: str) -> str:
    """palikit's parameter name -> its key in `layout` (a key of LAYOUTS)."""
    try:
        prefixes = LAYOUTS[layout].prefixes
    except KeyError:
        raise ValueError(f"unknown key layout {layout!r}; known: {', '.join(LAYOUTS)}") from None
    for ours, theirs in prefixes.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def detect_layout(keys: Iterable[str]) -> str:
    """The layout whose prefixes every key (head aside) carries: the name of a LAYOUTS entry, or a
    ValueError when no single layout writes all of them."""
    keys = [k for k in keys if k not in HEAD_KEYS]
    fits = [name for name in LAYOUTS if keys and all(to_layout(internal_key(k), name) == k for k in keys)]
    if len(fits) != 1:
        sample = ", ".join(sorted(keys)[:3])
        raise ValueError(f"keys ({sample}, ...) fit {'no' if not fits else 'more than one'} known layout "
                         f"({', '.join(fits or LAYOUTS)})")
    return fits[0]
