"""Builds models from configs and rebuilds trained models from checkpoints (configs stop here)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from models.encoder import CTCLIDModel
from pipeline.config import AudioPolicy, FeatureConfig
from pipeline.tokenizer import Tokenizer, tokenizer_from_dict
from storage.checkpoint import load_checkpoint


@lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """Whether this CPU runs bf16 matmuls natively (otherwise autocast only slows things down)."""
    try:
        return bool(torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16")) and bool(
            torch.cpu._is_avx512_bf16_supported()
        )
    except AttributeError:
        return False


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device a config's `device` names: "auto" is CUDA when present, else the CPU.

    Raises:
        ValueError: when CUDA is asked for and torch sees no CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but torch sees no CUDA device here; use device='auto' or 'cpu'")
    return torch.device(name)


def _bf16_native(device_type: str) -> bool:
    return torch.cuda.is_bf16_supported() if device_type == "cuda" else bf16_supported()


def precision_used(bf16: bool, device: torch.device | str = "cpu") -> str:
    """What autocast(bf16) really runs on this device."""
    return "bf16" if bf16 and _bf16_native(torch.device(device).type) else "fp32"


def autocast(enabled: bool, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast where the device runs bf16 natively (CUDA with bf16, AVX-512 BF16 CPUs), else a no-op."""
    kind = torch.device(device).type
    if enabled and _bf16_native(kind):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    model = CTCLIDModel(**ckpt["model_kwargs"])
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
