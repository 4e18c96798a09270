"""What every stage's config is made of (paper Sec. 4): the model shape, the front end, what audio is accepted,
SpecAugment, batches, the optimizer, the shared training fields, and the one pseudo-label filter.

Each model is pydantic with `extra="forbid"` and the paper's defaults; configs stop at the builder
(`model_kwargs` maps `ModelConfig` onto the flat arguments of models/).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.pl import PLQuery

# BCP-47 shape after lower-casing: a 2-3 letter primary subtag, then optional script/region/variant subtags.
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})*$")


def normalize_language(code: str) -> str | None:
    """Canonical form of a language code ("ES" → "es", "pt_BR" → "pt-br"); None when it is not BCP-47 shaped."""
    norm = code.strip().lower().replace("_", "-")
    return norm if _LANGUAGE_CODE.match(norm) else None


def language_code(code: str) -> str:
    """`normalize_language` for a config field.

    Raises:
        ValueError: when the code is not BCP-47 shaped.
    """
    norm = normalize_language(code)
    if norm is None:
        raise ValueError(f"language {code!r} is not a language code (expected BCP-47 such as 'es' or 'pt-BR')")
    return norm


class Config(BaseModel):
    """Base of every config: unknown fields refused, frozen, with a stable hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def config_hash(self) -> str:
        """Short stable hash of the config, recorded with checkpoints and outputs."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class ModelConfig(Config):
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
    # Li et al. 2021's capacity options (defaults: the paper's transformer, no conditioning).
    encoder: Literal["transformer", "conformer"] = "transformer"
    conformer_conv_kernel: int = Field(15, gt=0)  # odd; encoder frames (30 ms): ≈ 0.45 s
    language_conditioning: bool = False  # a learned language embedding added to the encoder input
    language_unknown_prob: float = Field(0.1, ge=0.0, le=1.0)  # training: language hidden, so "unknown" is learned
    activation_checkpointing: bool = False  # recompute layer activations in backward (large presets on one GPU)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.encoder == "conformer" and self.conformer_conv_kernel % 2 == 0:
            raise ValueError(f"conformer_conv_kernel={self.conformer_conv_kernel} must be odd (a centred "
                             "depthwise convolution)")
        return self


# ModelConfig fields added after runs existed: at their defaults they leave a resume key as it was, so a run
# started before them resumes instead of starting over. Activation checkpointing never changes what is computed.
_ADDED_MODEL_FIELDS = ("encoder", "conformer_conv_kernel", "language_conditioning", "language_unknown_prob")


def _model_key_fields(model: dict[str, Any]) -> dict[str, Any]:
    """A dumped ModelConfig without what does not change an update: activation checkpointing, added fields at
    their defaults."""
    defaults = ModelConfig.model_fields
    return {k: v for k, v in model.items() if k != "activation_checkpointing"
            and not (k in _ADDED_MODEL_FIELDS and v == defaults[k].default)}


def tiny_model() -> ModelConfig:
    """A model that trains on 2 CPU cores in minutes (≈1.2 M parameters)."""
    # No dropout: on CPU its random masks took 41 % of an update, and at this size SpecAugment and the
    # corpus' channel noise regularize enough (1.7x more updates in the same time gave lower dev CER).
    return ModelConfig(d_model=144, n_layers=4, n_heads=4, ffn_dim=576, dropout=0.0, layerdrop=0.0)


def tiny_deep_narrow_model() -> ModelConfig:
    """Tiny's parameter count (1.2 M) three times as deep: 12 layers of d 84 (Li et al. 2021: depth beats width)."""
    return tiny_model().model_copy(update=dict(d_model=84, n_layers=12, ffn_dim=360))


def tiny_wide_shallow_model() -> ModelConfig:
    """Tiny's parameter count (1.2 M) at half the depth: 2 layers of d 192."""
    return tiny_model().model_copy(update=dict(d_model=192, n_layers=2, ffn_dim=832))


def tiny_conformer_model() -> ModelConfig:
    """Tiny's width and parameter count (1.2 M) in Conformer layers: 2 of them (each has two FFNs and a conv module)."""
    return tiny_model().model_copy(update=dict(encoder="conformer", n_layers=2, ffn_dim=608))


def small_model() -> ModelConfig:
    """Between tiny and base: 8 layers of d 256 (≈6.7 M), for a CPU-sized study of width and depth."""
    return tiny_model().model_copy(update=dict(d_model=256, n_layers=8, ffn_dim=1024))


