"""What goes into and comes out of the engine: `Request`, `GenerationOptions`, `Generation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import SamplingOptions


@dataclass
class Request:
    """One prompt: text ids ([BOS] prefix "\\n" [forced suffix start]), all attended as one prefix, and
    its image, either as features [F*N, H] or as pixels [F, 3, S, S] with a content key (the engine
    runs the tower). `constraint`: what the row may write next (engine/constraints.py), one fresh object
per request."""

    text_ids: list[int]
    image_features: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    pixel_key: str | None = None
    lora_slot: int = 0  # the adapter's device slot (set by the scheduler at admission; 0 = base model)
    lora_key: str | None = None  # the adapter's id when it changes image features (feature-cache key)
    constraint: Any = None  # a per-request token constraint (constraints.py): allowed() / advance(token)


@dataclass
class Generation:
    tokens: list[int]
    logprobs: list[float]
    finished: bool  # True when a stop token (EOS) was produced (not cut by max_new_tokens)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64
    sampling: SamplingOptions = SamplingOptions()
    num_beams: int = 1
    length_penalty: float = 1.0
    stop_ids: tuple[int, ...] = ()  # extra stop tokens besides the tokenizer's EOS
    ignore_eos: bool = False  # benchmarks: always run max_new_tokens steps
    adapter: str | None = None  # a loaded LoRA adapter's name (`Engine.load_adapter`); None = the base model

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and not self.sampling.greedy:
            raise ValueError("beam search is deterministic: use temperature=0 with num_beams > 1")
