"""Stage 5 of the recipe (paper Sec. 5.1, Tables 2-3): the student, trained on the labeled data of every language
plus the pseudo-label corpus. See docs/architecture.md, "Student".

Two sources feed one loop: labeled batches (the labeled manifests, as stage 1 reads them) and PL batches
streamed from the corpus's WebDataset shards (`pipeline.pl_stream`). Each update draws its source with the
configured weights (default: natural proportions, i.e. each source's share of audio seconds, as the paper
pools them); the draw for update n is a pure function of (seed, n), so resume needs no mixer state. PL
filters (confidence, LID agreement, token bounds, teacher) are applied when the table is read, so one PL
corpus serves many students. `from_scratch` builds a new model (any size) on the init checkpoint's
vocabulary, languages and front end, with SpecAugment switched on only after a delay; `finetune` continues
the init checkpoint's weights. `labeled_only` turns the PL source off: the optional last step of the recipe.
Everything else (resume record, LR, dev evaluation, best checkpoint, metrics) is the shared `Trainer`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from typing import Any

import torch

from models.encoder import CTCLIDModel
from pipeline.config import ModelConfig, StudentConfig, model_kwargs
from pipeline.data import ProgressFn, batch_sampler, collate
from pipeline.distributed import gather_unique, shard
from pipeline.distributed import world as current_world
from pipeline.finetune import load_language_data
from pipeline.modeling import load_trained
from pipeline.pl_stream import PLBatchStream, pl_samples
from pipeline.trainer import StageResult, Trainer, input_identity, reuse_or_resume
from storage.files import join, write_json
from storage.manifest import write_rejects
from storage.pl import load_pseudo_labels

log = logging.getLogger("mlpl.student")

PL_COLUMNS = ["id", "language", "duration_s", "text", "teacher", "shard", "key"]


class SourceMixer:
    """Which source each update draws from: weights normalized, the draw a pure function of (seed, update)."""

    def __init__(self, weights: dict[str, float], seed: int = 0):
        active = {k: float(v) for k, v in sorted(weights.items()) if v > 0}
        if not active:
            raise ValueError(f"no source has a positive weight: {weights}")
        total = sum(active.values())
        self.weights = {k: v / total for k, v in active.items()}
        self.seed = seed

    def choose(self, step: int) -> str:
        """The source of update `step` (0-based)."""
        u = random.Random(self.seed * 1_000_039 + step).random()
        acc = 0.0
        for name, w in self.weights.items():
            acc += w
            if u < acc:
                return name
        return name  # u within rounding of 1.0


def pl_rows(cfg: StudentConfig, root: str, languages: list[str]):
    """The PL table's rows this student reads: committed units, the student's languages, its filters."""
    f = cfg.pl_filter
    return load_pseudo_labels(root, languages=languages, min_confidence=f.min_confidence, teacher=f.teacher,
                              min_tokens=f.min_tokens, max_tokens=f.max_tokens, lid_agreement=f.require_lid_agreement,
                              columns=PL_COLUMNS)


def rows_identity(rows) -> str:
    """sha256 of the PL rows read (id, teacher, text, shard, key): resuming on a relabeled corpus is refused."""
    h = hashlib.sha256()
    for r in rows[["id", "teacher", "text", "shard", "key"]].itertuples(index=False):
        h.update("\t".join(map(str, r)).encode("utf-8") + b"\n")
    return h.hexdigest()


def build_student(cfg: StudentConfig, trained) -> tuple[CTCLIDModel, dict[str, Any]]:
    """The model the student starts from: the init checkpoint's (finetune), or a new one (from_scratch)."""
    kwargs = dict(trained.checkpoint["model_kwargs"])
    if cfg.mode == "finetune":
        return trained.model, kwargs
    arch = cfg.model or ModelConfig(**{k: kwargs[k] for k in ModelConfig.model_fields})
    kwargs = model_kwargs(arch, kwargs["vocab_size"], kwargs["num_languages"], kwargs["n_mels"])
    torch.manual_seed(cfg.seed)
    return CTCLIDModel(**kwargs), kwargs


