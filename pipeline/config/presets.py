"""Named presets of every stage's config: `paper` (the paper's settings) and `tiny` (trains on 2 CPU cores).

A preset is a function that returns a validated config; `preset(kind, name, ...)` is the one lookup
(`preset("finetune", "tiny", "sl", "train.jsonl")`), and `configured(...)` applies an operator's nested
overrides on top of one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pipeline.config.base import (
    BatchConfig,
    Config,
    OptimConfig,
    base_model,
    declared_presets,
    deep_merge,
    large_model,
    small_model,
    tiny_conformer_model,
    tiny_deep_narrow_model,
    tiny_model,
    tiny_training,
    tiny_wide_shallow_model,
    with_overrides,
)
from pipeline.config.stages import (
    FinetuneConfig,
    LabelConfig,
    SlimIPLConfig,
    StudentConfig,
    SupervisedConfig,
)

T = TypeVar("T")


def supervised_tiny(train_manifest: str, dev_manifest: str | None = None, **overrides: Any) -> SupervisedConfig:
    """CPU preset: tiny model, AdamW (peak lr 3e-3) with warmup + cosine decay, 60 s batches, 2000 updates."""
    cfg = dict(train_manifest=train_manifest, dev_manifest=dev_manifest, model=tiny_model()) | tiny_training(
        lr=3e-3, warmup_updates=60, num_buckets=8, max_updates=2000, eval_every=500, save_every=100)
    return SupervisedConfig(**with_overrides(cfg, overrides))


def supervised_paper(train_manifest: str, dev_manifest: str | None = None, **overrides: Any) -> SupervisedConfig:
    """The paper's setting: base model, Adagrad lr 0.03, 200 s batches."""
    return SupervisedConfig(train_manifest=train_manifest, dev_manifest=dev_manifest, **overrides)


def finetune_tiny(language: str, train_manifest: str, dev_manifest: str | None = None,
                  **overrides: Any) -> FinetuneConfig:
    """CPU preset: AdamW at a third of stage 1's peak LR, 300 updates of 60 s batches."""
    cfg = dict(language=language, train_manifest=train_manifest, dev_manifest=dev_manifest) | tiny_training(
        lr=1e-3, warmup_updates=20, num_buckets=4, max_updates=300, eval_every=100, save_every=50)
    return FinetuneConfig(**with_overrides(cfg, overrides))


def finetune_paper(language: str, train_manifest: str, dev_manifest: str | None = None,
                   **overrides: Any) -> FinetuneConfig:
    """The paper's fine-tune: 10k updates at a lower LR than stage 1 (Adagrad 0.01, short warmup)."""
    cfg = dict(language=language, train_manifest=train_manifest, dev_manifest=dev_manifest,
               optim=OptimConfig(lr=0.01, warmup_updates=1000), max_updates=10000, eval_every=1000)
    return FinetuneConfig(**(cfg | overrides))


def slimipl_tiny(language: str, train_manifest: str, unlabeled_manifest: str, dev_manifest: str | None = None,
                 **overrides: Any) -> SlimIPLConfig:
    """CPU preset: λ 4, N 40, p 0.1, 100 cropping-warmup updates of 400, 60 s batches, no dropout."""
    # 400 updates: 25 s clips cost ≈ 2.5× a labeled update per audio second (attention is quadratic).
    cfg = dict(
        language=language, train_manifest=train_manifest, unlabeled_manifest=unlabeled_manifest,
        dev_manifest=dev_manifest,
        unlabeled_batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=16, num_buckets=8),
        unlabeled_ratio=4, pl_cache_size=40, pl_dropout=0.0, pl_layerdrop=0.0, cropping_warmup_updates=100,
    ) | tiny_training(lr=1e-3, warmup_updates=20, num_buckets=4, max_updates=400, eval_every=100, save_every=50)
    return SlimIPLConfig(**with_overrides(cfg, overrides))


def slimipl_paper(language: str, train_manifest: str, unlabeled_manifest: str, dev_manifest: str | None = None,
                  **overrides: Any) -> SlimIPLConfig:
    """The paper's slimIPL: λ 10, N 1000, p 0.1, 10k cropping-warmup updates, Adagrad 0.01."""
    cfg = dict(language=language, train_manifest=train_manifest, unlabeled_manifest=unlabeled_manifest,
               dev_manifest=dev_manifest, optim=OptimConfig(lr=0.01, warmup_updates=1000), max_updates=100000,
               eval_every=5000)
    return SlimIPLConfig(**(cfg | overrides))


