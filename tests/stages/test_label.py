"""Corpus-wide pseudo-labeling: real readers, crash safety, idempotent reruns, teacher changes, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import jiwer
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from flows.cli import main
from pipeline.config import label_tiny
from pipeline.stages.label import reject_category, run_label, split_units
from pipeline.stages.label_decode import filter_reason
from storage.checkpoint import load_checkpoint, save_checkpoint
from storage.manifest import read_manifest, write_manifest
from storage.pl import PL_SCHEMA, PLQuery, iter_shard_samples, load_pseudo_labels, load_rejects, pl_audio, sample_key
from tests.helpers.dummies import write_flac, write_jsonl

ROOT = Path(__file__).parents[2]


def _unlabeled(corpus: str) -> str:
    return f"{corpus}/manifests/unlabeled.jsonl"


def _cfg(corpus: str, teacher: str, manifest: str | None = None, **overrides):
    teachers = {lang: teacher for lang in ("es", "el", "sl")}
    return label_tiny(manifest or _unlabeled(corpus), teachers, **({"unit_max_utterances": 2} | overrides))


def _snapshot(root: str) -> dict[str, tuple[int, str]]:
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _table(root: str) -> pd.DataFrame:
    return load_pseudo_labels(root).sort_values("id").reset_index(drop=True)


# --- real clients ------------------------------------------------------------------------------------------


def test_pandas_reads_every_column_with_its_dtype(labeled_root, smoke_corpus):
    df = pd.read_parquet(f"{labeled_root}/pl")
    assert list(df.columns) == PL_SCHEMA.names
    assert len(df) == 10 and df["id"].is_unique
    assert pd.api.types.is_string_dtype(df["language"]) and set(df["language"]) == {"es", "el", "sl"}
    assert str(df["duration_s"].dtype) == "float64" and str(df["num_tokens"].dtype) == "int32"
    assert str(df["confidence"].dtype) == "float32" and str(df["created_at"].dtype) == "datetime64[us, UTC]"
    assert (df["num_tokens"] > 0).all() and df["text"].str.len().gt(0).all()
    assert df["confidence"].between(0, 1).all() and df["blank_ratio"].between(0, 1).all()
    assert (df["lid_pred"] == df["language"].astype(str)).mean() >= 0.8
    assert df["teacher"].str.match(r"^supervised@250:[0-9a-f]{16}$").all()
    import pyarrow.parquet as pq

    meta = pq.read_schema(next(Path(labeled_root, "pl").rglob("*.parquet"))).metadata
    assert meta[b"mlpl.schema_version"] == b"3" and df["audio_etag"].isna().all()  # no etag in the manifest


def test_a_root_written_before_audio_etag_reads_with_nulls(labeled_root, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    old = tmp_path / "v1"
    shutil.copytree(labeled_root, old)
    for part in (old / "pl").rglob("*.parquet"):  # as schema version 1 wrote them
        pq.write_table(pq.read_table(part).drop_columns(["audio_etag"]), part)
    df = load_pseudo_labels(str(old))
    assert len(df) == len(load_pseudo_labels(labeled_root)) and df["audio_etag"].isna().all()


def test_a_root_of_the_hive_layout_reads_and_moves_to_plain_folders(labeled_root, smoke_corpus, teacher, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    old = tmp_path / "v2"
    shutil.copytree(labeled_root, old)
    for table in ("pl", "rejects"):  # as schema version 2 wrote them: language=<lang>/, a dictionary column
        for part in sorted((old / table).glob("*/*.parquet")):
            t = pq.read_table(part)
            t = t.set_column(t.schema.get_field_index("language"), "language",
                             t.column("language").cast(pa.dictionary(pa.int32(), pa.string())))
            target = old / table / f"language={part.parent.name}" / part.name
            target.parent.mkdir(exist_ok=True)
            pq.write_table(t, target)
            part.unlink()
    want = load_pseudo_labels(labeled_root)
    assert load_pseudo_labels(str(old)).equals(want)  # mlpl reads the old layout as it is
    cfg = label_tiny(f"{smoke_corpus}/manifests/unlabeled.jsonl", {lang: teacher for lang in ("es", "el", "sl")},
                     unit_max_utterances=2)
    assert run_label(cfg, str(old)).units_labeled == 0  # the same work, already committed: nothing relabeled
    assert not list((old / "pl").glob("language=*/*.parquet")) and not list((old / "rejects").glob("language=*/*"))
    assert load_pseudo_labels(str(old)).equals(want)
    assert sorted(pd.read_parquet(old / "pl")["id"]) == sorted(want["id"])  # plain readers too, now


def test_duckdb_reads_the_table(labeled_root):
    import duckdb

    got = duckdb.sql(
        f"select language, count(*) as n, min(num_tokens) as shortest from "
        f"read_parquet('{labeled_root}/pl/*/*.parquet') group by language order by language"
    ).fetchall()
    assert got == [("el", 2, got[0][2]), ("es", 2, got[1][2]), ("sl", 6, got[2][2])]
    assert all(row[2] > 0 for row in got)


def test_webdataset_decodes_the_flac_and_json_of_every_kept_row(labeled_root):
    import webdataset as wds

    urls = sorted(str(p) for p in Path(labeled_root, "shards").glob("pl-*.tar"))
    assert [Path(u).name for u in urls][:2] == ["pl-el-000000.tar", "pl-es-000000.tar"]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode(
        wds.handle_extension("flac", lambda data: sf.read(io.BytesIO(data), dtype="float32"))
    )
    samples = list(dataset)
    df = _table(labeled_root).set_index("id")
    assert len(samples) == len(df)
    for s in samples:
        (audio, sr), meta = s["flac"], s["json"]
        row = df.loc[meta["id"]]
        assert sr == 16000 and audio.ndim == 1 and abs(len(audio) / sr - row["duration_s"]) < 0.01
        assert meta["text"] == row["text"] and s["__key__"] == row["key"]


def test_hugging_face_datasets_loads_the_table(labeled_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    import datasets

    d = datasets.load_dataset("parquet", data_files=f"{labeled_root}/pl/**/*.parquet", split="train",
                              cache_dir=str(tmp_path / "hf"))
    assert d.num_rows == 10 and set(PL_SCHEMA.names) <= set(d.column_names)
    assert sorted(d["id"]) == sorted(_table(labeled_root)["id"])


def test_query_helper_filters_like_pandas_and_gives_the_audio_behind_a_row(labeled_root):
    df = pd.read_parquet(f"{labeled_root}/pl")
    threshold = float(df["confidence"].median())
    got = load_pseudo_labels(labeled_root, PLQuery(languages=["sl", "es"], min_confidence=threshold))
    want = df[df["language"].isin(["sl", "es"]) & (df["confidence"] >= threshold)]
    assert sorted(got["id"]) == sorted(want["id"]) and 0 < len(got) < 8
    teacher = df["teacher"].iloc[0]
    assert len(load_pseudo_labels(labeled_root, PLQuery(teacher=teacher.split(":")[1][:8]))) == 10
    assert len(load_pseudo_labels(labeled_root, PLQuery(teacher="slimipl/sl@1"))) == 0
    row = got.iloc[0]
    audio, sr = sf.read(io.BytesIO(pl_audio(labeled_root, row)))
    original, _ = sf.read(row["audio"])
    assert sr == 16000 and np.allclose(audio, original)  # 16 kHz mono FLAC is passed through unchanged


def test_the_catalog_records_keys_counts_and_shards_of_every_unit(labeled_root):
    records = [json.loads(p.read_text()) for p in sorted(Path(labeled_root, "catalog/units").glob("*.json"))]
    assert [r["name"] for r in records] == ["el-000000", "es-000000", "sl-000000", "sl-000001", "sl-000002"]
    for r in records:
        assert set(r["keys"]) == {"rows", "teacher", "decode"} and len(r["keys"]["rows"]) == 64
        assert r["teacher"]["sha256"] == r["keys"]["teacher"] and r["rows"] == r["shard_samples"] == 2
        assert r["manifest_sha256"] and r["shard"] == f"shards/pl-{r['language']}-{r['unit']:06d}.tar"
    summary = json.loads(Path(labeled_root, "summary.json").read_text())
    assert summary["sl"]["rows_kept"] == 6 and summary["es"]["rows_rejected"] == 0


# --- idempotence and crash safety --------------------------------------------------------------------------


def test_a_rerun_with_nothing_changed_does_no_model_work_and_changes_no_file(labeled_root, smoke_corpus, teacher):
    before = _snapshot(labeled_root)
    result = run_label(_cfg(smoke_corpus, teacher), labeled_root)
    assert result.units_labeled == 0 and result.units_skipped == 5 and result.model_s == 0
    assert _snapshot(labeled_root) == before


_CHILD = """
import sys
from pipeline.config import label_tiny
from pipeline.stages.label import run_label
teacher, manifest, root = sys.argv[1:4]
run_label(label_tiny(manifest, {l: teacher for l in ("es", "el", "sl")}, unit_max_utterances=int(sys.argv[4]),
                     engine=sys.argv[5]), root)
