"""Generation engine: continuous batching over a slot KV cache, per-request sampling, beam search."""

from .generate import Engine, generate_naive
from .request import Generation, GenerationOptions, Request
from .sampling import SamplingOptions
from .scheduler import Closed, QueueFull, Ticket

__all__ = ["Closed", "Engine", "Generation", "GenerationOptions", "QueueFull", "Request", "SamplingOptions",
           "Ticket", "generate_naive"]
