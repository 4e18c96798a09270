"""Prefect flows for the corpus, the supervised multilingual stage and the demo recipe (thin wrappers).

Tasks use NO_CACHE on purpose: resume lives inside the stages (checkpoints, existing clips), so a task
cache could only hand back paths to files that were since deleted or changed. Retries are safe for the
same reason: a retried training task continues from its last checkpoint.
"""

from __future__ import annotations

import time

from flows.env import configure_prefect_env

configure_prefect_env()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipeline.config import SupervisedConfig, supervised_tiny  # noqa: E402
from pipeline.corpus import build_corpus, corpus_preset  # noqa: E402
from pipeline.evaluate import run_evaluate  # noqa: E402
from pipeline.train import run_supervised  # noqa: E402
from storage.files import join  # noqa: E402


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


def _table_rows(metrics: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    return [
        {"language": lang, "utterances": int(v["n"]), "cer": round(v["cer"], 2), "wer": round(v["wer"], 2),
         "lid_acc": round(v["lid_acc"], 2)}
        for lang, v in metrics.items()
    ]


@task(cache_policy=NO_CACHE, retries=1)
def build_corpus_task(preset: str, out_dir: str, seed: int = 0) -> dict:
    """Synthesize the multilingual mini corpus (clips already on disk are kept)."""
    progress = ProgressArtifact("corpus-build", f"building the {preset} corpus")
    cfg = corpus_preset(preset).model_copy(update={"seed": seed})
    return build_corpus(cfg, out_dir, on_progress=progress)


@task(cache_policy=NO_CACHE, retries=1)
def train_supervised_task(cfg: SupervisedConfig, run_dir: str) -> dict:
    """Supervised multilingual CTC + LID training; resumes from the last checkpoint."""
    progress = ProgressArtifact("supervised-training", "supervised multilingual training (updates)")
    result = run_supervised(cfg, run_dir, on_progress=progress)
    if result.dev_metrics:
        create_table_artifact(
            table=_table_rows(result.dev_metrics), key="supervised-dev-metrics",
            description=f"dev CER/WER/LID at update {result.step}",
        )
    summary = result.summary()
    get_run_logger().info("supervised training: %s", summary)
    return summary


@task(cache_policy=NO_CACHE)
def evaluate_task(checkpoint: str, manifest: str, out_dir: str, key: str) -> dict:
    """Score a checkpoint on a manifest and publish the per-language table."""
    progress = ProgressArtifact(f"{key}-progress", f"decoding {manifest}")
    result = run_evaluate(checkpoint, manifest, out_dir, on_progress=progress)
    create_table_artifact(table=_table_rows(result["metrics"]), key=key, description=f"{manifest}")
    create_markdown_artifact(markdown=result["markdown"], key=f"{key}-report", description=out_dir)
    return result


@flow(name="mlpl-supervised", log_prints=True)
def supervised_flow(cfg: SupervisedConfig, run_dir: str, test_manifest: str | None = None) -> dict:
    """Stage 1 as a flow: train on the pooled labeled languages, then score the best model on a test set."""
    summary = train_supervised_task(cfg, run_dir)
    out = {"training": summary}
    if test_manifest:
        out["test"] = evaluate_task(summary["best_checkpoint"], test_manifest, join(run_dir, "eval", "test"),
                                    key="supervised-test-metrics")
    return out


@flow(name="mlpl-demo", log_prints=True)
def demo_flow(
    corpus_dir: str = "data/demo",
    run_dir: str = "runs/demo",
    corpus: str = "demo",
    seed: int = 0,
    max_updates: int | None = None,
) -> dict:
    """The main job on the embedded default: build the corpus, train the multilingual model, score test."""
    card = build_corpus_task(corpus, corpus_dir, seed)
    manifests = join(corpus_dir, "manifests")
    overrides = {"max_updates": max_updates} if max_updates else {}
    cfg = supervised_tiny(join(manifests, "labeled.jsonl"), join(manifests, "dev.jsonl"), seed=seed, **overrides)
    out = supervised_flow(cfg, run_dir, test_manifest=join(manifests, "test.jsonl"))
    return out | {"corpus": card}
