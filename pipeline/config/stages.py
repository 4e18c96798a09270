"""One typed config per stage of the recipe (paper Sec. 4-5, slimIPL), with the paper's defaults.

Every training stage's config names the folder it writes under the run directory (`stage_name()`: e.g.
"finetune/sl"); a per-language stage (one with a `language`) is scored on that language's test rows. The presets
that fill these configs for CPU or the paper are in `pipeline.config.presets`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from pipeline.config.base import (
    AudioPolicy,
    BatchConfig,
    Config,
    FeatureConfig,
    LanguageMix,
    ModelConfig,
    OptimConfig,
    PLFilter,
    TrainingConfig,
    base_model,
    labeling_audio_policy,
    language_code,
    raise_all,
    tiny_training,
    with_overrides,
)
from pipeline.config.decoding import BeamDecoderConfig
from pipeline.layout import StudentVariant

Language = Annotated[str, AfterValidator(language_code)]  # normalized: "SL" → "sl", "pt_BR" → "pt-br"


class SupervisedConfig(TrainingConfig):
    """Stage 1: supervised multilingual CTC + LID training on all labeled languages pooled."""

    train_manifest: str
    dev_manifest: str | None = None
    languages: list[str] | None = None  # None: the languages present in the train manifest
    tokenizer: Literal["char", "sentencepiece"] = "char"
    sentencepiece_vocab_size: int = Field(256, gt=8)
    model: ModelConfig = Field(default_factory=base_model)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    audio: AudioPolicy = Field(default_factory=AudioPolicy)

    @model_validator(mode="after")
    def _check(self) -> SupervisedConfig:
        errors = self.loop_errors(self.audio.max_duration_s)
        if self.languages is not None and len(set(self.languages)) != len(self.languages):
            errors.append(f"languages has duplicates: {self.languages}")
        raise_all(errors)
        return self

    def stage_name(self) -> str:
        """The stage's folder under the run directory."""
        return "supervised"


