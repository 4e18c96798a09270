"""Dynamic batching by audio seconds (paper Sec. 4: 200 s of audio per batch per GPU), lhotse-style.

Batches come from length-sorted buckets so padding stays small; each epoch's batch list is a pure function of
(seed, epoch), so a sampler's state is two integers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from pipeline.config import BatchConfig


class DynamicBucketSampler:
    """Batches of utterance indices by padded audio seconds from length-sorted buckets (lhotse-style).

    Each epoch's batch list is a pure function of (seed, epoch), so the state is (epoch, position).
    """

    def __init__(
        self,
        durations_s: Sequence[float],
        *,
        max_batch_duration_s: float,
        max_batch_size: int,
        num_buckets: int,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if not durations_s:
            raise ValueError("cannot batch an empty dataset")
        too_long = [i for i, d in enumerate(durations_s) if d > max_batch_duration_s]
        if too_long:
            raise ValueError(
                f"{len(too_long)} utterance(s) exceed max_batch_duration_s={max_batch_duration_s} "
                f"(longest {max(durations_s):.1f} s); raise the batch budget"
            )
        self.durations_s = list(durations_s)
        self.max_batch_duration_s = max_batch_duration_s
        self.max_batch_size = max_batch_size
        self.num_buckets = num_buckets
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100003 + epoch)
        order = sorted(range(len(self.durations_s)), key=lambda i: (self.durations_s[i], i))
        size = math.ceil(len(order) / self.num_buckets)
        batches: list[list[int]] = []
        for b in range(0, len(order), size):
            bucket = order[b : b + size]
            # Buckets are narrow in duration, so batches formed in shuffled order still pad little
            # while their composition changes every epoch.
            if self.shuffle:
                rng.shuffle(bucket)
            batch: list[int] = []
            longest = 0.0
            for i in bucket:
                d = self.durations_s[i]
                if batch and (
                    (len(batch) + 1) * max(longest, d) > self.max_batch_duration_s
                    or len(batch) >= self.max_batch_size
                ):
                    batches.append(batch)
                    batch, longest = [], 0.0
                batch.append(i)
                longest = max(longest, d)
            if batch:
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch."""
        return self._batches(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        """Endless batches across epochs, starting from the saved position."""
        while True:
            batches = self._batches(self.epoch)
            while self.position < len(batches):
                batch = batches[self.position]
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        """Resumable state."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state."""
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


def batch_sampler(durations_s: Sequence[float], batch: BatchConfig, seed: int, shuffle: bool = True):
    """A `DynamicBucketSampler` with a stage's batch settings."""
    return DynamicBucketSampler(durations_s, max_batch_duration_s=batch.max_batch_duration_s,
                                max_batch_size=batch.max_batch_size, num_buckets=batch.num_buckets, shuffle=shuffle,
                                seed=seed)
