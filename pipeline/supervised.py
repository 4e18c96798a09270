"""Stage 1 of the recipe (paper Sec. 4): supervised multilingual CTC + LID training, ℓ = ℓ_CTC + γ·ℓ_LID.

All labeled languages pooled in their natural proportions; the shared character vocabulary is built here
and every later stage inherits it through the checkpoint. The loop is batch → update → periodic work; the
machinery (resume record, LR, dev evaluation, checkpoints) is `pipeline.trainer.Trainer`.
"""

from __future__ import annotations

import logging
import time

import torch

from models.encoder import CTCLIDModel
from pipeline.config import SupervisedConfig, model_kwargs
from pipeline.data import (
    Dataset,
    DynamicBucketSampler,
    ProgressFn,
    batch_sampler,
    collate,
    load_dataset,
    reject_untrainable,
)
from pipeline.distributed import is_main, shard
from pipeline.tokenizer import tokenizer_from_dict, train_tokenizer
from pipeline.trainer import StageResult, Trainer, input_identity, reuse_or_resume
from storage.checkpoint import load_checkpoint
from storage.files import exists, join, write_json
from storage.manifest import write_rejects

log = logging.getLogger("mlpl.train")


def prepare_data(cfg: SupervisedConfig, stage_dir: str, saved: dict | None, on_progress: ProgressFn | None):
    """Validate manifests, build (or restore) the tokenizer, write the rejects table.

    Raises:
        ValueError: when no training row is usable.
    """
    train = load_dataset(cfg.train_manifest, features=cfg.features, policy=cfg.audio, require_text=True,
                         languages=cfg.languages, on_progress=on_progress)
    if saved is not None:
        languages = list(saved["languages"])
        tokenizer = tokenizer_from_dict(saved["tokenizer"])
    else:
        languages = list(cfg.languages) if cfg.languages is not None else train.languages()
        tokenizer = train_tokenizer(cfg.tokenizer, [u.text or "" for u in train.utterances],
                                    cfg.sentencepiece_vocab_size)
    train = reject_untrainable(train, tokenizer, cfg.model.conv_kernel, cfg.model.conv_stride)
    if not train.utterances:
        raise ValueError(
            f"no usable training utterances in {cfg.train_manifest}: all {len(train.rejects)} rows were rejected "
            f"(see {join(stage_dir, 'rejects.jsonl')})"
        )
    dev = None
    if cfg.dev_manifest:
        dev = load_dataset(cfg.dev_manifest, features=cfg.features, policy=cfg.audio, require_text=True,
                           languages=languages)
    rejects = train.rejects + (dev.rejects if dev else [])
    if is_main():  # every rank reads the same rows; one writes and reports them
        write_rejects(join(stage_dir, "rejects.jsonl"), [r.as_row() for r in rejects])
        for r in rejects:
            log.warning("reject %s (%s): %s", r.id, r.source, r.reason)
    return train, dev, languages, tokenizer, len(rejects)


def run_supervised(
    cfg: SupervisedConfig,
    run_dir: str,
    *,
    resume: bool = True,
    on_progress: ProgressFn | None = None,
    stop_after: int | None = None,
) -> StageResult:
    """Train the multilingual CTC + LID model; continue from `<run_dir>/supervised/checkpoints/last.pt`.

    `stop_after` ends the loop early after that many updates (as a clean stop), for tests and budgets.

    Raises:
        ValueError: when the checkpoint was made with another config or other data, or no row is usable.
    """
    started_at = time.perf_counter()
    stage_dir = join(run_dir, "supervised")
    last_url = join(stage_dir, "checkpoints", "last.pt")
    identity = input_identity(train=cfg.train_manifest, dev=cfg.dev_manifest)
    reused, resume = reuse_or_resume("supervised", stage_dir, cfg, identity, resume)
    if reused is not None:
        return reused
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    # The vocabulary and language list of a run in progress come from its checkpoint, not from a rebuild.
    saved = load_checkpoint(last_url) if resume and exists(last_url) else None
    train, dev, languages, tokenizer, num_rejects = prepare_data(cfg, stage_dir, saved, on_progress)
    if is_main():
        write_json(join(stage_dir, "config.json"), cfg.model_dump(mode="json"))
        write_json(join(stage_dir, "tokenizer.json"), tokenizer.to_dict())

    kwargs = model_kwargs(cfg.model, tokenizer.vocab_size, len(languages), cfg.features.n_mels)
    trainer = Trainer(
        stage="supervised", stage_dir=stage_dir, cfg=cfg, model=CTCLIDModel(**kwargs), model_kwargs=kwargs,
        tokenizer=tokenizer, languages=languages, dev=dev,
        identity=identity,
        meta={"features": cfg.features.model_dump(), "audio": cfg.audio.model_dump()},
        on_progress=on_progress, started_at=started_at,
    )
    sampler = batch_sampler(train.durations(), cfg.batch, cfg.seed)
    stage_state = trainer.restore(resume, stop_after)
    if stage_state:
        sampler.load_state_dict(stage_state["sampler"])
    log.info(
        "supervised: %d utterances (%.2f h), %d languages, vocab %d, %d rejects, %s",
        len(train.utterances), sum(train.durations()) / 3600, len(languages), tokenizer.vocab_size, num_rejects,
        trainer.precision,
    )
    train_loop(trainer, train, sampler)
    return trainer.finish({"sampler": sampler.state_dict()}, num_train_utterances=len(train.utterances),
                          num_rejects=num_rejects)


def train_loop(trainer: Trainer, train: Dataset, sampler: DynamicBucketSampler) -> None:
    """Labeled batches until the budget: the loop of the supervised and fine-tune stages (this rank's share)."""
    trainer.model.train()
    batches = shard(sampler, trainer.world)
    while not trainer.done:
        t0 = time.perf_counter()
        idx = next(batches)
        batch = collate([train.utterances[i] for i in idx], train.features, tokenizer=trainer.tokenizer,
                        language_ids=trainer.lang_ids, specaugment=trainer.cfg.specaugment)
        trainer.update(batch, t0=t0)
        trainer.after_update(lambda: {"sampler": sampler.state_dict()})