class FinetuneConfig(TrainingConfig):
    """Stage 2 (paper Sec. 5.1): fine-tune the multilingual checkpoint on one language's labeled data."""

    language: Language
    train_manifest: str  # may hold every language: only `language`'s rows are used
    dev_manifest: str | None = None
    init_checkpoint: str | None = None  # None: <run>/supervised/checkpoints/best.pt
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # None keeps the checkpoint's
    layerdrop: float | None = Field(None, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        raise_all(self.loop_errors())
        return self

    def stage_name(self) -> str:
        """The stage's folder under the run directory."""
        return f"finetune/{self.language}"


class QuantizeConfig(TrainingConfig):
    """Weights-only quantization-aware training of a finished model (USM binarization, Rybakov et al.): its encoder
    linear weights fake-quantized to `bits` in sub-channel blocks of `block`, trained further on every language's
    labeled rows with straight-through gradients, then packed for serving (`checkpoints/packed.pt`)."""

    init_checkpoint: str = Field(description="the float model to quantize, e.g. a student's best.pt")
    train_manifest: str = Field(description="labeled manifest (every language)")
    dev_manifest: str | None = Field(None, description="dev manifest")
    bits: Literal[1, 2, 4, 8] = Field(1, description="weight bits: 1 absmean binarization, 2-8 asymmetric per block")
    block: int = Field(64, gt=0, description="input weights per scale (a row it does not divide uses a divisor)")

    @model_validator(mode="after")
    def _check(self) -> QuantizeConfig:
        raise_all(self.loop_errors())
        return self

    @classmethod
    def presets(cls) -> dict[str, Callable[..., QuantizeConfig]]:
        """`tiny`: 1-bit QAT, AdamW at a third of stage 1's peak LR, 300 updates of 60 s batches; `paper`: the
        paper's fine-tuning settings (Adagrad 0.01, 10k updates), 1 bit in blocks of 64 (Rybakov et al.)."""
        return _finetune_like_presets(cls)

    def stage_name(self) -> str:
        """The stage's folder under the run directory."""
        return f"quantize/{self.bits}bit"


class PruneConfig(TrainingConfig):
    """Structured pruning of a finished model (Yang et al., "Learning ASR pathways"): masks over 8×1 blocks of the
    encoder's linear weights at `sparsity` (the same in every layer), found by iterative magnitude pruning (`imp`:
    `prune_rate` of the remaining blocks per round, `round_updates` updates between rounds, with a group-lasso
    penalty) or with lottery-ticket rewinding (`lth`: the same rounds, each restarting from the model's weights);
    one language-agnostic mask (`agnostic`, searched on every language) or one per language (`pathways`, each
    searched on its language alone). Then `max_updates` updates from the model's weights under the masks, each
    batch one language that updates only its pathway's weights."""

    init_checkpoint: str = Field(description="the dense float model to prune, e.g. a student's best.pt")
    train_manifest: str = Field(description="labeled manifest (every language)")
    dev_manifest: str | None = Field(None, description="dev manifest")
    method: Literal["agnostic", "pathways"] = Field(
        "pathways", description="one mask for all languages, or one per language")
    mask_search: Literal["imp", "lth"] = Field(
        "imp", description="iterative magnitude pruning, or with lottery-ticket rewinding")
    sparsity: float = Field(0.706, ge=0.0, lt=1.0, description="share of pruned weights (the paper's 70.6 %: 0.2 "
                                                                "per round, 6 rounds); 0: no mask")
    prune_rate: float = Field(0.2, gt=0.0, lt=1.0, description="share of the remaining blocks pruned per round")
    round_updates: int = Field(500, gt=0, description="updates per round (and per language for pathways)")
    group_lasso_weight: float = Field(1e-5, ge=0.0, description="λ of the group-lasso penalty (Σ of the 8×1 "
                                                                 "blocks' L2 norms) while searching")
    language_mix: LanguageMix = Field(default_factory=lambda: LanguageMix(kind="temperature"))

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        errors = self.loop_errors()
        if self.method == "pathways" and self.language_mix.kind == "natural":
            errors.append('method="pathways" trains each language\'s mask on batches of that language alone: set '
                          'language_mix.kind to "temperature" or "weights" (natural pools languages in a batch)')
        raise_all(errors)
        return self

    @classmethod
    def presets(cls) -> dict[str, Callable[..., PruneConfig]]:
        """`tiny`: pathways by IMP to the paper's 70.6 %, 40 updates per round and language, then 300 updates;
        `paper`: pathways at the paper's fine-tuning settings (Adagrad 0.01), 10k updates after the search."""
        return _finetune_like_presets(cls, round_updates=40)

    def stage_name(self) -> str:
        """The stage's folder under the run directory."""
        return f"prune/{self.method}-{self.mask_search}"


def _finetune_like_presets(cls: type[TrainingConfig], **tiny_fields: Any) -> dict[str, Callable[..., Any]]:
    """`tiny` and `paper` presets of a stage that trains a finished model further (`_finetune_like`), called with
    (init_checkpoint, train_manifest, dev_manifest, **fields); `tiny_fields` are the tiny preset's own defaults."""
    return {"tiny": lambda *args, **fields: cls(**_finetune_like(True, *args, **(tiny_fields | fields))),
            "paper": lambda *args, **fields: cls(**_finetune_like(False, *args, **fields))}


def _finetune_like(tiny: bool, init_checkpoint: str, train_manifest: str, dev_manifest: str | None = None,
                   **fields: Any) -> dict[str, Any]:
    """The fields of a stage that trains a finished model further, as a fine-tune does: on CPU AdamW at a third of
    stage 1's peak LR for 300 updates of 60 s batches; in the paper Adagrad 0.01 for 10k updates."""
    data = dict(init_checkpoint=init_checkpoint, train_manifest=train_manifest, dev_manifest=dev_manifest)
    if tiny:
        return with_overrides(data | tiny_training(lr=1e-3, warmup_updates=20, num_buckets=4, max_updates=300,
                                                   eval_every=100, save_every=50), fields)
    return data | dict(optim=OptimConfig(lr=0.01, warmup_updates=1000), max_updates=10000, eval_every=1000) | fields


class CollapseGuardConfig(Config):
    """When PLs degenerate (paper Sec. 5.2: long audio labeled as all blanks), stop or roll back."""

    max_empty_share: float = Field(0.5, ge=0.0, le=1.0)  # share of empty PLs in one cache refresh
    max_blank_ratio: float = Field(0.97, ge=0.0, le=1.0)  # mean share of blank frames
    min_chars_per_s: float = Field(2.0, ge=0.0)  # PL characters per second of audio (speech: ≈ 10-15)
    patience: int = Field(20, gt=0)  # M consecutive bad refreshes before acting
    action: Literal["stop", "rollback"] = "stop"
    max_rollbacks: int = Field(2, ge=0)  # with action=rollback: then stop


class SlimIPLConfig(TrainingConfig):
    """Stage 3: slimIPL (Likhomanenko et al. 2021) on one language, with the paper's cropping warmup."""

    language: Language
    train_manifest: str  # labeled rows; only `language`'s are used
    unlabeled_manifest: str  # only `language`'s rows are used
    dev_manifest: str | None = None
    reference_manifest: str | None = None  # hidden true transcripts of unlabeled clips: PL CER, never training
    init_checkpoint: str | None = None  # None: <run>/finetune/<language>/checkpoints/best.pt
    supervised_updates: int = Field(0, ge=0)  # labeled-only updates before PLs are used
    unlabeled_ratio: int = Field(10, gt=0)  # λ: unlabeled steps per labeled step
    pl_cache_size: int = Field(1000, gt=0)  # N: PL batches in the dynamic cache
    pl_cache_update_prob: float = Field(0.1, ge=0.0, le=1.0)  # p: relabel the used slot with this probability
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # before PLs are used; None keeps the checkpoint's
    layerdrop: float | None = Field(None, ge=0.0, lt=1.0)
    pl_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # dynamic dropout once PLs are used
    pl_layerdrop: float = Field(0.1, ge=0.0, lt=1.0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)  # EMA labeler (0.999 in slimIPL); None: live model
    cropping_warmup_updates: int = Field(10000, ge=0)  # K: label 10 s crops for the first K updates
    crop_s: float = Field(10.0, gt=0.0)
    crop_overlap_s: float = Field(2.0, ge=0.0)
    unlabeled_batch: BatchConfig = Field(default_factory=BatchConfig)
    collapse: CollapseGuardConfig = Field(default_factory=CollapseGuardConfig)
    pl_eval_max_utterances: int = Field(200, ge=0)  # unlabeled clips whose PL CER is measured at start and end
    # PL refreshes (and the PL measurements) decode with this LM-fused beam search; None: greedy, as in the paper.
    decoder: BeamDecoderConfig | None = None
    unlabeled_prefetch_batches: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _check(self) -> SlimIPLConfig:
        errors = self.loop_errors()
        if self.crop_overlap_s >= self.crop_s:
            errors.append(
                f"crop_overlap_s={self.crop_overlap_s} must be below crop_s={self.crop_s}; crops would never advance"
            )
        if self.unlabeled_batch.max_batch_duration_s < self.crop_s:
            errors.append(
                f"unlabeled_batch.max_batch_duration_s={self.unlabeled_batch.max_batch_duration_s} is below "
                f"crop_s={self.crop_s}; raise the unlabeled batch budget"
            )
        if self.supervised_updates >= self.max_updates:
            errors.append(
                f"supervised_updates={self.supervised_updates} leaves no PL update within max_updates="
                f"{self.max_updates}"
            )
        raise_all(errors)
        return self

    def stage_name(self) -> str:
        """The stage's folder under the run directory."""
        return f"slimipl/{self.language}"


class LabelConfig(Config):
    """Corpus-wide PL generation (recipe step 4): every unlabeled row labeled by its language's teacher."""

    manifest: str  # unlabeled manifest (JSONL or Parquet, any fsspec URL)
    teachers: dict[str, str]  # language → teacher checkpoint URL (normally <run>/slimipl/<lang>/checkpoints/best.pt)
    batch: BatchConfig = Field(default_factory=lambda: BatchConfig(max_batch_duration_s=200.0, num_buckets=32))
    max_whole_s: float = Field(60.0, gt=0.0)  # longer clips are labeled as crops stitched back together
    crop_s: float = Field(10.0, gt=0.0)
    crop_overlap_s: float = Field(2.0, ge=0.0)
    audio: AudioPolicy = Field(default_factory=labeling_audio_policy)
    filters: PLFilter = Field(default_factory=PLFilter)  # what is written; the rest is a reject with its reason
    unit_max_utterances: int = Field(1000, gt=0)  # a work unit = one Parquet file + one shard
    unit_max_audio_s: float = Field(3600.0, gt=0.0)  # ≤ ≈ 115 MB of 16-bit FLAC per shard
    bf16: bool = True  # autocast where the device has native bf16; fp32 elsewhere (the torch engine)
    num_threads: int | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # where teachers decode
    # What runs the teachers: torch (the checkpoint as trained), or ONNX Runtime on the CPU (the checkpoint
    # exported in memory; int8: its dynamically quantized twin). Part of every unit's key and `decode` column.
    engine: Literal["torch", "onnxruntime"] = "torch"
    onnx_precision: Literal["fp32", "int8"] = "int8"
    prefetch_batches: int = Field(2, ge=0)  # 0: decode in the labeling thread (no prefetch thread)
    # LM-fused beam search in this many child processes, overlapping the model's next batch (0: in the labeling
    # process; a daemonic process, e.g. a Dask worker, always decodes in-process). Not part of any key.
    decode_workers: int = Field(1, ge=0)
    # language → LM-fused beam search (docs/architecture.md, "LM-fused labeling"); other languages decode greedy.
    decoders: dict[str, BeamDecoderConfig] = Field(default_factory=dict)
    # language → confidence below which its PLs are rejects, e.g. read off the dev audit (pipeline/stages/label_audit).
    min_confidence_by_language: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(default_factory=dict)
    audit_manifest: str | None = None  # labeled dev rows labeled like the corpus: CER/WER per confidence bucket
    audit_max_dev_cer: float | None = Field(None, gt=0.0)  # % : thresholds chosen from the audit (needs audit_manifest)

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        errors = []
        if not self.teachers:
            errors.append("teachers is empty: map each language to a checkpoint, e.g. {'sl': 'runs/x/slimipl/sl/"
                          "checkpoints/best.pt'}")
        if self.crop_overlap_s >= self.crop_s:
            errors.append(f"crop_overlap_s={self.crop_overlap_s} must be below crop_s={self.crop_s}")
        if self.engine == "onnxruntime" and self.device.startswith("cuda"):
            errors.append(f"engine='onnxruntime' runs on the CPU (onnxruntime's CPU build) but device={self.device!r}: "
                          "set device='cpu' or 'auto', or engine='torch' to label on the GPU")
        if self.batch.max_batch_duration_s < self.max_whole_s:
            errors.append(
                f"batch.max_batch_duration_s={self.batch.max_batch_duration_s} is below max_whole_s="
                f"{self.max_whole_s}: the longest whole clips could never be batched"
            )
        raise_all(errors)
        return self

    def decode_key(self, precision: str, features: dict[str, Any], decoder: dict[str, Any] | None = None) -> str:
        """Hash of everything that changes a unit's rows: how audio is read, decoded (greedy, or the language's
        beam search and its LM's identity) and filtered, and the engine and precision that ran (not batching,
        threads or unit sizes)."""
        # The torch engine adds nothing, so roots labeled before engines existed keep their keys.
        engine = {} if self.engine == "torch" else {"engine": self.engine}
        blob = json.dumps(
            {"audio": self.audio.model_dump(mode="json"), "filters": self.filters.model_dump(mode="json"),
             "max_whole_s": self.max_whole_s, "crop_s": self.crop_s, "crop_overlap_s": self.crop_overlap_s,
             "precision": precision, "features": features} | engine | ({"decoder": decoder} if decoder else {}),
            sort_keys=True,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class StudentConfig(TrainingConfig):
    """Stage 5 (paper Sec. 5.1, Tables 2-3): one model trained on the labeled data plus every language's PLs.

    `from_scratch` builds a new model (its size may differ from the teachers') with the vocabulary, languages
    and front end of `init_checkpoint`; `finetune` continues `init_checkpoint`'s weights. `labeled_only` turns
    the PL source off: the optional last step, a student fine-tuned on labeled data alone.
    """

    mode: Literal["from_scratch", "finetune"] = "from_scratch"
    train_manifest: str  # labeled rows of every language
    dev_manifest: str | None = None
    labels_root: str | None = None  # the PL corpus; None: <run>/labels
    init_checkpoint: str | None = None  # None: <run>/supervised/checkpoints/best.pt
    model: ModelConfig | None = None  # from_scratch only; None: the init checkpoint's architecture
    labeled_only: bool = False
    source_weights: dict[str, float] | None = None  # {"labeled": w, "pl": w}; None: natural (audio seconds)
    pl_filter: PLFilter = Field(default_factory=PLFilter)  # applied when the PL table is read
    pl_teacher: str | None = None  # read only this teacher's PLs: exact, "<stage>@<step>" or a sha256 prefix
    # Read at most this many hours of PL audio per language, the rows of the lowest ids first (the same prefix for
    # every student: a data-size study's smaller shares nest in its larger ones); None: every row.
    pl_max_hours_per_language: float | None = Field(None, gt=0.0)
    pl_batch: BatchConfig = Field(default_factory=BatchConfig)  # batches of PL clips (long: few per batch)
    pl_window_shards: int = Field(4, gt=0)  # shards whose audio is held at once: the shuffle window
    specaugment_start_updates: int = Field(0, ge=0)  # paper, from scratch: SpecAugment only after a delay
    variant: str | None = None  # stage folder <run>/student/<variant>; None: mode (+ "-labeled-ft")

    @model_validator(mode="after")
    def _check(self) -> StudentConfig:
        errors = self.loop_errors()
        if self.model is not None and self.mode == "finetune":
            errors.append("model is only for mode=from_scratch: a fine-tuned student keeps its checkpoint's shape")
        if self.source_weights is not None:
            unknown = sorted(set(self.source_weights) - {"labeled", "pl"})
            if unknown:
                errors.append(f"source_weights has unknown source(s) {unknown}; the sources are 'labeled' and 'pl'")
            if any(w < 0 for w in self.source_weights.values()) or not any(self.source_weights.values()):
                errors.append(f"source_weights={self.source_weights}: weights must be >= 0 with one above 0")
        if self.variant is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", self.variant):
            errors.append(f"variant={self.variant!r}: use lower-case letters, digits, '-' and '_' (a folder name)")
        raise_all(errors)
        return self

    def variant_name(self) -> str:
        """The student's name: the variant, else the mode (+ "-labeled-ft" for labeled only)."""
        return self.variant or StudentVariant(self.mode, labeled_ft=self.labeled_only).folder

    def stage_name(self) -> str:
        """The stage's folder under the run directory."""
        return f"student/{self.variant_name()}"