def base_model() -> ModelConfig:
    """Paper base: 36 layers, d 768, 4 heads, FFN 3072 (256 M here; the paper states ≈275 M)."""
    return ModelConfig()


def large_model() -> ModelConfig:
    """Paper large: FFN and attention dims doubled (1.02 B here; the paper states ≈1.06 B), with activation
    checkpointing so that it trains on one GPU."""
    return ModelConfig(d_model=1536, ffn_dim=6144, activation_checkpointing=True)


def doubled_width(model: ModelConfig) -> ModelConfig:
    """The paper's "large" of a model: feed-forward and attention width doubled, depth and heads kept."""
    return model.model_copy(update=dict(d_model=2 * model.d_model, ffn_dim=2 * model.ffn_dim))


# Each preset's parameter count as stated (and tested to within 2 %), for a 256-token vocabulary and 6 languages.
# The paper's 275 M / 1.06 B for base / large count parts it does not list (we count 256.2 M / 1022 M for its
# stated shapes); ours are kept so that earlier checkpoints and results stay comparable.
MODEL_PRESET_PARAMS = {"tiny": 1.2e6, "tiny_deep_narrow": 1.2e6, "tiny_wide_shallow": 1.2e6, "tiny_conformer": 1.2e6,
                       "small": 6.7e6, "base": 256e6, "large": 1.02e9}


def model_kwargs(cfg: ModelConfig, vocab_size: int, num_languages: int, n_mels: int) -> dict[str, Any]:
    """Flat keyword arguments for `models.encoder.CTCLIDModel`."""
    return dict(vocab_size=vocab_size, num_languages=num_languages, n_mels=n_mels, **cfg.model_dump())


class FeatureConfig(Config):
    """Log-mel front end (paper: 80 dims, 25 ms Hamming window, 10 ms hop, 16 kHz)."""

    sample_rate_hz: int = 16000
    n_mels: int = Field(80, gt=0)
    win_ms: float = Field(25.0, gt=0)
    hop_ms: float = Field(10.0, gt=0)


class AudioPolicy(Config):
    """What input audio is accepted; everything else becomes a reject row with a reason."""

    min_sample_rate_hz: int = Field(16000, gt=0)  # lower rates lack the upper band the model expects
    downmix_multichannel: bool = False  # off: a stereo file is more likely a wrong file than a choice
    max_duration_s: float = Field(40.0, gt=0)
    min_duration_s: float = Field(0.3, gt=0)
    silence_peak: float = Field(1e-4, ge=0)  # peak |sample| below this counts as silent


def labeling_audio_policy() -> AudioPolicy:
    """What labeling accepts: stereo is downmixed, clips up to 3 h (long ones are cropped and stitched)."""
    return AudioPolicy(downmix_multichannel=True, max_duration_s=3 * 3600.0)


class SpecAugmentConfig(Config):
    """SpecAugment masks (paper: 2 time masks for short Common Voice clips)."""

    freq_masks: int = Field(2, ge=0)
    freq_mask_width: int = Field(27, ge=0)
    time_masks: int = Field(2, ge=0)
    time_mask_width: int = Field(40, ge=0)  # fbank frames (10 ms)
    time_mask_max_ratio: float = Field(0.2, gt=0, le=1.0)  # a mask never covers more than this of a clip


def tiny_specaugment() -> SpecAugmentConfig:
    """SpecAugment of every CPU preset: narrower masks than the paper's for a 1.2 M-parameter model."""
    return SpecAugmentConfig(freq_masks=2, freq_mask_width=15, time_masks=2, time_mask_width=20)


class BatchConfig(Config):
    """Dynamic batching by audio seconds (paper: 200 s of audio per batch per GPU)."""

    max_batch_duration_s: float = Field(200.0, gt=0)  # padded seconds: batch size × longest clip
    max_batch_size: int = Field(256, gt=0)
    num_buckets: int = Field(10, gt=0)


