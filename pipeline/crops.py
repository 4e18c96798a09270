"""Crop-and-stitch labeling of long audio (Lugosch et al. 2022 Sec. 5.2, "cropping warmup").

A model fresh from short labeled clips labels long out-of-domain audio as mostly blanks; cut into ≈10 s
crops, the same audio gets real labels. The crops' log-prob sequences are stitched back into one sequence as
long as the uncropped forward's, so the model can then train on the *uncropped* clip with that PL.

Crops overlap, and each output frame is taken from the crop in which it is most central (farthest from that
crop's edges, where context is missing); flashlight's version has no overlap and lets crops span utterances.
Crop starts are multiples of the conv stride, so crop output frame i is exactly global output frame
start/stride + i. `crop_and_stitch` is a drop-in for `model(feats, feat_lens)`: slimIPL's warmup and PL
generation for very long audio use the same routine.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.encoder import ModelOutput, frames_after_subsampling
from pipeline.modeling import autocast


def crop_spans(num_frames: int, *, crop_frames: int, overlap_frames: int, stride: int) -> list[tuple[int, int]]:
    """Evenly spread fbank spans [start, end) covering [0, num_frames): starts multiples of `stride`, each at
    most `crop_frames` long, neighbours overlapping by at least `overlap_frames`.

    Raises:
        ValueError: when the overlap leaves crops no room to advance.
    """
    if crop_frames < 4 * stride or overlap_frames >= crop_frames - stride:
        raise ValueError(
            f"crop of {crop_frames} frames with {overlap_frames} frames of overlap cannot advance (stride {stride}); "
            "use crops of at least 4 strides and an overlap well below the crop length (e.g. crop_s=10, "
            "crop_overlap_s=2)"
        )
    if num_frames <= crop_frames:
        return [(0, num_frames)]
    # Evenly spread real-valued starts, rounded down to the stride; one stride of slack in `advance` keeps
    # every overlap at least `overlap_frames` after rounding. The last crop ends exactly at the clip's end.
    advance = crop_frames - overlap_frames - stride
    span = num_frames - crop_frames
    n = 1 + math.ceil(span / advance)
    starts = [(i * span // (n - 1)) // stride * stride for i in range(n - 1)] + [-(-span // stride) * stride]
    return [(s, min(s + crop_frames, num_frames)) for s in starts]


def stitch_owners(spans: list[tuple[int, int]], num_out: int, *, kernel: int, stride: int) -> Tensor:
    """For each output frame, the index of the crop it is taken from: the crop in which it is most central.

    Ties go to the earlier crop. Shape (num_out,), long.
    """
    owner = torch.zeros(num_out, dtype=torch.long)
    best = torch.full((num_out,), -1, dtype=torch.long)
    j = torch.arange(num_out)
    for c, (start, end) in enumerate(spans):
        first = start // stride
        last = first + int(frames_after_subsampling(end - start, kernel, stride)) - 1
        inside = (j >= first) & (j <= last)
        margin = torch.minimum(j - first, last - j)
        better = inside & (margin > best)  # strict: an equal margin keeps the earlier crop
        owner[better], best[better] = c, margin[better]
    return owner


def crop_and_stitch(
    model,
    feats: Tensor,
    feat_lens: Tensor,
    *,
    crop_frames: int,
    overlap_frames: int,
    bf16: bool = False,
    max_crops_per_forward: int = 64,
) -> ModelOutput:
    """`model(feats, feat_lens)` computed crop by crop: (B, T, n_mels) padded fbank → stitched ModelOutput.

    log_probs (B, T', V) and out_lens equal the uncropped forward's shapes; LID logits are the crops' LID
    logits weighted by the output frames each crop contributes. Clips no longer than a crop run whole.
    """
    kernel, stride = model.conv_kernel, model.conv_stride
    lens = feat_lens.tolist()
    out_lens = frames_after_subsampling(feat_lens, kernel, stride)  # (B,)
    pieces: list[tuple[int, int, int]] = []  # (utterance, start, end) in fbank frames
    spans_of: list[list[tuple[int, int]]] = []
    for b, n in enumerate(lens):
        spans = crop_spans(int(n), crop_frames=crop_frames, overlap_frames=overlap_frames, stride=stride)
        spans_of.append(spans)
        pieces += [(b, s, e) for s, e in spans]
    outputs: list[tuple[Tensor, Tensor]] = []  # per crop: log_probs (t, V), LID logits (L,)
    for i in range(0, len(pieces), max_crops_per_forward):
        chunk = pieces[i : i + max_crops_per_forward]
        x = torch.nn.utils.rnn.pad_sequence([feats[b, s:e] for b, s, e in chunk], batch_first=True)
        x_lens = torch.tensor([e - s for _, s, e in chunk], dtype=torch.long)
        with autocast(bf16):
            out = model(x, x_lens)
        for k in range(len(chunk)):
            n_out = int(out.out_lens[k])
            outputs.append((out.log_probs[k, :n_out].float(), out.lid_logits[k].float()))
    T_out = int(frames_after_subsampling(feats.shape[1], kernel, stride))
    V = outputs[0][0].shape[-1]
    log_probs = torch.zeros(len(lens), T_out, V)
    lid_logits = torch.zeros(len(lens), outputs[0][1].shape[-1])
    p = 0
    for b, spans in enumerate(spans_of):
        n_out = int(out_lens[b])
        owners = stitch_owners(spans, n_out, kernel=kernel, stride=stride)
        for c, (start, _) in enumerate(spans):
            lp, lid = outputs[p + c]
            mine = (owners == c).nonzero().squeeze(1)  # global output frames this crop provides
            log_probs[b, mine] = lp[mine - start // stride]
            lid_logits[b] += lid * (len(mine) / max(n_out, 1))
        p += len(spans)
    return ModelOutput(log_probs, out_lens, lid_logits)