"""


def _kill_and_resume(corpus: str, teacher: str, root: Path, trials: int, seed: int, unit_size: int = 2,
                     engine: str = "torch", window_s: float = 1.5) -> int:
    """SIGKILL the labeling process `trials` times at random points (within `window_s` of planning), then let it
    finish; returns the kills that landed while it was still working."""
    rng = random.Random(seed)
    landed = 0
    args = [sys.executable, "-c", _CHILD, teacher, _unlabeled(corpus), str(root), str(unit_size), engine]
    for _ in range(trials):
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (root / "catalog" / "manifests").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # planning done: model work starts now
        time.sleep(rng.uniform(0.0, window_s))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            landed += 1
        proc.wait()
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    return landed


def _assert_same_corpus(root: Path, reference: str) -> None:
    got, want = _table(str(root)), _table(reference)
    assert got["id"].is_unique and list(got["id"]) == list(want["id"])
    assert list(got["text"]) == list(want["text"])
    assert np.allclose(got["confidence"], want["confidence"])
    for shard in Path(root, "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:  # a valid, complete tar
            names = tar.getnames()
        assert len(names) == 2 * len(got[got["shard"] == f"shards/{shard.name}"])
    assert not [p for p in root.rglob(".*") if p.is_file()]  # no temp file left behind
    assert len(load_rejects(str(root))) == len(load_rejects(reference))


def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_result(smoke_corpus, teacher, labeled_root,
                                                                             tmp_path):
    landed = _kill_and_resume(smoke_corpus, teacher, tmp_path / "labels", trials=5, seed=1)
    assert landed >= 3  # most kills hit a working process, not a finished one
    _assert_same_corpus(tmp_path / "labels", labeled_root)


@pytest.mark.slow
def test_sigkill_twenty_times_with_one_clip_per_unit(smoke_corpus, teacher, labeled_root, tmp_path):
    landed = _kill_and_resume(smoke_corpus, teacher, tmp_path / "labels", trials=20, seed=7, unit_size=1)
    assert landed >= 10
    got = _table(str(tmp_path / "labels"))
    want = _table(labeled_root)
    assert list(got["id"]) == list(want["id"]) and list(got["text"]) == list(want["text"])
    assert len(list(Path(tmp_path / "labels", "shards").glob("*.tar"))) == 10


def test_a_new_teacher_for_one_language_relabels_only_its_units_and_supersedes_its_rows(smoke_corpus, teacher,
                                                                                        tmp_path):
    root = str(tmp_path / "labels")
    run_label(_cfg(smoke_corpus, teacher), root)
    before = _snapshot(root)
    # A second teacher for sl: the same model with slightly moved weights (another checkpoint file).
    ckpt = load_checkpoint(teacher)
    torch.manual_seed(0)
    ckpt["model"] = {k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in ckpt["model"].items()}
    ckpt["step"] = 251
    new = str(tmp_path / "teacher2.pt")
    save_checkpoint(new, ckpt)
    cfg = _cfg(smoke_corpus, teacher)
    cfg = cfg.model_copy(update={"teachers": cfg.teachers | {"sl": new}})
    result = run_label(cfg, root)
    assert result.units_labeled == 3 and result.units_skipped == 2
    after = _snapshot(root)
    changed = {k for k in after if before.get(k) != after[k]}
    assert {k for k in changed if k.startswith(("pl/", "shards/"))} == {
        *(f"pl/sl/part-00000{i}.parquet" for i in range(3)), *(f"shards/pl-sl-00000{i}.tar" for i in range(3))}
    df = load_pseudo_labels(root)
    assert len(df) == 10 and df["id"].is_unique
    assert set(df[df.language == "sl"]["teacher"].str[:15]) == {"supervised@251:"}
    assert set(df[df.language != "sl"]["teacher"].str[:15]) == {"supervised@250:"}
    # A changed decode config relabels everything; the shards then hold the new rows only.
    result = run_label(cfg.model_copy(update={"max_whole_s": 20.0}), root)
    assert result.units_labeled == 5
    assert len(load_pseudo_labels(root)) == 10


# --- the ONNX Runtime engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_root(smoke_corpus, teacher, tmp_path_factory) -> str:
    """The smoke corpus labeled once, uninterrupted, by the ONNX Runtime engine (int8)."""
    root = str(tmp_path_factory.mktemp("onnx-labels"))
    run_label(_cfg(smoke_corpus, teacher, engine="onnxruntime"), root)
    return root


def test_the_onnx_runtime_engine_labels_like_torch_and_says_so_in_every_row(onnx_root, labeled_root):
    got, want = _table(onnx_root), _table(labeled_root)
    assert list(got["id"]) == list(want["id"])
    assert jiwer.cer(list(want["text"]), list(got["text"])) < 0.1  # int8 weights: near, not equal
    assert got["decode"].str.match(r"^greedy on onnxruntime int8 #[0-9a-f]{16}$").all()
    assert want["decode"].str.match(r"^greedy on torch (bf16|fp32) #[0-9a-f]{16}$").all()
    record = json.loads(next(Path(onnx_root, "catalog/units").glob("sl-*.json")).read_text())
    assert record["decode"]["engine"] == "onnxruntime" and record["decode"]["precision"] == "int8"


def test_onnx_runtime_labeling_killed_at_random_points_then_rerun_gives_its_uninterrupted_result(
        smoke_corpus, teacher, onnx_root, tmp_path):
    # Each process exports its teacher before its first unit: kills spread over that and the labeling.
    landed = _kill_and_resume(smoke_corpus, teacher, tmp_path / "labels", trials=4, seed=3, engine="onnxruntime",
                              window_s=6.0)
    assert landed >= 2
    _assert_same_corpus(tmp_path / "labels", onnx_root)


def test_switching_the_engine_relabels_every_unit_once_under_new_keys(smoke_corpus, teacher, labeled_root,
                                                                      tmp_path):
    root = tmp_path / "labels"
    shutil.copytree(labeled_root, root)  # labeled by the torch engine
    keys = {p.name: json.loads(p.read_text())["keys"] for p in Path(root, "catalog/units").glob("*.json")}
    for engine, precision in (("onnxruntime", "int8"), ("onnxruntime", "fp32"), ("torch", "int8")):
        cfg = _cfg(smoke_corpus, teacher, engine=engine, onnx_precision=precision)
        first, again = run_label(cfg, str(root)), run_label(cfg, str(root))
        assert (first.units_labeled, again.units_labeled, again.units_skipped) == (5, 0, 5)
        now = {p.name: json.loads(p.read_text())["keys"] for p in Path(root, "catalog/units").glob("*.json")}
        assert all(now[u]["decode"] != keys[u]["decode"] and now[u]["teacher"] == keys[u]["teacher"] for u in now)
        keys = now
        df = load_pseudo_labels(str(root))
        assert len(df) == 10 and df["id"].is_unique and df["decode"].str.contains(f" on {engine} ").all()
    # back on torch (onnx_precision means nothing there): the same keys and rows as the first torch run
    first_keys = {p.name: json.loads(p.read_text())["keys"]
                  for p in Path(labeled_root, "catalog/units").glob("*.json")}
    assert keys == first_keys
    assert list(_table(str(root))["text"]) == list(_table(labeled_root)["text"])


def test_engine_flags_and_form_fields_reach_the_labeling_config():
    from flows.cli import build_parser
    from flows.cli.labeling import label_config
    from pipeline.config import RecipeConfig, RelabelConfig

    args = build_parser().parse_args(["label", "--manifest", "m.jsonl", "--teacher", "sl=t.pt", "--engine",
                                      "onnxruntime", "--onnx-precision", "fp32"])
    cfg = label_config(args)
    assert (cfg.engine, cfg.onnx_precision) == ("onnxruntime", "fp32")
    assert label_config(build_parser().parse_args(["label", "--manifest", "m", "--teacher", "sl=t"])).engine == "torch"
    recipe = RecipeConfig(labeled_manifest="l.jsonl", unlabeled_manifest="u.jsonl", labeling_engine="onnxruntime")
    assert recipe.label_config({"sl": "t.pt"}).engine == "onnxruntime"
    relabel = RelabelConfig(watch="w", labels_root="r", teachers={"sl": "t.pt"}, unknown_language="reject",
                            labeling_engine="onnxruntime", label={"onnx_precision": "fp32"})
    got = relabel.label_config("m.jsonl", {"sl": "t.pt"})
    assert (got.engine, got.onnx_precision) == ("onnxruntime", "fp32")


def test_the_onnx_runtime_engine_refuses_a_gpu_device_in_one_line():
    with pytest.raises(ValueError, match="engine='onnxruntime' runs on the CPU"):
        label_tiny("m.jsonl", {"sl": "t.pt"}, engine="onnxruntime", device="cuda")


def test_changing_the_unit_split_of_a_labeled_manifest_is_refused(smoke_corpus, teacher, labeled_root):
    with pytest.raises(ValueError, match="two homes"):
        run_label(_cfg(smoke_corpus, teacher, unit_max_utterances=3), labeled_root)


# --- filters and rejects -----------------------------------------------------------------------------------


def test_filters_drop_empty_overlong_unconfident_and_wrong_language_pls_with_reasons():
    cfg = label_tiny("m.jsonl", {"sl": "t.pt"}, filters={"min_confidence": 0.8, "require_lid_agreement": True})
    ok = {"num_tokens": 10, "confidence": 0.9, "lid_pred": "sl", "lid_prob": 0.99}
    assert filter_reason(ok, "sl", cfg) is None
    assert filter_reason(ok | {"num_tokens": 0}, "sl", cfg)[0] == "empty_pl"
    category, reason = filter_reason(ok | {"num_tokens": 631}, "sl", cfg)
    assert category == "too_long_pl" and "631" in reason and "630" in reason
    assert filter_reason(ok | {"confidence": 0.5}, "sl", cfg)[0] == "low_confidence"
    category, reason = filter_reason(ok | {"lid_pred": "es"}, "sl", cfg)
    assert category == "lid_mismatch" and "'es'" in reason
    assert filter_reason(ok | {"confidence": 0.5}, "sl", label_tiny("m", {"sl": "t"})) is None


def test_a_threshold_read_off_the_table_keeps_its_row_at_write_and_read_time(tmp_path):
    """Confidence is compared as the float32 the table stores, so the rule does not depend on the CPU's rounding."""
    from datetime import UTC, datetime

    import numpy as np

    from storage.pl import LabelStore, load_pseudo_labels

    computed = 0.81234567  # what the model gives (float64); float32 rounds it *up*
    stored = float(np.float32(computed))
    assert stored > computed
    row = {"num_tokens": 10, "confidence": computed, "lid_pred": "sl", "lid_prob": 0.99}
    # Write time: the stored value taken as a threshold, corpus-wide or for the language, rejects nothing.
    assert filter_reason(row, "sl", label_tiny("m", {"sl": "t"}, filters={"min_confidence": stored})) is None
    assert filter_reason(row, "sl", label_tiny("m", {"sl": "t"}, min_confidence_by_language={"sl": stored})) is None
    # Just above it (the next float32 up) rejects the row.
    above = float(np.nextafter(np.float32(stored), np.float32(1)))
    assert filter_reason(row, "sl", label_tiny("m", {"sl": "t"}, min_confidence_by_language={"sl": above}))[0] == (
        "low_confidence")
    # A number that prints like the stored one compares as stored too, as pandas, polars and duckdb do.
    printed = label_tiny("m", {"sl": "t"}, filters={"min_confidence": 0.7})
    assert filter_reason(row | {"confidence": 0.70000}, "sl", printed) is None
    # Read time: the row as the table stores it, read back with the same thresholds.
    store = LabelStore(str(tmp_path / "labels"))
    shard = store.open_shard("sl", 0)
    shard.write("a", b"fLaC", {"id": "a"})
    now = datetime.now(UTC)
    store.commit_unit("sl", 0, shard=shard, rejects=[], record={"unit": 0, "language": "sl", "keys": {}},
                      rows=[{"id": "a", "text": "x", "confidence": computed, "created_at": now, "key": "a"},
                            {"id": "b", "text": "y", "confidence": 0.70000, "created_at": now, "key": "b"}])
    table = load_pseudo_labels(str(tmp_path / "labels"))
    assert float(table.set_index("id").confidence["a"]) == stored
    top = PLQuery(min_confidence=float(table.confidence.max()))
    assert set(load_pseudo_labels(str(tmp_path / "labels"), top)["id"]) == {
        "a"}
    assert set(load_pseudo_labels(str(tmp_path / "labels"), PLQuery(min_confidence=stored))["id"]) == {"a"}
    assert set(load_pseudo_labels(str(tmp_path / "labels"), PLQuery(min_confidence=0.7))["id"]) == {"a", "b"}
    assert load_pseudo_labels(str(tmp_path / "labels"), PLQuery(min_confidence=above)).empty


