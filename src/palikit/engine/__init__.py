"""Generation engine: static-cache prefill + decode, batching, sampling, beam search."""

from .generate import Engine, Generation, GenerationOptions, Request, generate_naive
from .sampling import SamplingOptions

__all__ = ["Engine", "Generation", "GenerationOptions", "Request", "SamplingOptions", "generate_naive"]
