"""ONNX model files: a model proto written atomically with its metadata, its int8 twin made by ONNX Runtime's own
dynamic quantization, and the metadata read back."""

from __future__ import annotations

import logging
import os
import tempfile

import onnx

from storage.files import atomic_write_bytes, read_bytes


def save_onnx_model(url: str, model: onnx.ModelProto, metadata: dict[str, str]) -> int:
    """Write `model` with `metadata` as its metadata_props (replacing keys of the same name); returns its bytes."""
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in keep}, **metadata})
    data = model.SerializeToString()
    atomic_write_bytes(url, data)
    return len(data)


def quantize_int8(src_url: str, dst_url: str) -> int:
    """ONNX Runtime's dynamic quantization of `src_url` (int8 weights of MatMul/Gemm, activations quantized per
    batch at run time), written to `dst_url` with the source's metadata; returns its bytes."""
    quantized = onnx.load_from_string(int8_bytes(read_bytes(src_url)))
    return save_onnx_model(dst_url, quantized, onnx_metadata(src_url))


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


def onnx_metadata(url: str) -> dict[str, str]:
    """An ONNX model file's metadata_props."""
    return {p.key: p.value for p in onnx.load_from_string(read_bytes(url)).metadata_props}

