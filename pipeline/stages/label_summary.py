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
    ("NaN or Inf", "nan_audio"),
    ("silent", "silent_audio"),
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
    return "\n".join(lines) + "\n"


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
