"""`export_pseudo_labels`: each format read back with its own library gives the PL rows, texts and audio samples."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.corpus.exporting import export_pseudo_labels
from storage.pl import PLQuery, iter_shard_samples, load_pseudo_labels
from tests.helpers.export_readers import nemo_members, samples


@pytest.fixture(scope="module")
def pl(labeled_root):
    """The PL rows by id, and the shard FLAC bytes by id."""
    table = load_pseudo_labels(labeled_root)
    rows = {r["id"]: r for r in table.to_dict("records")}
    flacs = {}
    for shard, group in table.groupby("shard"):
        by_key = dict(zip(group["key"], group["id"], strict=True))
        for key, flac, _ in iter_shard_samples(labeled_root, shard, list(by_key)):
            flacs[by_key[key]] = flac
    assert len(rows) == len(flacs) == 10
    return rows, flacs


def test_nemo_tarred(labeled_root, pl, tmp_path):
    rows, flacs = pl
    calls = []
    summary = export_pseudo_labels("nemo", labeled_root, str(tmp_path), on_progress=lambda *a: calls.append(a))
    got = nemo_members(tmp_path)
    assert set(got) == set(rows)
    for uid, (line, data) in got.items():
        assert line["text"] == rows[uid]["text"] and line["lang"] == rows[uid]["language"]
        assert line["audio_filepath"] == f"{rows[uid]['key']}.flac"
        assert line["confidence"] == pytest.approx(rows[uid]["confidence"])
        assert data == flacs[uid]  # byte for byte
        assert np.array_equal(samples(data), samples(flacs[uid]))
        assert line["duration"] == pytest.approx(len(samples(data)) / 16_000)
    shards = {r["shard"] for r in rows.values()}
    assert sorted(p.name for p in tmp_path.glob("audio_*.tar")) == sorted(f"audio_{i}.tar" for i in range(len(shards)))
    assert summary["rows"] == 10 and summary["tars"] == len(shards) and summary["shards_read"] == len(shards)
    assert summary["languages"] == {lang: {"rows": n, "hours": pytest.approx(h, abs=1e-4)} for lang, n, h in (
        (lang, sum(r["language"] == lang for r in rows.values()),
         sum(r["duration_s"] for r in rows.values() if r["language"] == lang) / 3600) for lang in ("el", "es", "sl"))}
    assert json.loads((tmp_path / "export.json").read_text())["rows"] == 10
    assert calls[-1][:2] == (10, 10)
    assert not list(tmp_path.glob(".*tmp-*"))  # every temp file renamed


def test_filters_pick_the_rows_load_pseudo_labels_picks(labeled_root, pl, tmp_path):
    rows, _ = pl
    cut = float(np.median([r["confidence"] for r in rows.values()]))
    for filters in ({"languages": ["sl"]}, {"min_confidence": cut}, {"languages": ["es", "el"], "min_confidence": cut}):
        out = tmp_path / "-".join(filters)
        summary = export_pseudo_labels("nemo", labeled_root, str(out), query=PLQuery(**filters))
        want = set(load_pseudo_labels(labeled_root, PLQuery(**filters))["id"])
        assert want and set(nemo_members(out)) == want and summary["rows"] == len(want), filters
        assert summary["filters"] == filters
    # A rerun with fewer shards into the same folder leaves no tar of the earlier export behind.
    export_pseudo_labels("nemo", labeled_root, str(tmp_path / "again"))
    export_pseudo_labels("nemo", labeled_root, str(tmp_path / "again"), query=PLQuery(languages=["sl"]))
    sl_shards = {r["shard"] for r in rows.values() if r["language"] == "sl"}
    assert len(list((tmp_path / "again").glob("audio_*.tar"))) == len(sl_shards)


def test_empty_selection_and_bad_arguments(labeled_root, tmp_path):
    with pytest.raises(ValueError, match=r"languages=\['xx'\].*holds 10 rows"):
        export_pseudo_labels("hf", labeled_root, str(tmp_path), query=PLQuery(languages=["xx"]))
    with pytest.raises(ValueError, match=r"min_confidence=2\.0"):
        export_pseudo_labels("lhotse", labeled_root, str(tmp_path), query=PLQuery(min_confidence=2.0))
    with pytest.raises(ValueError, match="no committed pseudo-labels"):
        export_pseudo_labels("nemo", str(tmp_path / "empty"), str(tmp_path))
    with pytest.raises(ValueError, match="unknown export format"):
        export_pseudo_labels("kaldi", labeled_root, str(tmp_path))
    with pytest.raises(ValueError, match="Shar"):
        export_pseudo_labels("nemo", labeled_root, str(tmp_path), shar=True)
    assert not list(tmp_path.iterdir())


def test_lhotse_cuts_and_shar(labeled_root, pl, tmp_path):
    from lhotse import CutSet

    rows, flacs = pl
    summary = export_pseudo_labels("lhotse", labeled_root, str(tmp_path), shar=True)
    by_key = {r["key"]: uid for uid, r in rows.items()}
    cuts = CutSet.from_file(tmp_path / "cuts.jsonl.gz")
    assert sorted(by_key[c.id] for c in cuts) == sorted(rows)
    for cut in cuts:
        uid = by_key[cut.id]
        sup = cut.supervisions[0]
        assert sup.text == rows[uid]["text"] and sup.language == rows[uid]["language"] and sup.speaker is None
        assert cut.confidence == pytest.approx(rows[uid]["confidence"]) and sup.teacher == rows[uid]["teacher"]
        assert Path(cut.recording.sources[0].source).read_bytes() == flacs[uid]  # byte for byte
        assert np.array_equal(cut.load_audio()[0], samples(flacs[uid], "float32"))
    # Shar: lhotse re-encodes the FLAC, so the samples match, not the bytes.
    shar = list(CutSet.from_shar(in_dir=tmp_path / "shar"))
    assert sorted(by_key[c.id] for c in shar) == sorted(rows)
    for cut in shar:
        uid = by_key[cut.id]
        assert cut.supervisions[0].text == rows[uid]["text"]
        assert np.array_equal(cut.load_audio()[0], samples(flacs[uid], "float32"))
    assert "cuts.jsonl.gz" in summary["files"] and any(f.startswith("shar/recording.") for f in summary["files"])
    assert summary["audio_files"] == 10
    with gzip.open(tmp_path / "cuts.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 10


def test_huggingface_parquet(labeled_root, pl, tmp_path, monkeypatch):
    """Read back with `datasets`. Decoding the Audio feature needs torchcodec (not installed here), so the column
    is cast to `Audio(decode=False)` and its bytes decoded with soundfile."""
    import datasets

    rows, flacs = pl
    out = tmp_path / "out"
    export_pseudo_labels("hf", labeled_root, str(out), max_rows_per_file=100)
    summary = export_pseudo_labels("hf", labeled_root, str(out), max_rows_per_file=4)  # replaces the one file
    names = [f"data/train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert summary["files"] == names
    assert sorted(str(p.relative_to(out)) for p in out.glob("data/*")) == names
    assert [pq.read_metadata(out / n).num_rows for n in names] == [4, 4, 2]
    assert b"huggingface" in pq.read_schema(out / names[0]).metadata

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features["audio"] == datasets.Audio(sampling_rate=16_000)
    assert sorted(ds["id"]) == sorted(rows)
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    for record in ds:
        uid = record["id"]
        assert record["text"] == rows[uid]["text"] and record["language"] == rows[uid]["language"]
        assert record["confidence"] == pytest.approx(rows[uid]["confidence"])
        assert record["num_tokens"] == rows[uid]["num_tokens"] and record["teacher"] == rows[uid]["teacher"]
        assert record["audio"]["path"] == f"{rows[uid]['key']}.flac"
        assert record["audio"]["bytes"] == flacs[uid]  # byte for byte
        assert np.array_equal(samples(record["audio"]["bytes"]), samples(flacs[uid]))


@pytest.mark.parametrize("fmt", ["nemo", "hf"])
def test_a_missing_sample_fails_the_export_and_leaves_no_file(labeled_root, pl, tmp_path, fmt):
    rows, _ = pl
    root = tmp_path / "labels"
    shutil.copytree(labeled_root, root)
    last = max(r["shard"] for r in rows.values())  # exported last: the other shards are written by then
    dropped = next(r["key"] for r in rows.values() if r["shard"] == last)
    with tarfile.open(root / last) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if not m.name.startswith(dropped + ".")]
    with tarfile.open(root / last, "w") as dst:
        for member, data in members:
            dst.addfile(member, io.BytesIO(data))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=f"no sample in .*{last}.*{dropped}"):
        export_pseudo_labels(fmt, str(root), str(out))
    assert [p for p in out.rglob("*") if p.is_file()] == []