def test_a_confidence_threshold_moves_rows_to_the_rejects_with_their_numbers(smoke_corpus, teacher, labeled_root,
                                                                              tmp_path):
    threshold = float(pd.read_parquet(f"{labeled_root}/pl")["confidence"].median())
    root = str(tmp_path / "labels")
    run_label(_cfg(smoke_corpus, teacher, filters={"min_confidence": threshold}), root)
    kept, rejects = load_pseudo_labels(root), load_rejects(root)
    assert len(kept) + len(rejects) == 10 and len(kept) >= 5
    assert (kept["confidence"] >= threshold).all()
    assert (rejects["category"] == "low_confidence").all() and (rejects["confidence"] < threshold).all()
    assert rejects["text"].str.len().gt(0).all() and rejects["num_tokens"].gt(0).all()


def test_units_are_consecutive_rows_bounded_by_count_and_seconds():
    from pipeline.data.rows import Utterance

    utts = [Utterance(str(i), "a", d, "sl") for i, d in enumerate([10, 10, 10, 50, 10, 500, 1])]
    units = split_units(utts, max_utterances=3, max_audio_s=60)
    assert [[u.id for u in unit] for unit in units] == [["0", "1", "2"], ["3", "4"], ["5"], ["6"]]


def test_sample_keys_have_no_dots_or_slashes_and_stay_unique():
    assert sample_key("sl-unlabeled-000001") == "sl-unlabeled-000001"
    keys = {sample_key(x) for x in ("a.b", "a_b", "a/b", "ü b.flac")}
    assert len(keys) == 4 and not any("." in k or "/" in k for k in keys)


