"""The labeling LM (docs/architecture.md, "LM-fused labeling"): a per-language n-gram LM estimated from text only
(`build_lm`), and the LM weight and sil/word score that the teacher decodes best with on labeled dev audio
(`tune_decoder`). Both are cached in `<run>/lm/<lang>/` by the identity of what went in, so a rerun does nothing
and a new teacher retunes without rebuilding the LM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import torch

from models.decode import greedy_ctc_decode
from pipeline.config import BatchConfig, RecipeConfig
from pipeline.config.decoding import BeamDecoderConfig, DecoderTuning, LMConfig
from pipeline.data.dataset import load_dataset
from pipeline.data.rows import read_utterances
from pipeline.data.tokenizer import Tokenizer, tokenizer_from_dict
from pipeline.engine.beam import (
    LM_FILES,
    BeamDecoder,
    binarize,
    cached_decoder,
    estimate_arpa,
    lexicon_lines,
    lm_sentences,
    lm_tokens,
)
from pipeline.engine.decode import dataset_posteriors
from pipeline.engine.evaluate import score
from pipeline.engine.model import load_trained
from storage.checkpoint import read_checkpoint_fields
from storage.files import (
    atomic_write_text,
    copy_file,
    exists,
    join,
    list_files,
    local_folder,
    read_json,
    read_text,
    remove,
    sha256_of,
    write_json,
)

log = logging.getLogger("mlpl.lm")

LM_FORMAT = 2  # bump when an LM folder's files change (2: + lm.bin), so older folders are rebuilt


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def lm_dir(run_dir: str, language: str) -> str:
    """A language's LM folder in a run."""
    return join(run_dir, "lm", language)


def lm_identity(language: str, lm_url: str) -> str:
    """The identity of a finished LM folder (its meta.json).

    Raises:
        FileNotFoundError: the folder holds no finished LM.
    """
    meta = join(lm_url, "meta.json")
    if not exists(meta):
        raise FileNotFoundError(f"the {language!r} decoder's LM {lm_url} is not built (no meta.json): build it with "
                                "the recipe's lm step (labeling_lm), or drop the language from `decoders`")
    return read_json(meta)["identity"]


def open_decoder(language: str, cfg: BeamDecoderConfig, tokenizer: Tokenizer,
                 identity: str | None = None) -> BeamDecoder:
    """A language's beam search over its built LM (`identity`: its meta.json's, when the caller read it already),
    the LM's files fetched to this machine once (KenLM reads only local files), built once per process.

    Raises:
        FileNotFoundError: the LM is not built.
    """
    local = local_folder(cfg.lm, list(LM_FILES), (identity or lm_identity(language, cfg.lm))[:16])
    return cached_decoder(cfg, local, tokenizer)


