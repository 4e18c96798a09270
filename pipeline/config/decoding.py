"""How pseudo-labels are decoded: greedy CTC (the paper's slimIPL) or CTC beam search fused with a per-language
n-gram LM (torchaudio's `ctc_decoder`, flashlight-text), and how that LM is built and its weights tuned on dev.
See docs/architecture.md, "LM-fused labeling"."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Config, raise_all

LMUnit = Literal["char", "word"]


class BeamDecoderConfig(Config):
    """CTC beam search fused with a language's n-gram LM (flashlight's decoder). `char`: lexicon-free over the
    character vocabulary, the LM's "words" are characters and a space is the sil token; `word`: a lexicon of the
    LM text's words, so only words seen in text come out."""

    lm: str = Field(description="the language's LM folder (built by the lm step: lm.arpa, tokens.txt, ...)")
    unit: LMUnit = Field("char", description="char: lexicon-free character LM; word: word LM with a lexicon")
    beam_size: int = Field(50, ge=1, description="hypotheses kept per frame")
    beam_size_token: int = Field(10, ge=1, description="tokens tried per frame (the speed lever on 2 cores)")
    beam_threshold: float = Field(25.0, gt=0.0, description="drop hypotheses this far below the best")
    lm_weight: float = Field(2.0, ge=0.0, description="weight of the LM's log-probability")
    sil_score: float = Field(0.0, description="added per sil token (space): restores word boundaries lexicon-free")
    word_score: float = Field(0.0, description="added per word (word unit)")
    log_add: bool = Field(True, description="a hypothesis scores the sum over its CTC alignments, not only its best "
                                            "one (measured: PL CER 0.73x -> 0.67x greedy's on the demo)")

    def describe(self) -> str:
        """What ran, for the `decode` column: e.g. `beam50/10 char-LM w=2 sil=3` (`max`: best alignment only)."""
        extra = f"sil={self.sil_score:g}" if self.unit == "char" else f"word={self.word_score:g}"
        return (f"beam{self.beam_size}/{self.beam_size_token}{'' if self.log_add else ' max'} {self.unit}-LM "
                f"w={self.lm_weight:g} {extra}")


class LMConfig(Config):
    """A language's n-gram LM for labeling, estimated by KenLM's lmplz (modified Kneser-Ney) from text only: the
    labeled transcripts of the language plus optional text files (never the unlabeled clips' transcripts, never
    dev/test)."""

    language: str
    tokenizer_checkpoint: str = Field(description="checkpoint whose vocabulary the LM's tokens must match")
    labeled_manifest: str | None = Field(None, description="the language's labeled transcripts join the LM text")
    text_files: list[str] = Field(default_factory=list, description="plain text, one sentence per line")
    unit: LMUnit = "char"
    order: int = Field(6, ge=2, le=6, description="n-gram order (6 is the most flashlight-text's KenLM loads)")
    prune: list[int] = Field(default_factory=list, description="lmplz --prune thresholds per order (empty: none)")

    @model_validator(mode="after")
    def _check(self) -> LMConfig:
        errors = []
        if self.labeled_manifest is None and not self.text_files:
            errors.append(f"the {self.language!r} LM has no text: give labeled_manifest and/or text_files")
        if len(self.prune) > self.order:
            errors.append(f"prune has {len(self.prune)} thresholds for an order-{self.order} LM")
        raise_all(errors)
        return self

    def stage_name(self) -> str:
        """The LM's folder under the run directory."""
        return f"lm/{self.language}"


class DecoderTuning(Config):
    """The grid that picks a language's LM weight and sil (char) or word (word) score on labeled dev audio, with
    the teacher that labels. The pick minimizes dev CER; beam sizes stay as configured."""

    lm_weights: list[float] = Field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
                                    description="LM weights tried")
    sil_scores: list[float] = Field(default_factory=lambda: [0.0, 1.0, 2.0, 3.0, 4.0],
                                    description="sil (space) scores tried with the char unit")
    word_scores: list[float] = Field(default_factory=lambda: [-1.0, 0.0, 1.0, 2.0, 3.0],
                                     description="word scores tried with the word unit")
    max_utterances: int = Field(200, ge=1, description="dev clips per language the grid decodes")

    def key(self) -> str:
        """Hash of the grid."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
