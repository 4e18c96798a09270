"""Miniature Common Voice and VoxPopuli releases with real (synthetic) audio, laid out like the real ones.

Used by the importer tests and the end-to-end import test. Clips are 0.6-1.2 s of summed sines and a little noise
at 16 kHz, different per clip and the same on every run; texts are short and deterministic.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
CV_RELEASE = "cv-corpus-17.0"
CV_HEADER = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
             "gender", "accents", "variant", "locale", "segment")
VOXPOPULI_HEADER = ("id", "raw_text", "normalized_text", "speaker_id", "split", "gender", "is_gold_transcript",
                    "accent")
QUOTE_SENTENCE = 'Er sagte "Hallo und ging.'  # an unbalanced quote: csv's default quoting would eat the next line
INVALID_LOCALE = "xx-INVALID-123"
_WORDS = ("haus", "baum", "wasser", "licht", "stein", "morgen", "abend", "weg", "feld", "berg", "see", "tag")


def clip_samples(name: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """0.6-1.2 s of float32 audio (three summed sines plus noise, peak about 0.3), seeded by `name`."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    t = np.arange(int(rng.uniform(0.6, 1.2) * sample_rate)) / sample_rate
    tones = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, np.pi)) for f in rng.uniform(150, 1500, size=3))
    return (0.1 * tones + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def sentence(locale: str, split: str, index: int) -> str:
    """The deterministic text of clip `index` of a split."""
    seed = zlib.crc32(f"{locale}/{split}/{index}".encode())
    return " ".join(_WORDS[(seed >> (4 * k)) % len(_WORDS)] for k in range(3)) + f" {split} {index}"


def make_common_voice(root: Path, locales=("de", "sl"), clips_per_split=2, *, bad_rows=False) -> Path:
    """Write a Common Voice release at `root/cv-corpus-17.0/<locale>/` and return that release folder.

    Each locale has `clips/common_voice_<locale>_<n>.mp3` and train/dev/test/other.tsv with `clips_per_split`
    clips each (train at least 2), the header of release 17 (CV_HEADER), two speakers per locale; train's first
    sentence is QUOTE_SENTENCE. validated.tsv (train+dev+test), invalidated.tsv (one clip of its own, mp3 present)
    and clip_durations.tsv are there too, as in a release, and are not to be imported. Texts are
    `sentence(locale, split, i)`; other.tsv has sentences too, which an importer must not use.

    `bad_rows=True` adds to the first locale's train.tsv, each clip named `common_voice_<locale>_<kind>.mp3`:
    `missing` (no mp3), `corrupt` (random bytes), `empty_text` (empty sentence), `bad_locale` (locale column
    INVALID_LOCALE); and dev.tsv lists train's first clip again (a duplicate id).
    """
    release = Path(root) / CV_RELEASE
    for li, locale in enumerate(locales):
        folder = release / locale
        (folder / "clips").mkdir(parents=True, exist_ok=True)
        tables: dict[str, list[dict[str, str]]] = {}
        number = 1000
        for split in ("train", "dev", "test", "other"):
            rows = []
            for i in range(max(clips_per_split, 2) if split == "train" else clips_per_split):
                number += 1
                path = f"common_voice_{locale}_{number}.mp3"
                _write_audio(folder / "clips" / path, "MP3")
                text = QUOTE_SENTENCE if split == "train" and i == 0 else sentence(locale, split, i)
                rows.append(_cv_row(locale, path, text, speaker=i % 2))
            tables[split] = rows
        invalid = f"common_voice_{locale}_{number + 1}.mp3"
        _write_audio(folder / "clips" / invalid, "MP3")
        tables["invalidated"] = [_cv_row(locale, invalid, sentence(locale, "invalidated", 0), speaker=0)]
        if bad_rows and li == 0:
            for kind in ("missing", "corrupt", "empty_text", "bad_locale"):
                path = f"common_voice_{locale}_{kind}.mp3"
                if kind == "corrupt":
                    (folder / "clips" / path).write_bytes(np.random.default_rng(7).bytes(3000))
                elif kind != "missing":
                    _write_audio(folder / "clips" / path, "MP3")
                text = "" if kind == "empty_text" else sentence(locale, kind, 0)
                row = _cv_row(locale, path, text, speaker=0)
                if kind == "bad_locale":
                    row["locale"] = INVALID_LOCALE
                tables["train"].append(row)
            tables["dev"].append(dict(tables["train"][0]))
        tables["validated"] = tables["train"] + tables["dev"] + tables["test"]
        for name, rows in tables.items():
            _write_tsv(folder / f"{name}.tsv", CV_HEADER, rows)
        durations = [f"{r['path']}\t{1000}" for r in tables["validated"]]
        (folder / "clip_durations.tsv").write_text("\n".join(["clip\tduration[ms]", *durations]) + "\n")
    return release


def make_voxpopuli(root: Path, languages=("de", "sl"), clips_per_split=2, unlabeled_per_language=3, *,
                   bad_rows=False) -> Path:
    """Write a VoxPopuli release at `root/voxpopuli/` (both subtrees) and return that folder.

    `transcribed_data/<lang>/asr_{train,dev,test}.tsv` (VOXPOPULI_HEADER) with `clips_per_split` segments each
    (train at least 2), audio at `transcribed_data/<lang>/<year>/<id>.ogg`, years 2018 and 2019 alternating,
    ids like `20180206-0900-PLENARY-1-de_20180206-17:58:33_4`. Train's first raw_text is QUOTE_SENTENCE; the
    second has an empty raw_text and `sentence(lang, "train", 1)` as normalized_text (the fallback); other
    raw texts are `sentence(lang, split, i)`. `unlabelled_data/<lang>/<year>/<id>.ogg` has
    `unlabeled_per_language` clips per language, plus a hidden `.partial.ogg` and a `notes.txt` to be skipped.

    `bad_rows=True` adds to the first language's asr_train.tsv segments whose ids end in `_missing` (no ogg),
    `_corrupt` (random bytes) and `_empty_text` (both texts empty); asr_dev.tsv lists train's first id again
    (a duplicate id); and a language folder named INVALID_LOCALE holds one good transcribed segment.
    """
    release = Path(root) / "voxpopuli"
    for li, lang in enumerate(languages):
        folder = release / "transcribed_data" / lang
        number = 0
        tables: dict[str, list[dict[str, str]]] = {}
        for split in ("train", "dev", "test"):
            rows = []
            for i in range(max(clips_per_split, 2) if split == "train" else clips_per_split):
                number += 1
                clip = _vp_id(lang, number)
                _write_audio(folder / clip[:4] / f"{clip}.ogg", "OGG")
                text = QUOTE_SENTENCE if split == "train" and i == 0 else sentence(lang, split, i)
                row = _vp_row(clip, text, split, speaker=i % 2)
                if split == "train" and i == 1:
                    row["raw_text"] = ""
                rows.append(row)
            tables[split] = rows
        if bad_rows and li == 0:
            for kind in ("missing", "corrupt", "empty_text"):
                clip = f"{_vp_id(lang, 90)}_{kind}"
                audio = folder / clip[:4] / f"{clip}.ogg"
                if kind == "corrupt":
                    audio.write_bytes(np.random.default_rng(8).bytes(3000))
                elif kind == "empty_text":
                    _write_audio(audio, "OGG")
                row = _vp_row(clip, "" if kind == "empty_text" else sentence(lang, kind, 0), "train", speaker=0)
                if kind == "empty_text":
                    row["normalized_text"] = ""
                tables["train"].append(row)
            tables["dev"].append(dict(tables["train"][0], split="dev"))
        for split, rows in tables.items():
            _write_tsv(folder / f"asr_{split}.tsv", VOXPOPULI_HEADER, rows)
        unlabelled = release / "unlabelled_data" / lang
        for i in range(unlabeled_per_language):
            year = 2018 + i % 2
            _write_audio(unlabelled / str(year) / f"{year}0315-0900-PLENARY-{lang}_{i}.ogg", "OGG")
        (unlabelled / "2018").mkdir(parents=True, exist_ok=True)
        (unlabelled / "2018" / ".partial.ogg").write_bytes(b"")
        (unlabelled / "notes.txt").write_text("not audio\n")
    if bad_rows:
        folder = release / "transcribed_data" / INVALID_LOCALE
        clip = _vp_id("xx", 1)
        _write_audio(folder / clip[:4] / f"{clip}.ogg", "OGG")
        _write_tsv(folder / "asr_train.tsv", VOXPOPULI_HEADER, [_vp_row(clip, "ein satz", "train", speaker=0)])
    return release


def _cv_row(locale: str, path: str, text: str, *, speaker: int) -> dict[str, str]:
    return {"client_id": hashlib.sha256(f"{locale}-{speaker}".encode()).hexdigest(), "path": path,
            "sentence_id": hashlib.sha256(text.encode()).hexdigest(), "sentence": text, "sentence_domain": "",
            "up_votes": "2", "down_votes": "0", "age": "", "gender": "", "accents": "", "variant": "",
            "locale": locale, "segment": ""}


def _vp_id(lang: str, number: int) -> str:
    year = 2018 + number % 2
    return f"{year}0206-0900-PLENARY-{number}-{lang}_{year}0206-17:58:{number % 60:02d}_{number}"


def _vp_row(clip: str, text: str, split: str, *, speaker: int) -> dict[str, str]:
    return {"id": clip, "raw_text": text, "normalized_text": text.lower().replace('"', ""),
            "speaker_id": str(1000 + speaker), "split": split, "gender": "female", "is_gold_transcript": "True",
            "accent": "None"}


def _write_audio(path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = "VORBIS" if fmt == "OGG" else None
    sf.write(str(path), clip_samples(path.name), SAMPLE_RATE, format=fmt, subtype=subtype)


def _write_tsv(path: Path, header: tuple[str, ...], rows: list[dict[str, str]]) -> None:
    lines = ["\t".join(header), *("\t".join(row[c] for c in header) for row in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
