"""Language mixing of labeled batches (issue 16 item 4): natural pooling as before, temperature and explicit
weights drawing one language per batch, deterministic resume, the realized mix counted and published."""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pipeline.config import BatchConfig, LanguageMix, supervised_tiny
from pipeline.data.samplers import (
    DynamicBucketSampler,
    LanguageMixSampler,
    audio_by_language,
    labeled_sampler,
    mix_probabilities,
    mix_record,
)
from pipeline.stages.student import SourceMixer, source_mix
from tests.helpers.dummies import good_row, write_jsonl

BATCH = BatchConfig(max_batch_duration_s=30.0, max_batch_size=8, num_buckets=4)
N_DRAWS = 20000


def _data(sizes: dict[str, int], seed: int = 0) -> tuple[list[float], list[str]]:
    """Utterances of each language in shuffled order, 0.5-6 s long."""
    rng = random.Random(seed)
    langs = [lang for lang, n in sizes.items() for _ in range(n)]
    rng.shuffle(langs)
    return [round(rng.uniform(0.5, 6.0), 2) for _ in langs], langs


def _tolerance(p: float, n: int) -> float:
    """4.5 binomial standard deviations: a correct sampler fails this less than once in 10^5 per share."""
    return 4.5 * math.sqrt(p * (1 - p) / n)


