"""Stage 2 of the recipe (paper Sec. 5.1, Table 1): fine-tune the multilingual model on one language.

Pooled self-training gives poor pseudo-labels for low-resource languages; fine-tuning the multilingual
checkpoint on one language's labeled data first gives a much better teacher for that language's slimIPL.
The vocabulary and LID head stay those of the multilingual model, so every language's PLs share them.
Output: `<run>/finetune/<language>/`, with the same checkpoints, resume, metrics and rejects as stage 1.
"""

from __future__ import annotations

import logging

from pipeline.config import FinetuneConfig
from pipeline.data.rows import ProgressFn
from pipeline.engine.stage_cache import StageResult
from pipeline.layout import RunLayout
from pipeline.stages.common import labeled_loop, load_labeled, open_stage, stage_meta, start_from
from pipeline.stages.registry import StageSpec

log = logging.getLogger("mlpl.finetune")


def run_finetune(cfg: FinetuneConfig, run_dir: str, *, resume: bool = True, on_progress: ProgressFn | None = None,
                 stop_after: int | None = None) -> StageResult:
    """Fine-tune the multilingual checkpoint on `cfg.language`; continue from its last.pt when present.

    Raises:
        ValueError: unknown language, no usable rows, or a checkpoint made with another config or data.
        FileNotFoundError: when the starting checkpoint is missing.
    """
    lang = cfg.language
    init_url = cfg.init_checkpoint or RunLayout(run_dir).supervised.best
    stage = open_stage(cfg, run_dir, {"init": init_url, "train": cfg.train_manifest, "dev": cfg.dev_manifest},
                       resume=resume)
    if stage.cached:
        return stage.cached
    trained = start_from(init_url, lang, cfg.dropout, cfg.layerdrop)
    train, dev = load_labeled(trained, lang, cfg.train_manifest, cfg.dev_manifest, stage.dir, on_progress)
    rejects = train.rejects + (dev.rejects if dev else [])
    stage.write_rejects(rejects)
    stage.write_config(init_checkpoint=init_url)
    trainer = stage.trainer(model=trained.model, model_kwargs=trained.checkpoint["model_kwargs"],
                            tokenizer=trained.tokenizer, languages=trained.languages, dev=dev,
                            meta=stage_meta(trained, init_url, language=lang), on_progress=on_progress)
    sampler, _ = stage.restore(trainer, train, stop_after)
    log.info("finetune/%s from %s: %d utterances (%.1f s), %d rejects, %s", lang, init_url, len(train.utterances),
             sum(train.durations()), len(rejects), trainer.precision)
    labeled_loop(trainer, train, sampler)
    return trainer.finish({"sampler": sampler.state_dict()}, num_train_utterances=len(train.utterances),
                          num_rejects=len(rejects))


STAGE = StageSpec(FinetuneConfig, run_finetune, "finetune",
                  "fine-tune the multilingual model on one language (resumes by default)")
