"""Export for the edge: PaliGemma as the three ONNX graphs transformers.js and onnxruntime load
(`export.py`, `graphs.py`), their q8 / q4 / q4f16 variants (`quantize.py`), the JSON and tokenizer files
around them (`layout.py`), and a reference generation loop over onnxruntime (`runtime.py`).

Sits above model / weights / tokenizer / preprocess, below the CLI. torch.onnx, onnx and onnxruntime are
imported only where used (`pip install 'palikit[onnx]'`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .export import export_onnx
    from .runtime import OnnxGeneration, OnnxPaliGemma

__all__ = ["OnnxGeneration", "OnnxPaliGemma", "export_onnx"]


def __getattr__(name: str):
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    if name in ("OnnxPaliGemma", "OnnxGeneration"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(name)
