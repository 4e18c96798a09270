"""Dynamic batching by audio seconds (paper Sec. 4: 200 s of audio per batch per GPU), lhotse-style, and the mix
of languages in a multilingual stage's labeled batches.

Batches come from length-sorted buckets so padding stays small; each epoch's batch list is a pure function of
(seed, epoch), so a sampler's position is two integers. The paper pools every language (natural proportions:
`DynamicBucketSampler` over all utterances); `LanguageMixSampler` instead draws one language per batch with
temperature (p_l ∝ n_l^α) or explicit weights, the draw of batch n a pure function of (seed, n). Both count the
mix they realize (`MixTally`), which the stages log and publish beside the configured one.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pipeline.config import BatchConfig, LanguageMix


class MixTally:
    """The realized mix of a batch stream: batches, utterances and audio seconds per language."""

    def __init__(self) -> None:
        self.batches = 0
        self.by_language: dict[str, dict[str, float]] = {}  # language -> {"batches", "utterances", "audio_s"}

    def add(self, languages: Sequence[str], durations_s: Sequence[float]) -> None:
        """Count one batch: its utterances' languages and durations (a pooled batch counts for each language in it)."""
        self.batches += 1
        for lang in sorted(set(languages)):
            self._row(lang)["batches"] += 1
        for lang, d in zip(languages, durations_s, strict=True):
            row = self._row(lang)
            row["utterances"] += 1
            row["audio_s"] += d

    def _row(self, lang: str) -> dict[str, float]:
        return self.by_language.setdefault(lang, {"batches": 0, "utterances": 0, "audio_s": 0.0})

    def summary(self) -> dict[str, Any]:
        """Counts and shares per language: batch share (batches containing it / batches) and audio share."""
        total_s = sum(r["audio_s"] for r in self.by_language.values())
        return {"batches": self.batches, "audio_s": round(total_s, 1), "realized": {
            lang: {"batches": int(r["batches"]), "utterances": int(r["utterances"]), "audio_s": round(r["audio_s"], 1),
                   "batch_share": round(r["batches"] / self.batches, 4) if self.batches else 0.0,
                   "audio_share": round(r["audio_s"] / total_s, 4) if total_s else 0.0}
            for lang, r in sorted(self.by_language.items())}}

    def state_dict(self) -> dict[str, Any]:
        """Resumable counts."""
        return {"batches": self.batches, "by_language": {k: dict(v) for k, v in self.by_language.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue counting from saved counts."""
        self.batches = int(state["batches"])
        self.by_language = {k: dict(v) for k, v in state["by_language"].items()}


def audio_by_language(durations_s: Sequence[float], languages: Sequence[str]) -> dict[str, float]:
    """Seconds of audio per language (n_l)."""
    out: dict[str, float] = {}
    for d, lang in zip(durations_s, languages, strict=True):
        out[lang] = out.get(lang, 0.0) + d
    return dict(sorted(out.items()))


def mix_probabilities(mix: LanguageMix, audio_s: dict[str, float]) -> dict[str, float]:
    """The configured probability of each language per batch (natural: its share of the audio seconds).

    Raises:
        ValueError: for weights that leave out a language with data, or weight a language without data.
    """
    present = {k: v for k, v in audio_s.items() if v > 0}
    if mix.kind == "natural":
        return _shares(present)
    if mix.kind == "temperature":
        raw = {k: v ** mix.alpha for k, v in present.items()}
    else:
        weights = mix.normalized_weights()
        unlisted = sorted(set(present) - set(weights))
        if unlisted:
            raise ValueError(
                f"language(s) {unlisted} have labeled data but no entry in language_mix.weights {weights}; "
                "give every language a weight (0 leaves it out)"
            )
        no_data = sorted(k for k, w in weights.items() if w > 0 and k not in present)
        if no_data:
            raise ValueError(
                f"language_mix.weights gives weight to {no_data}, which have no usable labeled data in this stage "
                f"(languages with data: {sorted(present)}); set their weight to 0 or drop them"
            )
        raw = {k: weights[k] for k in present}
    if not any(raw.values()):
        raise ValueError(f"language mix {mix.kind!r} gives no language with data a positive weight (audio {audio_s})")
    return _shares(raw)


def _shares(values: dict[str, float]) -> dict[str, float]:
    """`values` normalized to sum to 1, zeros left out, sorted by key."""
    total = sum(values.values())
    return {k: v / total for k, v in sorted(values.items()) if v > 0}


class DynamicBucketSampler:
    """Batches of utterance indices by padded audio seconds from length-sorted buckets (lhotse-style).

    Each epoch's batch list is a pure function of (seed, epoch), so the state is (epoch, position). Given the
    utterances' `languages`, it also counts the language mix it realizes (`tally`).
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
        languages: Sequence[str] | None = None,
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
        if languages is not None and len(languages) != len(self.durations_s):
            raise ValueError(f"{len(languages)} languages for {len(self.durations_s)} utterances")
        self.languages = list(languages) if languages is not None else None
        # Pooled batches: a language's expected share is its share of the audio (the natural mix).
        self.probabilities = {} if languages is None else _shares(audio_by_language(self.durations_s, languages))
        self.tally = MixTally()

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
                self._count(batch)
                yield batch
            self.epoch += 1
            self.position = 0

    def _count(self, batch: list[int]) -> None:
        if self.languages is not None:
            self.tally.add([self.languages[i] for i in batch], [self.durations_s[i] for i in batch])

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (with the realized mix when it counts one)."""
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.position, "seed": self.seed}
        return state | ({"tally": self.tally.state_dict()} if self.languages is not None else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state."""
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self.tally = MixTally()
        if "tally" in state:
            self.tally.load_state_dict(state["tally"])
        elif self.languages is not None:
            # A checkpoint from before the tally: the batches so far are a pure function of (seed, epoch), so
            # recount them rather than publish a mix of only the resumed part.
            for epoch in range(self.epoch + 1):
                for batch in self._batches(epoch)[: self.position if epoch == self.epoch else None]:
                    self._count(batch)


def _language_seed(seed: int, language: str) -> int:
    """Each language's own batch order, independent of which other languages a stage has."""
    return zlib.crc32(f"{seed}/{language}".encode())


class WeightedDraw:
    """Which of several named sources a batch comes from (languages, or labeled against PL data): the positive
    weights normalized in name order, and the draw of step k a pure function of `seed_of(k)`, so that a resumed
    run draws the same next batches. The one mixer of the language mix and the student's source mix."""

    def __init__(self, weights: dict[str, float], what: str, seed_of: Callable[[int], int]):
        active = {k: float(v) for k, v in sorted(weights.items()) if v > 0}
        if not active:
            raise ValueError(f"no {what} has a positive weight: {weights}")
        total = sum(active.values())
        self.weights = {k: v / total for k, v in active.items()}
        self._cumulative = list(itertools.accumulate(self.weights.values()))
        self._seed_of = seed_of

    def choose(self, step: int) -> str:
        """The source of step `step` (0-based)."""
        u = random.Random(self._seed_of(step)).random()
        names = list(self.weights)
        return names[min(bisect.bisect_right(self._cumulative, u), len(names) - 1)]  # u within rounding of 1.0


class LanguageMixSampler:
    """Batches of one language each: batch n's language drawn with the mixing probabilities from (seed, n), its
    utterances from that language's own `DynamicBucketSampler`. The state is n, each language's position and the
    realized mix (`tally`), so a resumed run draws the same next batches."""

    def __init__(
        self,
        durations_s: Sequence[float],
        languages: Sequence[str],
        probabilities: dict[str, float],
        *,
        max_batch_duration_s: float,
        max_batch_size: int,
        num_buckets: int,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if len(languages) != len(durations_s):
            raise ValueError(f"{len(languages)} languages for {len(durations_s)} utterances")
        self.draw = WeightedDraw(probabilities, "language", lambda step: (seed << 40) + step)
        index: dict[str, list[int]] = {}
        for i, lang in enumerate(languages):
            index.setdefault(lang, []).append(i)
        missing = sorted(set(self.draw.weights) - set(index))
        if missing:
            raise ValueError(f"language(s) {missing} have a mixing probability but no utterances "
                             f"(languages present: {sorted(index)})")
        self.probabilities = self.draw.weights  # configured p_l, sorted by language
        self.durations_s, self.languages = list(durations_s), list(languages)
        self.index = {k: index[k] for k in self.probabilities}  # language -> utterance indices
        self.samplers = {
            k: DynamicBucketSampler([self.durations_s[i] for i in idx], max_batch_duration_s=max_batch_duration_s,
                                    max_batch_size=max_batch_size, num_buckets=num_buckets, shuffle=shuffle,
                                    seed=_language_seed(seed, k))
            for k, idx in self.index.items()
        }
        self.seed = seed
        self.step = 0  # batches drawn so far
        self.tally = MixTally()

    def choose(self, step: int) -> str:
        """The language of batch `step` (0-based): a pure function of (seed, step)."""
        return self.draw.choose(step)

    def __iter__(self) -> Iterator[list[int]]:
        """Endless batches, starting from the saved position."""
        streams = {k: iter(s) for k, s in self.samplers.items()}
        while True:
            lang = self.choose(self.step)
            batch = [self.index[lang][j] for j in next(streams[lang])]
            self.step += 1
            self.tally.add([lang] * len(batch), [self.durations_s[i] for i in batch])
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Resumable state."""
        return {"step": self.step, "seed": self.seed, "tally": self.tally.state_dict(),
                "languages": {k: s.state_dict() for k, s in self.samplers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state.

        Raises:
            ValueError: when the state was saved over other languages.
        """
        if set(state["languages"]) != set(self.samplers):
            raise ValueError(f"the saved sampler mixes languages {sorted(state['languages'])}, this one "
                             f"{sorted(self.samplers)}; resume with the same data and language_mix")
        self.step, self.seed = int(state["step"]), int(state["seed"])
        self.tally = MixTally()
        self.tally.load_state_dict(state["tally"])
        for k, s in self.samplers.items():
            s.load_state_dict(state["languages"][k])


LabeledSampler = DynamicBucketSampler | LanguageMixSampler  # what `labeled_sampler` returns


def labeled_sampler(durations_s: Sequence[float], languages: Sequence[str], batch: BatchConfig, mix: LanguageMix,
                    seed: int) -> LabeledSampler:
    """A training stage's labeled batches: every language pooled (natural, the paper's), else one language per
    batch drawn with the mix.

    Raises:
        ValueError: for mixing weights that do not fit the data's languages (see `mix_probabilities`).
    """
    common = dict(max_batch_duration_s=batch.max_batch_duration_s, max_batch_size=batch.max_batch_size,
                  num_buckets=batch.num_buckets, seed=seed)
    if mix.kind == "natural":
        return DynamicBucketSampler(durations_s, languages=languages, **common)
    probabilities = mix_probabilities(mix, audio_by_language(durations_s, languages))
    return LanguageMixSampler(durations_s, languages, probabilities, **common)


def mix_record(mix: LanguageMix, sampler: LabeledSampler) -> dict[str, Any]:
    """What a stage publishes about its language mix: the kind, the configured and the realized shares."""
    params = {"alpha": mix.alpha} if mix.kind == "temperature" else {}
    return {"kind": mix.kind, **params, "configured": {k: round(v, 4) for k, v in sampler.probabilities.items()},
            **sampler.tally.summary()}


def batch_sampler(durations_s: Sequence[float], batch: BatchConfig, seed: int, shuffle: bool = True):
    """A `DynamicBucketSampler` with a stage's batch settings."""
    return DynamicBucketSampler(durations_s, max_batch_duration_s=batch.max_batch_duration_s,
                                max_batch_size=batch.max_batch_size, num_buckets=batch.num_buckets, shuffle=shuffle,
                                seed=seed)
