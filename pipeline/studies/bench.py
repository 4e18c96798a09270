"""`make bench`: throughput figures measured in one run (audio seconds processed per wall second).

Front end (decode + log-mel), supervised training updates in fp32 and bf16 autocast on the same batches,
and greedy decoding, all on the demo corpus with the tiny CPU preset; then pseudo-labeling of the unlabeled
audio: the fast path against a naive loop, its share of this machine's GEMM peak, padding waste, and wall
time and peak RSS at 1×, 2× and 4× the corpus; then LM-fused labeling against greedy (PL quality and speed).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jiwer
import torch

from models.encoder import CTCLIDModel
from pipeline.config import SupervisedConfig, label_tiny, labeling_audio_policy, model_kwargs, supervised_tiny
from pipeline.data.audio import load_audio, log_mel
from pipeline.data.dataset import collate, load_dataset, reject_untrainable
from pipeline.data.rows import read_utterances
from pipeline.data.samplers import DynamicBucketSampler
from pipeline.data.tokenizer import train_tokenizer
from pipeline.engine.decode import decode_dataset, decode_features
from pipeline.engine.device import bf16_supported, cpu_name, gemm_peak_flops, precision_used
from pipeline.engine.model import load_trained
from pipeline.engine.trainer import make_optimizer, train_step
from pipeline.layout import hidden_file, split_manifest
from pipeline.report.report import hidden_references, pl_quality
from pipeline.stages.label import run_label
from pipeline.studies.common import child_json, mark
from storage.files import exists, join
from storage.manifest import read_manifest, write_manifest
from storage.pl import LabelStore, load_pseudo_labels


@dataclass(frozen=True)
class Figure:
    """One measured rate."""

    name: str
    audio_s: float
    wall_s: float

    @property
    def rate(self) -> float:
        """Audio seconds per wall second."""
        return self.audio_s / self.wall_s


def _train_rate(cfg: SupervisedConfig, ds, tokenizer, languages, batches, bf16: bool):
    torch.manual_seed(0)
    model = CTCLIDModel(**model_kwargs(cfg.model, tokenizer.vocab_size, len(languages), cfg.features.n_mels))
    optimizer = make_optimizer(cfg.optim, model)
    lang_ids = {lang: i for i, lang in enumerate(languages)}
    model.train()
    audio_s = wall_s = 0.0
    for n, idx in enumerate(batches):
        batch = collate([ds.utterances[i] for i in idx], ds.features, tokenizer=tokenizer, language_ids=lang_ids,
                        specaugment=cfg.specaugment)
        t0 = time.perf_counter()
        train_step(model, optimizer, batch, lid_weight=cfg.lid_weight, grad_clip_norm=cfg.optim.grad_clip_norm,
                   bf16=bf16)
        if n >= 2:  # the first updates warm up allocators and kernels
            wall_s += time.perf_counter() - t0
            audio_s += float(batch.feat_lens.sum()) * cfg.features.hop_ms / 1000
    return Figure(f"train update, {'bf16 autocast' if bf16 else 'fp32'}", audio_s, wall_s), model


def run_bench(corpus_dir: str, updates: int = 30) -> list[Figure]:
    """Measure front-end, training (fp32 vs bf16) and decoding throughput on a built corpus."""
    cfg = supervised_tiny(split_manifest(corpus_dir, "labeled"), split_manifest(corpus_dir, "dev"))
    t0 = time.perf_counter()
    ds = load_dataset(cfg.train_manifest, features=cfg.features, policy=cfg.audio, require_text=True)
    front = Figure("decode FLAC + resample + log-mel", sum(ds.durations()), time.perf_counter() - t0)
    languages = ds.languages()
    tokenizer = train_tokenizer("char", [u.text or "" for u in ds.utterances])
    ds = reject_untrainable(ds, tokenizer, cfg.model.conv_kernel, cfg.model.conv_stride)
    sampler = DynamicBucketSampler(ds.durations(), max_batch_duration_s=cfg.batch.max_batch_duration_s,
                                   max_batch_size=cfg.batch.max_batch_size, num_buckets=cfg.batch.num_buckets)
    batches = sampler.epoch_batches(0)[: updates + 2]
    figures = [front]
    fp32, model = _train_rate(cfg, ds, tokenizer, languages, batches, bf16=False)
    figures.append(fp32)
    if bf16_supported():
        figures.append(_train_rate(cfg, ds, tokenizer, languages, batches, bf16=True)[0])
    dev = load_dataset(cfg.dev_manifest, features=cfg.features, policy=cfg.audio, require_text=True)
    for use_bf16 in (False, True) if bf16_supported() else (False,):
        t0 = time.perf_counter()
        decode_dataset(model, dev, tokenizer=tokenizer, languages=languages, batch=cfg.batch, bf16=use_bf16)
        figures.append(Figure(f"greedy decode, {'bf16' if use_bf16 else 'fp32'}", sum(dev.durations()),
                              time.perf_counter() - t0))
    return figures


def format_figures(figures: list[Figure]) -> str:
    """Markdown table of the figures, with training bf16/fp32 ratio."""
    lines = ["| measurement | audio s | wall s | audio-s/s |", "|---|---:|---:|---:|"]
    for f in figures:
        lines.append(f"| {f.name} | {f.audio_s:.0f} | {f.wall_s:.2f} | {f.rate:.0f} |")
    by_name = {f.name: f for f in figures}
    fp32, bf16 = by_name.get("train update, fp32"), by_name.get("train update, bf16 autocast")
    if fp32 and bf16:
        lines.append(f"\ntraining speed-up of bf16 autocast over fp32: {bf16.rate / fp32.rate:.2f}×")
    return "\n".join(lines)


# --- pseudo-labeling (issue: corpus-wide PL generation) ----------------------------------------------------


def naive_label(manifest_url: str, teacher_url: str) -> tuple[dict[str, str], float, float]:
    """The baseline: manifest order, one clip at a time, fp32, decoding in the same thread as the model.
    Returns (id → PL text, audio seconds, wall seconds)."""
    trained = load_trained(teacher_url)
    policy = labeling_audio_policy()
    utts, _ = read_utterances(manifest_url, require_text=False, languages=trained.languages)
    texts, audio_s = {}, 0.0
    t0 = time.perf_counter()
    for u in utts:
        wav = load_audio(u.audio, policy, trained.features.sample_rate_hz)
        feats = log_mel(wav, trained.features)
        out = decode_features(trained.model, [feats], tokenizer=trained.tokenizer, languages=trained.languages,
                              bf16=False)
        texts[u.id] = out[0]["hypothesis"]
        audio_s += wav.numel() / trained.features.sample_rate_hz
    return texts, audio_s, time.perf_counter() - t0


def label_profile(corpus_dir: str, teacher_url: str, clips: int = 8, top: int = 8) -> dict[str, Any]:
    """Where the labeling forward's time goes: torch's profiler over the first `clips` unlabeled clips of the
    corpus, decoded as one padded batch at the precision labeling uses; the `top` operators by self CPU time, with
    the GFLOP/s of those the profiler counts FLOPs for (matmuls, convolutions; not attention)."""
    from torch.profiler import ProfilerActivity, profile

    trained = load_trained(teacher_url)
    policy = labeling_audio_policy()
    utts, _ = read_utterances(split_manifest(corpus_dir, "unlabeled"), require_text=False,
                              languages=trained.languages)
    feats = [log_mel(load_audio(u.audio, policy, trained.features.sample_rate_hz), trained.features)
             for u in utts[:clips]]
    bf16 = precision_used(True) == "bf16"

    def forward() -> None:
        decode_features(trained.model, feats, tokenizer=trained.tokenizer, languages=trained.languages, bf16=bf16)

    forward()  # warm-up: kernels chosen, the attention-bias cache filled
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        forward()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {"precision": "bf16" if bf16 else "fp32", "clips": len(feats), "total_ms": total / 1e3,
            "ops": [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                     "share": e.self_cpu_time_total / total,
                     "gflops": e.flops / e.self_cpu_time_total / 1e3 if e.flops and e.self_cpu_time_total else None}
                    for e in events[:top]]}


def format_label_profile(p: dict[str, Any]) -> str:
    """Markdown of `label_profile`."""
    lines = [f"Labeling forward profile ({p['clips']} clips in one batch, {p['precision']}; self CPU time, "
             f"{p['total_ms']:.0f} ms in all)", "", "| operator | calls | self ms | share | GFLOP/s |",
             "|---|---:|---:|---:|---:|"]
    for o in p["ops"]:
        rate = "—" if o["gflops"] is None else f"{o['gflops']:.0f}"
        lines.append(f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.1f} | {100 * o['share']:.0f} % | {rate} |")
    return "\n".join(lines)


def _replicated_manifest(manifest_url: str, times: int, out_url: str) -> str:
    """The manifest's rows `times` over (ids suffixed), the same audio files: a bigger corpus of the same kind."""
    rows, _ = read_manifest(manifest_url)
    write_manifest(out_url, [r | {"id": f"{r['id']}-x{k}"} for k in range(times) for r in rows])
    return out_url


