"""PaliGemma model code: SigLIP tower, Gemma decoders, the composition, and the static KV cache."""

from .gemma import PAD_BLOCK, CacheWrite, KVCache
from .paligemma import PaliGemmaModel, build_model, count_parameters

__all__ = ["PAD_BLOCK", "CacheWrite", "KVCache", "PaliGemmaModel", "build_model", "count_parameters"]