class OptimConfig(Config):
    """Optimizer and LR schedule (paper: Adagrad lr 0.03 with warmup and grad-norm clipping)."""

    name: Literal["adagrad", "adamw"] = "adagrad"
    lr: float = Field(0.03, gt=0)
    warmup_updates: int = Field(64000, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    min_lr_ratio: float = Field(0.05, ge=0, le=1)  # cosine floor as a fraction of lr
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(1.0, gt=0)


# Budget, cadence and where it runs: a run may be extended, or resumed with other threads or on another device,
# so the resume key leaves them out.
# average_top_n only chooses which dev-scored weights are kept and averaged at the end, never what an update computes.
# Fields added to stage configs after runs were made, with their defaults: left out of the resume key at those
# defaults, so that older runs resume.
_ADDED_FIELDS: dict[str, Any] = {"pl_max_hours_per_language": None}
_NOT_IN_RESUME_KEY = {"max_updates", "eval_every", "save_every", "log_every", "num_threads", "device", "average_top_n"}


class LanguageMix(Config):
    """How a training stage mixes the languages of its labeled batches (`pipeline.data.samplers.labeled_sampler`).

    natural: all utterances pooled, so each language appears in proportion to its data; temperature: every batch
    is one language drawn with p_l ∝ n_l^α (n_l: the language's labeled audio seconds; α < 1 flattens towards
    uniform and up-samples low-resource languages); weights: every batch one language drawn with the explicit
    weights, normalized (a language with data must be listed; weight 0 leaves it out).
    """

    kind: Literal["natural", "temperature", "weights"] = Field(
        "natural", description="natural: languages pooled; temperature: p ∝ audio seconds^alpha; weights: explicit")
    alpha: float = Field(0.5, gt=0.0, le=1.0, description="α of kind=temperature (1: natural, → 0: uniform)")
    weights: dict[str, float] | None = Field(None, description='kind=weights only: {"es": 2, "sl": 1}')

    @model_validator(mode="after")
    def _consistent(self) -> LanguageMix:
        errors = []
        if self.kind == "weights":
            if not self.weights:
                errors.append('language_mix.kind="weights" needs language_mix.weights, e.g. {"es": 1, "sl": 1}')
            else:
                bad = {k: w for k, w in self.weights.items() if not 0 <= w < float("inf")}  # NaN fails too
                if bad:
                    errors.append(f"language_mix.weights {bad}: every weight must be a finite number >= 0")
                elif not any(self.weights.values()):
                    errors.append(f"language_mix.weights={self.weights}: at least one weight must be above 0")
                codes = [normalize_language(k) for k in self.weights]
                if any(c is None for c in codes):
                    errors.append(f"language_mix.weights keys {sorted(self.weights)} must be language codes "
                                  "(BCP-47 such as 'es' or 'pt-BR')")
                elif len(set(codes)) < len(codes):
                    errors.append(f"language_mix.weights keys {sorted(self.weights)} name a language twice")
        elif self.weights is not None:
            errors.append(f'language_mix.weights is only read with kind="weights" (kind is {self.kind!r}); '
                          'set kind="weights" or drop weights')
        raise_all(errors)
        return self

    def normalized_weights(self) -> dict[str, float]:
        """The explicit weights keyed by canonical language code (kind="weights")."""
        return {language_code(k): float(w) for k, w in (self.weights or {}).items()}


class TrainingConfig(Config):
    """What every training stage shares: optimizer, batches, SpecAugment, γ, budget and cadence."""

    specaugment: SpecAugmentConfig = Field(default_factory=SpecAugmentConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    lid_weight: float = Field(1.0, ge=0.0)  # γ in ℓ = ℓ_CTC + γ·ℓ_LID (γ = 1 best in the paper)
    language_mix: LanguageMix = Field(default_factory=LanguageMix)  # natural: languages pooled (paper)
    max_updates: int = Field(300000, gt=0)
    eval_every: int = Field(5000, gt=0)
    save_every: int = Field(1000, gt=0)
    # TopIPL-style teacher: keep the N best dev-scored weights and average them into checkpoints/averaged.pt at the
    # end of the stage; 0 (and 1, whose mean is best.pt itself) leaves it off.
    average_top_n: int = Field(0, ge=0)
    log_every: int = Field(100, gt=0)
    bf16: bool = True  # autocast where the device has native bf16 (CUDA, AVX-512 BF16 CPUs); fp32 elsewhere
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto: CUDA when present, else CPU
    seed: int = 0

    @classmethod
    def presets(cls) -> dict[str, Callable[..., TrainingConfig]]:
        """Named presets a stage's config declares itself (e.g. `tiny`, `paper`); the recipe's first stages keep
        theirs in `pipeline.config.presets`, a stage added later brings its own here."""
        return {}

    @classmethod
    def preset_kind(cls) -> str:
        """The kind its presets are looked up by (`preset(kind, name)`): the class name without "Config", lower."""
        return cls.__name__.removesuffix("Config").lower()

    def stage_name(self) -> str:
        """The stage's folder under the run directory ("supervised", "finetune/sl"): each stage's config says."""
        raise NotImplementedError(f"{type(self).__name__} names no stage folder")

    def scored_language(self) -> str | None:
        """The language whose test rows score the stage: a per-language stage's own, else None (every language)."""
        return getattr(self, "language", None)

    def resume_key(self) -> str:
        """Hash of the fields that change what an update computes (not budget, cadence or threads)."""
        fields = self.model_dump(mode="json", exclude=_NOT_IN_RESUME_KEY)
        fields = {k: v for k, v in fields.items() if not (k in _ADDED_FIELDS and v == _ADDED_FIELDS[k])}
        if isinstance(fields.get("model"), dict):
            fields["model"] = _model_key_fields(fields["model"])
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def loop_errors(self, max_duration_s: float | None = None) -> list[str]:
        """What makes the training loop impossible (each with its fix); empty when it can run."""
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


def raise_all(errors: list[str]) -> None:
    """Raise every config error at once (a validator's last line).

    Raises:
        ValueError: the errors joined, when there are any.
    """
    if errors:
        raise ValueError("; ".join(errors))


class PLFilter(Config):
    """Which pseudo-labels are kept (paper Sec. 5.1: drop empty PLs and PLs over 630 tokens). The same filter
    decides what labeling writes and, at read time, what a student reads from a PL table (one corpus, many
    students)."""

    min_tokens: int = Field(1, ge=0, description="drop PLs with fewer tokens (1: drop empty PLs)")
    max_tokens: int = Field(630, gt=0, description="drop PLs with more tokens (paper: 630)")
    min_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="drop PLs whose confidence (mean top CTC posterior per frame) is lower; "
                                          "None keeps every confidence")
    require_lid_agreement: bool = Field(
        False, description="drop rows whose LID prediction is not the row's language")

    def query(self, languages: Sequence[str] | None = None, teacher: str | None = None) -> PLQuery:
        """The same filter at read time, over the given languages and teacher (a student's rows)."""
        return PLQuery(languages=None if languages is None else tuple(languages), min_confidence=self.min_confidence,
                       teacher=teacher, min_tokens=self.min_tokens, max_tokens=self.max_tokens,
                       lid_agreement=self.require_lid_agreement)

    @model_validator(mode="after")
    def _bounds(self) -> PLFilter:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}: every PL would "
                             "be dropped")
        return self


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied; nested dicts merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """`a.b=value` assignments (JSON values, else strings) as a nested dict of overrides for `deep_merge`.

    Raises:
        ValueError: for an assignment without '='.
    """
    out: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.001")
        key, text = item.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out = deep_merge(out, _nested(key.split("."), value))
    return out


