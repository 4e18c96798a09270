"""Unlabeled audio at scale (docs/architecture.md, "slimIPL": lazy unlabeled data).

An unlabeled manifest is validated without decoding any audio (durations come from the manifest, or from
the file header when missing); batches are formed by audio seconds, and a prefetch thread decodes and
featurizes each batch only shortly before it is used. Memory holds the prefetch queue, not the corpus, so a
4× larger manifest costs time, not memory. A row that fails to decode becomes a reject and the batch goes on
without it. The loader's state is the sampler position of the batches handed out, so a resumed run sees
exactly the same stream.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from pipeline.config import AudioPolicy, FeatureConfig
from pipeline.data.audio import AudioError, load_audio, load_audio_and_flac, log_mel, probe_audio
from pipeline.data.rows import Reject, Utterance, read_utterances
from pipeline.data.samplers import DynamicBucketSampler
from pipeline.data.world import World

log = logging.getLogger("mlpl.stream")


def load_unlabeled(
    manifest_url: str,
    *,
    features: FeatureConfig,
    policy: AudioPolicy,
    languages: Sequence[str] | None = None,
    language: str | None = None,
) -> tuple[list[Utterance], list[Reject]]:
    """Validate an unlabeled manifest without decoding audio; every utterance gets a duration for batching.

    With `language`, only that language's rows are returned (other languages' rows are not rejects).

    Raises:
        FileNotFoundError: when the manifest itself is missing.
    """
    utts, rejects = read_utterances(manifest_url, require_text=False, languages=languages, language=language)
    kept = []
    for u in utts:
        duration_s = u.duration_s
        if not (math.isfinite(duration_s) and duration_s > 0):  # not declared (or nonsense): ask the header
            try:
                duration_s = probe_audio(u.audio)
            except AudioError as err:
                rejects.append(Reject(u.id, u.audio, u.language, str(err), manifest_url))
                continue
            except Exception as err:  # soundfile raises several types for unreadable headers
                reason = f"audio header could not be read ({type(err).__name__}: {err})"
                rejects.append(Reject(u.id, u.audio, u.language, reason, manifest_url))
                continue
        if duration_s > policy.max_duration_s:
            reason = f"audio is {duration_s:.1f} s, longer than audio.max_duration_s={policy.max_duration_s}"
            rejects.append(Reject(u.id, u.audio, u.language, reason, manifest_url))
        elif duration_s < policy.min_duration_s:
            reason = f"audio is {duration_s:.3f} s, shorter than audio.min_duration_s={policy.min_duration_s}"
            rejects.append(Reject(u.id, u.audio, u.language, reason, manifest_url))
        else:
            kept.append(replace(u, duration_s=duration_s))
    return kept, rejects


@dataclass(frozen=True)
class LoadedBatch:
    """A batch's utterances with their log-mel features (T_i, n_mels), decoded on demand; with `with_flac`, also
    each clip's 16 kHz mono FLAC bytes (for PL shards) and its decoded duration."""

    utterances: list[Utterance]
    features: list[torch.Tensor]
    flac: list[bytes] | None = None
    durations_s: list[float] | None = None


class _Item(NamedTuple):
    """What the prefetch thread hands over: the state after this batch, the batch, the rows it rejected."""

    state: dict[str, int]
    batch: LoadedBatch
    rejects: list[Reject]


_END = object()


def _log_rate(epoch: int | None, seconds: float, t0: float) -> None:
    if epoch is not None:
        elapsed = time.perf_counter() - t0
        log.debug("unlabeled epoch %d: %.0f s of audio decoded in %.1f s (%.0f× real time)", epoch, seconds,
                  elapsed, seconds / max(elapsed, 1e-9))


