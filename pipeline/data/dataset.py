"""Labeled data in memory: validated utterances with their log-mel features, and padded batches (paper Sec. 4).

Every row is either an `Utterance` with its features or a `Reject` with a reason; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from models.encoder import frames_after_subsampling
from pipeline.config import AudioPolicy, FeatureConfig, SpecAugmentConfig
from pipeline.data.audio import AudioError, load_audio, log_mel, spec_augment
from pipeline.data.rows import ProgressFn, Reject, Utterance, read_utterances
from pipeline.data.tokenizer import Tokenizer


@dataclass
class Dataset:
    """Validated utterances of one manifest with their log-mel features, and the rejects."""

    utterances: list[Utterance]
    features: dict[str, torch.Tensor]  # id -> (T, n_mels)
    rejects: list[Reject] = field(default_factory=list)
    frame_s: float = 0.01  # fbank hop

    def durations(self) -> list[float]:
        """Feature-derived durations in seconds, aligned with `utterances`."""
        return [self.features[u.id].shape[0] * self.frame_s for u in self.utterances]

    def languages(self) -> list[str]:
        """Sorted languages present."""
        return sorted({u.language for u in self.utterances})


def load_dataset(
    manifest_url: str,
    *,
    features: FeatureConfig,
    policy: AudioPolicy,
    require_text: bool,
    languages: Sequence[str] | None = None,
    language: str | None = None,
    on_progress: ProgressFn | None = None,
) -> Dataset:
    """Read a manifest, validate every row and decode its audio into features; bad rows become rejects.

    With `language`, only that language's rows are this dataset's (a per-language stage reading a pooled
    manifest): other languages' rows are neither loaded nor rejected.

    Raises:
        FileNotFoundError: when the manifest itself is missing.
    """
    utts, rejects = read_utterances(manifest_url, require_text=require_text, languages=languages, language=language)
    kept: list[Utterance] = []
    feats: dict[str, torch.Tensor] = {}
    for i, u in enumerate(utts):
        try:
            wav = load_audio(u.audio, policy, features.sample_rate_hz)
        except AudioError as err:
            rejects.append(Reject(u.id, u.audio, u.language, str(err), manifest_url))
        except Exception as err:  # one unreadable row must never end the run
            reason = f"unexpected error reading audio ({type(err).__name__}: {err})"
            rejects.append(Reject(u.id, u.audio, u.language, reason, manifest_url))
        else:
            feats[u.id] = log_mel(wav, features)
            kept.append(u)
        if on_progress is not None:
            on_progress(i + 1, len(utts), "decode audio")
    return Dataset(kept, feats, rejects, features.hop_ms / 1000)


def reject_untrainable(ds: Dataset, tokenizer: Tokenizer, conv_kernel: int, conv_stride: int) -> Dataset:
    """Move utterances whose transcript needs more CTC frames than the model's front end gives into the rejects."""
    kept, rejects = [], list(ds.rejects)
    for u in ds.utterances:
        tokens = tokenizer.encode(u.text or "")
        # CTC needs a frame per token plus one between each repeated pair.
        needed = len(tokens) + sum(1 for a, b in zip(tokens, tokens[1:], strict=False) if a == b)
        have = int(frames_after_subsampling(ds.features[u.id].shape[0], conv_kernel, conv_stride))
        if needed > have:
            reason = f"transcript needs {needed} CTC frames but the audio gives {have}; clip too short for its text"
            rejects.append(Reject(u.id, u.audio, u.language, reason, "tokenize"))
        else:
            kept.append(u)
    return Dataset(kept, {u.id: ds.features[u.id] for u in kept}, rejects, ds.frame_s)


class Batch(NamedTuple):
    """Padded tensors of one batch."""

    ids: list[str]
    feats: torch.Tensor  # (B, T, n_mels)
    feat_lens: torch.Tensor  # (B,)
    targets: torch.Tensor  # (B, S), 0-padded
    target_lens: torch.Tensor  # (B,)
    lang_ids: torch.Tensor  # (B,)


def collate(
    utts: Sequence[Utterance],
    features: dict[str, torch.Tensor],
    *,
    tokenizer: Tokenizer | None,
    language_ids: dict[str, int],
    specaugment: SpecAugmentConfig | None = None,
    token_ids: Sequence[Sequence[int]] | None = None,
) -> Batch:
    """Pad features (after SpecAugment, when given) and targets of a list of utterances.

    Targets are the tokenized transcripts, or `token_ids` when given (pseudo-labels are tokens already).
    """
    feats = [features[u.id] for u in utts]
    if specaugment is not None:
        feats = [spec_augment(f, specaugment) for f in feats]
    feat_lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    if token_ids is not None:
        toks = [torch.tensor(list(t), dtype=torch.long) for t in token_ids]
    elif tokenizer is not None:
        toks = [torch.tensor(tokenizer.encode(u.text or ""), dtype=torch.long) for u in utts]
    else:
        toks = [torch.zeros(0, dtype=torch.long) for _ in utts]
    target_lens = torch.tensor([t.numel() for t in toks], dtype=torch.long)
    targets = (
        torch.nn.utils.rnn.pad_sequence(toks, batch_first=True)
        if max(target_lens.tolist(), default=0) > 0
        else torch.zeros(len(utts), 0, dtype=torch.long)
    )
    lang_ids = torch.tensor([language_ids.get(u.language, -1) for u in utts], dtype=torch.long)
    return Batch([u.id for u in utts], padded, feat_lens, targets, target_lens, lang_ids)
