"""ONNX model files: a model proto written atomically with its metadata, and the int8 twin of a serialized model
made by ONNX Runtime's own dynamic quantization."""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from storage.files import atomic_write_bytes


def save_onnx_model(url: str, model: onnx.ModelProto, metadata: dict[str, str]) -> bytes:
    """Write `model` with `metadata` as its metadata_props (replacing keys of the same name); returns what it
    wrote."""
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in keep}, **metadata})
    data = model.SerializeToString()
    atomic_write_bytes(url, data)
    return data


def int8_bytes(model: bytes) -> bytes:
    """The int8 twin of a serialized ONNX model: its MatMuls quantized by ONNX Runtime's own dynamic quantization
    (`quantize_dynamic`, which works on files: a scratch folder holds them), its Conv weights stored in int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model.int8.onnx")
        with open(src, "wb") as f:
            f.write(model)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # it logs every tensor it leaves in float at INFO
        try:
            # MatMuls only: its int8 Conv (ConvInteger) took 76 ms a batch where the fp32 Convs took 13, and made the
            # whole model 17 % slower (docs/benchmarks.md, "Taking the student out").
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        finally:
            root.setLevel(level)
        quantized = onnx.load(dst)
    return _int8_conv_weights(quantized).SerializeToString()


def _int8_conv_weights(model: onnx.ModelProto, min_size: int = 4096) -> onnx.ModelProto:
    """Conv weights of at least `min_size` values stored as int8 (symmetric, one scale per output channel) behind
    a DequantizeLinear, which ONNX Runtime folds into a float weight when it loads the model: the file shrinks by
    a Conv's float weights (3/4 of them) and the Conv runs in float. quantize_dynamic has no weight-only mode."""
    inits = {i.name: i for i in model.graph.initializer}
    dequantize = []
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is None:
            continue
        w = numpy_helper.to_array(weight)
        if w.size < min_size:
            continue
        scale = (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127).astype(np.float32)
        scale[scale == 0] = 1.0  # an all-zero channel: any scale gives zeros back
        q = np.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.int8)
        model.graph.initializer.remove(weight)
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{weight.name}_int8"),
                                        numpy_helper.from_array(scale, f"{weight.name}_scale")])
        dequantize.append(onnx.helper.make_node("DequantizeLinear", [f"{weight.name}_int8", f"{weight.name}_scale"],
                                                [weight.name], axis=0, name=f"{weight.name}_DequantizeLinear"))
    for node in reversed(dequantize):  # before every node: the graph stays topologically sorted
        model.graph.node.insert(0, node)
    return model