def run_student(
    cfg: StudentConfig,
    run_dir: str,
    *,
    resume: bool = True,
    on_progress: ProgressFn | None = None,
    stop_after: int | None = None,
) -> StageResult:
    """Train the student into `<run_dir>/student/<cfg.stage_name()>/`; continue from its last.pt when present.

    Raises:
        ValueError: no usable labeled row, no PL row after the filters, a source weighted without data, or a
            checkpoint made with another config or other data.
        FileNotFoundError: when the init checkpoint is missing.
    """
    started_at = time.perf_counter()
    init_url = cfg.init_checkpoint or join(run_dir, "supervised", "checkpoints", "best.pt")
    labels_root = cfg.labels_root or join(run_dir, "labels")
    trained = load_trained(init_url)
    stage_dir = join(run_dir, "student", cfg.stage_name())
    pl_stream, pl_rejects, pl_identity, rows = None, [], None, None
    if not cfg.labeled_only:
        rows = pl_rows(cfg, labels_root, trained.languages)
        if rows.empty:
            raise ValueError(f"no pseudo-labels under {labels_root} pass the student's filters {cfg.pl_filter}; "
                             "run labeling first, relax pl_filter, or set labeled_only=true")
        pl_identity = rows_identity(rows)
    identity = input_identity(init=init_url, train=cfg.train_manifest, dev=cfg.dev_manifest) | {"pl": pl_identity}
    reused, resume = reuse_or_resume(f"student/{cfg.stage_name()}", stage_dir, cfg, identity, resume)
    if reused is not None:
        return reused
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model, kwargs = build_student(cfg, trained)
    model.train()
    if rows is not None:
        limit = min(trained.audio_policy.max_duration_s, cfg.pl_batch.max_batch_duration_s)
        samples, pl_rejects = pl_samples(rows, labels_root, limit, source=labels_root)
        if samples:
            pl_stream = PLBatchStream(samples, labels_root, features=trained.features, policy=trained.audio_policy,
                                      batch=cfg.pl_batch, window_shards=cfg.pl_window_shards, seed=cfg.seed,
                                      world=current_world())
    train, dev, _ = load_language_data(trained, None, cfg.train_manifest, cfg.dev_manifest, stage_dir, on_progress,
                                       extra_rejects=pl_rejects)
    audio_s = {"labeled": sum(train.durations()),
               "pl": sum(s.utterance.duration_s for s in pl_stream.samples) if pl_stream else 0.0}
    weights = cfg.source_weights if cfg.source_weights is not None else audio_s
    missing = [k for k, w in weights.items() if w > 0 and not audio_s.get(k)]
    if missing:
        raise ValueError(f"source(s) {missing} have a weight but no usable data (labeled {audio_s['labeled']:.0f} s, "
                         f"PL {audio_s['pl']:.0f} s)")
    mixer = SourceMixer(weights, cfg.seed)
    w = current_world()
    if w.is_main:
        write_json(join(stage_dir, "config.json"),
                   cfg.model_dump(mode="json") | {"init_checkpoint": init_url, "labels_root": labels_root})

    trainer = Trainer(
        stage=f"student/{cfg.stage_name()}", stage_dir=stage_dir, cfg=cfg, model=model, model_kwargs=kwargs,
        tokenizer=trained.tokenizer, languages=trained.languages, dev=dev, identity=identity,
        meta={"features": trained.features.model_dump(), "audio": trained.audio_policy.model_dump(),
              "init_checkpoint": init_url, "labels_root": labels_root, "mode": cfg.mode},
        on_progress=on_progress, started_at=started_at,
    )
    sampler = batch_sampler(train.durations(), cfg.batch, cfg.seed)
    stage_state = trainer.restore(resume, stop_after)
    if stage_state:
        sampler.load_state_dict(stage_state["sampler"])
        if pl_stream is not None:
            pl_stream.load_state_dict(stage_state["pl"])
    log.info("student/%s (%s from %s): labeled %d utts %.0f s, PL %d rows %.0f s, weights %s, %d parameters, %s",
             cfg.stage_name(), cfg.mode, init_url, len(train.utterances), audio_s["labeled"],
             len(pl_stream.samples) if pl_stream else 0, audio_s["pl"],
             {k: round(v, 3) for k, v in mixer.weights.items()}, sum(p.numel() for p in model.parameters()),
             trainer.precision)

    def state() -> dict[str, Any]:
        return {"sampler": sampler.state_dict()} | ({"pl": pl_stream.state_dict()} if pl_stream else {})

    labeled_batches = shard(sampler, w)  # the mixer's draw is a function of the step: every rank draws the same
    pl_batches = iter(pl_stream) if pl_stream is not None else None
    while not trainer.done:
        t0 = time.perf_counter()
        source = mixer.choose(trainer.step)
        if source == "labeled":
            utts = [train.utterances[i] for i in next(labeled_batches)]
            feats = train.features
        else:
            utts, feat_list = next(pl_batches)
            feats = {u.id: f for u, f in zip(utts, feat_list, strict=True)}
        spec = cfg.specaugment if trainer.step >= cfg.specaugment_start_updates else None
        batch = collate(utts, feats, tokenizer=trainer.tokenizer, language_ids=trainer.lang_ids, specaugment=spec)
        trainer.update(batch, t0=t0, kind=source)
        trainer.after_update(state)

    # Each rank reads its own PL batches, so each found its own unreadable samples.
    stream_rejects = gather_unique(pl_stream.rejects if pl_stream else [], w)
    all_rejects = train.rejects + (dev.rejects if dev else []) + pl_rejects + stream_rejects
    if w.is_main:
        write_rejects(join(stage_dir, "rejects.jsonl"), [r.as_row() for r in all_rejects])
    updates = {k: sum(1 for h in trainer.history if h["kind"] == k) for k in ("labeled", "pl")}
    extra = {
        "mode": cfg.mode, "init_checkpoint": init_url, "labels_root": None if cfg.labeled_only else labels_root,
        "weights": mixer.weights, "updates_by_source": updates,
        "sources": {"labeled": {"utterances": len(train.utterances), "audio_s": round(audio_s["labeled"], 1)},
                    "pl": {"rows_read": 0 if rows is None else len(rows), "audio_s": round(audio_s["pl"], 1),
                           "rejects": len(pl_rejects) + len(stream_rejects)}},
        "pl_filter": cfg.pl_filter.model_dump(),
    }
    return trainer.finish(state(), num_train_utterances=len(train.utterances) + (len(rows) if rows is not None else 0),
                          num_rejects=len(all_rejects), extra=extra)