def build_lm(cfg: LMConfig, run_dir: str) -> dict[str, Any]:
    """Estimate (or reuse) a language's n-gram LM into `<run>/lm/<lang>/` and return its record (meta.json).

    Raises:
        FileNotFoundError: a text file or the manifest is missing.
        ValueError: no sentence of the text can be spelled with the teacher's vocabulary.
    """
    out = lm_dir(run_dir, cfg.language)
    tokenizer = tokenizer_from_dict(read_checkpoint_fields(cfg.tokenizer_checkpoint, ["tokenizer"])["tokenizer"])
    tokens = lm_tokens(tokenizer)
    texts: list[str] = []
    sources: dict[str, str] = {}
    if cfg.labeled_manifest is not None:
        utts, _ = read_utterances(cfg.labeled_manifest, require_text=True, languages=None, language=cfg.language)
        texts += [u.text for u in utts]
        sources[cfg.labeled_manifest] = sha256_of(cfg.labeled_manifest)
    for url in cfg.text_files:
        if not exists(url):
            raise FileNotFoundError(f"LM text for {cfg.language!r} not found: {url}")
        texts += read_text(url).splitlines()
        sources[url] = sha256_of(url)
    identity = _sha({"format": LM_FORMAT, "config": cfg.model_dump(mode="json", exclude={"tokenizer_checkpoint"}),
                     "tokens": tokens, "sources": sources})
    meta_url = join(out, "meta.json")
    if exists(meta_url):
        meta = read_json(meta_url)
        if meta.get("identity") == identity:
            return meta
    remove(meta_url)  # first: a folder caught between two builds must not pass for a finished LM
    t0 = time.perf_counter()
    lines, dropped = lm_sentences(texts, tokenizer, cfg.unit)
    if not lines:
        raise ValueError(f"no sentence of the {cfg.language!r} LM text can be spelled with the teacher's vocabulary "
                         f"({dropped} dropped for unknown characters)")
    with tempfile.TemporaryDirectory(prefix="mlpl-lm-") as tmp:
        arpa = os.path.join(tmp, "lm.arpa")
        lmplz_log = estimate_arpa(lines, cfg.order, cfg.prune, arpa)
        binarize(arpa, os.path.join(tmp, "lm.bin"))
        copy_file(arpa, join(out, "lm.arpa"))
        copy_file(os.path.join(tmp, "lm.bin"), join(out, "lm.bin"))
    atomic_write_text(join(out, "tokens.txt"), "\n".join(tokens) + "\n")
    atomic_write_text(join(out, "lm_dict.txt"), "\n".join(tokens) + "\n")  # lexicon-free: LM words = tokens
    atomic_write_text(join(out, "lexicon.txt"), "\n".join(lexicon_lines(lines, tokenizer) if cfg.unit == "word"
                                                          else []) + "\n")
    meta = {"identity": identity, "language": cfg.language, "unit": cfg.unit, "order": cfg.order,
            "sentences": len(lines), "dropped_sentences": dropped, "sources": sources,
            "lm_sha256": sha256_of(join(out, "lm.arpa")), "build_s": round(time.perf_counter() - t0, 2),
            "lmplz": lmplz_log.strip().splitlines()[-1:] if lmplz_log else [],
            "built_at": datetime.now(UTC).isoformat()}
    write_json(meta_url, meta)  # last: a folder with meta.json is complete
    log.info("LM %s: %s %d-gram from %d sentences (%d dropped) in %.1f s", cfg.language, cfg.unit, cfg.order,
             len(lines), dropped, meta["build_s"])
    return meta


def _grid(base: BeamDecoderConfig, grid: DecoderTuning) -> list[BeamDecoderConfig]:
    second = ("sil_score", grid.sil_scores) if base.unit == "char" else ("word_score", grid.word_scores)
    return [base.model_copy(update={"lm_weight": w, second[0]: v}) for w in grid.lm_weights for v in second[1]]


def tune_decoder(teacher: str, language: str, lm_url: str, base: BeamDecoderConfig, grid: DecoderTuning,
                 dev_manifest: str, *, batch: BatchConfig, bf16: bool = True) -> dict[str, Any]:
    """The LM weight and sil (char) or word (word) score with the lowest dev CER for this teacher, with the whole
    grid and greedy's figures; cached in the LM folder by teacher, LM, grid and dev set.

    Raises:
        ValueError: the dev manifest has no row of the language.
    """
    meta = read_json(join(lm_url, "meta.json"))
    key = _sha({"teacher": sha256_of(teacher), "lm": meta["identity"], "base": base.model_dump(mode="json"),
                "grid": grid.key(), "dev": sha256_of(dev_manifest)})[:16]
    url = join(lm_url, f"tuning-{key}.json")
    if exists(url):
        return read_json(url)
    t0 = time.perf_counter()
    trained = load_trained(teacher)
    ds = load_dataset(dev_manifest, features=trained.features, policy=trained.audio_policy, require_text=True,
                      languages=trained.languages, language=language)
    ds.utterances = ds.utterances[: grid.max_utterances]
    if not ds.utterances:
        raise ValueError(f"{dev_manifest} has no {language!r} row to tune the decoder on")
    posteriors = dataset_posteriors(trained.model, ds, languages=trained.languages, batch=batch, bf16=bf16)
    local = local_folder(lm_url, list(LM_FILES), meta["identity"][:16])

    def scored(decode) -> dict[str, float]:
        rows = [{"language": language, "reference": u.text, "hypothesis": decode(lp), "lid_pred": language}
                for u, lp in posteriors]
        figures = score(rows)[language]
        return {"cer": round(figures["cer"], 2), "wer": round(figures["wer"], 2)}

    greedy = scored(lambda lp: trained.tokenizer.decode(
        greedy_ctc_decode(lp.unsqueeze(0), torch.tensor([lp.shape[0]]), blank=trained.tokenizer.blank_id)[0].tokens))
    table = []
    for cfg in _grid(base.model_copy(update={"lm": lm_url}), grid):
        decoder = BeamDecoder(cfg, local, trained.tokenizer)
        table.append({"lm_weight": cfg.lm_weight, "sil_score": cfg.sil_score, "word_score": cfg.word_score}
                     | scored(decoder.decode))
    best = min(table, key=lambda r: (r["cer"], r["wer"]))
    chosen = base.model_copy(update={"lm": lm_url, **{k: best[k] for k in ("lm_weight", "sil_score", "word_score")}})
    result = {"key": key, "language": language, "teacher": teacher, "lm": lm_url, "dev_manifest": dev_manifest,
              "dev_utterances": len(posteriors), "greedy": greedy, "chosen": chosen.model_dump(mode="json"),
              "chosen_dev": {"cer": best["cer"], "wer": best["wer"]}, "grid": table,
              "tune_s": round(time.perf_counter() - t0, 1)}
    write_json(url, result)
    log.info("decoder %s: dev CER %.1f → %.1f, WER %.1f → %.1f with %s (%d clips, %.0f s)", language,
             greedy["cer"], best["cer"], greedy["wer"], best["wer"], chosen.describe(), len(posteriors),
             result["tune_s"])
    return result


