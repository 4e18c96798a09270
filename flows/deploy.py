"""Deployments for operators (`mlpl serve`): every flow served against the configured Prefect API with a typed
parameter form (docs/architecture.md, "Operating").

The recipe (`mlpl-recipe`) and one-step (`mlpl-stage`) deployments take the same `RecipeConfig` (descriptions on
every field, presets and student modes as dropdowns, budgets, PL cache size and PL filters typed and bounded), so
a form filled for the recipe also drives one of its steps; the server checks a run's parameters against that
schema before the run exists. Training, evaluation and labeling tasks carry the `mlpl-device` tag, limited to one
running task at a time. The relabel deployment runs on a Cron schedule (nightly by default) with a deployment
concurrency limit of 1.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, serve
from prefect.client.orchestration import get_client

from flows.artifacts import DEVICE_TAG, stage_run_name
from flows.recipe import PER_LANGUAGE_STEPS, RECIPE_STEPS, StepName, recipe_flow
from flows.relabel import relabel_flow
from flows.report import report_task
from pipeline.config import RecipeConfig, RelabelConfig
from pipeline.config.recipe import StudentMode

log = logging.getLogger("mlpl.serve")

DEPLOYMENT = "mlpl"  # every flow's deployment is "<flow name>/mlpl"
NIGHTLY = "0 2 * * *"


def _step_run_name() -> str:
    """`recipe-<run>-<stage>[-<language> | -<student mode>]`, as the recipe's own runs of that step are named."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    key = {"student": "student_mode", **dict.fromkeys(PER_LANGUAGE_STEPS, "language")}.get(params.get("stage"))
    return stage_run_name(str(params.get("stage")), *([key] if key else []))()


@flow(name="mlpl-stage", log_prints=True, flow_run_name=_step_run_name)
def stage_flow(cfg: RecipeConfig, stage: StepName, language: str | None = None,
               student_mode: StudentMode = "from_scratch", labeled_finetune: bool = False) -> dict:
    """One step of a recipe config alone: its inputs (the earlier stages' checkpoints) must be in the run already.

    Args:
        cfg: the recipe config (data, preset, budgets, overrides); this deployment runs one of its steps.
        stage: which step: supervised, finetune and slimipl (per language), label, student, or serving (the final
            student pruned and quantized as `serving_prune` and `serving_bits` say).
        language: the language of a per-language step (a language of the labeled manifest).
        student_mode: the student to train with stage=student: from_scratch or finetune.
        labeled_finetune: with stage=student, fine-tune the student on labeled data only afterwards.
    """
    if stage in PER_LANGUAGE_STEPS and not language:
        raise ValueError(f"stage={stage!r} runs on one language: give language, e.g. 'sl'")
    return RECIPE_STEPS[stage](cfg, language, student_mode, labeled_finetune)


@flow(name="mlpl-report", log_prints=True, flow_run_name=stage_run_name("report"))
def report_flow(run_dir: str) -> dict:
    """The run's report: the table in the layout of the paper's Tables 2-3 and the dev-CER plot, as artifacts.

    Args:
        run_dir: the recipe run directory (any fsspec URL).
    """
    return report_task(run_dir)


# Every deployment `mlpl serve` offers; a new step of the recipe joins `mlpl-stage` through RECIPE_STEPS.
FLOWS = {"recipe": recipe_flow, "stage": stage_flow, "report": report_flow, "relabel": relabel_flow}


def build_deployments(*, relabel: dict[str, Any] | None = None, relabel_cron: str = NIGHTLY,
                      recipe: dict[str, Any] | None = None) -> list:
    """One deployment per flow; `recipe` (RecipeConfig fields) and `relabel` (RelabelConfig fields) prefill
    those forms, and the relabel schedule is active only when `relabel` says what to watch."""
    deployments = []
    for key, fl in FLOWS.items():
        kwargs: dict[str, Any] = {"name": DEPLOYMENT, "tags": ["mlpl", key], "description": fl.__doc__}
        if key == "relabel":
            kwargs["concurrency_limit"] = 1
            if relabel:
                kwargs["parameters"] = {"cfg": RelabelConfig(**relabel).model_dump(mode="json")}
                kwargs["cron"] = relabel_cron
        elif recipe and key in ("recipe", "stage"):
            kwargs["parameters"] = {"cfg": RecipeConfig(**recipe).model_dump(mode="json")}
        deployments.append(fl.to_deployment(**kwargs))
    return deployments


def ensure_device_limit(slots: int = 1) -> None:
    """Create (or set) the tag concurrency limit that keeps training stages off the device at the same time."""
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=DEVICE_TAG, concurrency_limit=slots)


def serve_all(*, relabel: dict[str, Any] | None = None, relabel_cron: str = NIGHTLY,
              recipe: dict[str, Any] | None = None, device_slots: int = 1, limit: int | None = None) -> None:
    """Serve every deployment until interrupted (runs execute as subprocesses of this process)."""
    ensure_device_limit(device_slots)
    serve(*build_deployments(relabel=relabel, relabel_cron=relabel_cron, recipe=recipe), limit=limit)
