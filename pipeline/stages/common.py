"""How every training stage starts (docs/architecture.md, "How a stage runs"): one start-up for supervised
training, fine-tuning, slimIPL and the student.

`open_stage` names the stage's folder from its config, keys it on its config and inputs, and returns the finished
result when nothing changed (the stage cache); otherwise it sets the threads and seeds every RNG, so two runs with
the same seed draw the same dropout and SpecAugment masks whatever the process did before. The stage then loads
its data and model, writes `config.json` and its rejects, builds its `Trainer`, and resumes it and its labeled
batch sampler from `last.pt` through the same object.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import TrainingConfig
from pipeline.data.dataset import Batch, Dataset, collate, load_dataset, reject_untrainable
from pipeline.data.rows import ProgressFn, Reject
from pipeline.data.samplers import LabeledSampler, labeled_sampler, mix_record
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.world import World
from pipeline.engine.distributed import shard
from pipeline.engine.distributed import world as current_world
from pipeline.engine.model import Trained, load_trained
from pipeline.engine.stage_cache import StageResult, input_identity, reuse_or_resume
from pipeline.engine.trainer import Trainer
from pipeline.layout import RunLayout, StageDir
from storage.checkpoint import save_checkpoint, serialized_bytes
from storage.files import exists, join, read_json, write_json
from storage.manifest import write_rejects

log = logging.getLogger("mlpl.stage")


def seed_everything(seed: int) -> None:
    """Seed the torch, Python and numpy global RNGs: weight init, dropout, LayerDrop and SpecAugment draw on them."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class OpenStage:
    """A training stage after its start-up: its name and folder, what it is keyed on, and whether it resumes."""

    name: str  # "finetune/sl": the folder under the run directory
    dir: StageDir
    cfg: TrainingConfig
    identity: dict[str, str | None]
    resume: bool
    started_at: float
    world: World
    cached: StageResult | None = None  # the finished result when config and inputs are unchanged

    def write_config(self, **resolved: Any) -> None:
        """config.json: the config and what was resolved from the run (init checkpoint, labels root)."""
        if self.world.is_main:
            write_json(self.dir.file("config.json"), self.cfg.model_dump(mode="json") | resolved)

    def write_rejects(self, rejects: list[Reject], *, warn: bool = True) -> None:
        """rejects.jsonl, and one warning per reject (every rank read the same rows; rank 0 writes)."""
        if not self.world.is_main:
            return
        write_rejects(self.dir.file("rejects.jsonl"), [r.as_row() for r in rejects])
        for r in rejects if warn else []:
            log.warning("reject %s (%s): %s", r.id, r.source, r.reason)

    def restore(self, trainer: Trainer, train: Dataset,
                stop_after: int | None) -> tuple[LabeledSampler, dict[str, Any] | None]:
        """The labeled batch sampler over `train` (languages mixed as `cfg.language_mix` says), and the Trainer
        restored from `last.pt` when resuming: (the sampler at its saved position, the stage's own saved state or
        None).

        Raises:
            ValueError: for mixing weights that do not fit the data's languages.
        """
        sampler = labeled_sampler(train.durations(), [u.language for u in train.utterances], self.cfg.batch,
                                  self.cfg.language_mix, self.cfg.seed)
        saved = trainer.restore(self.resume, stop_after)
        if saved:
            sampler.load_state_dict(saved["sampler"])
        return sampler, saved

    def trainer(self, *, model, model_kwargs: dict[str, Any], tokenizer: Tokenizer, languages: list[str],
                dev: Dataset | None, meta: dict[str, Any], on_progress: ProgressFn | None) -> Trainer:
        """The stage's Trainer (its stage time counts from the start-up, so data loading is included)."""
        return Trainer(stage=self.name, stage_dir=self.dir.url, cfg=self.cfg, model=model, model_kwargs=model_kwargs,
                       tokenizer=tokenizer, languages=languages, dev=dev, identity=self.identity, meta=meta,
                       on_progress=on_progress, started_at=self.started_at)


def open_stage(cfg: TrainingConfig, run_dir: str, inputs: dict[str, str | None], *, resume: bool,
               extra_identity: dict[str, str | None] | None = None) -> OpenStage:
    """Start a training stage: key it on its config and the sha256 of its input files (plus `extra_identity`,
    e.g. the PL rows a student reads); unless the finished stage is reused (`.cached`), set threads and seed."""
    started_at = time.perf_counter()
    name = cfg.stage_name()
    stage_dir = RunLayout(run_dir).stage(name)
    identity = input_identity(**inputs) | (extra_identity or {})
    cached, resume = reuse_or_resume(name, stage_dir, cfg, identity, resume)
    if cached is None:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        seed_everything(cfg.seed)
    return OpenStage(name, stage_dir, cfg, identity, resume, started_at, current_world(), cached)