def _old_epoch(durations: list[float], batch: BatchConfig, seed: int, epoch: int) -> list[list[int]]:
    """The labeled batches of one epoch as the sampler drew them before language mixing (frozen copy)."""
    rng = random.Random(seed * 100003 + epoch)
    order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
    size = math.ceil(len(order) / batch.num_buckets)
    batches: list[list[int]] = []
    for b in range(0, len(order), size):
        bucket = order[b : b + size]
        rng.shuffle(bucket)
        cur: list[int] = []
        longest = 0.0
        for i in bucket:
            d = durations[i]
            if cur and ((len(cur) + 1) * max(longest, d) > batch.max_batch_duration_s
                        or len(cur) >= batch.max_batch_size):
                batches.append(cur)
                cur, longest = [], 0.0
            cur.append(i)
            longest = max(longest, d)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def _roundtrip(state: dict) -> dict:
    """The state as last.pt holds it (torch.save, loaded with weights_only=True)."""
    buf = io.BytesIO()
    torch.save(copy.deepcopy(state), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- configured probabilities ------------------------------------------------------------------------------------

def test_temperature_probabilities_follow_audio_seconds_to_the_power_alpha():
    audio = {"es": 3600.0, "sl": 400.0, "el": 100.0}
    p = mix_probabilities(LanguageMix(kind="temperature", alpha=0.5), audio)
    assert p == pytest.approx({"el": 10 / 90, "es": 60 / 90, "sl": 20 / 90})  # sqrt: 60, 20, 10
    assert mix_probabilities(LanguageMix(kind="temperature", alpha=1.0), audio) == pytest.approx(
        {k: v / 4100 for k, v in audio.items()})
    assert mix_probabilities(LanguageMix(), audio) == pytest.approx({k: v / 4100 for k, v in audio.items()})


def test_explicit_weights_are_normalized_and_a_zero_weight_leaves_a_language_out():
    mix = LanguageMix(kind="weights", weights={"ES": 1, "sl": 3, "el": 0})
    assert mix_probabilities(mix, {"es": 10.0, "sl": 1.0, "el": 5.0}) == {"es": 0.25, "sl": 0.75}


# --- realized mix over a long stream ---------------------------------------------------------------------------

@pytest.mark.parametrize("mix", [LanguageMix(kind="temperature", alpha=0.5),
                                 LanguageMix(kind="weights", weights={"es": 1.0, "sl": 2.0, "el": 1.0})])
def test_realized_batch_shares_match_the_configured_mix_over_a_long_stream(mix):
    durations, langs = _data({"es": 400, "sl": 60, "el": 15})
    sampler = labeled_sampler(durations, langs, BATCH, mix, seed=7)
    assert isinstance(sampler, LanguageMixSampler)
    expected = mix_probabilities(mix, audio_by_language(durations, langs))
    assert sampler.probabilities == pytest.approx(expected)
    counts = {lang: 0 for lang in expected}
    audio = {lang: 0.0 for lang in expected}
    for batch in itertools.islice(sampler, N_DRAWS):
        batch_langs = {langs[i] for i in batch}
        assert len(batch_langs) == 1, batch_langs  # one language per batch
        assert len(batch) <= BATCH.max_batch_size
        assert len(batch) * max(durations[i] for i in batch) <= BATCH.max_batch_duration_s
        (lang,) = batch_langs
        counts[lang] += 1
        audio[lang] += sum(durations[i] for i in batch)
    for lang, p in expected.items():
        assert abs(counts[lang] / N_DRAWS - p) <= _tolerance(p, N_DRAWS), (lang, counts, expected)
    # The tally the stage publishes counts exactly what was drawn.
    record = mix_record(mix, sampler)
    assert record["kind"] == mix.kind and record["batches"] == N_DRAWS
    assert {k: v["batches"] for k, v in record["realized"].items()} == counts
    assert {k: v["audio_s"] for k, v in record["realized"].items()} == pytest.approx(audio, abs=0.1)
    assert record["configured"] == pytest.approx(expected, abs=1e-4)
    # Up-sampling works: el holds 3 % of the audio, yet gets a much larger share of the batches.
    natural = audio_by_language(durations, langs)
    assert counts["el"] / N_DRAWS > 3 * natural["el"] / sum(natural.values())


def test_within_a_language_every_utterance_is_drawn_once_per_pass():
    durations, langs = _data({"es": 120, "sl": 30})
    sampler = labeled_sampler(durations, langs, BATCH, LanguageMix(kind="temperature"), seed=1)
    sl_pass = len(sampler.samplers["sl"].epoch_batches(0))
    seen = []
    for batch in sampler:
        if langs[batch[0]] == "sl":
            seen.append(batch)
        if len(seen) == sl_pass:
            break
    assert sorted(i for b in seen for i in b) == [i for i, lang in enumerate(langs) if lang == "sl"]


def test_the_language_draw_depends_on_the_seed():
    durations, langs = _data({"es": 50, "sl": 50})
    draws = [labeled_sampler(durations, langs, BATCH, LanguageMix(kind="temperature"), seed=s) for s in (0, 1)]
    first, second = ([langs[b[0]] for b in itertools.islice(s, 200)] for s in draws)
    assert first != second


# --- natural: the batches of before ----------------------------------------------------------------------------

def test_natural_mix_draws_exactly_the_batches_of_the_pooled_sampler():
    durations, langs = _data({"es": 90, "sl": 40, "el": 7})
    sampler = labeled_sampler(durations, langs, BATCH, supervised_tiny("train.jsonl").language_mix, seed=5)
    assert isinstance(sampler, DynamicBucketSampler)
    reference = [b for epoch in range(3) for b in _old_epoch(durations, BATCH, 5, epoch)]
    assert list(itertools.islice(sampler, len(reference))) == reference
    assert (sampler.epoch, sampler.position) == (2, len(_old_epoch(durations, BATCH, 5, 2)))
    # Three whole epochs: every utterance three times, so the realized audio share is the natural one exactly.
    record = mix_record(LanguageMix(), sampler)
    natural = audio_by_language(durations, langs)
    assert {k: v["audio_s"] for k, v in record["realized"].items()} == pytest.approx(
        {k: 3 * v for k, v in natural.items()}, abs=0.1)
    assert {k: v["utterances"] for k, v in record["realized"].items()} == {"el": 21, "es": 270, "sl": 120}


# --- resume ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mix", [LanguageMix(), LanguageMix(kind="temperature", alpha=0.3),
                                 LanguageMix(kind="weights", weights={"es": 1.0, "sl": 1.0})])
