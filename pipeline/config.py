"""Typed configs for every training stage (paper Sec. 4-5, slimIPL), with the paper's defaults.

Each stage has one pydantic model with `extra="forbid"`; presets are functions (`tiny()`, `base()`).
Configs stop at the builder: `model_kwargs()` maps `ModelConfig` onto the flat arguments of models/.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def config_hash(self) -> str:
        """Short stable hash of the config, recorded with checkpoints and outputs."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class ModelConfig(_Config):
    """Encoder shape (paper Sec. 4: Conv1d k=7 s=3 + GLU, N transformer layers, CTC + LID heads)."""

    d_model: int = Field(768, gt=0)
    n_layers: int = Field(36, gt=0)
    n_heads: int = Field(4, gt=0)
    ffn_dim: int = Field(3072, gt=0)
    conv_kernel: int = Field(7, gt=0)
    conv_stride: int = Field(3, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layerdrop: float = Field(0.1, ge=0.0, lt=1.0)
    max_relative_distance: int = Field(64, gt=0)  # frames after subsampling (30 ms each)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        return self


def tiny_model() -> ModelConfig:
    """A model that trains on 2 CPU cores in minutes (≈1.2 M parameters)."""
    # No dropout: on CPU its random masks took 41 % of an update, and at this size SpecAugment and the
    # corpus' channel noise regularize enough (1.7x more updates in the same time gave lower dev CER).
    return ModelConfig(d_model=144, n_layers=4, n_heads=4, ffn_dim=576, dropout=0.0, layerdrop=0.0)


def base_model() -> ModelConfig:
    """Paper base: 36 layers, d 768, 4 heads, FFN 3072 (≈275 M in the paper)."""
    return ModelConfig()


def large_model() -> ModelConfig:
    """Paper large: FFN and attention dims doubled (≈1.06 B in the paper)."""
    return ModelConfig(d_model=1536, ffn_dim=6144)


MODEL_PRESETS = {"tiny": tiny_model, "base": base_model, "large": large_model}


def model_preset(name: str) -> ModelConfig:
    """Model config by preset name.

    Raises:
        ValueError: naming the known presets when the name is unknown.
    """
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]()


def model_kwargs(cfg: ModelConfig, vocab_size: int, num_languages: int, n_mels: int) -> dict[str, Any]:
    """Flat keyword arguments for `models.encoder.CTCLIDModel`."""
    return dict(vocab_size=vocab_size, num_languages=num_languages, n_mels=n_mels, **cfg.model_dump())


class FeatureConfig(_Config):
    """Log-mel front end (paper: 80 dims, 25 ms Hamming window, 10 ms hop, 16 kHz)."""

    sample_rate_hz: int = 16000
    n_mels: int = Field(80, gt=0)
    win_ms: float = Field(25.0, gt=0)
    hop_ms: float = Field(10.0, gt=0)


class AudioPolicy(_Config):
    """What input audio is accepted; everything else becomes a reject row with a reason."""

    min_sample_rate_hz: int = Field(16000, gt=0)  # lower rates lack the upper band the model expects
    downmix_multichannel: bool = False  # off: a stereo file is more likely a wrong file than a choice
    max_duration_s: float = Field(40.0, gt=0)
    min_duration_s: float = Field(0.3, gt=0)
    silence_peak: float = Field(1e-4, ge=0)  # peak |sample| below this counts as silent


class SpecAugmentConfig(_Config):
    """SpecAugment masks (paper: 2 time masks for short Common Voice clips)."""

    freq_masks: int = Field(2, ge=0)
    freq_mask_width: int = Field(27, ge=0)
    time_masks: int = Field(2, ge=0)
    time_mask_width: int = Field(40, ge=0)  # fbank frames (10 ms)
    time_mask_max_ratio: float = Field(0.2, gt=0, le=1.0)  # a mask never covers more than this of a clip


class BatchConfig(_Config):
    """Dynamic batching by audio seconds (paper: 200 s of audio per batch per GPU)."""

    max_batch_duration_s: float = Field(200.0, gt=0)  # padded seconds: batch size × longest clip
    max_batch_size: int = Field(256, gt=0)
    num_buckets: int = Field(10, gt=0)


