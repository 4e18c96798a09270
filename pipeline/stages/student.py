"""Stage 5 of the recipe (paper Sec. 5.1, Tables 2-3): the student, trained on the labeled data of every language
plus the pseudo-label corpus. See docs/architecture.md, "Student".

Two sources feed one loop: labeled batches (the labeled manifests, as stage 1 reads them) and PL batches
streamed from the corpus's WebDataset shards (`pipeline.data.pl_stream`). Each update draws its source with the
configured weights (default: natural proportions, i.e. each source's share of audio seconds, as the paper
pools them); the draw for update n is a pure function of (seed, n), so resume needs no mixer state. The labeled
batches mix languages as `language_mix` says (`pipeline.data.samplers.labeled_sampler`); both mixes, configured
and realized, are logged with every save of last.pt and recorded in result.json (`source_mix`, `language_mix`). PL
filters (confidence, LID agreement, token bounds, teacher) are applied when the table is read, so one PL
corpus serves many students. `from_scratch` builds a new model (any size) on the init checkpoint's
vocabulary, languages and front end, with SpecAugment switched on only after a delay; `finetune` continues
the init checkpoint's weights. `labeled_only` turns the PL source off: the optional last step of the recipe.
Everything else (resume record, LR, dev evaluation, best checkpoint, metrics) is the shared `Trainer`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from models.encoder import CTCLIDModel
from pipeline.config import ModelConfig, StudentConfig, model_kwargs
from pipeline.data.dataset import Dataset, collate
from pipeline.data.pl_stream import PLBatchStream, pl_samples
from pipeline.data.rows import ProgressFn, Reject
from pipeline.data.samplers import LabeledSampler, WeightedDraw, mix_record
from pipeline.data.world import World
from pipeline.engine.distributed import gather_unique, shard
from pipeline.engine.model import Trained, load_trained
from pipeline.engine.stage_cache import StageResult
from pipeline.engine.trainer import Trainer
from pipeline.layout import RunLayout
from pipeline.stages.common import load_labeled, log_mix, open_stage, stage_meta
from pipeline.stages.registry import StageSpec
from storage.checkpoint import read_checkpoint_fields
from storage.pl import load_pseudo_labels

log = logging.getLogger("mlpl.student")

PL_COLUMNS = ["id", "language", "duration_s", "text", "teacher", "shard", "key"]


class SourceMixer(WeightedDraw):
    """Which source (labeled or PL) each update draws from: weights normalized, the draw a pure function of
    (seed, update)."""

    def __init__(self, weights: dict[str, float], seed: int = 0):
        super().__init__(weights, "source", lambda step: seed * 1_000_039 + step)


def pl_rows(cfg: StudentConfig, root: str, languages: list[str]):
    """The PL table's rows this student reads: committed units, the student's languages, its filter and teacher."""
    rows = load_pseudo_labels(root, cfg.pl_filter.query(languages, cfg.pl_teacher), columns=PL_COLUMNS)
    if cfg.pl_max_hours_per_language is None:
        return rows
    rows = rows.sort_values("id", kind="stable")
    within = rows.groupby("language", sort=False)["duration_s"].cumsum() <= 3600 * cfg.pl_max_hours_per_language
    return rows[within].reset_index(drop=True)


def rows_identity(rows) -> str:
    """sha256 of the PL rows read (id, teacher, text, shard, key): resuming on a relabeled corpus is refused."""
    h = hashlib.sha256()
    for r in rows[["id", "teacher", "text", "shard", "key"]].itertuples(index=False):
        h.update("\t".join(map(str, r)).encode("utf-8") + b"\n")
    return h.hexdigest()


def build_student(cfg: StudentConfig, trained: Trained) -> tuple[CTCLIDModel, dict[str, Any]]:
    """The model the student starts from: the init checkpoint's (finetune), or a new one (from_scratch) drawn from
    the global RNG, which the stage seeded."""
    kwargs = dict(trained.checkpoint["model_kwargs"])
    if cfg.mode == "finetune":
        return trained.model, kwargs
    arch = cfg.model or ModelConfig(**{k: kwargs[k] for k in ModelConfig.model_fields})
    kwargs = model_kwargs(arch, kwargs["vocab_size"], kwargs["num_languages"], kwargs["n_mels"])
    return CTCLIDModel(**kwargs), kwargs


def pl_source(cfg: StudentConfig, rows, root: str, trained: Trained,
              world: World) -> tuple[PLBatchStream | None, list[Reject]]:
    """The stream of PL batches over the rows read (None without rows), and the rows no batch could hold."""
    if rows is None:
        return None, []
    limit = min(trained.audio_policy.max_duration_s, cfg.pl_batch.max_batch_duration_s)
    samples, rejects = pl_samples(rows, root, limit, source=root)
    if not samples:
        return None, rejects
    return PLBatchStream(samples, root, features=trained.features, policy=trained.audio_policy, batch=cfg.pl_batch,
                         window_shards=cfg.pl_window_shards, seed=cfg.seed, world=world), rejects


def source_mixer(cfg: StudentConfig, train: Dataset, pl: PLBatchStream | None) -> tuple[SourceMixer, dict[str, float]]:
    """The mixer of the two sources (configured weights, else their audio seconds) and those seconds.

    Raises:
        ValueError: when a source has a weight but no usable data.
    """
    audio_s = {"labeled": sum(train.durations()),
               "pl": sum(s.utterance.duration_s for s in pl.samples) if pl else 0.0}
    weights = cfg.source_weights if cfg.source_weights is not None else audio_s
    missing = [k for k, w in weights.items() if w > 0 and not audio_s.get(k)]
    if missing:
        raise ValueError(f"source(s) {missing} have a weight but no usable data (labeled {audio_s['labeled']:.0f} s, "
                         f"PL {audio_s['pl']:.0f} s)")
    return SourceMixer(weights, cfg.seed), audio_s


def source_mix(history: list[dict[str, Any]], weights: dict[str, float]) -> dict[str, Any]:
    """The configured source weights beside the realized mix: updates (one batch each) and audio seconds per source
    over every run of the stage (the Trainer's history survives resume)."""
    batches: dict[str, int] = {k: 0 for k in weights}
    audio_s: dict[str, float] = {k: 0.0 for k in weights}
    for h in history:
        batches[h["kind"]] = batches.get(h["kind"], 0) + 1
        audio_s[h["kind"]] = audio_s.get(h["kind"], 0.0) + h["audio_s"]
    n, total_s = sum(batches.values()), sum(audio_s.values())
    return {"configured": {k: round(v, 4) for k, v in weights.items()}, "batches": n, "audio_s": round(total_s, 1),
            "realized": {k: {"batches": batches[k], "audio_s": round(audio_s[k], 1),
                             "batch_share": round(batches[k] / n, 4) if n else 0.0,
                             "audio_share": round(audio_s[k] / total_s, 4) if total_s else 0.0}
                         for k in sorted(batches)}}


def student_loop(trainer: Trainer, cfg: StudentConfig, mixer: SourceMixer, train: Dataset,
                 sampler: LabeledSampler, pl: PLBatchStream | None) -> None:
    """Updates until the budget, each on a labeled or a PL batch as the mixer draws (the same draw on every rank);
    the source and language mixes are logged with every save of last.pt."""
    labeled_batches = shard(sampler, trainer.world)
    pl_batches = iter(pl) if pl is not None else None
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
        trainer.after_update(lambda: stage_state_of(sampler, pl))
        if trainer.last_saved_step == trainer.step:
            for what, record in mixes(trainer, cfg, mixer, sampler).items():
                log_mix(trainer, what.removesuffix("_mix"), record)


def mixes(trainer: Trainer, cfg: StudentConfig, mixer: SourceMixer, sampler: LabeledSampler) -> dict[str, Any]:
    """The source and language mixes, configured and realized so far (result.json's `source_mix`, `language_mix`)."""
    return {"source_mix": source_mix(trainer.history, mixer.weights),
            "language_mix": mix_record(cfg.language_mix, sampler)}


def run_student(cfg: StudentConfig, run_dir: str, *, resume: bool = True, on_progress: ProgressFn | None = None,
                stop_after: int | None = None) -> StageResult:
    """Train the student into `<run_dir>/student/<variant>/`; continue from its last.pt when present.

    Raises:
        ValueError: no usable labeled row, no PL row after the filters, a source weighted without data, or a
            checkpoint made with another config or other data.
        FileNotFoundError: when the init checkpoint is missing.
    """
    layout = RunLayout(run_dir)
    init_url = cfg.init_checkpoint or layout.supervised.best
    labels_root = cfg.labels_root or layout.labels
    rows = None
    if not cfg.labeled_only:
        rows = pl_rows(cfg, labels_root, read_checkpoint_fields(init_url, ["languages"])["languages"])
        if rows.empty:
            raise ValueError(f"no pseudo-labels under {labels_root} pass the student's filters {cfg.pl_filter} "
                             f"(teacher {cfg.pl_teacher or 'any'}); run labeling first, relax pl_filter, or set "
                             "labeled_only=true")
    stage = open_stage(cfg, run_dir, {"init": init_url, "train": cfg.train_manifest, "dev": cfg.dev_manifest},
                       resume=resume, extra_identity={"pl": None if rows is None else rows_identity(rows)})
    if stage.cached:
        return stage.cached
    trained = load_trained(init_url)
    model, kwargs = build_student(cfg, trained)
    model.train()
    pl, pl_rejects = pl_source(cfg, rows, labels_root, trained, stage.world)
    train, dev = load_labeled(trained, None, cfg.train_manifest, cfg.dev_manifest, stage.dir, on_progress)
    input_rejects = train.rejects + (dev.rejects if dev else []) + pl_rejects
    stage.write_rejects(input_rejects)
    mixer, audio_s = source_mixer(cfg, train, pl)
    stage.write_config(init_checkpoint=init_url, labels_root=labels_root)
    trainer = stage.trainer(model=model, model_kwargs=kwargs, tokenizer=trained.tokenizer,
                            languages=trained.languages, dev=dev, on_progress=on_progress,
                            meta=stage_meta(trained, init_url, labels_root=labels_root, mode=cfg.mode))
    sampler, saved = stage.restore(trainer, train, stop_after)
    if saved and pl is not None:
        pl.load_state_dict(saved["pl"])
    log.info("%s (%s from %s): labeled %d utts %.0f s, PL %d rows %.0f s, weights %s, %d parameters, %s",
             stage.name, cfg.mode, init_url, len(train.utterances), audio_s["labeled"],
             len(pl.samples) if pl else 0, audio_s["pl"], {k: round(v, 3) for k, v in mixer.weights.items()},
             sum(p.numel() for p in model.parameters()), trainer.precision)
    student_loop(trainer, cfg, mixer, train, sampler, pl)
    # Each rank reads its own PL batches, so each found its own unreadable samples.
    stream_rejects = gather_unique(pl.rejects if pl else [], stage.world)
    all_rejects = input_rejects + stream_rejects
    stage.write_rejects(all_rejects, warn=False)
    updates = {k: sum(1 for h in trainer.history if h["kind"] == k) for k in ("labeled", "pl")}
    extra = {
        "mode": cfg.mode, "init_checkpoint": init_url, "labels_root": None if cfg.labeled_only else labels_root,
        "weights": mixer.weights, "updates_by_source": updates, **mixes(trainer, cfg, mixer, sampler),
        "sources": {"labeled": {"utterances": len(train.utterances), "audio_s": round(audio_s["labeled"], 1)},
                    "pl": {"rows_read": 0 if rows is None else len(rows), "audio_s": round(audio_s["pl"], 1),
                           "rejects": len(pl_rejects) + len(stream_rejects)}},
        "pl_filter": cfg.pl_filter.model_dump() | {"teacher": cfg.pl_teacher},
    }
    return trainer.finish(stage_state_of(sampler, pl), num_train_utterances=len(train.utterances) + (
        len(rows) if rows is not None else 0), num_rejects=len(all_rejects), extra=extra)


def stage_state_of(sampler: LabeledSampler, pl: PLBatchStream | None) -> dict[str, Any]:
    """The student's own resume state: where both sources are."""
    return {"sampler": sampler.state_dict()} | ({"pl": pl.state_dict()} if pl else {})


STAGE = StageSpec(StudentConfig, run_student, "student",
                  "train a student on labeled + pseudo-labeled data (resumes by default)")