def test_a_restored_sampler_draws_the_same_next_batches_and_keeps_counting(mix):
    durations, langs = _data({"es": 80, "sl": 25})
    straight = labeled_sampler(durations, langs, BATCH, mix, seed=11)
    stream = iter(straight)
    before = list(itertools.islice(stream, 137))  # 137: past several epochs of the small language
    state = _roundtrip(straight.state_dict())
    after = list(itertools.islice(stream, 300))
    restored = labeled_sampler(durations, langs, BATCH, mix, seed=11)
    restored.load_state_dict(state)
    assert list(itertools.islice(restored, 300)) == after
    assert restored.tally.state_dict() == straight.tally.state_dict()
    assert mix_record(mix, restored)["batches"] == len(before) + len(after)


def test_a_pooled_sampler_state_without_counts_recounts_the_batches_already_drawn():
    durations, langs = _data({"es": 60, "sl": 20})
    straight = labeled_sampler(durations, langs, BATCH, LanguageMix(), seed=2)
    list(itertools.islice(straight, 53))
    old = {k: v for k, v in straight.state_dict().items() if k != "tally"}  # a checkpoint from before the tally
    restored = labeled_sampler(durations, langs, BATCH, LanguageMix(), seed=2)
    restored.load_state_dict(old)
    assert restored.tally.batches == 53
    assert restored.tally.summary() == straight.tally.summary()


def test_a_state_saved_over_other_languages_is_refused():
    durations, langs = _data({"es": 30, "sl": 30})
    mix = LanguageMix(kind="temperature")
    state = labeled_sampler(durations, langs, BATCH, mix, seed=0).state_dict()
    other = labeled_sampler(durations, ["es" if x == "sl" else "el" for x in langs], BATCH, mix, seed=0)
    with pytest.raises(ValueError, match=r"saved sampler mixes languages \['es', 'sl'\]"):
        other.load_state_dict(state)


# --- bad configs and bad weights -------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"kind": "weights"}, "needs language_mix.weights"),
    ({"kind": "weights", "weights": {"es": -1.0, "sl": 1.0}}, "must be a finite number >= 0"),
    ({"kind": "weights", "weights": {"es": float("nan")}}, "must be a finite number >= 0"),
    ({"kind": "weights", "weights": {"es": 0.0, "sl": 0.0}}, "at least one weight must be above 0"),
    ({"kind": "weights", "weights": {"spanish!": 1.0}}, "must be language codes"),
    ({"kind": "weights", "weights": {"es": 1.0, "ES": 2.0}}, "name a language twice"),
    ({"kind": "temperature", "weights": {"es": 1.0}}, 'only read with kind="weights"'),
    ({"kind": "temperature", "alpha": 0.0}, "greater than 0"),
    ({"kind": "temperature", "alpha": 1.5}, "less than or equal to 1"),
    ({"kind": "uniform"}, "'natural', 'temperature' or 'weights'"),
])
def test_a_bad_mix_config_is_refused_with_the_fix(fields, message):
    with pytest.raises(ValidationError, match=message):
        LanguageMix(**fields)


def test_weights_that_leave_out_a_language_with_data_name_it():
    durations, langs = _data({"es": 20, "sl": 20, "el": 5})
    with pytest.raises(ValueError, match=r"language\(s\) \['el'\] have labeled data but no entry"):
        labeled_sampler(durations, langs, BATCH, LanguageMix(kind="weights", weights={"es": 1, "sl": 1}), seed=0)


def test_weights_on_a_language_without_data_name_it():
    durations, langs = _data({"es": 20, "sl": 20})
    mix = LanguageMix(kind="weights", weights={"es": 1, "sl": 1, "pt-br": 2})
    with pytest.raises(ValueError, match=r"gives weight to \['pt-br'\], which have no usable labeled data"):
        labeled_sampler(durations, langs, BATCH, mix, seed=0)