class OptimConfig(_Config):
    """Optimizer and LR schedule (paper: Adagrad lr 0.03 with warmup and grad-norm clipping)."""

    name: Literal["adagrad", "adamw"] = "adagrad"
    lr: float = Field(0.03, gt=0)
    warmup_updates: int = Field(64000, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    min_lr_ratio: float = Field(0.05, ge=0, le=1)  # cosine floor as a fraction of lr
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(1.0, gt=0)


# Fields that change how a run is watched or how far it goes, not what an update computes: a run may be
# resumed with other values (more threads, a longer budget), so the resume key leaves them out.
# Budget, cadence and where it runs: a run may be extended, or resumed with other threads or on another device.
_NOT_IN_RESUME_KEY = {"max_updates", "eval_every", "save_every", "log_every", "num_threads", "device"}


class TrainingConfig(_Config):
    """What every training stage shares: optimizer, batches, SpecAugment, γ, budget and cadence."""

    specaugment: SpecAugmentConfig = Field(default_factory=SpecAugmentConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    lid_weight: float = Field(1.0, ge=0.0)  # γ in ℓ = ℓ_CTC + γ·ℓ_LID (γ = 1 best in the paper)
    max_updates: int = Field(300000, gt=0)
    eval_every: int = Field(5000, gt=0)
    save_every: int = Field(1000, gt=0)
    log_every: int = Field(100, gt=0)
    bf16: bool = True  # autocast where the device has native bf16 (CUDA, AVX-512 BF16 CPUs); fp32 elsewhere
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto: CUDA when present, else CPU
    seed: int = 0

    def resume_key(self) -> str:
        """Hash of the fields that change what an update computes (not budget, cadence or threads)."""
        blob = json.dumps(self.model_dump(mode="json", exclude=_NOT_IN_RESUME_KEY), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _loop_errors(self, max_duration_s: float | None) -> list[str]:
        errors = []
        if max_duration_s is not None and self.batch.max_batch_duration_s < max_duration_s:
            errors.append(
                f"batch.max_batch_duration_s={self.batch.max_batch_duration_s} is below "
                f"audio.max_duration_s={max_duration_s}: the longest clips could never be batched; "
                "raise the batch budget or lower audio.max_duration_s"
            )
        if self.optim.warmup_updates > self.max_updates:
            errors.append(
                f"optim.warmup_updates={self.optim.warmup_updates} exceeds max_updates={self.max_updates}; "
                "the LR would never reach its peak"
            )
        return errors


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
        errors = self._loop_errors(self.audio.max_duration_s)
        if self.languages is not None and len(set(self.languages)) != len(self.languages):
            errors.append(f"languages has duplicates: {self.languages}")
        if errors:
            raise ValueError("; ".join(errors))
        return self


def tiny_specaugment() -> SpecAugmentConfig:
    """SpecAugment of every CPU preset: narrower masks than the paper's for a 1.2 M-parameter model."""
    return SpecAugmentConfig(freq_masks=2, freq_mask_width=15, time_masks=2, time_mask_width=20)


def _with_overrides(preset: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A preset's fields with overrides; a shortened run keeps a proportionate warmup instead of failing."""
    cfg = preset | overrides
    if "max_updates" in overrides and "optim" not in overrides:
        warmup = min(preset["optim"].warmup_updates, max(1, int(cfg["max_updates"]) // 10))
        cfg["optim"] = cfg["optim"].model_copy(update={"warmup_updates": warmup})
    return cfg


def supervised_tiny(train_manifest: str, dev_manifest: str | None = None, **overrides: Any) -> SupervisedConfig:
    """CPU preset: tiny model, AdamW (peak lr 3e-3) with warmup + cosine decay, 60 s batches, 2000 updates."""
    cfg = dict(
        train_manifest=train_manifest,
        dev_manifest=dev_manifest,
        model=tiny_model(),
        batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=64, num_buckets=8),
        optim=OptimConfig(name="adamw", lr=3e-3, warmup_updates=60, schedule="cosine", weight_decay=0.01),
        specaugment=tiny_specaugment(),
        max_updates=2000,
        eval_every=500,
        save_every=100,
        log_every=50,
    )
    return SupervisedConfig(**_with_overrides(cfg, overrides))


def supervised_paper(train_manifest: str, dev_manifest: str | None = None, **overrides: Any) -> SupervisedConfig:
    """The paper's setting: base model, Adagrad lr 0.03, 200 s batches."""
    return SupervisedConfig(train_manifest=train_manifest, dev_manifest=dev_manifest, **overrides)


SUPERVISED_PRESETS = {"tiny": supervised_tiny, "paper": supervised_paper}


def supervised_preset(name: str, train_manifest: str, dev_manifest: str | None = None, **overrides: Any):
    """Supervised config by preset name with field overrides.

    Raises:
        ValueError: naming the known presets when the name is unknown.
    """
    if name not in SUPERVISED_PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(SUPERVISED_PRESETS)}")
    return SUPERVISED_PRESETS[name](train_manifest, dev_manifest, **overrides)


class FinetuneConfig(TrainingConfig):
    """Stage 2 (paper Sec. 5.1): fine-tune the multilingual checkpoint on one language's labeled data."""

    language: str
    train_manifest: str  # may hold every language: only `language`'s rows are used
    dev_manifest: str | None = None
    init_checkpoint: str | None = None  # None: <run>/supervised/checkpoints/best.pt
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # None keeps the checkpoint's
    layerdrop: float | None = Field(None, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        errors = self._loop_errors(None)
        if errors:
            raise ValueError("; ".join(errors))
        return self


class CollapseGuardConfig(_Config):
    """When PLs degenerate (paper Sec. 5.2: long audio labeled as all blanks), stop or roll back."""

    max_empty_share: float = Field(0.5, ge=0.0, le=1.0)  # share of empty PLs in one cache refresh
    max_blank_ratio: float = Field(0.97, ge=0.0, le=1.0)  # mean share of blank frames
    min_chars_per_s: float = Field(2.0, ge=0.0)  # PL characters per second of audio (speech: ≈ 10-15)
    patience: int = Field(20, gt=0)  # M consecutive bad refreshes before acting
    action: Literal["stop", "rollback"] = "stop"
    max_rollbacks: int = Field(2, ge=0)  # with action=rollback: then stop


class SlimIPLConfig(TrainingConfig):
    """Stage 3: slimIPL (Likhomanenko et al. 2021) on one language, with the paper's cropping warmup."""

    language: str
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
    unlabeled_prefetch_batches: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _check(self) -> SlimIPLConfig:
        errors = self._loop_errors(None)
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
        if errors:
            raise ValueError("; ".join(errors))
        return self


def finetune_tiny(language: str, train_manifest: str, dev_manifest: str | None = None, **overrides: Any):
    """CPU preset: AdamW at a third of stage 1's peak LR, 300 updates of 60 s batches."""
    cfg = dict(
        language=language,
        train_manifest=train_manifest,
        dev_manifest=dev_manifest,
        batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=64, num_buckets=4),
        optim=OptimConfig(name="adamw", lr=1e-3, warmup_updates=20, schedule="cosine", weight_decay=0.01),
        specaugment=tiny_specaugment(),
        max_updates=300,
        eval_every=100,
        save_every=50,
        log_every=50,
    )
    return FinetuneConfig(**_with_overrides(cfg, overrides))


def finetune_paper(language: str, train_manifest: str, dev_manifest: str | None = None, **overrides: Any):
    """The paper's fine-tune: 10k updates at a lower LR than stage 1 (Adagrad 0.01, short warmup)."""
    cfg = dict(
        language=language,
        train_manifest=train_manifest,
        dev_manifest=dev_manifest,
        optim=OptimConfig(lr=0.01, warmup_updates=1000),
        max_updates=10000,
        eval_every=1000,
    )
    return FinetuneConfig(**(cfg | overrides))


def slimipl_tiny(
    language: str, train_manifest: str, unlabeled_manifest: str, dev_manifest: str | None = None, **overrides: Any
):
    """CPU preset: λ 4, N 40, p 0.1, 100 cropping-warmup updates of 400, 60 s batches, no dropout."""
    cfg = dict(
        language=language,
        train_manifest=train_manifest,
        unlabeled_manifest=unlabeled_manifest,
        dev_manifest=dev_manifest,
        batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=64, num_buckets=4),
        unlabeled_batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=16, num_buckets=8),
        optim=OptimConfig(name="adamw", lr=1e-3, warmup_updates=20, schedule="cosine", weight_decay=0.01),
        specaugment=tiny_specaugment(),
        unlabeled_ratio=4,
        pl_cache_size=40,
        pl_dropout=0.0,
        pl_layerdrop=0.0,
        cropping_warmup_updates=100,
        max_updates=400,  # 25 s clips cost ≈ 2.5× a labeled update per audio second (attention is quadratic)
        eval_every=100,
        save_every=50,
        log_every=50,
    )
    return SlimIPLConfig(**_with_overrides(cfg, overrides))


def slimipl_paper(
    language: str, train_manifest: str, unlabeled_manifest: str, dev_manifest: str | None = None, **overrides: Any
):
    """The paper's slimIPL: λ 10, N 1000, p 0.1, 10k cropping-warmup updates, Adagrad 0.01."""
    cfg = dict(
        language=language,
        train_manifest=train_manifest,
        unlabeled_manifest=unlabeled_manifest,
        dev_manifest=dev_manifest,
        optim=OptimConfig(lr=0.01, warmup_updates=1000),
        max_updates=100000,
        eval_every=5000,
    )
    return SlimIPLConfig(**(cfg | overrides))


FINETUNE_PRESETS = {"tiny": finetune_tiny, "paper": finetune_paper}
SLIMIPL_PRESETS = {"tiny": slimipl_tiny, "paper": slimipl_paper}


def stage_preset(presets: dict[str, Any], name: str, *args: Any, **overrides: Any):
    """A stage config by preset name with field overrides.

    Raises:
        ValueError: naming the known presets when the name is unknown.
    """
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    return presets[name](*args, **overrides)


class PLFilterConfig(_Config):
    """Which pseudo-labels are kept (paper Sec. 5.1: drop empty PLs and PLs over 630 tokens)."""

    min_tokens: int = Field(1, ge=0)  # 1: an empty PL is dropped
    max_tokens: int = Field(630, gt=0)
    min_confidence: float | None = Field(None, ge=0.0, le=1.0)  # mean top posterior per frame; None: keep all
    require_lid_agreement: bool = False  # drop rows whose LID prediction is not the declared language


def labeling_audio_policy() -> AudioPolicy:
    """What labeling accepts: stereo is downmixed, clips up to 3 h (long ones are cropped and stitched)."""
    return AudioPolicy(downmix_multichannel=True, max_duration_s=3 * 3600.0)


class LabelConfig(_Config):
    """Corpus-wide PL generation (recipe step 4): every unlabeled row labeled by its language's teacher."""

    manifest: str  # unlabeled manifest (JSONL or Parquet, any fsspec URL)
    teachers: dict[str, str]  # language → teacher checkpoint URL (normally <run>/slimipl/<lang>/checkpoints/best.pt)
    batch: BatchConfig = Field(default_factory=lambda: BatchConfig(max_batch_duration_s=200.0, num_buckets=32))
    max_whole_s: float = Field(60.0, gt=0.0)  # longer clips are labeled as crops stitched back together
    crop_s: float = Field(10.0, gt=0.0)
    crop_overlap_s: float = Field(2.0, ge=0.0)
    audio: AudioPolicy = Field(default_factory=labeling_audio_policy)
    filters: PLFilterConfig = Field(default_factory=PLFilterConfig)
    unit_max_utterances: int = Field(1000, gt=0)  # a work unit = one Parquet file + one shard
    unit_max_audio_s: float = Field(3600.0, gt=0.0)  # ≤ ≈ 115 MB of 16-bit FLAC per shard
    bf16: bool = True  # autocast where the device has native bf16; fp32 elsewhere
    num_threads: int | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # where teachers decode
    prefetch_batches: int = Field(2, ge=0)  # 0: decode in the labeling thread (no prefetch thread)

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        errors = []
        if not self.teachers:
            errors.append("teachers is empty: map each language to a checkpoint, e.g. {'sl': 'runs/x/slimipl/sl/"
                          "checkpoints/best.pt'}")
        if self.crop_overlap_s >= self.crop_s:
            errors.append(f"crop_overlap_s={self.crop_overlap_s} must be below crop_s={self.crop_s}")
        if self.batch.max_batch_duration_s < self.max_whole_s:
            errors.append(
                f"batch.max_batch_duration_s={self.batch.max_batch_duration_s} is below max_whole_s="
                f"{self.max_whole_s}: the longest whole clips could never be batched"
            )
        if self.filters.min_tokens > self.filters.max_tokens:
            errors.append(f"filters.min_tokens={self.filters.min_tokens} exceeds filters.max_tokens="
                          f"{self.filters.max_tokens}: every PL would be dropped")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def decode_key(self, precision: str, features: dict[str, Any]) -> str:
        """Hash of everything that changes a unit's rows: how audio is read, decoded and filtered, and the
        precision that ran (not batching, threads or unit sizes)."""
        blob = json.dumps(
            {"audio": self.audio.model_dump(mode="json"), "filters": self.filters.model_dump(mode="json"),
             "max_whole_s": self.max_whole_s, "crop_s": self.crop_s, "crop_overlap_s": self.crop_overlap_s,
             "precision": precision, "features": features},
            sort_keys=True,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def label_tiny(manifest: str, teachers: dict[str, str], **overrides: Any) -> LabelConfig:
    """CPU preset: 60 s batches (measured fastest on 2 cores), units of at most 200 clips."""
    cfg = dict(manifest=manifest, teachers=teachers,
               batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=64, num_buckets=32),
               unit_max_utterances=200)
    return LabelConfig(**(cfg | overrides))


def label_paper(manifest: str, teachers: dict[str, str], **overrides: Any) -> LabelConfig:
    """The paper's setting: 200 s batches, PLs of 1-630 tokens kept, no confidence or LID filter."""
    return LabelConfig(manifest=manifest, teachers=teachers, **overrides)


LABEL_PRESETS = {"tiny": label_tiny, "paper": label_paper}

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3")


class RelabelConfig(_Config):
    """The relabel job (docs/architecture.md, "Relabel"): label the audio that arrived in a watched folder since
    the last run, or that an older teacher labeled, into an existing labels root."""

    watch: str = Field(description="folder (any fsspec URL) that receives new unlabeled audio")
    labels_root: str = Field(description="labels root the new pseudo-labels are committed into")
    teachers: dict[str, str] = Field(
        default_factory=dict, description="language → teacher checkpoint; empty: each language's best model in run_dir")
    run_dir: str | None = Field(None, description="recipe run whose best models are the default teachers")
    language_from: Literal["path", "manifest"] = Field(
        "path", description="path: <watch>/<lang>/...; manifest: *.jsonl files in the watched folder list "
                            "audio (relative to the manifest) with its language")
    unknown_language: Literal["lid", "reject"] = Field(
        "lid", description="a file whose language is unknown or has no teacher: ask the LID head of lid_checkpoint, "
                           "or reject it with the reason")
    lid_checkpoint: str | None = Field(
        None, description="multilingual checkpoint whose LID head names unknown languages; None: "
                          "<run_dir>/supervised/checkpoints/best.pt")
    extensions: list[str] = Field(default_factory=lambda: list(AUDIO_EXTENSIONS),
                                  description="audio file name endings to pick up (case-insensitive)")
    preset: Literal["tiny", "paper"] = Field("paper", description="labeling preset: paper defaults or tiny (CPU)")
    label: dict[str, Any] = Field(default_factory=dict, description="overrides of the labeling config")
    lock_wait_s: float = Field(3600.0, ge=0.0, description="how long to wait for another relabel run of the "
                                                           "same labels root to finish before failing")

    @model_validator(mode="after")
    def _check(self) -> RelabelConfig:
        if not self.teachers and self.run_dir is None:
            raise ValueError("give teachers (language → checkpoint) or run_dir (its best models are the teachers)")
        if self.unknown_language == "lid" and self.lid_checkpoint is None and self.run_dir is None:
            raise ValueError("unknown_language='lid' needs lid_checkpoint or run_dir")
        self.label_config("manifest.jsonl", {"xx": "teacher.pt"})  # a bad override fails now, not at 2 a.m.
        return self

    def label_config(self, manifest: str, teachers: dict[str, str]) -> LabelConfig:
        """The labeling config of one relabel run's manifest of new files."""
        return _configured(LabelConfig, LABEL_PRESETS[self.preset](manifest, teachers), self.label)


class PLReadFilter(_Config):
    """Which rows of a PL corpus a student reads (applied at read time: one corpus serves many students)."""

    min_tokens: int = Field(1, ge=0)
    max_tokens: int = Field(630, gt=0)  # paper Sec. 5.1: PLs over 630 tokens are dropped
    min_confidence: float | None = Field(None, ge=0.0, le=1.0)
    require_lid_agreement: bool = False
    teacher: str | None = None  # exact teacher, its "<stage>@<step>", or a sha256 prefix; None: every teacher


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
    pl_filter: PLReadFilter = Field(default_factory=PLReadFilter)
    pl_batch: BatchConfig = Field(default_factory=BatchConfig)  # batches of PL clips (long: few per batch)
    pl_window_shards: int = Field(4, gt=0)  # shards whose audio is held at once: the shuffle window
    specaugment_start_updates: int = Field(0, ge=0)  # paper, from scratch: SpecAugment only after a delay
    variant: str | None = None  # stage folder <run>/student/<variant>; None: mode (+ "-labeled-ft")

    @model_validator(mode="after")
    def _check(self) -> StudentConfig:
        errors = self._loop_errors(None)
        if self.model is not None and self.mode == "finetune":
            errors.append("model is only for mode=from_scratch: a fine-tuned student keeps its checkpoint's shape")
        if self.source_weights is not None:
            unknown = sorted(set(self.source_weights) - {"labeled", "pl"})
            if unknown:
                errors.append(f"source_weights has unknown source(s) {unknown}; the sources are 'labeled' and 'pl'")
            if any(w < 0 for w in self.source_weights.values()) or not any(self.source_weights.values()):
                errors.append(f"source_weights={self.source_weights}: weights must be >= 0 with one above 0")
        if self.pl_filter.min_tokens > self.pl_filter.max_tokens:
            errors.append(f"pl_filter.min_tokens={self.pl_filter.min_tokens} exceeds pl_filter.max_tokens="
                          f"{self.pl_filter.max_tokens}: no PL would be read")
        if self.variant is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", self.variant):
            errors.append(f"variant={self.variant!r}: use lower-case letters, digits, '-' and '_' (a folder name)")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def stage_name(self) -> str:
        """Folder under `<run>/student/`: the variant, else the mode (+ "-labeled-ft" for labeled only)."""
        return self.variant or (f"{self.mode}-labeled-ft" if self.labeled_only else self.mode)


def student_tiny(mode: str, train_manifest: str, dev_manifest: str | None = None, **overrides: Any) -> StudentConfig:
    """CPU preset. finetune: AdamW at a third of stage 1's peak LR, 300 updates; from_scratch: stage 1's
    recipe at a lower peak LR (2e-3 vs 3e-3), SpecAugment from update 200, 2000 updates. 60 s batches."""
    common = dict(
        mode=mode, train_manifest=train_manifest, dev_manifest=dev_manifest,
        batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=64, num_buckets=8),
        pl_batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=16, num_buckets=8),
        specaugment=tiny_specaugment(), log_every=50,
    )
    if mode == "finetune":
        cfg = common | dict(optim=OptimConfig(name="adamw", lr=1e-3, warmup_updates=20, schedule="cosine",
                                              weight_decay=0.01),
                            max_updates=300, eval_every=100, save_every=50)
    else:
        cfg = common | dict(optim=OptimConfig(name="adamw", lr=2e-3, warmup_updates=60, schedule="cosine",
                                              weight_decay=0.01),
                            specaugment_start_updates=200, max_updates=2000, eval_every=500, save_every=100)
    return StudentConfig(**_with_overrides(cfg, overrides))


