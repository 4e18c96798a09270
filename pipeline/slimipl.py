"""Stage 3 of the recipe: slimIPL self-training on one language (Likhomanenko et al. 2021; Lugosch et al. 2022
Sec. 5.2), after flashlight's recipes/slimIPL. See docs/architecture.md, "slimIPL".

After optional labeled-only updates, steps run in cycles of 1 labeled batch and λ unlabeled batches, shuffled
within each cycle. A dynamic cache of N pseudo-labeled batches sits between labeling and training: while it
fills, an unlabeled step labels a fresh batch with the current model and stores it (no gradient step); once
full, an unlabeled step trains on a random cached batch and, with probability p, relabels a fresh batch into
that slot. PLs are made in eval mode (no dropout, no SpecAugment), greedy CTC, no LM, by the live model or an
EMA of it. For the first K updates (cropping warmup) long clips are labeled as overlapping ≈10 s crops whose
log-probs are stitched back together; the model always trains on the uncropped clip. A collapse guard watches
every cache refresh (empty PLs, blank frames, PL characters per second) and stops, or rolls back, before
training runs into all-blank output.

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
from dataclasses import dataclass, field
from typing import Any

import jiwer
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.config import CollapseGuardConfig, SlimIPLConfig
from pipeline.data import Batch, ProgressFn, Utterance, batch_sampler, collate, normalize_language
from pipeline.distributed import all_reduce_floats, any_rank, barrier, gather_unique, shard
from pipeline.distributed import world as current_world
from pipeline.evaluate import CropSpec, decode_features
from pipeline.finetune import load_language_data, stage_meta, start_from
from pipeline.stream import LazyBatchLoader, LoadedBatch, load_unlabeled
from pipeline.text import normalize_text
from pipeline.trainer import StageResult, Trainer, _as_tuple, input_identity, reuse_or_resume
from storage.checkpoint import load_checkpoint
from storage.files import copy_file, exists, join, write_json
from storage.manifest import read_manifest, write_manifest, write_rejects

log = logging.getLogger("mlpl.slimipl")


class CollapseError(ValueError):
    """Self-training degenerated (mostly empty / all-blank pseudo-labels); the message says what to do."""


class _RolledBack(Exception):
    """The collapse guard restored the last good weights: the interrupted step is abandoned."""


def choose_slot(rng: random.Random, size: int, p: float) -> tuple[int, bool]:
    """A uniformly random cache slot to train on, and whether to relabel it afterwards (probability p)."""
    return rng.randrange(size), rng.random() < p


def is_labeled_step(iteration: int, unlabeled_ratio: int, seed: int) -> bool:
    """Whether step `iteration` of the PL phase is the labeled one of its cycle of 1 + λ (shuffled per cycle)."""
    cycle, pos = divmod(iteration, unlabeled_ratio + 1)
    order = [True] + [False] * unlabeled_ratio
    random.Random(seed * 1_000_003 + cycle).shuffle(order)
    return order[pos]


@dataclass
class PLCache:
    """N slots of pseudo-labeled batches: utterance ids and PL token ids, in slot order."""

    size: int
    slots: list[dict[str, list]] = field(default_factory=list)  # {"ids": [...], "tokens": [[...], ...]}

    @property
    def full(self) -> bool:
        """Whether every slot holds a batch."""
        return len(self.slots) >= self.size

    def state_dict(self) -> dict[str, Any]:
        """Resumable contents."""
        return {"size": self.size, "slots": self.slots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore saved contents."""
        self.size, self.slots = int(state["size"]), [dict(s) for s in state["slots"]]


