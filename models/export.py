"""The model as an exported graph sees it: padded log-mel features and their lengths in, CTC log-probs, output
lengths and LID logits out (the layout of sherpa-onnx's offline CTC models: outputs by position, log-probs first,
then lengths).

Features are normalized inside the graph, per utterance and mel bin over its valid frames, as
`pipeline.data.audio.log_mel` does: features already normalized that way pass through unchanged (to ~1e-6), and a
front end that does not normalize (sherpa-onnx's Kaldi fbank, padded with log(ε)) reaches the model as the mlpl
front end would hand it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.encoder import CTCLIDModel


class ExportedCTC(nn.Module):
    """`CTCLIDModel.forward` for export: (feats (B, T, n_mels), lens (B,) int64[, lang_ids (B,)]) →
    (log_probs (B, T', V), out_lens (B,) int64, lid_logits (B, L))."""

    def __init__(self, model: CTCLIDModel, normalize_features: bool = True, eps: float = 1e-5):
        super().__init__()
        self.model = model
        self.normalize_features = normalize_features  # off: the caller normalizes (the labeling engine's crops)
        self.eps = eps

    def normalize(self, feats: Tensor, lens: Tensor) -> Tensor:
        """Per-utterance, per-bin mean and (unbiased) std over each utterance's valid frames; padding becomes 0."""
        valid = (torch.arange(feats.shape[1], device=feats.device)[None, :] < lens[:, None]).unsqueeze(-1)  # (B,T,1)
        n = lens.clamp(min=1).to(feats.dtype)[:, None, None]
        x = feats.masked_fill(~valid, 0.0)
        mean = x.sum(dim=1, keepdim=True) / n
        var = ((x - mean).masked_fill(~valid, 0.0) ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        return ((x - mean) / (var.sqrt() + self.eps)).masked_fill(~valid, 0.0)

    def forward(self, feats: Tensor, lens: Tensor, lang_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probs, output lengths (int64) and LID logits of a padded batch of unnormalized or normalized
        features."""
        out = self.model(self.normalize(feats, lens) if self.normalize_features else feats, lens, lang_ids)
        return out.log_probs, out.out_lens.to(torch.int64), out.lid_logits
