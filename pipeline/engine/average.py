"""Checkpoint averaging for stronger teachers at no extra training (issue 16; NeMo's TopIPL).

A stage with `average_top_n = N ≥ 2` keeps the weights of its N best dev evaluations (`checkpoints/top/`, pruned as
better ones arrive; the list itself lives in the resume record, so a killed stage resumes with the same list) and
at its end writes `checkpoints/averaged.pt`, the element-wise mean of their parameters, in best.pt's format. The
averaged model is scored on dev like best.pt; a run's teacher is the averaged model only when that dev CER is not
worse (`pipeline.layout.StageDir.teacher`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from storage.checkpoint import load_checkpoint, save_checkpoint


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of model state dicts, best first: floating tensors averaged in fp32 (then cast back to their
    dtype), the others (integer buffers such as step counters) taken from the first.

    Raises:
        ValueError: when there is no state, or the states hold other keys or shapes.
    """
    if not states:
        raise ValueError("average_state_dicts needs at least one state dict")
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != first.keys():
            diff = sorted(set(state) ^ set(first))[:4]
            raise ValueError(f"state dict {i} has other keys than the first ({', '.join(diff)}); average checkpoints "
                             "of one model only")
    out: dict[str, torch.Tensor] = {}
    for key, ref in first.items():
        if not torch.is_floating_point(ref):
            out[key] = ref.clone()  # a counter has no meaningful mean: the best checkpoint's own
            continue
        total = torch.zeros(ref.shape, dtype=torch.float32, device=ref.device)
        for i, state in enumerate(states):
            if state[key].shape != ref.shape:
                raise ValueError(f"{key}: state dict {i} has shape {tuple(state[key].shape)}, the first "
                                 f"{tuple(ref.shape)}; average checkpoints of one model only")
            total += state[key].to(device=ref.device, dtype=torch.float32)
        out[key] = (total / len(states)).to(ref.dtype)
    return out


@dataclass
class TopCheckpoints:
    """The N best dev-scored updates of a stage, best first: (dev macro CER, step) ascending, so on a tie the earlier
    one ranks higher, as best.pt keeps the earlier of two equal scores. Entries name updates, not files, so the list
    stays valid when the run folder moves (`StageDir.top(step)` is the file)."""

    size: int  # N; below 2 nothing is kept (the mean of one checkpoint is best.pt itself)
    entries: list[dict[str, Any]] = field(default_factory=list)  # {"step": int, "metric": dev macro CER}

    @property
    def enabled(self) -> bool:
        """Whether the stage keeps and averages its top checkpoints."""
        return self.size >= 2

    def admits(self, metric: float) -> bool:
        """Whether a new evaluation (later than every kept one) with this dev CER enters the list."""
        return self.enabled and (len(self.entries) < self.size or metric < self.entries[-1]["metric"])

    def add(self, step: int, metric: float) -> list[int]:
        """Record an evaluated update; returns the steps that dropped out of the top N (whose files are deleted once
        the resume record no longer lists them)."""
        self.entries = sorted([*self.entries, {"step": step, "metric": metric}], key=_rank)
        return self.resize(self.size)

    def resize(self, size: int) -> list[int]:
        """Keep the best `size` entries (a resumed stage may ask for another N); returns the steps dropped."""
        self.size = size
        keep = size if self.enabled else 0
        dropped = [e["step"] for e in self.entries[keep:]]
        self.entries = self.entries[:keep]
        return dropped

    def steps(self) -> list[int]:
        """The kept updates, best first."""
        return [e["step"] for e in self.entries]

    def state_dict(self) -> list[dict[str, Any]]:
        """The list for the resume record."""
        return [dict(e) for e in self.entries]

    def load_state_dict(self, entries: list[dict[str, Any]]) -> None:
        """Restore the list saved by `state_dict`."""
        self.entries = sorted((dict(e) for e in entries), key=_rank)


def _rank(entry: dict[str, Any]) -> tuple[float, int]:
    return entry["metric"], entry["step"]


def save_top_checkpoint(url: str, model: torch.nn.Module, step: int, metric: float) -> None:
    """Write one top-N member: weights only, with its update and dev CER (atomically)."""
    save_checkpoint(url, {"model": model.state_dict(), "step": step, "metric": metric})


def average_checkpoints(urls: Sequence[str]) -> dict[str, torch.Tensor]:
    """The mean of some checkpoints' weights (loaded with weights_only=True), best first.

    Raises:
        FileNotFoundError: when a checkpoint is missing.
        ValueError: when there is none, or one is not a readable checkpoint of the same model.
    """
    return average_state_dicts([load_checkpoint(url)["model"] for url in urls])


def averaged_record(best_record: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                    average: Mapping[str, Any]) -> dict[str, Any]:
    """averaged.pt's record: best.pt's (model kwargs, tokenizer, languages, config, front end) with the averaged
    weights and the `average` summary; no optimizer or RNG, which belong to one trajectory and not to a mean."""
    drop = {"optimizer", "rng", "rank_states", "stage_state"}
    return {k: v for k, v in best_record.items() if k not in drop} | {"model": dict(weights),
                                                                        "average": dict(average)}


def write_averaged(url: str, best_record: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                   average: Mapping[str, Any]) -> None:
    """Write averaged.pt atomically, in the format `pipeline.engine.model.load_trained` reads."""
    save_checkpoint(url, averaged_record(best_record, weights, average))

