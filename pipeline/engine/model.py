"""Trained models rebuilt from checkpoints (loaded with `weights_only=True`), with what they need to read and label
audio: tokenizer, languages, front end and audio policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.encoder import CTCLIDModel
from models.prune import pack_pruned, unpack_pruned_
from models.quant import pack_model, unpack_model_
from pipeline.config import AudioPolicy, FeatureConfig
from pipeline.data.tokenizer import Tokenizer, tokenizer_from_dict
from storage.checkpoint import load_checkpoint


@dataclass
class Trained:
    """A model rebuilt from a checkpoint with what it needs to read and label audio."""

    model: CTCLIDModel
    tokenizer: Tokenizer
    languages: list[str]
    features: FeatureConfig
    audio_policy: AudioPolicy
    step: int
    checkpoint: dict[str, Any]


def load_trained(url: str) -> Trained:
    """Rebuild model, tokenizer and languages from a checkpoint (loaded with weights_only=True), in eval mode.

    Raises:
        FileNotFoundError: when no checkpoint is at the URL.
        ValueError: when the file is not an mlpl checkpoint.
    """
    ckpt = load_checkpoint(url)
    missing = [k for k in ("model", "model_kwargs", "tokenizer", "languages", "config") if k not in ckpt]
    if missing:
        raise ValueError(f"{url} is not an mlpl checkpoint (missing {', '.join(missing)})")
    # Its initial weights are overwritten at once: building it must not move the global RNG a stage was seeded with.
    packed = ckpt.get("weights") == "packed"  # a quantized model for serving: plain layers, dequantized weights
    with torch.random.fork_rng(devices=[]):
        model = CTCLIDModel(**(ckpt["model_kwargs"] | ({"weight_bits": None} if packed else {})))
    if packed:
        unpack_model_(model, ckpt["model"])
    elif ckpt.get("weights") == "sparse":  # a pruned model for serving: kept blocks and bit masks
        unpack_pruned_(model, ckpt["model"])
    else:
        model.load_state_dict(ckpt["model"])
    model.eval()
    # Every stage records its front end and audio policy beside the weights (stage 1 also in its config).
    features = ckpt.get("features", ckpt["config"].get("features"))
    audio = ckpt.get("audio", ckpt["config"].get("audio"))
    if features is None or audio is None:
        raise ValueError(f"{url} is not an mlpl checkpoint (no feature or audio settings)")
    return Trained(
        model=model,
        tokenizer=tokenizer_from_dict(ckpt["tokenizer"]),
        languages=list(ckpt["languages"]),
        features=FeatureConfig(**features),
        audio_policy=AudioPolicy(**audio),
        step=int(ckpt.get("step", 0)),
        checkpoint=ckpt,
    )


_TRAINING_STATE = ("model", "optimizer", "rng", "top", "history", "evals", "stage_state", "rank_states")


def packed_checkpoint(ckpt: dict[str, Any], model: CTCLIDModel) -> dict[str, Any]:
    """A checkpoint record for serving: the fake-quantized `model`'s encoder weights packed at their bit width
    (`weights: packed`), everything else as in `ckpt`; `load_trained` rebuilds the model it computes with."""
    bits, block = ckpt["model_kwargs"]["weight_bits"], ckpt["model_kwargs"]["weight_block"]
    keep = {k: v for k, v in ckpt.items() if k not in _TRAINING_STATE}
    return keep | {"model": pack_model(model, bits, block), "weights": "packed"}


def sparse_checkpoint(ckpt: dict[str, Any], model: CTCLIDModel) -> dict[str, Any]:
    """A checkpoint record for serving a pruned `model`: the weights of the blocks any pathway keeps and each
    pathway's block masks at one bit per block (`weights: sparse`); `load_trained` rebuilds the masked model."""
    keep = {k: v for k, v in ckpt.items() if k not in _TRAINING_STATE}
    return keep | {"model": pack_pruned(model), "weights": "sparse"}
