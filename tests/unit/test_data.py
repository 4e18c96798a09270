"""Data layer: decode, features, SpecAugment, dynamic batches, tokenizers, rejects."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pipeline.config import AudioPolicy, FeatureConfig, SpecAugmentConfig
from pipeline.data.audio import AudioError, load_audio, log_mel, num_frames, spec_augment
from pipeline.data.dataset import collate, load_dataset
from pipeline.data.samplers import DynamicBucketSampler
from pipeline.data.text import normalize_text
from pipeline.data.tokenizer import CharTokenizer, SentencePieceTokenizer, tokenizer_from_dict
from storage.files import resolve_relative
from storage.manifest import read_manifest, write_manifest
from tests.helpers.dummies import bad_rows, good_row, tone, write_flac, write_jsonl

SENTENCES = {
    "es": "¿Dónde está el menú «Formato»? Haga clic, por favor.",
    "el": "Πατήστε το κουμπί «Εντάξει» για να συνεχίσετε.",
    "sl": "Izberite ukaz Vstavi – Slika, nato pritisnite tipko Enter.",
    "de": "Öffnen Sie das Dialogfeld „Schriftart“ über das Menü.",
}


def test_clip_decodes_as_16k_mono_of_stated_duration(tmp_path):
    path = write_flac(tmp_path / "a.flac", tone(2.5, sr=22050), sr=22050)
    wav = load_audio(path, AudioPolicy())
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert abs(wav.numel() / 16000 - 2.5) < 1e-3


def test_downmix_policy_turns_stereo_into_mono(tmp_path):
    path = write_flac(tmp_path / "st.flac", tone(1.0, channels=2))
    with pytest.raises(AudioError, match="2 channels"):
        load_audio(path, AudioPolicy())
    wav = load_audio(path, AudioPolicy(downmix_multichannel=True))
    assert wav.shape == (16000,)


def test_fbank_shape_and_per_utterance_normalization():
    cfg = FeatureConfig()
    wav = torch.from_numpy(tone(3.0))
    feats = log_mel(wav, cfg)
    # 25 ms window, 10 ms hop, no centering: (48000 - 400) // 160 + 1 frames.
    assert feats.shape == (num_frames(48000, cfg), 80) == (298, 80)
    assert torch.allclose(feats.mean(dim=0), torch.zeros(80), atol=1e-4)
    assert torch.allclose(feats.std(dim=0), torch.ones(80), atol=1e-2)


def test_spec_augment_masks_stay_within_configured_widths():
    torch.manual_seed(0)
    feats = torch.randn(300, 80) + 5.0  # nothing is zero before masking
    cfg = SpecAugmentConfig(freq_masks=2, freq_mask_width=10, time_masks=2, time_mask_width=30)
    masked_freq_counts, masked_time_counts = [], []
    for _ in range(50):
        out = spec_augment(feats, cfg)
        assert out.shape == feats.shape
        zero = out == 0
        full_cols = zero.all(dim=0)  # frequency bins masked across all frames
        full_rows = zero.all(dim=1)  # frames masked across all bins
        masked_freq_counts.append(int(full_cols.sum()))
        masked_time_counts.append(int(full_rows.sum()))
        assert int(full_cols.sum()) <= 2 * 10
        assert int(full_rows.sum()) <= 2 * 30
        # Unmasked values are untouched.
        keep = ~zero
        assert torch.equal(out[keep], feats[keep])
    assert max(masked_freq_counts) > 0 and max(masked_time_counts) > 0
    off = spec_augment(feats, SpecAugmentConfig(freq_masks=0, time_masks=0))
    assert torch.equal(off, feats)


def test_dynamic_batches_respect_budget_and_pad_little():
    rng = random.Random(0)
    durations = [rng.uniform(2.0, 6.0) for _ in range(500)]
    sampler = DynamicBucketSampler(durations, max_batch_duration_s=60.0, max_batch_size=12, num_buckets=10, seed=3)
    batches = sampler.epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(500))  # every utterance once per epoch
    padded = real = 0.0
    for b in batches:
        longest = max(durations[i] for i in b)
        assert len(b) * longest <= 60.0 and len(b) <= 12
        padded += len(b) * longest
        real += sum(durations[i] for i in b)
    assert 1 - real / padded < 0.10  # length-sorted buckets keep padding under 10 %
    assert batches != sampler.epoch_batches(1)  # a new shuffle every epoch


def test_sampler_state_restores_the_same_stream():
    durations = [2.0 + (i % 17) * 0.25 for i in range(200)]
    kwargs = dict(max_batch_duration_s=30.0, max_batch_size=8, num_buckets=5, seed=7)
    orig = DynamicBucketSampler(durations, **kwargs)
    it = iter(orig)
    for _ in range(37):  # crosses an epoch boundary
        next(it)
    state = orig.state_dict()
    expected = [next(it) for _ in range(20)]
    restored = DynamicBucketSampler(durations, **kwargs)
    restored.load_state_dict(state)
    it2 = iter(restored)
    assert [next(it2) for _ in range(20)] == expected


def test_sampler_rejects_a_budget_below_the_longest_clip():
    with pytest.raises(ValueError, match="exceed max_batch_duration_s"):
        DynamicBucketSampler([1.0, 50.0], max_batch_duration_s=20.0, max_batch_size=4, num_buckets=1)


@pytest.mark.parametrize("kind", ["char", "sentencepiece"])
def test_tokenizer_round_trip_on_every_script(kind):
    texts = list(SENTENCES.values()) * 3
    tok = CharTokenizer.train(texts) if kind == "char" else SentencePieceTokenizer.train(texts, vocab_size=60)
    tok = tokenizer_from_dict(tok.to_dict())  # survives serialization
    for text in SENTENCES.values():
        ids = tok.encode(text)
        assert tok.blank_id not in ids
        assert tok.decode(ids) == text


def test_char_tokenizer_maps_unseen_characters_to_unk():
    tok = CharTokenizer.train(["abc"])
    assert tok.decode(tok.encode("abz")) == "ab\u2047"
    assert normalize_text("Ab, ζ!") == "ab ζ"


def test_collate_pads_and_keeps_languages(tmp_path):
    rows = [good_row(tmp_path, f"u{i}", lang, duration_s=1.0 + i) for i, lang in enumerate(["es", "el", "es"])]
    url = write_jsonl(tmp_path / "m.jsonl", rows)
    ds = load_dataset(url, features=FeatureConfig(), policy=AudioPolicy(), require_text=True)
    tok = CharTokenizer.train([u.text for u in ds.utterances])
    b = collate(ds.utterances, ds.features, tokenizer=tok, language_ids={"el": 0, "es": 1})
    assert b.feats.shape[0] == 3 and b.feats.shape[2] == 80
    assert b.feat_lens.tolist() == [ds.features[u].shape[0] for u in b.ids]
    assert b.lang_ids.tolist() == [1, 0, 1]
    assert tok.decode(b.targets[0, : b.target_lens[0]].tolist()) == "hola mundo"


def test_every_kind_of_bad_row_becomes_a_reject_with_a_reason(tmp_path):
    good = [good_row(tmp_path, f"ok{i}") for i in range(3)]
    bad = bad_rows(tmp_path)
    dup = dict(good[0])  # duplicate id
    url = tmp_path / "m.jsonl"
    write_jsonl(url, good + list(bad.values()) + [dup])
    with open(url, "ab") as f:  # a line that is not UTF-8
        f.write(b'{"id": "latin1", "text": "ni\xf1o", "language": "es", "audio": "x.flac"}\n')
    ds = load_dataset(str(url), features=FeatureConfig(), policy=AudioPolicy(), require_text=True,
                      languages=["es", "el"])
    assert [u.id for u in ds.utterances] == ["ok0", "ok1", "ok2"]
    reasons = {r.id: r.reason for r in ds.rejects}
    for kind, row in bad.items():
        assert kind in reasons[row["id"]], (kind, reasons[row["id"]])
    assert any("duplicate id 'ok0'" in r for r in reasons.values())
    assert any("not valid UTF-8" in r for r in reasons.values())
    # Nothing silently vanishes: every input line is either kept or rejected.
    assert len(ds.utterances) + len(ds.rejects) == len(good) + len(bad) + 2


def test_manifest_round_trip_jsonl_and_parquet(tmp_path):
    rows = [{"id": "a", "audio": "x.flac", "duration_s": 1.5, "language": "el", "text": "Γειά σου"}]
    for name in ("m.jsonl", "m.parquet"):
        url = str(tmp_path / name)
        write_manifest(url, rows)
        back, rejects = read_manifest(url)  # the relative audio path comes back against the manifest's folder
        assert back == [rows[0] | {"audio": str(tmp_path / "x.flac")}] and rejects == []
    write_manifest("memory://manifests/m.jsonl", rows)  # any fsspec URL
    assert read_manifest("memory://manifests/m.jsonl")[0] == [rows[0] | {"audio": "memory://manifests/x.flac"}]


def test_char_tokenizer_round_trips_every_transcript_of_the_corpus(smoke_corpus):
    rows, _ = read_manifest(f"{smoke_corpus}/manifests/labeled.jsonl")
    tok = tokenizer_from_dict(CharTokenizer.train([r["text"] for r in rows]).to_dict())
    assert {r["language"] for r in rows} == {"es", "el", "sl"}
    assert any("\u0370" <= ch <= "\u03ff" for ch in tok.symbols)  # Greek letters are in the vocabulary
    for r in rows:
        assert tok.decode(tok.encode(r["text"])) == r["text"]


def test_language_codes_are_normalized_and_bad_ones_rejected(tmp_path):
    rows = [good_row(tmp_path, "a", "es"), good_row(tmp_path, "b", "ES"), good_row(tmp_path, "c", " pt_BR "),
            good_row(tmp_path, "d", "spanish language")]
    url = write_jsonl(tmp_path / "m.jsonl", rows)
    ds = load_dataset(url, features=FeatureConfig(), policy=AudioPolicy(), require_text=True)
    assert [(u.id, u.language) for u in ds.utterances] == [("a", "es"), ("b", "es"), ("c", "pt-br")]
    assert ds.languages() == ["es", "pt-br"]  # "ES" never becomes a language of its own
    assert "not a language code" in {r.id: r.reason for r in ds.rejects}["d"]
    only = load_dataset(url, features=FeatureConfig(), policy=AudioPolicy(), require_text=True, languages=["ES"],
                        language="es")
    assert [u.id for u in only.utterances] == ["a", "b"]
    # pt-BR is unknown to this stage's languages and "d" is no language code: no other stage would report them.
    assert [r.id for r in only.rejects] == ["c", "d"]
    assert [r.id for r in load_dataset(url, features=FeatureConfig(), policy=AudioPolicy(), require_text=True,
                                       languages=["es", "pt-br"], language="pt-br").rejects] == ["d"]


def test_relative_audio_paths_resolve_against_the_manifest_so_a_corpus_folder_can_move(smoke_corpus, tmp_path,
                                                                                       monkeypatch):
    import shutil

    from pipeline.data.rows import read_utterances

    raw = (Path(smoke_corpus) / "manifests/labeled.jsonl").read_text().splitlines()
    assert json.loads(raw[0])["audio"].startswith("../audio/labeled/")  # the corpus writes relative paths
    moved = tmp_path / "moved"
    shutil.copytree(smoke_corpus, moved)
    monkeypatch.chdir(tmp_path)  # neither the old folder nor the working directory may matter
    utts, rejects = read_utterances("moved/manifests/labeled.jsonl", require_text=True, languages=None)
    assert utts and not rejects
    assert all(u.audio.startswith(str(moved / "audio/labeled")) and Path(u.audio).exists() for u in utts)
    rows, _ = read_manifest(str(moved / "manifests/labeled.jsonl"))
    write_manifest(str(tmp_path / "elsewhere/copy.jsonl"), rows)  # resolved rows stay valid when copied
    again, _ = read_manifest(str(tmp_path / "elsewhere/copy.jsonl"))
    assert [r["audio"] for r in again] == [r["audio"] for r in rows]
    assert resolve_relative("../audio/x.flac", "s3://bucket/c/manifests/m.jsonl") == "s3://bucket/c/audio/x.flac"
    assert resolve_relative("s3://b/x.flac", "/m/m.jsonl") == "s3://b/x.flac"
    assert resolve_relative("/abs/x.flac", "s3://b/m.jsonl") == "/abs/x.flac"


def test_a_labeled_share_keeps_the_first_rows_of_each_language_in_order():
    from pipeline.data.rows import labeled_share

    rows = ([{"id": f"es{i}", "language": "es"} for i in range(150)] + [{"id": f"sl{i}", "language": "SL"}
                                                                          for i in range(30)])
    rows.insert(5, {"id": "nolang"})  # no language: kept, for the stages to reject with the reason
    kept, counts = labeled_share(rows, 1 / 3)
    assert counts == {"es": {"kept": 50, "of": 150}, "sl": {"kept": 10, "of": 30}}
    assert [r["id"] for r in kept] == ([f"es{i}" for i in range(5)] + ["nolang"] + [f"es{i}" for i in range(5, 50)]
                                       + [f"sl{i}" for i in range(10)])
    assert len(labeled_share(rows, 0.001)[0]) == 3  # every language keeps at least one row
    # 0.34 · 150 is a hair over 51 in floats: still 51 rows, not 52
    assert labeled_share([{"language": "es"}] * 150, 0.34)[1] == {"es": {"kept": 51, "of": 150}}
    assert labeled_share(rows, 1.0)[0] == rows


def test_a_written_labeled_share_points_at_the_corpus_audio_from_the_run_folder(smoke_corpus, tmp_path, monkeypatch):
    import shutil

    from pipeline.data.rows import read_utterances, write_labeled_share

    corpus = tmp_path / "corpus"
    shutil.copytree(smoke_corpus, corpus)
    source = corpus / "manifests/labeled.jsonl"
    source.write_text(source.read_text() + "{not json\n")
    monkeypatch.chdir(tmp_path)
    share = write_labeled_share("corpus/manifests/labeled.jsonl", "run/manifests/labeled.jsonl", 0.5)
    assert share["languages"] == {"el": {"kept": 20, "of": 40}, "es": {"kept": 20, "of": 40},
                                  "sl": {"kept": 6, "of": 12}}
    assert [r["reason"] for r in share["unreadable_source_lines"]] == ["line is not valid JSON (Expecting property "
                                                                       "name enclosed in double quotes)"]
    first = json.loads((tmp_path / "run/manifests/labeled.jsonl").read_text().splitlines()[0])
    assert first["audio"].startswith("../../corpus/audio/labeled/")  # relative: run and corpus move together
    shutil.move(tmp_path / "run", tmp_path / "moved/run")
    shutil.move(tmp_path / "corpus", tmp_path / "moved/corpus")
    utts, rejects = read_utterances("moved/run/manifests/labeled.jsonl", require_text=True, languages=None)
    assert len(utts) == 46 and not rejects and all(Path(u.audio).exists() for u in utts)
    everything, _ = read_utterances("moved/corpus/manifests/labeled.jsonl", require_text=True, languages=None)
    by_lang = {}
    for u in everything:
        by_lang.setdefault(u.language, []).append(u.id)
    assert [u.id for u in utts] == [i for ids in by_lang.values() for i in ids[:len(ids) // 2]]
