"""Stage 2 of the recipe (paper Sec. 5.1, Table 1): fine-tune the multilingual model on one language.

Pooled self-training gives poor pseudo-labels for low-resource languages; fine-tuning the multilingual
checkpoint on one language's labeled data first gives a much better teacher for that language's slimIPL.
The vocabulary and LID head stay those of the multilingual model, so every language's PLs share them.
Output: `<run>/finetune/<language>/`, with the same checkpoints, resume, metrics and rejects as stage 1.
"""

from __future__ import annotations

import logging
import time

import torch

from pipeline.config import FinetuneConfig
from pipeline.data import (
    Dataset,
    ProgressFn,
    batch_sampler,
    load_dataset,
    normalize_language,
    reject_untrainable,
)
from pipeline.distributed import is_main
from pipeline.modeling import Trained, load_trained
from pipeline.supervised import train_loop
from pipeline.trainer import StageResult, Trainer, input_identity, reuse_or_resume
from storage.files import join, write_json
from storage.manifest import write_rejects

log = logging.getLogger("mlpl.finetune")


def start_from(url: str, language: str, dropout: float | None, layerdrop: float | None) -> tuple[Trained, str]:
    """Load the checkpoint a per-language stage starts from; return it and the normalized language.

    Raises:
        FileNotFoundError: when the checkpoint is missing.
        ValueError: when the checkpoint does not know the language.
    """
    trained = load_trained(url)
    lang = normalize_language(language)
    if lang not in trained.languages:
        raise ValueError(
            f"language {language!r} is not one of the checkpoint's languages {trained.languages} ({url}); "
            "a per-language stage can only continue a language the multilingual model was trained on"
        )
    if dropout is not None:
        trained.model.set_dropout(dropout)
    if layerdrop is not None:
        trained.model.set_layerdrop(layerdrop)
    kwargs = trained.checkpoint["model_kwargs"]
    trained.checkpoint["model_kwargs"] = kwargs | {
        "dropout": kwargs["dropout"] if dropout is None else dropout,
        "layerdrop": kwargs["layerdrop"] if layerdrop is None else layerdrop,
    }
    return trained, lang


def load_language_data(
    trained: Trained, language: str | None, train_manifest: str, dev_manifest: str | None, stage_dir: str,
    on_progress: ProgressFn | None = None, extra_rejects: list | None = None,
) -> tuple[Dataset, Dataset | None, int]:
    """One language's labeled train and dev rows (every language's with None), validated against the
    checkpoint; rejects written.

    Raises:
        ValueError: when the manifest has no usable row of the language.
    """
    common = dict(features=trained.features, policy=trained.audio_policy, require_text=True,
                  languages=trained.languages, language=language)
    train = load_dataset(train_manifest, on_progress=on_progress, **common)
    model = trained.model
    train = reject_untrainable(train, trained.tokenizer, model.conv_kernel, model.conv_stride)
    if not train.utterances:
        raise ValueError(
            f"no usable {language or 'labeled'!r} training utterances in {train_manifest} "
            f"({len(train.rejects)} rejected; see {join(stage_dir, 'rejects.jsonl')})"
        )
    dev = load_dataset(dev_manifest, **common) if dev_manifest else None
    if dev is not None and not dev.utterances:
        log.warning("no usable %s rows in dev manifest %s: training without dev evaluation", language or "labeled",
                    dev_manifest)
        dev_rejects, dev = dev.rejects, None
    else:
        dev_rejects = dev.rejects if dev else []
    rejects = train.rejects + dev_rejects + (extra_rejects or [])
    if is_main():  # every rank reads the same rows; one writes and reports them
        write_rejects(join(stage_dir, "rejects.jsonl"), [r.as_row() for r in rejects])
        for r in rejects:
            log.warning("reject %s (%s): %s", r.id, r.source, r.reason)
    return train, dev, len(rejects)


def run_finetune(
    cfg: FinetuneConfig,
    run_dir: str,
    *,
    resume: bool = True,
    on_progress: ProgressFn | None = None,
    stop_after: int | None = None,
) -> StageResult:
    """Fine-tune the multilingual checkpoint on `cfg.language`; continue from its last.pt when present.

    Raises:
        ValueError: unknown language, no usable rows, or a checkpoint made with another config or data.
        FileNotFoundError: when the starting checkpoint is missing.
    """
    started_at = time.perf_counter()
    init_url = cfg.init_checkpoint or join(run_dir, "supervised", "checkpoints", "best.pt")
    trained, lang = start_from(init_url, cfg.language, cfg.dropout, cfg.layerdrop)
    stage_dir = join(run_dir, "finetune", lang)
    identity = input_identity(init=init_url, train=cfg.train_manifest, dev=cfg.dev_manifest)
    reused, resume = reuse_or_resume(f"finetune/{lang}", stage_dir, cfg, identity, resume)
    if reused is not None:
        return reused
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    train, dev, num_rejects = load_language_data(trained, lang, cfg.train_manifest, cfg.dev_manifest, stage_dir,
                                                 on_progress)
    if is_main():
        write_json(join(stage_dir, "config.json"), cfg.model_dump(mode="json") | {"init_checkpoint": init_url})
    trainer = Trainer(
        stage=f"finetune/{lang}", stage_dir=stage_dir, cfg=cfg, model=trained.model,
        model_kwargs=trained.checkpoint["model_kwargs"], tokenizer=trained.tokenizer, languages=trained.languages,
        dev=dev, identity=identity,
        meta=stage_meta(trained, init_url, lang), on_progress=on_progress, started_at=started_at,
    )
    sampler = batch_sampler(train.durations(), cfg.batch, cfg.seed)
    stage_state = trainer.restore(resume, stop_after)
    if stage_state:
        sampler.load_state_dict(stage_state["sampler"])
    log.info("finetune/%s from %s: %d utterances (%.1f s), %d rejects, %s", lang, init_url, len(train.utterances),
             sum(train.durations()), num_rejects, trainer.precision)
    train_loop(trainer, train, sampler)
    return trainer.finish({"sampler": sampler.state_dict()}, num_train_utterances=len(train.utterances),
                          num_rejects=num_rejects)


def stage_meta(trained: Trained, init_url: str, language: str) -> dict:
    """What a per-language checkpoint records beside its weights: front end, audio policy, lineage."""
    return {
        "features": trained.features.model_dump(),
        "audio": trained.audio_policy.model_dump(),
        "init_checkpoint": init_url,
        "language": language,
    }
