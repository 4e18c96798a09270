"""The model as an exported graph sees it: padded log-mel features and their lengths in, CTC log-probs, output
lengths and LID logits out (the layout of sherpa-onnx's offline CTC models: outputs by position, log-probs first,
then lengths).

Features are normalized inside the graph, per utterance and mel bin over its valid frames, as
`pipeline.data.audio.log_mel` does: features already normalized that way pass through unchanged (to ~1e-6), and a
front end that does not normalize (sherpa-onnx's Kaldi fbank, padded with log(ε)) reaches the model as the mlpl
front end would hand it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.encoder import CTCLIDModel, RelativeSelfAttention


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


class _MultiHeadAttention(torch.autograd.Function):
    """Self-attention with the projection bias, an additive (H, T, T) bias and key lengths, exported as ONNX
    Runtime's fused `com.microsoft::MultiHeadAttention`; `forward` computes the same in torch (what tracing runs)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, proj_bias: Tensor, attention_bias: Tensor, lens: Tensor,
                n_heads: int) -> Tensor:
        B, T, C = q.shape
        q, k, v = (t + b for t, b in zip((q, k, v), proj_bias.chunk(3), strict=True))
        padded = (torch.arange(T, device=q.device)[None, :] >= lens[:, None])[:, None, None, :]  # (B, 1, 1, T)
        mask = attention_bias.unsqueeze(0).masked_fill(padded, torch.finfo(q.dtype).min)  # (B, H, T, T)
        heads = [t.view(B, T, n_heads, C // n_heads).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*heads, attn_mask=mask).transpose(1, 2).reshape(B, T, C)

    @staticmethod
    def symbolic(g, q, k, v, proj_bias, attention_bias, lens, n_heads: int):
        key_lens = g.op("Cast", lens, to_i=6)  # int32 (B,): each utterance's valid keys
        bias = g.op("Unsqueeze", attention_bias, g.op("Constant", value_t=torch.tensor([0])))  # (1, H, T, T)
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, proj_bias, key_lens, bias, num_heads_i=n_heads)
        out.setType(q.type())  # (B, T, C) like the query: the exporter cannot infer a contrib op's shape
        return out


def fused_attention(attn: RelativeSelfAttention, x: Tensor, rel_index: Tensor, lens: Tensor) -> Tensor:
    """`attn(x)` with its attention as one `_MultiHeadAttention` (the projection's bias folded into it)."""
    width = attn.proj.out_features
    q, k, v = F.linear(x, attn.qkv.weight).split(width, dim=-1)  # qkv's columns are (3, H, D): q, k, v in turn
    y = _MultiHeadAttention.apply(q, k, v, attn.qkv.bias, attn.rel_bias[:, rel_index], lens, attn.n_heads)
    return attn.proj(y)


@contextmanager
def onnx_runtime_attention(model: nn.Module, attention: Callable[..., Tensor] = fused_attention) -> Iterator[None]:
    """While exporting inside it, every attention of `model` traces as `attention` (ONNX Runtime's fused op) rather
    than the standard ops' (B, H, T, T) masked path: a graph only ONNX Runtime (and sherpa-onnx, built on it) runs."""
    attentions = [m for m in model.modules() if isinstance(m, RelativeSelfAttention)]
    for m in attentions:
        m.export_attention = attention
    try:
        yield
    finally:
        for m in attentions:
            m.export_attention = None
