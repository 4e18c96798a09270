"""The serving-size study (issue 20) end to end on the smoke corpus at tiny budgets: every pruning variant and bit
width trains, is scored through its serving checkpoint, and lands in the results page's tables with its size."""

from __future__ import annotations

import pytest

from pipeline.studies.serving import PRUNE_RUNS, QUANT_BITS, ServingStudy, publish_serving, run_serving_study
from storage.files import read_json


def test_the_serving_study_scores_every_variant_and_writes_both_tables(smoke_corpus, teacher, tmp_path):
    study = ServingStudy(smoke_corpus, str(tmp_path / "study"), init_checkpoint=teacher, sparsity=0.5, updates=2,
                         round_updates=1)
    out = run_serving_study(study)
    assert [r["name"] for r in out["pruning"]] == [name for name, _, _ in PRUNE_RUNS]
    assert [r.get("bits") for r in out["quantization"]] == [None, *QUANT_BITS]
    rows = {r["name"]: r for r in out["pruning"] + out["quantization"]}
    assert set(rows["float"]["test_cer"]) == {"es", "el", "sl"}
    assert rows["dense"]["sparsity"] == {"all": 0.0}
    assert rows["agnostic-imp"]["sparsity"]["all"] == pytest.approx(0.5, abs=0.01)
    assert set(rows["pathways-lth"]["sparsity"]) == {"es", "el", "sl", "union"}
    # Sizes on disk follow the bit width and the sparsity.
    assert rows["1-bit"]["bytes"] < rows["2-bit"]["bytes"] < rows["4-bit"]["bytes"] < rows["8-bit"]["bytes"]
    assert rows["8-bit"]["bytes"] < 0.5 * rows["float"]["bytes"]  # against the float32 weights alone
    assert rows["agnostic-imp"]["bytes"] < 0.75 * rows["dense"]["bytes"]
    assert read_json(str(tmp_path / "study/serving.json")) == out  # kept for a rerun and the page
    page = tmp_path / "results.md"
    page.write_text("# Results\n\n## Capacity study\n\nkept\n")
    table = publish_serving(study, str(page), "make serving", "test CPU")
    text = page.read_text()
    assert "## Capacity study\n\nkept" in text and "## Serving-size students" in text and table in text
    assert "| pathways-imp |" in table and "| 1-bit | 1 |" in table and "50.0 %" in table
    assert run_serving_study(study) == out  # a rerun reuses every finished run
