"""Prefect flows for the corpus and the supervised multilingual stage (thin wrappers over pipeline/).

Tasks use NO_CACHE on purpose: resume lives inside the stages (checkpoints, existing clips), so a task
cache could only hand back paths to files that were since deleted or changed. Retries are safe for the
same reason: a retried training task continues from its last checkpoint.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.artifacts import DEVICE_TAG, ProgressArtifact, artifact_key, metrics_rows, stage_run_name
from pipeline.config import SupervisedConfig
from pipeline.corpus import build_corpus, corpus_preset
from pipeline.evaluate import run_evaluate
from pipeline.supervised import run_supervised
from storage.files import join


@task(cache_policy=NO_CACHE, retries=1)
def build_corpus_task(preset: str, out_dir: str, seed: int = 0, text_dir: str | None = None) -> dict:
    """Synthesize the multilingual mini corpus (clips already on disk are kept)."""
    progress = ProgressArtifact("corpus-build", f"building the {preset} corpus")
    cfg = corpus_preset(preset).model_copy(update={"seed": seed})
    return build_corpus(cfg, out_dir, text_dir=text_dir, on_progress=progress)


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, tags=[DEVICE_TAG],
      task_run_name=stage_run_name("supervised"))
def train_supervised_task(cfg: SupervisedConfig, run_dir: str) -> dict:
    """Supervised multilingual CTC + LID training; resumes from the last checkpoint."""
    progress = ProgressArtifact("supervised-training", "supervised multilingual training (updates)")
    result = run_supervised(cfg, run_dir, on_progress=progress)
    if result.dev_metrics:
        create_table_artifact(
            table=metrics_rows(result.dev_metrics), key="supervised-dev-metrics",
            description=f"dev CER/WER/LID at update {result.step}",
        )
    summary = result.summary()
    get_run_logger().info("supervised training: %s", summary)
    return summary


@task(cache_policy=NO_CACHE, retries=1, tags=[DEVICE_TAG], task_run_name="evaluate-{key}")
def evaluate_task(checkpoint: str, manifest: str, out_dir: str, key: str, language: str | None = None) -> dict:
    """Score a checkpoint on a manifest (optionally one language's rows) and publish the per-language table."""
    progress = ProgressArtifact(artifact_key(key, "progress"), f"decoding {manifest}")
    result = run_evaluate(checkpoint, manifest, out_dir, language=language, on_progress=progress)
    create_table_artifact(table=metrics_rows(result["metrics"]), key=key, description=f"{manifest} — {checkpoint}")
    create_markdown_artifact(markdown=result["markdown"], key=artifact_key(key, "report"), description=out_dir)
    return result


@flow(name="mlpl-supervised", log_prints=True)
def supervised_flow(cfg: SupervisedConfig, run_dir: str, test_manifest: str | None = None) -> dict:
    """Stage 1 as a flow: train on the pooled labeled languages, then score the best model on a test set."""
    summary = train_supervised_task(cfg, run_dir)
    out = {"training": summary}
    if test_manifest:
        out["test"] = evaluate_task(summary["best_checkpoint"], test_manifest, join(run_dir, "eval", "supervised"),
                                    key="supervised-test-metrics")
    return out
