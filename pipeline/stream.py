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
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import soundfile as sf
import torch

from pipeline.audio import AudioError, load_audio, log_mel
from pipeline.config import AudioPolicy, FeatureConfig
from pipeline.data import DynamicBucketSampler, Reject, Utterance, read_utterances
from storage.files import open_binary

log = logging.getLogger("mlpl.stream")


def _header_duration_s(url: str) -> float:
    with open_binary(url) as f:
        info = sf.info(f)
    return info.frames / info.samplerate


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
        if duration_s <= 0:
            try:
                duration_s = _header_duration_s(u.audio)
            except FileNotFoundError:
                rejects.append(Reject(u.id, u.audio, u.language, f"audio file not found: {u.audio}", manifest_url))
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
    """A batch's utterances with their log-mel features (T_i, n_mels), decoded on demand."""

    utterances: list[Utterance]
    features: list[torch.Tensor]


_END = object()


class LazyBatchLoader:
    """Batches by audio seconds over many utterances, decoded and featurized in a prefetch thread."""

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
    ):
        self.utterances = list(utterances)
        self.features, self.policy, self.source = features, policy, source
        self.prefetch_batches = prefetch_batches
        self.sampler = DynamicBucketSampler(
            [u.duration_s for u in self.utterances], max_batch_duration_s=max_batch_duration_s,
            max_batch_size=max_batch_size, num_buckets=num_buckets, shuffle=shuffle, seed=seed,
        )
        self._state = self.sampler.state_dict()
        self._rejects: dict[str, Reject] = {}
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Sampler position right after the last batch handed out (prefetched batches do not count)."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the saved position on the next `iter()`."""
        self.close()
        self._state = {k: int(v) for k, v in state.items()}

    @property
    def rejects(self) -> list[Reject]:
        """Rows that failed to decode so far, each once."""
        with self._lock:
            return list(self._rejects.values())

    def add_reject(self, reject: Reject) -> None:
        """Record a row that cannot be used (also from outside, e.g. a cached row whose file went away)."""
        with self._lock:
            self._rejects.setdefault(reject.id, reject)

    # --- decoding ---------------------------------------------------------------------------------
    def decode(self, u: Utterance) -> torch.Tensor | None:
        """Features of one utterance, or None after recording why it cannot be used."""
        try:
            return log_mel(load_audio(u.audio, self.policy, self.features.sample_rate_hz), self.features)
        except AudioError as err:
            self.add_reject(Reject(u.id, u.audio, u.language, str(err), self.source))
        except Exception as err:  # one unreadable row must never end the run
            reason = f"unexpected error reading audio ({type(err).__name__}: {err})"
            self.add_reject(Reject(u.id, u.audio, u.language, reason, self.source))
        return None

    def _load(self, idx: list[int]) -> LoadedBatch:
        utts, feats = [], []
        for i in idx:
            f = self.decode(self.utterances[i])
            if f is not None:
                utts.append(self.utterances[i])
                feats.append(f)
        return LoadedBatch(utts, feats)

    # --- iteration --------------------------------------------------------------------------------
    def _positions(self, start: dict[str, int], epochs: int | None) -> Iterator[tuple[dict[str, int], list[int]]]:
        """(state after the batch, batch indices) from `start`, for `epochs` epochs or forever."""
        epoch, pos, seed = start["epoch"], start["position"], start["seed"]
        last = None if epochs is None else epoch + epochs
        while last is None or epoch < last:
            batches = self.sampler.epoch_batches(epoch)
            while pos < len(batches):
                pos += 1
                yield {"epoch": epoch, "position": pos, "seed": seed}, batches[pos - 1]
            epoch, pos = epoch + 1, 0

    def _produce(self, positions, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for state, idx in positions:
                item = (state, self._load(idx))
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(_END)
        except BaseException as err:  # handed to the consumer, which raises it
            out.put(err)

    def _stream(self, positions, *, track_state: bool) -> Iterator[LoadedBatch]:
        self.close()
        out: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(positions, out, stop), daemon=True,
                                  name="mlpl-unlabeled-prefetch")
        self._stop, self._thread = stop, thread
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                state, batch = item
                if track_state:
                    self._state = state
                if batch.utterances:  # a batch whose every row failed is skipped
                    yield batch
        finally:
            stop.set()

    def __iter__(self) -> Iterator[LoadedBatch]:
        """Endless batches across epochs from the current state; the state follows what was handed out."""
        return self._stream(self._positions(self._state, None), track_state=True)

    def iter_epoch(self, epoch: int = 0) -> Iterator[LoadedBatch]:
        """One whole epoch (length-sorted order when shuffle is off), for labeling a manifest once."""
        return self._stream(self._positions({"epoch": epoch, "position": 0, "seed": self.sampler.seed}, 1),
                            track_state=False)

    def close(self) -> None:
        """Stop the prefetch thread, if any."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._stop = self._thread = None

    def __enter__(self) -> LazyBatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
