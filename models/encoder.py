"""CTC + LID acoustic model of Lugosch et al. 2022, experimental setup (docs/architecture.md, "The recipe", step 1).

80-dim log-mel → LayerNorm → Conv1d(k=7, stride 3) + GLU → N pre-LN transformer layers with a learned,
clipped relative position bias (T5/Shaw-style, so it runs on utterances far longer than seen in training)
→ final LayerNorm → CTC head over one shared vocabulary + an utterance LID head (per-frame linear, mean
over valid frames). The transformer follows slimIPL (Likhomanenko et al. 2021). Model math only: no I/O,
no configs; ``pipeline/`` maps a config onto the flat kwargs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Added to masked (padded) keys. Finite, so a row whose keys are all padding (a zero-length utterance)
# softmaxes to finite garbage instead of NaN; representable in bf16 and far below any real score.
_MASK_VALUE = -1e9


class ModelOutput(NamedTuple):
    """What one forward gives: per-frame CTC log-probs, valid frame counts, utterance LID logits."""

    log_probs: Tensor  # (B, T', V) float32
    out_lens: Tensor  # (B,) long
    lid_logits: Tensor  # (B, L) float32


def frames_after_subsampling(n_frames: int | Tensor, kernel: int = 7, stride: int = 3) -> int | Tensor:
    """Number of encoder frames the conv front end makes from ``n_frames`` fbank frames."""
    # The one place this formula lives: data filters (CTC needs out frames >= target length) import it.
    pad = kernel // 2
    out = (n_frames + 2 * pad - kernel) // stride + 1
    if isinstance(out, Tensor):
        return out.clamp(min=0)
    return max(0, out)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (works for models built on the ``meta`` device)."""
    return sum(p.numel() for p in model.parameters())


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention with a learned per-head bias over the clipped distance j − i."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, max_relative_distance: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.max_relative_distance = max_relative_distance
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        # Only its .p is used (passed to SDPA), so set_dropout reaches attention dropout too.
        self.attn_dropout = nn.Dropout(dropout)
        # Zero init: the model starts position-agnostic and learns what distance matters.
        self.rel_bias = nn.Parameter(torch.zeros(n_heads, 2 * max_relative_distance + 1))

    def forward(self, x: Tensor, key_pad_bias: Tensor, rel_index: Tensor) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        # Same table for any T: distances beyond K share one value, so long audio sees no unseen position.
        bias = self.rel_bias[:, rel_index]  # (H, T, T)
        mask = (bias.unsqueeze(0) + key_pad_bias).to(q.dtype)  # (B, H, T, T); SDPA wants the query dtype
        p = self.attn_dropout.p if self.training else 0.0
        # A mask that needs a gradient (the learned bias) sends CPU training to SDPA's math backend;
        # under no_grad (labeling) the fused flash kernel runs.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class TransformerLayer(nn.Module):
    """Pre-LN transformer layer: x + drop(attn(ln(x))), then x + drop(ffn(ln(x)))."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float, max_relative_distance: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = RelativeSelfAttention(d_model, n_heads, dropout, max_relative_distance)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
        )
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_pad_bias: Tensor, rel_index: Tensor) -> Tensor:
        x = x + self.residual_dropout(self.attn(self.attn_norm(x), key_pad_bias, rel_index))  # (B, T, C)
        return x + self.residual_dropout(self.ffn(self.ffn_norm(x)))  # (B, T, C)


class CTCLIDModel(nn.Module):
    """Conv + GLU front end, relative-position transformer, CTC head and utterance LID head."""

    def __init__(
        self,
        *,
        vocab_size: int,
        num_languages: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        ffn_dim: int,
        n_mels: int = 80,
        conv_kernel: int = 7,
        conv_stride: int = 3,
        dropout: float = 0.1,
        layerdrop: float = 0.0,
        max_relative_distance: int = 64,  # K: distances clipped to [-K, K], 64 frames ≈ 1.9 s after stride 3
    ):
        super().__init__()
        self.conv_kernel = conv_kernel
        self.conv_stride = conv_stride
        self.max_relative_distance = max_relative_distance
        self.layerdrop = layerdrop
        self.feat_norm = nn.LayerNorm(n_mels)
        # 2·d channels so GLU halves them back to d.
        self.conv = nn.Conv1d(n_mels, 2 * d_model, conv_kernel, stride=conv_stride, padding=conv_kernel // 2)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d_model, n_heads, ffn_dim, dropout, max_relative_distance)
            for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model)
        self.ctc_head = nn.Linear(d_model, vocab_size)
        self.lid_head = nn.Linear(d_model, num_languages)

    def set_dropout(self, p: float) -> None:
        """Set every dropout (input, attention, FFN, residual) to ``p``; slimIPL lowers it for PL training."""
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p

    def set_layerdrop(self, p: float) -> None:
        """Set the probability of skipping each transformer layer in training mode."""
        self.layerdrop = p

    def forward(self, feats: Tensor, feat_lens: Tensor) -> ModelOutput:
        """Encode padded fbank features ``(B, T, n_mels)`` with true lengths ``(B,)``."""
        out_lens = frames_after_subsampling(feat_lens, self.conv_kernel, self.conv_stride)  # (B,)
        x = self._front_end(feats, feat_lens)  # (B, T', C)
        valid = torch.arange(x.shape[1], device=x.device) < out_lens[:, None]  # (B, T')
        key_pad_bias = torch.zeros(valid.shape, device=x.device).masked_fill(~valid, _MASK_VALUE)
        key_pad_bias = key_pad_bias[:, None, None, :]  # (B, 1, 1, T'): broadcasts over heads and queries
        rel_index = self._relative_index(x.shape[1], x.device)  # (T', T')
        for layer in self.layers:
            # Layerdrop skips a whole layer for the whole batch; never in eval, so labeling is deterministic.
            if self.training and self.layerdrop > 0 and torch.rand(()).item() < self.layerdrop:
                continue
            x = layer(x, key_pad_bias, rel_index)  # (B, T', C)
        x = self.final_norm(x)  # (B, T', C)
        log_probs = self.ctc_head(x).float().log_softmax(dim=-1)  # (B, T', V)
        frame_lid = self.lid_head(x).float()  # (B, T', L)
        # Mean over valid frames only, so padding in a batch never changes an utterance's LID.
        weights = valid.float() / out_lens.clamp(min=1)[:, None].float()  # (B, T')
        lid_logits = (frame_lid * weights[..., None]).sum(dim=1)  # (B, L); not einsum: autocast makes it bf16
        return ModelOutput(log_probs, out_lens, lid_logits)

    def _front_end(self, feats: Tensor, feat_lens: Tensor) -> Tensor:
        x = self.feat_norm(feats)  # (B, T, n_mels)
        # Zero frames past each length, as the conv's own zero padding would: the last valid output frames
        # then match an unpadded forward whatever the batch padding holds.
        frame_valid = torch.arange(x.shape[1], device=x.device) < feat_lens[:, None]  # (B, T)
        x = x * frame_valid[..., None].to(x.dtype)
        x = F.glu(self.conv(x.transpose(1, 2)), dim=1)  # (B, C, T')
        return self.input_dropout(x.transpose(1, 2))  # (B, T', C)

    def _relative_index(self, n: int, device: torch.device) -> Tensor:
        pos = torch.arange(n, device=device)
        k = self.max_relative_distance
        return (pos[None, :] - pos[:, None]).clamp(-k, k) + k  # (T', T'): index of clip(j − i) in the table
