"""`mlpl import`: every format's miniature (the real layout, bad rows included) becomes manifests and reject rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flows.cli import main
from pipeline.config import AudioPolicy
from pipeline.corpus.importing import import_corpus
from pipeline.data.audio import AudioError, load_audio, probe_audio, with_span
from pipeline.data.rows import read_utterances
from storage.importers import SourceLayoutError
from tests.helpers.sources_cv_voxpopuli import QUOTE_SENTENCE, make_common_voice, make_voxpopuli
from tests.helpers.sources_lhotse import make_lhotse_cuts, make_lhotse_manifests, make_lhotse_shar
from tests.helpers.sources_nemo_hf import make_hf_parquet, make_nemo, make_nemo_tarred


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _imported(out: Path) -> tuple[dict[str, list[dict]], list[dict]]:
    splits = {s: _jsonl(out / "manifests" / f"{s}.jsonl") for s in ("labeled", "dev", "test", "unlabeled")}
    return splits, _jsonl(out / "manifests" / "rejects.jsonl")


def _reasons(rejects: list[dict]) -> str:
    return " | ".join(r["reason"] for r in rejects)


def test_common_voice_with_bad_rows(tmp_path):
    src = make_common_voice(tmp_path / "src", bad_rows=True)
    summary = import_corpus("common-voice", str(src), str(tmp_path / "out"))
    splits, rejects = _imported(tmp_path / "out")
    assert {s: len(rows) for s, rows in splits.items()} == {"labeled": 4, "dev": 4, "test": 4, "unlabeled": 4}
    assert QUOTE_SENTENCE in [r["text"] for r in splits["labeled"]]  # and the line after it survived: 4 rows
    assert all("text" not in r for r in splits["unlabeled"])  # other.tsv's sentences are not transcripts
    assert all(r["duration_s"] > 0.5 for rows in splits.values() for r in rows)  # from the mp3 headers
    reasons = _reasons(rejects)
    assert len(rejects) == 5 and summary["rejects"]["total"] == 5
    for part in ("audio file not found", "audio header could not be read", "transcript is empty",
                 "unknown locale", "duplicate id 'common_voice_de_1001' (first in labeled)"):
        assert part in reasons, part
    # The manifests are what the stages read: every kept row validates and decodes.
    utts, bad = read_utterances(str(tmp_path / "out/manifests/labeled.jsonl"), require_text=True, languages=None)
    assert len(utts) == 4 and not bad
    assert load_audio(utts[0].audio, AudioPolicy()).numel() > 8000


def test_voxpopuli_with_bad_rows_and_a_language_choice(tmp_path):
    src = make_voxpopuli(tmp_path / "src", bad_rows=True)
    import_corpus("voxpopuli", str(src), str(tmp_path / "all"))
    _, rejects = _imported(tmp_path / "all")
    assert "unknown locale" in _reasons(rejects)  # the transcribed folder named xx-INVALID-123
    import_corpus("voxpopuli", str(src), str(tmp_path / "out"), languages=["sl"])
    splits, rejects = _imported(tmp_path / "out")
    assert {r["language"] for rows in splits.values() for r in rows} == {"sl"}
    assert len(splits["unlabeled"]) == 3 and len(splits["labeled"]) == 2


def test_rows_of_languages_not_asked_for_are_counted_not_silently_gone(tmp_path):
    src = make_nemo(tmp_path / "src")
    summary = import_corpus("nemo", str(src), str(tmp_path / "out"), languages=["sl"])
    splits, _ = _imported(tmp_path / "out")
    assert {r["language"] for rows in splits.values() for r in rows} == {"sl"}
    assert summary["skipped_languages"]["de"] > 0
    assert json.loads((tmp_path / "out/import.json").read_text())["skipped_languages"] == summary["skipped_languages"]


def test_nemo_offsets_become_stretches_that_readers_decode(tmp_path):
    src = make_nemo(tmp_path / "src", bad_rows=True)
    import_corpus("nemo", str(src), str(tmp_path / "out"))
    splits, rejects = _imported(tmp_path / "out")
    stretched = [r for rows in splits.values() for r in rows if "start_s" in r]
    assert len(stretched) >= 2
    row = stretched[0]
    assert row["duration_s"] == pytest.approx(row["end_s"] - row["start_s"], abs=1e-3)
    utts, _ = read_utterances(str(tmp_path / f"out/manifests/{_split_of(splits, row)}.jsonl"), require_text=False,
                              languages=None)
    utt = next(u for u in utts if u.id == row["id"])
    wav = load_audio(utt.audio, AudioPolicy())
    whole, sr = sf.read(utt.audio.split("#", 1)[0], dtype="float32")
    first = round(row["start_s"] * sr)
    assert wav.numel() == round((row["end_s"] - row["start_s"]) * sr)
    np.testing.assert_allclose(wav.numpy(), whole[first:first + wav.numel()], atol=1e-6)
    reasons = _reasons(rejects)
    for part in ("audio file not found", "audio header could not be read", "transcript is empty", "unknown locale",
                 "duplicate id", "not JSON"):
        assert part in reasons, part


def _split_of(splits: dict[str, list[dict]], row: dict) -> str:
    return next(s for s, rows in splits.items() if row in rows)


def test_nemo_tarred_audio_is_read_in_place(tmp_path):
    src = make_nemo_tarred(tmp_path / "src", bad_rows=True)
    import_corpus("nemo-tarred", str(src), str(tmp_path / "out"))
    splits, rejects = _imported(tmp_path / "out")
    rows = [r for rows in splits.values() for r in rows]
    assert rows and all(r["audio"].startswith("tar://") for r in rows)
    assert load_audio(rows[0]["audio"], AudioPolicy()).numel() > 0
    assert len(rejects) == 2 and "audio file not found" in _reasons(rejects)


def test_hugging_face_parquet_audio_is_written_once(tmp_path):
    src = make_hf_parquet(tmp_path / "src", bad_rows=True)
    import_corpus("hf", str(src), str(tmp_path / "out"))
    splits, rejects = _imported(tmp_path / "out")
    assert len(splits["labeled"]) >= 2 and len(splits["dev"]) >= 2 and len(splits["test"]) >= 2
    audio = [Path(r["audio"]) for rows in splits.values() for r in rows]
    assert all(p.is_relative_to(tmp_path / "out" / "audio") and p.exists() for p in audio)
    assert rejects, "the bad rows are rejected with reasons"


@pytest.mark.parametrize("make", [make_lhotse_manifests, make_lhotse_cuts, make_lhotse_shar])
def test_lhotse_layouts(tmp_path, make):
    src = make(tmp_path / "src", bad_rows=True)
    import_corpus("lhotse", str(src), str(tmp_path / "out"), options={"language": "de"})
    splits, rejects = _imported(tmp_path / "out")
    rows = [r for rows in splits.values() for r in rows]
    assert rows and {r["language"] for r in rows} <= {"de", "sl"}
    assert "transcript is empty" in _reasons(rejects) or "duplicate id" in _reasons(rejects)
    for r in rows[:3]:
        assert load_audio(with_span(r["audio"], r.get("start_s"), r.get("end_s")), AudioPolicy()).numel() > 0


def test_a_wrong_layout_is_one_line_naming_what_was_expected(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("not a corpus")
    for fmt in ("common-voice", "voxpopuli", "nemo", "nemo-tarred", "hf", "lhotse"):
        with pytest.raises(SourceLayoutError):
            import_corpus(fmt, str(tmp_path / "src"), str(tmp_path / "out"))
        assert main(["import", fmt, str(tmp_path / "src"), "--out", str(tmp_path / "out")]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("mlpl: error: ") and "\n" not in err and "expected" in err.lower(), err
    assert not (tmp_path / "out" / "manifests" / "labeled.jsonl").exists()  # nothing half-written


def test_an_option_the_format_does_not_take_is_refused(tmp_path):
    src = make_common_voice(tmp_path / "src")
    with pytest.raises(ValueError, match="takes no option tars"):
        import_corpus("common-voice", str(src), str(tmp_path / "out"), options={"tars": "a_{0..1}.tar"})


def test_a_stretch_past_the_end_of_its_file_is_an_audio_error(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, np.full(16000, 0.2, dtype="float32"), 16000)
    assert probe_audio(with_span(str(path), 0.25, 0.75)) == pytest.approx(0.5)
    with pytest.raises(AudioError, match="ends after the audio's end"):
        probe_audio(with_span(str(path), 0.5, 1.5))
    with pytest.raises(AudioError, match="ends after the audio's end"):
        load_audio(with_span(str(path), 0.5, 1.5), AudioPolicy())


def test_the_recipe_takes_an_imported_folder_as_it_is(tmp_path):
    from pipeline.config import RecipeConfig

    out = tmp_path / "out"
    import_corpus("common-voice", str(make_common_voice(tmp_path / "src")), str(out))
    cfg = RecipeConfig(corpus_dir=str(out), run_dir=str(tmp_path / "run"), preset="tiny")
    assert cfg.labeled_manifest == f"{out}/manifests/labeled.jsonl"
    assert cfg.unlabeled_manifest == f"{out}/manifests/unlabeled.jsonl"
    assert cfg.dev_manifest == f"{out}/manifests/dev.jsonl" and cfg.test_manifest == f"{out}/manifests/test.jsonl"
    assert cfg.reference_manifest is None and cfg.lm_text_dir is None  # an imported corpus has no hidden truth
    mine = RecipeConfig(corpus_dir=str(out), labeled_manifest="elsewhere.jsonl", preset="tiny")
    assert mine.labeled_manifest == "elsewhere.jsonl"  # a manifest given wins over the folder's
    # The operators' form asks for no manifest (corpus_dir can fill them), and a config with neither is refused.
    assert not set(RecipeConfig.model_json_schema().get("required", [])) & {"labeled_manifest", "unlabeled_manifest"}
    with pytest.raises(ValueError, match="give the manifest"):
        RecipeConfig(preset="tiny")


def test_without_the_probe_a_source_duration_that_is_not_a_number_is_a_reject(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = [{"audio_filepath": "a.wav", "duration": "long", "text": "hallo", "lang": "de"},
            {"audio_filepath": "b.wav", "duration": 1.5, "text": "hallo", "lang": "de"}]
    (src / "train_manifest.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = import_corpus("nemo", str(src), str(tmp_path / "out"), probe=False)
    splits, rejects = _imported(tmp_path / "out")
    assert [r["id"] for r in splits["labeled"]] == ["b"] and splits["labeled"][0]["duration_s"] == 1.5
    assert [r["reason"] for r in rejects] == ["duration 'long' is not a number"] and summary["rows_read"] == 2
