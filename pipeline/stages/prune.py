"""Serving-size students (issue 20): structured pruning and language-specific pathways (Yang et al., "Learning ASR
pathways").

1. Mask search, from the finished model's weights: `imp` trains `round_updates` updates (with a group-lasso penalty
   on 8×1 blocks), prunes `prune_rate` of the remaining blocks of every encoder linear weight by magnitude, and
   repeats until `sparsity`; `lth` does the same rounds but rewinds the weights to the model's own after each
   (lottery tickets), so each round's magnitudes come from training the surviving blocks alone. `agnostic` searches
   one mask on every language's batches; `pathways` one mask per language on that language's batches alone. Each
   searched mask is saved at once (`masks/<language or all>.pt`), so a killed search resumes at the next.
2. Training from the model's weights under the masks (`max_updates`, the stage's `Trainer`: resumable, dev-scored):
   every batch is one language, computes with its pathway, and updates only the weights under it.
3. `checkpoints/packed.pt` (`weights: sparse`): the kept blocks' weights and one bit per block per pathway, which
   `load_trained` rebuilds, so evaluation and labeling run the pruned model through the one decode path (an
   utterance of unknown language takes the pathway the LID head picks).
Output: `<run>/prune/<method>-<mask_search>/`.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import AbstractContextManager

import torch

from models.prune import (
    all_masks,
    apply_masks_,
    group_lasso,
    imp_schedule,
    latent_weights,
    magnitude_mask,
    outside_pathway_kept,
    pathway_masks,
    rewind_,
    set_pathway_,
)
from pipeline.config.stages import PruneConfig
from pipeline.data.dataset import Batch, Dataset, collate
from pipeline.data.rows import ProgressFn
from pipeline.data.samplers import batch_sampler
from pipeline.engine.model import Trained, sparse_checkpoint
from pipeline.engine.stage_cache import StageResult
from pipeline.engine.trainer import lr_at, make_optimizer, train_step
from pipeline.stages.common import OpenStage, labeled_loop, load_labeled, stage_meta, start_from, train_then_pack
from pipeline.stages.registry import StageSpec
from storage.checkpoint import load_checkpoint, save_checkpoint
from storage.files import exists, remove_tree

log = logging.getLogger("mlpl.prune")

ALL_LANGUAGES = "all"  # the mask file of a language-agnostic search


def run_prune(cfg: PruneConfig, run_dir: str, *, resume: bool = True, on_progress: ProgressFn | None = None,
              stop_after: int | None = None) -> StageResult:
    """Mask search, training under the masks, then the sparse serving checkpoint; continues a killed search at its
    next mask and a killed training from its last.pt. The result's `extra` has each pathway's sparsity and the
    serving checkpoint's size against the dense float32 weights.

    Raises:
        ValueError: no usable rows, a model quantized or pruned already, layers that 8×1 blocks do not fit, or
            pathways under torchrun.
        FileNotFoundError: when the starting checkpoint is missing.
    """
    return train_then_pack(cfg, run_dir, resume=resume, train=lambda stage: _train(cfg, stage, on_progress, stop_after),
                           pack=_sparse)


def _train(cfg: PruneConfig, stage: OpenStage, on_progress: ProgressFn | None, stop_after: int | None) -> StageResult:
    if stage.world.distributed and cfg.method == "pathways":
        # Each rank would put back the weights outside its own batch's pathway: the replicas would drift apart.
        raise ValueError("pathway training runs in one process (each rank would train another language's pathway); "
                         "run `mlpl prune` without torchrun, or method=agnostic")
    trained = start_from(cfg.init_checkpoint)
    kwargs = trained.checkpoint["model_kwargs"]
    if kwargs.get("weight_bits") is not None or kwargs.get("pathways"):
        raise ValueError(f"{cfg.init_checkpoint} is quantized or pruned already; prune its dense float model instead")
    train, dev = load_labeled(trained, None, cfg.train_manifest, cfg.dev_manifest, stage.dir, on_progress)
    rejects = train.rejects + (dev.rejects if dev else [])
    stage.write_rejects(rejects)
    stage.write_config(init_checkpoint=cfg.init_checkpoint)
    masks = _search_masks(cfg, stage, trained, train, on_progress)
    model = trained.model  # still the finished model's weights: training under the masks starts from them
    apply_masks_(model, masks)
    n_paths = next(iter(masks.values())).shape[0]
    sparsity = _sparsity(model, trained.languages if n_paths > 1 else [ALL_LANGUAGES])
    trainer = stage.trainer(model=model, model_kwargs=kwargs | {"pathways": n_paths}, tokenizer=trained.tokenizer,
                            languages=trained.languages, dev=dev, on_progress=on_progress,
                            meta=stage_meta(trained, cfg.init_checkpoint, pruning=_describe(cfg)))
    sampler, _ = stage.restore(trainer, train, stop_after)
    log.info("prune %s: training %d updates under %d mask(s), sparsity %s, %s", stage.name, cfg.max_updates, n_paths,
             sparsity, trainer.precision)
    labeled_loop(trainer, train, sampler, (lambda batch: _one_pathway(model, batch)) if n_paths > 1 else None)
    return trainer.finish({"sampler": sampler.state_dict()}, num_train_utterances=len(train.utterances),
                          num_rejects=len(rejects), extra={"sparsity": sparsity})


def _describe(cfg: PruneConfig) -> dict[str, object]:
    return {"method": cfg.method, "mask_search": cfg.mask_search, "sparsity": cfg.sparsity,
            "prune_rate": cfg.prune_rate, "round_updates": cfg.round_updates,
            "group_lasso_weight": cfg.group_lasso_weight}


def _one_pathway(model: torch.nn.Module, batch: Batch) -> AbstractContextManager:
    """An update of a one-language batch: its pathway computes, and the weights outside it stay as they are."""
    ids = batch.lang_ids.unique()
    if len(ids) != 1:
        raise ValueError(f"pathway training needs one-language batches, got languages {ids.tolist()}")
    set_pathway_(model, int(ids[0]))
    return outside_pathway_kept(model)


def _sparsity(model: torch.nn.Module, names: list[str]) -> dict[str, float]:
    """Each pathway's share of pruned weights over the prunable layers, and that of their union."""
    masks = list(pathway_masks(model).values())
    total = sum(m.masks[0].numel() for m in masks)
    out = {name: round(sum((~m.masks[i]).sum().item() for m in masks) / total, 4) for i, name in enumerate(names)}
    if len(names) > 1:
        out["union"] = round(sum((~m.masks.any(dim=0)).sum().item() for m in masks) / total, 4)
    return out


