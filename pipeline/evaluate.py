"""Greedy-CTC evaluation: per-language CER/WER (jiwer, on normalized text) and LID accuracy.

Used for periodic validation during training (in-memory dev sets) and by `mlpl evaluate` on any manifest,
streamed batch by batch. `decode_batch` is the one decode path of evaluation, slimIPL and PL generation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jiwer
import torch

from models.decode import greedy_ctc_decode
from models.encoder import CTCLIDModel
from pipeline.config import AudioPolicy, BatchConfig
from pipeline.crops import crop_and_stitch
from pipeline.data import Dataset, DynamicBucketSampler, ProgressFn, collate
from pipeline.modeling import autocast, load_trained, resolve_device
from pipeline.stream import LazyBatchLoader, load_unlabeled
from pipeline.text import normalize_text
from pipeline.tokenizer import Tokenizer
from storage.files import atomic_write_text, exists, join, read_json, read_text, sha256_of, write_json
from storage.manifest import write_manifest, write_rejects


@dataclass(frozen=True)
class CropSpec:
    """Label long audio as overlapping crops stitched back together (paper Sec. 5.2), in fbank frames."""

    crop_frames: int
    overlap_frames: int


def decode_batch(
    model: CTCLIDModel,
    feats: torch.Tensor,
    feat_lens: torch.Tensor,
    *,
    tokenizer: Tokenizer,
    languages: Sequence[str],
    bf16: bool = True,
    crop: CropSpec | None = None,
) -> list[dict[str, Any]]:
    """Greedy CTC over one padded batch (B, T, n_mels) in eval mode, whole or cropped: the one decode path of
    evaluation, slimIPL labeling and PL generation. Per utterance: tokens, text, confidence, blank ratio, LID.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, feat_lens = feats.to(device, non_blocking=True), feat_lens.to(device)
    try:
        with torch.inference_mode(), autocast(bf16, device):
            if crop is None:
                out = model(feats, feat_lens)
            else:
                out = crop_and_stitch(model, feats, feat_lens, crop_frames=crop.crop_frames,
                                      overlap_frames=crop.overlap_frames, bf16=bf16)
        hyps = greedy_ctc_decode(out.log_probs.float().cpu(), out.out_lens.cpu(), blank=tokenizer.blank_id)
        lid_probs = out.lid_logits.float().softmax(dim=-1).cpu()
    finally:
        model.train(was_training)
    rows = []
    for h, p, n in zip(hyps, lid_probs, out.out_lens.tolist(), strict=True):
        k = int(p.argmax())
        rows.append(
            {
                "tokens": h.tokens,
                "hypothesis": tokenizer.decode(h.tokens),
                "num_tokens": len(h.tokens),
                "num_frames": int(n),
                "confidence": round(h.confidence, 5),
                "blank_ratio": round(h.blank_ratio, 5),
                "lid_pred": languages[k],
                "lid_prob": round(float(p[k]), 5),
            }
        )
    return rows


def decode_features(
    model: CTCLIDModel,
    features: Sequence[torch.Tensor],
    *,
    tokenizer: Tokenizer,
    languages: Sequence[str],
    bf16: bool = True,
    crop: CropSpec | None = None,
) -> list[dict[str, Any]]:
    """`decode_batch` over unpadded per-utterance features [(T_i, n_mels)], e.g. a streamed batch's."""
    lens = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    feats = torch.nn.utils.rnn.pad_sequence(list(features), batch_first=True)  # (B, T, n_mels)
    return decode_batch(model, feats, lens, tokenizer=tokenizer, languages=languages, bf16=bf16, crop=crop)