@dataclass
class CollapseGuard:
    """Counts consecutive cache refreshes whose PLs look collapsed."""

    cfg: CollapseGuardConfig
    streak: int = 0
    rollbacks: int = 0

    def problems(self, stats: dict[str, float]) -> list[str]:
        """The thresholds one refresh crosses, worded for the error message."""
        c, out = self.cfg, []
        if stats["empty_share"] > c.max_empty_share:
            out.append(f"empty PL share {stats['empty_share']:.2f} > {c.max_empty_share}")
        if stats["blank_ratio"] > c.max_blank_ratio:
            out.append(f"blank ratio {stats['blank_ratio']:.3f} > {c.max_blank_ratio}")
        if stats["chars_per_s"] < c.min_chars_per_s:
            out.append(f"{stats['chars_per_s']:.2f} PL chars/s < {c.min_chars_per_s}")
        return out

    def observe(self, stats: dict[str, float]) -> list[str]:
        """Record one refresh; return the crossed thresholds once `patience` refreshes in a row crossed one."""
        problems = self.problems(stats)
        self.streak = self.streak + 1 if problems else 0
        return problems if self.streak >= self.cfg.patience else []

    def state_dict(self) -> dict[str, int]:
        """Resumable counters."""
        return {"streak": self.streak, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore saved counters."""
        self.streak, self.rollbacks = int(state["streak"]), int(state["rollbacks"])


def pl_stats(utts: list[Utterance], decoded: list[dict], references: dict[str, str]) -> dict[str, float]:
    """Quality signals of one labeled batch: empty share, blank ratio, chars/s, length, confidence, PL CER."""
    audio_s = sum(u.duration_s for u in utts)
    chars = sum(len(d["hypothesis"]) for d in decoded)
    stats = {
        "utterances": len(utts),
        "audio_s": round(audio_s, 2),
        "empty_share": round(sum(d["num_tokens"] == 0 for d in decoded) / max(1, len(decoded)), 4),
        "blank_ratio": round(sum(d["blank_ratio"] for d in decoded) / max(1, len(decoded)), 4),
        "chars_per_s": round(chars / max(audio_s, 1e-9), 3),
        "pl_tokens": round(sum(d["num_tokens"] for d in decoded) / max(1, len(decoded)), 2),
        "confidence": round(sum(d["confidence"] for d in decoded) / max(1, len(decoded)), 4),
    }
    pairs = [(normalize_text(references[u.id]), normalize_text(d["hypothesis"]))
             for u, d in zip(utts, decoded, strict=True) if u.id in references]
    if pairs:  # measurement only: hidden transcripts never reach training
        stats["pl_cer"] = round(100 * jiwer.cer([r for r, _ in pairs], [h for _, h in pairs]), 2)
    return stats


def label_batch(model, batch: LoadedBatch, trainer: Trainer, crop: CropSpec | None) -> list[dict]:
    """Pseudo-label a loaded batch with `model` in eval mode (no dropout, no SpecAugment): greedy CTC, no LM."""
    return decode_features(model, batch.features, tokenizer=trainer.tokenizer, languages=trainer.languages,
                           bf16=trainer.cfg.bf16, crop=crop)


def measure_pls(model, loader: LazyBatchLoader, trainer: Trainer, crop: CropSpec | None,
                references: dict[str, str]) -> dict[str, float]:
    """PL quality of `model` over the PL evaluation clips (one pass, whole or cropped)."""
    utts, decoded = [], []
    for batch in loader.iter_epoch(0):
        utts += batch.utterances
        decoded += label_batch(model, batch, trainer, crop)
    return pl_stats(utts, decoded, references) if utts else {}


def run_slimipl(
    cfg: SlimIPLConfig,
    run_dir: str,
    *,
    resume: bool = True,
    on_progress: ProgressFn | None = None,
    stop_after: int | None = None,
) -> StageResult:
    """slimIPL on `cfg.language`, starting from its fine-tuned checkpoint; continues from last.pt when present.

    Raises:
        CollapseError: when the collapse guard trips (action "stop", or rollbacks exhausted).
        ValueError: unknown language, no usable rows, or a checkpoint made with another config or data.
        FileNotFoundError: when the starting checkpoint is missing.
    """
    started_at = time.perf_counter()
    init_url = cfg.init_checkpoint or join(run_dir, "finetune", normalize_language(cfg.language) or cfg.language,
                                           "checkpoints", "best.pt")
    trained, lang = start_from(init_url, cfg.language, cfg.dropout, cfg.layerdrop)
    stage_dir = join(run_dir, "slimipl", lang)
    identity = input_identity(init=init_url, train=cfg.train_manifest, unlabeled=cfg.unlabeled_manifest,
                              dev=cfg.dev_manifest)
    reused, resume = reuse_or_resume(f"slimipl/{lang}", stage_dir, cfg, identity, resume)
    if reused is not None:
        return reused
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    unlabeled, unlabeled_rejects = load_unlabeled(cfg.unlabeled_manifest, features=trained.features,
                                                  policy=trained.audio_policy, languages=trained.languages,
                                                  language=lang)
    if not unlabeled:
        raise ValueError(f"no usable {lang!r} rows in unlabeled manifest {cfg.unlabeled_manifest} "
                         f"({len(unlabeled_rejects)} rejected)")
    train, dev, _ = load_language_data(trained, lang, cfg.train_manifest, cfg.dev_manifest, stage_dir, on_progress,
                                       extra_rejects=unlabeled_rejects)
    w = current_world()
    barrier(w)  # rank 0 has written rejects.jsonl, which every rank reads back
    base_rejects = _rejects_of(stage_dir)
    references = _references(cfg.reference_manifest)
    if w.is_main:
        write_json(join(stage_dir, "config.json"), cfg.model_dump(mode="json") | {"init_checkpoint": init_url})

    model = trained.model
    trainer = Trainer(
        stage=f"slimipl/{lang}", stage_dir=stage_dir, cfg=cfg, model=model,
        model_kwargs=trained.checkpoint["model_kwargs"], tokenizer=trained.tokenizer, languages=trained.languages,
        dev=dev, meta=stage_meta(trained, init_url, lang), on_progress=on_progress, started_at=started_at,
        identity=identity,
    )
    sampler = batch_sampler(train.durations(), cfg.batch, cfg.seed)
    ub = cfg.unlabeled_batch
    loader = LazyBatchLoader(unlabeled, features=trained.features, policy=trained.audio_policy,
                             max_batch_duration_s=ub.max_batch_duration_s, max_batch_size=ub.max_batch_size,
                             num_buckets=ub.num_buckets, seed=cfg.seed, prefetch_batches=cfg.unlabeled_prefetch_batches,
                             source=cfg.unlabeled_manifest, world=w)
    by_id = {u.id: u for u in unlabeled}
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay else None
    labeler = ema.module if ema is not None else model
    cache, guard, rng = PLCache(cfg.pl_cache_size), CollapseGuard(cfg.collapse), random.Random(cfg.seed)
    hop = trained.features.hop_ms / 1000
    crop = CropSpec(round(cfg.crop_s / hop), round(cfg.crop_overlap_s / hop))
    s: dict[str, Any] = {"iteration": 0, "refreshes": 0, "pl_history": [], "pl_eval": {}, "good": None}

    def stage_state() -> dict[str, Any]:
        return {
            "sampler": sampler.state_dict(),
            "unlabeled": loader.state_dict(),
            "cache": cache.state_dict(),
            "guard": guard.state_dict(),
            "rng": rng.getstate(),
            "ema": ema.state_dict() if ema is not None else None,
            **s,
        }

    saved = trainer.restore(resume, stop_after)
    if saved:
        sampler.load_state_dict(saved["sampler"])
        loader.load_state_dict(saved["unlabeled"])
        cache.load_state_dict(saved["cache"])
        guard.load_state_dict(saved["guard"])
        rng.setstate(_as_tuple(saved["rng"]))
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        s.update({k: saved[k] for k in s})
    if cache.full:  # dynamic dropout: the PL phase had begun before the restart
        model.set_dropout(cfg.pl_dropout)
        model.set_layerdrop(cfg.pl_layerdrop)
    pl_eval_loader = _pl_eval_loader(unlabeled, references, cfg, trained)
    if pl_eval_loader is not None and "start" not in s["pl_eval"] and w.is_main:  # a measurement: rank 0 alone
        s["pl_eval"]["start"] = {
            "whole": measure_pls(labeler, pl_eval_loader, trainer, None, references),
            "crop": measure_pls(labeler, pl_eval_loader, trainer, crop, references),
        }
        log.info("slimipl/%s PLs of the starting model: %s", lang, s["pl_eval"]["start"])
    log.info("slimipl/%s from %s: %d labeled, %d unlabeled utterances (%.0f s), λ %d, N %d, p %.2f, K %d, %s",
             lang, init_url, len(train.utterances), len(unlabeled), sum(u.duration_s for u in unlabeled),
             cfg.unlabeled_ratio, cfg.pl_cache_size, cfg.pl_cache_update_prob, cfg.cropping_warmup_updates,
             trainer.precision)

    labeled_batches, unlabeled_batches = shard(sampler, w), iter(loader)

    def labeled_step() -> None:
        t0 = time.perf_counter()
        idx = next(labeled_batches)
        batch = collate([train.utterances[i] for i in idx], train.features, tokenizer=trainer.tokenizer,
                        language_ids=trainer.lang_ids, specaugment=cfg.specaugment)
        trainer.update(batch, t0=t0, kind="labeled")

    def refresh(phase: str) -> dict[str, list]:
        """Label the next unlabeled batch with the current labeler; the collapse guard sees every refresh."""
        batch = next(unlabeled_batches)
        cropping = trainer.step < cfg.cropping_warmup_updates
        decoded = label_batch(labeler, batch, trainer, crop if cropping else None)
        stats = pl_stats(batch.utterances, decoded, references) | {"step": trainer.step, "phase": phase,
                                                                   "cropped": cropping}
        if w.distributed:  # the guard decides for every rank, on the statistics of every rank's batch
            keys = ("empty_share", "blank_ratio", "chars_per_s")
            stats |= {k: round(v / w.size, 4) for k, v in zip(keys, all_reduce_floats([stats[k] for k in keys], w),
                                                                 strict=True)}
        s["refreshes"] += 1
        s["pl_history"].append(stats | {"refresh": s["refreshes"]})
        if s["refreshes"] % 10 == 1:
            log.info("slimipl/%s PL refresh %d at update %d: %s", lang, s["refreshes"], trainer.step, stats)
        problems = guard.observe(stats)
        if problems:
            collapse(problems, stats)
        keep = [(u.id, d["tokens"]) for u, d in zip(batch.utterances, decoded, strict=True) if d["tokens"]]
        return {"ids": [i for i, _ in keep], "tokens": [t for _, t in keep]}

    def collapse(problems: list[str], stats: dict) -> None:
        good = s["good"] or {"url": init_url, "step": 0}
        message = (
            f"slimIPL collapse guard ({lang}): {cfg.collapse.patience} cache refreshes in a row crossed a threshold "
            f"(last: {'; '.join(problems)}; PL CER {stats.get('pl_cer', 'n/a')}) at update {trainer.step}; last good "
            f"checkpoint: {good['url']} (update {good['step']}). Lengthen cropping_warmup_updates, lower optim.lr, "
            "start from a better fine-tuned model, or set collapse.action=rollback"
        )
        if cfg.collapse.action == "stop" or guard.rollbacks >= cfg.collapse.max_rollbacks:
            raise CollapseError(message)
        log.warning("%s — rolling back (%d of %d)", message, guard.rollbacks + 1, cfg.collapse.max_rollbacks)
        model.load_state_dict(load_checkpoint(good["url"])["model"])
        trainer.optimizer.state.clear()  # moments of the collapsed trajectory would push it back there
        if ema is not None:
            ema.module.load_state_dict(model.state_dict())
        cache.slots.clear()
        guard.rollbacks, guard.streak = guard.rollbacks + 1, 0
        model.set_dropout(trained.checkpoint["model_kwargs"]["dropout"])
        model.set_layerdrop(trained.checkpoint["model_kwargs"]["layerdrop"])
        raise _RolledBack

    def pl_step() -> bool:
        """One unlabeled step: fill the cache (no update), or train on a random slot and maybe relabel it."""
        if not cache.full:
            cache.slots.append(refresh("fill"))
            if cache.full:
                log.info("slimipl/%s PL cache full (%d batches) at update %d: PL training starts", lang,
                         cache.size, trainer.step)
                model.set_dropout(cfg.pl_dropout)  # dynamic dropout once PLs are used
                model.set_layerdrop(cfg.pl_layerdrop)
            return False
        t0 = time.perf_counter()
        slot, relabel = choose_slot(rng, len(cache.slots), cfg.pl_cache_update_prob)
        batch = _pl_batch(cache.slots[slot], by_id, loader, trainer, cfg)
        unusable = any_rank(batch is None, w)  # on any rank: then no rank updates, so none waits for the others
        if unusable:
            log.warning("slimipl/%s cache slot %d has no usable utterance%s; relabeling it", lang, slot,
                        "" if batch is None else " on another rank")
        else:
            trainer.update(batch, t0=t0, kind="pl", slot=slot)
        if unusable or relabel:
            cache.slots[slot] = refresh("relabel")
        return not unusable

    model.train()
    try:
        while not trainer.done:
            if trainer.step < cfg.supervised_updates:
                labeled_step()
            else:
                labeled = is_labeled_step(s["iteration"], cfg.unlabeled_ratio, cfg.seed)
                s["iteration"] += 1
                if labeled:
                    labeled_step()
                else:
                    try:
                        if not pl_step():
                            continue  # no gradient step: nothing periodic to do
                    except _RolledBack:
                        continue  # the cache refills from the restored weights
            if ema is not None:
                ema.update_parameters(model)
            trainer.after_update(stage_state)
            if trainer.last_saved_step == trainer.step:
                _after_save(trainer, stage_dir, base_rejects, loader, s, guard)
    finally:
        loader.close()
    # A rerun of a done stage skips it; rank 0 alone measures.
    if pl_eval_loader is not None and s["pl_eval"].get("end_step") != trainer.step and w.is_main:
        s["pl_eval"]["end"] = {
            "whole": measure_pls(labeler, pl_eval_loader, trainer, None, references),
            "crop": measure_pls(labeler, pl_eval_loader, trainer, crop, references),
        }
        s["pl_eval"]["end_step"] = trainer.step
        log.info("slimipl/%s PLs of the final labeler: %s", lang, s["pl_eval"]["end"])
    stream_rejects = _all_ranks_rejects(loader, w)
    if w.is_main:
        write_manifest(join(stage_dir, "pl_metrics.jsonl"), s["pl_history"])
        write_rejects(join(stage_dir, "rejects.jsonl"), base_rejects + stream_rejects)
    extra = {
        "language": lang,
        "pl_eval": s["pl_eval"],
        "refreshes": s["refreshes"],
        "pl_updates": sum(h["kind"] == "pl" for h in trainer.history),
        "labeled_updates": sum(h["kind"] == "labeled" for h in trainer.history),
        "unlabeled_utterances": len(unlabeled),
        "unlabeled_audio_s": round(sum(u.duration_s for u in unlabeled), 1),
        "rollbacks": guard.rollbacks,
    }
    return trainer.finish(stage_state(), num_train_utterances=len(train.utterances),
                          num_rejects=len(base_rejects) + len(stream_rejects), extra=extra)


def _after_save(trainer: Trainer, stage_dir: str, base_rejects: list[dict], loader: LazyBatchLoader,
                s: dict[str, Any], guard: CollapseGuard) -> None:
    """Files that follow each last.pt: PL metrics, rejects found so far, and good.pt while PLs look healthy.

    Rank 0 writes; every rank records good.pt, which a rollback (after the next collective) reads on all.
    """
    main = trainer.world.is_main
    stream_rejects = _all_ranks_rejects(loader, trainer.world)
    if main:
        write_manifest(join(stage_dir, "pl_metrics.jsonl"), s["pl_history"])
        write_rejects(join(stage_dir, "rejects.jsonl"), base_rejects + stream_rejects)
    if guard.streak == 0:
        good = join(stage_dir, "checkpoints", "good.pt")
        if main:
            copy_file(trainer.last_url, good)
        s["good"] = {"url": good, "step": trainer.step}


def _all_ranks_rejects(loader: LazyBatchLoader, w) -> list[dict]:
    """Unlabeled rows that failed to decode on any rank (each rank reads its own share), each once."""
    return [r.as_row() for r in gather_unique(loader.rejects, w)]


def _pl_batch(slot: dict[str, list], by_id: dict[str, Utterance], loader: LazyBatchLoader, trainer: Trainer,
              cfg: SlimIPLConfig) -> Batch | None:
    """Features of a cached slot's uncropped clips (decoded again: the cache holds no audio) with its PLs."""
    utts, feats, tokens = [], {}, []
    for uid, toks in zip(slot["ids"], slot["tokens"], strict=True):
        f = loader.decode(by_id[uid])  # None (and a reject) if the file changed since it was labeled
        if f is not None:
            utts.append(by_id[uid])
            feats[uid] = f
            tokens.append(toks)
    if not utts:
        return None
    return collate(utts, feats, tokenizer=None, language_ids=trainer.lang_ids, specaugment=cfg.specaugment,
                   token_ids=tokens)


def _references(url: str | None) -> dict[str, str]:
    """Hidden true transcripts by id (for PL CER only); {} without a reference manifest."""
    if not url or not exists(url):
        return {}
    rows, _ = read_manifest(url)
    return {str(r["id"]): str(r["text"]) for r in rows if r.get("id") is not None and r.get("text")}


def _rejects_of(stage_dir: str) -> list[dict]:
    rows, _ = read_manifest(join(stage_dir, "rejects.jsonl"))
    return rows


def _pl_eval_loader(unlabeled: list[Utterance], references: dict[str, str], cfg: SlimIPLConfig,
                    trained) -> LazyBatchLoader | None:
    """The fixed clips whose PL CER is measured at the start and the end (the first ones with a reference)."""
    chosen = [u for u in unlabeled if u.id in references][: cfg.pl_eval_max_utterances]
    if not chosen:
        return None
    ub = cfg.unlabeled_batch
    return LazyBatchLoader(chosen, features=trained.features, policy=trained.audio_policy,
                           max_batch_duration_s=ub.max_batch_duration_s, max_batch_size=ub.max_batch_size,
                           num_buckets=ub.num_buckets, seed=cfg.seed, shuffle=False, source="pl-eval")