def _search_masks(cfg: PruneConfig, stage: OpenStage, trained: Trained, train: Dataset,
                  on_progress: ProgressFn | None) -> dict[str, torch.Tensor]:
    """Every pathway's masks, (P, out, in) per prunable weight: one search per language (pathways) or one over all
    languages (agnostic); a search whose file holds this config's and inputs' key is read back instead."""
    groups = trained.languages if cfg.method == "pathways" else [ALL_LANGUAGES]
    key = {"config": cfg.resume_key(), "inputs": stage.identity}
    if not stage.resume:
        remove_tree(stage.dir.file("masks"))
    found: list[dict[str, torch.Tensor]] = []
    for i, group in enumerate(groups):
        url = stage.dir.file(f"masks/{group}.pt")
        saved = load_checkpoint(url) if exists(url) else None
        if saved is not None and saved["key"] == key:
            log.info("prune: %s mask read back from %s", group, url)
        else:
            rows = [j for j, u in enumerate(train.utterances) if group in (ALL_LANGUAGES, u.language)]
            if not rows:
                raise ValueError(f"no {group!r} rows in {cfg.train_manifest} to search its pathway on")
            t0 = time.perf_counter()
            masks = _search(cfg, trained, train, rows, seed=cfg.seed + i) if cfg.sparsity else {
                name: torch.ones_like(w, dtype=torch.bool) for name, w in latent_weights(trained.model).items()}
            saved = {"key": key, "masks": masks}
            if stage.world.is_main:
                save_checkpoint(url, saved)
            log.info("prune: %s mask by %s in %.0f s (%d rows)", group, cfg.mask_search, time.perf_counter() - t0,
                     len(rows))
        found.append(saved["masks"])
        if on_progress is not None:
            on_progress(i + 1, len(groups), f"mask search {cfg.mask_search}")
    return {name: torch.stack([m[name] for m in found]) for name in found[0]}


