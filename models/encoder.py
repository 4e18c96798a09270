"""CTC + LID acoustic model of Lugosch et al. 2022, experimental setup (docs/architecture.md, "The recipe", step 1).

80-dim log-mel → LayerNorm → Conv1d(k=7, stride 3) + GLU → N pre-LN transformer layers with a learned,
clipped relative position bias (T5/Shaw-style, so it runs on utterances far longer than seen in training)
→ final LayerNorm → CTC head over one shared vocabulary + an utterance LID head (per-frame linear, mean
over valid frames). The transformer follows slimIPL (Likhomanenko et al. 2021). Model math only: no I/O,
no configs; ``pipeline/`` maps a config onto the flat kwargs.

Options from Li et al. 2021 (capacity of one multilingual model): Conformer layers (Gulati et al. 2020) in
place of the transformer's, with the same relative-position attention; a learned language embedding added to
the encoder input (one row per language plus "unknown"); activation checkpointing for the large presets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from models.prune import UNION, apply_masks_, num_pathways, set_pathway_
from models.quant import encoder_linears, fake_quantize_model_

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
        self._bias_cache: tuple[tuple, Tensor] | None = None  # inference only: the largest (H, n, n) built so far
        # Set only while exporting for ONNX Runtime (models.export.fused_attention): the traced graph's attention.
        self.export_attention: Callable[[RelativeSelfAttention, Tensor, Tensor, Tensor], Tensor] | None = None

    def forward(self, x: Tensor, key_pad_bias: Tensor, rel_index: Tensor, lens: Tensor | None = None) -> Tensor:
        if self.export_attention is not None and lens is not None and tracing():
            return self.export_attention(self, x, rel_index, lens)  # (B, T, C)
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        if lens is not None and not torch.is_grad_enabled() and not tracing():
            y = self._inference_attention(q, k, v, lens)  # (B, H, T, D)
        else:
            # Same table for any T: distances beyond K share one value, so long audio sees no unseen position.
            bias = self.rel_bias[:, rel_index]  # (H, T, T)
            mask = (bias.unsqueeze(0) + key_pad_bias).to(q.dtype)  # (B, H, T, T); SDPA wants the query dtype
            p = self.attn_dropout.p if self.training else 0.0
            # A mask that needs a gradient (the learned bias) sends CPU training to SDPA's math backend.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def relative_bias(self, n: int, dtype: torch.dtype) -> Tensor:
        """The (H, n, n) bias table[clip(j − i)] built as a Toeplitz matrix (a flipped sliding window over a
        2n − 1 long row), several times cheaper than gathering n² indices."""
        k = self.max_relative_distance
        distances = torch.arange(2 * n - 1, device=self.rel_bias.device) - (n - 1)  # j − i for row n − 1
        row = self.rel_bias[:, distances.clamp(-k, k) + k].to(dtype)  # (H, 2n − 1)
        return row.unfold(-1, n, 1).flip(-2)  # (H, n, n): [i, j] = row[n − 1 − i + j]

    def _cached_bias(self, n: int, dtype: torch.dtype) -> Tensor:
        """`relative_bias(n)` from a cache: the top-left n × n of a larger Toeplitz matrix is the smaller one, so
        one table serves every shorter batch. Rebuilt when the weights change; tables over 32 MB are not kept."""
        key = (self.rel_bias._version, self.rel_bias.data_ptr(), dtype, self.rel_bias.device)
        if self._bias_cache is not None and self._bias_cache[0] == key and self._bias_cache[1].shape[-1] >= n:
            return self._bias_cache[1][:, :n, :n]
        # Built with headroom, so length-sorted batches that grow a little reuse it instead of rebuilding.
        roomy = -(-n * 3 // 2 // 128) * 128
        if self.rel_bias.shape[0] * roomy * roomy * torch.finfo(dtype).bits // 8 <= 32 << 20:
            self._bias_cache = (key, self.relative_bias(roomy, dtype))
            return self._bias_cache[1][:, :n, :n]
        return self.relative_bias(n, dtype)

    def _inference_attention(self, q: Tensor, k: Tensor, v: Tensor, lens: Tensor) -> Tensor:
        """Attention without a gradient: each utterance over its own valid frames, so no (B, H, T, T) mask is
        built and padded keys need no masking; padded query rows come out as zeros (never read)."""
        B, H, T, D = q.shape
        bias = self._cached_bias(T, q.dtype)  # (H, T, T)
        if bool((lens == T).all()):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        y = torch.zeros_like(q)
        for b, n in enumerate(lens.tolist()):
            if n > 0:
                m = bias[:, :n, :n].unsqueeze(0)  # (1, H, n, n)
                y[b : b + 1, :, :n] = F.scaled_dot_product_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n],
                                                                     v[b : b + 1, :, :n], attn_mask=m)
        return y


def tracing() -> bool:
    """True while torch.export or the ONNX exporter traces the model: the inference attention's per-utterance loop
    and cached tables depend on the data, so a traced graph takes the masked path that any batch shape runs."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def _valid_frames(x: Tensor, lens: Tensor | None) -> Tensor | None:
    """(B, T) True on each utterance's valid frames; None when lengths are unknown (all valid)."""
    return None if lens is None else torch.arange(x.shape[1], device=x.device) < lens[:, None]


