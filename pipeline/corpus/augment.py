"""Channel realism for synthetic speech: spectral tilt, room reverberation, background noise, gain.

Clean espeak-ng output is far easier than the paper's Common Voice / VoxPopuli audio (phones, laptops,
rooms, crowds). These are the cheap, classic corruptions (a first-order tilt filter, an exponentially
decaying noise impulse response, coloured noise at a drawn SNR, a random level) applied per clip from
the clip's own RNG, so results never depend on build order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.functional as AF
import torchaudio.transforms as T

NOISE_COLORS = ("white", "pink", "brown")
_PEAK_LIMIT = 0.98
_INT16_MAX = 32767


@dataclass(frozen=True)
class ChannelSettings:
    """Ranges the per-clip channel is drawn from."""

    snr_db: tuple[float, float]
    reverb_prob: float
    rt60_s: tuple[float, float]
    direct_to_reverb_db: tuple[float, float]
    level_dbfs: tuple[float, float]
    noise_colors: tuple[str, ...] = NOISE_COLORS


@functools.lru_cache(maxsize=4)
def _resampler(from_hz: int, to_hz: int) -> T.Resample:
    # Building the sinc kernel for 22 050 -> 16 000 Hz costs more than applying it: build it once.
    return T.Resample(from_hz, to_hz)


def resample(samples: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Resample mono float32 audio with torchaudio's windowed-sinc resampler."""
    if from_hz == to_hz:
        return samples.astype(np.float32)
    with torch.no_grad():
        out = _resampler(from_hz, to_hz)(torch.from_numpy(samples.astype(np.float32)))
    return out.numpy()


def trim_silence(samples: np.ndarray, sample_rate: int, threshold_db: float = -40.0) -> np.ndarray:
    """Cut leading/trailing stretches whose 10 ms frame RMS is below threshold_db re the loudest frame."""
    frame = max(1, sample_rate // 100)
    n_frames = len(samples) // frame
    if n_frames == 0:
        return samples[:0]
    rms = np.sqrt(np.mean(samples[: n_frames * frame].reshape(n_frames, frame) ** 2, axis=1) + 1e-12)
    active = np.flatnonzero(rms >= rms.max() * 10 ** (threshold_db / 20))
    return samples[active[0] * frame : (active[-1] + 1) * frame]


def apply_tilt(samples: np.ndarray, coef: float) -> np.ndarray:
    """First-order FIR y[n] = x[n] - coef*x[n-1]: coef > 0 brightens (thin mic), < 0 darkens (muffled)."""
    out = samples.copy()
    out[1:] -= np.float32(coef) * samples[:-1]
    return out


def synthetic_rir(rng: np.random.Generator, rt60_s: float, direct_to_reverb_db: float, sample_rate: int) -> np.ndarray:
    """Room impulse response: a unit direct path plus Gaussian noise decaying 60 dB over rt60_s."""
    n = max(2, int(rt60_s * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.907755 * t / rt60_s)  # ln(1000): amplitude -60 dB at rt60
    tail[0] = 0.0
    tail *= 10 ** (-direct_to_reverb_db / 20) / np.sqrt(np.sum(tail**2) + 1e-12)
    tail[0] = 1.0
    return tail.astype(np.float32)


def reverberate(samples: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with a room response (FFT), keeping the input's length and energy."""
    # Zero-pad so the FFT length is a power of two (3x faster than odd lengths); the pad only adds tail.
    size = 1 << (len(samples) + len(rir) - 2).bit_length()
    padded = np.pad(samples, (0, size - len(rir) + 1 - len(samples)))
    wet = AF.fftconvolve(torch.from_numpy(padded), torch.from_numpy(rir)).numpy()[: len(samples)]
    return wet * np.float32(_rms(samples) / max(_rms(wet), 1e-9))


def colored_noise(rng: np.random.Generator, n: int, color: str) -> np.ndarray:
    """Unit-RMS white (flat), pink (1/f power) or brown (1/f^2 power) noise."""
    if color == "white":
        noise = rng.standard_normal(n)
    else:
        size = 1 << max(1, (n - 1).bit_length())  # a power of two: FFTs of odd lengths are far slower
        spectrum = np.fft.rfft(rng.standard_normal(size))
        freqs = np.maximum(np.fft.rfftfreq(size), 1.0 / size)  # floor at one bin: no infinite DC
        exponent = {"pink": 0.5, "brown": 1.0}[color]
        noise = np.fft.irfft(spectrum / freqs**exponent, size)[:n]
    return (noise / max(_rms(noise), 1e-12)).astype(np.float32)


def add_noise(samples: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Mix unit-RMS noise under the signal at snr_db (signal power measured over the whole clip)."""
    return samples + noise * np.float32(_rms(samples) * 10 ** (-snr_db / 20))


def set_level(samples: np.ndarray, level_dbfs: float) -> np.ndarray:
    """Scale to an RMS level in dBFS, then limit peaks so nothing overflows 16-bit PCM."""
    out = samples * np.float32(10 ** (level_dbfs / 20) / max(_rms(samples), 1e-9))
    peak = float(np.max(np.abs(out))) if len(out) else 0.0
    if peak > _PEAK_LIMIT:
        out *= np.float32(_PEAK_LIMIT / peak)
    return np.clip(out, -1.0, _INT16_MAX / 32768)


def corrupt(
    samples: np.ndarray, sample_rate: int, rng: np.random.Generator, settings: ChannelSettings, tilt: float
) -> tuple[np.ndarray, dict]:
    """Apply tilt, maybe reverb, noise and gain to one clip; return the audio and what was drawn."""
    x = apply_tilt(samples.astype(np.float32), tilt)
    drawn: dict = {"tilt": round(float(tilt), 3)}
    # Draw every random quantity in a fixed order, whether used or not, so one setting never shifts others.
    use_reverb = bool(rng.random() < settings.reverb_prob)
    rt60 = float(rng.uniform(*settings.rt60_s))
    drr = float(rng.uniform(*settings.direct_to_reverb_db))
    rir = synthetic_rir(rng, rt60, drr, sample_rate)
    color = settings.noise_colors[int(rng.integers(len(settings.noise_colors)))]
    snr = float(rng.uniform(*settings.snr_db))
    noise = colored_noise(rng, len(x), color)
    level = float(rng.uniform(*settings.level_dbfs))
    if use_reverb:
        x = reverberate(x, rir)
        drawn.update(rt60_s=round(rt60, 3), direct_to_reverb_db=round(drr, 2))
    x = add_noise(x, noise, snr)
    x = set_level(x, level)
    drawn.update(reverb=use_reverb, noise=color, snr_db=round(snr, 2), level_dbfs=round(level, 2))
    return x.astype(np.float32), drawn


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float [-1, 1) to 16-bit PCM with rounding and saturation."""
    return np.clip(np.round(samples * 32768.0), -32768, _INT16_MAX).astype(np.int16)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