def student_paper(mode: str, train_manifest: str, dev_manifest: str | None = None, **overrides: Any) -> StudentConfig:
    """The paper's students: from scratch at a lower peak LR than stage 1 (Adagrad 0.02 vs 0.03) with
    SpecAugment after 10k updates; fine-tuned from stage 1 at Adagrad 0.01. 200 s batches."""
    if mode == "finetune":
        cfg = dict(optim=OptimConfig(lr=0.01, warmup_updates=1000), max_updates=100000, eval_every=5000)
    else:
        cfg = dict(optim=OptimConfig(lr=0.02), specaugment_start_updates=10000)
    return StudentConfig(mode=mode, train_manifest=train_manifest, dev_manifest=dev_manifest, **(cfg | overrides))


STUDENT_PRESETS = {"tiny": student_tiny, "paper": student_paper}


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied; nested dicts merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _configured(cls, preset_cfg: _Config, overrides: dict[str, Any]):
    """A preset's config with nested overrides; a shortened budget keeps a proportionate warmup."""
    flat = {k: v for k, v in overrides.items() if not isinstance(v, dict)}
    base = cls(**_with_overrides(dict(preset_cfg), flat)) if flat else preset_cfg
    return cls(**deep_merge(base.model_dump(mode="json"), {k: v for k, v in overrides.items() if isinstance(v, dict)}))


