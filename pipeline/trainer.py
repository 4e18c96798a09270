"""The training machinery every stage shares (docs/architecture.md, "Training machinery").

Supervised training, per-language fine-tuning and slimIPL differ only in where their batches come from.
Each stage writes its own short loop and drives a `Trainer` for everything else: the LR as a pure function
of the step, the update itself (ℓ = ℓ_CTC + γ·ℓ_LID), dev evaluation and best-checkpoint selection, one
resume record in `checkpoints/last.pt` (model, optimizer, every RNG, history, timing, and the stage's own
state such as sampler positions or the PL cache), metrics files and logged rates.

Resume is keyed on what changes the result — the config without budget/cadence/threads, the sha256 of
the input manifests and of the starting checkpoint — so a finished run can be extended or resumed with
other threads, but never silently continued on other data.

Stage caching across runs (docs/architecture.md, "Stage cache"): a finished stage's result.json records the
stage key (the whole config and the content identity of its inputs) and the sha256 of its checkpoints. A
rerun with the same key returns that result without loading data or a model (`reuse_or_resume`); a changed
config or input trains the stage again from scratch, which changes its checkpoint's sha256 and so the key of
every stage that starts from it. A stage whose recorded checkpoints were deleted or changed reruns.

Under torchrun (pipeline/distributed.py) the same Trainer trains a DDP replica on every rank: one collective
per update agrees on the loss figures and on skipping a non-finite step, rank 0 alone evaluates dev and
writes, and last.pt holds every rank's RNG and stage state, so a run resumes only with the world size it
was trained with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from models.encoder import CTCLIDModel, count_parameters
from models.loss import ctc_lid_loss
from pipeline.config import OptimConfig, TrainingConfig
from pipeline.data import Batch, Dataset, ProgressFn
from pipeline.distributed import World, all_reduce_floats, gather, wrap_model
from pipeline.distributed import world as current_world
from pipeline.evaluate import decode_dataset, format_table, score
from pipeline.modeling import autocast, precision_used, resolve_device
from pipeline.tokenizer import Tokenizer
from storage.checkpoint import load_checkpoint, save_checkpoint
from storage.files import atomic_write_text, exists, join, read_json, remove, sha256_of, write_json
from storage.manifest import write_manifest

log = logging.getLogger("mlpl.train")

CHECKPOINT_FORMAT = 2


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


def lr_at(step: int, optim: OptimConfig, max_updates: int) -> float:
    """Learning rate for an update: linear warmup, then constant or cosine decay to min_lr_ratio·lr."""
    if step < optim.warmup_updates:
        return optim.lr * (step + 1) / optim.warmup_updates
    if optim.schedule == "constant":
        return optim.lr
    progress = min(1.0, (step - optim.warmup_updates) / max(1, max_updates - optim.warmup_updates))
    floor = optim.min_lr_ratio
    return optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(optim: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adagrad (paper) or AdamW (CPU default in the tiny presets)."""
    if optim.name == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(0.9, 0.98), weight_decay=optim.weight_decay)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on `device` (pinned and copied without blocking when it is a GPU)."""
    if device.type == "cpu":
        return batch
    move = lambda t: t.pin_memory().to(device, non_blocking=True)  # noqa: E731
    return batch._replace(feats=move(batch.feats), feat_lens=move(batch.feat_lens), targets=move(batch.targets),
                          target_lens=move(batch.target_lens), lang_ids=move(batch.lang_ids))


def compute_loss(model, batch: Batch, lid_weight: float, bf16: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward a batch (on the model's device) and return ℓ_CTC + γ·ℓ_LID with its parts."""
    with autocast(bf16, batch.feats.device):
        out = model(batch.feats, batch.feat_lens)
    return ctc_lid_loss(out, batch.targets, batch.target_lens, batch.lang_ids, lid_weight=lid_weight)


def train_step(model, optimizer, batch: Batch, *, lid_weight: float, grad_clip_norm: float, bf16: bool):
    """One update: loss, backward, grad-norm clip, optimizer step; returns (loss parts, grad norm).

    A non-finite loss skips the update and returns None for the grad norm.
    """
    loss, info = compute_loss(model, batch, lid_weight, bf16)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return info, None
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm))
    optimizer.step()
    return info, grad_norm


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