# Units of 50 clips: the 1× run then already spans several units, over which glibc's heap high-water settles
# (+5 % over the first 3-5 units, flat after); one big unit at 1× would compare an unsettled peak to settled ones.
_SCALE_CHILD = """
import json, sys, time
from pipeline.config import label_tiny
from pipeline.stages.label import run_label
manifest, root, teachers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t0 = time.perf_counter()
result = run_label(label_tiny(manifest, teachers, unit_max_utterances=50), root)
wall = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "peak_rss_mb": hwm / 1024, "units": result.units_labeled}))
"""


def _label_in_child(manifest: str, root: str, teachers: dict[str, str]) -> dict[str, float]:
    """Label in a fresh process and return its wall time and peak RSS (VmHWM: this process alone)."""
    return child_json(_SCALE_CHILD, manifest, root, json.dumps(teachers))


def run_label_bench(corpus_dir: str, teacher_url: str, scales: Sequence[int] = (1, 2, 4)) -> dict[str, Any]:
    """Labeling figures measured side by side in one run on the corpus' unlabeled manifest: the fast path
    (`run_label`) against the naive loop, PL agreement, padding waste, GEMM peak share, and wall time and peak
    RSS at several corpus sizes."""
    manifest = split_manifest(corpus_dir, "unlabeled")
    trained = load_trained(teacher_url)
    teachers = {lang: teacher_url for lang in trained.languages}
    precision = precision_used(True)
    peak = gemm_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32)
    peak_fp32 = peak if precision == "fp32" else gemm_peak_flops(torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_label(label_tiny(manifest, teachers), join(tmp, "fast"))
        fast_wall = time.perf_counter() - t0
        fast = load_pseudo_labels(join(tmp, "fast"))
        records = LabelStore(join(tmp, "fast")).records()
        naive_texts, naive_audio_s, naive_wall = naive_label(manifest, teacher_url)
        # Short clips (the labeled set, 2-6 s, read as unlabeled): where batching has the most to win.
        short = split_manifest(corpus_dir, "labeled")
        t0 = time.perf_counter()
        short_result = run_label(label_tiny(short, teachers), join(tmp, "short"))
        short_wall = time.perf_counter() - t0
        short_audio_s = sum(s["hours_labeled"] for s in short_result.summary.values()) * 3600
        _, short_naive_audio_s, short_naive_wall = naive_label(short, teacher_url)
        scale_runs = {}
        for k in scales:
            m = _replicated_manifest(manifest, k, join(tmp, f"x{k}.jsonl"))
            scale_runs[k] = _label_in_child(m, join(tmp, f"labels-x{k}"), teachers)
    audio_s = sum(r["audio_s"] for r in records)
    model_s = sum(r["model_s"] for r in records)
    frames = sum(r["frames"] for r in records)
    padded = sum(r["padded_frames"] for r in records)
    # Useful FLOPs: each clip alone at its own length (padding excluded), by the model's own count.
    frames_per_s = 1000.0 / trained.features.hop_ms
    useful_flops = sum(trained.model.matmul_flops(round(d * frames_per_s)) for d in fast["duration_s"])
    pairs = [(naive_texts[i], t) for i, t in zip(fast["id"], fast["text"], strict=True) if naive_texts.get(i)]
    chars_differ = jiwer.cer([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else math.nan
    base = scale_runs[scales[0]]
    return {
        "precision": precision, "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "teacher": teacher_url, "utterances": len(fast), "audio_s": audio_s,
        "fast_wall_s": fast_wall, "fast_audio_s_per_s": audio_s / fast_wall,
        "fast_model_audio_s_per_s": audio_s / model_s,
        "naive_wall_s": naive_wall, "naive_audio_s_per_s": naive_audio_s / naive_wall,
        "speedup_vs_naive": (audio_s / fast_wall) / (naive_audio_s / naive_wall),
        "pl_char_difference_vs_fp32_naive": chars_differ,
        "short_audio_s": short_audio_s, "short_fast_audio_s_per_s": short_audio_s / short_wall,
        "short_naive_audio_s_per_s": short_naive_audio_s / short_naive_wall,
        "padding_waste": 1 - frames / padded if padded else 0.0,
        "gemm_peak_gflops": peak / 1e9, "gemm_peak_fp32_gflops": peak_fp32 / 1e9,
        "model_gflops_per_audio_s": useful_flops / audio_s / 1e9,
        "model_gflops": useful_flops / model_s / 1e9,
        "model_share_of_peak": useful_flops / model_s / peak,
        "pipeline_share_of_peak": useful_flops / fast_wall / peak,
        "units": result.units,
        "scales": {k: v | {"time_ratio": v["wall_s"] / (k * base["wall_s"]),
                           "rss_ratio": v["peak_rss_mb"] / base["peak_rss_mb"]} for k, v in scale_runs.items()},
    }


def run_lm_label_bench(corpus_dir: str, teacher_url: str) -> dict[str, Any]:
    """Greedy labeling against LM-fused labeling (the demo recipe's LM and decoder, tuned on dev for this teacher)
    of the corpus' unlabeled audio, same teacher, in one run: PL CER/WER against the hidden transcripts and
    steady-state labeling audio-s/s (LM build, dev tuning, loading the teacher and starting the beam search's
    processes timed apart or not at all: they happen once per LM, teacher and process)."""
    from pipeline.config import recipe_demo
    from pipeline.engine.beam import cached_workers
    from pipeline.stages.lm import labeling_decoders, open_decoder

    manifest = split_manifest(corpus_dir, "unlabeled")
    references = hidden_references(hidden_file(corpus_dir, "unlabeled_reference.jsonl"))
    trained = load_trained(teacher_url)
    teachers = {lang: teacher_url for lang in trained.languages}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_demo(corpus_dir, join(tmp, "run"))
        t0 = time.perf_counter()
        decoders, records = labeling_decoders(recipe, teachers, label_tiny(manifest, teachers).batch)
        prepare_s = time.perf_counter() - t0
        runs = {}
        lm_cfg = label_tiny(manifest, teachers, decoders={k: v.model_dump() for k, v in decoders.items()})
        # Steady state for both: the teacher loaded and the audio read once (an untimed greedy pass), the beam
        # search's decoding processes started (once per process, like the teacher's loading).
        run_label(label_tiny(manifest, teachers), join(tmp, "warm-up"))
        for lang, decoder in decoders.items():
            cached_workers(open_decoder(lang, decoder, trained.tokenizer), lm_cfg.decode_workers)
        for name, cfg in (("greedy", label_tiny(manifest, teachers)), ("lm", lm_cfg)):
            t0 = time.perf_counter()
            result = run_label(cfg, join(tmp, name))
            wall = time.perf_counter() - t0
            audio_s = sum(s["hours_labeled"] for s in result.summary.values()) * 3600
            runs[name] = {"wall_s": wall, "audio_s_per_s": audio_s / wall,
                          "quality": pl_quality(load_pseudo_labels(join(tmp, name)), references)}
    langs = sorted(decoders)
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "teacher": teacher_url, "languages": langs,
            "decoders": {k: v.describe() for k, v in decoders.items()}, "tuning": records,
            "prepare_s": prepare_s, "runs": runs}


def format_lm_label_bench(b: dict[str, Any]) -> str:
    """Markdown of `run_lm_label_bench`, each ratio beside the issue's target."""
    greedy, lm = b["runs"]["greedy"], b["runs"]["lm"]
    lines = [f"LM-fused against greedy labeling, same teacher ({b['teacher']}); {b['cpu']}, {b['threads']} threads; "
             f"LM build + dev tuning {b['prepare_s']:.0f} s (once per LM and teacher)", "",
             "| language | decoder | PL CER greedy → LM | ratio (target ≤ 0.7) | PL WER greedy → LM | "
             "ratio (target ≤ 0.6) |", "|---|---|---|---:|---|---:|"]
    for lang in b["languages"]:
        g, f = greedy["quality"].get(lang), lm["quality"].get(lang)
        if not g or not f:
            continue
        cer, wer = f["cer"] / g["cer"], f["wer"] / g["wer"]
        lines.append(f"| {lang} | {b['decoders'][lang]} | {g['cer']:.1f} → {f['cer']:.1f} | {cer:.2f} "
                     f"({mark(cer <= 0.7)}) | {g['wer']:.1f} → {f['wer']:.1f} | {wer:.2f} ({mark(wer <= 0.6)}) |")
    ratio = lm["audio_s_per_s"] / greedy["audio_s_per_s"]
    lines += ["", f"labeling speed: greedy {greedy['audio_s_per_s']:.0f} audio-s/s, LM-fused "
              f"{lm['audio_s_per_s']:.0f} audio-s/s = {ratio:.2f}× (target ≥ 0.5×: {mark(ratio >= 0.5)})"]
    return "\n".join(lines)


def bench_teacher(corpus_dir: str, out_dir: str, updates: int = 150) -> str:
    """A quickly trained multilingual model to label with when no trained teacher is given (its PLs are poor,
    so the PL agreement figure means little; speed figures do not depend on the weights)."""
    from pipeline.stages.supervised import run_supervised

    cfg = supervised_tiny(split_manifest(corpus_dir, "labeled"), None, max_updates=updates, save_every=updates)
    return run_supervised(cfg, out_dir).last_checkpoint


def label_teacher(corpus_dir: str, teacher: str | None, default_teacher: str, tmp_dir: str) -> tuple[str, str]:
    """The checkpoint the labeling figures use: the one given, else the default (make demo's) when it exists, else
    one trained for 150 updates into `tmp_dir`; and a note saying which."""
    if teacher is not None:
        return teacher, f"teacher {teacher}"
    if exists(default_teacher):
        return default_teacher, f"teacher {default_teacher}"
    note = f"no teacher at {default_teacher} (run `make demo` first); trained a quick one to label with"
    return bench_teacher(corpus_dir, join(tmp_dir, "teacher")), note


def format_label_bench(b: dict[str, Any]) -> str:
    """Markdown of `run_label_bench`, each figure beside its target."""
    lines = [
        f"Labeling on {b['utterances']} clips, {b['audio_s']:.0f} s of audio; {b['cpu']}, {b['threads']} threads, "
        f"{b['precision']}; teacher {b['teacher']}",
        "",
        "| figure | value | target |",
        "|---|---:|---|",
        f"| fast path (`run_label`: sorted 60 s batches, prefetch, shards + Parquet) | "
        f"{b['fast_audio_s_per_s']:.0f} audio-s/s ({b['fast_wall_s']:.1f} s) | |",
        f"| fast path, model time only | {b['fast_model_audio_s_per_s']:.0f} audio-s/s | |",
        f"| naive loop (manifest order, batch 1, fp32, no prefetch, no writes) | "
        f"{b['naive_audio_s_per_s']:.0f} audio-s/s ({b['naive_wall_s']:.1f} s) | |",
        f"| fast / naive | {b['speedup_vs_naive']:.2f}× | ≥ 2× ({mark(b['speedup_vs_naive'] >= 2)}) |",
        f"| short clips ({b['short_audio_s']:.0f} s of 2-6 s clips): fast path / naive loop | "
        f"{b['short_fast_audio_s_per_s']:.0f} / {b['short_naive_audio_s_per_s']:.0f} audio-s/s = "
        f"{b['short_fast_audio_s_per_s'] / b['short_naive_audio_s_per_s']:.2f}× | |",
        f"| PL characters differing from the fp32 naive loop | {100 * b['pl_char_difference_vs_fp32_naive']:.2f} % | "
        f"≤ 1 % ({mark(b['pl_char_difference_vs_fp32_naive'] <= 0.01)}) |",
        f"| padding waste (padded frames / all frames fed) | {100 * b['padding_waste']:.1f} % | "
        f"≤ 5 % ({mark(b['padding_waste'] <= 0.05)}) |",
        f"| GEMM peak, {b['precision']} (1536³ matmul, best of 5) | {b['gemm_peak_gflops']:.1f} GFLOP/s | |",
        f"| model FLOPs per audio second (matmuls + conv, padding excluded) | "
        f"{b['model_gflops_per_audio_s']:.3f} GFLOP | |",
        f"| model FLOP/s during labeling (model time) | {b['model_gflops']:.1f} GFLOP/s = "
        f"{100 * b['model_share_of_peak']:.0f} % of peak | ≥ 70 % ({mark(b['model_share_of_peak'] >= 0.7)}) |",
        f"| same over the whole run (wall time) | {100 * b['pipeline_share_of_peak']:.0f} % of peak | |",
        "",
        "| corpus size | wall s | time / (k × 1× time) | peak RSS MB | RSS / 1× RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in b["scales"].items():
        lines.append(f"| {k}× | {v['wall_s']:.1f} | {v['time_ratio']:.2f} | {v['peak_rss_mb']:.0f} | "
                     f"{v['rss_ratio']:.2f} |")
    last = b["scales"][max(b["scales"])]
    # Faster than linear is kernel creation paid once (docs/benchmarks.md); only growth per audio second misses.
    lines.append(f"\ntime at most linear (≤ +10 % per audio second): {mark(last['time_ratio'] <= 1.1)}; flat memory "
                 f"(±10 %): {mark(abs(last['rss_ratio'] - 1) <= 0.1)}")
    return "\n".join(lines)
