"""Miniature NeMo and Hugging Face source layouts for import tests: a few short synthesized clips (16 kHz mono
sines + noise, 0.5-0.9 s) per language and split, in each format's own field names.

Each builder writes below `root` and returns the folder to import. With `bad_rows=True` a builder adds one row
of each kind of bad input listed in its docstring, all in its training split.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf

from tests.helpers.dummies import tone

SR = 16000
UNKNOWN_LANGUAGE = "xx-INVALID-123"
_PHRASES = {
    "de": ("guten morgen", "grüße aus köln", "danke schön", "der weiße hund", "zwölf boxkämpfer"),
    "sl": ("dober dan", "hvala lepa", "čez žito", "šolski zvezek", "lepa reka"),
}


def phrase(language: str, i: int) -> str:
    """The transcript of clip `i` of a language (a few real words; `<lang> clip <i>` for other languages)."""
    words = _PHRASES.get(language)
    return words[i % len(words)] if words else f"{language} clip {i}"


def clip(seed: int, duration_s: float | None = None) -> np.ndarray:
    """A short noisy tone, float32 (S,), distinct per seed."""
    return tone(duration_s or 0.5 + 0.1 * (seed % 5), freq_hz=200.0 + 37.0 * (seed % 17), seed=seed)


def audio_bytes(samples: np.ndarray, fmt: str) -> bytes:
    """Samples encoded as a 16-bit WAV or FLAC file's bytes (`fmt`: "WAV" or "FLAC")."""
    buf = io.BytesIO()
    sf.write(buf, samples, SR, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _write_audio(path: Path, samples: np.ndarray) -> float:
    """Write WAV or FLAC (by suffix); the duration in seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(audio_bytes(samples, "FLAC" if path.suffix == ".flac" else "WAV"))
    return round(len(samples) / SR, 4)


def _write_lines(path: Path, rows: list[dict | str]) -> None:
    """JSON lines (a str is written as it is: a broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")


def make_nemo(root: Path, languages=("de", "sl"), clips_per_split=2, *, bad_rows=False) -> Path:
    """A NeMo manifest folder: `train_manifest.json`, `dev_manifest.json`, `test_manifest.json` over
    `audio/<split>/<lang>_<i>.{wav,flac}` (relative `audio_filepath`), `lang` on every row, and in train two
    `offset` segments of one longer file `audio/long_<lang>.flac` (absolute path). Returns `root`.

    bad_rows adds to train: a missing file, a corrupt file, an empty text, an unknown language
    (`UNKNOWN_LANGUAGE`), a duplicate (same `audio_filepath` and `offset` twice) and a line that is not JSON.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seed = 0
    for split in ("train", "dev", "test"):
        rows: list[dict | str] = []
        for lang in languages:
            for i in range(clips_per_split):
                rel = f"audio/{split}/{lang}_{i}.{'flac' if i % 2 else 'wav'}"
                seed += 1
                duration = _write_audio(root / rel, clip(seed))
                rows.append({"audio_filepath": rel, "duration": duration, "text": phrase(lang, i + seed), "lang": lang})
        if split == "train":
            lang = languages[0]
            long_file = root / f"audio/long_{lang}.flac"
            _write_audio(long_file, clip(99, 2.0))
            segments = [{"audio_filepath": str(long_file.resolve()), "offset": offset, "duration": 0.8,
                         "text": phrase(lang, k), "lang": lang} for k, offset in enumerate((0.1, 1.05))]
            rows += segments
            if bad_rows:
                (root / "audio/train/corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 8)
                empty_s = _write_audio(root / "audio/train/empty_text.wav", clip(97))
                unknown_s = _write_audio(root / "audio/train/unknown_language.wav", clip(98))
                rows += [
                    {"audio_filepath": "audio/train/missing.wav", "duration": 0.5, "text": "fehlt", "lang": lang},
                    {"audio_filepath": "audio/train/corrupt.wav", "duration": 0.5, "text": "kaputt", "lang": lang},
                    {"audio_filepath": "audio/train/empty_text.wav", "duration": empty_s, "text": "", "lang": lang},
                    {"audio_filepath": "audio/train/unknown_language.wav", "duration": unknown_s, "text": "wer",
                     "lang": UNKNOWN_LANGUAGE},
                    dict(segments[1]),
                    "{this line is not json",
                ]
        _write_lines(root / f"{split}_manifest.json", rows)
    return root


def make_nemo_tarred(root: Path, languages=("de", "sl"), clips_per_language=2, *, bad_rows=False) -> Path:
    """A NeMo tarred dataset: `tarred_audio_manifest.json` (`audio_filepath` = member name, `shard_id`, `duration`,
    `text`, `lang`) + `audio_0.tar`, `audio_1.tar` with flat members named by file name, clips dealt round-robin;
    shard 0 also holds a longer file `long.wav` with two `offset` rows. Returns `root`.

    bad_rows adds: a row whose shard id (7) has no tar, and a row whose member is missing from its tar.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    members: list[dict[str, bytes]] = [{}, {}]
    rows: list[dict | str] = []
    seed = 100
    for lang in languages:
        for i in range(clips_per_language):
            seed += 1
            name = f"{lang}_{i}.{'flac' if i % 2 else 'wav'}"
            shard = len(rows) % 2
            samples = clip(seed)
            members[shard][name] = audio_bytes(samples, "FLAC" if name.endswith(".flac") else "WAV")
            rows.append({"audio_filepath": name, "duration": round(len(samples) / SR, 4), "text": phrase(lang, i),
                         "shard_id": shard, "lang": lang})
    members[0]["long.wav"] = audio_bytes(clip(199, 2.0), "WAV")
    rows += [{"audio_filepath": "long.wav", "duration": 0.8, "offset": offset, "text": phrase(languages[0], k),
              "shard_id": 0, "lang": languages[0]} for k, offset in enumerate((0.1, 1.05))]
    if bad_rows:
        rows += [{"audio_filepath": "lost_shard.wav", "duration": 0.5, "text": "weg", "shard_id": 7,
                  "lang": languages[0]},
                 {"audio_filepath": "not_in_tar.wav", "duration": 0.5, "text": "weg", "shard_id": 1,
                  "lang": languages[0]}]
    for shard, content in enumerate(members):
        with tarfile.open(root / f"audio_{shard}.tar", "w") as tar:
            for name, data in content.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    _write_lines(root / "tarred_audio_manifest.json", rows)
    return root


def make_hf_parquet(root: Path, languages=("de", "sl"), clips_per_split=2, *, bad_rows=False) -> Path:
    """A Hugging Face audio dataset written by `datasets` in the Hub layout: `data/{train,validation,test}-00000-
    of-00001.parquet`, columns `audio` (Audio feature, bytes + path `<id>.wav`/`.flac`; the first clip of each split
    has no path), `sentence`, `locale`, `client_id`, `id` (`<lang>_<split>_<i>`). Returns `root`.

    bad_rows adds to train: a row with neither audio bytes nor path, corrupt audio bytes, an empty sentence, an
    unknown locale (`UNKNOWN_LANGUAGE`), a row without locale and a duplicate id with other audio.
    """
    from datasets import Audio, Dataset

    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    seed = 200
    for split in ("train", "validation", "test"):
        cols: dict[str, list] = {"audio": [], "sentence": [], "locale": [], "client_id": [], "id": []}

        def add(uid, audio, sentence, locale, speaker="spk0", cols=cols):
            for key, value in zip(cols, (audio, sentence, locale, speaker, uid), strict=True):
                cols[key].append(value)

        for lang in languages:
            for i in range(clips_per_split):
                seed += 1
                uid, fmt = f"{lang}_{split}_{i}", ("FLAC" if i % 2 else "WAV")
                path = None if not cols["id"] else f"{uid}.{fmt.lower()}"
                add(uid, {"bytes": audio_bytes(clip(seed), fmt), "path": path}, phrase(lang, i + seed), lang,
                    f"spk_{lang}_{i}")
        if split == "train" and bad_rows:
            lang = languages[0]
            add("no_audio", {"bytes": None, "path": None}, "leer", lang)
            add("corrupt", {"bytes": b"RIFF\x00\x00\x00\x00WAVEgarbage" * 8, "path": "corrupt.wav"}, "kaputt", lang)
            add("empty_text", {"bytes": audio_bytes(clip(297), "WAV"), "path": "empty_text.wav"}, "", lang)
            add("unknown_lang", {"bytes": audio_bytes(clip(298), "WAV"), "path": "u.wav"}, "wer", UNKNOWN_LANGUAGE)
            add("no_locale", {"bytes": audio_bytes(clip(299), "WAV"), "path": "n.wav"}, "wo", None)
            add(cols["id"][0], {"bytes": audio_bytes(clip(296), "WAV"), "path": "dup.wav"}, "doppelt", lang)
        dataset = Dataset.from_dict(cols).cast_column("audio", Audio())
        dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root
