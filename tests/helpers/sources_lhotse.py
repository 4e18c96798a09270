"""Miniature lhotse corpora written with lhotse's own API, for the lhotse reader's tests and the import end to end.

Every builder writes under `root` and returns what to import. The audio is 16 kHz mono FLAC (noisy tones). Per
language ("de", "sl") and split the recordings are:

- train: `<lang>_long` (3 s) with two supervisions `<lang>_long-0` [0.25, 1.25) s and `<lang>_long-1`
  [1.5, 2.75) s; `<lang>_short` (1 s) with one whole-recording supervision `<lang>_short-0`; `<lang>_nosup`
  (1 s) with no supervision (an unlabeled clip);
- dev / test: `<lang>_dev` / `<lang>_test` (1 s) with one whole-recording supervision `<lang>_dev-0` / `<lang>_test-0`.

`bad_rows=True` adds (train only, language "de"): `de_missing` whose audio file does not exist with supervision
`de_missing-0` (manifests and cuts), `de_command` whose audio is a shell command's output (cuts only; lhotse
cannot write an in-memory recording to JSONL), `de_empty-0` with empty text on
`de_long` [2.78, 2.88) s, and a second supervision with the id `de_long-0` on `de_short` [0.1, 0.9) s.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.dummies import tone, write_flac

SR = 16000
LANGS = ("de", "sl")
SPLITS = ("train", "dev", "test")
LANGUAGE_NAMES = {"de": "German", "sl": "Slovenian"}
TEXTS = {
    "de": {"long-0": "guten morgen", "long-1": "wie geht es dir", "short-0": "danke schön", "dev-0": "ja bitte",
           "test-0": "auf wiedersehen"},
    "sl": {"long-0": "dober dan", "long-1": "kako si", "short-0": "hvala lepa", "dev-0": "prosim",
           "test-0": "nasvidenje"},
}
LONG_SPANS_S = {"long-0": (0.25, 1.25), "long-1": (1.5, 2.75)}
CUT_OFFSET_S = 0.2  # the cut over `<lang>_long` starts here, so its supervisions are offset within the cut
CUT_DURATION_S = 2.7


def _recording(audio_dir: Path, rec_id: str, duration_s: float, seed: int):
    from lhotse import Recording

    path = write_flac(audio_dir / f"{rec_id}.flac", tone(duration_s, 200.0 + 37.0 * seed, SR, seed=seed))
    return Recording.from_file(path, recording_id=rec_id)


def _supervision(sup_id: str, rec_id: str, start: float, end: float, lang: str, text: str | None,
                 language: str | None = None):
    from lhotse import SupervisionSegment

    return SupervisionSegment(id=sup_id, recording_id=rec_id, start=start, duration=round(end - start, 6),
                              channel=0, text=text, language=language or lang, speaker=f"{lang}_spk1")


def _missing_recording(audio_dir: Path):
    from lhotse import AudioSource, Recording

    # Recording.from_file needs the file, so the manifest of a file that is gone is written by hand.
    return Recording(id="de_missing", sources=[AudioSource(type="file", channels=[0],
                                                           source=str(audio_dir / "de_missing.flac"))],
                     sampling_rate=SR, num_samples=SR, duration=1.0)


def corpus(audio_dir: Path, lang: str, split: str, *, bad_rows: bool = False,
           language: str | None = None) -> tuple[list, list]:
    """(recordings, supervisions) of one language and split, audio written under `audio_dir`; `language` is the
    spelling written into the supervisions (default the code)."""
    seed = 10 * LANGS.index(lang)
    texts = TEXTS[lang]
    recs, sups = [], []
    if split == "train":
        long = _recording(audio_dir, f"{lang}_long", 3.0, seed + 1)
        short = _recording(audio_dir, f"{lang}_short", 1.0, seed + 2)
        nosup = _recording(audio_dir, f"{lang}_nosup", 1.0, seed + 3)
        recs += [long, short, nosup]
        for key, (start, end) in LONG_SPANS_S.items():
            sups.append(_supervision(f"{lang}_{key}", long.id, start, end, lang, texts[key], language))
        if bad_rows and lang == "de":
            sups.append(_supervision("de_empty-0", long.id, 2.78, 2.88, lang, "", language))
        sups.append(_supervision(f"{lang}_short-0", short.id, 0.0, 1.0, lang, texts["short-0"], language))
        if bad_rows and lang == "de":
            sups.append(_supervision("de_long-0", short.id, 0.1, 0.9, lang, "doppelt", language))
            missing = _missing_recording(audio_dir)
            recs.append(missing)
            sups.append(_supervision("de_missing-0", missing.id, 0.0, 1.0, lang, "fehlt", language))
    else:
        rec = _recording(audio_dir, f"{lang}_{split}", 1.0, seed + 4 + SPLITS.index(split))
        recs.append(rec)
        sups.append(_supervision(f"{lang}_{split}-0", rec.id, 0.0, 1.0, lang, texts[f"{split}-0"], language))
    return recs, sups


def make_lhotse_manifests(root: Path, *, bad_rows: bool = False) -> Path:
    """A folder of RecordingSet + SupervisionSet pairs as lhotse recipes write them,
    `cv_recordings_<lang>_<split>.jsonl.gz` + `cv_supervisions_<lang>_<split>.jsonl.gz` for de and sl and
    train/dev/test; "sl" supervisions spell the language "Slovenian" (as many recipes do), "de" as "de"."""
    from lhotse import RecordingSet, SupervisionSet

    out = Path(root) / "lhotse_manifests"
    for lang in LANGS:
        for split in SPLITS:
            spelling = LANGUAGE_NAMES[lang] if lang == "sl" else lang
            recs, sups = corpus(out / "audio", lang, split, bad_rows=bad_rows, language=spelling)
            RecordingSet.from_recordings(recs).to_file(out / f"cv_recordings_{lang}_{split}.jsonl.gz")
            SupervisionSet.from_segments(sups).to_file(out / f"cv_supervisions_{lang}_{split}.jsonl.gz")
    return out


def cuts(audio_dir: Path, split: str = "train", *, bad_rows: bool = False) -> list:
    """The cuts of one split for de and sl: over `<lang>_long` a cut from CUT_OFFSET_S for CUT_DURATION_S (its
    supervisions offset within it), whole-recording cuts for the rest; with `bad_rows`, a cut over a missing
    file and one whose audio is a command's output."""
    from lhotse import AudioSource, Recording
    from lhotse.utils import fastcopy

    out = []
    for lang in LANGS:
        recs, sups = corpus(audio_dir, lang, split, bad_rows=bad_rows)
        for rec in recs:
            cut = fastcopy(rec.to_cut(), supervisions=[s for s in sups if s.recording_id == rec.id])
            if rec.id.endswith("_long"):
                cut = cut.truncate(offset=CUT_OFFSET_S, duration=CUT_DURATION_S, preserve_id=True)
            out.append(cut)
    if bad_rows and split == "train":
        command = AudioSource(type="command", channels=[0], source="sox -n -t flac - synth 1")
        rec = Recording(id="de_command", sources=[command], sampling_rate=SR, num_samples=SR, duration=1.0)
        sup = _supervision("de_command-0", rec.id, 0.0, 1.0, "de", "befehl")
        out.append(fastcopy(rec.to_cut(), supervisions=[sup]))
    return out


