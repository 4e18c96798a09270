"""Stage 1 of the recipe (paper Sec. 4): supervised multilingual CTC + LID training, ℓ = ℓ_CTC + γ·ℓ_LID.

One readable loop: batch → loss → step, with periodic logging, dev evaluation and checkpoints. Resume
state is one record (`TrainState` fields in the checkpoint); the LR is a pure function of the step, the
sampler's position is two integers, and torch's RNG state covers SpecAugment, dropout and layerdrop, so
a killed run continues with the same losses it would have produced.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from models.encoder import CTCLIDModel, count_parameters, frames_after_subsampling
from models.loss import ctc_lid_loss
from pipeline.config import OptimConfig, SupervisedConfig, model_kwargs
from pipeline.data import Dataset, DynamicBucketSampler, ProgressFn, collate, load_dataset, reject_untrainable
from pipeline.evaluate import decode_dataset, format_table, score
from pipeline.modeling import autocast
from pipeline.tokenizer import Tokenizer, tokenizer_from_dict, train_tokenizer
from storage.checkpoint import load_checkpoint, save_checkpoint
from storage.files import atomic_write_text, exists, join, write_json
from storage.manifest import write_manifest, write_rejects

log = logging.getLogger("mlpl.train")

CHECKPOINT_FORMAT = 1


@dataclass
class StageResult:
    """What a training stage leaves behind and how it went."""

    stage_dir: str
    last_checkpoint: str
    best_checkpoint: str
    step: int
    dev_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    num_train_utterances: int = 0
    num_rejects: int = 0
    num_parameters: int = 0
    train_wall_s: float = 0.0  # over every run of the stage, resumed ones included
    audio_s_per_s: float = 0.0
    losses: list[float] = field(default_factory=list)

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
    """Adagrad (paper) or AdamW (CPU default in the tiny preset)."""
    if optim.name == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(0.9, 0.98), weight_decay=optim.weight_decay)


def compute_loss(model, batch, lid_weight: float, bf16: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward a batch and return ℓ_CTC + γ·ℓ_LID with its parts."""
    with autocast(bf16):
        out = model(batch.feats, batch.feat_lens)
    return ctc_lid_loss(out, batch.targets, batch.target_lens, batch.lang_ids, lid_weight=lid_weight)


def train_step(model, optimizer, batch, *, lid_weight: float, grad_clip_norm: float, bf16: bool):
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


def evaluate_dev(model, dev: Dataset, tokenizer: Tokenizer, languages: list[str], cfg: SupervisedConfig):
    """Greedy-decode the dev set and score it per language."""
    return score(decode_dataset(model, dev, tokenizer=tokenizer, languages=languages, batch=cfg.batch, bf16=cfg.bf16))


def prepare_data(cfg: SupervisedConfig, stage_dir: str, resume_state: dict | None, on_progress: ProgressFn | None):
    """Validate manifests, build (or restore) the tokenizer, write the rejects table."""
    train = load_dataset(
        cfg.train_manifest,
        features=cfg.features,
        policy=cfg.audio,
        require_text=True,
        languages=cfg.languages,
        on_progress=on_progress,
    )
    if resume_state is not None:
        languages = list(resume_state["languages"])
        tokenizer = tokenizer_from_dict(resume_state["tokenizer"])
    else:
        languages = list(cfg.languages) if cfg.languages is not None else train.languages()
        tokenizer = train_tokenizer(
            cfg.tokenizer, [u.text or "" for u in train.utterances], cfg.sentencepiece_vocab_size
        )
    train = reject_untrainable(train, tokenizer, lambda n: int(frames_after_subsampling(n)))
    if not train.utterances:
        raise ValueError(
            f"no usable training utterances in {cfg.train_manifest}: all {len(train.rejects)} rows were rejected "
            f"(see {join(stage_dir, 'rejects.jsonl')})"
        )
    dev = None
    if cfg.dev_manifest:
        dev = load_dataset(
            cfg.dev_manifest, features=cfg.features, policy=cfg.audio, require_text=True, languages=languages
        )
    rejects = train.rejects + (dev.rejects if dev else [])
    write_rejects(join(stage_dir, "rejects.jsonl"), [r.as_row() for r in rejects])
    for r in rejects:
        log.warning("reject %s (%s): %s", r.id, r.source, r.reason)
    return train, dev, languages, tokenizer, len(rejects)


