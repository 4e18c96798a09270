"""Take the student out: any finished checkpoint → a folder that ONNX Runtime and sherpa-onnx load.

`<out>/model.onnx` (dynamic batch and time axes; `feats` (B, T, n_mels) float32 and `lens` (B,) int64 in, plus
`lang_ids` (B,) int64 for a language-conditioned model; `log_probs` (B, T', V), `out_lens` (B,) int64 and
`lid_logits` (B, L) out), its int8 twin `model.int8.onnx` (ONNX Runtime's dynamic quantization), `tokens.txt`
(sherpa-onnx's symbol table: `<blk>` is the CTC blank, `▁` a space) and `metadata.json` with what a consumer needs
(feature settings, subsampling, blank id, languages), also stored in each model's metadata_props. Exported with
`torch.onnx.export`, quantized with `onnxruntime.quantization`; nothing here writes ONNX by hand.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from contextlib import nullcontext
from typing import Any

import onnx
import torch

from models.export import ExportedCTC, onnx_runtime_attention
from pipeline.engine.model import Trained, load_trained
from storage.files import atomic_write_text, join, write_json
from storage.onnx_model import int8_bytes, save_onnx_model

OPSET = 18


class ExportError(ValueError):
    """A model that does not export: the message names the operator ONNX lacks."""


def token_symbols(trained: Trained) -> list[str]:
    """The model's output symbols by id as sherpa-onnx reads them: `<blk>` for the blank, `▁` for a space."""
    symbols = list(trained.tokenizer.symbols)
    symbols[trained.tokenizer.blank_id] = "<blk>"
    return [s.replace(" ", "▁") for s in symbols]


def export_metadata(trained: Trained, int8: bool) -> dict[str, Any]:
    """What a consumer of the exported model needs to feed it and read its outputs."""
    kwargs = trained.checkpoint["model_kwargs"]
    return {
        "model_type": "mlpl_ctc_lid", "framework": "mlpl", "blank_id": trained.tokenizer.blank_id,
        "vocab_size": trained.model.ctc_head.out_features, "languages": trained.languages,
        "language_input": trained.model.language_embedding is not None,
        "subsampling": {"conv_kernel": trained.model.conv_kernel, "conv_stride": trained.model.conv_stride},
        "features": trained.features.model_dump() | {
            "kind": "log-mel (power, Hamming window, HTK mel, no centering), log(x + 1e-6); normalized per "
                    "utterance and mel bin inside the graph"},
        "encoder": kwargs.get("encoder", "transformer"), "step": trained.step,
        "weight_bits": kwargs.get("weight_bits"), "pathways": kwargs.get("pathways"),
        "files": ["model.onnx", *(["model.int8.onnx"] if int8 else []), "tokens.txt", "metadata.json"],
    }


def _example(trained: Trained) -> tuple[tuple[torch.Tensor, ...], dict[str, dict[int, str]]]:
    """A padded example batch (two lengths, so no axis is traced as a constant) and its dynamic axes."""
    n_mels = trained.features.n_mels
    inputs = [torch.randn(2, 320, n_mels), torch.tensor([320, 200], dtype=torch.int64)]
    axes = {"feats": {0: "batch", 1: "time"}, "lens": {0: "batch"}}
    if trained.model.language_embedding is not None:
        inputs.append(torch.tensor([0, -1], dtype=torch.int64))
        axes["lang_ids"] = {0: "batch"}
    return tuple(inputs), axes


def _missing_operator(error: BaseException) -> str | None:
    """The operator an export failure names (`aten::special_zeta`), searched through the chain of causes."""
    while error is not None:
        found = re.search(r"Exporting the operator '([^']+)' to ONNX", str(error))
        if found:
            return found.group(1)
        error = error.__cause__ or error.__context__
    return None


def to_onnx(trained: Trained, normalize_features: bool = True, fused_attention: bool = False) -> onnx.ModelProto:
    """The checkpoint's model as an ONNX model (torch.onnx.export's TorchScript exporter at opset `OPSET`: its
    dynamo exporter fails on the attention's reshape under symbolic time axes in torch 2.11). `fused_attention`:
    each attention as ONNX Runtime's `com.microsoft::MultiHeadAttention` (what the labeling engine runs) instead of
    standard ops that any ONNX runtime runs.

    Raises:
        ExportError: naming the operator that has no ONNX equivalent, or the pathway model that cannot export.
    """
    if (trained.checkpoint["model_kwargs"].get("pathways") or 0) > 1:
        raise ExportError("a model with one pathway per language picks its weights per utterance at run time, which "
                          "a static graph cannot: export the language-agnostic pruned model (method=agnostic)")
    wrapper = ExportedCTC(trained.model, normalize_features).eval()
    inputs, axes = _example(trained)
    names = list(axes)
    try:
        buf = io.BytesIO()
        attention = onnx_runtime_attention(trained.model) if fused_attention else nullcontext()
        with warnings.catch_warnings(), attention:  # its deprecation notice: the dynamo exporter does not trace this
            warnings.simplefilter("ignore", DeprecationWarning)  # model yet
            torch.onnx.export(wrapper, inputs, buf, input_names=names, output_names=["log_probs", "out_lens",
                              "lid_logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        return onnx.load_from_string(buf.getvalue())
    except Exception as error:  # the exporter raises several types; the operator is what the user can act on
        op = _missing_operator(error)
        if op is None:
            raise
        raise ExportError(f"operator {op} has no ONNX export (opset {OPSET}): replace it in the model, or register "
                          "a symbolic for it (torch.onnx.register_custom_op_symbolic)") from error


def export_model(checkpoint_url: str, out_dir: str, *, int8: bool = True) -> dict[str, Any]:
    """Export a finished checkpoint (a stage's best, a student, a pruned or quantized serving checkpoint) into
    `out_dir`; returns the metadata with each file's size in bytes.

    Raises:
        ExportError: when the model has an operator ONNX lacks (named in the message).
        FileNotFoundError: when the checkpoint is missing.
    """
    trained = load_trained(checkpoint_url)
    meta = export_metadata(trained, int8)
    props = {"mlpl": json.dumps(meta, sort_keys=True)} | {k: str(v) for k, v in meta.items()
                                                          if k in ("model_type", "blank_id", "vocab_size")}
    model = save_onnx_model(join(out_dir, "model.onnx"), to_onnx(trained), props)
    sizes = {"model.onnx": len(model)}
    if int8:  # from the bytes in memory, not read back from the store
        quantized = onnx.load_from_string(int8_bytes(model))
        sizes["model.int8.onnx"] = len(save_onnx_model(join(out_dir, "model.int8.onnx"), quantized, props))
    atomic_write_text(join(out_dir, "tokens.txt"),
                      "".join(f"{s} {i}\n" for i, s in enumerate(token_symbols(trained))))
    write_json(join(out_dir, "metadata.json"), meta | {"bytes": sizes})
    return meta | {"bytes": sizes, "out_dir": out_dir}
