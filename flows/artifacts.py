"""Prefect artifacts fed by the pipeline: progress bars and per-language tables (keys: lowercase, dashes)."""

from __future__ import annotations

import posixpath
import re
import time
from collections.abc import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from parts: lower case, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


class ProgressArtifact:
    """A Prefect progress artifact fed by a pipeline `on_progress(done, total, desc)` callback, throttled."""

    def __init__(self, key: str, description: str, min_interval_s: float = 2.0):
        self.id = create_progress_artifact(progress=0.0, key=key, description=description)
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def __call__(self, done: int, total: int, desc: str) -> None:
        now = time.monotonic()
        if done >= total or now - self._last >= self.min_interval_s:
            update_progress_artifact(self.id, progress=100.0 * done / max(total, 1), description=desc)
            self._last = now


def metrics_rows(metrics: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    """Table-artifact rows of a per-language `score()` result."""
    return [
        {"language": lang, "utterances": int(v["n"]), "cer": round(v["cer"], 2), "wer": round(v["wer"], 2),
         "lid_acc": round(v["lid_acc"], 2)}
        for lang, v in metrics.items()
    ]


DEVICE_TAG = "mlpl-device"  # `mlpl serve` limits tasks with this tag to one at a time: one device, one stage


def _param(params: dict, name: str):
    """A run parameter, or the field of that name of its `cfg` parameter (a model or, from the API, a dict)."""
    if params.get(name) is not None:
        return params[name]
    cfg = params.get("cfg")
    return cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)


def stage_run_name(stage: str = "", *keys: str) -> Callable[[], str]:
    """A task/flow run name `recipe-<run>-<stage>[-<key value>...]` from the run's parameters: the run is the
    basename of `run_dir` (or `root`, or the `cfg` parameter's run_dir); the stage is `stage`, else the `cfg`
    parameter's stage name (a training config: "finetune/sl"), else the `stage` parameter; then the values of the
    `keys` parameters that are set (e.g. `language`)."""

    def name() -> str:
        from prefect.runtime import flow_run, task_run

        params = task_run.parameters or flow_run.parameters or {}
        run = posixpath.basename(str(_param(params, "run_dir") or _param(params, "root") or "run").rstrip("/"))
        cfg = params.get("cfg")
        part = stage or (cfg.stage_name() if hasattr(cfg, "stage_name") else params.get("stage"))
        values = [_param(params, k) for k in keys]
        return artifact_key("recipe", run, *(str(v) for v in [part, *values] if v))

    return name
