"""Prefect flows for per-language fine-tuning and slimIPL (recipe steps 2-3), thin wrappers over pipeline/.

`language_flow` is the per-language sub-pipeline finetune → slimIPL → test scoring; the recipe fans it out
over the languages that have unlabeled audio. Tasks are NO_CACHE and retried: each stage resumes from its
own last checkpoint, so a retry continues rather than restarts.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.artifacts import DEVICE_TAG, ProgressArtifact, artifact_key, metrics_rows, stage_run_name
from flows.supervised import evaluate_task
from pipeline.config import FinetuneConfig, SlimIPLConfig
from pipeline.finetune import run_finetune
from pipeline.report import pl_quality_markdown
from pipeline.slimipl import run_slimipl
from storage.files import join


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, tags=[DEVICE_TAG],
      task_run_name=stage_run_name("finetune", "language"))
def finetune_task(cfg: FinetuneConfig, run_dir: str) -> dict:
    """Fine-tune the multilingual model on one language; resumes from its last checkpoint."""
    key = artifact_key("finetune", cfg.language, "training")
    result = run_finetune(cfg, run_dir, on_progress=ProgressArtifact(key, f"fine-tuning on {cfg.language}"))
    if result.dev_metrics:
        create_table_artifact(table=metrics_rows(result.dev_metrics), key=artifact_key("finetune", cfg.language, "dev"),
                              description=f"{cfg.language} dev after fine-tuning, update {result.step}")
    get_run_logger().info("finetune/%s: %s", cfg.language, result.summary())
    return result.summary()


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, tags=[DEVICE_TAG],
      task_run_name=stage_run_name("slimipl", "language"))
def slimipl_task(cfg: SlimIPLConfig, run_dir: str) -> dict:
    """slimIPL on one language; resumes from its last checkpoint (cache, RNGs and samplers included)."""
    key = artifact_key("slimipl", cfg.language, "training")
    result = run_slimipl(cfg, run_dir, on_progress=ProgressArtifact(key, f"slimIPL on {cfg.language}"))
    if result.dev_metrics:
        create_table_artifact(table=metrics_rows(result.dev_metrics), key=artifact_key("slimipl", cfg.language, "dev"),
                              description=f"{cfg.language} dev after slimIPL, update {result.step}")
    create_markdown_artifact(markdown=pl_quality_markdown(result.summary()),
                             key=artifact_key("slimipl", cfg.language, "pl-quality"),
                             description=f"{cfg.language} pseudo-label quality, start and end of slimIPL")
    get_run_logger().info("slimipl/%s: %s", cfg.language, result.summary())
    return result.summary()


@flow(name="mlpl-finetune", log_prints=True, flow_run_name="finetune-{cfg.language}")
def finetune_flow(cfg: FinetuneConfig, run_dir: str, test_manifest: str | None = None) -> dict:
    """Stage 2 as a flow: fine-tune one language, then score it on that language's test rows."""
    out = {"training": finetune_task(cfg, run_dir)}
    if test_manifest:
        out["test"] = evaluate_task(out["training"]["best_checkpoint"], test_manifest,
                                    join(run_dir, "eval", "finetune", cfg.language),
                                    key=artifact_key("finetune", cfg.language, "test-metrics"), language=cfg.language)
    return out


@flow(name="mlpl-slimipl", log_prints=True, flow_run_name="slimipl-{cfg.language}")
def slimipl_flow(cfg: SlimIPLConfig, run_dir: str, test_manifest: str | None = None) -> dict:
    """Stage 3 as a flow: slimIPL on one language, then score it on that language's test rows."""
    out = {"training": slimipl_task(cfg, run_dir)}
    if test_manifest:
        out["test"] = evaluate_task(out["training"]["best_checkpoint"], test_manifest,
                                    join(run_dir, "eval", "slimipl", cfg.language),
                                    key=artifact_key("slimipl", cfg.language, "test-metrics"), language=cfg.language)
    return out


@flow(name="mlpl-language", log_prints=True, flow_run_name="selftrain-{finetune.language}")
def language_flow(finetune: FinetuneConfig, slimipl: SlimIPLConfig, run_dir: str,
                  test_manifest: str | None = None) -> dict:
    """The per-language sub-pipeline: fine-tune the multilingual model, then slimIPL from the fine-tuned one."""
    return {"finetune": finetune_flow(finetune, run_dir, test_manifest),
            "slimipl": slimipl_flow(slimipl, run_dir, test_manifest)}
