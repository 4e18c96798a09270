"""Audio decode and features (paper Sec. 4: 80-dim log-mel, 25 ms Hamming window, 10 ms hop, 16 kHz).

Decoding uses soundfile (torchaudio 2.11's `load` needs torchcodec); resampling, mel filterbanks and
SpecAugment masks are torchaudio's. Every way a file can be unusable raises `AudioError` with a reason
that becomes the reject row's text.

A clip that is a stretch of a longer recording (a manifest row with `start_s`/`end_s`, as lhotse supervisions
and NeMo offsets are imported) carries the stretch in its audio URL as a media fragment, `<url>#t=<start>,<end>`
(W3C Media Fragments), so every reader, unit key and table row sees the same clip; only that stretch is decoded.
"""

from __future__ import annotations

import io
import os
import re
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torchaudio

from pipeline.config import AudioPolicy, FeatureConfig, SpecAugmentConfig
from storage.files import is_local, local_path, open_binary, read_bytes


class AudioError(ValueError):
    """An audio file that cannot be used; the message is the reject reason."""


_SPAN = re.compile(r"#t=(\d+(?:\.\d+)?)?,(\d+(?:\.\d+)?)$")


def with_span(url: str, start_s: float | None, end_s: float | None) -> str:
    """The audio URL of the stretch [start_s, end_s) of a recording (a media fragment); the URL itself when
    neither is given.

    Raises:
        ValueError: when the stretch is empty or negative, or only one end is given.
    """
    if start_s is None and end_s is None:
        return url
    if start_s is None or end_s is None:
        raise ValueError(f"start_s and end_s go together (got start_s={start_s}, end_s={end_s})")
    start, end = float(start_s), float(end_s)
    if not (0 <= start < end):
        raise ValueError(f"stretch {start}..{end} s is empty or negative")
    return f"{url}#t={start:g},{end:g}"


def split_span(url: str) -> tuple[str, float | None, float | None]:
    """(file URL, start_s, end_s) of an audio URL; (url, None, None) when it names the whole file."""
    m = _SPAN.search(url)
    if m is None:
        return url, None, None
    return url[: m.start()], float(m.group(1) or 0.0), float(m.group(2))


def load_audio(url: str, policy: AudioPolicy, sample_rate_hz: int = 16000) -> torch.Tensor:
    """Decode a file (or the stretch its URL names) to a float32 mono waveform at `sample_rate_hz`, shape (S,).

    Raises:
        AudioError: missing, corrupt, empty, NaN/Inf, silent, multichannel (unless downmixed),
            low sample rate, too short or overlong audio, a stretch past the file's end.
    """
    return _decode(_source(url), policy, sample_rate_hz)[0]


def load_audio_and_flac(url: str, policy: AudioPolicy, sample_rate_hz: int = 16000) -> tuple[torch.Tensor, bytes]:
    """The waveform as `load_audio` gives it, and the same audio as 16-bit FLAC for a shard.

    A whole file that already is mono FLAC at `sample_rate_hz` is passed through byte for byte (no re-encoding
    cost, no second quantization); anything else is encoded from the converted waveform.

    Raises:
        AudioError: as `load_audio`.
    """
    source = _source(url)
    wav, native = _decode(source, policy, sample_rate_hz)
    return wav, source.data if native and source.data is not None else encode_flac(wav, sample_rate_hz)


def decode_audio(data: bytes, policy: AudioPolicy, sample_rate_hz: int = 16000) -> torch.Tensor:
    """`load_audio` for bytes already in memory (e.g. a FLAC member of a PL shard).

    Raises:
        AudioError: as `load_audio`.
    """
    if not data:
        raise AudioError("audio is empty (0 bytes)")
    return _decode(_Source(data, None, None, None), policy, sample_rate_hz)[0]


