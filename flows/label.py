"""Prefect flow for corpus-wide pseudo-label generation (recipe step 4), a thin layer over pipeline/label.py.

Work units fan out over the flow's task runner (one thread by default: on 2 cores one labeling process
already uses both; `label_flow.with_options(task_runner=...)` gives more). Each unit task is retried once and
is idempotent: a committed unit is skipped, a half-done one is redone.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import DEVICE_TAG, ProgressArtifact, artifact_key
from pipeline.config import LabelConfig
from pipeline.label import LabelPlan, WorkUnit, finish, label_unit, open_with_pandas, plan_labeling, summary_markdown


@task(cache_policy=NO_CACHE, retries=1, tags=[DEVICE_TAG], task_run_name="label-{unit.name}")
def label_unit_task(plan: LabelPlan, unit: WorkUnit) -> dict:
    """Label and commit one work unit (skipped when already committed with the same keys)."""
    return label_unit(plan, unit)


@flow(name="mlpl-label", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def label_flow(cfg: LabelConfig, root: str) -> dict:
    """Label an unlabeled manifest with each language's teacher into a PL table + shards under `root`."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    plan = plan_labeling(cfg, root)
    total = sum(u.audio_s for u in plan.units)
    progress = ProgressArtifact(artifact_key("label", "progress"), f"labeling {cfg.manifest}")
    logger.info("%d work units, %.0f s of audio, %s", len(plan.units), total, plan.precision)
    futures = label_unit_task.map(unmapped(plan), plan.units)
    records, done = [], 0.0
    for fut in as_completed(futures):
        rec = fut.result()
        records.append(rec)
        done += rec["audio_s"] or 0.0
        progress(int(done), int(total), f"{len(records)}/{len(plan.units)} units")
        rate = rec["audio_s"] / rec["wall_s"] if rec["wall_s"] and not rec["skipped"] else None
        logger.info("unit %s %s: %d kept, %d rejected%s", rec["name"], "skipped" if rec["skipped"] else "labeled",
                    rec["rows"], rec["rejects"], f", {rate:.0f} audio-s/s" if rate else "")
    records.sort(key=lambda r: (r["language"], r["unit"]))
    result = finish(plan, records, time.perf_counter() - t0)
    rows = [{"language": lang} | {k: v for k, v in s.items() if k != "rejected_by_reason"}
            | {"rejected_by_reason": ", ".join(f"{k} {n}" for k, n in s["rejected_by_reason"].items())}
            for lang, s in result.summary.items()]
    create_table_artifact(table=rows, key=artifact_key("label", "summary"),
                          description=f"pseudo-labels per language under {root}")
    create_markdown_artifact(
        markdown=f"### Pseudo-labels under `{root}`\n\n{summary_markdown(result.summary)}\n"
                 f"{result.units_labeled} units labeled, {result.units_skipped} already committed.\n\n"
                 + open_with_pandas(root),
        key=artifact_key("label", "corpus"), description="pseudo-label corpus: summary and how to open it")
    return result.as_dict()
