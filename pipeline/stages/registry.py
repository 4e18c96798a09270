"""The training stages by their config (docs/architecture.md, "How to add a stage"): the one table that the
generic Prefect flow (`flows.stages.train_flow`) and the CLI dispatch on. A new stage is a config in
`pipeline/config/stages.py`, a module here with its `run_<stage>(cfg, run_dir, *, resume, on_progress,
stop_after) -> StageResult`, and one line in `TRAINING_STAGES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.config import (
    FinetuneConfig,
    PruneConfig,
    QuantizeConfig,
    SlimIPLConfig,
    StudentConfig,
    SupervisedConfig,
    TrainingConfig,
)
from pipeline.engine.stage_cache import StageResult
from pipeline.stages.finetune import run_finetune
from pipeline.stages.prune import run_prune
from pipeline.stages.quantize import run_quantize
from pipeline.stages.slimipl import run_slimipl
from pipeline.stages.student import run_student
from pipeline.stages.supervised import run_supervised

TRAINING_STAGES: dict[type[TrainingConfig], Callable[..., StageResult]] = {
    SupervisedConfig: run_supervised,
    FinetuneConfig: run_finetune,
    SlimIPLConfig: run_slimipl,
    StudentConfig: run_student,
    QuantizeConfig: run_quantize,
    PruneConfig: run_prune,
}


def run_stage(cfg: TrainingConfig, run_dir: str, **kwargs: Any) -> StageResult:
    """Run the training stage a config belongs to (resume, on_progress, stop_after as the stage takes them).

    Raises:
        TypeError: when no stage is registered for the config's type.
    """
    for cls, run in TRAINING_STAGES.items():
        if type(cfg) is cls:
            return run(cfg, run_dir, **kwargs)
    raise TypeError(f"no training stage takes a {type(cfg).__name__}; register it in TRAINING_STAGES")
