"""Serving-size students (issue 20): weights-only quantization-aware training (Rybakov et al., USM binarization).

A finished model's encoder linear weights are fake-quantized (`models/quant.py`: absmean 1-bit, asymmetric 2-8 bit,
sub-channel blocks), trained further on every language's labeled rows with straight-through gradients, and its
best checkpoint is packed at the bit width (`checkpoints/packed.pt`, `weights: packed`), which `load_trained`
rebuilds, so labeling, evaluation and relabeling take the small model through the one decode path.
Output: `<run>/quantize/<bits>bit/`, with the checkpoints, resume, metrics and rejects of every training stage.
"""

from __future__ import annotations

import logging

from models.quant import fake_quantize_model_
from pipeline.config.stages import QuantizeConfig
from pipeline.data.rows import ProgressFn
from pipeline.engine.model import packed_checkpoint
from pipeline.engine.stage_cache import StageResult
from pipeline.stages.common import labeled_loop, load_labeled, stage_meta, start_from, train_then_pack
from pipeline.stages.registry import StageSpec

log = logging.getLogger("mlpl.quantize")


def run_quantize(cfg: QuantizeConfig, run_dir: str, *, resume: bool = True, on_progress: ProgressFn | None = None,
                 stop_after: int | None = None) -> StageResult:
    """Quantization-aware training of `cfg.init_checkpoint` at `cfg.bits`, then its best checkpoint packed; continues
    from its last.pt when present. The result's `extra` names the packed checkpoint and its size against float32.

    Raises:
        ValueError: no usable rows, a checkpoint made with another config or data, or one already quantized.
        FileNotFoundError: when the starting checkpoint is missing.
    """
    return train_then_pack(cfg, run_dir, resume=resume, train=lambda stage: _train(cfg, stage, on_progress, stop_after),
                           pack=lambda best: (packed_checkpoint(best.checkpoint, best.model), best.checkpoint["model"]))


def _train(cfg: QuantizeConfig, stage, on_progress: ProgressFn | None, stop_after: int | None) -> StageResult:
    trained = start_from(cfg.init_checkpoint)
    if trained.checkpoint["model_kwargs"].get("weight_bits") is not None:
        raise ValueError(f"{cfg.init_checkpoint} is quantized already; quantize its float model instead")
    if trained.checkpoint["model_kwargs"].get("pathways"):
        raise ValueError(f"{cfg.init_checkpoint} is pruned; quantize the dense float model it was pruned from")
    fake_quantize_model_(trained.model, cfg.bits, cfg.block)
    kwargs = trained.checkpoint["model_kwargs"] | {"weight_bits": cfg.bits, "weight_block": cfg.block}
    train, dev = load_labeled(trained, None, cfg.train_manifest, cfg.dev_manifest, stage.dir, on_progress)
    rejects = train.rejects + (dev.rejects if dev else [])
    stage.write_rejects(rejects)
    stage.write_config(init_checkpoint=cfg.init_checkpoint)
    trainer = stage.trainer(model=trained.model, model_kwargs=kwargs, tokenizer=trained.tokenizer,
                            languages=trained.languages, dev=dev, on_progress=on_progress,
                            meta=stage_meta(trained, cfg.init_checkpoint, weight_bits=cfg.bits))
    sampler, _ = stage.restore(trainer, train, stop_after)
    log.info("quantize %d-bit (blocks of %d) from %s: %d utterances, %s", cfg.bits, cfg.block, cfg.init_checkpoint,
             len(train.utterances), trainer.precision)
    labeled_loop(trainer, train, sampler)
    return trainer.finish({"sampler": sampler.state_dict()}, num_train_utterances=len(train.utterances),
                          num_rejects=len(rejects))


def _summary(cfg: QuantizeConfig, result: StageResult) -> str:
    """The packed checkpoint and its size against the float32 weights (what `mlpl quantize` prints)."""
    extra = result.extra
    return (f"packed {cfg.bits}-bit checkpoint: {extra['packed_checkpoint']} ({extra['packed_bytes'] / 1e6:.2f} MB; "
            f"float32 weights {extra['float32_weights_bytes'] / 1e6:.2f} MB)")


STAGE = StageSpec(QuantizeConfig, run_quantize, "quantize",
                  "quantization-aware training (1/2/4/8-bit encoder weights) of a finished model, then a packed "
                  "checkpoint for serving and labeling (resumes by default)", summary=_summary,
                  report_title="↪ quantized")
