"""NeMo (plain and tarred) and Hugging Face Parquet readers: rows, splits, ids, offsets, audio, rejects, layouts."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf

from storage import files
from storage.importers import SourceLayoutError, huggingface, nemo
from tests.helpers.sources_nemo_hf import (
    UNKNOWN_LANGUAGE,
    audio_bytes,
    clip,
    make_hf_parquet,
    make_nemo,
    make_nemo_tarred,
)


def _rows(rows):
    """(good rows by split, rejects)."""
    rows = list(rows)
    good = [r for r in rows if r.split != "reject"]
    return good, [r.row for r in rows if r.split == "reject"]


def _manifest_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# --- NeMo manifests ----------------------------------------------------------------------------------------------


def test_nemo_folder_rows_splits_texts_offsets(tmp_path):
    root = make_nemo(tmp_path / "nemo")
    first, rejects = _rows(nemo.read(str(root)))
    second, _ = _rows(nemo.read(str(root)))
    assert rejects == []
    ids = [r.row["id"] for r in first]
    assert len(ids) == len(set(ids)) == 2 * 2 * 3 + 2
    assert ids == [r.row["id"] for r in second]  # stable across reads
    assert Counter(r.split for r in first) == {"labeled": 6, "dev": 4, "test": 4}

    expected = {}  # (audio, offset) -> (split, text) straight from the manifests
    for name, split in (("train", "labeled"), ("dev", "dev"), ("test", "test")):
        for obj in _manifest_lines(root / f"{name}_manifest.json"):
            audio = files.resolve_relative(obj["audio_filepath"], str(root / f"{name}_manifest.json"))
            expected[(audio, obj.get("offset"))] = (split, obj["text"], obj["lang"], obj["duration"])
    for r in first:
        split, text, lang, duration = expected[(r.row["audio"], r.row.get("start_s"))]
        assert (r.split, r.row["text"], r.row["language"], r.row["duration_s"]) == (split, text, lang, duration)
        assert os.path.exists(r.row["audio"])

    segments = sorted((r.row for r in first if "start_s" in r.row), key=lambda row: row["start_s"])
    assert [(s["start_s"], s["end_s"]) for s in segments] == [(0.1, pytest.approx(0.9)), (1.05, pytest.approx(1.85))]
    assert [s["id"] for s in segments] == ["audio/long_de@0.1", "audio/long_de@1.05"]
    assert segments[0]["audio"] == segments[1]["audio"]
    assert "audio/train/de_0" in ids and "audio/dev/sl_1" in ids  # path below the manifest folder, no extension


def test_nemo_bad_rows_only_broken_lines_rejected(tmp_path):
    root = make_nemo(tmp_path / "nemo", bad_rows=True)
    good, rejects = _rows(nemo.read(str(root)))
    assert len(rejects) == 1 and "train_manifest.json line" in rejects[0]["reason"]
    assert "not JSON" in rejects[0]["reason"]
    # missing/corrupt audio, empty text, unknown language and duplicates are the importer's to reject
    by_id = Counter(r.row["id"] for r in good)
    assert by_id["audio/long_de@1.05"] == 2
    assert {"audio/train/missing", "audio/train/corrupt", "audio/train/empty_text"} <= set(by_id)
    assert any(r.row["language"] == UNKNOWN_LANGUAGE for r in good)
    assert any(r.row["text"] == "" and r.split == "labeled" for r in good)


def test_nemo_single_file_split_language_and_unlabeled(tmp_path):
    audio = tmp_path / "a.wav"
    audio.write_bytes(audio_bytes(clip(1), "WAV"))
    manifest = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"audio_filepath": "a.wav", "duration": 0.6, "text": "Hallo,  Welt!", "extra": 1}),
        json.dumps({"audio_filepath": "a.wav", "duration": 0.6, "offset": 0, "lang": "sl"}),
        json.dumps({"audio_filepath": "a.wav", "duration": 0.3, "offset": 0.25, "text": None}),
        json.dumps({"audio_filepath": "a.wav", "offset": 0.25, "text": "x"}),
        json.dumps([1, 2]),
    ]
    manifest.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n")

    good, rejects = _rows(nemo.read(str(manifest), language="de"))
    assert [r.split for r in good] == ["labeled", "unlabeled", "unlabeled"]  # no split word in the name: labeled
    assert good[0].row == {"id": "a", "audio": str(audio), "language": "de", "duration_s": 0.6,
                           "text": "Hallo,  Welt!"}
    assert good[1].row["language"] == "sl" and good[1].row["id"] == "a@0" and "text" not in good[1].row
    assert (good[2].row["start_s"], good[2].row["end_s"], good[2].row["id"]) == (0.25, 0.55, "a@0.25")
    reasons = [r["reason"] for r in rejects]
    assert "numeric `duration`" in reasons[0]
    assert reasons[1].endswith("line 5: not a JSON object") and reasons[2].endswith("line 6: not UTF-8")
    assert all(str(manifest) in reason for reason in reasons[1:])

    good, rejects = _rows(nemo.read(str(manifest), split="test"))
    assert [r.split for r in good] == ["unlabeled"]  # without text a row is unlabeled whatever the split
    assert "--language was not given" in rejects[0]["reason"] and rejects[0]["id"] == "a"
    assert good == _rows(nemo.read(str(manifest), split="test"))[0]


def test_nemo_on_an_fsspec_url(tmp_path):
    root = make_nemo(tmp_path / "nemo", languages=("sl",), clips_per_split=1)
    fs = files.filesystem("memory://")[0]
    for path in root.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"/nemo-test/{path.relative_to(root)}", path.read_bytes())
    try:
        good, rejects = _rows(nemo.read("memory://nemo-test"))
        assert rejects == [] and len(good) == 5
        assert all(files.exists(r.row["audio"]) for r in good)
        relative = [r.row for r in good if "start_s" not in r.row]
        assert len(relative) == 3 and all(row["audio"].startswith("memory:///nemo-test/audio/") for row in relative)
        local_ids = {r.row["id"] for r in nemo.read(str(root))}
        assert {row["id"] for row in relative} <= local_ids
        # the long file is written absolute: outside the manifest's folder now, so its id is its whole path
        assert {r.row["id"] for r in good} - local_ids == {f"{str(root).lstrip('/')}/audio/long_sl@{x}"
                                                           for x in ("0.1", "1.05")}
    finally:
        fs.rm("/nemo-test", recursive=True)


def test_nemo_wrong_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceLayoutError, match="no NeMo manifest"):
        list(nemo.read(str(tmp_path / "empty")))
    with pytest.raises(SourceLayoutError, match="no NeMo manifest"):
        list(nemo.read(str(tmp_path / "nowhere")))
    (tmp_path / "other.json").write_text('{"path": "a.wav", "sentence": "x"}\n')
    with pytest.raises(SourceLayoutError, match="no `audio_filepath`") as err:
        list(nemo.read(str(tmp_path / "other.json")))
    assert "\n" not in str(err.value)
    tarred = make_nemo_tarred(tmp_path / "tarred")
    with pytest.raises(SourceLayoutError, match="nemo-tarred"):
        list(nemo.read(str(tarred)))


# --- NeMo tarred ---------------------------------------------------------------------------------------------------


def test_nemo_tarred_rows_read_in_place(tmp_path):
    root = make_nemo_tarred(tmp_path / "tarred", bad_rows=True)
    good, rejects = _rows(nemo.read_tarred(str(root)))
    assert _rows(nemo.read_tarred(str(root / "tarred_audio_manifest.json"))) == (good, rejects)
    ids = [r.row["id"] for r in good]
    assert len(ids) == len(set(ids)) == 4 + 2 + 1
    assert {r.split for r in good} == {"labeled"}  # no split word in the manifest's name
    assert [r["id"] for r in rejects] == ["lost_shard"] and "shard_id 7" in rejects[0]["reason"]

    rows = {r.row["id"]: r.row for r in good}
    manifest = {(o["audio_filepath"], o.get("offset")): o for o in _manifest_lines(root / "tarred_audio_manifest.json")}
    for uid, row in rows.items():
        member, tar = row["audio"].removeprefix("tar://").split("::")
        source = manifest[(member, row.get("start_s"))]
        assert tar == str(root / f"audio_{source['shard_id']}.tar")
        assert (row["text"], row["language"], row["duration_s"]) == (source["text"], source["lang"], source["duration"])
        if uid == "not_in_tar":
            with pytest.raises(FileNotFoundError):  # the importer's probe turns this into a reject
                files.read_bytes(row["audio"])
            continue
        info = sf.info(io.BytesIO(files.read_bytes(row["audio"])))
        assert info.samplerate == 16000 and info.frames > 0
    assert (rows["long@0.1"]["start_s"], rows["long@0.1"]["end_s"]) == (0.1, pytest.approx(0.9))
    assert rows["long@1.05"]["audio"] == rows["long@0.1"]["audio"]


def test_nemo_tarred_patterns(tmp_path):
    root = make_nemo_tarred(tmp_path / "tarred")
    default = list(nemo.read_tarred(str(root)))
    assert list(nemo.read_tarred(str(root), tars="audio_{0..1}.tar")) == default
    assert list(nemo.read_tarred(str(root), tars=str(root / "audio__OP_0..1_CL_.tar"))) == default
    assert list(nemo.read_tarred(str(root), tars=[str(root / "audio_0.tar"), "audio_1.tar"])) == default
    only_0, rejects = _rows(nemo.read_tarred(str(root), tars="audio_{0..0}.tar", split="dev", language="de"))
    assert {r.split for r in only_0} == {"dev"} and all("audio_0.tar" in r.row["audio"] for r in only_0)
    assert len(rejects) == 2 and all("no tar has this shard id" in r["reason"] for r in rejects)
    _, rejects = _rows(nemo.read_tarred(str(root), tars="audio_{0..2}.tar"))
    assert rejects == []  # audio_2.tar is missing but no row points at shard 2
    (root / "audio_1.tar").unlink()
    _, rejects = _rows(nemo.read_tarred(str(root), tars="audio_{0..1}.tar"))
    assert len(rejects) == 2 and all("does not exist" in r["reason"] for r in rejects)
    assert nemo.expand_braces("s3://b/a_{08..10}_{x,y}.tar") == [
        "s3://b/a_08_x.tar", "s3://b/a_08_y.tar", "s3://b/a_09_x.tar", "s3://b/a_09_y.tar",
        "s3://b/a_10_x.tar", "s3://b/a_10_y.tar"]


def test_nemo_tarred_wrong_layouts(tmp_path):
    plain = make_nemo(tmp_path / "plain", clips_per_split=1)
    with pytest.raises(SourceLayoutError, match="no tarred_audio_manifest.json"):
        list(nemo.read_tarred(str(plain)))
    root = make_nemo_tarred(tmp_path / "tarred")
    for tar in root.glob("*.tar"):
        tar.unlink()
    with pytest.raises(SourceLayoutError, match=r"no audio_<n>\.tar"):
        list(nemo.read_tarred(str(root)))


# --- Hugging Face Parquet ------------------------------------------------------------------------------------------


def test_hf_rows_audio_written_once(tmp_path):
    root = make_hf_parquet(tmp_path / "hf", bad_rows=True)
    audio_dir = tmp_path / "audio"
    good, rejects = _rows(huggingface.read(str(root), audio_dir=str(audio_dir)))
    assert Counter(r.split for r in good) == {"labeled": 4 + 3, "dev": 4, "test": 4}
    ids = [r.row["id"] for r in good]
    assert len(ids) == len(set(ids))
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert set(reasons) == {"no_audio", "no_locale", "de_train_0"}
    assert "neither bytes nor a path" in reasons["no_audio"] and "--language" in reasons["no_locale"]
    assert "duplicate id" in reasons["de_train_0"]

    source = {}
    for name in ("train", "validation", "test"):
        for rec in pq.read_table(root / "data" / f"{name}-00000-of-00001.parquet").to_pylist():
            source.setdefault(rec["id"], rec)  # the first of a duplicated id is the one kept
    for r in good:
        rec = source[r.row["id"]]
        assert (r.row["text"], r.row["language"], r.row["speaker"]) == (rec["sentence"], rec["locale"],
                                                                         rec["client_id"])
        assert Path(r.row["audio"]).read_bytes() == rec["audio"]["bytes"]
        assert Path(r.row["audio"]).parent == audio_dir / r.split
    by_id = {r.row["id"]: r.row for r in good}
    assert by_id["de_train_0"]["audio"].endswith("de_train_0.wav")  # no path in the struct: sniffed
    assert by_id["de_train_1"]["audio"].endswith("de_train_1.flac")

    mtimes = {p: p.stat().st_mtime_ns for p in audio_dir.rglob("*") if p.is_file()}
    again, _ = _rows(huggingface.read(str(root), audio_dir=str(audio_dir)))
    assert again == good
    assert {p: p.stat().st_mtime_ns for p in audio_dir.rglob("*") if p.is_file()} == mtimes

    damaged = Path(by_id["sl_test_1"]["audio"])
    damaged.write_bytes(b"half")  # a file cut short is written again
    list(huggingface.read(str(root), audio_dir=str(audio_dir)))
    assert damaged.read_bytes() == source["sl_test_1"]["audio"]["bytes"]

    good, rejects = _rows(huggingface.read(str(root / "data" / "validation-00000-of-00001.parquet"),
                                           audio_dir=str(audio_dir), language="sl", split="test"))
    assert {r.split for r in good} == {"test"} and rejects == []


def test_hf_language_option_and_columns(tmp_path):
    root = make_hf_parquet(tmp_path / "hf", languages=("sl",), clips_per_split=1, bad_rows=True)
    good, rejects = _rows(huggingface.read(str(root / "data/train-00000-of-00001.parquet"),
                                           audio_dir=str(tmp_path / "a"), language="sl"))
    assert {r.row["id"]: r.row["language"] for r in good}["no_locale"] == "sl"
    assert {r["id"] for r in rejects} == {"no_audio", "sl_train_0"}  # no audio; a duplicate id

    good, _ = _rows(huggingface.read(str(root), audio_dir=str(tmp_path / "b"), text_column="client_id",
                                     language_column="client_id"))
    assert all(r.row["text"] == r.row["language"] == r.row["speaker"] for r in good)
    with pytest.raises(SourceLayoutError, match="no text column 'words'"):
        list(huggingface.read(str(root), audio_dir=str(tmp_path / "c"), text_column="words"))


def test_hf_fallback_ids_paths_and_folder_splits(tmp_path, monkeypatch):
    from datasets import Audio, Dataset

    folder = tmp_path / "hf" / "default" / "validation"
    folder.mkdir(parents=True)
    (folder / "clips").mkdir()
    (folder / "clips" / "on_disk.wav").write_bytes(audio_bytes(clip(5), "WAV"))
    flac = audio_bytes(clip(6), "FLAC")
    data = {"audio": [{"bytes": None, "path": "clips/on_disk.wav"}, {"bytes": flac, "path": None},
                      {"bytes": flac, "path": "x/odd name?.flac"}]}
    monkeypatch.chdir(folder)  # datasets sizes path-only audio relative to the working folder
    Dataset.from_dict(data).cast_column("audio", Audio()).to_parquet(str(folder / "0000.parquet"))

    audio_dir = tmp_path / "out"
    good, rejects = _rows(huggingface.read(str(tmp_path / "hf"), audio_dir=str(audio_dir), language="de"))
    assert rejects == []
    assert [r.split for r in good] == ["unlabeled"] * 3  # the folder says validation, but there is no text column
    assert [r.row["id"] for r in good] == ["on_disk", "dev-1", "odd_name_"]
    assert good[0].row["audio"] == str(folder / "clips" / "on_disk.wav")
    assert good[1].row["audio"] == str(audio_dir / "unlabeled" / "dev-1.flac")  # sniffed from fLaC
    assert "text" not in good[0].row and "speaker" not in good[0].row


def test_hf_wrong_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceLayoutError, match="no Parquet files"):
        list(huggingface.read(str(tmp_path / "empty"), audio_dir=str(tmp_path / "a")))
    import pyarrow as pa

    pq.write_table(pa.table({"sentence": ["x"], "file": ["a.wav"]}), tmp_path / "empty" / "train.parquet")
    with pytest.raises(SourceLayoutError, match="no `audio` column") as err:
        list(huggingface.read(str(tmp_path / "empty"), audio_dir=str(tmp_path / "a")))
    assert "\n" not in str(err.value)
