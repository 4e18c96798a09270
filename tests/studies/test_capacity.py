"""The capacity study (`make capacity`): every setting trained to the same time budget from probed update rates,
and its four tables."""

from __future__ import annotations

import json

import pytest

from pipeline.studies.capacity import (
    MULTILINGUAL,
    PROBE_UPDATES,
    CapacityRun,
    CapacityStudy,
    publish_capacity,
    rebalance,
    run_capacity_study,
)


def test_the_capacity_study_trains_every_setting_to_the_same_budget_and_writes_four_tables(smoke_corpus, tmp_path):
    # Seconds per update as a probe would measure them: the deep model twice as slow as tiny, so half the updates.
    cost = {"tiny_deep_narrow": 2.0}
    study = CapacityStudy(smoke_corpus, str(tmp_path / "study"), reference_updates=8, eval_count=1,
                          probe=lambda run: cost.get(run.model, 1.0))
    figures = run_capacity_study(study)
    assert set(figures) == {r.name for r in MULTILINGUAL} | {"mono_el", "mono_es", "mono_sl"}
    assert figures["tiny"]["updates"] == 8 and figures["tiny_deep_narrow"]["updates"] == 4
    assert figures["mono_sl"]["language"] == "sl" and set(figures["mono_sl"]["test_cer"]) == {"sl"}
    assert set(figures["tiny_conformer"]["test_cer"]) == {"el", "es", "sl"}
    params = {n: figures[n]["parameters"] for n in ("tiny", "tiny_deep_narrow", "tiny_wide_shallow", "tiny_conformer")}
    assert max(params.values()) / min(params.values()) < 1.02  # equal parameters (same vocabulary here)
    results = tmp_path / "results.md"
    results.write_text("# Results\n\n## Ablations\n\nkept\n")
    table = publish_capacity(study, str(results), "make capacity", "test CPU")
    page = results.read_text()
    assert "## Ablations\n\nkept" in page and "## Capacity study" in page and table.strip() in page
    for title in ("a. Depth against width", "b. Transformer against Conformer", "c. Language conditioning",
                  "d. One model per language"):
        assert f"### {title}" in table
    assert table.count("Won: **") == 3 and "Worse in the multilingual model:" in table
    assert "(not finished)" not in table
    again = run_capacity_study(study, ["tiny"])  # finished runs are reused, not retrained
    assert again["tiny"]["updates"] == 8
    # The second pass: the deep run took twice tiny's time for its 4 updates, so it trains again with 2.
    record = tmp_path / "study" / "capacity.json"
    data = json.loads(record.read_text())
    for name, f in data["runs"].items():
        f["train_wall_s"] = 20.0 if name == "tiny_deep_narrow" else 10.5 if name == "mono_sl" else 10.0
    record.write_text(json.dumps(data))
    assert rebalance(study) == ["tiny_deep_narrow"]  # mono_sl is within 10 %
    data = json.loads(record.read_text())
    assert data["runs"]["tiny_deep_narrow"]["updates"] == 2 and data["rebalanced_updates"] == {"tiny_deep_narrow": 2}
    assert data["budget_s"] == 10.0
    assert run_capacity_study(study, ["tiny_deep_narrow"])["tiny_deep_narrow"]["updates"] == 2  # the count stays
    with pytest.raises(ValueError, match="no capacity run named nope"):
        run_capacity_study(study, ["nope"])


def test_the_probe_times_updates_and_is_kept(smoke_corpus, tmp_path):
    study = CapacityStudy(smoke_corpus, str(tmp_path))
    s = study.seconds_per_update(CapacityRun("tiny"))
    record = json.loads((tmp_path / "probes" / "tiny.json").read_text())
    assert record["updates"] == PROBE_UPDATES and record["warmup_updates"] == 10
    assert record["s_per_update"] == s and 0 < s < 5
    assert study.seconds_per_update(CapacityRun("tiny")) == s  # read back, not probed again
