"""Checkpoint formats: Hub safetensors (every key layout), big_vision .npz, export to the Hub layout."""

from .hf import CheckpointError, load_hf_checkpoint, read_safetensors

__all__ = ["CheckpointError", "load_hf_checkpoint", "read_safetensors"]