def run_supervised(
    cfg: SupervisedConfig,
    run_dir: str,
    *,
    resume: bool = True,
    on_progress: ProgressFn | None = None,
    stop_after: int | None = None,
) -> StageResult:
    """Train the multilingual CTC + LID model; continue from `<run_dir>/supervised/checkpoints/last.pt`.

    `stop_after` ends the loop early after that many updates (as if killed), for tests and budgets.

    Raises:
        ValueError: when the checkpoint was made with another config, or no training row is usable.
    """
    stage_dir = join(run_dir, "supervised")
    last_url = join(stage_dir, "checkpoints", "last.pt")
    best_url = join(stage_dir, "checkpoints", "best.pt")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    state = load_checkpoint(last_url) if resume and exists(last_url) else None
    if state is not None and state["config_hash"] != cfg.config_hash():
        raise ValueError(
            f"{last_url} was trained with config {state['config_hash']}, not {cfg.config_hash()}; "
            "use a new run directory or pass --no-resume to start over"
        )
    train, dev, languages, tokenizer, num_rejects = prepare_data(cfg, stage_dir, state, on_progress)
    write_json(join(stage_dir, "config.json"), cfg.model_dump(mode="json"))
    write_json(join(stage_dir, "tokenizer.json"), tokenizer.to_dict())

    lang_ids = {lang: i for i, lang in enumerate(languages)}
    kwargs = model_kwargs(cfg.model, tokenizer.vocab_size, len(languages), cfg.features.n_mels)
    model = CTCLIDModel(**kwargs)
    optimizer = make_optimizer(cfg.optim, model)
    sampler = DynamicBucketSampler(
        train.durations(),
        max_batch_duration_s=cfg.batch.max_batch_duration_s,
        max_batch_size=cfg.batch.max_batch_size,
        num_buckets=cfg.batch.num_buckets,
        seed=cfg.seed,
    )
    step, history, evals, best = 0, [], [], {"metric": math.inf, "step": 0}
    # Seconds of training and of audio over every run of this stage, so a resumed run reports the totals.
    t_train, audio_s = 0.0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        step, history, evals, best = state["step"], state["history"], state["evals"], state["best"]
        t_train, audio_s = state["timing"]["train_wall_s"], state["timing"]["audio_s"]
        log.info("resumed from %s at update %d", last_url, step)
    num_params = count_parameters(model)
    log.info(
        "supervised: %d utterances (%.2f h), %d languages, vocab %d, %d parameters, %d rejects",
        len(train.utterances), sum(train.durations()) / 3600, len(languages), tokenizer.vocab_size,
        num_params, num_rejects,
    )

    def save(url: str) -> None:
        save_checkpoint(
            url,
            {
                "format": CHECKPOINT_FORMAT,
                "stage": "supervised",
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": {"torch": torch.get_rng_state()},
                "config": cfg.model_dump(mode="json"),
                "config_hash": cfg.config_hash(),
                "model_kwargs": kwargs,
                "tokenizer": tokenizer.to_dict(),
                "languages": languages,
                "history": history,
                "evals": evals,
                "best": best,
                "timing": {"train_wall_s": t_train, "audio_s": audio_s},
            },
        )

    def write_metrics() -> None:
        write_manifest(join(stage_dir, "metrics.jsonl"), history)
        write_json(join(stage_dir, "dev_evals.json"), evals)

    batches = iter(sampler)
    model.train()
    losses_this_run = []
    t_log, audio_log = time.perf_counter(), 0.0
    end = cfg.max_updates if stop_after is None else min(cfg.max_updates, step + stop_after)
    while step < end:
        t0 = time.perf_counter()
        idx = next(batches)
        batch = collate(
            [train.utterances[i] for i in idx], train.features,
            tokenizer=tokenizer, language_ids=lang_ids, specaugment=cfg.specaugment,
        )
        lr = lr_at(step, cfg.optim, cfg.max_updates)
        for group in optimizer.param_groups:
            group["lr"] = lr
        info, grad_norm = train_step(model, optimizer, batch, lid_weight=cfg.lid_weight,
                                     grad_clip_norm=cfg.optim.grad_clip_norm, bf16=cfg.bf16)
        if grad_norm is None:
            grad_norm = math.nan
            log.warning("update %d: non-finite loss on batch %s; skipped", step + 1, batch.ids[:4])
        step += 1
        seconds = float(batch.feat_lens.sum()) * cfg.features.hop_ms / 1000
        t_train += time.perf_counter() - t0
        audio_s += seconds
        audio_log += seconds
        history.append({"step": step, "lr": lr, "grad_norm": round(grad_norm, 4), "audio_s": round(seconds, 2)}
                       | {k: round(v, 5) for k, v in info.items()})
        losses_this_run.append(info["loss"])
        if on_progress is not None:
            on_progress(step, cfg.max_updates, f"train loss {info['loss']:.3f}")
        if step % cfg.log_every == 0:
            now = time.perf_counter()
            log.info(
                "update %d/%d loss %.3f (ctc %.3f lid %.3f, lid acc %.2f) lr %.2e | %.0f audio-s/s",
                step, cfg.max_updates, info["loss"], info["ctc"], info["lid"], info["lid_acc"], lr,
                audio_log / max(now - t_log, 1e-9),
            )
            t_log, audio_log = now, 0.0
        evaluated = False
        if dev is not None and (step % cfg.eval_every == 0 or step == cfg.max_updates):
            table = evaluate_dev(model, dev, tokenizer, languages, cfg)
            evals.append({"step": step, "metrics": table})
            evaluated = True
            log.info("dev at update %d:\n%s", step, format_table(table))
            if table["macro"]["cer"] < best["metric"]:
                best = {"metric": table["macro"]["cer"], "step": step}
                save(best_url)
        if evaluated or step % cfg.save_every == 0 or step == end:
            save(last_url)
            write_metrics()
    if dev is None or not exists(best_url):
        save(best_url)  # without dev data the last model is the best we know
    dev_metrics = evals[-1]["metrics"] if evals else {}
    result = StageResult(
        stage_dir=stage_dir,
        last_checkpoint=last_url,
        best_checkpoint=best_url,
        step=step,
        dev_metrics=dev_metrics,
        num_train_utterances=len(train.utterances),
        num_rejects=num_rejects,
        num_parameters=num_params,
        train_wall_s=round(t_train, 2),
        audio_s_per_s=round(audio_s / t_train, 1) if t_train else 0.0,
        losses=losses_this_run,
    )
    write_json(join(stage_dir, "result.json"), result.summary())
    if dev_metrics:
        atomic_write_text(join(stage_dir, "dev_metrics.md"), format_table(dev_metrics, f"dev at update {step}"))
    return result
