"""The relabel job: only new, changed or older-teacher audio is labeled; old rows are superseded, never duplicated."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from pipeline.config import RelabelConfig
from pipeline.stages.relabel import run_relabel, scan
from storage.files import StorageLock
from storage.pl import LabelStore, PLQuery, load_pseudo_labels, load_rejects
from tests.helpers.dummies import tone, write_flac, write_jsonl

LANGS = ("es", "el", "sl")


def _clips(smoke_corpus: str) -> dict[str, list[Path]]:
    base = Path(smoke_corpus) / "audio/unlabeled"
    return {lang: sorted((base / lang).glob("*.flac")) for lang in LANGS}


def _cfg(watch: Path, root: Path, teachers: dict[str, str], **kw) -> RelabelConfig:
    return RelabelConfig(watch=str(watch), labels_root=str(root), teachers=teachers, preset="tiny",
                         label={"unit_max_utterances": 2}, **kw)


def _bumped(teacher: str, out: Path) -> str:
    """The same weights saved as another checkpoint (a new teacher version: other sha256, other step)."""
    state = torch.load(teacher, weights_only=True)
    state["step"] = state["step"] + 1
    torch.save(state, out)
    return str(out)


def _every_client_sees(root: Path, tmp_path: Path) -> set[tuple[str, str, str]]:
    """(id, text, teacher) of the PL table as pandas, pyarrow (hive partitioning on), duckdb, polars and Hugging
    Face `datasets` read the folder, after checking that they agree and hold each id once."""
    import os

    import datasets
    import duckdb
    import pandas as pd
    import polars
    import pyarrow.dataset as pads

    folder = f"{root}/pl"
    os.environ["HF_HUB_OFFLINE"] = "1"
    cache = tmp_path / f"hf-{time.monotonic_ns()}"
    hf = datasets.load_dataset("parquet", data_files=f"{folder}/*/*.parquet", split="train", cache_dir=str(cache))
    reads = {
        "pandas": pd.read_parquet(folder),
        "pyarrow": pads.dataset(folder, format="parquet", partitioning="hive").to_table().to_pandas(),
        "duckdb": duckdb.sql(f"select * from read_parquet('{folder}/*/*.parquet')").df(),
        "polars": polars.read_parquet(f"{folder}/*/*.parquet").to_pandas(),
        "datasets": hf.to_pandas(),
    }
    seen = {}
    for client, df in reads.items():
        assert not df["id"].duplicated().any(), f"{client} sees an id twice"
        seen[client] = {(r.id, r.text, r.teacher) for r in df.itertuples()}
    mlpl = load_pseudo_labels(str(root))
    want = {(r.id, r.text, r.teacher) for r in mlpl.itertuples()}
    assert all(got == want for got in seen.values()), {c: len(got ^ want) for c, got in seen.items()}
    return want


def test_relabel_labels_exactly_what_is_new_and_supersedes_an_older_teachers_rows(smoke_corpus, teacher, tmp_path):
    clips = _clips(smoke_corpus)
    watch, root = tmp_path / "incoming", tmp_path / "labels"
    first_batch = {"es": clips["es"][:1], "el": clips["el"][:2], "sl": clips["sl"][:2]}
    for lang, files in first_batch.items():
        (watch / lang).mkdir(parents=True)
        for c in files:
            shutil.copy(c, watch / lang / c.name)
    (watch / "sl" / "broken.flac").write_bytes(b"not audio")
    write_flac(watch / "pt" / "no-teacher.flac", tone(2.0))  # a known language without a teacher
    (watch / "notes.txt").write_text("ignored: not audio")
    teachers = {lang: teacher for lang in LANGS}
    cfg = _cfg(watch, root, teachers, unknown_language="reject")

    first = run_relabel(cfg)
    assert (first["files_seen"], first["new"], first["relabeled"], first["unchanged"]) == (7, 7, 0, 0)
    df = load_pseudo_labels(str(root))
    rejects = load_rejects(str(root))
    expected = {f"{lang}/{c.name}" for lang, cs in first_batch.items() for c in cs}
    assert set(df["id"]) | set(rejects["id"]) == expected | {"sl/broken.flac", "pt/no-teacher.flac"}
    assert not df["id"].duplicated().any() and set(df["id"]).isdisjoint(rejects["id"])
    assert first["rejected_by_reason"]["corrupt_audio"] == 1 and first["rejected_by_reason"]["unknown_language"] == 1
    assert df["audio_etag"].str.startswith("size=").all()
    assert len(_every_client_sees(root, tmp_path)) == len(df)
    units = len(LabelStore(str(root)).records())

    again = run_relabel(cfg)
    assert (again["new"], again["relabeled"], again["unchanged"], again["manifest"]) == (0, 0, 7, None)
    assert len(LabelStore(str(root)).records()) == units
    assert load_pseudo_labels(str(root)).equals(df)

    arrived = [("es", clips["es"][1]), ("sl", clips["sl"][2])]
    for lang, c in arrived:
        shutil.copy(c, watch / lang / c.name)
    added = run_relabel(cfg)
    assert (added["new"], added["relabeled"]) == (2, 0)
    after = load_pseudo_labels(str(root))
    assert set(after["id"]) - set(df["id"]) == {f"{lang}/{c.name}" for lang, c in arrived}
    assert after[after["id"].isin(df["id"])].reset_index(drop=True).equals(df)  # old rows untouched

    bumped = _bumped(teacher, tmp_path / "sl-v2.pt")
    relabeled = run_relabel(_cfg(watch, root, teachers | {"sl": bumped}, unknown_language="reject"))
    sl_ids = {i for i in after["id"] if i.startswith("sl/")} | {"sl/broken.flac"}
    assert relabeled["new"] == 0 and relabeled["relabeled_by_reason"] == {"teacher_changed": len(sl_ids)}
    final = load_pseudo_labels(str(root))
    assert not final["id"].duplicated().any() and set(final["id"]) == set(after["id"])
    new_ident = relabeled["teachers"]["sl"]
    assert (final[final["language"] == "sl"]["teacher"] == new_ident).all()
    assert (final[final["language"] != "sl"]["teacher"] != new_ident).all()
    # broken.flac stays rejected
    assert len(load_pseudo_labels(str(root), PLQuery(teacher=new_ident))) == len(sl_ids) - 1
    clients = _every_client_sees(root, tmp_path)
    assert {t for i, _, t in clients if i.startswith("sl/")} == {new_ident}  # the old sl rows are gone from the files

    (watch / "es" / clips["es"][0].name).write_bytes(clips["sl"][3].read_bytes())  # same name, other audio
    changed = run_relabel(_cfg(watch, root, teachers | {"sl": bumped}, unknown_language="reject"))
    assert changed["relabeled_by_reason"] == {"file_changed": 1}
    es_id = f"es/{clips['es'][0].name}"
    before = {i: t for i, t, _ in clients}
    now = {i: t for i, t, _ in _every_client_sees(root, tmp_path)}
    assert set(now) == set(before) and now[es_id] != before[es_id]  # the changed file's new PL, once, everywhere
    assert {i: t for i, t in now.items() if i != es_id} == {i: t for i, t in before.items() if i != es_id}


def test_unknown_languages_come_from_the_lid_head_and_manifests_name_theirs(smoke_corpus, teacher, tmp_path):
    clips = _clips(smoke_corpus)
    watch = tmp_path / "incoming"
    watch.mkdir()
    for lang in LANGS:
        shutil.copy(clips[lang][0], watch / f"unsorted-{lang}.flac")  # no language folder
    cfg = _cfg(watch, tmp_path / "labels", {lang: teacher for lang in LANGS}, lid_checkpoint=teacher)
    result = run_relabel(cfg)
    assert result["languages_from_lid"] == 3
    df = load_pseudo_labels(str(tmp_path / "labels"))
    assert dict(zip(df["id"], df["language"].astype(str), strict=True)) == {
        f"unsorted-{lang}.flac": lang for lang in LANGS}  # the smoke teacher's LID is right on these
    again = run_relabel(cfg)  # unchanged files keep the language LID gave them: no LID pass, nothing to do
    assert (again["languages_from_lid"], again["new"], again["relabeled"], again["unchanged"]) == (0, 0, 0, 3)

    sub = tmp_path / "drop" / "batch1"
    sub.mkdir(parents=True)
    shutil.copy(clips["el"][1], sub / "a.flac")
    write_jsonl(sub / "list.jsonl", [{"audio": "a.flac", "language": "el"}, {"audio": "gone.flac", "language": "es"},
                                     {"language": "es"}])
    rows, bad = scan(_cfg(tmp_path / "drop", tmp_path / "l2", {"el": teacher}, language_from="manifest",
                          unknown_language="reject"))
    assert [(r["id"], r["language"], r["audio"]) for r in rows] == [
        ("batch1/a.flac", "el", str(sub / "a.flac")), ("batch1/gone.flac", "es", str(sub / "gone.flac"))]
    assert rows[1]["etag"] == "missing" and "audio" in bad[0]["reason"]


_RUN = """
import json, sys
from pipeline.config import RelabelConfig
from pipeline.stages.relabel import run_relabel
print(json.dumps(run_relabel(RelabelConfig.model_validate_json(sys.argv[1]))["new"]))
"""


def test_two_concurrent_relabel_runs_leave_no_duplicate(smoke_corpus, teacher, tmp_path):
    clips = _clips(smoke_corpus)
    watch, root = tmp_path / "incoming", tmp_path / "labels"
    for lang in LANGS:
        (watch / lang).mkdir(parents=True)
        for c in clips[lang][:2]:
            shutil.copy(c, watch / lang / c.name)
    cfg = _cfg(watch, root, {lang: teacher for lang in LANGS}, unknown_language="reject")
    procs = [subprocess.Popen([sys.executable, "-c", _RUN, cfg.model_dump_json()], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        news = sorted(json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert news == [0, 6]  # the second waited for the lock, then found nothing new
    df = load_pseudo_labels(str(root))
    assert len(df) == 6 and not df["id"].duplicated().any()


def test_the_storage_lock_excludes_a_second_holder_and_breaks_a_dead_ones(tmp_path):
    url = str(tmp_path / "x.lock")
    order = []
    with StorageLock(url):
        t = threading.Thread(target=lambda: (StorageLock(url, poll_s=0.05).__enter__(), order.append("second")))
        t.start()
        t.join(0.5)
        order.append("first released")
    t.join(5)
    assert order == ["first released", "second"]
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "id": "x", "since": time.time()}  # no such pid
    (tmp_path / "dead.lock").write_text(json.dumps(dead))
    with StorageLock(str(tmp_path / "dead.lock"), wait_s=1):
        pass


def test_relabel_and_serve_from_the_cli(smoke_corpus, teacher, tmp_path, capsys, monkeypatch):
    from flows.cli import main

    watch = tmp_path / "incoming" / "es"
    watch.mkdir(parents=True)
    shutil.copy(_clips(smoke_corpus)["es"][0], watch / "a.flac")
    args = ["relabel", "--watch", str(watch.parent), "--labels", str(tmp_path / "labels"), "--teacher",
            f"es={teacher}", "--preset", "tiny", "--set", "unknown_language=reject"]
    assert main(args) == 0
    assert "| 1 | 1 | 0 (—) | 0 |" in capsys.readouterr().out  # seen, new, relabeled, unchanged
    assert main(args) == 0
    assert "| 1 | 0 | 0 (—) | 1 |" in capsys.readouterr().out
    assert main(["relabel", "--watch", str(watch.parent), "--labels", str(tmp_path / "labels")]) == 2
    assert "teachers" in capsys.readouterr().err  # neither teachers nor a run: a one-line reason
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["serve"]) == 2 and "PREFECT_API_URL is not set" in capsys.readouterr().err
