"""Greedy CTC decoding that makes pseudo-labels (slimIPL, Likhomanenko et al. 2021: greedy, no LM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GreedyHypothesis:
    """One utterance's greedy CTC output and the signals PL filters use."""

    tokens: list[int]  # argmax path with repeats collapsed and blanks removed
    confidence: float  # mean over valid frames of max_v p(v | frame); 0.0 for an empty input
    blank_ratio: float  # fraction of valid frames whose argmax is blank; 1.0 for an empty input


def greedy_ctc_decode(log_probs: Tensor, out_lens: Tensor, blank: int = 0) -> list[GreedyHypothesis]:
    """Best path per utterance over its valid frames; confidence = mean of exp(max log-prob) per frame."""
    with torch.no_grad():
        best_logp, best = log_probs.float().max(dim=-1)  # (B, T), (B, T)
        best_prob = best_logp.exp().cpu()
        best = best.cpu()
    hyps = []
    for b, n in enumerate(out_lens.tolist()):
        n = min(int(n), best.shape[1])
        if n <= 0:
            hyps.append(GreedyHypothesis(tokens=[], confidence=0.0, blank_ratio=1.0))
            continue
        path = best[b, :n]  # (n,)
        collapsed = torch.unique_consecutive(path)
        tokens = collapsed[collapsed != blank].tolist()
        confidence = best_prob[b, :n].mean().item()
        blank_ratio = (path == blank).float().mean().item()
        hyps.append(GreedyHypothesis(tokens=tokens, confidence=confidence, blank_ratio=blank_ratio))
    return hyps
