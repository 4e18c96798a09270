"""`make bench`: throughput figures measured in one run (audio seconds processed per wall second).

Front end (decode + log-mel), supervised training updates in fp32 and bf16 autocast on the same batches,
and greedy decoding, all on the demo corpus with the tiny CPU preset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from models.encoder import CTCLIDModel
from pipeline.config import SupervisedConfig, model_kwargs, supervised_tiny
from pipeline.data import DynamicBucketSampler, collate, load_dataset, reject_untrainable
from pipeline.evaluate import decode_dataset
from pipeline.modeling import bf16_supported
from pipeline.tokenizer import train_tokenizer
from pipeline.trainer import make_optimizer, train_step
from storage.files import join


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
    manifests = join(corpus_dir, "manifests")
    cfg = supervised_tiny(join(manifests, "labeled.jsonl"), join(manifests, "dev.jsonl"))
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
