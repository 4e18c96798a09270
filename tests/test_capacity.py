"""Li et al. 2021's capacity options through the stages: a Conformer, language-conditioned model trains on the
smoke corpus, self-trains with slimIPL and labels through the one decode path, the language read from the
manifest (or "unknown")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import label_tiny, preset, supervised_tiny
from pipeline.engine.decode import decode_features, language_ids
from pipeline.engine.model import load_trained
from pipeline.stages.label import run_label
from pipeline.stages.slimipl import run_slimipl
from pipeline.stages.supervised import run_supervised
from pipeline.studies.capacity import (
    MULTILINGUAL,
    PROBE_UPDATES,
    CapacityRun,
    CapacityStudy,
    publish_capacity,
    rebalance,
    run_capacity_study,
)
from storage.pl import load_pseudo_labels
from tests.test_selftrain import _slim


@pytest.fixture(scope="module")
def conformer_run(smoke_corpus, tmp_path_factory) -> tuple[str, list[float]]:
    """A Conformer with language conditioning after 120 supervised updates: (checkpoint, losses)."""
    model = preset("model", "tiny_conformer").model_copy(update={"language_conditioning": True})
    cfg = supervised_tiny(f"{smoke_corpus}/manifests/labeled.jsonl", None, model=model, max_updates=120,
                          save_every=120, log_every=40)
    result = run_supervised(cfg, str(tmp_path_factory.mktemp("conformer")))
    return result.last_checkpoint, result.losses


def test_a_language_conditioned_conformer_trains_and_reads_the_language(conformer_run, smoke_corpus):
    checkpoint, losses = conformer_run
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    trained = load_trained(checkpoint)
    assert trained.checkpoint["model_kwargs"]["encoder"] == "conformer"
    embedding = trained.model.language_embedding.weight
    assert embedding.abs().sum(dim=1).gt(0).all()  # every language and "unknown" were trained
    feats = [torch.randn(300, 80), torch.randn(200, 80)]
    kw = dict(tokenizer=trained.tokenizer, languages=trained.languages, bf16=False, keep_log_probs=True)
    known = decode_features(trained.model, feats, clip_languages=["sl", "es"], **kw)
    unknown = decode_features(trained.model, feats, **kw)
    assert not torch.allclose(known[0]["log_probs"], unknown[0]["log_probs"])
    assert language_ids(["sl", None, "xx", "es"], trained.languages).tolist() == [
        trained.languages.index("sl"), -1, -1, trained.languages.index("es")]


def test_the_conformer_plugs_into_slimipl_and_labeling_unchanged(conformer_run, smoke_corpus, tmp_path):
    checkpoint, _ = conformer_run
    result = run_slimipl(_slim(smoke_corpus, checkpoint), str(tmp_path / "run"))
    assert result.step == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    manifest = f"{smoke_corpus}/manifests/unlabeled.jsonl"
    labeled = run_label(label_tiny(manifest, {lang: checkpoint for lang in ("es", "el", "sl")},
                                   unit_max_utterances=4, crop_s=2.0, crop_overlap_s=0.5,
                                   max_whole_s=3.0), str(tmp_path / "labels"))
    table = load_pseudo_labels(str(tmp_path / "labels"))
    kept = sum(s["rows_kept"] for s in labeled.summary.values())
    rejected = sum(s["rows_rejected"] for s in labeled.summary.values())
    rows = sum(1 for _ in Path(manifest).open())
    assert len(table) == kept and kept + rejected == rows and kept > 0


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
