"""Common Voice and VoxPopuli readers on miniature releases with real MP3/OGG audio (tests/helpers)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
import soundfile as sf

from storage.importers import SPLITS, SourceLayoutError, common_voice, voxpopuli
from tests.helpers.sources_cv_voxpopuli import (
    INVALID_LOCALE,
    QUOTE_SENTENCE,
    make_common_voice,
    make_voxpopuli,
    sentence,
)


@pytest.fixture(scope="module")
def cv(tmp_path_factory) -> Path:
    """A clean two-locale Common Voice release (read only)."""
    return make_common_voice(tmp_path_factory.mktemp("cv"))


@pytest.fixture(scope="module")
def vp(tmp_path_factory) -> Path:
    """A clean two-language VoxPopuli release (read only)."""
    return make_voxpopuli(tmp_path_factory.mktemp("vp"))


def _by_id(rows, split: str) -> dict[str, dict]:
    return {r.row["id"]: r.row for r in rows if r.split == split}


# --- Common Voice -----------------------------------------------------------------------------------------------


def test_common_voice_maps_splits_columns_and_paths(cv):
    rows = list(common_voice.read(str(cv)))
    assert {r.split for r in rows} == {"labeled", "dev", "test", "unlabeled"}
    expected = {}  # the builder numbers clips 1001.. per locale: train 2, dev 2, test 2, other 2
    for locale in ("de", "sl"):
        number = 1000
        for split, name in (("labeled", "train"), ("dev", "dev"), ("test", "test"), ("unlabeled", "other")):
            for i in range(2):
                number += 1
                text = QUOTE_SENTENCE if name == "train" and i == 0 else sentence(locale, name, i)
                expected[f"common_voice_{locale}_{number}"] = (split, locale, None if split == "unlabeled" else text)
    got = {r.row["id"]: (r.split, r.row["language"], r.row.get("text")) for r in rows}
    assert got == expected  # validated.tsv and invalidated.tsv (clip 1009) are not read
    assert len(rows) == len(expected)
    for r in rows:
        assert os.path.isabs(r.row["audio"]) and os.path.isfile(r.row["audio"])
        assert r.row["audio"] == str(cv / r.row["language"] / "clips" / f"{r.row['id']}.mp3")
        assert len(r.row["speaker"]) == 64 and "duration_s" not in r.row
        if r.split == "unlabeled":
            assert "text" not in r.row  # other.tsv's prompt is not a transcript
    labeled = _by_id(rows, "labeled")
    # the unbalanced quote does not swallow the next line
    assert labeled["common_voice_de_1001"]["text"] == 'Er sagte "Hallo und ging.'
    assert labeled["common_voice_de_1002"]["text"] == sentence("de", "train", 1)
    assert labeled["common_voice_de_1001"]["speaker"] != labeled["common_voice_de_1002"]["speaker"]


def test_common_voice_relative_locale_folder_and_languages(cv, monkeypatch):
    monkeypatch.chdir(cv)
    rows = list(common_voice.read("sl/"))
    assert rows and {r.row["language"] for r in rows} == {"sl"}
    assert all(r.row["audio"].startswith(str(cv / "sl" / "clips") + "/") for r in rows)
    assert {r.row["language"] for r in common_voice.read(str(cv), languages=["SL"])} == {"sl"}
    assert list(common_voice.read(str(cv), languages=["fr"])) == []


def test_common_voice_language_codes_compare_loosely(tmp_path):
    release = make_common_voice(tmp_path, locales=("pt-BR", "de"), clips_per_split=1)
    rows = list(common_voice.read(str(release), languages=["pt_br"]))
    assert rows and {r.row["language"] for r in rows} == {"pt-BR"}  # as spelled: the caller normalizes


def test_common_voice_old_release_without_locale_column(tmp_path):
    release = make_common_voice(tmp_path, locales=("sl",), clips_per_split=1)
    train = release / "sl" / "train.tsv"
    lines = [line.split("\t") for line in train.read_text().splitlines()]
    keep = [i for i, name in enumerate(lines[0]) if name in ("path", "sentence", "client_id", "up_votes")]
    keep.reverse()  # columns in another order: found by name, never by position
    train.write_text("".join("\t".join(f[i] for i in keep) + "\n" for f in lines))
    labeled = _by_id(common_voice.read(str(release / "sl")), "labeled")
    assert labeled["common_voice_sl_1002"]["language"] == "sl"
    assert labeled["common_voice_sl_1002"]["text"] == sentence("sl", "train", 1)


def test_common_voice_bad_lines_become_rejects_and_reading_goes_on(tmp_path):
    release = make_common_voice(tmp_path, locales=("de",), clips_per_split=2)
    train = release / "de" / "train.tsv"
    lines = train.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3  # header, lines 2 and 3
    good = lines[2].replace(b"common_voice_de_1002", b"common_voice_de_1003")
    train.write_bytes(b"".join([*lines, b"too\tfew\tfields\n", b"\xff\xfe not utf-8\t" * 3 + b"\n", good]))
    rows = list(common_voice.read(str(release)))
    rejects = [r.row for r in rows if r.split == "reject"]
    assert [r["language"] for r in rejects] == ["de", "de"]
    assert f"{train} line 4 " in rejects[0]["reason"] and "3 tab-separated fields" in rejects[0]["reason"]
    assert f"{train} line 5 " in rejects[1]["reason"] and "UTF-8" in rejects[1]["reason"]
    assert "common_voice_de_1003" in _by_id(rows, "labeled")  # the line after the bad ones is read
    assert len(_by_id(rows, "dev")) == 2


def test_common_voice_bad_rows_are_passed_on_for_the_caller(tmp_path):
    release = make_common_voice(tmp_path, locales=("de", "sl"), clips_per_split=2, bad_rows=True)
    rows = list(common_voice.read(str(release)))
    assert not [r for r in rows if r.split == "reject"]  # audio, text and codes are the caller's checks
    labeled = _by_id(rows, "labeled")
    assert not os.path.exists(labeled["common_voice_de_missing"]["audio"])
    with pytest.raises(Exception):  # noqa: B017 - soundfile raises several types for corrupt input
        sf.info(labeled["common_voice_de_corrupt"]["audio"])
    assert labeled["common_voice_de_empty_text"]["text"] == ""
    assert labeled["common_voice_de_bad_locale"]["language"] == INVALID_LOCALE
    dev_ids = [r.row["id"] for r in rows if r.split == "dev"]
    assert "common_voice_de_1001" in dev_ids and "common_voice_de_1001" in labeled
    assert not any("sl_missing" in r.row["id"] for r in rows)


def test_common_voice_wrong_layout_names_what_was_expected(tmp_path, cv):
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "empty", tmp_path / "absent", cv / "de" / "clips"):
        with pytest.raises(SourceLayoutError, match=r"not a Common Voice folder: expected .*/clips/ with train\.tsv"):
            common_voice.read(str(src))
    broken = tmp_path / "broken"
    shutil.copytree(cv / "sl", broken)
    (broken / "dev.tsv").write_text("client_id\tfile\tsentence\nabc\tx.mp3\thallo\n")
    with pytest.raises(SourceLayoutError, match=r"dev\.tsv lacks a column: .*naming path, sentence"):
        list(common_voice.read(str(broken)))


def test_common_voice_reads_fsspec_urls_and_keeps_the_protocol(cv):
    fs = fsspec.filesystem("memory")
    base = f"/cv-{uuid.uuid4().hex}"
    fs.put(str(cv / "sl"), base + "/sl", recursive=True)
    try:
        rows = list(common_voice.read(f"memory://{base}"))
        assert len(rows) == 8
        for r in rows:
            assert r.row["audio"] == f"memory://{base}/sl/clips/{r.row['id']}.mp3"
            assert fs.exists(r.row["audio"])
    finally:
        fs.rm(base, recursive=True)


def test_readers_are_lazy_iterators(cv, vp):
    for rows in (common_voice.read(str(cv)), voxpopuli.read(str(vp))):
        assert iter(rows) is rows
        assert next(rows).split in SPLITS


def test_generated_audio_decodes(cv, vp):
    mp3 = sf.info(str(cv / "de" / "clips" / "common_voice_de_1001.mp3"))
    ogg = sf.info(next(r.row["audio"] for r in voxpopuli.read(str(vp)) if r.split == "unlabeled"))
    assert (mp3.format, ogg.format, ogg.subtype) == ("MP3", "OGG", "VORBIS")
    for info in (mp3, ogg):
        assert info.samplerate == 16000 and info.channels == 1 and 0.6 <= info.duration <= 1.3
    wav, _ = sf.read(str(cv / "de" / "clips" / "common_voice_de_1002.mp3"))
    assert 0.05 < abs(wav).max() < 0.6


# --- VoxPopuli --------------------------------------------------------------------------------------------------


def test_voxpopuli_maps_both_subtrees(vp):
    rows = list(voxpopuli.read(str(vp)))
    assert not [r for r in rows if r.split == "reject"]
    labeled, dev, test = _by_id(rows, "labeled"), _by_id(rows, "dev"), _by_id(rows, "test")
    unlabeled = _by_id(rows, "unlabeled")
    assert (len(labeled), len(dev), len(test), len(unlabeled)) == (4, 4, 4, 6)
    first, second = "20190206-0900-PLENARY-1-de_20190206-17:58:01_1", "20180206-0900-PLENARY-2-de_20180206-17:58:02_2"
    assert labeled[first]["text"] == QUOTE_SENTENCE
    assert labeled[second]["text"] == sentence("de", "train", 1)  # empty raw_text: normalized_text
    assert labeled[first]["audio"] == str(vp / "transcribed_data" / "de" / "2019" / f"{first}.ogg")
    assert labeled[second]["audio"] == str(vp / "transcribed_data" / "de" / "2018" / f"{second}.ogg")
    assert (labeled[first]["speaker"], labeled[second]["speaker"]) == ("1000", "1001")
    assert dev["20180206-0900-PLENARY-4-sl_20180206-17:58:04_4"]["text"] == sentence("sl", "dev", 1)
    assert sorted(unlabeled) == sorted(f"{2018 + i % 2}0315-0900-PLENARY-{lang}_{i}" for lang in ("de", "sl")
                                       for i in range(3))  # .partial.ogg and notes.txt skipped
    for r in rows:
        assert os.path.isfile(r.row["audio"]) and r.row["language"] in ("de", "sl")
        assert ("text" in r.row) == (r.split != "unlabeled")


def test_voxpopuli_languages_and_one_subtree(tmp_path, vp):
    assert {r.row["language"] for r in voxpopuli.read(str(vp), languages=["SL"])} == {"sl"}
    only = tmp_path / "only-unlabelled"
    shutil.copytree(vp / "unlabelled_data", only / "unlabelled_data")
    assert {r.split for r in voxpopuli.read(str(only))} == {"unlabeled"}
    only = tmp_path / "only-transcribed"
    shutil.copytree(vp / "transcribed_data" / "de", only / "transcribed_data" / "de")
    assert {r.split for r in voxpopuli.read(str(only))} == {"labeled", "dev", "test"}


def test_voxpopuli_bad_rows_are_passed_on_for_the_caller(tmp_path):
    release = make_voxpopuli(tmp_path, bad_rows=True)
    rows = list(voxpopuli.read(str(release)))
    assert not [r for r in rows if r.split == "reject"]
    labeled = _by_id(rows, "labeled")
    by_kind = {k: next(v for i, v in labeled.items() if i.endswith(k)) for k in ("_missing", "_corrupt", "_text")}
    assert not os.path.exists(by_kind["_missing"]["audio"]) and os.path.isfile(by_kind["_corrupt"]["audio"])
    assert by_kind["_text"]["text"] == ""
    assert INVALID_LOCALE in {r.row["language"] for r in rows}
    assert set(_by_id(rows, "dev")) & set(labeled)  # the duplicate id


def test_voxpopuli_bad_lines_become_rejects_and_reading_goes_on(tmp_path):
    release = make_voxpopuli(tmp_path, languages=("de",), unlabeled_per_language=1)
    tsv = release / "transcribed_data" / "de" / "asr_train.tsv"
    lines = tsv.read_bytes().splitlines(keepends=True)
    good = lines[2]
    no_year = b"noyear\traw\tnorm\t1\ttrain\tm\tTrue\tNone\n"
    tsv.write_bytes(b"".join([*lines, b"a\tb\n", b"\xe4rger\t" * 7 + b"x\n", no_year,
                              good.replace(b"PLENARY-2", b"PLENARY-7")]))
    rows = list(voxpopuli.read(str(release)))
    reasons = [r.row["reason"] for r in rows if r.split == "reject"]
    assert len(reasons) == 3
    assert f"{tsv} line 4 " in reasons[0] and "2 tab-separated fields" in reasons[0]
    assert f"{tsv} line 5 " in reasons[1] and "UTF-8" in reasons[1]
    assert f"{tsv} line 6: id 'noyear' does not start with a year" in reasons[2]
    labeled = _by_id(rows, "labeled")
    assert "20180206-0900-PLENARY-7-de_20180206-17:58:02_2" in labeled and len(labeled) == 3


def test_voxpopuli_wrong_layout_names_both_subfolders(tmp_path, vp):
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "empty", tmp_path / "absent", vp / "transcribed_data"):
        with pytest.raises(SourceLayoutError, match=r"not a VoxPopuli folder: .*transcribed_data/.*unlabelled_data/"):
            voxpopuli.read(str(src))
    broken = tmp_path / "broken" / "transcribed_data" / "de"
    broken.mkdir(parents=True)
    (broken / "asr_dev.tsv").write_text("utt\ttext\nx\ty\n")
    expected = r"asr_dev\.tsv lacks a column: .*naming id, raw_text or normalized_text \(it names utt, text\)"
    with pytest.raises(SourceLayoutError, match=expected):
        list(voxpopuli.read(str(tmp_path / "broken")))
