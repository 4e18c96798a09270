"""LM-fused labeling: the n-gram LM built by KenLM from text only, the beam search's agreement with greedy at LM
weight 0, the LM deciding where the acoustics cannot, dev tuning, and labeling that says what decoded."""

from __future__ import annotations

import builtins
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from pipeline.config import BatchConfig, label_tiny, recipe_demo
from pipeline.config.decoding import BeamDecoderConfig, DecoderTuning, LMConfig
from pipeline.data.tokenizer import CharTokenizer
from pipeline.engine import beam as beam_module
from pipeline.engine.beam import BeamDecoder, lm_sentences, lm_tokens
from pipeline.layout import text_only_file
from pipeline.stages.label import run_label
from pipeline.stages.lm import build_lm, lm_dir, tune_decoder
from storage.checkpoint import save_checkpoint
from storage.pl import load_pseudo_labels
from tests.helpers.dummies import write_jsonl

SYMBOLS = ["<blank>", "<unk>", " ", "a", "b", "c"]


def _tokenizer_checkpoint(tmp_path: Path, symbols=SYMBOLS) -> str:
    url = str(tmp_path / "tok.pt")
    save_checkpoint(url, {"tokenizer": CharTokenizer(symbols).to_dict()})
    return url


def _lm(tmp_path: Path, lines: list[str], unit: str = "char", order: int = 3) -> tuple[str, CharTokenizer]:
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = LMConfig(language="xx", tokenizer_checkpoint=_tokenizer_checkpoint(tmp_path), text_files=[str(text)],
                   unit=unit, order=order)
    build_lm(cfg, str(tmp_path / "run"))
    return lm_dir(str(tmp_path / "run"), "xx"), CharTokenizer(SYMBOLS)


def _posteriors(frames: list[dict[str, float]], vocab: int = len(SYMBOLS)) -> torch.Tensor:
    """(T, V) log-posteriors: each frame's listed tokens get their probability, the rest share what is left."""
    out = torch.empty(len(frames), vocab)
    for t, probs in enumerate(frames):
        rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
        row = [probs.get(i, rest) for i in range(vocab)]
        out[t] = torch.tensor(row).log()
    return out


def test_lm_text_spells_spaces_as_the_sil_token_and_drops_sentences_with_unknown_characters():
    tok = CharTokenizer(SYMBOLS)
    assert lm_tokens(tok) == ["<blank>", "<unk>", "|", "a", "b", "c"]
    lines, dropped = lm_sentences(["ab  c", "abd", " ", "ca"], tok, "char")
    assert lines == ["a b | c", "c a"] and dropped == 1
    assert lm_sentences(["ab  c"], tok, "word") == (["ab c"], 0)


def test_the_lm_is_kenlm_arpa_over_the_vocabulary_and_a_rebuild_with_the_same_text_is_reused(tmp_path):
    folder, _ = _lm(tmp_path, ["ab", "ab c"] * 20)
    arpa = (Path(folder) / "lm.arpa").read_text()
    assert "\\data\\" in arpa and "ngram 3=" in arpa
    unigrams = arpa.split("\\1-grams:")[1].split("\\2-grams:")[0]
    assert {"a", "b", "c", "|", "</s>"} <= {line.split("\t")[1] for line in unigrams.strip().splitlines()}
    assert (Path(folder) / "tokens.txt").read_text().split() == ["<blank>", "<unk>", "|", "a", "b", "c"]
    mtime = (Path(folder) / "lm.arpa").stat().st_mtime_ns
    _lm(tmp_path, ["ab", "ab c"] * 20)
    assert (Path(folder) / "lm.arpa").stat().st_mtime_ns == mtime


def test_beam_search_with_lm_weight_zero_picks_the_greedy_path_on_peaked_posteriors(tmp_path):
    folder, tok = _lm(tmp_path, ["ccc", "bb"] * 30)  # an LM that would prefer other text
    torch.manual_seed(0)
    logits = torch.randn(40, len(SYMBOLS)) * 6.0  # peaked: one token dominates each frame
    log_probs = logits.log_softmax(-1)
    path = torch.unique_consecutive(log_probs.argmax(-1))
    greedy = tok.decode(path[path != 0].tolist())
    decoder = BeamDecoder(BeamDecoderConfig(lm=folder, lm_weight=0.0, beam_size=20, beam_size_token=6), folder, tok)
    assert decoder.decode(log_probs) == " ".join(greedy.split())


