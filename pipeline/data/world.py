"""A process's place in a data-parallel run (three integers), and the one rule that splits any stream of batches
or positions between the ranks: position p belongs to rank p mod size. Below data and engine alike, so that the
samplers shard themselves without the training engine (which joins the process group: engine/distributed.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, number of ranks, and its rank on this node (its GPU)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.size > 1

    def owns(self, position: int) -> bool:
        """Whether the item at `position` (0-based) of a stream every rank walks in the same order is this rank's."""
        return position % self.size == self.rank