def reuse_or_resume(stage: str, stage_dir: str, cfg: TrainingConfig, identity: dict[str, str | None],
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
        record = read_json(join(stage_dir, "result.json"))
    except (FileNotFoundError, ValueError):
        return None, True
    cache = record.get("cache") or {}
    if not cache.get("complete"):
        return None, True
    if cache.get("config") != cfg.resume_key() or cache.get("inputs") != identity:
        log.warning("%s: config or inputs changed since the finished run in %s; training it again", stage, stage_dir)
        return None, False
    if cache.get("key") != stage_key(stage, cfg, identity):
        return None, True  # only budget or cadence changed: resume and extend the finished run
    for url, sha in cache.get("outputs", {}).items():
        if not exists(url) or sha256_of(url) != sha:
            log.warning("%s: %s was deleted or changed since the stage finished; training it again", stage, url)
            return None, False
    names = {f.name for f in fields(StageResult)} - {"cached", "losses"}
    log.info("%s: finished earlier with the same config and inputs (%s); reusing it", stage, stage_dir)
    return StageResult(**{k: v for k, v in record.items() if k in names}, cached=True), True


def rng_state() -> dict[str, Any]:
    """torch, Python and numpy global RNG states, in a form `weights_only` checkpoints hold."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    } | ({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


class Trainer:
    """Optimizer, step counter, history, dev evaluation and the resume record of one training stage."""

    def __init__(
        self,
        *,
        stage: str,
        stage_dir: str,
        cfg: TrainingConfig,
        model: CTCLIDModel,
        model_kwargs: dict[str, Any],
        tokenizer: Tokenizer,
        languages: list[str],
        dev: Dataset | None,
        identity: dict[str, str | None],
        meta: dict[str, Any] | None = None,
        on_progress: ProgressFn | None = None,
        started_at: float | None = None,  # perf_counter() when the stage began, so data loading counts
    ):
        self.stage, self.stage_dir, self.cfg = stage, stage_dir, cfg
        self.model, self.model_kwargs = model, model_kwargs
        self.tokenizer, self.languages, self.dev = tokenizer, languages, dev
        self.lang_ids = {lang: i for i, lang in enumerate(languages)}
        self.resume = {"config": cfg.resume_key(), "inputs": identity}
        self.meta = meta or {}  # features, audio policy, init checkpoint: what a later reader needs
        self.on_progress = on_progress
        self.device = resolve_device(cfg.device)
        model.to(self.device)  # before the optimizer, whose state follows the parameters' device
        self.world: World = current_world()
        self.train_model = wrap_model(model, self.world, self.device)  # DDP under torchrun, else `model`
        self.optimizer = make_optimizer(cfg.optim, model)
        self.precision = precision_used(cfg.bf16, self.device)
        self.last_url = join(stage_dir, "checkpoints", "last.pt")
        self.best_url = join(stage_dir, "checkpoints", "best.pt")
        self.step = 0
        self.last_saved_step = -1  # the step last.pt holds, so a stage can add files beside each save
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.best: dict[str, float] = {"metric": math.inf, "step": 0}
        self.train_wall_s = self.audio_s = self.prior_stage_wall_s = 0.0
        self.losses: list[float] = []
        self.end = cfg.max_updates
        self._t_stage = time.perf_counter() if started_at is None else started_at
        self._t_log, self._audio_log = time.perf_counter(), 0.0

    # --- resume -------------------------------------------------------------------------------------
    def restore(self, resume: bool, stop_after: int | None = None) -> dict[str, Any] | None:
        """Load `last.pt` when resuming (returns the stage's own saved state), else start clean.

        Raises:
            ValueError: when the checkpoint was made with another config or other inputs.
        """
        state = None
        if resume and exists(self.last_url):
            state = load_checkpoint(self.last_url)
            self._check_resume(state)
        elif not resume and self.world.is_main:
            for url in (self.last_url, self.best_url):
                remove(url)  # a fresh start must not leave the old run's checkpoints as if they were ours
        if state is not None:
            if self.world.distributed:  # this rank's own RNG and data position
                state = state | state["rank_states"][self.world.rank]
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            self.step, self.history, self.evals, self.best = state["step"], state["history"], state["evals"], state[
                "best"]
            timing = state["timing"]
            self.train_wall_s, self.audio_s = timing["train_wall_s"], timing["audio_s"]
            self.prior_stage_wall_s = timing["stage_wall_s"]
            if state["config"]["max_updates"] != self.cfg.max_updates:
                log.info("%s: max_updates %d → %d; the LR schedule follows the new budget",
                         self.stage, state["config"]["max_updates"], self.cfg.max_updates)
            log.info("%s: resumed from %s at update %d", self.stage, self.last_url, self.step)
        self.end = self.cfg.max_updates if stop_after is None else min(self.cfg.max_updates, self.step + stop_after)
        return None if state is None else state.get("stage_state")

    def _check_resume(self, state: dict[str, Any]) -> None:
        saved = state.get("resume", {})
        fix = "use a new run directory or pass --no-resume to start over"
        trained_with = int(state.get("world_size", 1))
        if trained_with != self.world.size:
            raise ValueError(
                f"{self.last_url} was trained by {trained_with} process(es) (torchrun world size) and this run has "
                f"{self.world.size}; the batches per update and each rank's data position depend on it, so resume "
                f"with `torchrun --nproc-per-node {trained_with}` (nodes × processes = {trained_with}), or {fix}"
            )
        if saved.get("config") != self.resume["config"]:
            raise ValueError(
                f"{self.last_url} was trained with another config (resume key {saved.get('config')}, now "
                f"{self.resume['config']}); {fix}"
            )
        changed = [k for k, v in self.resume["inputs"].items() if saved.get("inputs", {}).get(k) != v]
        if changed:
            raise ValueError(f"{self.last_url} was trained on other inputs ({', '.join(changed)} changed); {fix}")

    def save(self, url: str, stage_state: dict[str, Any] | None = None) -> None:
        """Write the one resume record (atomically); rank 0 writes, with every rank's RNG and stage state.

        Saving last.pt is a collective under torchrun (every rank calls it at the same update); best.pt is not.
        """
        rank_states = None
        if url == self.last_url:
            self.last_saved_step = self.step
            if self.world.distributed:
                rank_states = gather({"rng": rng_state(), "stage_state": stage_state or {}}, self.world)
        if not self.world.is_main:
            return
        save_checkpoint(
            url,
            {
                "format": CHECKPOINT_FORMAT,
                "stage": self.stage,
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(),
                "config": self.cfg.model_dump(mode="json"),
                "resume": self.resume,
                "model_kwargs": self.model_kwargs,
                "tokenizer": self.tokenizer.to_dict(),
                "languages": self.languages,
                "precision": self.precision,
                "history": self.history,
                "evals": self.evals,
                "best": self.best,
                "timing": self.timing(),
                "stage_state": stage_state or {},
                "world_size": self.world.size,
                **({"rank_states": rank_states} if rank_states is not None else {}),
                **self.meta,
            },
        )

    def timing(self) -> dict[str, float]:
        """Training and stage seconds over every run of this stage."""
        return {
            "train_wall_s": self.train_wall_s,
            "audio_s": self.audio_s,
            "stage_wall_s": self.prior_stage_wall_s + time.perf_counter() - self._t_stage,
        }

    # --- the update ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Whether the budget (or `stop_after`) is reached."""
        return self.step >= self.end

    def update(self, batch: Batch, *, t0: float | None = None, kind: str = "labeled", **fields: float) -> dict:
        """One gradient step at the scheduled LR; records history, timing, progress and rates."""
        t0 = time.perf_counter() if t0 is None else t0
        lr = lr_at(self.step, self.cfg.optim, self.cfg.max_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch_to(batch, self.device)
        seconds = float(batch.feat_lens.sum()) * self.frame_s
        if self.world.distributed:
            info, grad_norm, seconds = self._ddp_step(batch, seconds)
        else:
            info, grad_norm = train_step(self.model, self.optimizer, batch, lid_weight=self.cfg.lid_weight,
                                         grad_clip_norm=self.cfg.optim.grad_clip_norm, bf16=self.cfg.bf16)
        if grad_norm is None:
            grad_norm = math.nan
            log.warning("%s update %d: non-finite loss on batch %s; skipped", self.stage, self.step + 1, batch.ids[:4])
        self.step += 1
        self.train_wall_s += time.perf_counter() - t0
        self.audio_s += seconds
        self._audio_log += seconds
        self.history.append(
            {"step": self.step, "kind": kind, "lr": lr, "grad_norm": round(grad_norm, 4), "audio_s": round(seconds, 2)}
            | {k: round(v, 5) for k, v in info.items()}
            | fields
        )
        self.losses.append(info["loss"])
        if self.on_progress is not None:
            self.on_progress(self.step, self.cfg.max_updates, f"train {self.stage} loss {info['loss']:.3f}")
        if self.step % self.cfg.log_every == 0:
            now = time.perf_counter()
            log.info(
                "%s update %d/%d %s loss %.3f (ctc %.3f lid %.3f, lid acc %.2f) lr %.2e | %.0f audio-s/s",
                self.stage, self.step, self.cfg.max_updates, kind, info["loss"], info["ctc"], info["lid"],
                info["lid_acc"], lr, self._audio_log / max(now - self._t_log, 1e-9),
            )
            self._t_log, self._audio_log = now, 0.0
        return info

    def _ddp_step(self, batch: Batch, seconds: float) -> tuple[dict[str, float], float | None, float]:
        """One update of every rank's replica: (loss parts averaged over ranks, grad norm, audio seconds summed).

        The step is skipped on every rank when the loss is non-finite on any; backward still runs so that
        DDP's gradient reduction completes on all ranks.
        """
        loss, info = compute_loss(self.train_model, batch, self.cfg.lid_weight, self.cfg.bf16)
        names = sorted(info)
        totals = all_reduce_floats([float(torch.isfinite(loss))] + [info[k] for k in names] + [seconds], self.world)
        finite = totals[0] == self.world.size
        info = {k: v / self.world.size for k, v in zip(names, totals[1:-1], strict=True)}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # averages the gradients over the ranks
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return info, None, totals[-1]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip_norm))
        self.optimizer.step()
        return info, grad_norm, totals[-1]

    @property
    def frame_s(self) -> float:
        """Seconds per fbank frame."""
        return self.meta["features"]["hop_ms"] / 1000

    def after_update(self, stage_state: Callable[[], dict[str, Any]]) -> dict | None:
        """Periodic work after an update: dev evaluation (best.pt on a new best), last.pt and metrics files."""
        table = None
        eval_due = self.dev is not None and (self.step % self.cfg.eval_every == 0 or self.step == self.cfg.max_updates)
        if eval_due and self.world.is_main:  # the other ranks wait for it in the next collective
            table = self.evaluate_dev()
        if eval_due or self.step % self.cfg.save_every == 0 or self.step == self.end:
            self.save(self.last_url, stage_state())  # on every rank: a collective under torchrun
            self.write_metrics()
        return table

    def evaluate_dev(self) -> dict[str, dict[str, float]]:
        """Greedy-decode the dev set, record it, and keep best.pt at the lowest dev macro CER."""
        table = score(decode_dataset(self.model, self.dev, tokenizer=self.tokenizer, languages=self.languages,
                                     batch=self.cfg.batch, bf16=self.cfg.bf16))
        self.evals.append({"step": self.step, "metrics": table})
        log.info("%s dev at update %d:\n%s", self.stage, self.step, format_table(table))
        if table["macro"]["cer"] < self.best["metric"]:
            self.best = {"metric": table["macro"]["cer"], "step": self.step}
            self.save(self.best_url)
        return table

    def write_metrics(self) -> None:
        """metrics.jsonl (one row per update, each once) and dev_evals.json (rank 0 only)."""
        if not self.world.is_main:
            return
        write_manifest(join(self.stage_dir, "metrics.jsonl"), self.history)
        write_json(join(self.stage_dir, "dev_evals.json"), self.evals)

    def finish(self, stage_state: dict[str, Any], *, num_train_utterances: int, num_rejects: int,
               extra: dict[str, Any] | None = None) -> StageResult:
        """Final checkpoints and result.json (rank 0 writes); returns the stage's result on every rank."""
        self.save(self.last_url, stage_state)
        self.write_metrics()
        main = self.world.is_main
        if main and (self.dev is None or not self.evals or not exists(self.best_url)):
            self.save(self.best_url, stage_state)  # without a dev evaluation the last model is the best we know
        dev_metrics = self.evals[-1]["metrics"] if self.evals else {}
        timing = self.timing()
        result = StageResult(
            stage=self.stage,
            stage_dir=self.stage_dir,
            last_checkpoint=self.last_url,
            best_checkpoint=self.best_url,
            step=self.step,
            precision=self.precision,
            dev_metrics=dev_metrics,
            best={**self.best, "metric": None} if math.isinf(self.best["metric"]) else self.best,  # JSON has no inf
            num_train_utterances=num_train_utterances,
            num_rejects=num_rejects,
            num_parameters=count_parameters(self.model),
            train_wall_s=round(timing["train_wall_s"], 2),
            train_audio_s_per_s=round(timing["audio_s"] / timing["train_wall_s"], 1) if timing["train_wall_s"] else 0.0,
            stage_wall_s=round(timing["stage_wall_s"], 2),
            extra=extra or {},
            losses=self.losses,
        )
        if not main:
            return result
        cache = {"key": stage_key(self.stage, self.cfg, self.resume["inputs"]), **self.resume,
                 "complete": self.step >= self.cfg.max_updates,  # a `stop_after` stop is no finished stage
                 "outputs": {url: sha256_of(url) for url in (self.last_url, self.best_url)}}
        write_json(join(self.stage_dir, "result.json"),
                   json.loads(json.dumps(result.summary() | {"cache": cache}, default=str)))
        if dev_metrics:
            atomic_write_text(join(self.stage_dir, "dev_metrics.md"),
                              format_table(dev_metrics, f"{self.stage} dev at update {self.step}"))
        return result
