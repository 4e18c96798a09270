"""PL quality without references (recipe step 4; docs/architecture.md, "Pseudo-label generation", issue 16 item 3).

The labeled dev rows are labeled exactly as the corpus is (each language's teacher, decoder and filters, through
`pipeline.stages.label_decode.decode_clips`) and scored against their transcripts (CER/WER as `pipeline.engine.evaluate.
score`: jiwer on normalized text), overall and per confidence bucket, so the expected quality of the rows a query
keeps (`confidence >= x`) is known. `choose_thresholds` reads per-language confidence thresholds off it.

The audit is cached in the labels root: `audit.json` (per language: its key, figures and buckets) and
`audit/dev-<lang>.jsonl` (each dev row's PL, confidence, filter verdict and edit counts). A language's key is its
teacher's sha256, its decode key (decoder, LM, front end, precision, corpus-wide filters), the dev manifest's
sha256 and the bucket edges, so a rerun decodes nothing and a new teacher re-audits only its language.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import jiwer

from pipeline.data.rows import Utterance, read_utterances
from pipeline.data.text import normalize_text
from pipeline.stages.label_decode import LabelPlan, decode_clips, filter_reason
from storage.files import exists, join, read_json, sha256_of, write_json
from storage.manifest import read_manifest, write_manifest
from storage.pl import confidence_passes, stored_confidence

log = logging.getLogger("mlpl.label")

AUDIT_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # confidence bucket edges: [e_i, e_i+1), the last one closed
AUDIT_FILE = "audit.json"


def audit_edges(edges: Sequence[float]) -> tuple[float, ...]:
    """Sorted bucket edges with 0 and 1 added, so every confidence falls in exactly one bucket.

    Raises:
        ValueError: an edge outside [0, 1].
    """
    bad = [e for e in edges if not 0.0 <= e <= 1.0]
    if bad:
        raise ValueError(f"confidence bucket edges {bad} are outside [0, 1]: confidences are mean top posteriors")
    return tuple(sorted({0.0, 1.0, *map(float, edges)}))


def audit_dev(plan: LabelPlan, dev_manifest: str, *, edges: Sequence[float] = AUDIT_EDGES) -> dict[str, Any]:
    """Each teacher language's dev rows labeled like its units and scored overall, on the rows the filters keep
    and per confidence bucket; read from `<root>/audit.json` where a language's key matches (no decoding).

    Raises:
        FileNotFoundError: when the dev manifest is missing.
    """
    edges = audit_edges(edges)
    if not exists(dev_manifest):
        raise FileNotFoundError(f"audit manifest not found: {dev_manifest}; give labeled dev rows (the recipe's "
                                "dev_manifest) or drop audit_manifest")
    dev_sha = sha256_of(dev_manifest)
    url = join(plan.root, AUDIT_FILE)
    old = read_json(url) if exists(url) else {}
    languages: dict[str, Any] = {}
    dev: tuple[list[Utterance], list[Any]] | None = None  # read only when a language must be decoded
    for lang in sorted(plan.teachers):
        key = _audit_key(plan, lang, dev_sha, edges)
        prev = old.get("languages", {}).get(lang)
        if prev is not None and prev["key"] == key and (not prev["dev_rows"] or exists(join(plan.root,
                                                                                            prev["rows_file"]))):
            languages[lang] = prev
            continue
        if dev is None:
            dev = read_utterances(dev_manifest, require_text=True, languages=None)
        utts = [u for u in dev[0] if u.language == lang]
        rejected = sum(r.language == lang for r in dev[1])
        languages[lang] = _audit_language(plan, lang, utts, dev_manifest, edges) | {"key": key,
                                                                                     "dev_rejects": rejected}
        log.info("dev audit %s: %d dev rows, CER %s%% (kept by the filters: %s%%)", lang, len(utts),
                 _pct(languages[lang]["all"]["cer"]), _pct(languages[lang]["kept"]["cer"]))
    audit = {"dev_manifest": dev_manifest, "dev_sha256": dev_sha, "edges": list(edges), "languages": languages}
    if audit != old:  # an idle rerun writes nothing
        write_json(url, audit)
    return audit


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _audit_key(plan: LabelPlan, language: str, dev_sha: str, edges: Sequence[float]) -> str:
    """What a language's audit depends on: teacher, decode key (decoder and corpus-wide filters), dev rows, edges."""
    blob = {"teacher": plan.teachers[language].sha256, "decode": plan.decode_keys[language],
            "filters": plan.cfg.filters.model_dump(mode="json"), "dev": dev_sha, "edges": list(edges)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _audit_language(plan: LabelPlan, language: str, utts: list[Utterance], dev_manifest: str,
                    edges: Sequence[float]) -> dict[str, Any]:
    """Decode one language's dev rows, write their rows file and score them."""
    rows_file = f"audit/dev-{language}.jsonl"
    decoder = plan.cfg.decoders.get(language)
    entry = {"teacher": plan.teachers[language].ident, "decoder": "greedy" if decoder is None else decoder.describe(),
             "decode_key": plan.decode_keys[language], "dev_rows": len(utts), "rows_file": rows_file}
    if not utts:
        return entry | {"unreadable": 0, "all": scored([], 0), "kept": scored([], 0), "buckets": []}
    decoded, unreadable = decode_clips(plan, language, utts, dev_manifest)
    # The audit measures the corpus-wide filters only: per-language thresholds are what it is read for.
    corpus_filters = plan.cfg.model_copy(update={"min_confidence_by_language": {}})
    order = {u.id: i for i, u in enumerate(utts)}
    rows = sorted((_audit_row(u, d, filter_reason(d, language, corpus_filters)) for u, d in decoded),
                  key=lambda r: order[r["id"]])
    write_manifest(join(plan.root, rows_file), rows)
    kept = [r for r in rows if r["category"] is None]
    return entry | {"unreadable": len(unreadable), "all": scored(rows, len(rows)), "kept": scored(kept, len(rows)),
                    "buckets": confidence_buckets(kept, edges)}


def _audit_row(u: Utterance, d: dict[str, Any], dropped: tuple[str, str] | None) -> dict[str, Any]:
    """One dev row: its PL, signals, filter verdict and edit counts against its transcript."""
    return {"id": u.id, "confidence": d["confidence"], "num_tokens": d["num_tokens"], "lid_pred": d["lid_pred"],
            "category": dropped and dropped[0], "reason": dropped and dropped[1], "reference": u.text,
            "hypothesis": d["hypothesis"]} | edit_counts(u.text or "", d["hypothesis"])


def edit_counts(reference: str, hypothesis: str) -> dict[str, int]:
    """Character and word edits and reference lengths on normalized text; summed over rows they give jiwer's
    corpus-level CER/WER (an empty reference counts nothing, as in `evaluate.score`)."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        return {"char_errors": 0, "chars": 0, "word_errors": 0, "words": 0}
    c, w = jiwer.process_characters(ref, hyp), jiwer.process_words(ref, hyp)
    return {"char_errors": c.substitutions + c.deletions + c.insertions,
            "chars": c.hits + c.substitutions + c.deletions,
            "word_errors": w.substitutions + w.deletions + w.insertions,
            "words": w.hits + w.substitutions + w.deletions}


def scored(rows: Sequence[dict[str, Any]], total: int) -> dict[str, Any]:
    """n, share of `total`, CER/WER (%) and the edit counts behind them of rows with `edit_counts` fields."""
    sums = {k: sum(r[k] for r in rows) for k in ("char_errors", "chars", "word_errors", "words")}
    return {"n": len(rows), "share": len(rows) / total if total else None,
            "cer": 100.0 * sums["char_errors"] / sums["chars"] if sums["chars"] else None,
            "wer": 100.0 * sums["word_errors"] / sums["words"] if sums["words"] else None} | sums


def confidence_buckets(kept: Sequence[dict[str, Any]], edges: Sequence[float]) -> list[dict[str, Any]]:
    """Per bucket [lo, hi) (the last one closed): its kept rows scored, and those at or above `lo` scored (what a
    query `confidence >= lo` keeps)."""
    groups: list[list[dict[str, Any]]] = [[] for _ in edges[:-1]]
    stored_edges = [stored_confidence(e) for e in edges]  # a row lands where `confidence_passes` puts it
    for r in kept:
        bucket = bisect.bisect_right(stored_edges, stored_confidence(r["confidence"])) - 1
        groups[min(bucket, len(groups) - 1)].append(r)
    return [{"lo": lo, "hi": hi} | scored(group, len(kept))
            | {"at_or_above": scored([r for g in groups[i:] for r in g], len(kept))}
            for i, (lo, hi, group) in enumerate(zip(edges[:-1], edges[1:], groups, strict=True))]


def choose_thresholds(audit: dict[str, Any], max_dev_cer: float) -> dict[str, float | None]:
    """Per audited language: the lowest bucket edge whose kept dev rows at or above it have a CER ≤ `max_dev_cer`
    (%), or None when no edge gets there (not even the top bucket, or no dev rows)."""
    out: dict[str, float | None] = {}
    for lang, entry in sorted(audit["languages"].items()):
        ok = [b["lo"] for b in entry["buckets"] if _meets(b["at_or_above"], max_dev_cer)]
        out[lang] = min(ok) if ok else None
    return out


def _meets(stats: dict[str, Any], max_dev_cer: float) -> bool:
    return stats["n"] > 0 and stats["cer"] is not None and stats["cer"] <= max_dev_cer


def apply_audit(plan: LabelPlan) -> LabelPlan:
    """The plan after its dev audit (`cfg.audit_manifest`): with `audit_max_dev_cer`, the thresholds chosen from
    it (they replace hand-set ones of the languages they cover) in `min_confidence_by_language`, and each language's
    audit attached for the summary."""
    cfg = plan.cfg
    audit = audit_dev(plan, cfg.audit_manifest)
    thresholds, notes = dict(cfg.min_confidence_by_language), {}
    chosen = {} if cfg.audit_max_dev_cer is None else choose_thresholds(audit, cfg.audit_max_dev_cer)
    for lang, t in chosen.items():
        if t is None:
            log.warning("dev audit: no confidence threshold gives %s's PLs a dev CER <= %g%%; %s", lang,
                        cfg.audit_max_dev_cer, "labeling it without one" if lang not in thresholds else
                        f"keeping min_confidence_by_language[{lang!r}]={thresholds[lang]} from the config")
            continue
        thresholds[lang] = t
        cer = next(b["at_or_above"]["cer"] for b in audit["languages"][lang]["buckets"] if b["lo"] == t)
        notes[lang] = (f"chosen from the dev audit of {cfg.audit_manifest}: dev CER {cer:.1f}% at or above it, "
                       f"audit_max_dev_cer={cfg.audit_max_dev_cer:g}%")
    cfg = cfg.model_copy(update={"min_confidence_by_language": thresholds})
    view = {lang: audit_view(plan.root, entry, thresholds.get(lang), lang in notes, cfg.audit_max_dev_cer)
            for lang, entry in audit["languages"].items()}
    return replace(plan, cfg=cfg, audit=view, threshold_notes=notes)


def _brief(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in ("n", "share", "cer", "wer")}


def audit_view(root: str, entry: dict[str, Any], threshold: float | None, from_audit: bool,
               max_dev_cer: float | None) -> dict[str, Any]:
    """A language's audit as the summary shows it: figures, buckets, its threshold, where that came from, and the
    dev figures of the kept rows at or above it."""
    at_threshold = None
    if threshold is not None and entry["dev_rows"]:
        rows, _ = read_manifest(join(root, entry["rows_file"]))
        kept = [r for r in rows if r["category"] is None]
        at_threshold = _brief(scored([r for r in kept if confidence_passes(r["confidence"], threshold)], len(kept)))
    return {"file": AUDIT_FILE, "rows_file": entry["rows_file"], "decoder": entry["decoder"],
            "dev_rows": entry["dev_rows"], "all": _brief(entry["all"]), "kept": _brief(entry["kept"]),
            "buckets": [{"lo": b["lo"], "hi": b["hi"]} | _brief(b) | {"at_or_above": _brief(b["at_or_above"])}
                        for b in entry["buckets"]],
            "threshold": threshold, "threshold_from": None if threshold is None else
            ("dev audit" if from_audit else "config"), "max_dev_cer": max_dev_cer, "at_threshold": at_threshold}
