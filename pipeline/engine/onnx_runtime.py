"""The ONNX Runtime labeling engine: a checkpoint exported in memory (`onnx_export.to_onnx`, fp32 or its int8
twin) behind the torch model's interface, so the one decode path (`decode_batch`: padding, crops, greedy or
LM-fused beam search) runs it unchanged."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from models.encoder import ModelOutput
from pipeline.engine.model import Trained, load_trained
from pipeline.engine.onnx_export import to_onnx
from storage.files import join, read_text
from storage.onnx_model import int8_bytes

Precision = Literal["fp32", "int8"]


class OnnxRuntimeCTC(nn.Module):
    """A `CTCLIDModel` stand-in: `forward(feats, feat_lens, lang_ids)` runs the exported graph on the CPU."""

    def __init__(self, model: bytes, *, language_input: bool, conv_kernel: int, conv_stride: int,
                 threads: int | None = None):
        super().__init__()
        self.conv_kernel, self.conv_stride = conv_kernel, conv_stride  # what crop-and-stitch reads
        # decode_batch finds the device from the parameters: this one says "cpu" and holds nothing.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.language_input = language_input

    def forward(self, feats: Tensor, feat_lens: Tensor, lang_ids: Tensor | None = None) -> ModelOutput:
        """Log-probs, output lengths and LID logits of a padded batch, as the torch model returns them."""
        inputs = {"feats": feats.detach().float().cpu().numpy(), "lens": feat_lens.cpu().numpy().astype(np.int64)}
        if self.language_input:
            ids = lang_ids if lang_ids is not None else torch.full((feats.shape[0],), -1)
            inputs["lang_ids"] = ids.cpu().numpy().astype(np.int64)
        log_probs, out_lens, lid = self.session.run(None, inputs)
        return ModelOutput(torch.from_numpy(log_probs), torch.from_numpy(out_lens), torch.from_numpy(lid))


def onnx_runtime_teacher(url: str, precision: Precision = "fp32", threads: int | None = None) -> Trained:
    """A checkpoint as the ONNX Runtime engine runs it (exported in memory, int8 by dynamic quantization): the same
    `Trained` record with its model replaced."""
    trained = load_trained(url)
    # mlpl's decode path hands over normalized features, and crop-and-stitch crops of them that a second
    # normalization would change: the engine's graph takes them as they are. Its attention is ONNX Runtime's fused
    # op, 10 % faster than the standard ops' masked path (docs/benchmarks.md, "Labeling engines").
    model = to_onnx(trained, normalize_features=False, fused_attention=True).SerializeToString()
    if precision == "int8":
        model = int8_bytes(model)
    torch_model = trained.model
    engine = OnnxRuntimeCTC(model, language_input=torch_model.language_embedding is not None,
                            conv_kernel=torch_model.conv_kernel, conv_stride=torch_model.conv_stride, threads=threads)
    return replace(trained, model=engine.eval())


def sherpa_recognizer(model_dir: str, model_file: str = "model.onnx", threads: int = 1):
    """A sherpa-onnx offline recognizer over an exported folder: its `zipformer_ctc` model type (padded features and
    lengths in, log-probs first out), greedy search, and its own Kaldi fbank set to the export's band (0-8 kHz,
    no edge padding: `snip_edges`); the rest of its front end (povey window, pre-emphasis, 512-point FFT) is its own."""
    import sherpa_onnx

    meta = json.loads(read_text(join(model_dir, "metadata.json")))
    features = meta["features"]
    cfg = sherpa_onnx.OfflineRecognizerConfig(
        feat_config=sherpa_onnx.FeatureExtractorConfig(sampling_rate=features["sample_rate_hz"],
                                                       feature_dim=features["n_mels"]),
        model_config=sherpa_onnx.OfflineModelConfig(
            zipformer_ctc=sherpa_onnx.OfflineZipformerCtcModelConfig(model=join(model_dir, model_file)),
            tokens=join(model_dir, "tokens.txt"), num_threads=threads))
    cfg.feat_config.low_freq, cfg.feat_config.high_freq = 0.0, features["sample_rate_hz"] / 2
    cfg.feat_config.snip_edges = True
    # Its public class builds configs only through per-model-type constructors that do not expose the band.
    return sherpa_onnx.lib._sherpa_onnx.OfflineRecognizer(cfg)
