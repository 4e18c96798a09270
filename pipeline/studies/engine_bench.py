"""`make bench`, the labeling engines side by side (issue 32): the one labeling path (`run_label`) on the corpus'
unlabeled audio with the torch engine and the ONNX Runtime engine in fp32 and int8, same teacher, same run:
audio-s/s, share of each engine's own GEMM peak, and PL CER against the hidden transcripts; then the bound: one
batch through each graph, and through ONNX Runtime with the attention taken out of the graph."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import LabelConfig, label_tiny
from pipeline.engine.device import best_seconds, cpu_name, gemm_peak_flops, precision_used
from pipeline.engine.model import load_trained
from pipeline.layout import hidden_file, split_manifest
from pipeline.report.report import hidden_references, pl_quality
from pipeline.stages.label import run_label
from pipeline.studies.common import mark
from storage.files import exists, join, read_text
from storage.pl import LabelStore, load_pseudo_labels

ENGINES = (("torch", {}), ("onnxruntime fp32", {"engine": "onnxruntime", "onnx_precision": "fp32"}),
           ("onnxruntime int8", {"engine": "onnxruntime", "onnx_precision": "int8"}))


def ort_int8_gemm_peak(n: int = 1536, repeats: int = 5) -> float:
    """ONNX Runtime's int8 matmul ops/s on this CPU (MatMulInteger, uint8 × int8 as its dynamic quantization
    runs them): best of `repeats` n×n×n products."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(onnx.shape_inference.infer_shapes(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    return 2 * n**3 / best_seconds(lambda: session.run(None, feeds), repeats)


def _timed_label(cfg: LabelConfig, root: str) -> dict[str, float]:
    """One labeling run: its wall time and the model's time (the units' records)."""
    t0 = time.perf_counter()
    run_label(cfg, root)
    wall = time.perf_counter() - t0
    records = LabelStore(root).records()
    return {"wall_s": wall, "model_s": sum(r["model_s"] for r in records),
            "audio_s": sum(r["audio_s"] for r in records)}


def run_engine_bench(corpus_dir: str, teacher_url: str, repeats: int = 2) -> dict[str, Any]:
    """Each engine labels the corpus' unlabeled manifest once untimed (teacher loaded or exported, audio in the page
    cache), then `repeats` times interleaved (a slow spell of the machine hits every engine); the best run counts."""
    manifest = split_manifest(corpus_dir, "unlabeled")
    references = hidden_references(hidden_file(corpus_dir, "unlabeled_reference.jsonl"))
    trained = load_trained(teacher_url)
    teachers = {lang: teacher_url for lang in trained.languages}
    precision = precision_used(True)
    fp32_peak = gemm_peak_flops(torch.float32)
    peaks = {"torch": gemm_peak_flops(torch.bfloat16) if precision == "bf16" else fp32_peak,
             "torch fp32": fp32_peak, "onnxruntime fp32": fp32_peak, "onnxruntime int8": ort_int8_gemm_peak()}
    # Where torch runs bf16, its fp32 run shows the ratios of a CPU without native bf16 (AVX2-only).
    variants = ENGINES + ((("torch fp32", {"bf16": False}),) if precision == "bf16" else ())
    configs = {name: label_tiny(manifest, teachers, **kw) for name, kw in variants}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    quality, prepare_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(configs.items()):
            t0 = time.perf_counter()
            run_label(cfg, join(tmp, f"warm-up-{i}"))
            prepare_s[name] = time.perf_counter() - t0
        for r in range(repeats):
            for i, (name, cfg) in enumerate(configs.items()):
                runs[name].append(_timed_label(cfg, join(tmp, f"{i}-{r}")))
        for i, name in enumerate(configs):
            table = load_pseudo_labels(join(tmp, f"{i}-0"))
            quality[name] = pl_quality(table, references)
        durations = list(table["duration_s"])
    frames_per_s = 1000.0 / trained.features.hop_ms
    useful_flops = sum(trained.model.matmul_flops(round(d * frames_per_s)) for d in durations)
    engines = {}
    for name, got in runs.items():
        best = min(got, key=lambda g: g["wall_s"])
        cers = [q["cer"] for q in quality[name].values()]
        engines[name] = best | {
            "audio_s_per_s": best["audio_s"] / best["wall_s"], "model_audio_s_per_s": best["audio_s"] / best["model_s"],
            "peak_gops": peaks[name] / 1e9, "share_of_peak": useful_flops / best["model_s"] / peaks[name],
            "pl_cer": quality[name], "avg_pl_cer": sum(cers) / len(cers), "first_run_s": prepare_s[name]}
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch_precision": precision,
            "teacher": teacher_url, "repeats": repeats, "engines": engines}