def _feed_forward(d_model: int, ffn_dim: int, dropout: float, activation: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, ffn_dim), activation(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model))


class TransformerLayer(nn.Module):
    """Pre-LN transformer layer: x + drop(attn(ln(x))), then x + drop(ffn(ln(x)))."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float, max_relative_distance: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = RelativeSelfAttention(d_model, n_heads, dropout, max_relative_distance)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = _feed_forward(d_model, ffn_dim, dropout, nn.GELU)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_pad_bias: Tensor, rel_index: Tensor, lens: Tensor | None = None) -> Tensor:
        x = x + self.residual_dropout(self.attn(self.attn_norm(x), key_pad_bias, rel_index, lens))  # (B, T, C)
        return x + self.residual_dropout(self.ffn(self.ffn_norm(x)))  # (B, T, C)

    def matmul_flops(self, t: int) -> int:
        """FLOPs of this layer's matmuls over `t` frames: q/k/v/out projections, Q·Kᵀ and A·V, the FFN."""
        d, ffn = self.ffn[0].in_features, self.ffn[0].out_features
        return 2 * t * d * 4 * d + 2 * 2 * t * t * d + 2 * 2 * t * d * ffn


class ConvModule(nn.Module):
    """Conformer convolution module: pointwise conv + GLU, depthwise conv, norm, SiLU, pointwise conv.

    LayerNorm where Gulati et al. use BatchNorm: an utterance's output must not depend on the batch it is labeled
    in or on its padding. Frames past each length are zeroed before the depthwise conv, as its own zero padding
    would, so the valid frames match an unpadded forward.
    """

    def __init__(self, d_model: int, kernel: int, dropout: float):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"conformer_conv_kernel={kernel} must be odd (a centred depthwise convolution)")
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor | None) -> Tensor:
        x = F.glu(self.pointwise_in(x), dim=-1)  # (B, T, C)
        if valid is not None:
            x = x * valid[..., None].to(x.dtype)
        x = self.depthwise(x.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return self.dropout(self.pointwise_out(F.silu(self.norm(x))))  # (B, T, C)


class ConformerLayer(nn.Module):
    """Conformer layer (Gulati et al. 2020): ½ FFN, relative-position self-attention, convolution module, ½ FFN,
    each pre-LN with a residual, then a final LayerNorm. Same call signature as `TransformerLayer`."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float, max_relative_distance: int,
                 conv_kernel: int):
        super().__init__()
        self.ffn1_norm = nn.LayerNorm(d_model)
        self.ffn1 = _feed_forward(d_model, ffn_dim, dropout, nn.SiLU)
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = RelativeSelfAttention(d_model, n_heads, dropout, max_relative_distance)
        self.conv_norm = nn.LayerNorm(d_model)
        self.conv = ConvModule(d_model, conv_kernel, dropout)
        self.ffn2_norm = nn.LayerNorm(d_model)
        self.ffn2 = _feed_forward(d_model, ffn_dim, dropout, nn.SiLU)
        self.final_norm = nn.LayerNorm(d_model)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_pad_bias: Tensor, rel_index: Tensor, lens: Tensor | None = None) -> Tensor:
        drop = self.residual_dropout
        x = x + 0.5 * drop(self.ffn1(self.ffn1_norm(x)))  # (B, T, C)
        x = x + drop(self.attn(self.attn_norm(x), key_pad_bias, rel_index, lens))
        x = x + drop(self.conv(self.conv_norm(x), _valid_frames(x, lens)))
        x = x + 0.5 * drop(self.ffn2(self.ffn2_norm(x)))
        return self.final_norm(x)  # (B, T, C)

    def matmul_flops(self, t: int) -> int:
        """FLOPs of this layer's matmuls and convolutions over `t` frames."""
        d, ffn = self.ffn1[0].in_features, self.ffn1[0].out_features
        attn = 2 * t * d * 4 * d + 2 * 2 * t * t * d
        conv = 2 * t * d * 2 * d + 2 * t * d * self.conv.depthwise.kernel_size[0] + 2 * t * d * d
        return attn + conv + 2 * 2 * 2 * t * d * ffn


def _take(rows: Tensor, feats: Tensor, feat_lens: Tensor, lang_ids: Tensor | None) -> tuple:
    """The utterances `rows` of a batch, cut to their own longest length."""
    rows_at = rows.to(feats.device)
    lens = feat_lens[rows_at]
    return feats[rows_at, : int(lens.max())], lens, None if lang_ids is None else lang_ids[rows.to(lang_ids.device)]


def _scatter(parts: list[tuple[Tensor, ModelOutput]], batch: int, unknown: Tensor,
             lid_of_unknown: Tensor | None) -> ModelOutput:
    """One batch's output from its languages' forwards (frames past an utterance's length are zero); an unknown
    utterance keeps the LID logits that chose its pathway."""
    first = parts[0][1]
    t_max = max(out.log_probs.shape[1] for _, out in parts)
    log_probs = first.log_probs.new_zeros(batch, t_max, first.log_probs.shape[2])
    out_lens = first.out_lens.new_zeros(batch)
    lid = first.lid_logits.new_zeros(batch, first.lid_logits.shape[1])
    for rows, out in parts:
        rows = rows.to(log_probs.device)
        log_probs[rows, : out.log_probs.shape[1]] = out.log_probs
        out_lens[rows] = out.out_lens
        lid[rows] = out.lid_logits
    if lid_of_unknown is not None:
        lid[unknown.nonzero().squeeze(1).to(lid.device)] = lid_of_unknown
    return ModelOutput(log_probs, out_lens, lid)


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
        encoder: str = "transformer",  # or "conformer"
        conformer_conv_kernel: int = 15,  # depthwise kernel in encoder frames (30 ms each: ≈ 0.45 s)
        language_conditioning: bool = False,
        language_unknown_prob: float = 0.1,  # training only: how often the language is hidden, so "unknown" is learned
        activation_checkpointing: bool = False,
        weight_bits: int | None = None,  # quantization-aware training: encoder linear weights fake-quantized
        weight_block: int = 64,  # their sub-channel block (input weights per scale)
        pathways: int = 0,  # pruned: masks per encoder linear weight (1: language-agnostic, L: one per language)
    ):
        super().__init__()
        if encoder not in ("transformer", "conformer"):
            raise ValueError(f"encoder={encoder!r} is not one of transformer, conformer")
        self.conv_kernel = conv_kernel
        self.conv_stride = conv_stride
        self.max_relative_distance = max_relative_distance
        self.layerdrop = layerdrop
        self.feat_norm = nn.LayerNorm(n_mels)
        # 2·d channels so GLU halves them back to d.
        self.conv = nn.Conv1d(n_mels, 2 * d_model, conv_kernel, stride=conv_stride, padding=conv_kernel // 2)
        self.input_dropout = nn.Dropout(dropout)
        self.language_unknown_prob = language_unknown_prob
        self.activation_checkpointing = activation_checkpointing
        if encoder == "conformer":
            self.layers = nn.ModuleList(
                ConformerLayer(d_model, n_heads, ffn_dim, dropout, max_relative_distance, conformer_conv_kernel)
                for _ in range(n_layers)
            )
        else:
            self.layers = nn.ModuleList(
                TransformerLayer(d_model, n_heads, ffn_dim, dropout, max_relative_distance) for _ in range(n_layers)
            )
        self.final_norm = nn.LayerNorm(d_model)
        self.ctc_head = nn.Linear(d_model, vocab_size)
        self.lid_head = nn.Linear(d_model, num_languages)
        # One row per language and a last one for "unknown". Zero init: the model starts as the unconditioned one
        # (built last, so that the other weights draw the same random numbers as without it).
        self.language_embedding = nn.Embedding(num_languages + 1, d_model) if language_conditioning else None
        if self.language_embedding is not None:
            nn.init.zeros_(self.language_embedding.weight)
        if weight_bits is not None and pathways:
            raise ValueError("a model is either quantized (weight_bits) or pruned (pathways), not both")
        if weight_bits is not None:
            fake_quantize_model_(self, weight_bits, weight_block)
        if pathways:  # all-ones masks: the real ones come with the checkpoint (or from the prune stage)
            apply_masks_(self, {name: torch.ones(pathways, *m.weight.shape, dtype=torch.bool)
                                for name, m in encoder_linears(self).items()})

    def matmul_flops(self, n_frames: int) -> int:
        """FLOPs (2 per multiply-add) of the convolution and every matmul in one forward of one utterance of
        `n_frames` fbank frames, attention included; elementwise work (norms, softmax, GELU) is not counted."""
        t = int(frames_after_subsampling(n_frames, self.conv_kernel, self.conv_stride))
        d = self.ctc_head.in_features
        conv = 2 * t * self.conv.in_channels * self.conv_kernel * self.conv.out_channels
        layers = sum(layer.matmul_flops(t) for layer in self.layers)
        heads = 2 * t * d * (self.ctc_head.out_features + self.lid_head.out_features)
        return conv + layers + heads

    def set_dropout(self, p: float) -> None:
        """Set every dropout (input, attention, FFN, residual) to ``p``; slimIPL lowers it for PL training."""
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p

    def set_layerdrop(self, p: float) -> None:
        """Set the probability of skipping each transformer layer in training mode."""
        self.layerdrop = p

    def forward(self, feats: Tensor, feat_lens: Tensor, lang_ids: Tensor | None = None) -> ModelOutput:
        """Encode padded fbank features ``(B, T, n_mels)`` with true lengths ``(B,)``; ``lang_ids`` (B,) are the
        utterances' language indices (−1 or None: unknown), read by a language-conditioned model and by one with
        language pathways (each utterance computes with its language's mask)."""
        if num_pathways(self) > 1:
            return self._forward_by_pathway(feats, feat_lens, lang_ids)
        return self._forward(feats, feat_lens, lang_ids)

    def _forward_by_pathway(self, feats: Tensor, feat_lens: Tensor, lang_ids: Tensor | None) -> ModelOutput:
        """One forward per language of the batch, each with its pathway; an utterance of unknown language first
        goes through every pathway's weights together (`UNION`) and then takes the pathway its LID head picks."""
        batch, n_paths = feats.shape[0], num_pathways(self)
        ids = torch.full((batch,), -1, dtype=torch.long) if lang_ids is None else lang_ids.detach().cpu().long()
        unknown = (ids < 0) | (ids >= n_paths)
        lid_of_unknown = None
        if unknown.any():
            rows = unknown.nonzero().squeeze(1)
            set_pathway_(self, UNION)
            lid_of_unknown = self._forward(*_take(rows, feats, feat_lens, lang_ids)).lid_logits
            ids[rows] = lid_of_unknown.argmax(dim=-1).cpu()
        parts = []
        for path in ids.unique().tolist():
            rows = (ids == path).nonzero().squeeze(1)
            set_pathway_(self, path)
            whole = len(rows) == batch  # a one-language batch (pathway training): no copies
            parts.append((rows, self._forward(feats, feat_lens, lang_ids) if whole
                          else self._forward(*_take(rows, feats, feat_lens, lang_ids))))
        if len(parts) == 1 and lid_of_unknown is None:
            return parts[0][1]
        return _scatter(parts, batch, unknown, lid_of_unknown)

    def _forward(self, feats: Tensor, feat_lens: Tensor, lang_ids: Tensor | None = None) -> ModelOutput:
        out_lens = frames_after_subsampling(feat_lens, self.conv_kernel, self.conv_stride)  # (B,)
        x = self._front_end(feats, feat_lens)  # (B, T', C)
        if self.language_embedding is not None:
            x = x + self.language_embedding(self._language_rows(lang_ids, x.shape[0], x.device))[:, None, :]
        valid = _valid_frames(x, out_lens)  # (B, T')
        key_pad_bias = torch.zeros(valid.shape, device=x.device).masked_fill(~valid, _MASK_VALUE)
        key_pad_bias = key_pad_bias[:, None, None, :]  # (B, 1, 1, T'): broadcasts over heads and queries
        # Without gradients attention builds its bias as a Toeplitz table instead (see _inference_attention).
        masked = torch.is_grad_enabled() or tracing()  # the (B, H, T, T) mask path: training, and a traced graph
        rel_index = self._relative_index(x.shape[1], x.device) if masked else None  # (T', T')
        for layer in self.layers:
            # Layerdrop skips a whole layer for the whole batch; never in eval, so labeling is deterministic.
            if self.training and self.layerdrop > 0 and torch.rand(()).item() < self.layerdrop:
                continue
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Recompute the layer's activations in backward instead of keeping them: what lets the large
                # presets train on one GPU, at about a third more compute.
                x = torch.utils.checkpoint.checkpoint(layer, x, key_pad_bias, rel_index, out_lens, use_reentrant=False)
            else:
                x = layer(x, key_pad_bias, rel_index, out_lens)  # (B, T', C)
        x = self.final_norm(x)  # (B, T', C)
        log_probs = self.ctc_head(x).float().log_softmax(dim=-1)  # (B, T', V)
        frame_lid = self.lid_head(x).float()  # (B, T', L)
        # Mean over valid frames only, so padding in a batch never changes an utterance's LID.
        weights = valid.float() / out_lens.clamp(min=1)[:, None].float()  # (B, T')
        lid_logits = (frame_lid * weights[..., None]).sum(dim=1)  # (B, L); not einsum: autocast makes it bf16
        return ModelOutput(log_probs, out_lens, lid_logits)

    def _language_rows(self, lang_ids: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """Embedding rows (B,): each known language's own, "unknown" for −1, out-of-range ids or None; in training,
        each utterance's language is hidden with probability `language_unknown_prob`."""
        unknown = self.language_embedding.num_embeddings - 1
        if lang_ids is None:
            return torch.full((batch,), unknown, dtype=torch.long, device=device)
        lang_ids = lang_ids.to(device)
        rows = torch.where((lang_ids >= 0) & (lang_ids < unknown), lang_ids, unknown)
        if self.training and self.language_unknown_prob > 0:
            hide = torch.rand(batch, device=device) < self.language_unknown_prob
            rows = rows.masked_fill(hide, unknown)
        return rows

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
