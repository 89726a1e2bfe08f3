"""Checkpoints: where a model's files are (`resolve.py`, the bundled demo model included), the one loader
(`load.py`), the formats (Hub safetensors in every key layout, big_vision .npz, PEFT LoRA adapters),
export to the Hub layout."""

from .hf import CheckpointError, load_hf_checkpoint, read_safetensors

__all__ = ["CheckpointError", "load_hf_checkpoint", "read_safetensors"]
