"""The training machinery every stage shares (docs/architecture.md, "Training machinery").

Supervised training, per-language fine-tuning, slimIPL and the student differ only in where their batches come
from. Each stage writes its own short loop and drives a `Trainer` for everything else: the LR as a pure function
of the step, the update itself (`train_step`: ℓ = ℓ_CTC + γ·ℓ_LID, one function for one process or N), dev
evaluation and best-checkpoint selection, one resume record in `checkpoints/last.pt` (model, optimizer, every
RNG, history, timing, and the stage's own state such as sampler positions or the PL cache), metrics files and
logged rates. With `average_top_n` ≥ 2 it also keeps the top-N dev-scored weights and ends the stage with their
average, `checkpoints/averaged.pt`, scored on dev (pipeline/engine/average.py).

Resume is keyed on what changes the result — the config without budget/cadence/threads, the sha256 of the input
manifests and of the starting checkpoint — so a finished run can be extended or resumed with other threads, but
never silently continued on other data. Reuse of finished stages across runs is `pipeline.engine.stage_cache`.

Under torchrun (pipeline/engine/distributed.py) the same Trainer trains a DDP replica on every rank: one
collective per update agrees on the loss figures and on skipping a non-finite step, rank 0 alone evaluates dev
and writes, and last.pt holds every rank's RNG and stage state, so a run resumes only with the world size it
was trained with.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.encoder import CTCLIDModel, count_parameters
from models.loss import ctc_lid_loss
from pipeline.config import OptimConfig, TrainingConfig
from pipeline.data.dataset import Batch, Dataset
from pipeline.data.rows import ProgressFn
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.world import World
from pipeline.engine.average import TopCheckpoints, average_checkpoints, save_top_checkpoint, write_averaged
from pipeline.engine.decode import decode_dataset
from pipeline.engine.device import autocast, precision_used, resolve_device
from pipeline.engine.distributed import all_reduce_floats, gather, wrap_model
from pipeline.engine.distributed import world as current_world
from pipeline.engine.evaluate import format_table, score
from pipeline.engine.stage_cache import StageResult, cache_record
from pipeline.layout import StageDir, prefers_averaged, teacher_note
from storage.checkpoint import load_checkpoint, save_checkpoint
from storage.files import atomic_write_text, exists, list_files, remove, sweep_temp_files, write_json
from storage.manifest import write_manifest

log = logging.getLogger("mlpl.train")

CHECKPOINT_FORMAT = 2


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
        out = model(batch.feats, batch.feat_lens, batch.lang_ids)
    return ctc_lid_loss(out, batch.targets, batch.target_lens, batch.lang_ids, lid_weight=lid_weight)


def train_step(model, optimizer, batch: Batch, *, lid_weight: float, grad_clip_norm: float, bf16: bool,
               agree: Callable[[bool, dict[str, float]], tuple[bool, dict[str, float]]] | None = None,
               regularizer: Callable[[], torch.Tensor] | None = None):
    """One update: loss (+ `regularizer()`, e.g. pruning's group lasso), backward, grad-norm clip, optimizer step;
    returns (loss parts, grad norm).

    A non-finite loss skips the update and returns None for the grad norm. With several processes, `agree`
    turns this rank's (finite, loss parts) into every rank's verdict and averages; then backward always runs,
    so that DDP's gradient reduction completes on every rank even when the step is skipped.
    """
    loss, info = compute_loss(model, batch, lid_weight, bf16)
    if regularizer is not None:
        penalty = regularizer()
        value = float(penalty.detach())
        loss, info = loss + penalty, info | {"loss": info["loss"] + value, "regularizer": value}
    finite = bool(torch.isfinite(loss))
    if agree is not None:
        finite, info = agree(finite, info)
    optimizer.zero_grad(set_to_none=True)
    if finite or agree is not None:
        loss.backward()  # under DDP this averages the gradients over the ranks
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return info, None
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm))
    optimizer.step()
    return info, grad_norm


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
        self.stage, self.cfg = stage, cfg
        self.dir = StageDir(stage_dir)
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
        self.last_url, self.best_url = self.dir.last, self.dir.best
        self.step = 0
        self.last_saved_step = -1  # the step last.pt holds, so a stage can add files beside each save
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.best: dict[str, float] = {"metric": math.inf, "step": 0}
        self.top = TopCheckpoints(cfg.average_top_n)  # in the resume record, so a killed stage keeps its list
        self._dropped: list[int] = []  # top-N steps whose files go once last.pt no longer lists them
        if cfg.average_top_n == 1:
            log.warning("%s: average_top_n=1 averages nothing (the mean of one checkpoint is best.pt); set 0 or ≥ 2",
                        stage)
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
        if self.world.is_main:
            for url in sweep_temp_files(self.dir.url):  # what a killed save left beside the checkpoints
                log.info("removed %s: a temp file whose writer is gone", url)
        if resume and exists(self.last_url):
            state = load_checkpoint(self.last_url)
            self._check_resume(state)
        elif not resume and self.world.is_main:
            for url in (self.last_url, self.best_url, self.dir.averaged):
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
            self.top.load_state_dict(state.get("top", []))
            self._dropped = self.top.resize(self.cfg.average_top_n)  # N is no part of the resume key
            if state["config"]["max_updates"] != self.cfg.max_updates:
                log.info("%s: max_updates %d → %d; the LR schedule follows the new budget",
                         self.stage, state["config"]["max_updates"], self.cfg.max_updates)
            log.info("%s: resumed from %s at update %d", self.stage, self.last_url, self.step)
        if self.world.is_main:
            self._reconcile_top()
        self.end = self.cfg.max_updates if stop_after is None else min(self.cfg.max_updates, self.step + stop_after)
        return None if state is None else state.get("stage_state")

    def _reconcile_top(self) -> None:
        """Make checkpoints/top/ match the restored list: a kill between a dev evaluation and the next last.pt leaves
        a file the list never got (deleted here; that update is evaluated again), and a member file lost since
        leaves the list."""
        listed = {self.dir.top(step).rsplit("/", 1)[-1] for step in self.top.steps() + self._dropped}
        for url in list_files(self.dir.top_dir, "*.pt"):
            if url.rsplit("/", 1)[-1] not in listed:
                remove(url)
        missing = [step for step in self.top.steps() if not exists(self.dir.top(step))]
        if missing:
            log.warning("%s: top-%d checkpoints of updates %s are gone; averaging the others", self.stage,
                        self.top.size, missing)
            self.top.load_state_dict([e for e in self.top.state_dict() if e["step"] not in missing])

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
        save_checkpoint(url, self._record(stage_state, rank_states))
        if url == self.last_url:
            for step in self._dropped:  # last.pt no longer lists them: a resume can no longer need them
                remove(self.dir.top(step))
            self._dropped = []

    def _record(self, stage_state: dict[str, Any] | None, rank_states: list | None = None) -> dict[str, Any]:
        """The checkpoint record of the current weights: everything a resume or `load_trained` reads."""
        return {
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
            "top": self.top.state_dict(),
            "timing": self.timing(),
            "stage_state": stage_state or {},
            "world_size": self.world.size,
            **({"rank_states": rank_states} if rank_states is not None else {}),
            **self.meta,
        }

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
        agree = self._agree_with_ranks(seconds) if self.world.distributed else None
        info, grad_norm = train_step(self.train_model, self.optimizer, batch, lid_weight=self.cfg.lid_weight,
                                     grad_clip_norm=self.cfg.optim.grad_clip_norm, bf16=self.cfg.bf16, agree=agree)
        if agree is not None:
            seconds = self._seconds_all_ranks
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

    def _agree_with_ranks(self, seconds: float) -> Callable[[bool, dict[str, float]], tuple[bool, dict[str, float]]]:
        """The `agree` hook of one update under torchrun: one all-reduce carries whether the loss is finite on
        every rank, the loss parts (averaged) and the audio seconds (summed, kept for the update's record)."""

        def agree(finite: bool, info: dict[str, float]) -> tuple[bool, dict[str, float]]:
            names, size = sorted(info), self.world.size
            totals = all_reduce_floats([float(finite)] + [info[k] for k in names] + [seconds], self.world)
            self._seconds_all_ranks = totals[-1]
            return totals[0] == size, {k: v / size for k, v in zip(names, totals[1:-1], strict=True)}

        return agree

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
        table = self.score_dev(self.model)
        self.record_dev(table)
        return table

    def score_dev(self, model: CTCLIDModel) -> dict[str, dict[str, float]]:
        """A model's dev scores (greedy decoding): per language and macro CER/WER, LID accuracy."""
        return score(decode_dataset(model, self.dev, tokenizer=self.tokenizer, languages=self.languages,
                                    batch=self.cfg.batch, bf16=self.cfg.bf16))

    def record_dev(self, table: dict[str, dict[str, float]]) -> None:
        """Record a dev evaluation of the current weights: best.pt on a new best, a top-N member when it ranks."""
        self.evals.append({"step": self.step, "metrics": table})
        log.info("%s dev at update %d:\n%s", self.stage, self.step, format_table(table))
        cer = table["macro"]["cer"]
        if cer < self.best["metric"]:
            self.best = {"metric": cer, "step": self.step}
            self.save(self.best_url)
        if self.top.admits(cer):
            save_top_checkpoint(self.dir.top(self.step), self.model, self.step, cer)
            self._dropped += self.top.add(self.step, cer)

    def average(self) -> dict[str, Any] | None:
        """averaged.pt: the mean of the top-N checkpoints, scored on dev, and which of it and best.pt teaches (rank 0
        only); None, and no averaged.pt, when averaging is off or nothing was dev-scored."""
        if not self.top.entries or self.dev is None:
            remove(self.dir.averaged)  # an earlier run's average must not pass for this stage's teacher
            if self.top.enabled:
                log.warning("%s: average_top_n=%d but no dev evaluation was kept (no dev set, or resumed from a run "
                            "that kept none); the teacher is best.pt", self.stage, self.top.size)
            return None
        steps = self.top.steps()
        weights = average_checkpoints([self.dir.top(step) for step in steps])
        model = copy.deepcopy(self.model)  # the stage's own model keeps its trained weights
        model.load_state_dict(weights)
        table = self.score_dev(model)
        cer, best_cer = table["macro"]["cer"], self.best["metric"]
        average = {
            "checkpoint": self.dir.averaged,
            "teacher": "averaged" if prefers_averaged(cer, best_cer) else "best",
            "note": teacher_note(cer, best_cer),
            "dev_cer": cer,
            "best": dict(self.best),
            "members": self.top.state_dict(),
            "dev_metrics": table,
        }
        # Its step is the newest update that went into the mean.
        write_averaged(self.dir.averaged, self._record(None) | {"step": max(steps)}, weights, average)
        log.info("%s: averaged the top %d dev checkpoints (updates %s): %s", self.stage, len(steps), steps,
                 average["note"])
        return average

    def write_metrics(self) -> None:
        """metrics.jsonl (one row per update, each once) and dev_evals.json (rank 0 only)."""
        if not self.world.is_main:
            return
        write_manifest(self.dir.file("metrics.jsonl"), self.history)
        write_json(self.dir.file("dev_evals.json"), self.evals)

    def finish(self, stage_state: dict[str, Any], *, num_train_utterances: int, num_rejects: int,
               extra: dict[str, Any] | None = None) -> StageResult:
        """Final checkpoints and result.json (rank 0 writes); returns the stage's result on every rank."""
        self.save(self.last_url, stage_state)
        self.write_metrics()
        main = self.world.is_main
        if main and (self.dev is None or not self.evals or not exists(self.best_url)):
            self.save(self.best_url, stage_state)  # without a dev evaluation the last model is the best we know
        average = self.average() if main else None
        extra = (extra or {}) | ({"average": average} if average else {})
        dev_metrics = self.evals[-1]["metrics"] if self.evals else {}
        timing = self.timing()
        result = StageResult(
            stage=self.stage,
            stage_dir=self.dir.url,
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
            extra=extra,
            losses=self.losses,
        )
        if not main:
            return result
        # A `stop_after` stop is no finished stage.
        cache = cache_record(self.stage, self.cfg, self.resume, self.step >= self.cfg.max_updates,
                             [self.last_url, self.best_url] + ([self.dir.averaged] if average else []))
        write_json(self.dir.result,
                   json.loads(json.dumps(result.summary() | {"cache": cache}, default=str)))
        if dev_metrics:
            text = format_table(dev_metrics, f"{self.stage} dev at update {self.step}")
            if average:
                title = f"{self.stage} dev of the average of updates {', '.join(map(str, self.top.steps()))}"
                text += "\n\n" + format_table(average["dev_metrics"], title) + f"\n\n{average['note']}\n"
            atomic_write_text(self.dir.file("dev_metrics.md"), text)
        return result
