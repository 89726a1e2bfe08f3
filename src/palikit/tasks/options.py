"""`PredictOptions`: the one type for a prediction's generation and parsing options.

Every edge converts once into it and it travels as is down to `PaliGemma` (no dict in between):
the library's keyword options (`PaliGemma.predict(..., temperature=...)` go through
`PredictOptions.from_kwargs`, which refuses unknown names), the HTTP schema (`serve/schemas.gen_options`
applies the server's limits, then builds one and the server passes it as `options=`), the CLI flags
(`cli/predict.py`), Ray batch and eval (keyword dicts). `PaliGemma` turns it into the engine's
`GenerationOptions` (api.py: the layer that owns both; tasks/ sits below the engine and imports none
of it) and hands `coord_denominator` / `dedupe_iou` to the parser. Frozen and hashable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .boxes import DEFAULT_DENOMINATOR, check_denominator

__all__ = ["PredictOptions", "OPTION_NAMES"]


@dataclass(frozen=True)
class PredictOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    coord_denominator: int = DEFAULT_DENOMINATOR  # 1024 (official demo) or 1023 (big_vision RefCOCO)
    dedupe_iou: float | None = None  # drop same-label boxes overlapping above this IoU
    adapter: str | None = None  # a loaded LoRA adapter's name (`PaliGemma.load_adapter`); None = the base model
    # detect/segment grammar (tasks/constrain.py): None = on for detect/segment prompts (greedy or sampled,
    # num_beams=1), False = the raw model, True = on (a detect/segment prompt needed), "detect"/"segment" =
    # that grammar whatever the prompt's wording ("find the cats" with labels)
    constrained: bool | str | None = None

    def __post_init__(self):
        check_denominator(self.coord_denominator)
        if self.constrained not in CONSTRAINED_VALUES:
            raise ValueError(f"constrained must be true, false, null (auto), 'detect' or 'segment'; "
                             f"got {self.constrained!r}")

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any] | PredictOptions | None = None) -> PredictOptions:
        """From keyword options (missing ones take the defaults); unknown names raise ValueError."""
        if isinstance(options, PredictOptions):
            return options
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(OPTION_NAMES))
        if unknown:
            raise ValueError(f"unknown option(s): {', '.join(unknown)}")
        return cls(**opts)

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword form (what `PaliGemma.predict(**...)` takes back)."""
        return asdict(self)


CONSTRAINED_VALUES = (None, True, False, "detect", "segment")
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(PredictOptions))
