"""What a training stage leaves behind (`StageResult`, result.json) and the stage cache across runs
(docs/architecture.md, "Stage cache").

A finished stage's result.json records the stage key (the whole config and the content identity of its inputs)
and the sha256 of its checkpoints. A rerun with the same key returns that result without loading data or a
model (`reuse_or_resume`); a changed config or input trains the stage again from scratch, which changes its
checkpoint's sha256 and so the key of every stage that starts from it. A stage whose recorded checkpoints were
deleted or changed reruns.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.config import TrainingConfig
from pipeline.engine.distributed import world as current_world
from pipeline.layout import StageDir
from storage.files import exists, read_json, sha256_of

log = logging.getLogger("mlpl.train")


@dataclass
class StageResult:
    """What a training stage leaves behind and how it went (result.json holds `summary()`)."""

    stage: str
    stage_dir: str
    last_checkpoint: str
    best_checkpoint: str
    step: int
    precision: str  # what ran: "bf16" autocast or "fp32"
    dev_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)  # {"metric": dev macro CER, "step": ...}
    num_train_utterances: int = 0
    num_rejects: int = 0
    num_parameters: int = 0
    train_wall_s: float = 0.0  # inside updates only (batching, forward, backward, step), all runs summed
    train_audio_s_per_s: float = 0.0  # audio seconds trained on per second of train_wall_s
    stage_wall_s: float = 0.0  # the whole stage: data, updates, labeling, dev evals, checkpoints; all runs
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific figures (PL quality, cache)
    cached: bool = False  # True when this run trained nothing: the finished stage's result was reused
    losses: list[float] = field(default_factory=list)  # this run's updates only

    def summary(self) -> dict[str, Any]:
        """Everything but the per-update losses, for result.json and Prefect."""
        return {k: v for k, v in self.__dict__.items() if k != "losses"}


def input_identity(**urls: str | None) -> dict[str, str | None]:
    """sha256 of each input file (manifests, starting checkpoint): the data part of the resume key."""
    return {name: (sha256_of(url) if url else None) for name, url in urls.items()}


def stage_key(stage: str, cfg: TrainingConfig, identity: dict[str, str | None]) -> str:
    """The stage cache key: stage name, the whole config (budget included, threads not), input identity, and
    the number of ranks when it is more than one (N ranks train on N batches per update)."""
    size = current_world().size
    blob = json.dumps({"stage": stage, "config": cfg.model_dump(mode="json", exclude={"num_threads", "device"}),
                       "inputs": identity} | ({"world_size": size} if size > 1 else {}),
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def reuse_or_resume(stage: str, stage_dir: StageDir, cfg: TrainingConfig, identity: dict[str, str | None],
                    resume: bool) -> tuple[StageResult | None, bool]:
    """(the finished stage's result when its key and checkpoints still match, whether to resume last.pt).

    A stage that finished under another config or other inputs is trained again from scratch rather than
    refused: its old checkpoints belong to a result nobody asked for any more. One whose budget or cadence
    changed is resumed (extended). An unfinished one under another config is still refused by
    `Trainer.restore`, so a half-trained run is never thrown away silently.
    """
    if not resume:
        return None, False
    try:
        record = read_json(stage_dir.result)
    except (FileNotFoundError, ValueError):
        return None, True
    cache = record.get("cache") or {}
    if not cache.get("complete"):
        return None, True
    if cache.get("config") != cfg.resume_key() or cache.get("inputs") != identity:
        log.warning("%s: config or inputs changed since the finished run in %s; training it again", stage,
                    stage_dir.url)
        return None, False
    if cache.get("key") != stage_key(stage, cfg, identity):
        return None, True  # only budget or cadence changed: resume and extend the finished run
    here = _rebase(record.get("stage_dir"), stage_dir.url)
    for url, sha in cache.get("outputs", {}).items():
        local = here(url)
        if not exists(local) or sha256_of(local) != sha:
            log.warning("%s: %s was deleted or changed since the stage finished; training it again", stage, local)
            return None, False
    names = {f.name for f in fields(StageResult)} - {"cached", "losses"}
    log.info("%s: finished earlier with the same config and inputs (%s); reusing it", stage, stage_dir.url)
    kept = {k: v for k, v in record.items() if k in names}
    kept |= {k: here(kept[k]) for k in ("stage_dir", "last_checkpoint", "best_checkpoint")}
    return StageResult(**kept, cached=True), True


def _rebase(recorded: str | None, current: str):
    """Maps a path recorded under the stage folder where it was trained to the same file under `current`: a
    run folder that was copied or moved (to branch an experiment) reuses its own checkpoints, not the original's."""
    def here(url: str) -> str:
        if recorded and recorded != current and url.startswith(recorded):
            return current + url[len(recorded):]
        return url
    return here




def cache_record(stage: str, cfg: TrainingConfig, resume: dict[str, Any], complete: bool,
                 outputs: list[str]) -> dict[str, Any]:
    """The `cache` entry of result.json: the stage key, the resume key and input identity, whether the budget was
    reached, and the sha256 of each output checkpoint."""
    return {"key": stage_key(stage, cfg, resume["inputs"]), **resume, "complete": complete,
            "outputs": {url: sha256_of(url) for url in outputs}}
