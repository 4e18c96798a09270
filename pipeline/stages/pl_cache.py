"""slimIPL's dynamic pseudo-label cache and its collapse guard (Likhomanenko et al. 2021; Lugosch et al. 2022
Sec. 5.2), after flashlight's recipes/slimIPL: the cache of N PL batches, which slot an unlabeled step trains on,
which step of a cycle of 1 + λ is the labeled one, and the statistics of every cache refresh that the guard
watches. Each piece is a small record with `state_dict()`, so a resumed run has the same cache and next steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import jiwer

from pipeline.config import CollapseGuardConfig
from pipeline.data.rows import Utterance
from pipeline.data.text import normalize_text


class CollapseError(ValueError):
    """Self-training degenerated (mostly empty / all-blank pseudo-labels); the message says what to do."""


def choose_slot(rng: random.Random, size: int, p: float) -> tuple[int, bool]:
    """A uniformly random cache slot to train on, and whether to relabel it afterwards (probability p)."""
    return rng.randrange(size), rng.random() < p


def is_labeled_step(iteration: int, unlabeled_ratio: int, seed: int) -> bool:
    """Whether step `iteration` of the PL phase is the labeled one of its cycle of 1 + λ (shuffled per cycle)."""
    cycle, pos = divmod(iteration, unlabeled_ratio + 1)
    order = [True] + [False] * unlabeled_ratio
    random.Random(seed * 1_000_003 + cycle).shuffle(order)
    return order[pos]


@dataclass
class PLCache:
    """N slots of pseudo-labeled batches: utterance ids and PL token ids, in slot order (no audio: a slot's clips
    are decoded again when it is trained on, so the cache costs no feature memory)."""

    size: int
    slots: list[dict[str, list]] = field(default_factory=list)  # {"ids": [...], "tokens": [[...], ...]}

    @property
    def full(self) -> bool:
        """Whether every slot holds a batch."""
        return len(self.slots) >= self.size

    def state_dict(self) -> dict[str, Any]:
        """Resumable contents."""
        return {"size": self.size, "slots": self.slots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore saved contents."""
        self.size, self.slots = int(state["size"]), [dict(s) for s in state["slots"]]


@dataclass
class CollapseGuard:
    """Counts consecutive cache refreshes whose PLs look collapsed."""

    cfg: CollapseGuardConfig
    streak: int = 0
    rollbacks: int = 0

    def problems(self, stats: dict[str, float]) -> list[str]:
        """The thresholds one refresh crosses, worded for the error message."""
        c, out = self.cfg, []
        if stats["empty_share"] > c.max_empty_share:
            out.append(f"empty PL share {stats['empty_share']:.2f} > {c.max_empty_share}")
        if stats["blank_ratio"] > c.max_blank_ratio:
            out.append(f"blank ratio {stats['blank_ratio']:.3f} > {c.max_blank_ratio}")
        if stats["chars_per_s"] < c.min_chars_per_s:
            out.append(f"{stats['chars_per_s']:.2f} PL chars/s < {c.min_chars_per_s}")
        return out

    def observe(self, stats: dict[str, float]) -> list[str]:
        """Record one refresh; return the crossed thresholds once `patience` refreshes in a row crossed one."""
        problems = self.problems(stats)
        self.streak = self.streak + 1 if problems else 0
        return problems if self.streak >= self.cfg.patience else []

    def state_dict(self) -> dict[str, int]:
        """Resumable counters."""
        return {"streak": self.streak, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore saved counters."""
        self.streak, self.rollbacks = int(state["streak"]), int(state["rollbacks"])


def pl_stats(utts: list[Utterance], decoded: list[dict], references: dict[str, str]) -> dict[str, float]:
    """Quality signals of one labeled batch: empty share, blank ratio, chars/s, length, confidence, PL CER."""
    audio_s = sum(u.duration_s for u in utts)
    chars = sum(len(d["hypothesis"]) for d in decoded)
    stats = {
        "utterances": len(utts),
        "audio_s": round(audio_s, 2),
        "empty_share": round(sum(d["num_tokens"] == 0 for d in decoded) / max(1, len(decoded)), 4),
        "blank_ratio": round(sum(d["blank_ratio"] for d in decoded) / max(1, len(decoded)), 4),
        "chars_per_s": round(chars / max(audio_s, 1e-9), 3),
        "pl_tokens": round(sum(d["num_tokens"] for d in decoded) / max(1, len(decoded)), 2),
        "confidence": round(sum(d["confidence"] for d in decoded) / max(1, len(decoded)), 4),
    }
    pairs = [(normalize_text(references[u.id]), normalize_text(d["hypothesis"]))
             for u, d in zip(utts, decoded, strict=True) if u.id in references]
    if pairs:  # measurement only: hidden transcripts never reach training
        stats["pl_cer"] = round(100 * jiwer.cer([r for r, _ in pairs], [h for _, h in pairs]), 2)
    return stats
