"""ONNX model files: a model proto written atomically with its metadata, and the int8 twin of a serialized model
made by ONNX Runtime's own dynamic quantization."""

from __future__ import annotations

import logging
import os
import tempfile

import onnx

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
    """The int8 twin of a serialized ONNX model, by `onnxruntime.quantization.quantize_dynamic` (which works on
    files: a scratch folder holds them)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model.int8.onnx")
        with open(src, "wb") as f:
            f.write(model)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # it logs every tensor it leaves in float at INFO
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        with open(dst, "rb") as f:
            return f.read()

