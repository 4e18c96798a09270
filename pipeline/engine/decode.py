"""The one decode path of evaluation, slimIPL labeling and PL generation: greedy CTC in eval mode (no dropout,
no SpecAugment), `torch.inference_mode`, bf16 autocast where native, whole clips or crops stitched back together
(paper Sec. 5.2), or, given a `BeamDecoder`, CTC beam search fused with the language's n-gram LM over the same
posteriors. Per utterance: tokens, text, confidence, blank ratio, LID prediction, and what decoded it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.decode import greedy_ctc_decode
from models.encoder import CTCLIDModel
from pipeline.config import BatchConfig
from pipeline.data.dataset import Dataset, collate
from pipeline.data.rows import ProgressFn, Utterance
from pipeline.data.samplers import DynamicBucketSampler
from pipeline.data.tokenizer import Tokenizer
from pipeline.engine.beam import BeamDecoder
from pipeline.engine.crops import PAD_FRAMES_MULTIPLE, crop_and_stitch, pad_time_to_multiple
from pipeline.engine.device import autocast


@dataclass(frozen=True)
class CropSpec:
    """Label long audio as overlapping crops stitched back together (paper Sec. 5.2), in fbank frames."""

    crop_frames: int
    overlap_frames: int


def decode_batch(
    model: CTCLIDModel,
    feats: torch.Tensor,
    feat_lens: torch.Tensor,
    *,
    tokenizer: Tokenizer,
    languages: Sequence[str],
    bf16: bool = True,
    crop: CropSpec | None = None,
    beam: BeamDecoder | None = None,
    keep_log_probs: bool = False,
    pad_multiple: int = PAD_FRAMES_MULTIPLE,
    lang_ids: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Greedy CTC (or `beam`'s LM-fused search) over one padded batch (B, T, n_mels) in eval mode, whole or
    cropped: the one decode path of evaluation, slimIPL labeling and PL generation. Per utterance: tokens, text,
    confidence (the acoustic model's, mean top posterior per frame, whatever decoded), blank ratio, LID, `decoder`;
    with `keep_log_probs`, its (T, V) log-posteriors too (`log_probs`), for a beam search that runs elsewhere
    (`with_beam_text`). The time axis is zero-padded up to a multiple of `pad_multiple` frames (exact: padding
    is masked); `lang_ids` (B,): each clip's language index (−1: unknown) for a language-conditioned model.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, feat_lens = feats.to(device, non_blocking=True), feat_lens.to(device)
    try:
        with torch.inference_mode(), autocast(bf16, device):
            if crop is None:
                out = model(pad_time_to_multiple(feats, pad_multiple), feat_lens, lang_ids)
            else:
                out = crop_and_stitch(model, feats, feat_lens, crop_frames=crop.crop_frames,
                                      overlap_frames=crop.overlap_frames, bf16=bf16, pad_multiple=pad_multiple,
                                      lang_ids=lang_ids)
        log_probs = out.log_probs.float().cpu()
        hyps = greedy_ctc_decode(log_probs, out.out_lens.cpu(), blank=tokenizer.blank_id)
        lid_probs = out.lid_logits.float().softmax(dim=-1).cpu()
    finally:
        model.train(was_training)
    rows = []
    for i, (h, p, n) in enumerate(zip(hyps, lid_probs, out.out_lens.tolist(), strict=True)):
        k = int(p.argmax())
        row = {
            "tokens": h.tokens,
            "hypothesis": tokenizer.decode(h.tokens),
            "num_tokens": len(h.tokens),
            "num_frames": int(n),
            "confidence": round(h.confidence, 5),
            "blank_ratio": round(h.blank_ratio, 5),
            "lid_pred": languages[k],
            "lid_prob": round(float(p[k]), 5),
            "decoder": "greedy",
        }
        if beam is not None:
            row = with_beam_text(row, beam.decode(log_probs[i, :n]), tokenizer, beam.cfg.describe())
        if keep_log_probs:
            row["log_probs"] = log_probs[i, :n]
        rows.append(row)
    return rows


def with_beam_text(row: dict[str, Any], text: str, tokenizer: Tokenizer, decoder: str) -> dict[str, Any]:
    """A decoded row whose hypothesis is a beam search's `text` (its confidence stays the acoustic model's)."""
    tokens = tokenizer.encode(text)
    return row | {"tokens": tokens, "hypothesis": text, "num_tokens": len(tokens), "decoder": decoder}


def decode_features(
    model: CTCLIDModel,
    features: Sequence[torch.Tensor],
    *,
    tokenizer: Tokenizer,
    languages: Sequence[str],
    bf16: bool = True,
    crop: CropSpec | None = None,
    beam: BeamDecoder | None = None,
    keep_log_probs: bool = False,
    clip_languages: Sequence[str | None] | None = None,
) -> list[dict[str, Any]]:
    """`decode_batch` over unpadded per-utterance features [(T_i, n_mels)], e.g. a streamed batch's;
    `clip_languages`: each clip's language where known (a language-conditioned model reads it)."""
    lens = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    feats = torch.nn.utils.rnn.pad_sequence(list(features), batch_first=True)  # (B, T, n_mels)
    lang_ids = None if clip_languages is None else language_ids(clip_languages, languages)
    return decode_batch(model, feats, lens, tokenizer=tokenizer, languages=languages, bf16=bf16, crop=crop,
                        beam=beam, keep_log_probs=keep_log_probs, lang_ids=lang_ids)