def _search(cfg: PruneConfig, trained: Trained, train: Dataset, rows: list[int], seed: int) -> dict[str, torch.Tensor]:
    """One mask per prunable weight by IMP (or LTH) on the utterances `rows`, from the finished model's weights."""
    model = copy.deepcopy(trained.model).train()
    initial = {name: w.detach().clone() for name, w in latent_weights(model).items()}
    apply_masks_(model, {name: torch.ones_like(w, dtype=torch.bool) for name, w in initial.items()})
    lang_ids = {lang: i for i, lang in enumerate(trained.languages)}
    durations = train.durations()
    sampler = iter(batch_sampler([durations[j] for j in rows], cfg.batch, seed))

    def penalty() -> torch.Tensor:
        return cfg.group_lasso_weight * group_lasso(model)

    for level in imp_schedule(cfg.sparsity, cfg.prune_rate):
        optimizer = make_optimizer(cfg.optim, model)  # each round its own schedule (and LTH its own start)
        losses = []
        for step in range(cfg.round_updates):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.optim, cfg.round_updates)
            batch = collate([train.utterances[rows[j]] for j in next(sampler)], train.features,
                            tokenizer=trained.tokenizer, language_ids=lang_ids, specaugment=cfg.specaugment)
            info, _ = train_step(model, optimizer, batch, lid_weight=cfg.lid_weight,
                                 grad_clip_norm=cfg.optim.grad_clip_norm, bf16=cfg.bf16,
                                 regularizer=penalty if cfg.group_lasso_weight else None)
            losses.append(info["loss"])
        with torch.no_grad():
            for name, p in pathway_masks(model).items():
                p.masks[0] = magnitude_mask(latent_weights(model)[name], level, keep=p.masks[0])
        if cfg.mask_search == "lth":
            rewind_(model, initial)
        log.info("prune round at %.1f %% sparsity: mean loss %.3f over %d updates", 100 * level,
                 sum(losses) / max(1, len(losses)), len(losses))
    return {name: m[0] for name, m in all_masks(model).items()}


def _sparse(best: Trained) -> tuple[dict[str, object], dict[str, object]]:
    """The sparse serving checkpoint of the best model and the dense float32 weights it stands for."""
    dense = {k.replace(".parametrizations.weight.original", ".weight"): v
             for k, v in best.checkpoint["model"].items() if not k.endswith(".masks")}
    return sparse_checkpoint(best.checkpoint, best.model), dense


def _summary(cfg: PruneConfig, result: StageResult) -> str:
    """The sparsity and the sparse checkpoint's size against the dense float32 weights (what `mlpl prune` prints)."""
    extra = result.extra
    return (f"sparsity {extra['sparsity']}; sparse checkpoint: {extra['packed_checkpoint']} "
            f"({extra['packed_bytes'] / 1e6:.2f} MB; dense float32 weights "
            f"{extra['float32_weights_bytes'] / 1e6:.2f} MB)")


STAGE = StageSpec(PruneConfig, run_prune, "prune",
                  "structured 8×1-block pruning of a finished model: one language-agnostic mask or a pathway per "
                  "language, then training under the masks (resumes by default)", summary=_summary,
                  report_title="↪ pruned")