def train_then_pack(cfg: TrainingConfig, run_dir: str, *, resume: bool, train: Callable[[OpenStage], StageResult],
                    pack: Callable[[Trained], tuple[dict[str, Any], dict[str, Any]]]) -> StageResult:
    """A serving-size stage (quantize, prune): train it (or reuse its finished result), then write its best model's
    serving checkpoint once (`checkpoints/packed.pt` + `packed.json`); the result's `extra` gains its sizes.

    `pack` turns the best model into (serving checkpoint, the dense float32 weights it stands for).
    """
    stage = open_stage(cfg, run_dir, {"init": cfg.init_checkpoint, "train": cfg.train_manifest,
                                      "dev": cfg.dev_manifest}, resume=resume)
    result = stage.cached or train(stage)
    if result.step < cfg.max_updates:  # a `stop_after` stop: nothing to pack yet
        return result
    url, record = join(stage.dir.url, "checkpoints", "packed.pt"), join(stage.dir.url, "packed.json")
    if not (exists(url) and exists(record)):
        best = load_trained(result.best_checkpoint)  # its record is `best.checkpoint`: read once
        packed, float32_weights = pack(best)
        save_checkpoint(url, packed)
        write_json(record, {"packed_checkpoint": url, "packed_bytes": serialized_bytes(packed),
                            "float32_weights_bytes": serialized_bytes(float32_weights),
                            "from_checkpoint": result.best_checkpoint})
    return dataclasses.replace(result, extra=result.extra | read_json(record))


def start_from(url: str, language: str | None = None, dropout: float | None = None,
               layerdrop: float | None = None) -> Trained:
    """The checkpoint a stage continues, with the dropout and LayerDrop it asks for (None keeps the checkpoint's).

    Raises:
        FileNotFoundError: when the checkpoint is missing.
        ValueError: when a per-language stage's language is not one of the checkpoint's.
    """
    trained = load_trained(url)
    if language is not None and language not in trained.languages:
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
    return trained


def stage_meta(trained: Trained, init_url: str, **extra: Any) -> dict[str, Any]:
    """What a checkpoint records beside its weights: front end, audio policy, lineage (and e.g. the language)."""
    return {"features": trained.features.model_dump(), "audio": trained.audio_policy.model_dump(),
            "init_checkpoint": init_url} | extra


def load_labeled(trained: Trained, language: str | None, train_manifest: str, dev_manifest: str | None,
                 stage_dir: StageDir, on_progress: ProgressFn | None = None) -> tuple[Dataset, Dataset | None]:
    """One language's labeled train and dev rows (every language's with None), validated against the checkpoint
    (its languages, front end, audio policy and vocabulary); the rejects stay on the datasets.

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
            f"({len(train.rejects)} rejected; see {stage_dir.file('rejects.jsonl')})"
        )
    dev = load_dataset(dev_manifest, **common) if dev_manifest else None
    if dev is not None and not dev.utterances:
        log.warning("no usable %s rows in dev manifest %s: training without dev evaluation", language or "labeled",
                    dev_manifest)
        train = Dataset(train.utterances, train.features, train.rejects + dev.rejects, train.frame_s)
        dev = None
    return train, dev


def log_mix(trainer: Trainer, what: str, record: dict[str, Any]) -> None:
    """One log line (rank 0): the configured mix beside the realized one (a `mix_record` or `source_mix`); none
    when there is nothing to mix (one language, one source)."""
    if not trainer.world.is_main or len(record["configured"]) < 2:
        return
    # Pooled batches hold every language, so only the audio share compares with the natural mix.
    share = "audio_share" if record.get("kind") == "natural" else "batch_share"
    realized = {k: v[share] for k, v in record["realized"].items()}
    log.info("%s update %d: %s mix %s configured %s, realized %s %s over %d batches", trainer.stage, trainer.step,
             what, record.get("kind", ""), {k: round(v, 3) for k, v in record["configured"].items()},
             share.removesuffix("_share"), realized, record["batches"])


def labeled_loop(trainer: Trainer, train: Dataset, sampler: LabeledSampler,
                 around_update: Callable[[Batch], AbstractContextManager] | None = None) -> None:
    """Labeled batches until the budget: the whole loop of the supervised and fine-tune stages (this rank's share);
    the language mix is logged with every save of last.pt. `around_update(batch)` wraps each update (pruning's
    pathways: only the batch language's weights may change)."""
    trainer.model.train()
    batches = shard(sampler, trainer.world)
    while not trainer.done:
        t0 = time.perf_counter()
        idx = next(batches)
        batch = collate([train.utterances[i] for i in idx], train.features, tokenizer=trainer.tokenizer,
                        language_ids=trainer.lang_ids, specaugment=trainer.cfg.specaugment)
        with around_update(batch) if around_update else nullcontext():
            trainer.update(batch, t0=t0)
        trainer.after_update(lambda: {"sampler": sampler.state_dict()})
        if trainer.last_saved_step == trainer.step:
            log_mix(trainer, "language", mix_record(trainer.cfg.language_mix, sampler))