def language_ids(clip_languages: Sequence[str | None], languages: Sequence[str]) -> torch.Tensor:
    """(B,) each clip's index among the model's `languages`; −1 ("unknown") where it is None or not one of them."""
    index = {lang: i for i, lang in enumerate(languages)}
    return torch.tensor([index.get(lang, -1) if lang else -1 for lang in clip_languages], dtype=torch.long)


def _dataset_batches(ds: Dataset, languages: Sequence[str], batch: BatchConfig):
    """(utterances, padded batch) in length-sorted order over an in-memory dataset."""
    lang_ids = {lang: i for i, lang in enumerate(languages)}
    sampler = DynamicBucketSampler(
        ds.durations(),
        max_batch_duration_s=max(batch.max_batch_duration_s, max(ds.durations(), default=0.0)),
        max_batch_size=batch.max_batch_size,
        num_buckets=batch.num_buckets,
        shuffle=False,
    )
    for idx in sampler.epoch_batches(0):
        utts = [ds.utterances[i] for i in idx]
        yield utts, collate(utts, ds.features, tokenizer=None, language_ids=lang_ids)


def decode_dataset(
    model: CTCLIDModel,
    ds: Dataset,
    *,
    tokenizer: Tokenizer,
    languages: Sequence[str],
    batch: BatchConfig,
    bf16: bool = True,
    on_progress: ProgressFn | None = None,
    beam: BeamDecoder | None = None,
) -> list[dict[str, Any]]:
    """Decode every utterance of an in-memory dataset (greedy, or `beam`); one row per utterance with hypothesis
    and signals."""
    rows: list[dict[str, Any]] = []
    for utts, b in _dataset_batches(ds, languages, batch):
        decoded = decode_batch(model, b.feats, b.feat_lens, tokenizer=tokenizer, languages=languages, bf16=bf16,
                               beam=beam, lang_ids=b.lang_ids)
        for u, d in zip(utts, decoded, strict=True):
            signals = {k: v for k, v in d.items() if k not in ("tokens", "num_frames")}
            rows.append({"id": u.id, "language": u.language, "audio": u.audio, "reference": u.text} | signals)
        if on_progress is not None:
            on_progress(len(rows), len(ds.utterances), "decode")
    return rows


def dataset_posteriors(model: CTCLIDModel, ds: Dataset, *, languages: Sequence[str], batch: BatchConfig,
                       bf16: bool = True) -> list[tuple[Utterance, torch.Tensor]]:
    """Each utterance with its (T, V) float32 CTC log-posteriors on CPU, in eval mode: what a decoder grid search
    decodes many times over without running the model again."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out_rows: list[tuple[Utterance, torch.Tensor]] = []
    try:
        for utts, b in _dataset_batches(ds, languages, batch):
            with torch.inference_mode(), autocast(bf16, device):
                out = model(b.feats.to(device), b.feat_lens.to(device), b.lang_ids.to(device))
            log_probs = out.log_probs.float().cpu()
            out_rows += [(u, log_probs[i, :n].clone()) for i, (u, n) in enumerate(zip(utts, out.out_lens.tolist(),
                                                                                        strict=True))]
    finally:
        model.train(was_training)
    return out_rows