def labeling_decoders(recipe: RecipeConfig, teachers: dict[str, str],
                      batch: BatchConfig) -> tuple[dict[str, BeamDecoderConfig], dict[str, dict[str, Any]]]:
    """For each language with unlabeled rows: its LM built and its beam search tuned on dev with the teacher that
    labels it (weights the form fixes are kept), and what was built and measured (for the run record and the UI)."""
    decoders: dict[str, BeamDecoderConfig] = {}
    records: dict[str, dict[str, Any]] = {}
    utts, _ = read_utterances(recipe.unlabeled_manifest, require_text=False, languages=None)
    present = {u.language for u in utts}
    for lang, teacher in sorted(teachers.items()):
        if lang not in present:
            continue
        meta = build_lm(recipe.lm_config(lang, teacher), recipe.run_dir)
        base = recipe.beam_config(lm_dir(recipe.run_dir, lang))
        record: dict[str, Any] = {"lm": {k: meta[k] for k in ("unit", "order", "sentences", "dropped_sentences")}}
        if recipe.fixed_decoder_weights() or recipe.dev_manifest is None:
            decoders[lang] = base
        else:
            tuned = tune_decoder(teacher, lang, base.lm, base, recipe.decoder_tuning, recipe.dev_manifest,
                                 batch=batch)
            decoders[lang] = BeamDecoderConfig(**tuned["chosen"])
            record["dev"] = {"greedy": tuned["greedy"], "beam": tuned["chosen_dev"], "clips": tuned["dev_utterances"]}
        record["decoder"] = decoders[lang].describe()
        records[lang] = record
    return decoders, records


def tuned_decoders(run_dir: str, teachers: dict[str, str]) -> dict[str, BeamDecoderConfig]:
    """The beam decoders a recipe run tuned for these teachers (`<run>/lm/<lang>/tuning-*.json` whose teacher
    matches and whose LM is still the one built): what the relabel job labels with. The lowest dev CER wins where
    several grids were tuned; a language without a built LM or a tuning for its teacher is absent (greedy)."""
    out: dict[str, BeamDecoderConfig] = {}
    for lang, teacher in sorted(teachers.items()):
        folder = lm_dir(run_dir, lang)
        if not exists(join(folder, "meta.json")):
            continue
        found = [read_json(u) for u in list_files(folder, "tuning-*.json")]
        found = [t for t in found if t.get("teacher") == teacher and t.get("lm") == folder]
        if found:
            best = min(found, key=lambda t: (t["chosen_dev"]["cer"], t["chosen_dev"]["wer"]))
            out[lang] = BeamDecoderConfig(**best["chosen"])
    return out