def decode_dataset(
    model: CTCLIDModel,
    ds: Dataset,
    *,
    tokenizer: Tokenizer,
    languages: Sequence[str],
    batch: BatchConfig,
    bf16: bool = True,
    on_progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Greedy-decode every utterance of an in-memory dataset; one row per utterance with hypothesis and signals."""
    if not ds.utterances:
        return []
    lang_ids = {lang: i for i, lang in enumerate(languages)}
    sampler = DynamicBucketSampler(
        ds.durations(),
        max_batch_duration_s=max(batch.max_batch_duration_s, max(ds.durations(), default=0.0)),
        max_batch_size=batch.max_batch_size,
        num_buckets=batch.num_buckets,
        shuffle=False,
    )
    rows: list[dict[str, Any]] = []
    for idx in sampler.epoch_batches(0):
        utts = [ds.utterances[i] for i in idx]
        b = collate(utts, ds.features, tokenizer=None, language_ids=lang_ids)
        decoded = decode_batch(model, b.feats, b.feat_lens, tokenizer=tokenizer, languages=languages, bf16=bf16)
        for u, d in zip(utts, decoded, strict=True):
            signals = {k: v for k, v in d.items() if k not in ("tokens", "num_frames")}
            rows.append({"id": u.id, "language": u.language, "audio": u.audio, "reference": u.text} | signals)
        if on_progress is not None:
            on_progress(len(rows), len(ds.utterances), "decode")
    return rows


def score(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-language corpus-level CER/WER (percent) on normalized text, LID accuracy, utterance counts.

    The key "all" pools every language; "macro" averages the per-language figures.
    """
    by_lang: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("reference") is None:
            continue
        by_lang.setdefault(r["language"], []).append(r)
    table = {lang: _score_group(group) for lang, group in sorted(by_lang.items())}
    if table:
        table["all"] = _score_group([r for g in by_lang.values() for r in g])
        per_lang = [v for k, v in table.items() if k != "all"]
        table["macro"] = {
            key: sum(v[key] for v in per_lang) / len(per_lang) for key in ("cer", "wer", "lid_acc")
        } | {"n": float(sum(v["n"] for v in per_lang))}
    return table


def _score_group(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    refs = [normalize_text(r["reference"]) for r in rows]
    hyps = [normalize_text(r["hypothesis"]) for r in rows]
    pairs = [(ref, hyp) for ref, hyp in zip(refs, hyps, strict=True) if ref]
    cer = wer = math.nan
    if pairs:
        ref_list, hyp_list = [p[0] for p in pairs], [p[1] for p in pairs]
        cer = 100.0 * jiwer.cer(reference=ref_list, hypothesis=hyp_list)
        wer = 100.0 * jiwer.wer(reference=ref_list, hypothesis=hyp_list)
    lid_acc = 100.0 * sum(r["lid_pred"] == r["language"] for r in rows) / len(rows)
    return {"n": float(len(rows)), "cer": cer, "wer": wer, "lid_acc": lid_acc}


def format_table(table: dict[str, dict[str, float]], title: str = "") -> str:
    """Markdown table of a `score()` result."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| language | utts | CER % | WER % | LID acc % |", "|---|---:|---:|---:|---:|"]
    for lang, v in table.items():
        lines.append(f"| {lang} | {int(v['n'])} | {v['cer']:.1f} | {v['wer']:.1f} | {v['lid_acc']:.1f} |")
    return "\n".join(lines) + "\n"


def run_evaluate(
    checkpoint_url: str,
    manifest_url: str,
    out_dir: str,
    *,
    batch: BatchConfig | None = None,
    policy: AudioPolicy | None = None,
    bf16: bool = True,
    language: str | None = None,
    on_progress: ProgressFn | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Score a checkpoint on a manifest (or on one language's rows of it); write hypotheses, rejects, metrics
    JSON and Markdown to out_dir. A score already in out_dir for the same checkpoint and manifest contents and
    the same settings is returned as it is (`cached`), without decoding."""
    settings = {"checkpoint": sha256_of(checkpoint_url), "manifest": sha256_of(manifest_url), "language": language,
                "bf16": bf16, "batch": batch and batch.model_dump(), "policy": policy and policy.model_dump()}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    try:
        done = read_json(join(out_dir, "metrics.json"))
    except (FileNotFoundError, ValueError):
        done = {}
    if done.get("key") == key and exists(join(out_dir, "metrics.md")):
        return done | {"cached": True, "markdown": read_text(join(out_dir, "metrics.md"))}
    trained = load_trained(checkpoint_url)
    trained.model.to(resolve_device(device))
    policy = policy or trained.audio_policy
    batch = batch or BatchConfig(max_batch_duration_s=120.0, max_batch_size=64)
    # Streamed: validated without decoding, then decoded batch by batch, so a manifest of any size fits.
    utts, rejects = load_unlabeled(manifest_url, features=trained.features, policy=policy,
                                   languages=trained.languages, language=language)
    rows: list[dict[str, Any]] = []
    if utts:
        loader = LazyBatchLoader(
            utts, features=trained.features, policy=policy, shuffle=False, source=manifest_url,
            max_batch_duration_s=max(batch.max_batch_duration_s, max(u.duration_s for u in utts)),
            max_batch_size=batch.max_batch_size, num_buckets=batch.num_buckets,
        )
        with loader:
            for b in loader.iter_epoch(0):
                decoded = decode_features(trained.model, b.features, tokenizer=trained.tokenizer,
                                          languages=trained.languages, bf16=bf16)
                for u, d in zip(b.utterances, decoded, strict=True):
                    signals = {k: v for k, v in d.items() if k not in ("tokens", "num_frames")}
                    rows.append({"id": u.id, "language": u.language, "audio": u.audio, "reference": u.text}
                                | signals)
                if on_progress is not None:
                    on_progress(len(rows), len(utts), "decode")
        rejects += loader.rejects
    table = score(rows)
    markdown = format_table(table, f"{manifest_url} — {checkpoint_url}")
    write_manifest(join(out_dir, "hypotheses.jsonl"), rows)
    write_rejects(join(out_dir, "rejects.jsonl"), [r.as_row() for r in rejects])
    result = {
        "checkpoint": checkpoint_url,
        "manifest": manifest_url,
        "utterances": len(rows),
        "rejects": len(rejects),
        "metrics": table,
        "key": key,
    }
    atomic_write_text(join(out_dir, "metrics.md"), markdown)
    write_json(join(out_dir, "metrics.json"), result)  # last: its key marks the score complete
    return result | {"cached": False, "markdown": markdown}
