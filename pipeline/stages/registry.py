"""The training stages (docs/architecture.md, "How to add a stage"): each stage module declares one `STAGE =
StageSpec(...)` beside its `run_<stage>`, and this registry finds them. The generic Prefect flow
(`flows.train.train_flow`), the CLI (a command per stage), the recipe's serving step and the run report's rows
all read this table, so a new stage touches its config, its module, the recipe form's knob and its test — nothing
else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from pipeline.config import TrainingConfig
from pipeline.engine.stage_cache import StageResult


@dataclass(frozen=True)
class StageSpec:
    """A training stage as the rest of the project sees it.

    Attributes:
        config: its config class (a `TrainingConfig` with `stage_name()`; a later stage brings its presets).
        run: `run_<stage>(cfg, run_dir, *, resume, on_progress, stop_after) -> StageResult`.
        command: its CLI command (`mlpl <command>`); the recipe's first four stages keep hand-written flags, every
            other stage's flags are its config's own fields.
        help: one line for `mlpl --help`.
        summary: what the CLI prints after the dev table, from the config and the result; None: nothing.
        report_title: the title of its rows in the run report (a model made from the final student, found in
            `<run>/<config kind>/*`); None: the report's own rows cover it.
    """

    config: type[TrainingConfig]
    run: Callable[..., StageResult]
    command: str
    help: str
    summary: Callable[[Any, StageResult], str] | None = None
    report_title: str | None = None

    @property
    def kind(self) -> str:
        """Its preset kind and the folder its runs write under the run directory's root (`prune`, `quantize`)."""
        return self.config.preset_kind()


@cache
def stage_specs() -> tuple[StageSpec, ...]:
    """Every stage a module of `pipeline.stages` declares (`STAGE`), in module-name order.

    Raises:
        ValueError: when two stages share a config class or a command.
    """
    import pipeline.stages

    specs = []
    for info in sorted(pkgutil.iter_modules(pipeline.stages.__path__), key=lambda i: i.name):
        if info.name != "registry":
            spec = getattr(importlib.import_module(f"pipeline.stages.{info.name}"), "STAGE", None)
            specs += [spec] if isinstance(spec, StageSpec) else []
    for what in ("config", "command"):
        values = [getattr(s, what) for s in specs]
        if len(set(values)) != len(values):
            raise ValueError(f"two stages declare the same {what}: {values}")
    return tuple(specs)


def run_stage(cfg: TrainingConfig, run_dir: str, **kwargs: Any) -> StageResult:
    """Run the training stage a config belongs to (resume, on_progress, stop_after as the stage takes them).

    Raises:
        TypeError: when no stage module declares the config's type.
    """
    for spec in stage_specs():
        if type(cfg) is spec.config:
            return spec.run(cfg, run_dir, **kwargs)
    raise TypeError(f"no training stage takes a {type(cfg).__name__}: declare STAGE = StageSpec(...) in its module "
                    "under pipeline/stages/")