def _set(**knobs: Any) -> dict[str, Any]:
    """The knobs that are set (not None), as overrides."""
    return {k: v for k, v in knobs.items() if v is not None}


_RECIPE_LANGUAGE_PLACEHOLDER = "xx"  # validates per-language configs before the languages are known


class RecipeConfig(_Config):
    """The whole recipe as one config (paper Sec. 4-5): supervised → per-language fine-tune → slimIPL → labeling →
    student(s) (→ labeled-only fine-tune) → report. Each stage's config is its preset plus the overrides here."""

    run_dir: str = Field("runs/recipe", description="run directory (any fsspec URL): every stage writes below it")
    labeled_manifest: str = Field(description="labeled rows of every language (JSONL or Parquet)")
    dev_manifest: str | None = Field(None, description="dev rows for validation and best-checkpoint choice")
    test_manifest: str | None = Field(None, description="test rows: every stage's model is scored on them")
    unlabeled_manifest: str = Field(description="unlabeled rows; languages with rows here get self-training")
    reference_manifest: str | None = Field(
        None, description="hidden true transcripts of unlabeled clips: PL CER only, never training")
    preset: Literal["tiny", "paper"] = Field("paper", description="stage presets: paper defaults or tiny (CPU)")
    self_train_languages: list[str] | None = Field(
        None, description="languages that get fine-tune + slimIPL; None: every language with unlabeled rows")
    seed: int = Field(0, description="seed of every stage")
    supervised: dict[str, Any] = Field(default_factory=dict, description="overrides of the supervised config")
    finetune: dict[str, Any] = Field(default_factory=dict, description="overrides of each per-language fine-tune")
    slimipl: dict[str, Any] = Field(default_factory=dict, description="overrides of each per-language slimIPL")
    label: dict[str, Any] = Field(default_factory=dict, description="overrides of the labeling config")
    student_modes: list[Literal["from_scratch", "finetune"]] = Field(
        default_factory=lambda: ["from_scratch"], description="students to train: from_scratch and/or finetune")
    student: dict[str, Any] = Field(default_factory=dict, description="overrides of every student config")
    student_by_mode: dict[Literal["from_scratch", "finetune"], dict[str, Any]] = Field(
        default_factory=dict, description="overrides of one student mode's config, after `student`'s")
    student_labeled_finetune: bool = Field(
        True, description="fine-tune each student on labeled data only afterwards (paper Table 2's last row)")
    labeled_finetune: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the labeled-only fine-tune of the students")
    # The knobs operators turn most, typed so that the UI form checks them before a run starts; each wins
    # over the same key in the stage's overrides.
    supervised_updates: int | None = Field(None, ge=1, description="stage 1 budget in updates; None: preset")
    finetune_updates: int | None = Field(None, ge=1, description="per-language fine-tune budget; None: preset")
    slimipl_updates: int | None = Field(None, ge=1, description="per-language slimIPL budget; None: preset")
    pl_cache_size: int | None = Field(None, ge=1, description="slimIPL dynamic PL cache size N; None: preset")
    student_updates: int | None = Field(None, ge=1, description="budget of every student; None: preset")

    @model_validator(mode="after")
    def _check(self) -> RecipeConfig:
        # Every stage's config is built once now, so a bad override fails before any stage runs.
        lang = _RECIPE_LANGUAGE_PLACEHOLDER
        self.supervised_config()
        self.finetune_config(lang)
        self.slimipl_config(lang)
        self.label_config({lang: "teacher.pt"})
        for mode in self.student_modes:
            self.student_config(mode)
            if self.student_labeled_finetune:
                self.labeled_finetune_config(mode, "student.pt")
        if len(set(self.student_modes)) != len(self.student_modes):
            raise ValueError(f"student_modes has duplicates: {self.student_modes}")
        return self

    def _common(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def supervised_config(self) -> SupervisedConfig:
        """Stage 1's config."""
        base = SUPERVISED_PRESETS[self.preset](self.labeled_manifest, self.dev_manifest, **self._common())
        return _configured(SupervisedConfig, base, self.supervised | _set(max_updates=self.supervised_updates))

    def finetune_config(self, language: str) -> FinetuneConfig:
        """Stage 2's config for one language."""
        base = FINETUNE_PRESETS[self.preset](language, self.labeled_manifest, self.dev_manifest, **self._common())
        return _configured(FinetuneConfig, base, self.finetune | _set(max_updates=self.finetune_updates))

    def slimipl_config(self, language: str) -> SlimIPLConfig:
        """Stage 3's config for one language."""
        base = SLIMIPL_PRESETS[self.preset](language, self.labeled_manifest, self.unlabeled_manifest,
                                            self.dev_manifest, reference_manifest=self.reference_manifest,
                                            **self._common())
        knobs = _set(max_updates=self.slimipl_updates, pl_cache_size=self.pl_cache_size)
        return _configured(SlimIPLConfig, base, self.slimipl | knobs)

    def label_config(self, teachers: dict[str, str]) -> LabelConfig:
        """Step 4's config with each language's teacher."""
        return _configured(LabelConfig, LABEL_PRESETS[self.preset](self.unlabeled_manifest, teachers), self.label)

    def student_config(self, mode: str) -> StudentConfig:
        """Stage 5's config for one student mode."""
        base = STUDENT_PRESETS[self.preset](mode, self.labeled_manifest, self.dev_manifest, **self._common())
        overrides = deep_merge(self.student, self.student_by_mode.get(mode, {}))
        return _configured(StudentConfig, base, overrides | _set(max_updates=self.student_updates))

    def labeled_finetune_config(self, mode: str, student_checkpoint: str) -> StudentConfig:
        """The optional last step: the `mode` student fine-tuned on labeled data only."""
        base = STUDENT_PRESETS[self.preset]("finetune", self.labeled_manifest, self.dev_manifest, **self._common())
        base = base.model_copy(update={"labeled_only": True, "init_checkpoint": student_checkpoint,
                                       "variant": f"{mode}-labeled-ft"})
        return _configured(StudentConfig, base, self.labeled_finetune)


def corpus_data(corpus_dir: str, run_dir: str) -> dict[str, str]:
    """The data fields of a `RecipeConfig` for a corpus built by `mlpl corpus build` (its folder layout)."""
    root = corpus_dir.rstrip("/")
    return dict(run_dir=run_dir, labeled_manifest=f"{root}/manifests/labeled.jsonl",
                dev_manifest=f"{root}/manifests/dev.jsonl", test_manifest=f"{root}/manifests/test.jsonl",
                unlabeled_manifest=f"{root}/manifests/unlabeled.jsonl",
                reference_manifest=f"{root}/hidden/unlabeled_reference.jsonl")


def recipe_demo(corpus_dir: str, run_dir: str, **fields: Any) -> RecipeConfig:
    """`make demo`: the tiny presets on budgets that fit the whole recipe in ≤ 15 min on 2 CPU cores."""
    cfg = corpus_data(corpus_dir, run_dir) | dict(
        preset="tiny",
        supervised={"max_updates": 450, "eval_every": 225},
        finetune={"max_updates": 100, "eval_every": 50},
        slimipl={"max_updates": 100, "cropping_warmup_updates": 30, "eval_every": 50, "pl_eval_max_utterances": 60},
        student_modes=["finetune"],
        student={"max_updates": 80, "eval_every": 40},
        labeled_finetune={"max_updates": 40, "eval_every": 20},
    )
    return RecipeConfig(**deep_merge(cfg, fields))


def recipe_bench(corpus_dir: str, run_dir: str, **fields: Any) -> RecipeConfig:
    """`make reproduce` (≈ 40 min on 2 slow CPU cores): the tiny presets on the bench corpus, six languages with
    unlabeled audio, both students (from scratch on the supervised stage's budget: 1000 updates; fine-tuned: 200);
    short per-language stages, as six of them run one after another."""
    cfg = corpus_data(corpus_dir, run_dir) | dict(
        preset="tiny",
        supervised={"max_updates": 1000, "eval_every": 250},
        finetune={"max_updates": 100, "eval_every": 50},
        slimipl={"max_updates": 100, "cropping_warmup_updates": 30, "eval_every": 50},
        student_modes=["from_scratch", "finetune"],
        student_by_mode={"from_scratch": {"max_updates": 1000, "eval_every": 250, "specaugment_start_updates": 100},
                         "finetune": {"max_updates": 200, "eval_every": 100}},
        labeled_finetune={"max_updates": 50, "eval_every": 25},
    )
    return RecipeConfig(**deep_merge(cfg, fields))


RECIPE_PRESETS = {"demo": recipe_demo, "bench": recipe_bench}