class LazyBatchLoader:
    """Batches by audio seconds over many utterances, decoded and featurized in a prefetch thread.

    Memory holds at most `prefetch_batches` queued batches, plus the one being decoded and the one handed
    out; features are never cached. A row that fails to decode is dropped from its batch and recorded once
    on `rejects` when its batch is handed out.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        *,
        features: FeatureConfig,
        policy: AudioPolicy,
        max_batch_duration_s: float,
        max_batch_size: int,
        num_buckets: int,
        seed: int = 0,
        shuffle: bool = True,
        prefetch_batches: int = 2,
        source: str = "",
        with_flac: bool = False,
        world: World | None = None,
    ):
        if prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be 0 (decode in the caller's thread) or more "
                             f"(got {prefetch_batches})")
        self.utterances = list(utterances)
        self.features, self.policy, self.source = features, policy, source
        self.prefetch_batches = prefetch_batches
        self.with_flac = with_flac
        self.world = world or World()  # the endless (training) stream is sharded over the ranks; iter_epoch not
        # Batching trusts the declared durations; a clip that decodes longer still goes into its batch.
        self.sampler = DynamicBucketSampler(
            [u.duration_s for u in self.utterances], max_batch_duration_s=max_batch_duration_s,
            max_batch_size=max_batch_size, num_buckets=num_buckets, shuffle=shuffle, seed=seed,
        )
        self._state = self.sampler.state_dict()
        self._rejects: dict[str, Reject] = {}
        self._lock = threading.Lock()  # guards _rejects and _streams, which callers may read from other threads
        self._streams: list[tuple[threading.Event, threading.Thread]] = []
        self._tracked: threading.Event | None = None  # stop event of the stream that moves the state

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Sampler position after the last batch handed out (not the prefetched ones), and the rejects so far."""
        return dict(self._state) | {"rejects": [r.as_row() for r in self.rejects]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved position on the next `iter()`; the saved seed wins."""
        self.close()
        self._state = {k: int(state[k]) for k in ("epoch", "position", "seed")}
        self.sampler.seed = self._state["seed"]
        for row in state.get("rejects", []):
            self.add_reject(Reject(row["id"], row["audio"], row["language"], row["reason"], row.get("source", "")))

    @property
    def rejects(self) -> list[Reject]:
        """Rows that failed to decode so far, each once, in the order they were found."""
        with self._lock:
            return list(self._rejects.values())

    def add_reject(self, reject: Reject) -> None:
        """Record a row that cannot be used (also from outside, e.g. a cached row whose file went away)."""
        with self._lock:
            self._rejects.setdefault(reject.id, reject)

    # --- decoding ---------------------------------------------------------------------------------
    def _decode(self, u: Utterance) -> tuple[torch.Tensor, bytes | None, float] | Reject:
        """(features, FLAC bytes when asked for, decoded seconds), or the reject."""
        try:
            rate = self.features.sample_rate_hz
            if self.with_flac:
                wav, flac = load_audio_and_flac(u.audio, self.policy, rate)
            else:
                wav, flac = load_audio(u.audio, self.policy, rate), None
            return log_mel(wav, self.features), flac, wav.numel() / rate
        except AudioError as err:
            return Reject(u.id, u.audio, u.language, str(err), self.source)
        except Exception as err:  # one unreadable row must never end the run
            reason = f"unexpected error reading audio ({type(err).__name__}: {err})"
            return Reject(u.id, u.audio, u.language, reason, self.source)

    def decode(self, u: Utterance) -> torch.Tensor | None:
        """Features (T, n_mels) of one utterance, or None after recording why it cannot be used."""
        out = self._decode(u)
        if isinstance(out, Reject):
            self.add_reject(out)
            return None
        return out[0]

    def _load(self, idx: list[int], stop: threading.Event) -> tuple[LoadedBatch, list[Reject]] | None:
        """Decode one batch (None when stopped half-way: nobody will read it)."""
        utts, feats, flacs, seconds, rejects = [], [], [], [], []
        for i in idx:
            if stop.is_set():
                return None
            out = self._decode(self.utterances[i])
            if isinstance(out, Reject):
                rejects.append(out)
            else:
                utts.append(self.utterances[i])
                feats.append(out[0])
                flacs.append(out[1])
                seconds.append(out[2])
        return LoadedBatch(utts, feats, flacs if self.with_flac else None, seconds), rejects

    # --- iteration --------------------------------------------------------------------------------
    def _positions(self, start: dict[str, int], epochs: int | None,
                   world: World | None = None) -> Iterator[tuple[dict[str, int], list[int]]]:
        """(state after the batch, batch indices) from `start`, for `epochs` epochs or forever; with several
        ranks, this rank's batches only (rank, rank + size, … of each epoch)."""
        epoch, pos, seed = start["epoch"], start["position"], start["seed"]
        world = world or World()
        last = None if epochs is None else epoch + epochs
        while last is None or epoch < last:
            batches = self.sampler.epoch_batches(epoch)
            if len(batches) < world.size:
                raise ValueError(f"{self.source or 'unlabeled data'}: {len(batches)} batches per epoch, fewer than the "
                                 f"{world.size} ranks; use fewer ranks or smaller unlabeled batches")
            while pos < len(batches):
                pos += 1
                if world.owns(pos - 1):
                    yield {"epoch": epoch, "position": pos, "seed": seed}, batches[pos - 1]
            epoch, pos = epoch + 1, 0

    def _produce(self, positions: Iterator[tuple[dict[str, int], list[int]]], out: queue.Queue,
                 stop: threading.Event) -> None:
        def put(item: object) -> bool:
            # Never block for good: a consumer that went away sets `stop`, and the thread must notice.
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            t0, seconds, epoch = time.perf_counter(), 0.0, None
            for state, idx in positions:
                if state["epoch"] != epoch:
                    _log_rate(epoch, seconds, t0)
                    t0, seconds, epoch = time.perf_counter(), 0.0, state["epoch"]
                loaded = self._load(idx, stop)
                if loaded is None or not put(_Item(state, *loaded)):
                    return
                seconds += sum(u.duration_s for u in loaded[0].utterances)
                del loaded  # the queue holds the batch now; keep no second reference while decoding the next
            _log_rate(epoch, seconds, t0)
            put(_END)
        except BaseException as err:  # handed to the consumer, which raises it
            put(err)

    def _stream_inline(self, positions: Iterator[tuple[dict[str, int], list[int]]], *,
                       track_state: bool) -> Iterator[LoadedBatch]:
        """prefetch_batches=0: decode each batch in the caller's thread when it is asked for. On 2 cores a
        prefetch thread competes with the model's own threads, and that costs more than the overlap gains
        (docs/benchmarks.md, labeling)."""
        stop = threading.Event()
        with self._lock:
            self._streams = [(s, t) for s, t in self._streams if not s.is_set()] + [(stop, None)]
        if track_state:
            if self._tracked is not None:
                self._tracked.set()
            self._tracked = stop
        try:
            for state, idx in positions:
                loaded = None if stop.is_set() else self._load(idx, stop)
                if loaded is None:
                    return
                for r in loaded[1]:
                    self.add_reject(r)
                if track_state:
                    self._state = state
                if loaded[0].utterances:
                    yield loaded[0]
        finally:
            stop.set()

    def _stream(self, positions: Iterator[tuple[dict[str, int], list[int]]], *,
                track_state: bool) -> Iterator[LoadedBatch]:
        if self.prefetch_batches == 0:
            yield from self._stream_inline(positions, track_state=track_state)
            return
        out: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(positions, out, stop), daemon=True,
                                  name="mlpl-unlabeled-prefetch")
        with self._lock:
            self._streams = [(s, t) for s, t in self._streams if t is not None and t.is_alive()] + [(stop, thread)]
        if track_state:
            # Two streams moving one state would interleave; the newer one wins.
            if self._tracked is not None:
                self._tracked.set()
            self._tracked = stop
        thread.start()
        try:
            while True:
                try:
                    item = out.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set():  # closed: end this stream instead of waiting for good
                        return
                    if not thread.is_alive() and out.empty():
                        raise RuntimeError("unlabeled prefetch thread ended without a result") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if stop.is_set():
                    return
                for r in item.rejects:
                    self.add_reject(r)
                if track_state:
                    self._state = item.state
                if item.batch.utterances:  # a batch whose every row failed is skipped
                    yield item.batch
        finally:
            stop.set()

    def __iter__(self) -> Iterator[LoadedBatch]:
        """Endless batches across epochs from the current state; the state follows what was handed out."""
        return self._stream(self._positions(self._state, None, self.world), track_state=True)

    def iter_epoch(self, epoch: int = 0) -> Iterator[LoadedBatch]:
        """One whole epoch (length-sorted order when shuffle is off), for labeling a manifest once."""
        start = {"epoch": epoch, "position": 0, "seed": self.sampler.seed}
        return self._stream(self._positions(start, 1), track_state=False)

    def close(self) -> None:
        """Stop every prefetch thread of this loader; their iterators end."""
        with self._lock:
            streams, self._streams = self._streams, []
        for stop, _ in streams:
            stop.set()
        for _, thread in streams:
            if thread is not None and thread.is_alive():
                thread.join(timeout=5)

    def __enter__(self) -> LazyBatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
