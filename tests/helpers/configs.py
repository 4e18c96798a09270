"""Stage configs the stage tests share: smoke-corpus manifests and a slimIPL run of a few updates."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import slimipl_tiny

LENIENT_GUARD = {"max_empty_share": 1.0, "max_blank_ratio": 1.0, "min_chars_per_s": 0.0}


def smoke_manifest(corpus: str, name: str) -> str:
    """A manifest of the smoke corpus by split name."""
    return str(Path(corpus) / "manifests" / f"{name}.jsonl")


def tiny_slimipl(corpus: str, init: str, **overrides):
    """slimIPL on sl for 12 updates (cache 3, cropping warmup 4) from `init`, with field overrides."""
    base = dict(
        init_checkpoint=init,
        reference_manifest=str(Path(corpus) / "hidden" / "unlabeled_reference.jsonl"),
        pl_cache_size=3,
        unlabeled_ratio=2,
        pl_cache_update_prob=0.5,
        cropping_warmup_updates=4,
        max_updates=12,
        save_every=4,
        log_every=4,
        optim={"name": "adamw", "lr": 1e-3, "warmup_updates": 1, "schedule": "constant"},
        unlabeled_batch={"max_batch_duration_s": 60.0, "max_batch_size": 2, "num_buckets": 2},
        collapse=LENIENT_GUARD,
        pl_eval_max_utterances=2,
    )
    unlabeled = overrides.pop("unlabeled_manifest", smoke_manifest(corpus, "unlabeled"))
    return slimipl_tiny("sl", smoke_manifest(corpus, "labeled"), unlabeled, None, **(base | overrides))
