"""Typed configs for the supervised multilingual stage (paper Sec. 4), with the paper's defaults.

Each stage has one pydantic model with `extra="forbid"`; presets are functions (`tiny()`, `base()`).
Configs stop at the builder: `model_kwargs()` maps `ModelConfig` onto the flat arguments of models/.
"""

from __future__ import annotations

import hashlib
import json
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


class SupervisedConfig(_Config):
    """Stage 1: supervised multilingual CTC + LID training on all labeled languages pooled."""

    train_manifest: str
    dev_manifest: str | None = None
    languages: list[str] | None = None  # None: the languages present in the train manifest
    tokenizer: Literal["char", "sentencepiece"] = "char"
    sentencepiece_vocab_size: int = Field(256, gt=8)
    model: ModelConfig = Field(default_factory=base_model)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    audio: AudioPolicy = Field(default_factory=AudioPolicy)
    specaugment: SpecAugmentConfig = Field(default_factory=SpecAugmentConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    lid_weight: float = Field(1.0, ge=0.0)  # γ in ℓ = ℓ_CTC + γ·ℓ_LID (γ = 1 best in the paper)
    max_updates: int = Field(300000, gt=0)
    eval_every: int = Field(5000, gt=0)
    save_every: int = Field(1000, gt=0)
    log_every: int = Field(100, gt=0)
    bf16: bool = True  # autocast on CPUs with native bf16 (≈3× fp32 matmul here)
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SupervisedConfig:
        errors = []
        if self.batch.max_batch_duration_s < self.audio.max_duration_s:
            errors.append(
                f"batch.max_batch_duration_s={self.batch.max_batch_duration_s} is below "
                f"audio.max_duration_s={self.audio.max_duration_s}: the longest clips could never be batched; "
                "raise the batch budget or lower audio.max_duration_s"
            )
        if self.optim.warmup_updates > self.max_updates:
            errors.append(
                f"optim.warmup_updates={self.optim.warmup_updates} exceeds max_updates={self.max_updates}; "
                "the LR would never reach its peak"
            )
        if self.languages is not None and len(set(self.languages)) != len(self.languages):
            errors.append(f"languages has duplicates: {self.languages}")
        if errors:
            raise ValueError("; ".join(errors))
        return self


def supervised_tiny(train_manifest: str, dev_manifest: str | None = None, **overrides: Any) -> SupervisedConfig:
    """CPU preset: tiny model, AdamW (peak lr 3e-3) with warmup + cosine decay, 60 s batches, 2000 updates."""
    cfg = dict(
        train_manifest=train_manifest,
        dev_manifest=dev_manifest,
        model=tiny_model(),
        batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=64, num_buckets=8),
        optim=OptimConfig(name="adamw", lr=3e-3, warmup_updates=60, schedule="cosine", weight_decay=0.01),
        specaugment=SpecAugmentConfig(freq_masks=2, freq_mask_width=15, time_masks=2, time_mask_width=20),
        max_updates=2000,
        eval_every=500,
        save_every=100,
        log_every=50,
    )
    cfg.update(overrides)
    if "max_updates" in overrides and "optim" not in overrides:
        # A shortened run keeps a proportionate warmup instead of failing validation.
        warmup = min(60, max(1, int(cfg["max_updates"]) // 10))
        cfg["optim"] = cfg["optim"].model_copy(update={"warmup_updates": warmup})
    return SupervisedConfig(**cfg)


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
