"""The capacity options of Li et al. 2021 through the stages: a Conformer, language-conditioned model trains on the
smoke corpus, self-trains with slimIPL and labels through the one decode path, the language read from the
manifest (or "unknown")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import label_tiny, preset, supervised_tiny
from pipeline.engine.decode import decode_features, language_ids
from pipeline.engine.model import load_trained
from pipeline.stages.label import run_label
from pipeline.stages.slimipl import run_slimipl
from pipeline.stages.supervised import run_supervised
from storage.pl import load_pseudo_labels
from tests.helpers.configs import tiny_slimipl


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
    result = run_slimipl(tiny_slimipl(smoke_corpus, checkpoint), str(tmp_path / "run"))
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


def test_a_language_conditioned_conformer_exports_with_fused_attention_and_times_in_the_bound(conformer_run):
    import onnxruntime as ort

    from pipeline.engine.onnx_export import to_onnx
    from pipeline.studies.engine_bench import run_attention_bound

    trained = load_trained(conformer_run[0])
    feats, lens, lang_ids = torch.randn(3, 300, 80), torch.tensor([300, 220, 90]), torch.tensor([0, -1, 1])
    with torch.no_grad():
        ref = trained.model(feats, lens, lang_ids)
    graph = to_onnx(trained, normalize_features=False, fused_attention=True).SerializeToString()
    log_probs, _, lid = ort.InferenceSession(graph).run(
        None, {"feats": feats.numpy(), "lens": lens.numpy(), "lang_ids": lang_ids.numpy()})
    valid = torch.arange(log_probs.shape[1])[None, :] < ref.out_lens[:, None]
    assert (torch.from_numpy(log_probs) - ref.log_probs).abs()[valid].max().item() < 1e-4
    assert (torch.from_numpy(lid) - ref.lid_logits).abs().max().item() < 1e-4
    bound = run_attention_bound(conformer_run[0], batch=2, frames=200, repeats=1)  # feeds lang_ids itself
    assert bound["attention_ops"]["attention removed"] == 0 and bound["ms"]["onnxruntime fused attention int8"] > 0
