"""Audio decode and features (paper Sec. 4: 80-dim log-mel, 25 ms Hamming window, 10 ms hop, 16 kHz).

Decoding uses soundfile (torchaudio 2.11's `load` needs torchcodec); resampling, mel filterbanks and
SpecAugment masks are torchaudio's. Every way a file can be unusable raises `AudioError` with a reason
that becomes the reject row's text.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torchaudio

from pipeline.config import AudioPolicy, FeatureConfig, SpecAugmentConfig
from storage.files import read_bytes


class AudioError(ValueError):
    """An audio file that cannot be used; the message is the reject reason."""


def load_audio(url: str, policy: AudioPolicy, sample_rate_hz: int = 16000) -> torch.Tensor:
    """Decode a file to a float32 mono waveform at `sample_rate_hz`, shape (S,).

    Raises:
        AudioError: missing, corrupt, empty, NaN/Inf, silent, multichannel (unless downmixed),
            low sample rate, too short or overlong audio.
    """
    return _decode(_read(url), policy, sample_rate_hz)[0]


def load_audio_and_flac(url: str, policy: AudioPolicy, sample_rate_hz: int = 16000) -> tuple[torch.Tensor, bytes]:
    """The waveform as `load_audio` gives it, and the same audio as 16-bit FLAC for a shard.

    A file that already is mono FLAC at `sample_rate_hz` is passed through byte for byte (no re-encoding
    cost, no second quantization); anything else is encoded from the converted waveform.

    Raises:
        AudioError: as `load_audio`.
    """
    data = _read(url)
    wav, native = _decode(data, policy, sample_rate_hz)
    return wav, data if native else encode_flac(wav, sample_rate_hz)


def decode_audio(data: bytes, policy: AudioPolicy, sample_rate_hz: int = 16000) -> torch.Tensor:
    """`load_audio` for bytes already in memory (e.g. a FLAC member of a PL shard).

    Raises:
        AudioError: as `load_audio`.
    """
    if not data:
        raise AudioError("audio is empty (0 bytes)")
    return _decode(data, policy, sample_rate_hz)[0]


def encode_flac(wav: torch.Tensor, sample_rate_hz: int) -> bytes:
    """16-bit mono FLAC of a float waveform (S,), clipped to [-1, 1]."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav.numpy(), -1.0, 1.0), sample_rate_hz, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _read(url: str) -> bytes:
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {url}") from None
    except IsADirectoryError:
        raise AudioError(f"audio path is a directory, not a file: {url}") from None
    except OSError as err:
        raise AudioError(f"audio file unreadable: {url} ({err})") from None
    if not data:
        raise AudioError("audio file is empty (0 bytes)")
    return data


def _decode(data: bytes, policy: AudioPolicy, sample_rate_hz: int) -> tuple[torch.Tensor, bool]:
    """(waveform, whether the bytes already were mono FLAC at the target rate)."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            fmt = f.format
            samples = f.read(dtype="float32", always_2d=True)  # (S, C)
            sr = f.samplerate
    except Exception as err:  # soundfile raises several types for corrupt input
        raise AudioError(f"audio could not be decoded ({type(err).__name__}: {err})") from None
    if samples.shape[0] == 0:
        raise AudioError("audio has no samples")
    channels = samples.shape[1]
    if channels > 1:
        if not policy.downmix_multichannel:
            raise AudioError(
                f"audio has {channels} channels; convert to mono or set audio.downmix_multichannel=true"
            )
        samples = samples.mean(axis=1, keepdims=True)
    if not np.isfinite(samples).all():
        raise AudioError("audio contains NaN or Inf samples")
    if sr < policy.min_sample_rate_hz:
        raise AudioError(
            f"sample rate {sr} Hz is below {policy.min_sample_rate_hz} Hz (upsampled audio lacks the upper band); "
            "lower audio.min_sample_rate_hz to accept it"
        )
    duration_s = samples.shape[0] / sr
    if duration_s > policy.max_duration_s:
        raise AudioError(f"audio is {duration_s:.1f} s, longer than audio.max_duration_s={policy.max_duration_s}")
    if duration_s < policy.min_duration_s:
        raise AudioError(f"audio is {duration_s:.3f} s, shorter than audio.min_duration_s={policy.min_duration_s}")
    if float(np.abs(samples).max()) < policy.silence_peak:
        raise AudioError(f"audio is silent (peak below {policy.silence_peak})")
    wav = torch.from_numpy(np.ascontiguousarray(samples[:, 0]))
    if sr != sample_rate_hz:
        wav = torchaudio.functional.resample(wav, sr, sample_rate_hz)
    return wav, fmt == "FLAC" and channels == 1 and sr == sample_rate_hz


@lru_cache(maxsize=4)
def _mel(cfg: FeatureConfig) -> torchaudio.transforms.MelSpectrogram:
    win = round(cfg.sample_rate_hz * cfg.win_ms / 1000)
    hop = round(cfg.sample_rate_hz * cfg.hop_ms / 1000)
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate_hz,
        n_fft=win,
        win_length=win,
        hop_length=hop,
        n_mels=cfg.n_mels,
        window_fn=torch.hamming_window,
        center=False,
    )


def num_frames(num_samples: int, cfg: FeatureConfig) -> int:
    """Fbank frames for a waveform of `num_samples` samples (no centering)."""
    win = round(cfg.sample_rate_hz * cfg.win_ms / 1000)
    hop = round(cfg.sample_rate_hz * cfg.hop_ms / 1000)
    return max(0, (num_samples - win) // hop + 1)


def log_mel(wav: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Per-utterance normalized log-mel features, shape (T, n_mels)."""
    with torch.no_grad():
        spec = _mel(cfg)(wav)  # (n_mels, T)
        feats = torch.log(spec + 1e-6).transpose(0, 1)  # (T, n_mels)
        mean = feats.mean(dim=0, keepdim=True)
        std = feats.std(dim=0, keepdim=True)
        return (feats - mean) / (std + 1e-5)


def spec_augment(feats: torch.Tensor, cfg: SpecAugmentConfig) -> torch.Tensor:
    """SpecAugment frequency and time masks on one utterance (T, n_mels); masked values become 0 (the mean).

    Uses torchaudio's mask functions; mask positions come from torch's global RNG so a checkpoint's RNG
    state reproduces them on resume.
    """
    x = feats.transpose(0, 1).unsqueeze(0)  # (1, n_mels, T)
    n_frames = x.shape[-1]
    time_width = min(cfg.time_mask_width, int(cfg.time_mask_max_ratio * n_frames))
    for _ in range(cfg.freq_masks):
        if cfg.freq_mask_width > 0:
            x = torchaudio.functional.mask_along_axis(x, cfg.freq_mask_width, 0.0, axis=1)
    for _ in range(cfg.time_masks):
        if time_width > 0:
            x = torchaudio.functional.mask_along_axis(x, time_width, 0.0, axis=2)
    return x.squeeze(0).transpose(0, 1)
