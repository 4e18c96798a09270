"""Tiny synthetic audio and manifests for unit tests (no corpus build needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(duration_s: float, freq_hz: float = 440.0, sr: int = 16000, channels: int = 1, seed: int = 0):
    """A noisy tone, float32, shape (S,) or (S, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(duration_s * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq_hz * t) + 0.01 * rng.standard_normal(t.size)
    x = x.astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write_flac(path: Path, samples, sr: int = 16000) -> str:
    """Write FLAC and return its path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, sr, format="FLAC", subtype="PCM_16")
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Write rows as UTF-8 JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def good_row(tmp: Path, uid: str, lang: str = "es", text: str = "hola mundo", duration_s: float = 2.0) -> dict:
    """A valid labeled row with its audio written under tmp."""
    audio = write_flac(tmp / "audio" / f"{uid}.flac", tone(duration_s, 300 + 50 * len(uid), seed=len(uid)))
    return {"id": uid, "audio": audio, "duration_s": duration_s, "language": lang, "text": text, "speaker": "s1"}


def bad_rows(tmp: Path) -> dict[str, dict]:
    """One row for each kind of bad input, keyed by the kind; the expected reason is a substring check."""
    a = tmp / "bad"
    a.mkdir(parents=True, exist_ok=True)
    (a / "corrupt.flac").write_bytes(b"fLaC\x00\x00garbage" * 10)
    (a / "empty.flac").write_bytes(b"")
    sf.write(str(a / "nan.wav"), np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(str(a / "zero_samples.wav"), np.zeros(0, dtype=np.float32), 16000, subtype="FLOAT")
    rows = {
        "not found": {"audio": str(a / "nope.flac")},
        "could not be decoded": {"audio": str(a / "corrupt.flac")},
        "empty": {"audio": str(a / "empty.flac")},
        "no samples": {"audio": str(a / "zero_samples.wav")},
        "NaN": {"audio": str(a / "nan.wav")},
        "silent": {"audio": write_flac(a / "silent.flac", np.zeros(32000, dtype=np.float32))},
        "channels": {"audio": write_flac(a / "stereo.flac", tone(2.0, channels=2))},
        "sample rate 8000": {"audio": write_flac(a / "8k.flac", tone(2.0, sr=8000), sr=8000)},
        "longer than": {"audio": write_flac(a / "long.flac", tone(45.0))},
        "unknown language": {"audio": write_flac(a / "xx.flac", tone(2.0)), "language": "xx"},
        "not a number": {"audio": write_flac(a / "dur.flac", tone(2.0)), "duration_s": "long"},
        "text is empty": {"audio": write_flac(a / "notext.flac", tone(2.0)), "text": "  "},
        "missing field(s) audio": {"audio": None},
    }
    out = {}
    for n, (kind, extra) in enumerate(rows.items()):
        row = {"id": f"bad{n}", "duration_s": 2.0, "language": "es", "text": "hola"} | extra
        out[kind] = row
    return out
