"""`make bench`'s engine figures: the labeling engines side by side and the exported model's test CER four ways."""

from __future__ import annotations

from pipeline.engine.model import load_trained
from pipeline.studies.engine_bench import (
    format_attention_bound,
    format_engine_bench,
    format_export_bench,
    run_attention_bound,
    run_engine_bench,
    run_export_bench,
)


def test_the_engines_label_the_same_corpus_and_the_table_says_how_fast_and_how_well(smoke_corpus, teacher):
    b = run_engine_bench(smoke_corpus, teacher, repeats=1)
    e = b["engines"]
    assert {"torch", "onnxruntime fp32", "onnxruntime int8"} <= set(e)
    audio = e["torch"]["audio_s"]
    for f in e.values():
        assert f["audio_s"] == audio and f["audio_s_per_s"] > 0 and 0 < f["share_of_peak"] < 1
    # fp32 through ONNX Runtime gives torch fp32's PLs; int8 stays within a point
    fp32_torch = e.get("torch fp32", e["torch"])["avg_pl_cer"]
    assert abs(e["onnxruntime fp32"]["avg_pl_cer"] - fp32_torch) < 0.5
    assert abs(e["onnxruntime int8"]["avg_pl_cer"] - e["onnxruntime fp32"]["avg_pl_cer"]) < 2.0
    text = format_engine_bench(b)
    assert "| onnxruntime int8 |" in text and "int8 / torch:" in text


def test_the_export_transcribes_the_test_split_like_torch_through_onnx_runtime_and_sherpa(smoke_corpus, teacher):
    b = run_export_bench(smoke_corpus, teacher)
    cer = b["cer"]
    assert b["clips"] > 0 and set(cer) == {"torch", "onnxruntime fp32", "onnxruntime int8", "sherpa-onnx fp32"}
    assert abs(cer["onnxruntime fp32"]["avg"] - cer["torch"]["avg"]) <= 0.1
    assert cer["sherpa-onnx fp32"]["avg"] < 100 and b["int8_size_ratio"] <= 0.3
    assert "| sherpa-onnx fp32 |" in format_export_bench(b)


def test_the_bound_times_every_graph_and_says_what_ratio_attention_leaves_room_for(teacher):
    b = run_attention_bound(teacher, batch=2, frames=300, repeats=1)
    graphs = [f"onnxruntime {g} {p}" for g in ("standard ops", "fused attention", "attention removed")
              for p in ("fp32", "int8")]
    assert set(graphs) | {"torch fp32"} <= set(b["ms"]) and all(v > 0 for v in b["ms"].values())
    layers = load_trained(teacher).model.layers
    # the bound's graph really has no attention left; the others have one per layer
    assert b["attention_ops"] == {"standard ops": len(layers), "fused attention": len(layers), "attention removed": 0}
    text = format_attention_bound(b)
    assert "| onnxruntime, attention removed (no kernel beats it) |" in text and "at most" in text
