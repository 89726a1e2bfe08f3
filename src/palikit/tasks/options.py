"""`PredictOptions`: the one type for a prediction's generation and parsing options.

Every edge converts once into it: the library's keyword options (`PaliGemma.predict(..., temperature=...)`
go through `PredictOptions.from_kwargs`, which refuses unknown names), the HTTP schema
(`serve/schemas.gen_options` applies the server's limits, then builds one), the CLI flags
(`cli/predict.py`), Ray batch and eval (keyword dicts). `split()` gives what the layers below take:
the engine's `GenerationOptions` (with its `SamplingOptions`) and the parser's options
(`coord_denominator`, `dedupe_iou`). Frozen and hashable: the server groups requests by it.
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

    def __post_init__(self):
        check_denominator(self.coord_denominator)

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

    def split(self) -> tuple[Any, dict[str, Any]]:
        """(engine `GenerationOptions`, parse options {"coord_denominator", "dedupe_iou"})."""
        from ..engine import GenerationOptions, SamplingOptions

        sampling = SamplingOptions(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        gen = GenerationOptions(max_new_tokens=self.max_new_tokens, sampling=sampling, num_beams=self.num_beams,
                                length_penalty=self.length_penalty)
        return gen, {"coord_denominator": self.coord_denominator, "dedupe_iou": self.dedupe_iou}


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(PredictOptions))
