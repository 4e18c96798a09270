"""Stage 1 of the recipe (paper Sec. 4): supervised multilingual CTC + LID training, ℓ = ℓ_CTC + γ·ℓ_LID.

All labeled languages pooled in their natural proportions (the paper's; `language_mix` can instead draw one
language per batch by temperature or weights, and result.json records the mix realized); the shared character
vocabulary is built here and every later stage inherits it through the checkpoint. The loop is batch → update →
periodic work; start-up is `pipeline.stages.common.open_stage`, the machinery (resume record, LR, dev evaluation,
checkpoints) is `pipeline.engine.trainer.Trainer`.
"""

from __future__ import annotations

import logging

from models.encoder import CTCLIDModel
from pipeline.config import SupervisedConfig, model_kwargs
from pipeline.data.dataset import Dataset, load_dataset, reject_untrainable
from pipeline.data.rows import ProgressFn
from pipeline.data.samplers import mix_record
from pipeline.data.tokenizer import Tokenizer, tokenizer_from_dict, train_tokenizer
from pipeline.engine.stage_cache import StageResult
from pipeline.stages.common import labeled_loop, open_stage
from pipeline.stages.registry import StageSpec
from storage.checkpoint import read_checkpoint_fields
from storage.files import exists, write_json

log = logging.getLogger("mlpl.train")


def prepare_data(cfg: SupervisedConfig, saved: dict | None = None, on_progress: ProgressFn | None = None
                 ) -> tuple[Dataset, Dataset | None, list[str], Tokenizer]:
    """Validate manifests and build the tokenizer, or take it and the languages from the checkpoint of the run
    being resumed (`saved`: a rebuild could differ); rejects stay on the datasets.

    Raises:
        ValueError: when no training row is usable.
    """
    train = load_dataset(cfg.train_manifest, features=cfg.features, policy=cfg.audio, require_text=True,
                         languages=cfg.languages, on_progress=on_progress)
    if saved is not None:
        languages, tokenizer = list(saved["languages"]), tokenizer_from_dict(saved["tokenizer"])
    else:
        languages = list(cfg.languages) if cfg.languages is not None else train.languages()
        tokenizer = train_tokenizer(cfg.tokenizer, [u.text or "" for u in train.utterances],
                                    cfg.sentencepiece_vocab_size)
    train = reject_untrainable(train, tokenizer, cfg.model.conv_kernel, cfg.model.conv_stride)
    if not train.utterances:
        raise ValueError(
            f"no usable training utterances in {cfg.train_manifest}: all {len(train.rejects)} rows were rejected "
            "(see the stage's rejects.jsonl)"
        )
    dev = None
    if cfg.dev_manifest:
        dev = load_dataset(cfg.dev_manifest, features=cfg.features, policy=cfg.audio, require_text=True,
                           languages=languages)
    return train, dev, languages, tokenizer


def run_supervised(cfg: SupervisedConfig, run_dir: str, *, resume: bool = True, on_progress: ProgressFn | None = None,
                   stop_after: int | None = None) -> StageResult:
    """Train the multilingual CTC + LID model; continue from `<run_dir>/supervised/checkpoints/last.pt`.

    `stop_after` ends the loop early after that many updates (as a clean stop), for tests and budgets.

    Raises:
        ValueError: when the checkpoint was made with another config or other data, or no row is usable.
    """
    stage = open_stage(cfg, run_dir, {"train": cfg.train_manifest, "dev": cfg.dev_manifest}, resume=resume)
    if stage.cached:
        return stage.cached
    # Only the vocabulary and languages here (Trainer.restore reads the whole record).
    saved = read_checkpoint_fields(stage.dir.last, ["languages", "tokenizer"]) if stage.resume and exists(
        stage.dir.last) else None
    train, dev, languages, tokenizer = prepare_data(cfg, saved, on_progress)
    rejects = train.rejects + (dev.rejects if dev else [])
    stage.write_rejects(rejects)
    stage.write_config()
    if stage.world.is_main:
        write_json(stage.dir.file("tokenizer.json"), tokenizer.to_dict())

    kwargs = model_kwargs(cfg.model, tokenizer.vocab_size, len(languages), cfg.features.n_mels)
    trainer = stage.trainer(model=CTCLIDModel(**kwargs), model_kwargs=kwargs, tokenizer=tokenizer,
                            languages=languages, dev=dev, on_progress=on_progress,
                            meta={"features": cfg.features.model_dump(), "audio": cfg.audio.model_dump()})
    sampler, _ = stage.restore(trainer, train, stop_after)
    log.info(
        "supervised: %d utterances (%.2f h), %d languages, vocab %d, %d rejects, %s",
        len(train.utterances), sum(train.durations()) / 3600, len(languages), tokenizer.vocab_size, len(rejects),
        trainer.precision,
    )
    labeled_loop(trainer, train, sampler)
    return trainer.finish({"sampler": sampler.state_dict()}, num_train_utterances=len(train.utterances),
                          num_rejects=len(rejects), extra={"language_mix": mix_record(cfg.language_mix, sampler)})


STAGE = StageSpec(SupervisedConfig, run_supervised, "train",
                  "supervised multilingual CTC + LID training (resumes by default)")