def make_lhotse_cuts(root: Path, split: str = "train", *, bad_rows: bool = False) -> Path:
    """A CutSet manifest `cuts_<split>.jsonl.gz` of `cuts(...)` (audio beside it under `audio/`)."""
    from lhotse import CutSet

    out = Path(root) / "lhotse_cuts"
    path = out / f"cuts_{split}.jsonl.gz"
    CutSet.from_cuts(cuts(out / "audio", split, bad_rows=bad_rows)).to_file(path)
    return path


def make_lhotse_shar(root: Path, split: str = "train", *, bad_rows: bool = False, shard_size: int = 2) -> Path:
    """A Lhotse Shar folder `shar_<split>` written by `CutSet.to_shar(dir, fields={"recording": "flac"})` from
    `cuts(...)` (several shards); `bad_rows` adds only the empty-text and duplicate-id supervisions (Shar
    cannot hold a missing file)."""
    from lhotse import CutSet

    out = Path(root) / f"shar_{split}"
    out.mkdir(parents=True, exist_ok=True)
    cutset = CutSet.from_cuts(c for c in cuts(Path(root) / "shar_audio", split, bad_rows=bad_rows)
                              if c.id not in ("de_missing", "de_command"))
    cutset.to_shar(out, fields={"recording": "flac"}, shard_size=shard_size)
    return out