def test_the_lm_decides_where_the_acoustics_cannot(tmp_path):
    folder, tok = _lm(tmp_path, ["abc", "abc abc"] * 30)
    a, b, c = 3, 4, 5
    # Frame 2 leans to c (summed over alignments too); the LM has only ever seen "abc".
    frames = [{a: 0.9}, {0: 0.9}, {b: 0.3, c: 0.65}, {0: 0.9}, {c: 0.9}]
    log_probs = _posteriors(frames)
    assert BeamDecoder(BeamDecoderConfig(lm=folder, lm_weight=0.0), folder, tok).decode(log_probs) == "acc"
    assert BeamDecoder(BeamDecoderConfig(lm=folder, lm_weight=1.0), folder, tok).decode(log_probs) == "abc"


def test_log_add_scores_a_hypothesis_by_the_sum_over_its_alignments_not_its_best_one(tmp_path):
    folder, tok = _lm(tmp_path, ["abc", "abc abc"] * 30)
    a, b = 3, 4
    # Two frames. "b"'s best alignment (b, blank) = .49 * .49 beats every alignment of "a", but "a"'s three
    # alignments (a a, a -, - a) sum to .4*.4 + .4*.49 + .1*.4 = .396 > "b"'s .49*.49 + .49*.1 + .1*.1 = .299.
    log_probs = _posteriors([{a: 0.4, b: 0.49, 0: 0.1}, {a: 0.4, 0: 0.49, b: 0.1}])
    cfg = BeamDecoderConfig(lm=folder, lm_weight=0.0, beam_size=50, beam_size_token=6)
    assert BeamDecoder(cfg.model_copy(update={"log_add": False}), folder, tok).decode(log_probs) == "b"
    assert BeamDecoder(cfg, folder, tok).decode(log_probs) == "a"
    assert cfg.describe() == "beam50/6 char-LM w=0 sil=0"
    assert cfg.model_copy(update={"log_add": False}).describe() == "beam50/6 max char-LM w=0 sil=0"


def test_a_word_lm_only_spells_words_of_its_lexicon(tmp_path):
    folder, tok = _lm(tmp_path, ["ab ca", "ca ab", "ab ab ca"] * 20, unit="word", order=2)
    a, b, c, space = 3, 4, 5, 2
    frames = [{a: 0.9}, {b: 0.5, c: 0.45}, {space: 0.9}, {c: 0.9}, {a: 0.5, b: 0.45}]
    out = BeamDecoder(BeamDecoderConfig(lm=folder, unit="word", lm_weight=1.0), folder, tok).decode(_posteriors(frames))
    assert out == "ab ca"
    assert (Path(folder) / "lexicon.txt").read_text().splitlines() == ["ab\ta b", "ca\tc a"]