def format_engine_bench(b: dict[str, Any]) -> str:
    """Markdown of `run_engine_bench`, each ratio beside the issue's target."""
    e = b["engines"]
    torch_rate, torch_cer = e["torch"]["audio_s_per_s"], e["torch"]["avg_pl_cer"]
    peak_kind = {"torch": f"{b['torch_precision']} matmul", "torch fp32": "fp32 matmul",
                 "onnxruntime fp32": "fp32 matmul", "onnxruntime int8": "MatMulInteger"}
    lines = [f"Labeling engines, same teacher ({b['teacher']}), same run; {b['cpu']}, {b['threads']} threads; best of "
             f"{b['repeats']} interleaved runs after an untimed one (teacher loaded or exported, audio cached)", "",
             "| engine | audio-s/s | model-time audio-s/s | × torch | share of its GEMM peak | PL CER % | "
             "first run s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, f in e.items():
        label = f"torch ({b['torch_precision']}, the default)" if name == "torch" else name
        lines.append(f"| {label} | {f['audio_s_per_s']:.0f} | {f['model_audio_s_per_s']:.0f} | "
                     f"{f['audio_s_per_s'] / torch_rate:.2f}× | {100 * f['share_of_peak']:.0f} % of "
                     f"{f['peak_gops']:.0f} G/s ({peak_kind[name]}) | {f['avg_pl_cer']:.2f} | {f['first_run_s']:.1f} |")
    int8, fp32 = e["onnxruntime int8"], e["onnxruntime fp32"]
    lines += ["", f"int8 / torch: {int8['audio_s_per_s'] / torch_rate:.2f}× (target ≥ 2×: "
              f"{mark(int8['audio_s_per_s'] >= 2 * torch_rate)}); PL CER {int8['avg_pl_cer'] - torch_cer:+.2f} points "
              f"(target within 1: {mark(abs(int8['avg_pl_cer'] - torch_cer) <= 1)}); fp32 / torch: "
              f"{fp32['audio_s_per_s'] / torch_rate:.2f}× (target ≥ 1×: {mark(fp32['audio_s_per_s'] >= torch_rate)})"]
    return "\n".join(lines)


def _no_attention(attn: nn.Module, x: torch.Tensor, rel_index: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """An attention layer's output projection alone: the graph's cost with attention free."""
    return attn.proj(x)


def run_attention_bound(teacher_url: str, batch: int = 8, frames: int = 2600, repeats: int = 8) -> dict[str, Any]:
    """ms per forward of one padded batch (`batch` clips of up to `frames` frames, 20-26 s) through torch (fp32,
    and bf16 where native), ONNX Runtime's graphs (standard ops, fused attention) in fp32 and int8, and ONNX Runtime
    with no attention at all: what no attention kernel can beat."""
    import onnxruntime as ort

    from models.export import onnx_runtime_attention
    from pipeline.engine.device import autocast
    from pipeline.engine.onnx_export import to_onnx
    from storage.onnx_model import int8_bytes

    trained = load_trained(teacher_url)
    model = trained.model.eval()
    lens = torch.linspace(frames, frames * 0.77, batch).round().long()
    feats = torch.randn(batch, frames, trained.features.n_mels, generator=torch.Generator().manual_seed(0))
    # A language-conditioned teacher takes its language ids too: unknown here, as for unlabeled audio.
    lang_ids = torch.full((batch,), -1) if trained.model.language_embedding is not None else None

    ms: dict[str, float] = {}
    with torch.no_grad():
        for precision in ("fp32", "bf16") if precision_used(True) == "bf16" else ("fp32",):
            with autocast(precision == "bf16"):
                ms[f"torch {precision}"] = 1000 * best_seconds(lambda: model(feats, lens, lang_ids), repeats)
    graphs = {"standard ops": to_onnx(trained, normalize_features=False),
              "fused attention": to_onnx(trained, normalize_features=False, fused_attention=True)}
    with onnx_runtime_attention(model, _no_attention):
        graphs["attention removed"] = to_onnx(trained, normalize_features=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    feeds = {"feats": feats.numpy(), "lens": lens.numpy()}
    if lang_ids is not None:
        feeds["lang_ids"] = lang_ids.numpy()
    for name, graph in graphs.items():
        fp32 = graph.SerializeToString()
        for precision, data in (("fp32", fp32), ("int8", int8_bytes(fp32))):
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            ms[f"onnxruntime {name} {precision}"] = 1000 * best_seconds(lambda s=session: s.run(None, feeds),
                                                                         repeats)
    attention_ops = {name: sum(n.op_type in ("Softmax", "MultiHeadAttention") for n in graph.graph.node)
                     for name, graph in graphs.items()}
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "batch": batch, "frames": frames,
            "teacher": teacher_url, "ms": ms, "attention_ops": attention_ops}


def format_attention_bound(b: dict[str, Any]) -> str:
    """Markdown of `run_attention_bound`, with the ratio the bound allows against the torch engine."""
    ms = b["ms"]
    torch_ms = ms.get("torch bf16", ms["torch fp32"])
    lines = [f"The bound: one batch of {b['batch']} clips of up to {b['frames']} frames, forward only; {b['cpu']}, "
             f"{b['threads']} threads; ms per batch (best of several)", "",
             "| graph | fp32 | int8 (torch: bf16) |", "|---|---:|---:|",
             f"| torch (the labeling engine) | {ms['torch fp32']:.1f} | "
             + (f"{ms['torch bf16']:.1f} |" if "torch bf16" in ms else "— (no native bf16) |")]
    for name in ("standard ops", "fused attention (the engine)", "attention removed (no kernel beats it)"):
        key = name.split(" (")[0]
        lines.append(f"| onnxruntime, {name} | {ms[f'onnxruntime {key} fp32']:.1f} | "
                     f"{ms[f'onnxruntime {key} int8']:.1f} |")
    bound = torch_ms / ms["onnxruntime attention removed int8"]
    engine = torch_ms / ms["onnxruntime fused attention int8"]
    lines += ["", f"ONNX Runtime int8 against the torch engine: {engine:.2f}× as exported, at most {bound:.2f}× with "
              f"attention free (target 2×: {'reachable' if bound >= 2 else '**out of reach on this CPU**'})"]
    return "\n".join(lines)


def export_checkpoint(given: str | None, default: str, teacher: str) -> str:
    """What the export figures use: the checkpoint given, else the default (make demo's student) when it exists,
    else the labeling teacher."""
    return given or (default if exists(default) else teacher)


def _greedy_text(log_probs: np.ndarray, symbols: list[str], blank_id: int) -> str:
    """Greedy CTC over one utterance's log-probs with the export's own symbol table (as the README's snippet)."""
    ids = log_probs.argmax(-1)
    kept = [int(i) for j, i in enumerate(ids) if i != blank_id and (j == 0 or i != ids[j - 1])]
    return "".join(symbols[i] for i in kept).replace("▁", " ").strip()


def run_export_bench(corpus_dir: str, checkpoint: str, split: str = "test") -> dict[str, Any]:
    """A checkpoint exported (`mlpl export-model`) and its test split transcribed four ways: torch (mlpl's decode
    path, fp32), plain ONNX Runtime on model.onnx and model.int8.onnx (unnormalized log-mel in, greedy over
    tokens.txt: the README's snippet), and sherpa-onnx (its own front end); CER per language and their average."""
    import onnxruntime as ort

    from pipeline.data.audio import load_audio, log_mel
    from pipeline.data.rows import read_utterances
    from pipeline.engine.decode import decode_features
    from pipeline.engine.evaluate import score
    from pipeline.engine.onnx_export import export_model
    from pipeline.engine.onnx_runtime import sherpa_recognizer

    trained = load_trained(checkpoint)
    utts, _ = read_utterances(split_manifest(corpus_dir, split), require_text=True, languages=None)
    hyps: dict[str, list[str]] = {"torch": [], "onnxruntime fp32": [], "onnxruntime int8": [], "sherpa-onnx fp32": []}
    with tempfile.TemporaryDirectory() as out:
        meta = export_model(checkpoint, out)
        symbols = [line.rsplit(" ", 1)[0] for line in read_text(join(out, "tokens.txt")).splitlines()]
        sessions = {name: ort.InferenceSession(join(out, f), providers=["CPUExecutionProvider"])
                    for name, f in (("onnxruntime fp32", "model.onnx"), ("onnxruntime int8", "model.int8.onnx"))}
        sherpa = sherpa_recognizer(out)
        for u in utts:
            wav = load_audio(u.audio, trained.audio_policy)
            hyps["torch"].append(decode_features(trained.model, [log_mel(wav, trained.features)],
                                                 tokenizer=trained.tokenizer, languages=trained.languages,
                                                 bf16=False)[0]["hypothesis"])
            feats = log_mel(wav, trained.features, normalize=False)[None].numpy()
            inputs = {"feats": feats, "lens": np.array([feats.shape[1]], dtype=np.int64)}
            if meta["language_input"]:
                inputs["lang_ids"] = np.array([-1], dtype=np.int64)
            for name, session in sessions.items():
                log_probs, out_lens, _ = session.run(None, inputs)
                hyps[name].append(_greedy_text(log_probs[0, : out_lens[0]], symbols, meta["blank_id"]))
            stream = sherpa.create_stream()
            stream.accept_waveform(trained.features.sample_rate_hz, wav.numpy())
            sherpa.decode_stream(stream)
            hyps["sherpa-onnx fp32"].append(stream.result.text)
    sizes = meta["bytes"]
    cers = {}
    for name, got in hyps.items():
        table = score([{"language": u.language, "reference": u.text, "hypothesis": h, "lid_pred": u.language}
                       for u, h in zip(utts, got, strict=True)])
        cers[name] = {lang: v["cer"] for lang, v in table.items() if lang not in ("all", "macro")}
        cers[name]["avg"] = table["macro"]["cer"]
    return {"checkpoint": checkpoint, "split": split, "clips": len(utts), "cer": cers, "bytes": sizes,
            "int8_size_ratio": sizes["model.int8.onnx"] / sizes["model.onnx"], "cpu": cpu_name()}


def format_export_bench(b: dict[str, Any]) -> str:
    """Markdown of `run_export_bench`, each difference beside the issue's target."""
    langs = [k for k in b["cer"]["torch"] if k != "avg"]
    # path → (what it is compared with, the tolerance in CER points)
    targets = {"onnxruntime fp32": ("torch", 0.1), "onnxruntime int8": ("onnxruntime fp32", 1.0),
               "sherpa-onnx fp32": ("torch", 0.5)}
    lines = [f"`mlpl export-model` of {b['checkpoint']}; {b['split']} split, {b['clips']} clips, one at a time; "
             f"{b['cpu']}", "", f"| path | {' | '.join(langs)} | avg CER % | difference (target) |",
             "|---|" + "---:|" * (len(langs) + 2)]
    for name, cer in b["cer"].items():
        note = ""
        if name in targets:
            other, tolerance = targets[name]
            diff = cer["avg"] - b["cer"][other]["avg"]
            note = f"{diff:+.2f} vs {other} (within {tolerance}: {mark(abs(diff) <= tolerance)})"
        lines.append(f"| {name} | {' | '.join(f'{cer[k]:.2f}' for k in langs)} | {cer['avg']:.2f} | {note} |")
    lines += ["", f"model.onnx {b['bytes']['model.onnx'] / 1e6:.2f} MB, model.int8.onnx "
              f"{b['bytes']['model.int8.onnx'] / 1e6:.2f} MB = {b['int8_size_ratio']:.2f}× (target ≤ 0.3×: "
              f"{mark(b['int8_size_ratio'] <= 0.3)})"]
    return "\n".join(lines)