def _nested(path: list[str], value: Any) -> dict[str, Any]:
    for part in reversed(path):
        value = {part: value}
    return value


def with_overrides(preset: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A preset's fields with overrides; a shortened run keeps a proportionate warmup instead of failing."""
    cfg = preset | overrides
    if "max_updates" in overrides and "optim" not in overrides:
        warmup = min(preset["optim"].warmup_updates, max(1, int(cfg["max_updates"]) // 10))
        cfg["optim"] = cfg["optim"].model_copy(update={"warmup_updates": warmup})
    return cfg


def tiny_training(*, lr: float, warmup_updates: int, num_buckets: int, max_updates: int, eval_every: int,
                  save_every: int) -> dict[str, Any]:
    """What the CPU presets of the training stages share: AdamW with warmup and cosine decay, 60 s batches, narrow
    SpecAugment, logs every 50 updates."""
    return dict(batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=64, num_buckets=num_buckets),
                optim=OptimConfig(name="adamw", lr=lr, warmup_updates=warmup_updates, schedule="cosine",
                                  weight_decay=0.01), specaugment=tiny_specaugment(), max_updates=max_updates,
                eval_every=eval_every, save_every=save_every, log_every=50)


def declared_presets() -> dict[str, dict[str, Callable[..., Config]]]:
    """The presets that training configs declare themselves (`TrainingConfig.presets`), by their stage kind: a new
    stage's config brings its own, so `pipeline.config.presets` needs no entry for it."""
    found: dict[str, dict[str, Callable[..., Config]]] = {}
    todo = list(TrainingConfig.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if presets := cls.presets():
            found[cls.preset_kind()] = presets
    return found
