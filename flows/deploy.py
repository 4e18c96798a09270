"""Deployments for operators (`mlpl serve`): every flow served against the configured Prefect API with a typed
parameter form (docs/architecture.md, "Operating").

The recipe and the per-stage deployments take the same `RecipeConfig` (descriptions on every field, presets
and student modes as dropdowns, budgets and the PL cache size bounded), so a form filled for the recipe also
drives one stage; the server checks a run's parameters against that schema before the run exists. Training,
evaluation and labeling tasks carry the `mlpl-device` tag, limited to one running task at a time. The relabel
deployment runs on a Cron schedule (nightly by default) with a deployment concurrency limit of 1.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from prefect import flow, serve
from prefect.client.orchestration import get_client

from flows.artifacts import DEVICE_TAG, stage_run_name
from flows.label import label_flow
from flows.recipe import recipe_flow
from flows.relabel import relabel_flow
from flows.report import report_task
from flows.selftrain import finetune_flow, slimipl_flow
from flows.student import student_flow
from flows.supervised import supervised_flow
from pipeline.config import RecipeConfig, RelabelConfig
from pipeline.label import default_teachers
from pipeline.modeling import load_trained
from storage.files import join

log = logging.getLogger("mlpl.serve")

DEPLOYMENT = "mlpl"  # every flow's deployment is "<flow name>/mlpl"
NIGHTLY = "0 2 * * *"


@flow(name="mlpl-supervised-stage", log_prints=True, flow_run_name=stage_run_name("supervised"))
def supervised_stage(cfg: RecipeConfig) -> dict:
    """Stage 1 of a recipe config: supervised multilingual training, then test scoring.

    Args:
        cfg: the recipe config (data, preset, overrides); this deployment runs its supervised stage.
    """
    return supervised_flow(cfg.supervised_config(), cfg.run_dir, cfg.test_manifest)


@flow(name="mlpl-finetune-stage", log_prints=True, flow_run_name=stage_run_name("finetune", "language"))
def finetune_stage(cfg: RecipeConfig, language: str) -> dict:
    """Stage 2 of a recipe config for one language (needs the run's supervised checkpoint).

    Args:
        cfg: the recipe config (data, preset, overrides); this deployment runs one fine-tune of it.
        language: the language to fine-tune on (a language of the labeled manifest).
    """
    return finetune_flow(cfg.finetune_config(language), cfg.run_dir, cfg.test_manifest)


@flow(name="mlpl-slimipl-stage", log_prints=True, flow_run_name=stage_run_name("slimipl", "language"))
def slimipl_stage(cfg: RecipeConfig, language: str) -> dict:
    """Stage 3 of a recipe config for one language (needs the language's fine-tuned checkpoint).

    Args:
        cfg: the recipe config (data, preset, overrides); this deployment runs one slimIPL of it.
        language: the language to self-train (it needs rows in the unlabeled manifest).
    """
    return slimipl_flow(cfg.slimipl_config(language), cfg.run_dir, cfg.test_manifest)


@flow(name="mlpl-label-stage", log_prints=True, flow_run_name=stage_run_name("label"))
def label_stage(cfg: RecipeConfig) -> dict:
    """Step 4 of a recipe config: label the unlabeled manifest with each language's best model of the run.

    Args:
        cfg: the recipe config; its unlabeled manifest is labeled into <run_dir>/labels.
    """
    languages = load_trained(join(cfg.run_dir, "supervised", "checkpoints", "best.pt")).languages
    return label_flow(cfg.label_config(default_teachers(cfg.run_dir, languages)), join(cfg.run_dir, "labels"))


@flow(name="mlpl-student-stage", log_prints=True, flow_run_name=stage_run_name("student", "mode"))
def student_stage(cfg: RecipeConfig, mode: Literal["from_scratch", "finetune"] = "from_scratch",
                  labeled_finetune: bool = False) -> dict:
    """Stage 5 of a recipe config: one student (and, with `labeled_finetune`, its labeled-only fine-tune).

    Args:
        cfg: the recipe config (data, preset, student overrides).
        mode: from_scratch (a new model) or finetune (from the supervised checkpoint).
        labeled_finetune: afterwards fine-tune the student on labeled data only.
    """
    out = {"student": student_flow(cfg.student_config(mode), cfg.run_dir, cfg.test_manifest)}
    if labeled_finetune:
        ft = cfg.labeled_finetune_config(mode, out["student"]["training"]["best_checkpoint"])
        out["labeled_finetune"] = student_flow(ft, cfg.run_dir, cfg.test_manifest)
    return out


@flow(name="mlpl-report", log_prints=True, flow_run_name=stage_run_name("report"))
def report_flow(run_dir: str) -> dict:
    """The run's report: the table in the layout of the paper's Tables 2-3 and the dev-CER plot, as artifacts.

    Args:
        run_dir: the recipe run directory (any fsspec URL).
    """
    return report_task(run_dir)


FLOWS = {
    "recipe": recipe_flow, "supervised": supervised_stage, "finetune": finetune_stage, "slimipl": slimipl_stage,
    "label": label_stage, "student": student_stage, "report": report_flow, "relabel": relabel_flow,
}


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
        elif recipe and key in ("recipe", "supervised", "label", "student"):
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
