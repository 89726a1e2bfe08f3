"""Quantized variants of an exported fp32 graph, made with onnxruntime's own quantizers, in the forms
transformers.js loads for its `dtype` option:

- q8 (`*_quantized.onnx`): dynamic 8-bit (`ONNXQuantizer`, IntegerOps): int8 weights, uint8 activations
  quantized at run time; uint8 weights in a graph with a Conv (the vision encoder), because
  onnxruntime-web has no int8 ConvInteger. MatMul, Gather (the embedding) and Conv are quantized.
- q4 (`*_q4.onnx`): 4-bit blockwise weights (`MatMulNBitsQuantizer`: `MatMulNBits`, block 32,
  symmetric, accuracy_level 4 = int8 compute on CPUs with VNNI/AMX), the embedding table too
  (`GatherBlockQuantized`).
- q4f16 (`*_q4f16.onnx`): q4, then every remaining float tensor in fp16 (onnxruntime's float16
  converter), graph inputs and outputs kept fp32 so the same caller code runs it.

Memory: the 4-bit quantizer reads each weight when it gets to it, so the fp32 graph is opened with its
external data left on disk: the peak is the quantized graph plus a few copies of one weight.
The 8-bit quantizer loads the whole graph and makes several fp32 temporaries of each weight in numpy:
`ram_needed` says how much that is, and the export refuses a q8 that would not fit (`export.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

QUANTIZATIONS = ("q8", "q4", "q4f16")
Q4_BLOCK = 32
Q4_ACCURACY_LEVEL = 4


def quantize_file(src: Path, dst: Path, mode: str, external: bool) -> list[str]:
    """Write the `mode` variant of the fp32 graph `src` to `dst`; returns its external data file names."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # an INFO line per node otherwise
    if mode == "q8":
        model = _q8(onnx.load(str(src), load_external_data=True))
    elif mode in ("q4", "q4f16"):
        model = onnx.load(str(src), load_external_data=False)  # weights stay on disk until quantized
        with _working_dir(src.parent):  # where the quantizer's reader (onnx_ir, memory-mapped) looks for them
            model = _q4(model)
        load_external_data_for_model(model, str(src.parent))  # what stayed float (norms, biases, the conv): small
        if mode == "q4f16":
            model = _fp16(model)
    else:
        raise ValueError(f"unknown quantization {mode!r}; choose from {', '.join(QUANTIZATIONS)}")
    return save_model(model, dst, external)


def save_model(model, path: Path, external: bool) -> list[str]:
    import onnx

    path.unlink(missing_ok=True)
    if not external:
        onnx.save_model(model, str(path))
        return []
    data = f"{path.name}_data"  # the name transformers.js asks for (`use_external_data_format`)
    (path.parent / data).unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return [data]


def ram_needed(mode: str, graph_bytes: int, largest_weight_bytes: int) -> int:
    """Peak bytes quantizing one fp32 graph takes (measured with onnxruntime 1.32: q8 = the graph + ~6.5x
    its largest weight; q4 = the quantized graph + ~3x its largest weight)."""
    if mode == "q8":
        return graph_bytes + int(6.5 * largest_weight_bytes)
    return graph_bytes // 6 + 3 * largest_weight_bytes


@contextlib.contextmanager
def _working_dir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _q8(model):
    from onnxruntime.quantization import QuantizationMode, QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    has_conv = any(n.op_type == "Conv" for n in model.graph.node)
    quantizer = ONNXQuantizer(
        model, False, False, mode=QuantizationMode.IntegerOps, static=False,
        weight_qType=QuantType.QUInt8 if has_conv else QuantType.QInt8, activation_qType=QuantType.QUInt8,
        tensors_range=None, nodes_to_quantize=[], nodes_to_exclude=[],
        op_types_to_quantize=list(IntegerOpsRegistry), extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True},
    )
    quantizer.quantize_model()
    return quantizer.model.model


def _q4(model):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=Q4_BLOCK, is_symmetric=True,
                                     accuracy_level=Q4_ACCURACY_LEVEL, op_types_to_quantize=("MatMul", "Gather"),
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    return quantizer.model.model


def _fp16(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    big = sum(len(t.raw_data) for t in model.graph.initializer) > 2**31 - 2**26  # shape inference needs < 2 GB
    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=big)