def test_the_stage_config_carries_the_mix_and_refuses_a_bad_one():
    cfg = supervised_tiny("train.jsonl", language_mix={"kind": "temperature", "alpha": 0.3})
    assert cfg.language_mix == LanguageMix(kind="temperature", alpha=0.3)
    assert supervised_tiny("train.jsonl").language_mix.kind == "natural"
    assert cfg.resume_key() != supervised_tiny("train.jsonl").resume_key()  # another mix trains other batches
    with pytest.raises(ValidationError, match="needs language_mix.weights"):
        supervised_tiny("train.jsonl", language_mix={"kind": "weights"})


# --- the student's sources ---------------------------------------------------------------------------------------

def test_the_realized_source_mix_matches_the_source_weights():
    mixer = SourceMixer({"labeled": 1.0, "pl": 3.0}, seed=4)
    rng = random.Random(0)
    history = [{"kind": mixer.choose(step), "audio_s": rng.uniform(10, 60)} for step in range(N_DRAWS)]
    record = source_mix(history, mixer.weights)
    assert record["configured"] == {"labeled": 0.25, "pl": 0.75} and record["batches"] == N_DRAWS
    for source, p in mixer.weights.items():
        assert abs(record["realized"][source]["batch_share"] - p) <= _tolerance(p, N_DRAWS)
    pl_s = sum(h["audio_s"] for h in history if h["kind"] == "pl")
    assert record["realized"]["pl"]["audio_s"] == pytest.approx(pl_s, abs=0.1)
    assert record["realized"]["pl"]["audio_share"] == pytest.approx(pl_s / sum(h["audio_s"] for h in history),
                                                                    abs=1e-4)


# --- published by the stages -------------------------------------------------------------------------------------

def test_the_supervised_and_student_stages_publish_the_realized_mix_and_resume_it(tmp_path, caplog):
    from pipeline.config import student_tiny
    from pipeline.stages.student import run_student
    from pipeline.stages.supervised import run_supervised

    rows = [good_row(tmp_path, f"{lang}{i}", lang, text, 1.0)
            for lang, text, n in (("es", "hola", 6), ("sl", "dober dan", 2)) for i in range(n)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    mix = {"kind": "weights", "weights": {"es": 1.0, "sl": 1.0}}
    quick = dict(max_updates=6, save_every=3, log_every=3, num_threads=1,
                 batch={"max_batch_duration_s": 4.0, "max_batch_size": 2, "num_buckets": 1}, language_mix=mix)
    cfg = supervised_tiny(train, None, audio={"max_duration_s": 4.0}, **quick)
    run = str(tmp_path / "run")
    caplog.set_level("INFO", logger="mlpl.stage")
    first = run_supervised(cfg, run, stop_after=3)  # as if killed after update 3
    assert first.extra["language_mix"]["batches"] == 3
    result = run_supervised(cfg, run)
    published = json.loads(Path(run, "supervised", "result.json").read_text())["extra"]["language_mix"]
    assert published == result.extra["language_mix"]
    assert published["kind"] == "weights" and published["configured"] == {"es": 0.5, "sl": 0.5}
    assert published["batches"] == 6  # counted over both runs
    assert sum(v["batches"] for v in published["realized"].values()) == 6
    assert sum(v["utterances"] for v in published["realized"].values()) >= 6
    assert any("language mix weights configured" in r.getMessage() for r in caplog.records)

    student = student_tiny("finetune", train, None, init_checkpoint=result.last_checkpoint, labeled_only=True,
                           **quick | {"max_updates": 4})
    extra = run_student(student, run).extra
    assert extra["source_mix"]["configured"] == {"labeled": 1.0}
    assert extra["source_mix"]["realized"]["labeled"]["batches"] == 4
    assert extra["language_mix"]["batches"] == 4 and extra["language_mix"]["configured"] == {"es": 0.5, "sl": 0.5}
