"""Storage: BOM manifests, damaged checkpoints as one-line errors, atomic writes."""

from __future__ import annotations

import pytest
import torch

from flows.cli import main
from storage.checkpoint import load_checkpoint, save_checkpoint
from storage.files import atomic_write_text, list_files
from storage.manifest import read_manifest


class _Foreign:
    """A class no mlpl checkpoint holds."""


def test_a_manifest_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"id": "a", "language": "es"}\n{"id": "b", "language": "es"}\n{"id": "c", "text": "ni\xf1o"}\n'
    )
    rows, rejects = read_manifest(str(path))
    assert [r["id"] for r in rows] == ["a", "b"] and set(rows[0]) == {"id", "language"}  # no BOM in a key
    # A line that is not UTF-8 is still a reject naming its line, BOM or not.
    assert len(rejects) == 1 and "not valid UTF-8" in rejects[0]["reason"] and rejects[0]["id"].endswith(":3")


def test_a_manifest_without_a_byte_order_mark_reads_the_same(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_bytes(b'{"id": "a"}\r\n\xef\xbb\xbf{"id": "b"}\n')  # a BOM mid-file is not stripped
    rows, rejects = read_manifest(str(path))
    assert [r["id"] for r in rows] == ["a"] and len(rejects) == 1 and rejects[0]["id"].endswith(":2")


def test_a_good_checkpoint_round_trips(tmp_path):
    url = str(tmp_path / "ok.pt")
    save_checkpoint(url, {"step": 3, "w": torch.arange(4.0), "rng": (3, (1, 2), None)})
    back = load_checkpoint(url)
    assert back["step"] == 3 and torch.equal(back["w"], torch.arange(4.0))


@pytest.mark.parametrize("damage", ["empty", "truncated", "corrupt", "text", "foreign class", "not a dict"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, damage, capsys):
    url = tmp_path / "last.pt"
    save_checkpoint(str(url), {"step": 3, "w": torch.randn(1000)})
    data = url.read_bytes()
    if damage == "empty":
        url.write_bytes(b"")
    elif damage == "truncated":
        url.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        url.write_bytes(data[:-64] + bytes(64))  # the zip directory at the end is overwritten
    elif damage == "foreign class":
        torch.save({"model": _Foreign()}, url)  # another tool's checkpoint: weights_only refuses the class
    elif damage == "text":
        url.write_text("this is a manifest, not a checkpoint\n")
    else:
        save_checkpoint(str(url), [1, 2, 3])
    with pytest.raises(ValueError, match="is not a readable mlpl checkpoint") as err:
        load_checkpoint(str(url))
    assert str(url) in str(err.value) and "\n" not in str(err.value)
    # Through the CLI: `mlpl: error: …` on one line, exit 2, no traceback.
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    assert main(["evaluate", "--checkpoint", str(url), "--manifest", str(manifest), "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlpl: error:") and str(url) in lines[0]


def test_a_missing_checkpoint_is_file_not_found_and_a_directory_a_value_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match=r"is not a readable mlpl checkpoint \(a directory\)"):
        load_checkpoint(str(tmp_path))


def test_atomic_writes_leave_no_temp_file(tmp_path):
    atomic_write_text(str(tmp_path / "a.txt"), "one")
    atomic_write_text(str(tmp_path / "a.txt"), "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and list_files(str(tmp_path)) == [str(tmp_path / "a.txt")]


def _commit(store, index: int, rows: dict[str, str], rejected: tuple[str, ...] = (), *, supersede: bool = True):
    """Commit a unit of language `sl` whose kept rows are {id: text} and whose rejects are `rejected` ids."""
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    shard = store.open_shard("sl", index)
    for uid in rows:
        shard.write(uid, b"fLaC", {"id": uid})
    store.commit_unit("sl", index, shard=shard,
                      rows=[{"id": uid, "text": text, "created_at": now, "key": uid} for uid, text in rows.items()],
                      rejects=[{"id": uid, "reason": "low confidence", "created_at": now} for uid in rejected],
                      record={"unit": index, "language": "sl", "keys": {"rows": str(index)}}, supersede=supersede)


def test_a_unit_that_labels_ids_again_replaces_their_rows_in_place(tmp_path):
    import pandas as pd

    from storage.pl import LabelStore, load_pseudo_labels

    store = LabelStore(str(tmp_path / "labels"))
    _commit(store, 0, {"a": "old a", "b": "old b"})
    _commit(store, 1, {"c": "c"})
    assert store.ids_with_rows(["a", "c", "x"]) == {"a", "c"}
    _commit(store, 2, {"b": "new b", "d": "d"}, rejected=("a",))  # b relabeled, a's new attempt rejected
    plain = pd.read_parquet(tmp_path / "labels" / "pl")
    assert sorted(zip(plain["id"], plain["text"], strict=True)) == [("b", "new b"), ("c", "c"), ("d", "d")]
    # b's new row sits where its old one was; the unit's own file holds only what was new.
    assert list(pd.read_parquet(tmp_path / "labels/pl/sl/part-000000.parquet")["id"]) == ["b"]
    assert list(pd.read_parquet(tmp_path / "labels/pl/sl/part-000002.parquet")["id"]) == ["d"]
    assert store.record("sl", 2)["superseded"] == {"replaced": 1, "removed": 1, "files": ["pl/sl/part-000000.parquet"]}
    assert sorted(load_pseudo_labels(str(tmp_path / "labels"))["id"]) == ["b", "c", "d"]
    # A unit whose every row is superseded away keeps no file (datasets cannot read an empty one), yet counts as
    # committed: its record says it holds no rows.
    _commit(store, 3, {"c": "c again"})
    assert not (tmp_path / "labels/pl/sl/part-000003.parquet").exists()
    _commit(store, 4, {}, rejected=("c",))
    assert not (tmp_path / "labels/pl/sl/part-000001.parquet").exists()
    assert store.record("sl", 1)["pl_rows"] == 0
    assert store.committed_record("sl", 1, {"rows": "1"}) is not None
    # Without supersede (none of the ids had a row at planning) nothing earlier is touched.
    _commit(store, 5, {"b": "unchecked"}, supersede=False)
    assert sorted(pd.read_parquet(tmp_path / "labels" / "pl")["text"]) == ["d", "new b", "unchecked"]


# --- faults (issue 33): a full disk, a killed writer's temp files, a busy run folder -------------------------


def test_a_full_disk_is_a_one_line_error_naming_the_file_and_leaves_nothing_half_written(tmp_path, capsys):
    from storage.faults import FullDiskFileSystem
    from storage.files import DiskFullError, atomic_write_bytes

    url = f"fulldisk://{tmp_path}/out/shard.tar"
    for budget in (0, 10, 99):  # nothing, a few bytes, all but the last
        FullDiskFileSystem.set_budget(budget)
        try:
            with pytest.raises(DiskFullError, match=r"^\[Errno 28\] no space left writing fulldisk://.*shard\.tar: "
                               r"free space .* rerun the same command") as err:
                atomic_write_bytes(url, b"x" * 100)
        finally:
            FullDiskFileSystem.set_budget(None)
        assert "\n" not in str(err.value)
        assert list((tmp_path / "out").iterdir()) == []  # no temp file, nothing under the final name
    atomic_write_bytes(url, b"x" * 100)  # room again: the rerun writes it whole
    assert (tmp_path / "out/shard.tar").read_bytes() == b"x" * 100
    # through the CLI: one line, exit 2
    FullDiskFileSystem.set_budget(0)
    try:
        assert main(["corpus", "build", "--preset", "smoke", "--out", f"fulldisk://{tmp_path}/corpus"]) == 2
    finally:
        FullDiskFileSystem.set_budget(None)
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("mlpl: error: [Errno 28] no space left writing")


def test_temp_files_of_dead_writers_are_swept_and_a_live_writers_kept(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from storage.files import AtomicWriter, sweep_temp_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    host = socket.gethostname()
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / f"a/b/.x.tar.tmp-{host}-{dead}-0123").write_bytes(b"half")
    (tmp_path / "a/.y.parquet.tmp-0123456789abcdef").write_bytes(b"old format")  # no writer in the name
    live = AtomicWriter(str(tmp_path / "a/z.json"))  # this process, still writing
    live.write(b"{}")
    removed = sweep_temp_files(str(tmp_path))
    assert [os.path.basename(r) for r in removed] == [f".x.tar.tmp-{host}-{dead}-0123"]
    assert sweep_temp_files(str(tmp_path), stale_s=0) == [str(tmp_path / "a/.y.parquet.tmp-0123456789abcdef")]
    live.commit()
    assert sorted(p.name for p in (tmp_path / "a").rglob("*") if p.is_file()) == ["z.json"]


def test_a_second_recipe_on_a_run_folder_is_refused_naming_the_holder(tmp_path):
    import os
    import subprocess
    import sys

    from pipeline.layout import RunLayout

    run = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pipeline.layout import RunLayout\n"
                               f"with RunLayout({run!r}).recipe_lock():\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match=rf"held by pid {holder.pid} on .* another recipe is running in "
                           rf"{run}: wait for it"):
            with RunLayout(run).recipe_lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunLayout(run).recipe_lock():  # its holder died: taken over at once
        assert os.path.exists(f"{run}/recipe.lock")
    assert not os.path.exists(f"{run}/recipe.lock")
