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
    """Test CER per language after each stage, with the relative change of slimIPL over fine-tuning and the
    PL CER on the unlabeled clips at the start and end of slimIPL.

    `supervised` is the multilingual model's `score()` table; `per_language[lang]` holds the test tables
    ("finetune", "slimipl": score() results or None) and the slimIPL summary ("slimipl_summary").
    """
    roles = roles or {}
    lines = [
        "| language | role | multilingual CER % | fine-tuned CER % | slimIPL CER % | slimIPL vs fine-tuned | "
        "PL CER % start → end | LID acc % (slimIPL) |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for lang in sorted(k for k in supervised if k not in ("all", "macro")):
        base = supervised[lang]["cer"]
        mine = per_language.get(lang, {})
        ft = (mine.get("finetune") or {}).get(lang, {}).get("cer")
        sl_table = (mine.get("slimipl") or {}).get(lang, {})
        sl = sl_table.get("cer")
        rel = f"{100 * (sl - ft) / ft:+.1f} %" if sl is not None and ft else "—"
        ev = (mine.get("slimipl_summary") or {}).get("extra", {}).get("pl_eval", {})
        start, end = ev.get("start", {}).get("whole", {}), ev.get("end", {}).get("whole", {})
        pl = f"{_f(start.get('pl_cer'))} → {_f(end.get('pl_cer'))}" if start or end else "—"
        lines.append(f"| {lang} | {roles.get(lang, '')} | {_f(base)} | {_f(ft)} | {_f(sl)} | {rel} | {pl} | "
                     f"{_f(sl_table.get('lid_acc'))} |")
    return "\n".join(lines) + "\n"
