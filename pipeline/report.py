"""Per-language tables across the recipe's stages (paper Table 1 layout: multilingual → fine-tune → slimIPL)."""

from __future__ import annotations

import math
from typing import Any


def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pl_quality_markdown(summary: dict[str, Any]) -> str:
    """PL quality of a slimIPL run at its start and end, whole-utterance vs cropped labeling."""
    ev = summary.get("extra", {}).get("pl_eval", {})
    lines = [
        f"### PL quality, slimIPL {summary.get('extra', {}).get('language', '')}",
        "",
        "| when | labeling | PL CER % | empty PLs % | blank ratio | PL chars/s | confidence |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for when in ("start", "end"):
        for how in ("whole", "crop"):
            st = ev.get(when, {}).get(how)
            if st:
                lines.append(
                    f"| {when} | {how} | {_f(st.get('pl_cer'))} | {_f(100 * st['empty_share'])} | "
                    f"{_f(st['blank_ratio'], 3)} | {_f(st['chars_per_s'], 2)} | {_f(st['confidence'], 3)} |"
                )
    return "\n".join(lines) + "\n"


def recipe_table(supervised: dict[str, dict[str, float]], per_language: dict[str, dict[str, Any]],
                 roles: dict[str, str] | None = None) -> str:
    """Test CER % per stage (rows) and language (columns), as in the paper's Table 1, with slimIPL's relative
    change over fine-tuning and the PL CER on the unlabeled clips at the start and end of slimIPL.

    `supervised` is the multilingual model's `score()` table; `per_language[lang]` holds the test tables
    ("finetune", "slimipl": score() results) and the slimIPL summary ("slimipl_summary").
    """
    roles = roles or {}
    langs = sorted(k for k in supervised if k not in ("all", "macro"))

    def cer(lang: str, stage: str) -> float | None:
        table = supervised if stage == "supervised" else (per_language.get(lang, {}).get(stage) or {})
        return table.get(lang, {}).get("cer")

    def relative(lang: str) -> str:
        ft, sl = cer(lang, "finetune"), cer(lang, "slimipl")
        return f"{100 * (sl - ft) / ft:+.1f} %" if ft and sl is not None else "—"

    def pl_cer(lang: str) -> str:
        ev = (per_language.get(lang, {}).get("slimipl_summary") or {}).get("extra", {}).get("pl_eval", {})
        start, end = ev.get("start", {}).get("whole", {}), ev.get("end", {}).get("whole", {})
        return f"{_f(start.get('pl_cer'))} → {_f(end.get('pl_cer'))}" if start or end else "—"

    header = "| test CER % | " + " | ".join(f"{lang} ({roles[lang]})" if lang in roles else lang for lang in langs)
    rows = [
        header + " |",
        "|---|" + "---:|" * len(langs),
        "| multilingual | " + " | ".join(_f(cer(lang, "supervised")) for lang in langs) + " |",
        "| ↪ fine-tuned on the language | " + " | ".join(_f(cer(lang, "finetune")) for lang in langs) + " |",
        "| ↪ slimIPL | " + " | ".join(_f(cer(lang, "slimipl")) for lang in langs) + " |",
        "| slimIPL vs fine-tuned | " + " | ".join(relative(lang) for lang in langs) + " |",
        "| PL CER % on unlabeled clips, start → end | " + " | ".join(pl_cer(lang) for lang in langs) + " |",
    ]
    return "\n".join(rows) + "\n"
