"""The one generic training flow (docs/architecture.md, "How to add a stage"): any training stage of the recipe,
then its best model scored on the test set. A thin layer over `pipeline.stages.registry.run_stage`: config in,
progress and per-language tables out as artifacts.

Tasks use NO_CACHE on purpose: resume and reuse live inside the stages (checkpoints, result.json keyed on config
and inputs), so a task cache could only hand back paths to files that were since deleted or changed. Retries are
safe for the same reason: a retried training task continues from its last checkpoint.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.artifacts import DEVICE_TAG, ProgressArtifact, artifact_key, metrics_rows, stage_run_name
from pipeline.config import TrainingConfig
from pipeline.engine.evaluate import has_rows, run_evaluate
from pipeline.layout import RunLayout
from pipeline.report.report import pl_quality_markdown
from pipeline.stages.registry import run_stage


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, tags=[DEVICE_TAG], task_run_name=stage_run_name())
def train_task(cfg: TrainingConfig, run_dir: str, name: str | None = None) -> dict:
    """Train one stage (resuming from its last checkpoint, or reusing it when finished with the same inputs); its
    artifacts are called `name` (default: the stage's name)."""
    name = name or cfg.stage_name()
    result = run_stage(cfg, run_dir, on_progress=ProgressArtifact(artifact_key(name, "training"),
                                                                  f"training {name} (updates)"))
    if result.dev_metrics:
        create_table_artifact(table=metrics_rows(result.dev_metrics), key=artifact_key(name, "dev-metrics"),
                              description=f"{name} dev CER/WER/LID at update {result.step}")
    if result.extra.get("pl_eval"):
        create_markdown_artifact(markdown=pl_quality_markdown(result.summary()), key=artifact_key(name, "pl-quality"),
                                 description=f"{name}: pseudo-label quality at the start and the end")
    get_run_logger().info("%s: %s", name, result.summary())
    return result.summary()


@task(cache_policy=NO_CACHE, retries=1, tags=[DEVICE_TAG], task_run_name="evaluate-{key}")
def evaluate_task(checkpoint: str, manifest: str, out_dir: str, key: str, language: str | None = None) -> dict:
    """Score a checkpoint on a manifest (optionally one language's rows) and publish the per-language table."""
    progress = ProgressArtifact(artifact_key(key, "progress"), f"decoding {manifest}")
    result = run_evaluate(checkpoint, manifest, out_dir, language=language, on_progress=progress)
    create_table_artifact(table=metrics_rows(result["metrics"]), key=key, description=f"{manifest} — {checkpoint}")
    create_markdown_artifact(markdown=result["markdown"], key=artifact_key(key, "report"), description=out_dir)
    return result


@flow(name="mlpl-train", log_prints=True, flow_run_name=stage_run_name())
def train_flow(cfg: TrainingConfig, run_dir: str, test_manifest: str | None = None,
               extra_tests: dict[str, str] | None = None, name: str | None = None) -> dict:
    """One training stage, then its best model scored on the test set (a per-language stage on its language's rows)
    and on each extra test set.

    Args:
        cfg: the stage's config (supervised, fine-tune, slimIPL or student).
        run_dir: the run directory (any fsspec URL).
        test_manifest: rows to score the best model on; None skips scoring.
        extra_tests: more test sets by name (e.g. the out-of-domain ood_short, ood_long); empty ones are skipped.
        name: what the scores' artifacts are called (default: the stage's name; the same-compute control, a
            supervised stage in a run directory of its own, says it is a control).
    """
    out = {"training": train_task(cfg, run_dir, name)}
    layout, best = RunLayout(run_dir), out["training"]["best_checkpoint"]
    stage, name = cfg.stage_name(), name or cfg.stage_name()
    if test_manifest:
        out["test"] = evaluate_task(best, test_manifest, layout.eval(stage), key=artifact_key(name, "test-metrics"),
                                    language=cfg.scored_language())
    for test_set, manifest in (extra_tests or {}).items():
        if has_rows(manifest):
            out[test_set] = evaluate_task(best, manifest, layout.eval(stage, test_set),
                                          key=artifact_key(name, f"{test_set}-metrics"),
                                          language=cfg.scored_language())
    return out
