"""Crop-and-stitch labeling of long audio (Lugosch et al. 2022 Sec. 5.2, "cropping warmup").

A model fresh from short labeled clips labels long out-of-domain audio as mostly blanks; cut into ≈10 s
crops, the same audio gets real labels. The crops' log-prob sequences are stitched back into one sequence as
long as the uncropped forward's, so the model can then train on the *uncropped* clip with that PL.

Crop starts are multiples of the conv stride, so crop output frame i is exactly global output frame
start // stride + i. Crops overlap, and each output frame is taken from the crop in which it is most central
(farthest from that crop's edges, where context is missing); flashlight's version has no overlap and lets
crops span utterances. `crop_and_stitch` is a drop-in for `model(feats, feat_lens)`: slimIPL's warmup and PL
generation for very long audio use the same routine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.encoder import CTCLIDModel, ModelOutput, frames_after_subsampling
from pipeline.engine.device import autocast

# Crops shorter than this many strides are almost all edge; such a value is most likely seconds, not frames.
_MIN_CROP_STRIDES = 10


def crop_spans(num_frames: int, *, crop_frames: int, overlap_frames: int, stride: int) -> list[tuple[int, int]]:
    """Evenly spread fbank spans [start, end) covering [0, num_frames), starts on the stride, neighbours overlapping.

    Raises:
        ValueError: when crops are too short for the stride or the overlap leaves them no room to advance.
    """
    if stride < 1 or crop_frames < _MIN_CROP_STRIDES * stride:
        raise ValueError(
            f"crop_frames={crop_frames} is below {_MIN_CROP_STRIDES} strides of {stride} fbank frames; crop_frames "
            "counts fbank frames (100 per second), so use e.g. 1000 for 10 s crops"
        )
    if not 0 <= overlap_frames <= crop_frames - stride:
        raise ValueError(
            f"overlap_frames={overlap_frames} must be in [0, crop_frames - stride] = [0, {crop_frames - stride}] "
            f"or crops cannot advance; use an overlap well below the crop (e.g. 200 for crop_frames=1000)"
        )
    if num_frames <= crop_frames:
        return [(0, num_frames)]
    # Work in strides. The last crop starts at the first aligned frame that lets it end at num_frames (so it is
    # at least crop_frames - stride + 1 long, never a tiny tail); the others are spread evenly before it, each
    # advancing at most max_step strides so every neighbour pair keeps overlap_frames in common.
    last = -(-(num_frames - crop_frames) // stride)
    max_step = (crop_frames - overlap_frames) // stride
    n_steps = -(-last // max_step)
    starts = [i * last // n_steps * stride for i in range(n_steps + 1)]
    return [(s, min(s + crop_frames, num_frames)) for s in starts]


def stitch_owners(spans: list[tuple[int, int]], num_out: int, *, kernel: int, stride: int) -> Tensor:
    """For each of `num_out` output frames, the index of the crop it is taken from (num_out,) long."""
    # Rule: output frame j goes to the crop covering it that maximises min(j - first, last - j), the distance to
    # the crop's nearer edge in output frames; ties go to the earlier crop. For evenly spread crops this cuts
    # each overlap at its middle.
    owner = torch.zeros(num_out, dtype=torch.long)
    best = torch.full((num_out,), -1, dtype=torch.long)
    for c, (start, end) in enumerate(spans):
        first = start // stride
        last = min(first + int(frames_after_subsampling(end - start, kernel, stride)), num_out) - 1
        j = torch.arange(first, last + 1)
        margin = torch.minimum(j - first, last - j)
        better = margin > best[first : last + 1]  # strict: an equal margin keeps the earlier crop
        owner[first : last + 1][better] = c
        best[first : last + 1][better] = margin[better]
    return owner


# Inference batches are padded in time up to a multiple of this many fbank frames (0.64 s). Exact (the model masks
# padding) and it bounds the distinct shapes: with bf16 on AMX oneDNN JIT-compiles and caches a kernel per shape,
# and unbounded shapes grew labeling's peak RSS 15 % from 1x to 4x the audio; with 64 it stays flat, no slower
# (docs/benchmarks.md, "Memory at 4x").
PAD_FRAMES_MULTIPLE = 64


def pad_time_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """`x` (B, T, F) zero-padded in time up to the next multiple of `multiple` frames."""
    extra = -x.shape[1] % max(multiple, 1)
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x


def crop_and_stitch(
    model: CTCLIDModel,
    feats: Tensor,
    feat_lens: Tensor,
    *,
    crop_frames: int,
    overlap_frames: int,
    bf16: bool = False,
    max_crops_per_forward: int = 64,
    pad_multiple: int = 1,
    lang_ids: Tensor | None = None,
) -> ModelOutput:
    """`model(feats, feat_lens)` computed on overlapping crops and stitched back: same shapes, lengths and dtypes.

    Clips no longer than `crop_frames` run whole. LID logits are the crops' LID logits weighted by the output
    frames each crop contributes. Padded output frames hold zeros (never read past out_lens).
    """
    if max_crops_per_forward < 1:
        raise ValueError(f"max_crops_per_forward={max_crops_per_forward} must be at least 1")
    kernel, stride = model.conv_kernel, model.conv_stride
    device = feats.device
    out_lens = frames_after_subsampling(feat_lens, kernel, stride)  # (B,)
    spans = [
        crop_spans(n, crop_frames=crop_frames, overlap_frames=overlap_frames, stride=stride) for n in feat_lens.tolist()
    ]
    crops = [(b, s, e) for b, utt_spans in enumerate(spans) for s, e in utt_spans]  # all utterances, one queue
    crop_log_probs: list[Tensor] = []  # per crop (t_c, V): its valid output frames
    crop_lid: list[Tensor] = []  # per crop (L,)
    for i in range(0, len(crops), max_crops_per_forward):
        chunk = crops[i : i + max_crops_per_forward]
        x = torch.nn.utils.rnn.pad_sequence([feats[b, s:e] for b, s, e in chunk], batch_first=True)  # (k, t, n_mels)
        x = pad_time_to_multiple(x, pad_multiple)
        x_lens = torch.tensor([e - s for _, s, e in chunk], dtype=torch.long, device=device)  # (k,)
        crop_langs = None if lang_ids is None else lang_ids[[b for b, _, _ in chunk]].to(device)  # (k,)
        with autocast(bf16, feats.device):
            out = model(x, x_lens, crop_langs)
        crop_log_probs += [lp[:n].float() for lp, n in zip(out.log_probs, out.out_lens.tolist(), strict=True)]
        crop_lid += list(out.lid_logits.float())

    B, V, L = feats.shape[0], crop_log_probs[0].shape[-1], crop_lid[0].shape[-1]
    T_out = int(frames_after_subsampling(feats.shape[1], kernel, stride))
    log_probs = torch.zeros(B, T_out, V, device=device)  # (B, T', V)
    lid_logits = torch.zeros(B, L, device=device)  # (B, L)
    first_crop = 0
    for b, utt_spans in enumerate(spans):
        n_out, n_crops = int(out_lens[b]), len(utt_spans)
        owner = stitch_owners(utt_spans, n_out, kernel=kernel, stride=stride)  # (n_out,)
        # Gather from the utterance's crops laid end to end: global frame j sits at offset[c] + j - start_c // stride.
        pieces = crop_log_probs[first_crop : first_crop + n_crops]
        sizes = torch.tensor([0] + [p.shape[0] for p in pieces[:-1]])
        offset = sizes.cumsum(0) - torch.tensor([s // stride for s, _ in utt_spans])  # (n_crops,)
        index = offset[owner] + torch.arange(n_out)  # (n_out,)
        log_probs[b, :n_out] = torch.cat(pieces)[index.to(device)]
        weights = torch.bincount(owner, minlength=n_crops).float() / max(n_out, 1)  # (n_crops,)
        lid_logits[b] = weights.to(device) @ torch.stack(crop_lid[first_crop : first_crop + n_crops])
        first_crop += n_crops
    return ModelOutput(log_probs, out_lens, lid_logits)
