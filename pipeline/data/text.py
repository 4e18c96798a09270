"""Transcript normalization for scoring.

Training keeps punctuation and case, as the paper does (one shared character vocabulary); CER/WER are
scored on a normalized form: Unicode NFC, lower case, punctuation removed, whitespace collapsed.
"""

from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Scoring form of a transcript: NFC, lower case, no punctuation/symbols, single spaces."""
    text = unicodedata.normalize("NFC", text).lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        # Letters, marks (Greek tonos, diacritics) and digits stay; punctuation and symbols become spaces.
        kept.append(ch if cat[0] in "LMN" else " ")
    return _SPACES.sub(" ", "".join(kept)).strip()