def probe_audio(url: str) -> float:
    """Seconds of audio the URL names, from the file header alone (no samples read); a stretch's own length
    after checking that the file is long enough.

    Raises:
        AudioError: missing, unreadable or empty file, a stretch past the file's end.
    """
    path, start, end = split_span(url)
    try:
        if is_local(path):
            info = sf.info(_local_file(path))
        elif path.startswith("tar://"):
            info = sf.info(io.BytesIO(_read(path)))  # a tar member's file object dies with its file system
        else:
            with open_binary(path) as f:
                info = sf.info(f)
    except AudioError:
        raise
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {path}") from None
    except Exception as err:  # soundfile raises several types for corrupt input
        raise AudioError(f"audio header could not be read ({type(err).__name__}: {err})") from None
    if info.frames == 0:
        raise AudioError("audio has no samples")
    total = info.frames / info.samplerate
    if end is None:
        return total
    _check_span(start, end, total)
    return end - start


def encode_flac(wav: torch.Tensor, sample_rate_hz: int) -> bytes:
    """16-bit mono FLAC of a float waveform (S,), clipped to [-1, 1]."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav.numpy(), -1.0, 1.0), sample_rate_hz, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


class _Source:
    """Audio to decode: bytes in memory, or a local file soundfile seeks in (a stretch of a long recording is
    read without the rest), and the stretch."""

    def __init__(self, data: bytes | None, path: str | None, start_s: float | None, end_s: float | None):
        self.data, self.path, self.start_s, self.end_s = data, path, start_s, end_s

    def open(self) -> sf.SoundFile:
        """A soundfile reader over the source."""
        return sf.SoundFile(self.path if self.data is None else io.BytesIO(self.data))


def _source(url: str) -> _Source:
    path, start, end = split_span(url)
    if end is not None and is_local(path):
        return _Source(None, _local_file(path), start, end)
    return _Source(_read(path), None, start, end)


def _local_file(path: str) -> str:
    """The plain path of a local audio file that soundfile opens itself (no bytes read here).

    Raises:
        AudioError: as `_read` says it: missing, a folder, unreadable.
    """
    local = local_path(path)
    if not os.path.isfile(local):
        _read(path)
    return local


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


def _check_span(start: float, end: float, total: float) -> None:
    # Half a frame of slack: manifests round times to milliseconds.
    if end > total + 0.0005:
        raise AudioError(f"stretch {start:g}..{end:g} s ends after the audio's end ({total:.3f} s)")


def _decode(source: _Source, policy: AudioPolicy, sample_rate_hz: int) -> tuple[torch.Tensor, bool]:
    """(waveform, whether the bytes already were a whole mono FLAC at the target rate)."""
    try:
        with source.open() as f:
            fmt = f.format
            sr = f.samplerate
            if source.end_s is not None:
                _check_span(source.start_s, source.end_s, f.frames / sr)
                f.seek(round(source.start_s * sr))
                samples = f.read(round((source.end_s - source.start_s) * sr), dtype="float32", always_2d=True)
            else:
                samples = f.read(dtype="float32", always_2d=True)  # (S, C)
    except AudioError:
        raise
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
    if float(samples.max() - samples.min()) < policy.silence_peak:
        # A flat signal away from 0 is no sound either; NaN samples written to a PCM file come out as one.
        raise AudioError(f"audio is a constant {float(samples[0, 0]):+.4f} (no signal; NaN or Inf samples written to "
                         "a PCM file come out as a constant)")
    wav = torch.from_numpy(np.ascontiguousarray(samples[:, 0]))
    if sr != sample_rate_hz:
        wav = torchaudio.functional.resample(wav, sr, sample_rate_hz)
    whole = source.end_s is None
    return wav, whole and fmt == "FLAC" and channels == 1 and sr == sample_rate_hz


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


def log_mel(wav: torch.Tensor, cfg: FeatureConfig, normalize: bool = True) -> torch.Tensor:
    """Per-utterance normalized log-mel features, shape (T, n_mels); `normalize=False`: as an exported model takes
    them (it normalizes inside its graph)."""
    with torch.no_grad():
        spec = _mel(cfg)(wav)  # (n_mels, T)
        feats = torch.log(spec + 1e-6).transpose(0, 1)  # (T, n_mels)
        if not normalize:
            return feats
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
