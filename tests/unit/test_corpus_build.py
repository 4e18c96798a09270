"""Tests of the mini multilingual corpus builder (pipeline/corpus/build.py) on the `smoke` preset.

The smoke corpus is built once per session (tests/conftest.py: Debian text from the cache, espeak-ng,
channel); a second build with two workers checks that the output is byte-identical whatever the parallelism.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf

from pipeline.corpus.build import (
    SPLITS,
    CorpusConfig,
    allocate_sentences,
    build_corpus,
    corpus_preset,
    draw_speakers,
    smoke,
)
from pipeline.corpus.speech import VOICE_VARIANTS
from pipeline.corpus.text import clean_sentence
from pipeline.data.text import normalize_text
from storage.manifest import read_manifest


def _read_jsonl(path: Path) -> list[dict]:
    rows, rejects = read_manifest(str(path))  # audio paths resolved against the manifest's folder
    assert not rejects
    return rows


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the card (which records absolute paths)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith("corpus_card"):
            data = path.read_bytes().replace(str(root).encode(), b"<ROOT>")
            out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def _tiny(**update) -> CorpusConfig:
    base = smoke().model_dump()
    base.update(
        labeled_clips_high=2,
        labeled_clips_low=1,
        unlabeled_clips_high=0,
        unlabeled_clips_low=0,
        dev_clips=1,
        test_clips=1,
        ood_short_clips=0,
        ood_long_clips=0,
    )
    base.update(update)
    return CorpusConfig(**base)


@pytest.fixture(scope="module")
def smoke_dir(smoke_corpus) -> Path:
    return Path(smoke_corpus)  # built once per session by tests/conftest.py


@pytest.fixture(scope="module")
def manifests(smoke_dir) -> dict[str, list[dict]]:
    rows = {s: _read_jsonl(smoke_dir / "manifests" / f"{s}.jsonl") for s in SPLITS}
    rows["reference"] = _read_jsonl(smoke_dir / "hidden" / "unlabeled_reference.jsonl")
    return rows


def test_same_seed_is_byte_identical_whatever_the_worker_count(smoke_dir, tmp_path):
    again = tmp_path / "again"
    build_corpus(smoke().model_copy(update={"num_workers": 2}), str(again))
    first, second = _tree_digest(smoke_dir), _tree_digest(again)
    assert len(first) > 60
    assert first == second


def test_different_seed_gives_different_corpus(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    calls = []
    build_corpus(_tiny(seed=0), str(a), on_progress=lambda done, total, desc: calls.append((done, total, desc)))
    assert [c[0] for c in calls] == list(range(1, 12)) and calls[-1][1] == 11  # 2+2+1 labeled, 3 dev, 3 test
    build_corpus(_tiny(seed=1), str(b))
    da, db = _tree_digest(a), _tree_digest(b)
    assert da.keys() == db.keys()
    audio = [k for k in da if k.endswith(".flac")]
    assert audio and all(da[k] != db[k] for k in audio)
    texts_a = {r["text"] for r in _read_jsonl(a / "manifests" / "labeled.jsonl")}
    texts_b = {r["text"] for r in _read_jsonl(b / "manifests" / "labeled.jsonl")}
    assert texts_a != texts_b


def test_rebuild_of_complete_corpus_returns_card_without_work(smoke_dir):
    calls = []
    card = build_corpus(smoke(), str(smoke_dir), on_progress=lambda *a: calls.append(a))
    assert calls == []
    assert card["name"] == "smoke"


def test_killed_build_resumes_clip_by_clip(smoke_dir, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(smoke_dir, resumed)
    audio = sorted((resumed / "audio").rglob("*.flac"))
    assert len(audio) > 60 and all(p.with_suffix(".json").exists() for p in audio)
    # A killed build: no card or manifests yet, a few clips not made (one has its flac but no sidecar).
    for path in [resumed / "corpus_card.json", resumed / "corpus_card.md", *(resumed / "manifests").iterdir()]:
        path.unlink()
    (resumed / "hidden" / "unlabeled_reference.jsonl").unlink()
    missing = [audio[0], audio[25], audio[-1]]
    missing[0].unlink()
    missing[1].with_suffix(".json").unlink()
    missing[2].unlink()
    missing[2].with_suffix(".json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in audio if p not in missing}
    calls = []
    card = build_corpus(smoke(), str(resumed), on_progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, len(audio) + 1))
    assert [c[2] for c in calls[: len(kept)]] == ["reused"] * len(kept)
    assert all(c[2] != "reused" for c in calls[len(kept) :])
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # untouched clips were not rewritten
    assert _tree_digest(resumed) == _tree_digest(smoke_dir)
    fresh = json.loads((smoke_dir / "corpus_card.json").read_text(encoding="utf-8"))
    assert json.loads(json.dumps(card).replace(str(resumed), str(smoke_dir))) == fresh
    md = (resumed / "corpus_card.md").read_text(encoding="utf-8")
    assert md == (smoke_dir / "corpus_card.md").read_text(encoding="utf-8")


def test_changed_config_does_not_reuse_stale_clips(tmp_path):
    out = tmp_path / "out"
    build_corpus(_tiny(seed=0), str(out))
    gone = out / "audio" / "labeled" / "es" / "es-labeled-000001"
    assert gone.with_suffix(".flac").exists() and gone.with_suffix(".json").exists()
    calls = []
    build_corpus(_tiny(seed=0, labeled_clips_high=1), str(out), on_progress=lambda *a: calls.append(a))
    assert len(calls) == 9 and all(c[2] == "reused" for c in calls)  # one labeled clip less: the rest stays
    assert not gone.with_suffix(".flac").exists() and not gone.with_suffix(".json").exists()
    calls.clear()
    build_corpus(_tiny(seed=1, labeled_clips_high=1), str(out), on_progress=lambda *a: calls.append(a))
    assert len(calls) == 9 and all(c[2] != "reused" for c in calls)  # another seed: every clip is made again
    files = sorted(p.relative_to(out / "audio") for p in (out / "audio").rglob("*.*"))
    rows = [r for s in SPLITS for r in _read_jsonl(out / "manifests" / f"{s}.jsonl")]
    assert len(files) == 2 * len(rows) == 18


def test_splits_have_disjoint_sentences_and_speakers(manifests):
    sentences = {s: {r["text_normalized"] for r in manifests[s]} for s in ("labeled", "dev", "test", "ood_short")}
    sentences["unlabeled"] = {normalize_text(t) for r in manifests["reference"] for t in r["sentences"]}
    sentences["ood_long"] = {r["text_normalized"] for r in manifests["ood_long"]}  # whole clips: several sentences
    speakers = {s: {r["speaker"] for r in manifests[s]} for s in SPLITS}
    assert manifests["ood_short"] and manifests["ood_long"]
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not sentences[a] & sentences[b], (a, b)
            if {a, b} != {"ood_short", "ood_long"}:  # the out-of-domain clips share their own speakers
                assert not speakers[a] & speakers[b], (a, b)
    for split in ("labeled", "dev", "test"):
        assert len(sentences[split]) == len(manifests[split])  # no sentence twice within a split


def test_clips_decode_as_16k_mono_with_stated_duration(manifests):
    for split in SPLITS:
        low, high = (20.0, 30.0) if split in ("unlabeled", "ood_long") else (2.0, 6.0)
        for row in manifests[split]:
            assert low <= row["duration_s"] <= high, row
            assert "." not in row["id"] and row["audio"].endswith(f"/{split}/{row['language']}/{row['id']}.flac")
        for row in manifests[split][:3]:
            audio, rate = sf.read(row["audio"], dtype="int16")
            assert rate == 16000 and audio.ndim == 1
            assert abs(len(audio) / 16000 - row["duration_s"]) <= 0.001
            assert audio.std() > 100  # speech plus noise, not silence


def test_clip_counts_follow_the_preset(manifests):
    cfg = smoke()
    for split in SPLITS:
        per_lang = Counter(r["language"] for r in manifests[split])
        for lang in cfg.languages:
            assert per_lang[lang] == cfg.clips(split, cfg.role(lang)), (split, lang)


def test_unlabeled_has_no_text_and_reference_covers_it(manifests):
    unlabeled = manifests["unlabeled"]
    assert unlabeled and all(set(r) == {"id", "audio", "duration_s", "language", "speaker"} for r in unlabeled)
    reference = {r["id"]: r for r in manifests["reference"]}
    assert set(reference) == {r["id"] for r in unlabeled}
    for ref in reference.values():
        assert 4 <= len(ref["sentences"]) <= 8
        assert ref["text"] == " ".join(ref["sentences"])
        assert ref["text_normalized"] == normalize_text(ref["text"])


def test_labeled_text_is_what_was_spoken_and_normalized(manifests):
    for row in manifests["labeled"] + manifests["dev"] + manifests["test"]:
        assert row["text"] == row["text"].strip() and row["text"][-1] in ".!?;"
        assert row["text_normalized"] == normalize_text(row["text"])
        assert not any(ch.isdigit() or ch in '()[]"«»…/' for ch in row["text"])


def test_greek_transcripts_are_in_greek_script(manifests):
    greek = [r for s in ("labeled", "dev", "test") for r in manifests[s] if r["language"] == "el"]
    greek += [r for r in manifests["reference"] if r["language"] == "el"]
    assert greek
    for row in greek:
        letters = [ch for ch in row["text"] if ch.isalpha()]
        assert letters and all(unicodedata.name(ch).startswith("GREEK") for ch in letters), row["text"]


def test_speakers_come_from_one_shared_distribution(smoke_dir):
    card = json.loads((smoke_dir / "corpus_card.json").read_text(encoding="utf-8"))
    variants: dict[str, set[str]] = {}
    for lang in smoke().languages:
        mine = [s for s in card["speakers"] if s["language"] == lang]
        assert len(mine) >= 8
        assert all(s["id"].startswith(f"{lang}-spk") for s in mine)
        variants[lang] = {s["variant"] for s in mine}
        assert len(variants[lang]) >= 4, (lang, variants[lang])
    langs = list(variants)
    for i, a in enumerate(langs):
        for b in langs[i + 1 :]:
            assert variants[a] & variants[b], (a, b)
    # With many draws every language uses every variant, with similar pitch: nothing gives a language away.
    many = CorpusConfig(**{**smoke().model_dump(), "labeled_speakers": 400})
    draws = {lang: draw_speakers(many, lang)["labeled"] for lang in ("es", "el")}
    for lang, speakers in draws.items():
        counts = Counter(s.voice.variant for s in speakers)
        assert set(counts) == set(VOICE_VARIANTS) and max(counts.values()) - min(counts.values()) <= 1, lang
    mean_pitch = [sum(s.voice.pitch for s in sp) / len(sp) for sp in draws.values()]
    assert abs(mean_pitch[0] - mean_pitch[1]) < 3


def test_card_describes_the_corpus(smoke_dir):
    card = json.loads((smoke_dir / "corpus_card.json").read_text(encoding="utf-8"))
    assert card["name"] == "smoke" and card["seed"] == 0 and card["sample_rate"] == 16000
    assert {lang: v["role"] for lang, v in card["languages"].items()} == {
        "es": "high",
        "el": "high",
        "sl": "low",
    }
    for lang, info in card["languages"].items():
        assert info["text_source"]["package"] == f"libreoffice-help-{lang}"
        assert info["text_source"]["version"]
    assert card["splits"]["labeled"]["es"]["clips"] == 40 and card["splits"]["labeled"]["es"]["hours"] > 0
    assert card["rejects"] == []
    markdown = (smoke_dir / "corpus_card.md").read_text(encoding="utf-8")
    assert "libreoffice-help-el" in markdown and "| unlabeled |" in markdown


SPANISH = """\
El tren de la mañana llega siempre con retraso.
Mi hermana vive en una casa cerca del río.
Los niños juegan en el parque después de la escuela.
Hoy hace mucho frío y el cielo está gris.
La biblioteca abre a las nueve de la mañana.
Compramos pan fresco en la tienda de la esquina.
El perro duerme tranquilo junto a la chimenea.
Necesito terminar este trabajo antes de la cena.
Mañana vamos a visitar a nuestros abuelos en el pueblo.
La película de anoche fue más larga de lo que esperaba.
Mi amigo toca la guitarra en una banda de música.
Las flores del jardín crecen rápido en primavera.
El cartero trajo una carta para tu padre.
Después de comer salimos a dar un paseo por la playa.
Mi abuela prepara una sopa deliciosa los domingos.
El autobús estaba lleno de gente esta tarde.
Vamos a pintar la cocina de color amarillo.
Los pájaros cantan temprano en el bosque.
Ella escribe cartas largas a sus amigos de la infancia.
El museo de la ciudad tiene cuadros muy antiguos.
Pon la leche en la nevera antes de salir.
El médico dijo que debo descansar unos días.
Nuestro vecino arregla bicicletas en su garaje.
Hay 3 manzanas en la mesa.
"""


def test_text_dir_builds_without_apt(tmp_path):
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    (text_dir / "es.txt").write_text(SPANISH, encoding="utf-8")
    cache = tmp_path / "cache"
    cfg = _tiny(high_resource=["es"], low_resource=[], labeled_speakers=2, dev_speakers=1, test_speakers=1)
    card = build_corpus(cfg, str(tmp_path / "out"), text_dir=str(text_dir), cache_dir=str(cache))
    assert not cache.exists()  # nothing fetched, nothing cached
    assert card["languages"]["es"]["text_source"]["source"] == "text_dir"
    assert card["languages"]["es"]["text_source"]["sentences"] == 23  # the line with a digit is dropped
    rows = _read_jsonl(tmp_path / "out" / "manifests" / "labeled.jsonl")
    assert len(rows) == 2 and all(r["text"] in SPANISH for r in rows)


def test_text_dir_missing_language_is_a_clear_error(tmp_path):
    (tmp_path / "es.txt").write_text(SPANISH, encoding="utf-8")
    cfg = _tiny(high_resource=["es"], low_resource=["sl"])
    with pytest.raises(FileNotFoundError, match=r"'sl'.*sl\.txt"):
        build_corpus(cfg, str(tmp_path / "out"), text_dir=str(tmp_path))


def test_too_few_sentences_is_a_clear_error(tmp_path):
    (tmp_path / "es.txt").write_text(SPANISH, encoding="utf-8")
    cfg = _tiny(high_resource=["es"], low_resource=[], labeled_clips_high=20)
    with pytest.raises(ValueError, match="'es' has 23 usable sentences for test, dev, labeled, unlabeled but this "
                                         "config needs 110"):
        build_corpus(cfg, str(tmp_path / "out"), text_dir=str(tmp_path))


def test_sentence_filter():
    assert clean_sentence("es", "Pulse «Aceptar» para cerrar el diálogo.") == "Pulse Aceptar para cerrar el diálogo."
    assert clean_sentence("es", "Hay 3 opciones en este menú.") is None  # digits
    assert clean_sentence("es", "Abra el archivo (si existe) ahora mismo.") is None  # brackets
    assert clean_sentence("es", "Guarde el documento como PDF ahora.") is None  # acronym spelled out
    assert clean_sentence("es", "Elija Herramientas ▸ Opciones ahora.") is None  # menu path
    assert clean_sentence("es", "Pulse aquí.") is None  # too short
    assert clean_sentence("el", "Specifies the default settings here.") is None  # wrong script
    assert clean_sentence("el", "Ανοίγει τον διάλογο επιλογής πιστοποιητικού.") is not None
    assert clean_sentence("fr", "Voulez-vous enregistrer le document ?") == "Voulez-vous enregistrer le document?"


def test_presets_validate_and_unknown_preset_names_the_valid_ones():
    for name in ("smoke", "demo", "bench"):
        cfg = corpus_preset(name)
        assert cfg.name == name and "el" in cfg.languages and cfg.low_resource
        speakers = cfg.labeled_speakers + cfg.unlabeled_speakers + cfg.dev_speakers + cfg.test_speakers
        assert speakers >= (8 if name == "smoke" else 20)
    with pytest.raises(ValueError, match=r"unknown corpus preset 'nope'; choose one of \['bench', 'demo', 'smoke'\]"):
        corpus_preset("nope")


def test_bad_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        CorpusConfig(high_resource=["xx"], low_resource=[], snr_db=(30.0, 10.0), reverb_prob=2.0)
    message = str(err.value)
    assert "'xx'" in message and "snr_db" in message and "reverb_prob" in message
    with pytest.raises(ValueError):
        CorpusConfig(unknown_field=1)


def test_demo_has_at_least_4x_as_much_unlabeled_as_labeled_audio_for_its_low_resource_language():
    cfg = corpus_preset("demo")
    for lang in cfg.low_resource:
        most_labeled_s = cfg.clips("labeled", "low") * cfg.short_clip_s[1]
        least_unlabeled_s = cfg.clips("unlabeled", "low") * cfg.long_clip_s[0]
        assert least_unlabeled_s >= 4 * most_labeled_s, (lang, least_unlabeled_s, most_labeled_s)
    assert cfg.clips("unlabeled", "high") == 0  # as in the paper, only some languages have unlabeled audio


def test_unlabeled_budget_leaves_eval_and_labeled_sentences_in_place():
    sentences = [f"sentence number {i}" for i in range(3000)]
    other = [f"other sentence {i}" for i in range(500)]
    small = corpus_preset("demo").model_copy(update={"unlabeled_clips_low": 10})
    large = corpus_preset("demo").model_copy(update={"unlabeled_clips_low": 100})
    a, b = (allocate_sentences(cfg, "sl", sentences, ood_sentences=other) for cfg in (small, large))
    for split in ("test", "dev", "labeled", "ood_short", "ood_long"):
        assert a[split] == b[split], split
    assert len(a["ood_short"]) == 16 and len(a["ood_long"]) == 6
    assert len(a["unlabeled"]) == 10 and len(b["unlabeled"]) == 100
    assert b["unlabeled"][:10] == a["unlabeled"]
    none = allocate_sentences(large, "es", sentences, ood_sentences=other)  # high-resource: no unlabeled clips
    assert none["unlabeled"] == [] and len(none["labeled"]) == large.labeled_clips_high


def test_languages_without_unlabeled_audio_have_none_anywhere(tmp_path):
    out = tmp_path / "out"
    cfg = _tiny(unlabeled_clips_high=0, unlabeled_clips_low=1)
    card = build_corpus(cfg, str(out))
    unlabeled = _read_jsonl(out / "manifests" / "unlabeled.jsonl")
    reference = _read_jsonl(out / "hidden" / "unlabeled_reference.jsonl")
    assert Counter(r["language"] for r in unlabeled) == {"sl": 1}
    assert [r["id"] for r in reference] == [r["id"] for r in unlabeled]
    assert sorted(p.parent.name for p in (out / "audio" / "unlabeled").rglob("*.flac")) == ["sl"]
    for lang in ("es", "el"):
        entry = card["splits"]["unlabeled"][lang]
        assert entry == {"clips": 0, "hours": 0.0, "mean_duration_s": 0.0, "speakers": 0, "reverb_fraction": 0.0}
    assert card["splits"]["unlabeled"]["sl"]["clips"] == 1 and card["splits"]["unlabeled"]["sl"]["hours"] > 0
    md = (out / "corpus_card.md").read_text(encoding="utf-8")
    assert "| unlabeled | 0 / 0.000 h / 0 | 0 / 0.000 h / 0 | 1 / " in md
    calls = []
    assert build_corpus(cfg, str(out), on_progress=lambda *a: calls.append(a)) == card
    assert calls == []  # complete as it is: empty per-language splits do not make it look unfinished


def _split_digest(root: Path, splits: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every file of these splits: manifests and audio (paths in manifests are relative)."""
    files = [root / "manifests" / f"{s}.jsonl" for s in splits]
    files += sorted(p for s in splits for p in (root / "audio" / s).rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_eval_and_labeled_sets_are_byte_identical_whatever_the_unlabeled_settings(tmp_path):
    ood = {"ood_short_clips": 2, "ood_long_clips": 1}
    few = _tiny(unlabeled_clips_low=1, unlabeled_speakers=1, **ood)
    many = _tiny(unlabeled_clips_high=1, unlabeled_clips_low=1, unlabeled_speakers=7, unlabeled_ratio=2.0, **ood)
    build_corpus(few, str(tmp_path / "few"))
    build_corpus(many, str(tmp_path / "many"))
    kept = ("labeled", "dev", "test", "ood_short", "ood_long")
    a, b = _split_digest(tmp_path / "few", kept), _split_digest(tmp_path / "many", kept)
    assert len(a) == 5 + 2 * (5 + 3 + 3 + 2 * 3 + 3) and a == b  # manifests, flacs and sidecars, byte for byte
    assert _split_digest(tmp_path / "few", ("unlabeled",)) != _split_digest(tmp_path / "many", ("unlabeled",))
    # Speakers too: each split draws its own, so adding unlabeled speakers moves no other split's voices.
    for lang in many.languages:
        drawn_few, drawn_many = draw_speakers(few, lang), draw_speakers(many, lang)
        assert all(drawn_few[g] == drawn_many[g] for g in ("labeled", "dev", "test", "ood"))
        assert len(drawn_many["unlabeled"]) == 7 and drawn_many["unlabeled"][:1] == drawn_few["unlabeled"]


def test_the_unlabeled_ratio_builds_the_hours_asked_for(tmp_path):
    cfg = _tiny(unlabeled_clips_high=1, unlabeled_clips_low=1, unlabeled_speakers=3, unlabeled_ratio=3.0)
    card = build_corpus(cfg, str(tmp_path / "c"))
    seconds = {split: Counter() for split in ("labeled", "unlabeled")}
    for split in seconds:
        for r in _read_jsonl(tmp_path / "c" / "manifests" / f"{split}.jsonl"):
            seconds[split][r["language"]] += r["duration_s"]
    mean_high = sum(seconds["labeled"][lang] for lang in cfg.high_resource) / len(cfg.high_resource)
    for lang in cfg.languages:
        target = 3.0 * max(seconds["labeled"][lang], mean_high)
        # At least the target, and not a whole clip's worth more than it needs (clips are added by the deficit).
        assert target <= seconds["unlabeled"][lang] < target + 2 * cfg.long_clip_s[1], lang
        assert card["splits"]["unlabeled"][lang]["clips"] == card["unlabeled_clips_planned"][lang] >= 1
    # The low-resource language gets the high-resource languages' unlabeled hours: far more than 3× its own.
    assert seconds["unlabeled"]["sl"] >= 3.0 * mean_high > 3.0 * seconds["labeled"]["sl"]
    assert build_corpus(cfg, str(tmp_path / "c"), on_progress=lambda *a: pytest.fail("rebuilt")) == card


def test_the_out_of_domain_splits_share_no_sentence_with_any_other_split(tmp_path):
    """Other text (a sentence also in the in-domain pool is never spoken out of domain), other voices, short and
    long clips."""
    text_dir = tmp_path / "text"
    (text_dir / "ood").mkdir(parents=True)
    words = {"es": "casa perro gato luna sol mar uno dos", "el": "σπίτι σκύλος γάτα φεγγάρι ήλιος θάλασσα ένα δύο",
             "sl": "hiša pes mačka luna sonce morje ena dva"}
    for lang, vocab in words.items():
        w = vocab.split()
        # Nine words each (long enough for a 2-6 s clip), distinct for every i.
        in_domain = [" ".join(w[(i // 6 ** (k % 4)) % 6] for k in range(8)).capitalize() + f" {w[6]}."
                     for i in range(1296)]
        (text_dir / f"{lang}.txt").write_text("\n".join(in_domain) + "\n", encoding="utf-8")
        # Out of domain: other sentences (ending in the eighth word), plus 40 in-domain ones (shouted) to be left out.
        other = [s.replace(f" {w[6]}.", f" {w[7]}.") for s in in_domain[:300]] + [s.upper() for s in in_domain[:40]]
        (text_dir / "ood" / f"{lang}.txt").write_text("\n".join(other) + "\n", encoding="utf-8")
    cfg = _tiny(ood_short_clips=3, ood_long_clips=1, ood_speakers=2, long_clip_s=(6.0, 12.0),
                sentences_per_long_clip=(2, 3))
    card = build_corpus(cfg, str(tmp_path / "c"), text_dir=str(text_dir))
    rows = {split: _read_jsonl(tmp_path / "c" / "manifests" / f"{split}.jsonl") for split in SPLITS}
    assert Counter(r["language"] for r in rows["ood_short"]) == {"es": 3, "el": 3, "sl": 3}
    assert Counter(r["language"] for r in rows["ood_long"]) == {"es": 1, "el": 1, "sl": 1}
    assert all(6.0 <= r["duration_s"] <= 12.0 for r in rows["ood_long"])
    in_domain = {lang: {normalize_text(s) for s in (text_dir / f"{lang}.txt").read_text().splitlines()}
                 for lang in words}
    spoken_elsewhere = {normalize_text(r["text"]) for split in ("labeled", "dev", "test") for r in rows[split]}
    for r in rows["ood_short"] + rows["ood_long"]:
        assert normalize_text(r["text"]) not in spoken_elsewhere
        assert words[r["language"]].split()[6] not in r["text"]  # none of the in-domain ones the file also listed
        for sentence in r["text"].split(". "):
            assert normalize_text(sentence) not in in_domain[r["language"]]
    # Voices: the out-of-domain speakers are their own, shared by the short and the long clips.
    ood_speakers = {r["speaker"] for r in rows["ood_short"] + rows["ood_long"]}
    others = {r["speaker"] for split in ("labeled", "unlabeled", "dev", "test") for r in rows[split]}
    assert ood_speakers and not ood_speakers & others and all("-spk-ood" in s for s in ood_speakers)
    assert card["languages"]["sl"]["text_source"]["ood"]["source"] == "text_dir"
