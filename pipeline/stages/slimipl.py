"""Stage 3 of the recipe: slimIPL self-training on one language (Likhomanenko et al. 2021; Lugosch et al. 2022
Sec. 5.2), after flashlight's recipes/slimIPL. See docs/architecture.md, "slimIPL".

After optional labeled-only updates, steps run in cycles of 1 labeled batch and λ unlabeled batches, shuffled
within each cycle. A dynamic cache of N pseudo-labeled batches sits between labeling and training: while it
fills, an unlabeled step labels a fresh batch with the current model and stores it (no gradient step); once
full, an unlabeled step trains on a random cached batch and, with probability p, relabels a fresh batch into
that slot. PLs are made in eval mode (no dropout, no SpecAugment), greedy CTC and no LM as in the paper (or,
with `decoder`, the language's LM-fused beam search), by the live model or an EMA of it. For the first K updates
(cropping warmup) long clips are labeled as overlapping ≈10 s crops whose log-probs are stitched back together;
the model always trains on the uncropped clip. A collapse guard watches every cache refresh (empty PLs, blank
frames, PL characters per second) and stops, or rolls back, before training runs into all-blank output.

The cache (ids + PL tokens in slot order), every RNG, both samplers and the EMA weights are in the checkpoint,
so a killed run resumes to the same cache and the same next steps.

Under torchrun each rank keeps its own cache, filled from its own share of the unlabeled stream (as flashlight
does): no PL traffic between ranks, and the cache scales with the ranks. Which step is labeled and which slot
is trained on come from seeded RNGs that every rank shares, the collapse guard sees the PL statistics averaged
over the ranks, and a slot without usable audio on any rank makes every rank relabel, so all ranks take the same
branch at every step.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.config import SlimIPLConfig
from pipeline.data.dataset import Batch, Dataset, collate
from pipeline.data.rows import ProgressFn, Utterance
from pipeline.data.samplers import DynamicBucketSampler
from pipeline.data.stream import LazyBatchLoader, LoadedBatch, load_unlabeled
from pipeline.data.tokenizer import Tokenizer
from pipeline.engine.beam import BeamDecoder
from pipeline.engine.decode import CropSpec, decode_features
from pipeline.engine.distributed import all_reduce_floats, any_rank, gather_unique, shard
from pipeline.engine.model import Trained
from pipeline.engine.stage_cache import StageResult
from pipeline.engine.trainer import Trainer, _as_tuple
from pipeline.layout import RunLayout, StageDir
from pipeline.stages.common import load_labeled, open_stage, stage_meta, start_from
from pipeline.stages.lm import open_decoder
from pipeline.stages.pl_cache import CollapseError, CollapseGuard, PLCache, choose_slot, is_labeled_step, pl_stats
from pipeline.stages.registry import StageSpec
from storage.checkpoint import load_checkpoint
from storage.files import copy_file, exists
from storage.manifest import read_manifest, write_manifest, write_rejects

log = logging.getLogger("mlpl.slimipl")


def label_batch(model, batch: LoadedBatch, *, tokenizer: Tokenizer, languages: list[str], bf16: bool,
                crop: CropSpec | None = None, beam: BeamDecoder | None = None) -> list[dict]:
    """Pseudo-label a loaded batch with `model` in eval mode (no dropout, no SpecAugment): greedy CTC (the paper's)
    or, given `beam`, LM-fused beam search over the same posteriors."""
    return decode_features(model, batch.features, tokenizer=tokenizer, languages=languages, bf16=bf16, crop=crop,
                           beam=beam, clip_languages=[u.language for u in batch.utterances])


@dataclass
class SlimIPLProgress:
    """Where the PL phase stands: its step counter, cache refreshes and their statistics, PL quality at the start
    and the end, and the last checkpoint saved while PLs looked healthy (the rollback target)."""

    iteration: int = 0
    refreshes: int = 0
    pl_history: list[dict[str, Any]] = field(default_factory=list)
    pl_eval: dict[str, Any] = field(default_factory=dict)
    good: dict[str, Any] | None = None


class SlimIPL:
    """slimIPL's moving parts on one language around a Trainer: the labeled sampler, the lazy unlabeled stream,
    the PL cache, the collapse guard, the labeler (the live model or its EMA) and the slot RNG."""

    def __init__(self, cfg: SlimIPLConfig, trainer: Trainer, trained: Trained, train: Dataset,
                 sampler: DynamicBucketSampler, unlabeled: list[Utterance], references: dict[str, str],
                 stage_dir: StageDir, init_url: str):
        self.cfg, self.trainer, self.model, self.train = cfg, trainer, trained.model, train
        self.references, self.stage_dir, self.init_url = references, stage_dir, init_url
        self.start_dropout = trained.checkpoint["model_kwargs"]["dropout"], trained.checkpoint["model_kwargs"][
            "layerdrop"]
        self.by_id = {u.id: u for u in unlabeled}
        self.sampler = sampler  # the labeled batches, already at their saved position on resume
        ub = cfg.unlabeled_batch
        self.loader = LazyBatchLoader(unlabeled, features=trained.features, policy=trained.audio_policy,
                                      max_batch_duration_s=ub.max_batch_duration_s, max_batch_size=ub.max_batch_size,
                                      num_buckets=ub.num_buckets, seed=cfg.seed,
                                      prefetch_batches=cfg.unlabeled_prefetch_batches, source=cfg.unlabeled_manifest,
                                      world=trainer.world)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay \
            else None
        self.cache, self.guard, self.rng = PLCache(cfg.pl_cache_size), CollapseGuard(cfg.collapse), random.Random(
            cfg.seed)
        hop = trained.features.hop_ms / 1000
        self.crop = CropSpec(round(cfg.crop_s / hop), round(cfg.crop_overlap_s / hop))
        self.progress = SlimIPLProgress()
        self.beam = None if cfg.decoder is None else open_decoder(cfg.language, cfg.decoder, trained.tokenizer)

    @property
    def labeler(self):
        """The model that makes PLs: the EMA of the weights when configured, else the live model."""
        return self.ema.module if self.ema is not None else self.model

    # --- resume -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the Trainer's record."""
        return {"sampler": self.sampler.state_dict(), "unlabeled": self.loader.state_dict(),
                "cache": self.cache.state_dict(), "guard": self.guard.state_dict(), "rng": self.rng.getstate(),
                "ema": self.ema.state_dict() if self.ema is not None else None, **asdict(self.progress)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Continue from a saved state (the labeled sampler is restored with the Trainer); a full cache means the
        PL phase's dynamic dropout is on."""
        self.loader.load_state_dict(saved["unlabeled"])
        self.cache.load_state_dict(saved["cache"])
        self.guard.load_state_dict(saved["guard"])
        self.rng.setstate(_as_tuple(saved["rng"]))
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self.progress = SlimIPLProgress(**{k: saved[k] for k in asdict(self.progress)})
        if self.cache.full:
            self._dropout(self.cfg.pl_dropout, self.cfg.pl_layerdrop)

    # --- the loop ---------------------------------------------------------------------------------------
    def run(self, base_rejects: list[dict]) -> None:
        """Steps until the budget: labeled-only first, then cycles of 1 labeled and λ unlabeled steps."""
        cfg, trainer = self.cfg, self.trainer
        self.model.train()
        self.labeled_batches, self.unlabeled_batches = shard(self.sampler, trainer.world), iter(self.loader)
        try:
            while not trainer.done:
                if trainer.step < cfg.supervised_updates:
                    self.labeled_step()
                else:
                    labeled = is_labeled_step(self.progress.iteration, cfg.unlabeled_ratio, cfg.seed)
                    self.progress.iteration += 1
                    if labeled:
                        self.labeled_step()
                    elif not self.pl_step():
                        continue  # no gradient step (cache filling, unusable slot, rollback): nothing periodic
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                trainer.after_update(self.state_dict)
                if trainer.last_saved_step == trainer.step:
                    self.after_save(base_rejects)
        finally:
            self.loader.close()

    def labeled_step(self) -> None:
        """One update on the next labeled batch (with SpecAugment)."""
        t0 = time.perf_counter()
        idx = next(self.labeled_batches)
        batch = collate([self.train.utterances[i] for i in idx], self.train.features, tokenizer=self.trainer.tokenizer,
                        language_ids=self.trainer.lang_ids, specaugment=self.cfg.specaugment)
        self.trainer.update(batch, t0=t0, kind="labeled")

    def pl_step(self) -> bool:
        """One unlabeled step: fill the cache (no update), or train on a random slot and maybe relabel it.
        Returns whether an update happened that the periodic work should follow."""
        cfg, w = self.cfg, self.trainer.world
        if not self.cache.full:
            slot = self.refresh("fill")
            if slot is not None:
                self.cache.slots.append(slot)
                if self.cache.full:
                    log.info("%s PL cache full (%d batches) at update %d: PL training starts", self.trainer.stage,
                             self.cache.size, self.trainer.step)
                    self._dropout(cfg.pl_dropout, cfg.pl_layerdrop)  # dynamic dropout once PLs are used
            return False
        t0 = time.perf_counter()
        index, relabel = choose_slot(self.rng, len(self.cache.slots), cfg.pl_cache_update_prob)
        batch = self.pl_batch(self.cache.slots[index])
        unusable = any_rank(batch is None, w)  # on any rank: then no rank updates, so none waits for the others
        if unusable:
            log.warning("%s cache slot %d has no usable utterance%s; relabeling it", self.trainer.stage, index,
                        "" if batch is None else " on another rank")
        else:
            self.trainer.update(batch, t0=t0, kind="pl", slot=index)
        if unusable or relabel:
            slot = self.refresh("relabel")
            if slot is None:
                return False  # rolled back: the cache refills from the restored weights
            self.cache.slots[index] = slot
        return not unusable

    def refresh(self, phase: str) -> dict[str, list] | None:
        """Label the next unlabeled batch with the current labeler into a cache slot (None when the collapse guard
        rolled back instead); the guard sees every refresh, averaged over the ranks."""
        trainer, w = self.trainer, self.trainer.world
        batch = next(self.unlabeled_batches)
        cropping = trainer.step < self.cfg.cropping_warmup_updates
        decoded = self.label(self.labeler, batch, self.crop if cropping else None)
        stats = pl_stats(batch.utterances, decoded, self.references) | {"step": trainer.step, "phase": phase,
                                                                        "cropped": cropping}
        if w.distributed:  # the guard decides for every rank, on the statistics of every rank's batch
            keys = ("empty_share", "blank_ratio", "chars_per_s")
            stats |= {k: round(v / w.size, 4) for k, v in zip(keys, all_reduce_floats([stats[k] for k in keys], w),
                                                                 strict=True)}
        p = self.progress
        p.refreshes += 1
        p.pl_history.append(stats | {"refresh": p.refreshes})
        if p.refreshes % 10 == 1:
            log.info("%s PL refresh %d at update %d: %s", trainer.stage, p.refreshes, trainer.step, stats)
        problems = self.guard.observe(stats)
        if problems:
            self.stop_or_roll_back(problems, stats)
            return None
        keep = [(u.id, d["tokens"]) for u, d in zip(batch.utterances, decoded, strict=True) if d["tokens"]]
        return {"ids": [i for i, _ in keep], "tokens": [t for _, t in keep]}

    def stop_or_roll_back(self, problems: list[str], stats: dict) -> None:
        """The guard tripped: stop with the numbers and the last good checkpoint, or (action=rollback) reload it,
        empty the cache and go on.

        Raises:
            CollapseError: with action=stop, or when the rollbacks are used up.
        """
        cfg, trainer = self.cfg, self.trainer
        good = self.progress.good or {"url": self.init_url, "step": 0}
        message = (
            f"slimIPL collapse guard ({cfg.language}): {cfg.collapse.patience} cache refreshes in a row crossed a "
            f"threshold (last: {'; '.join(problems)}; PL CER {stats.get('pl_cer', 'n/a')}) at update {trainer.step}; "
            f"last good checkpoint: {good['url']} (update {good['step']}). Lengthen cropping_warmup_updates, lower "
            "optim.lr, start from a better fine-tuned model, or set collapse.action=rollback"
        )
        if cfg.collapse.action == "stop" or self.guard.rollbacks >= cfg.collapse.max_rollbacks:
            raise CollapseError(message)
        log.warning("%s — rolling back (%d of %d)", message, self.guard.rollbacks + 1, cfg.collapse.max_rollbacks)
        self.model.load_state_dict(load_checkpoint(good["url"])["model"])
        trainer.optimizer.state.clear()  # moments of the collapsed trajectory would push it back there
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())
        self.cache.slots.clear()
        self.guard.rollbacks, self.guard.streak = self.guard.rollbacks + 1, 0
        self._dropout(*self.start_dropout)

    def pl_batch(self, slot: dict[str, list]) -> Batch | None:
        """Features of a cached slot's uncropped clips (decoded again: the cache holds no audio) with its PLs."""
        utts, feats, tokens = [], {}, []
        for uid, toks in zip(slot["ids"], slot["tokens"], strict=True):
            f = self.loader.decode(self.by_id[uid])  # None (and a reject) if the file changed since it was labeled
            if f is not None:
                utts.append(self.by_id[uid])
                feats[uid] = f
                tokens.append(toks)
        if not utts:
            return None
        return collate(utts, feats, tokenizer=None, language_ids=self.trainer.lang_ids,
                       specaugment=self.cfg.specaugment, token_ids=tokens)

    # --- measurements and files -------------------------------------------------------------------------
    def label(self, model, batch: LoadedBatch, crop: CropSpec | None) -> list[dict]:
        """`label_batch` with this stage's vocabulary, languages and precision."""
        t = self.trainer
        return label_batch(model, batch, tokenizer=t.tokenizer, languages=t.languages, bf16=t.cfg.bf16, crop=crop,
                           beam=self.beam)

    def measure_pls(self, when: str, loader: LazyBatchLoader) -> None:
        """PL quality of the labeler over the fixed PL-evaluation clips, whole and cropped (`pl_eval[when]`)."""
        out = {}
        for how, crop in (("whole", None), ("crop", self.crop)):
            utts, decoded = [], []
            for batch in loader.iter_epoch(0):
                utts += batch.utterances
                decoded += self.label(self.labeler, batch, crop)
            out[how] = pl_stats(utts, decoded, self.references) if utts else {}
        self.progress.pl_eval[when] = out
        log.info("%s PLs of the %s labeler: %s", self.trainer.stage, "starting" if when == "start" else "final", out)

    def stream_rejects(self) -> list[dict]:
        """Unlabeled rows that failed to decode on any rank (each rank reads its own share), each once."""
        return [r.as_row() for r in gather_unique(self.loader.rejects, self.trainer.world)]

    def write_files(self, base_rejects: list[dict], stream_rejects: list[dict]) -> None:
        """pl_metrics.jsonl and every reject found so far (rank 0 writes)."""
        if self.trainer.world.is_main:
            write_manifest(self.stage_dir.file("pl_metrics.jsonl"), self.progress.pl_history)
            write_rejects(self.stage_dir.file("rejects.jsonl"), base_rejects + stream_rejects)

    def after_save(self, base_rejects: list[dict]) -> None:
        """Files that follow each last.pt: PL metrics, rejects so far, and good.pt while PLs look healthy. Every
        rank records good.pt, which a rollback (after the next collective) reads on all."""
        self.write_files(base_rejects, self.stream_rejects())
        if self.guard.streak == 0:
            good = self.stage_dir.checkpoint("good")
            if self.trainer.world.is_main:
                copy_file(self.trainer.last_url, good)
            self.progress.good = {"url": good, "step": self.trainer.step}

    def _dropout(self, dropout: float, layerdrop: float) -> None:
        self.model.set_dropout(dropout)
        self.model.set_layerdrop(layerdrop)

    def extra(self, unlabeled: list[Utterance]) -> dict[str, Any]:
        """The stage's own figures for result.json."""
        history = self.trainer.history
        return {
            "language": self.cfg.language,
            "pl_eval": self.progress.pl_eval,
            "refreshes": self.progress.refreshes,
            "pl_updates": sum(h["kind"] == "pl" for h in history),
            "labeled_updates": sum(h["kind"] == "labeled" for h in history),
            "unlabeled_utterances": len(unlabeled),
            "unlabeled_audio_s": round(sum(u.duration_s for u in unlabeled), 1),
            "rollbacks": self.guard.rollbacks,
        }


def run_slimipl(cfg: SlimIPLConfig, run_dir: str, *, resume: bool = True, on_progress: ProgressFn | None = None,
                stop_after: int | None = None) -> StageResult:
    """slimIPL on `cfg.language`, starting from its fine-tuned checkpoint; continues from last.pt when present.

    Raises:
        CollapseError: when the collapse guard trips (action "stop", or rollbacks exhausted).
        ValueError: unknown language, no usable rows, or a checkpoint made with another config or data.
        FileNotFoundError: when the starting checkpoint is missing.
    """
    lang = cfg.language
    init_url = cfg.init_checkpoint or RunLayout(run_dir).finetune(lang).best
    stage = open_stage(cfg, run_dir, {"init": init_url, "train": cfg.train_manifest,
                                      "unlabeled": cfg.unlabeled_manifest, "dev": cfg.dev_manifest}, resume=resume)
    if stage.cached:
        return stage.cached
    trained = start_from(init_url, lang, cfg.dropout, cfg.layerdrop)
    unlabeled, unlabeled_rejects = load_unlabeled(cfg.unlabeled_manifest, features=trained.features,
                                                  policy=trained.audio_policy, languages=trained.languages,
                                                  language=lang)
    if not unlabeled:
        raise ValueError(f"no usable {lang!r} rows in unlabeled manifest {cfg.unlabeled_manifest} "
                         f"({len(unlabeled_rejects)} rejected)")
    train, dev = load_labeled(trained, lang, cfg.train_manifest, cfg.dev_manifest, stage.dir, on_progress)
    base_rejects = [r.as_row() for r in train.rejects + (dev.rejects if dev else []) + unlabeled_rejects]
    stage.write_rejects(train.rejects + (dev.rejects if dev else []) + unlabeled_rejects)
    stage.write_config(init_checkpoint=init_url)
    references = _references(cfg.reference_manifest)
    trainer = stage.trainer(model=trained.model, model_kwargs=trained.checkpoint["model_kwargs"],
                            tokenizer=trained.tokenizer, languages=trained.languages, dev=dev,
                            meta=stage_meta(trained, init_url, language=lang), on_progress=on_progress)
    sampler, saved = stage.restore(trainer, train, stop_after)
    slim = SlimIPL(cfg, trainer, trained, train, sampler, unlabeled, references, stage.dir, init_url)
    if saved:
        slim.load_state_dict(saved)
    pl_eval_loader = _pl_eval_loader(unlabeled, references, cfg, trained)
    main = trainer.world.is_main  # PL quality is a measurement: rank 0 alone
    if pl_eval_loader is not None and "start" not in slim.progress.pl_eval and main:
        slim.measure_pls("start", pl_eval_loader)
    log.info("slimipl/%s from %s: %d labeled, %d unlabeled utterances (%.0f s), λ %d, N %d, p %.2f, K %d, %s",
             lang, init_url, len(train.utterances), len(unlabeled), sum(u.duration_s for u in unlabeled),
             cfg.unlabeled_ratio, cfg.pl_cache_size, cfg.pl_cache_update_prob, cfg.cropping_warmup_updates,
             trainer.precision)
    slim.run(base_rejects)
    # A rerun of a finished stage skips the end measurement.
    if pl_eval_loader is not None and slim.progress.pl_eval.get("end_step") != trainer.step and main:
        slim.measure_pls("end", pl_eval_loader)
        slim.progress.pl_eval["end_step"] = trainer.step
    stream_rejects = slim.stream_rejects()
    slim.write_files(base_rejects, stream_rejects)
    return trainer.finish(slim.state_dict(), num_train_utterances=len(train.utterances),
                          num_rejects=len(base_rejects) + len(stream_rejects), extra=slim.extra(unlabeled))


def _references(url: str | None) -> dict[str, str]:
    """Hidden true transcripts by id (for PL CER only); {} without a reference manifest."""
    if not url or not exists(url):
        return {}
    rows, _ = read_manifest(url)
    return {str(r["id"]): str(r["text"]) for r in rows if r.get("id") is not None and r.get("text")}


def _pl_eval_loader(unlabeled: list[Utterance], references: dict[str, str], cfg: SlimIPLConfig,
                    trained: Trained) -> LazyBatchLoader | None:
    """The fixed clips whose PL CER is measured at the start and the end (the first ones with a reference)."""
    chosen = [u for u in unlabeled if u.id in references][: cfg.pl_eval_max_utterances]
    if not chosen:
        return None
    ub = cfg.unlabeled_batch
    return LazyBatchLoader(chosen, features=trained.features, policy=trained.audio_policy,
                           max_batch_duration_s=ub.max_batch_duration_s, max_batch_size=ub.max_batch_size,
                           num_buckets=ub.num_buckets, seed=cfg.seed, shuffle=False, source="pl-eval")


STAGE = StageSpec(SlimIPLConfig, run_slimipl, "slimipl",
                  "slimIPL self-training on one language (resumes by default)")
