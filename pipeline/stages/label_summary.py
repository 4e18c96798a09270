"""How a labeling run reads to people (recipe step 4): short categories for reject reasons, the per-language summary
table, and the lines that open a labels root with pandas."""

from __future__ import annotations

from typing import Any

# Reject reasons come from several layers as sentences; a short category groups them in summaries.
_CATEGORIES = [
    ("not found", "missing_file"),
    ("is a directory", "not_a_file"),
    ("empty (0 bytes)", "empty_audio"),
    ("no samples", "empty_audio"),
    ("could not be decoded", "corrupt_audio"),
    ("header could not be read", "corrupt_audio"),
    ("unexpected error reading audio", "corrupt_audio"),
    ("is a constant", "constant_audio"),  # before "NaN or Inf": its reason says where a constant comes from
    ("NaN or Inf", "nan_audio"),
    ("silent", "silent_audio"),
    ("ends after the audio's end", "bad_stretch"),
    ("channels", "multichannel_audio"),
    ("sample rate", "low_sample_rate"),
    ("longer than audio.max_duration_s", "too_long_audio"),
    ("shorter than audio.min_duration_s", "too_short_audio"),
    ("duplicate id", "duplicate_id"),
    ("no teacher", "unknown_language"),
    ("not a language code", "bad_language_code"),
    ("not valid UTF-8", "bad_utf8"),
    ("not valid JSON", "bad_line"),
    ("not a JSON object", "bad_line"),
    ("missing field", "missing_field"),
    ("duration_s is not a number", "bad_duration"),
]


def reject_category(reason: str) -> str:
    """A short stable name for a reject reason (for grouping; the reason itself keeps the numbers)."""
    for needle, category in _CATEGORIES:
        if needle in reason:
            return category
    return "other"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The per-language summary as a Markdown table."""
    lines = ["| language | hours labeled | rows kept | rows rejected | rejected by reason | mean confidence | "
             "audio-s/s |", "|---|---:|---:|---:|---|---:|---:|"]
    for lang, v in summary.items():
        reasons = ", ".join(f"{k} {n}" for k, n in v["rejected_by_reason"].items()) or "—"
        conf = "—" if v["mean_confidence"] is None else f"{v['mean_confidence']:.3f}"
        rate = "—" if v["audio_s_per_s"] is None else f"{v['audio_s_per_s']:.0f}"
        lines.append(f"| {lang} | {v['hours_labeled']:.3f} | {v['rows_kept']} | {v['rows_rejected']} | {reasons} | "
                     f"{conf} | {rate} |")
    audits = {lang: v["dev_audit"] for lang, v in summary.items() if v.get("dev_audit")}
    return "\n".join(lines + (audit_markdown(audits) if audits else [])) + "\n"


def _pct(stats: dict[str, Any] | None) -> str:
    """'CER / WER' in percent, '—' where nothing was scored."""
    if not stats or stats["cer"] is None:
        return "—"
    return f"{stats['cer']:.1f} / {'—' if stats['wer'] is None else format(stats['wer'], '.1f')}"


def _share(stats: dict[str, Any] | None) -> str:
    return "—" if not stats or stats["share"] is None else f"{100 * stats['share']:.0f}%"


def threshold_cell(audit: dict[str, Any]) -> str:
    """A language's confidence threshold and where it came from, or why there is none."""
    t, target = audit["threshold"], audit["max_dev_cer"]
    if t is not None:
        return f"{t:.2f} (dev audit: CER ≤ {target:g}%)" if audit["threshold_from"] == "dev audit" else f"{t:.2f} (set)"
    return f"none: no bucket reaches CER ≤ {target:g}%" if target is not None else "—"


def audit_markdown(audits: dict[str, dict[str, Any]]) -> list[str]:
    """The dev audit as Markdown lines: per language its CER/WER (all dev rows, those the filters keep, those at or
    above its threshold), then per confidence bucket."""
    lines = ["", "#### Dev audit: expected PL quality", "",
             "Each language's labeled dev rows labeled with its teacher, decoder and filters and scored against their "
             "transcripts (`audit.json`; the rows in `audit/dev-<lang>.jsonl`). CER / WER in %.", "",
             "| language | decoder | dev rows | all: CER / WER | kept by filters | kept: CER / WER | "
             "confidence threshold | kept at threshold | at threshold: CER / WER |",
             "|---|---|---:|---|---:|---|---|---:|---|"]
    for lang, a in audits.items():
        at = a["at_threshold"]
        kept_at = "—" if at is None else f"{at['n']} ({_share(at)})"
        lines.append(f"| {lang} | {a['decoder']} | {a['dev_rows']} | {_pct(a['all'])} | {a['kept']['n']} | "
                     f"{_pct(a['kept'])} | {threshold_cell(a)} | {kept_at} | {_pct(at)} |")
    lines += ["", "| language | confidence | kept dev rows | share | CER / WER | rows ≥ lower edge | "
              "≥ lower edge: CER / WER |", "|---|---|---:|---:|---|---:|---|"]
    for lang, a in audits.items():
        for b in a["buckets"]:
            up = b["at_or_above"]
            lines.append(f"| {lang} | {b['lo']:.2f}–{b['hi']:.2f} | {b['n']} | {_share(b)} | {_pct(b)} | "
                         f"{up['n']} ({_share(up)}) | {_pct(up)} |")
    return lines


def audit_columns(summary_entry: dict[str, Any]) -> dict[str, Any]:
    """Flat dev-audit columns of a language's summary for a table artifact (empty without an audit)."""
    a = summary_entry.get("dev_audit")
    if not a:
        return {}
    at = a["at_threshold"] or {}
    return {"dev_rows": a["dev_rows"], "dev_cer": a["all"]["cer"], "dev_wer": a["all"]["wer"],
            "dev_kept_cer": a["kept"]["cer"], "dev_kept_wer": a["kept"]["wer"],
            "confidence_threshold": threshold_cell(a), "dev_cer_at_threshold": at.get("cer"),
            "dev_cer_by_confidence": ", ".join(f"{b['lo']:.2f}+: {_pct(b['at_or_above'])} (n={b['at_or_above']['n']})"
                                               for b in a["buckets"])}


def open_with_pandas(root: str) -> str:
    """The lines that open a labels root with pandas and play a row's audio."""
    return (
        "```python\n"
        "import pandas as pd\n"
        f"df = pd.read_parquet('{root}/pl')  # or: from storage.pl import load_pseudo_labels\n"
        "df[df.confidence > 0.9].groupby('language').size()\n"
        "from storage.pl import pl_audio; import IPython.display as ipd\n"
        f"ipd.Audio(pl_audio('{root}', df.iloc[0]))  # the 16 kHz FLAC behind a row\n"
        "```\n"
    )
