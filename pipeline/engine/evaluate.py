"""Scoring: per-language CER/WER (jiwer, on normalized text) and LID accuracy, for dev evaluation during training and
for `mlpl evaluate` on any manifest, streamed batch by batch through the one decode path."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import jiwer

from pipeline.config import AudioPolicy, BatchConfig
from pipeline.data.rows import ProgressFn
from pipeline.data.stream import LazyBatchLoader, load_unlabeled
from pipeline.data.text import normalize_text
from pipeline.engine.decode import decode_features
from pipeline.engine.device import resolve_device
from pipeline.engine.model import load_trained
from storage.files import atomic_write_text, exists, join, read_json, read_text, sha256_of, write_json
from storage.manifest import manifest_has_rows, write_manifest, write_rejects


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


def has_rows(manifest_url: str) -> bool:
    """Whether a test manifest exists and holds a row (an optional test set may be absent or empty)."""
    return manifest_has_rows(manifest_url)


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
                                          languages=trained.languages, bf16=bf16,
                                          clip_languages=[u.language for u in b.utterances])
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