def _bad_manifest(tmp: Path, corpus: str) -> tuple[str, dict[str, str]]:
    """An unlabeled manifest with one row per kind of bad input; returns it and id → expected outcome."""
    good, _ = read_manifest(_unlabeled(corpus))
    sl = [r for r in good if r["language"] == "sl"]
    src, sr = sf.read(sl[0]["audio"], dtype="float32")
    a = tmp / "bad"
    a.mkdir()
    (a / "truncated.flac").write_bytes(Path(sl[1]["audio"]).read_bytes()[:3000])
    (a / "empty.flac").write_bytes(b"")
    (a / "adir.flac").mkdir()
    sf.write(str(a / "nan.wav"), np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(str(a / "nan-pcm.wav"), np.full(16000, np.nan, dtype=np.float32), 16000, subtype="PCM_16")  # all -1
    import torchaudio

    up = torchaudio.functional.resample(torch.from_numpy(src), 16000, 44100).numpy()
    rows = {
        "missing": ({"audio": str(a / "nope.flac")}, "missing_file"),
        "truncated": ({"audio": str(a / "truncated.flac")}, "corrupt_audio"),
        "empty": ({"audio": str(a / "empty.flac")}, "empty_audio"),
        "zeros": ({"audio": write_flac(a / "zeros.flac", np.zeros(48000, dtype=np.float32))}, "silent_audio"),
        "nan": ({"audio": str(a / "nan.wav")}, "nan_audio"),
        "nan-pcm": ({"audio": str(a / "nan-pcm.wav")}, "constant_audio"),
        "stereo": ({"audio": write_flac(a / "stereo.flac", np.stack([src, src], axis=1))}, "kept"),
        "rate8k": ({"audio": write_flac(a / "8k.flac", src[::2], sr=8000)}, "low_sample_rate"),
        "rate44k": ({"audio": write_flac(a / "44k.flac", up, sr=44100)}, "kept"),
        "long": ({"audio": write_flac(a / "long.flac", np.tile(src, 8)), "duration_s": None}, "kept"),
        "adir": ({"audio": str(a / "adir.flac")}, "not_a_file"),
        "unknown": ({"audio": sl[2]["audio"], "language": "fr"}, "unknown_language"),
        "original": ({"audio": sl[0]["audio"]}, "kept"),
    }
    lines = [json.dumps({"id": uid, "duration_s": 3.0, "language": "sl"} | extra) for uid, (extra, _) in rows.items()]
    lines.append(json.dumps({"id": "original", "audio": sl[3]["audio"], "duration_s": 3.0, "language": "sl"}))
    data = "\n".join(lines).encode() + b"\n" + b'{"id": "bad-utf8", "text": "\xff\xfe"}\n'
    (tmp / "bad.jsonl").write_bytes(data)
    expected = {uid: outcome for uid, (_, outcome) in rows.items()}
    return str(tmp / "bad.jsonl"), expected


def test_every_kind_of_bad_input_is_a_reject_with_a_reason_or_labeled_after_conversion(smoke_corpus, teacher,
                                                                                        tmp_path):
    manifest, expected = _bad_manifest(tmp_path, smoke_corpus)
    root = str(tmp_path / "labels")
    # No length filter here: the paper's 630 tokens would drop the 3-minute clip (tested below).
    cfg = _cfg(smoke_corpus, teacher, manifest=manifest, max_whole_s=60.0, filters={"max_tokens": 100_000})
    result = run_label(cfg, root)
    kept, rejects = load_pseudo_labels(root).set_index("id"), load_rejects(root)
    for uid, outcome in expected.items():
        if outcome == "kept":
            assert uid in kept.index, uid
        else:
            got = rejects[rejects["id"] == uid]
            assert list(got["category"]) == [outcome], (uid, list(got["reason"]))
            assert got["reason"].str.len().gt(10).all()
    # Nothing vanished: the 14 JSON rows + the bad line are all accounted for.
    assert len(kept) + len(rejects) == 15
    assert set(rejects["category"]) >= {"duplicate_id", "bad_utf8"}
    assert rejects.loc[rejects["category"] == "bad_utf8", "id"].str.endswith(":15").all()
    # Converted audio gets (nearly) the PL of the original 16 kHz mono clip.
    assert kept.loc["stereo", "text"] == kept.loc["original", "text"]
    import jiwer

    assert jiwer.cer(kept.loc["original", "text"], kept.loc["rate44k", "text"]) < 0.1
    # A 2-minute clip (over max_whole_s) is labeled as crops stitched back together, its duration from the header.
    assert 8 * 20 < kept.loc["long", "duration_s"] < 8 * 31
    assert kept.loc["long", "num_tokens"] > 4 * kept.loc["original", "num_tokens"]
    assert result.summary["sl"]["rejected_by_reason"]["missing_file"] == 1
    assert "unknown_language" in result.summary["fr"]["rejected_by_reason"]


@pytest.mark.slow
def test_hours_long_audio_is_cropped_and_stitched_then_filtered_by_the_paper_length(smoke_corpus, teacher,
                                                                                    tmp_path):
    good, _ = read_manifest(_unlabeled(smoke_corpus))
    src, _ = sf.read(good[-1]["audio"], dtype="float32")
    hours = write_flac(tmp_path / "hours.flac", np.tile(src, int(3700 / (len(src) / 16000)) + 1))
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "hours", "audio": hours, "language": "sl"}])
    root = str(tmp_path / "labels")
    run_label(_cfg(smoke_corpus, teacher, manifest=manifest), root)
    rejects = load_rejects(root)
    assert list(rejects["category"]) == ["too_long_pl"]
    assert rejects["duration_s"].iloc[0] > 3600 and rejects["num_tokens"].iloc[0] > 630 * 20
    assert "above filters.max_tokens=630" in rejects["reason"].iloc[0]


