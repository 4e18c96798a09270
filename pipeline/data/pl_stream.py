"""Pseudo-labeled batches streamed from a PL corpus's WebDataset shards (docs/architecture.md, "Student").

The PL table (Parquet, read with the student's filters) says which samples exist, how long each is and in
which shard it lives; audio stays in the shards until needed. Each epoch the shards are shuffled and taken a
window of `window_shards` at a time: the window's rows are batched by audio seconds from length-sorted
buckets (as every other stage), the window's shards are read once as a stream (only the selected members),
and its batches are handed out in shuffled order. Memory holds one window's FLAC bytes, whatever the
number of shards; the state is (epoch, window, batch position), so a resumed run reads the same batches.
A sample that is missing from its shard or fails to decode becomes a reject, and its batch goes on without it.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import AudioPolicy, BatchConfig, FeatureConfig
from pipeline.data.audio import AudioError, decode_audio, log_mel
from pipeline.data.rows import Reject, Utterance
from pipeline.data.samplers import DynamicBucketSampler
from pipeline.data.world import World
from storage.files import join
from storage.pl import iter_shard_samples

log = logging.getLogger("mlpl.pl_stream")


@dataclass(frozen=True)
class PLSample:
    """One PL row the stream may hand out: the utterance (PL as its text) and where its audio is."""

    utterance: Utterance
    shard: str  # relative to the labels root
    key: str


def pl_samples(rows: Any, root: str, max_duration_s: float, source: str = "") -> tuple[list[PLSample], list[Reject]]:
    """PL table rows (a DataFrame with id, language, duration_s, text, shard, key) as samples; rows longer
    than `max_duration_s` become rejects (a batch could never hold them)."""
    samples, rejects = [], []
    for r in rows.itertuples(index=False):
        audio = f"{join(root, r.shard)}#{r.key}"
        utt = Utterance(id=str(r.id), audio=audio, duration_s=float(r.duration_s), language=str(r.language),
                        text=str(r.text))
        if utt.duration_s > max_duration_s:
            reason = (f"PL clip is {utt.duration_s:.1f} s, longer than the student's {max_duration_s:.0f} s limit "
                      "(audio.max_duration_s / pl_batch.max_batch_duration_s)")
            rejects.append(Reject(utt.id, audio, utt.language, reason, source))
        else:
            samples.append(PLSample(utt, str(r.shard), str(r.key)))
    return samples, rejects


class PLBatchStream:
    """Endless shuffled batches of PL samples, read shard window by shard window."""

    def __init__(
        self,
        samples: list[PLSample],
        root: str,
        *,
        features: FeatureConfig,
        policy: AudioPolicy,
        batch: BatchConfig,
        window_shards: int,
        seed: int = 0,
        world: World | None = None,
    ):
        if not samples:
            raise ValueError("no pseudo-labeled samples to stream")
        self.samples, self.root = samples, root
        self.features, self.policy, self.batch = features, policy, batch
        self.window_shards, self.seed = window_shards, seed
        self.world = world or World()  # under torchrun each rank reads batches rank, rank + size, … of every window
        self.shards = sorted({s.shard for s in samples})
        self._by_shard: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            self._by_shard.setdefault(s.shard, []).append(i)
        self._state = {"epoch": 0, "window": 0, "position": 0}
        self._rejects: dict[str, Reject] = {}

    # --- plan: pure functions of (seed, epoch, window) ---------------------------------------------
    def windows(self, epoch: int) -> list[list[str]]:
        """The epoch's shard order cut into windows."""
        order = list(self.shards)
        random.Random(self.seed * 1_000_033 + epoch).shuffle(order)
        return [order[i : i + self.window_shards] for i in range(0, len(order), self.window_shards)]

    def window_batches(self, epoch: int, w: int, window: list[str]) -> list[list[int]]:
        """Batches (sample indices) of window `w` of an epoch, by audio seconds, in shuffled order."""
        idx = [i for shard in window for i in self._by_shard[shard]]
        sampler = DynamicBucketSampler(
            [self.samples[i].utterance.duration_s for i in idx], max_batch_duration_s=self.batch.max_batch_duration_s,
            max_batch_size=self.batch.max_batch_size, num_buckets=self.batch.num_buckets, shuffle=True,
            seed=self.seed * 1_000_037 + epoch,
        )
        return [[idx[j] for j in b] for b in sampler.epoch_batches(w)]

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out, and the rejects so far."""
        return dict(self._state) | {"rejects": [r.as_row() for r in self.rejects]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved position on the next `iter()`."""
        self._state = {k: int(state[k]) for k in ("epoch", "window", "position")}
        for row in state.get("rejects", []):
            self._add_reject(Reject(row["id"], row["audio"], row["language"], row["reason"], row.get("source", "")))

    @property
    def rejects(self) -> list[Reject]:
        """Samples that could not be read so far, each once."""
        return list(self._rejects.values())

    def _add_reject(self, r: Reject) -> None:
        self._rejects.setdefault(r.id, r)

    # --- reading -----------------------------------------------------------------------------------
    def _read_window(self, window: list[str]) -> dict[int, bytes]:
        """FLAC bytes of the window's samples, each shard read once as a stream; unreadable ones rejected."""
        audio: dict[int, bytes] = {}
        for shard in window:
            wanted = {self.samples[i].key: i for i in self._by_shard[shard]}
            try:
                for key, flac, _ in iter_shard_samples(self.root, shard, wanted):
                    audio[wanted[key]] = flac
            except FileNotFoundError:
                self._reject_missing(shard, wanted, audio, "shard file not found")
                continue
            except (tarfile.TarError, OSError, EOFError) as err:
                self._reject_missing(shard, wanted, audio, f"shard unreadable ({type(err).__name__}: {err})")
                continue
            self._reject_missing(shard, wanted, audio, "sample not in its shard")
        return audio

    def _rank_note(self) -> str:
        w = self.world
        return f" by rank {w.rank} of {w.size} in a whole epoch" if w.distributed else ""

    def _reject_missing(self, shard: str, wanted: dict[str, int], audio: dict[int, bytes], why: str) -> None:
        for i in wanted.values():
            if i not in audio:
                u = self.samples[i].utterance
                self._add_reject(Reject(u.id, u.audio, u.language, f"{why}: {join(self.root, shard)}", "pl"))

    def _features(self, i: int, flac: bytes | None) -> torch.Tensor | None:
        u = self.samples[i].utterance
        if flac is None:
            return None
        try:
            return log_mel(decode_audio(flac, self.policy, self.features.sample_rate_hz), self.features)
        except AudioError as err:
            self._add_reject(Reject(u.id, u.audio, u.language, str(err), "pl"))
        except Exception as err:  # one bad sample must never end the run
            reason = f"unexpected error decoding PL audio ({type(err).__name__}: {err})"
            self._add_reject(Reject(u.id, u.audio, u.language, reason, "pl"))
        return None

    def __iter__(self) -> Iterator[tuple[list[Utterance], list[torch.Tensor]]]:
        """(utterances, features) per batch, forever, from the saved position; the state follows each batch."""
        epoch, w, pos = self._state["epoch"], self._state["window"], self._state["position"]
        while True:
            whole_epoch, handed_out = w == 0 and pos == 0, False  # a resumed epoch may have nothing left
            windows = self.windows(epoch)
            while w < len(windows):
                batches = self.window_batches(epoch, w, windows[w])
                audio = self._read_window(windows[w]) if pos < len(batches) else {}
                while pos < len(batches):
                    if not self.world.owns(pos):  # another rank's batch
                        pos += 1
                        continue
                    utts, feats = [], []
                    for i in batches[pos]:
                        f = self._features(i, audio.get(i))
                        if f is not None:
                            utts.append(self.samples[i].utterance)
                            feats.append(f)
                    pos += 1
                    self._state = {"epoch": epoch, "window": w, "position": pos}
                    if utts:
                        handed_out = True
                        yield utts, feats
                del audio
                w, pos = w + 1, 0
            if len(self._rejects) >= len(self.samples) or (self.world.distributed and whole_epoch and not handed_out):
                raise ValueError(f"none of the {len(self.samples)} pseudo-labeled samples under {self.root} could "
                                 f"be read{self._rank_note()} (see the stage's rejects.jsonl)")
            epoch, w = epoch + 1, 0
