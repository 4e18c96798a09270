"""Object storage: corpus build, labeling and a short student against an S3 API on 127.0.0.1 (moto in server mode)
through s3fs, with audio, manifests, shards, Parquet and checkpoints all in the bucket.

The endpoint reaches every fsspec call through the environment (`AWS_ENDPOINT_URL_S3`, honoured by botocore and
so by aiobotocore/s3fs), never through arguments: the corpus builder's worker processes inherit it like any
subprocess or Prefect/Dask worker would.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import soundfile as sf

from tests.helpers.servers import free_port, stop, wait_for

BUCKET = "mlpl-test"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The endpoint URL of a moto S3 server (its own process) with an empty bucket; the environment points s3fs at
    it, in this process and in every process it starts."""
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    with open(log_path, "wb") as log, pytest.MonkeyPatch.context() as mp:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_for("moto server", lambda: urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close() or True,
                     30, proc, log_path, poll_s=0.1)
            for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}.items():
                mp.setenv(name, value)
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()  # an instance made before the env vars keeps its endpoint
            s3fs.S3FileSystem().mkdir(BUCKET)
            yield endpoint
        finally:
            stop(proc)
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()  # their connections point at a server that is gone


def test_what_another_process_writes_is_seen_at_once_and_writes_leave_no_temp_object(s3):
    import s3fs

    from storage.files import atomic_write_text, exists, list_files, read_text

    folder = f"s3://{BUCKET}/xproc"
    atomic_write_text(f"{folder}/a.json", "a")
    assert list_files(folder) == [f"{folder}/a.json"] and not exists(f"{folder}/b.json")
    # Another process (a corpus or Dask worker) reaches the same server through the inherited environment alone.
    code = f"from storage.files import atomic_write_text; atomic_write_text({folder + '/b.json'!r}, 'b')"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT), timeout=120)
    assert list_files(folder) == [f"{folder}/a.json", f"{folder}/b.json"]  # no stale listing
    assert exists(f"{folder}/b.json") and read_text(f"{folder}/b.json") == "b"
    # One PUT per write: no temp object to copy, delete or leave behind.
    assert s3fs.S3FileSystem().find(f"{BUCKET}/xproc") == [f"{BUCKET}/xproc/a.json", f"{BUCKET}/xproc/b.json"]


def test_corpus_sentences_can_come_from_a_bucket(s3):
    from pipeline.corpus.text import load_sentences
    from storage.files import atomic_write_text

    text = "El gato duerme en la casa grande.\nUna frase con 3 cifras no vale.\nLa niña lee un libro muy bonito.\n"
    atomic_write_text(f"s3://{BUCKET}/text/es.txt", text)
    sentences, meta = load_sentences("es", text_dir=f"s3://{BUCKET}/text")
    assert sentences == ["El gato duerme en la casa grande.", "La niña lee un libro muy bonito."]
    assert meta["path"] == f"s3://{BUCKET}/text/es.txt" and meta["lines"] == 3
    with pytest.raises(FileNotFoundError, match="expected s3://"):
        load_sentences("sl", text_dir=f"s3://{BUCKET}/text")


@pytest.mark.slow
def test_corpus_labeling_and_student_run_on_s3(s3, teacher):
    import s3fs

    from pipeline.config import label_tiny, student_tiny
    from pipeline.corpus.build import build_corpus, corpus_preset
    from pipeline.stages.label import run_label
    from pipeline.stages.student import run_student
    from storage.checkpoint import load_checkpoint
    from storage.files import copy_file
    from storage.manifest import read_manifest
    from storage.pl import load_pseudo_labels, pl_audio

    base = f"s3://{BUCKET}"
    corpus, labels, run = f"{base}/corpus", f"{base}/labels", f"{base}/run"
    fs = s3fs.S3FileSystem()
    t0 = time.perf_counter()

    # Corpus: synthesized in worker processes, written straight into the bucket.
    card = build_corpus(corpus_preset("smoke"), corpus)
    t_corpus = time.perf_counter() - t0
    rows, rejects = read_manifest(f"{corpus}/manifests/unlabeled.jsonl")
    assert not rejects and len(rows) == 10 and all(r["audio"].startswith(f"{corpus}/audio/") for r in rows)
    flacs = fs.glob(f"{BUCKET}/corpus/audio/*/*/*.flac")
    assert len(flacs) == sum(v["clips"] for split in card["splits"].values() for v in split.values())
    assert sf.info(io.BytesIO(fs.cat_file(flacs[0]))).samplerate == 16000
    assert build_corpus(corpus_preset("smoke"), corpus) == card  # a finished corpus is recognized on s3 too

    # Labeling: the teacher is read from the bucket; table, shards, rejects and catalog go there.
    copy_file(teacher, f"{base}/teacher/last.pt")
    cfg = label_tiny(f"{corpus}/manifests/unlabeled.jsonl", {lang: f"{base}/teacher/last.pt" for lang in
                                                             ("es", "el", "sl")}, unit_max_utterances=2)
    result = run_label(cfg, labels)
    t_label = time.perf_counter() - t0 - t_corpus
    assert result.units_labeled == 5
    assert len(fs.glob(f"{BUCKET}/labels/shards/pl-*.tar")) == 5
    assert len(fs.glob(f"{BUCKET}/labels/pl/*/part-*.parquet")) == 5
    assert len(fs.glob(f"{BUCKET}/labels/catalog/units/*.json")) == 5
    assert not [p for p in fs.find(f"{BUCKET}/labels") if "/." in p]  # no temp file left behind
    table = load_pseudo_labels(labels).sort_values("id").reset_index(drop=True)
    assert len(table) > 0
    # What a data scientist types: pandas with the endpoint in storage_options, no mlpl code.
    options = {"client_kwargs": {"endpoint_url": s3}, "key": "test", "secret": "test"}
    df = pd.read_parquet(f"{labels}/pl", storage_options=options).sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(df, table, check_categorical=False)
    # ...or with the endpoint in the environment, as the `open_with_pandas` lines in the labeling summary are written.
    plain = pd.read_parquet(f"{labels}/pl").sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(plain, table, check_categorical=False)
    assert pl_audio(labels, table.iloc[0])[:4] == b"fLaC"
    assert run_label(cfg, labels).units_skipped == 5  # the catalog on s3 makes the rerun free

    # A short student: labeled manifests, PL shards and init checkpoint read from s3, checkpoints written there.
    student = student_tiny("finetune", f"{corpus}/manifests/labeled.jsonl", f"{corpus}/manifests/dev.jsonl",
                           init_checkpoint=f"{base}/teacher/last.pt", labels_root=labels, max_updates=4,
                           eval_every=4, save_every=2, log_every=2, pl_window_shards=2,
                           pl_batch={"max_batch_duration_s": 60.0, "max_batch_size": 2, "num_buckets": 2})
    res = run_student(student, run)
    t_student = time.perf_counter() - t0 - t_corpus - t_label
    assert res.step == 4 and res.last_checkpoint.startswith(f"{run}/student/")
    assert res.best_checkpoint.startswith(f"{run}/student/")
    names = {p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/run/student")}
    assert {"last.pt", "best.pt", "result.json", "metrics.jsonl", "config.json"} <= names
    state = load_checkpoint(res.last_checkpoint)  # weights_only=True
    assert state["step"] == 4 and "model" in state
    assert run_student(student, run).cached  # the finished stage is found again in the bucket
    print(f"s3 timings: corpus {t_corpus:.1f} s, labeling {t_label:.1f} s, student {t_student:.1f} s")
