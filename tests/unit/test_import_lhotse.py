"""The lhotse reader on genuine lhotse artifacts: RecordingSet + SupervisionSet pairs, CutSet manifests, Shar."""

from __future__ import annotations

import gzip
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import AudioSource, CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

from storage.files import read_bytes
from storage.importers import SourceLayoutError
from storage.importers.lhotse_manifests import _same_order, language_code, read
from tests.helpers.sources_lhotse import (
    CUT_OFFSET_S,
    LONG_SPANS_S,
    TEXTS,
    make_lhotse_cuts,
    make_lhotse_manifests,
    make_lhotse_shar,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Every layout, built once: good ones and ones with bad rows."""
    good, bad = tmp_path_factory.mktemp("lhotse-good"), tmp_path_factory.mktemp("lhotse-bad")
    return {"pairs": make_lhotse_manifests(good), "cuts": make_lhotse_cuts(good), "shar": make_lhotse_shar(good),
            "bad_pairs": make_lhotse_manifests(bad, bad_rows=True), "bad_cuts": make_lhotse_cuts(bad, bad_rows=True),
            "bad_shar": make_lhotse_shar(bad, bad_rows=True)}


def by_id(rows) -> dict:
    """Rows by id (ids unique in the source)."""
    out = {r.row["id"]: r for r in rows}
    assert len(out) == len(rows), "duplicate ids"
    return out


def test_pairs_rows(built):
    rows = read(str(built["pairs"]))
    assert isinstance(rows, Iterator)
    got = by_id(list(rows))
    expected = {f"{lang}_{key}" for lang in ("de", "sl") for key in TEXTS[lang]} | {"de_nosup", "sl_nosup"}
    assert set(got) == expected
    for lang in ("de", "sl"):
        assert got[f"{lang}_dev-0"].split == "dev" and got[f"{lang}_test-0"].split == "test"
        assert got[f"{lang}_short-0"].split == "labeled" and got[f"{lang}_nosup"].split == "unlabeled"
        assert got[f"{lang}_nosup"].row["text"] is None and "start_s" not in got[f"{lang}_nosup"].row
        for key, text in TEXTS[lang].items():
            row = got[f"{lang}_{key}"].row
            assert row["text"] == text and row["language"] == lang and row["speaker"] == f"{lang}_spk1"
            assert os.path.isabs(row["audio"]) and os.path.exists(row["audio"])
        assert "start_s" not in got[f"{lang}_short-0"].row and got[f"{lang}_short-0"].row["duration_s"] == 1.0
    # Offset supervisions carry exactly the supervision's start and end ("sl" was spelled "Slovenian").
    for lang in ("de", "sl"):
        for sup in SupervisionSet.from_file(built["pairs"] / f"cv_supervisions_{lang}_train.jsonl.gz"):
            row = got[sup.id].row
            if sup.id.split("_")[1].startswith("long"):
                assert (row["start_s"], row["end_s"]) == (sup.start, sup.end) == LONG_SPANS_S[sup.id.split("_")[1]]
                assert row["duration_s"] == pytest.approx(sup.duration)
                assert row["audio"].endswith(f"{lang}_long.flac")


def test_pairs_out_of_order_join_the_same(built, tmp_path):
    folder = tmp_path / "shuffled"
    folder.mkdir()
    for name in ("cv_recordings_de_train.jsonl.gz", "cv_supervisions_de_train.jsonl.gz"):
        (folder / name).write_bytes((built["bad_pairs"] / name).read_bytes())
    sups = list(SupervisionSet.from_file(folder / "cv_supervisions_de_train.jsonl.gz"))
    orphan = SupervisionSegment(id="orphan-0", recording_id="nowhere", start=0.0, duration=1.0, text="x")
    SupervisionSet.from_segments([*reversed(sups), orphan]).to_file(folder / "cv_supervisions_de_train.jsonl.gz")
    shuffled = list(read(str(folder)))
    ordered = list(read(str(built["bad_pairs"])))

    def key(r):
        return r.split, r.row["id"], r.row["audio"] or ""

    assert not _same_order(str(folder / "cv_recordings_de_train.jsonl.gz"),
                           str(folder / "cv_supervisions_de_train.jsonl.gz"))
    assert _same_order(str(built["bad_pairs"] / "cv_recordings_de_train.jsonl.gz"),
                       str(built["bad_pairs"] / "cv_supervisions_de_train.jsonl.gz"))
    orphans = [r for r in shuffled if r.row["id"] == "orphan-0"]
    assert len(orphans) == 1 and orphans[0].split == "reject" and "nowhere" in orphans[0].row["reason"]
    de_train = sorted((r for r in ordered if r.row["id"].startswith("de_") and r.split in ("labeled", "unlabeled")),
                      key=key)
    assert sorted((r for r in shuffled if r.row["id"] != "orphan-0"), key=key) == de_train


def test_pairs_bad_rows_reach_the_importer(built):
    rows = list(read(str(built["bad_pairs"])))
    ids = [r.row["id"] for r in rows]
    assert ids.count("de_long-0") == 2  # duplicates are the importer's to reject
    row = next(r for r in rows if r.row["id"] == "de_missing-0")
    assert row.split == "labeled" and not os.path.exists(row.row["audio"])  # the audio probe rejects it
    empty = next(r for r in rows if r.row["id"] == "de_empty-0")
    assert empty.split == "labeled" and empty.row["text"] == "" and empty.row["start_s"] == 2.78


def test_cuts_rows(built, tmp_path):
    got = [r for r in read(str(built["bad_cuts"]))]
    rows = {r.row["id"]: r for r in got if r.row["id"] != "de_long-0"}
    cuts = {c.id: c for c in CutSet.from_file(built["bad_cuts"])}
    for lang in ("de", "sl"):
        cut = cuts[f"{lang}_long"]
        assert cut.start == CUT_OFFSET_S
        sup = next(s for s in cut.supervisions if s.id == f"{lang}_long-1")
        row = rows[f"{lang}_long-1"].row
        assert (row["start_s"], row["end_s"]) == (round(cut.start + sup.start, 6), round(cut.start + sup.end, 6))
        assert (row["start_s"], row["end_s"]) == LONG_SPANS_S["long-1"]
        assert rows[f"{lang}_nosup"].split == "unlabeled" and rows[f"{lang}_nosup"].row["duration_s"] == 1.0
    assert rows["de_short-0"].split == "labeled" and "start_s" not in rows["de_short-0"].row
    command = rows["de_command-0"]
    assert command.split == "reject" and "'command'" in command.row["reason"]
    # Split from the file name, the option over it; language option for clips without a supervision.
    assert {r.split for r in read(str(make_lhotse_cuts(tmp_path, "dev")))} == {"dev"}
    opted = list(read(str(built["cuts"]), split="test", language="de"))
    assert {r.split for r in opted} == {"test", "unlabeled"}
    assert next(r for r in opted if r.row["id"] == "sl_nosup").row["language"] == "de"
    assert next(r for r in opted if r.row["id"] == "sl_long-0").row["language"] == "sl"


def test_shar_audio_read_in_place_matches_the_cuts(built):
    rows = by_id(list(read(str(built["shar"]))))
    assert {r.split for r in rows.values()} == {"labeled", "unlabeled"}  # "shar_train"
    source_cuts = list(CutSet.from_file(built["cuts"]))
    checked = 0
    for cut in source_cuts:
        for sup in cut.supervisions or [None]:
            row = rows[sup.id if sup else cut.id].row
            url = row["audio"]
            member, tar = url.removeprefix("tar://").split("::")
            assert member == f"{cut.id}.flac" and os.path.isabs(tar) and Path(tar).name.startswith("recording.")
            samples, sr = sf.read(io.BytesIO(read_bytes(url)), dtype="float32")
            assert sr == 16000 and len(samples) == round(cut.duration * sr)
            if sup is not None and "start_s" in row:
                assert (row["start_s"], row["end_s"]) == (sup.start, sup.end)  # within the cut: Shar stores it
                stretch = samples[round(row["start_s"] * sr):round(row["end_s"] * sr)]
                reference = cut.truncate(offset=sup.start, duration=sup.duration).load_audio()[0]
            else:
                stretch, reference = samples, cut.load_audio()[0]
            n = min(len(stretch), len(reference))
            assert abs(len(stretch) - len(reference)) <= 1 and n > 0
            np.testing.assert_allclose(stretch[:n], reference[:n], atol=2 / 32768)  # FLAC 16-bit
            checked += 1
    assert checked == len(rows) == 8


def test_shar_bad_rows(built):
    rows = list(read(str(built["bad_shar"])))
    empty = next(r for r in rows if r.row["id"] == "de_empty-0")
    assert empty.split == "labeled" and empty.row["text"] == ""
    assert empty.row["start_s"] == pytest.approx(2.78 - CUT_OFFSET_S)
    assert [r.row["id"] for r in rows].count("de_long-0") == 2


def test_url_source_and_transformed_recording(tmp_path):
    url_rec = Recording(id="u", sources=[AudioSource(type="url", channels=[0], source="https://example.org/u.flac")],
                        sampling_rate=16000, num_samples=32000, duration=2.0)
    fast = Recording(id="f", sources=[AudioSource(type="file", channels=[0], source="f.flac")],
                     sampling_rate=16000, num_samples=32000, duration=2.0).perturb_speed(1.1)
    RecordingSet.from_recordings([url_rec, fast]).to_file(tmp_path / "x_recordings_test.jsonl.gz")
    SupervisionSet.from_segments([
        SupervisionSegment(id="u-0", recording_id="u", start=0.5, duration=1.0, text="a", language="German"),
        SupervisionSegment(id="f-0", recording_id=fast.id, start=0.0, duration=1.0, text="b"),
    ]).to_file(tmp_path / "x_supervisions_test.jsonl.gz")
    rows = by_id(list(read(str(tmp_path), language="sl")))
    assert rows["u-0"].split == "test"
    assert rows["u-0"].row == {"id": "u-0", "audio": "https://example.org/u.flac", "language": "de",
                               "text": "a", "duration_s": 1.0, "speaker": None, "start_s": 0.5, "end_s": 1.5}
    assert rows["f-0"].split == "reject" and "Speed" in rows["f-0"].row["reason"]
    assert rows["f-0"].row["language"] == "sl"


def test_language_names():
    assert language_code("German") == "de" and language_code(" slovene ") == "sl"
    assert language_code("de") == "de" and language_code("Klingon") == "Klingon" and language_code(None) is None


def test_wrong_layouts(built, tmp_path):
    def fails(src, words):
        with pytest.raises(SourceLayoutError) as err:
            read(str(src))
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)

    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", ["CutSet", "Shar"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    fails(tmp_path / "other", ["recordings"])
    fails(tmp_path / "nothing-here", ["does not exist"])
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "cv_recordings_de_train.jsonl.gz").write_bytes(
        (built["pairs"] / "cv_recordings_de_train.jsonl.gz").read_bytes())
    fails(lone, ["cv_recordings_de_train.jsonl.gz", "supervisions"])
    fails(lone / "cv_recordings_de_train.jsonl.gz", ["Recording"])
    no_tars = tmp_path / "no_tars"
    no_tars.mkdir()
    (no_tars / "cuts.000000.jsonl.gz").write_bytes((built["shar"] / "cuts.000000.jsonl.gz").read_bytes())
    fails(no_tars, ["recording.000000.tar"])


def test_streams_line_by_line(built, tmp_path):
    # A manifest whose last line is broken still yields its first rows: nothing reads the whole file first.
    path = tmp_path / "cuts_train.jsonl"
    path.write_bytes(gzip.decompress(built["cuts"].read_bytes()) + b"{not json\n")
    rows = read(str(path))
    assert next(rows).row["id"] == "de_long-0" and next(rows).row["id"] == "de_long-1"
    with pytest.raises(ValueError, match="line 7"):
        list(rows)


def test_without_lhotse_names_the_fix(monkeypatch, built):
    monkeypatch.setitem(sys.modules, "lhotse", None)
    with pytest.raises(ImportError, match="pip install lhotse"):
        read(str(built["cuts"]))
