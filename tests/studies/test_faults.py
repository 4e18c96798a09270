"""`make faults`: the harness's trials through the real components, a few at a time on the smoke corpus (the whole
table, every trial, is `make faults`)."""

from __future__ import annotations

import shutil
import tarfile

import pytest

from pipeline.studies.faults import compare_labels, format_faults, run_faults
from storage.faults import partial_files


def test_disk_full_labeling_and_a_killed_relabel_recover_to_the_reference(smoke_corpus, teacher, tmp_path):
    results = run_faults(smoke_corpus, teacher, str(tmp_path), trials=2, seed=1,
                         only=["disk_full_labeling", "relabel", "corrupt_table"])
    by = {r.fault.split(" ")[0] + " " + r.fault.split(" ")[1]: r for r in results}
    assert len(results) == 3
    for r in results:
        assert r.recovered and r.trials >= 1, (r.fault, r.problems)
        assert (r.rows_lost, r.rows_duplicated, r.differing) == (0, 0, 0)
    assert "ArrowInvalid on pl/" in by["PL table"].note
    assert "| disk full (ENOSPC) while labeling" in format_faults(results, "cpu", "make faults")


def test_the_comparison_finds_a_lost_a_changed_and_a_half_written_file(smoke_corpus, labeled_root, tmp_path):
    root = tmp_path / "labels"
    shutil.copytree(labeled_root, root)
    assert compare_labels(labeled_root, str(root)) == {"rows_lost": 0, "rows_duplicated": 0, "differing": 0}
    assert partial_files(str(root)) == []
    shard = sorted(root.glob("shards/*.tar"))[0]
    with tarfile.open(shard) as tar:
        first = tar.getmembers()[0].offset_data
    data = bytearray(shard.read_bytes())
    data[first + 100] ^= 0xFF  # one byte of the first sample's audio
    shard.write_bytes(bytes(data))
    assert compare_labels(labeled_root, str(root))["differing"] >= 1
    shard.write_bytes(bytes(data[: len(data) // 2]))  # cut: unreadable under its final name
    assert any("unreadable" in p for p in partial_files(str(root)))
    (root / "pl/.x.parquet.tmp-host-1-abc").write_bytes(b"")
    assert any("temp file left" in p for p in partial_files(str(root)))
    assert not any("temp file left" in p for p in partial_files(str(root), temp_ok=True))


@pytest.mark.slow
def test_s3_faults_are_retried_and_the_labels_and_weights_equal_the_reference(smoke_corpus, teacher, tmp_path):
    (result,) = run_faults(smoke_corpus, teacher, str(tmp_path), trials=1, seed=2, only=["s3"])
    assert result.recovered and result.trials == 1, result.problems
    assert "requests failed on purpose" in result.note and not result.note.startswith("0 of")