def test_a_python_without_flashlight_text_gets_one_line_naming_the_fix(monkeypatch):
    real_import = builtins.__import__

    def no_flashlight(name, *args, **kwargs):
        if name.startswith("flashlight"):
            raise ImportError("No module named 'flashlight'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flashlight)
    with pytest.raises(ImportError, match=r"pip install flashlight-text==0\.0\.7"):
        beam_module._ctc_decoder()


def test_a_missing_lmplz_names_the_make_target(monkeypatch, tmp_path):
    monkeypatch.setenv("MLPL_LMPLZ", str(tmp_path / "nope"))
    monkeypatch.setattr(beam_module, "Path", lambda *a: tmp_path / "absent")
    monkeypatch.setattr(beam_module.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="make install"):
        beam_module.lmplz_path()


def test_an_lm_with_no_usable_text_is_refused_with_the_reason(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("ddd\neee\n")
    cfg = LMConfig(language="xx", tokenizer_checkpoint=_tokenizer_checkpoint(tmp_path), text_files=[str(text)])
    with pytest.raises(ValueError, match="2 dropped for unknown characters"):
        build_lm(cfg, str(tmp_path / "run"))
    with pytest.raises(ValueError, match="has no text"):
        LMConfig(language="xx", tokenizer_checkpoint="x.pt")


def test_the_corpus_text_only_split_shares_no_sentence_with_any_clip(smoke_corpus):
    import json

    spoken = set()
    for split in ("labeled", "dev", "test"):
        spoken |= {json.loads(line)["text"] for line in open(f"{smoke_corpus}/manifests/{split}.jsonl")}
    for line in open(f"{smoke_corpus}/hidden/unlabeled_reference.jsonl"):
        spoken |= set(json.loads(line)["sentences"])
    for lang in ("es", "el", "sl"):
        text = Path(text_only_file(smoke_corpus, lang)).read_text(encoding="utf-8").splitlines()
        assert len(text) > 100 and not set(text) & spoken


@pytest.fixture(scope="module")
def smoke_lm(smoke_corpus, teacher, tmp_path_factory) -> tuple[str, dict]:
    """The sl labeling LM of the smoke corpus (labeled transcripts + text-only split), tuned on dev with `teacher`."""
    run = str(tmp_path_factory.mktemp("lm-run"))
    recipe = recipe_demo(smoke_corpus, run)
    build_lm(recipe.lm_config("sl", teacher), run)
    grid = DecoderTuning(lm_weights=[0.0, 1.0, 2.0], sil_scores=[0.0, 2.0], max_utterances=40)
    tuned = tune_decoder(teacher, "sl", lm_dir(run, "sl"), recipe.beam_config(lm_dir(run, "sl")), grid,
                         f"{smoke_corpus}/manifests/dev.jsonl", batch=BatchConfig(max_batch_duration_s=60.0))
    return run, tuned


def test_dev_tuning_picks_the_lowest_cer_of_its_grid_and_is_read_back_not_recomputed(smoke_lm, smoke_corpus,
                                                                                      teacher):
    run, tuned = smoke_lm
    assert len(tuned["grid"]) == 6 and tuned["dev_utterances"] > 0
    best = min(tuned["grid"], key=lambda r: (r["cer"], r["wer"]))
    assert tuned["chosen"]["lm_weight"] == best["lm_weight"] and tuned["chosen_dev"]["cer"] == best["cer"]
    weight_zero = [r for r in tuned["grid"] if r["lm_weight"] == 0.0 and r["sil_score"] == 0.0][0]
    assert tuned["chosen_dev"]["cer"] <= weight_zero["cer"] and tuned["greedy"]["cer"] > 0
    base = recipe_demo(smoke_corpus, run).beam_config(lm_dir(run, "sl"))
    again = tune_decoder(teacher, "sl", lm_dir(run, "sl"), base,
                         DecoderTuning(lm_weights=[0.0, 1.0, 2.0], sil_scores=[0.0, 2.0], max_utterances=40),
                         f"{smoke_corpus}/manifests/dev.jsonl", batch=BatchConfig(max_batch_duration_s=60.0))
    assert again["key"] == tuned["key"] and again["tune_s"] == tuned["tune_s"]  # read back, not recomputed


def test_labeling_with_the_lm_says_what_decoded_and_a_new_lm_weight_relabels_its_units(smoke_lm, smoke_corpus,
                                                                                       teacher, tmp_path):
    run, tuned = smoke_lm
    decoder = BeamDecoderConfig(**tuned["chosen"])
    teachers = {lang: teacher for lang in ("es", "el", "sl")}
    cfg = label_tiny(f"{smoke_corpus}/manifests/unlabeled.jsonl", teachers, unit_max_utterances=4,
                     decoders={"sl": decoder.model_dump()})
    root = str(tmp_path / "labels")
    run_label(cfg, root)
    df = load_pseudo_labels(root)
    sl, others = df[df.language == "sl"], df[df.language != "sl"]
    assert len(sl) > 0 and sl.decode.str.startswith(decoder.describe() + " on torch ").all()
    assert others.decode.str.startswith("greedy on torch ").all()
    heavier = decoder.model_copy(update={"lm_weight": decoder.lm_weight + 1.0})
    again = run_label(cfg.model_copy(update={"decoders": {"sl": heavier}}), root)
    sl_units = sum(1 for _ in set(sl.id))
    assert again.units_labeled == math.ceil(sl_units / 4) and again.units_skipped > 0
    df2 = load_pseudo_labels(root)
    assert sorted(df2.id) == sorted(df.id)  # relabeled in place: nothing duplicated, nothing lost
    assert df2[df2.language == "sl"].decode.str.startswith(heavier.describe()).all()


def test_beam_search_in_worker_processes_writes_the_same_rows_as_in_process(smoke_lm, smoke_corpus, teacher,
                                                                            tmp_path):
    run, tuned = smoke_lm
    cfg = label_tiny(f"{smoke_corpus}/manifests/unlabeled.jsonl", {"sl": teacher}, unit_max_utterances=3,
                     decoders={"sl": tuned["chosen"]}, batch={"max_batch_duration_s": 60.0, "max_batch_size": 2})
    inline = run_label(cfg.model_copy(update={"decode_workers": 0}), str(tmp_path / "inline"))
    beam_module.close_workers()  # only this test's decoding processes from here on
    pooled = run_label(cfg.model_copy(update={"decode_workers": 1}), str(tmp_path / "pooled"))
    assert beam_module._WORKER_POOLS  # the children ran, and are kept for the next unit
    columns = ["id", "text", "num_tokens", "confidence", "decode"]
    a = load_pseudo_labels(str(tmp_path / "inline")).sort_values("id")[columns].reset_index(drop=True)
    b = load_pseudo_labels(str(tmp_path / "pooled")).sort_values("id")[columns].reset_index(drop=True)
    assert len(a) > 2 and a.equals(b) and inline.units_labeled == pooled.units_labeled > 1
    # A child that dies (out of memory, killed) costs speed, not rows: the unit decodes on in-process.
    (pool,) = beam_module._WORKER_POOLS.values()
    for pid in list(pool._pool._processes):
        os.kill(pid, signal.SIGKILL)
    run_label(cfg.model_copy(update={"decode_workers": 1}), str(tmp_path / "after-crash"))
    c = load_pseudo_labels(str(tmp_path / "after-crash")).sort_values("id")[columns].reset_index(drop=True)
    assert a.equals(c)
    beam_module.close_workers()
    assert not beam_module._WORKER_POOLS


def test_a_decoder_whose_lm_is_not_built_fails_before_any_unit_with_the_fix(smoke_corpus, teacher, tmp_path):
    cfg = label_tiny(f"{smoke_corpus}/manifests/unlabeled.jsonl", {"sl": teacher},
                     decoders={"sl": {"lm": str(tmp_path / "missing")}})
    with pytest.raises(FileNotFoundError, match="is not built"):
        run_label(cfg, str(tmp_path / "labels"))


def test_rows_of_a_manifest_feed_the_lm_only_for_their_language(tmp_path):
    manifest = tmp_path / "labeled.jsonl"
    write_jsonl(manifest, [{"id": "1", "audio": "a.flac", "language": "xx", "text": "ab", "duration_s": 1.0},
                           {"id": "2", "audio": "b.flac", "language": "yy", "text": "cc", "duration_s": 1.0}])
    cfg = LMConfig(language="xx", tokenizer_checkpoint=_tokenizer_checkpoint(tmp_path),
                   labeled_manifest=str(manifest), order=2)
    meta = build_lm(cfg, str(tmp_path / "run"))
    assert meta["sentences"] == 1


def test_the_relabel_job_takes_the_decoder_the_recipe_tuned_for_its_teacher(tmp_path):
    from pipeline.config import RelabelConfig
    from pipeline.stages.lm import tuned_decoders
    from storage.files import write_json

    run = str(tmp_path / "run")
    folder = lm_dir(run, "sl")
    write_json(f"{folder}/meta.json", {"identity": "x"})

    def tuning(name: str, teacher: str, weight: float, cer: float) -> None:
        chosen = BeamDecoderConfig(lm=folder, lm_weight=weight, sil_score=1.0).model_dump(mode="json")
        write_json(f"{folder}/tuning-{name}.json", {"teacher": teacher, "lm": folder, "chosen": chosen,
                                                    "chosen_dev": {"cer": cer, "wer": 70.0}})

    tuning("a", "slimipl.pt", 1.0, 30.0)
    tuning("b", "slimipl.pt", 2.0, 25.0)  # the better grid for the same teacher
    tuning("c", "old.pt", 3.0, 10.0)  # another teacher's: not this one's weights
    found = tuned_decoders(run, {"sl": "slimipl.pt", "es": "es.pt"})
    assert list(found) == ["sl"] and found["sl"].lm_weight == 2.0  # es: no LM built, greedy
    assert tuned_decoders(run, {"sl": "new.pt"}) == {}
    cfg = RelabelConfig(watch=str(tmp_path / "in"), labels_root=str(tmp_path / "labels"), run_dir=run)
    assert cfg.label_config("m.jsonl", {"sl": "slimipl.pt"}, found).decoders["sl"].lm_weight == 2.0
    mine = {"sl": {"lm": folder, "lm_weight": 0.5}}  # the form's own decoders win over the run's
    cfg = cfg.model_copy(update={"label": {"decoders": mine}})
    assert cfg.label_config("m.jsonl", {"sl": "slimipl.pt"}, found).decoders["sl"].lm_weight == 0.5