def label_tiny(manifest: str, teachers: dict[str, str], **overrides: Any) -> LabelConfig:
    """CPU preset: 60 s batches (measured fastest on 2 cores), units of at most 200 clips."""
    cfg = dict(manifest=manifest, teachers=teachers,
               batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=64, num_buckets=32),
               unit_max_utterances=200)
    return LabelConfig(**(cfg | overrides))


def label_paper(manifest: str, teachers: dict[str, str], **overrides: Any) -> LabelConfig:
    """The paper's setting: 200 s batches, PLs of 1-630 tokens kept, no confidence or LID filter."""
    return LabelConfig(manifest=manifest, teachers=teachers, **overrides)


def student_tiny(mode: str, train_manifest: str, dev_manifest: str | None = None, **overrides: Any) -> StudentConfig:
    """CPU preset. finetune: AdamW at a third of stage 1's peak LR, 300 updates; from_scratch: stage 1's
    recipe at a lower peak LR (2e-3 vs 3e-3), SpecAugment from update 200, 2000 updates. 60 s batches."""
    cfg = dict(mode=mode, train_manifest=train_manifest, dev_manifest=dev_manifest,
               pl_batch=BatchConfig(max_batch_duration_s=60.0, max_batch_size=16, num_buckets=8))
    if mode == "finetune":
        cfg |= tiny_training(lr=1e-3, warmup_updates=20, num_buckets=8, max_updates=300, eval_every=100,
                              save_every=50)
    else:
        cfg |= tiny_training(lr=2e-3, warmup_updates=60, num_buckets=8, max_updates=2000, eval_every=500,
                              save_every=100) | dict(specaugment_start_updates=200)
    return StudentConfig(**with_overrides(cfg, overrides))


def student_paper(mode: str, train_manifest: str, dev_manifest: str | None = None, **overrides: Any) -> StudentConfig:
    """The paper's students: from scratch at a lower peak LR than stage 1 (Adagrad 0.02 vs 0.03) with
    SpecAugment after 10k updates; fine-tuned from stage 1 at Adagrad 0.01. 200 s batches."""
    if mode == "finetune":
        cfg = dict(optim=OptimConfig(lr=0.01, warmup_updates=1000), max_updates=100000, eval_every=5000)
    else:
        cfg = dict(optim=OptimConfig(lr=0.02), specaugment_start_updates=10000)
    return StudentConfig(mode=mode, train_manifest=train_manifest, dev_manifest=dev_manifest, **(cfg | overrides))


PRESETS: dict[str, dict[str, Callable[..., Config]]] = {
    "model": {"tiny": tiny_model, "tiny_deep_narrow": tiny_deep_narrow_model,
              "tiny_wide_shallow": tiny_wide_shallow_model, "tiny_conformer": tiny_conformer_model,
              "small": small_model, "base": base_model, "large": large_model},
    "supervised": {"tiny": supervised_tiny, "paper": supervised_paper},
    "finetune": {"tiny": finetune_tiny, "paper": finetune_paper},
    "slimipl": {"tiny": slimipl_tiny, "paper": slimipl_paper},
    "label": {"tiny": label_tiny, "paper": label_paper},
    "student": {"tiny": student_tiny, "paper": student_paper},
} | declared_presets()  # + the presets a later stage's config declares (TrainingConfig.presets)


def choose(table: dict[str, T], what: str, name: str) -> T:
    """The entry called `name` of a table of presets (`what` names the table in the error).

    Raises:
        ValueError: naming the known entries when the name is unknown.
    """
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}")
    return table[name]


def preset(kind: str, name: str, *args: Any, **overrides: Any) -> Any:
    """A config of a kind ("model", "supervised", "finetune", "slimipl", "label", "student", "prune", …) from its
    named preset, with the preset function's arguments and field overrides.

    Raises:
        ValueError: naming the known kinds or presets when one is unknown.
    """
    table = PRESETS | declared_presets()  # a config class defined after this module still counts
    return choose(choose(table, "config kind", kind), f"{kind} preset", name)(*args, **overrides)


def configured(cls: type[Config], preset_cfg: Config, overrides: dict[str, Any]) -> Any:
    """A preset's config with nested overrides applied; a shortened budget keeps a proportionate warmup."""
    flat = {k: v for k, v in overrides.items() if not isinstance(v, dict)}
    base = cls(**with_overrides(dict(preset_cfg), flat)) if flat else preset_cfg
    return cls(**deep_merge(base.model_dump(mode="json"), {k: v for k, v in overrides.items() if isinstance(v, dict)}))