def test_reject_categories_group_the_reasons_of_every_layer():
    assert reject_category("audio file not found: x.flac") == "missing_file"
    assert reject_category("audio contains NaN or Inf samples") == "nan_audio"
    assert reject_category("audio is a constant -1.0000 (no signal; NaN or Inf samples written …)") == "constant_audio"
    assert reject_category("duplicate id 'a' (first at row 1)") == "duplicate_id"
    assert reject_category("something new") == "other"


def test_label_cli_prints_the_summary_and_how_to_open_it(smoke_corpus, teacher, tmp_path, capsys):
    out = str(tmp_path / "labels")
    argv = ["label", "--manifest", _unlabeled(smoke_corpus), "--teacher", f"es={teacher}", "--teacher",
            f"el={teacher}", "--out", out, "--set", "unit_max_utterances=4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| sl |" in printed and "unknown_language 6" in printed and "pd.read_parquet" in printed
    assert len(load_pseudo_labels(out)) == 4
    assert main(["label", "--manifest", _unlabeled(smoke_corpus), "--out", out]) == 2
    assert "no teachers" in capsys.readouterr().err


def test_the_query_helper_reads_committed_units_only_also_from_a_relative_root(labeled_root, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(labeled_root, tmp_path / "labels")
    (tmp_path / "labels/catalog/units/sl-000002.json").unlink()  # as if killed before its record was written
    monkeypatch.chdir(tmp_path)
    df = load_pseudo_labels("labels", columns=["id", "shard"])
    assert list(df.columns) == ["id", "shard"] and len(df) == 8
    assert "shards/pl-sl-000002.tar" not in set(df["shard"])
    assert len(pd.read_parquet("labels/pl")) == 10  # plain readers see the file; the rerun redoes it in place


def test_labeling_reads_and_writes_any_fsspec_url(smoke_corpus, teacher):
    import fsspec

    fs = fsspec.filesystem("memory")
    write_manifest("memory://mlpl-test/u.jsonl", read_manifest(_unlabeled(smoke_corpus))[0])  # absolute audio
    cfg = label_tiny("memory://mlpl-test/u.jsonl", {"sl": teacher})
    result = run_label(cfg, "memory://mlpl-test/labels")
    df = load_pseudo_labels("memory://mlpl-test/labels")
    assert len(df) == 6 and result.units_labeled == 3
    assert sf.info(io.BytesIO(pl_audio("memory://mlpl-test/labels", df.iloc[0]))).samplerate == 16000
    assert run_label(cfg, "memory://mlpl-test/labels").units_skipped == 3
    fs.rm("/mlpl-test", recursive=True)


def test_read_time_filters_select_exactly_what_a_pandas_query_selects_and_the_shards_stream_them(labeled_root):
    raw = pd.read_parquet(f"{labeled_root}/pl")
    conf = float(raw["confidence"].quantile(0.3))
    tokens = int(raw["num_tokens"].median())
    query = PLQuery(languages=["sl", "el"], min_confidence=conf, max_tokens=tokens, min_tokens=2, lid_agreement=True)
    got = load_pseudo_labels(labeled_root, query, columns=["id", "shard", "key"])
    want = raw[raw["language"].isin(["sl", "el"]) & (raw["confidence"] >= conf) & (raw["num_tokens"] <= tokens)
               & (raw["num_tokens"] >= 2) & (raw["lid_pred"] == raw["language"].astype(str))]
    assert sorted(got["id"]) == sorted(want["id"]) and 0 < len(got) < len(raw)
    assert list(got.columns) == ["id", "shard", "key"]
    streamed = []
    for shard, keys in got.groupby("shard")["key"]:
        streamed += [(key, meta["id"], flac[:4]) for key, flac, meta in iter_shard_samples(labeled_root, shard, keys)]
    assert sorted(s[1] for s in streamed) == sorted(got["id"]) and {s[2] for s in streamed} == {b"fLaC"}
