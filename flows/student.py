"""Prefect flow for the student (recipe step 5), a thin wrapper over pipeline/student.py.

The task is NO_CACHE and retried once: the stage resumes from its own last checkpoint, so a retry continues.
"""

from __future__ import annotations

import posixpath

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from flows.artifacts import DEVICE_TAG, ProgressArtifact, artifact_key, metrics_rows
from flows.supervised import evaluate_task
from pipeline.config import StudentConfig
from pipeline.student import run_student
from storage.files import join


def _run_name() -> str:
    params = task_run.parameters or flow_run.parameters
    cfg = params["cfg"]
    name = cfg.stage_name() if isinstance(cfg, StudentConfig) else StudentConfig(**cfg).stage_name()
    run = posixpath.basename(str(params.get("run_dir", "run")).rstrip("/"))
    return artifact_key("recipe", run, "student", name)


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, tags=[DEVICE_TAG], task_run_name=_run_name)
def student_task(cfg: StudentConfig, run_dir: str) -> dict:
    """Train one student on labeled + PL data (or labeled only); resumes from its last checkpoint."""
    name = cfg.stage_name()
    progress = ProgressArtifact(artifact_key("student", name, "training"), f"student {name}")
    result = run_student(cfg, run_dir, on_progress=progress)
    if result.dev_metrics:
        create_table_artifact(table=metrics_rows(result.dev_metrics), key=artifact_key("student", name, "dev"),
                              description=f"student {name} dev, update {result.step}")
    get_run_logger().info("student/%s: %s", name, result.summary())
    return result.summary()


@flow(name="mlpl-student", log_prints=True, flow_run_name=_run_name)
def student_flow(cfg: StudentConfig, run_dir: str, test_manifest: str | None = None) -> dict:
    """Stage 5 as a flow: train the student, then score it on every language's test rows."""
    name = cfg.stage_name()
    out = {"training": student_task(cfg, run_dir)}
    if test_manifest:
        out["test"] = evaluate_task(out["training"]["best_checkpoint"], test_manifest,
                                    join(run_dir, "eval", "student", name),
                                    key=artifact_key("student", name, "test-metrics"))
    return out
