"""Prefect flow for the relabel job (`mlpl-relabel`), a thin layer over pipeline/stages/relabel.py.

Served with a Cron schedule (nightly by default, `mlpl serve --relabel-cron`) and a deployment concurrency
limit of 1; the lock file in the labels root also keeps runs from outside Prefect from overlapping.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.artifacts import ProgressArtifact, artifact_key
from pipeline.config import RelabelConfig
from pipeline.stages.relabel import relabel_markdown, run_relabel


@flow(name="mlpl-relabel", log_prints=True, flow_run_name="relabel-{cfg.watch}")
def relabel_flow(cfg: RelabelConfig) -> dict:
    """Label the new, changed or older-teacher audio of the watched folder into the labels root.

    Args:
        cfg: what to watch, where to commit, the teachers, and how languages are named.
    """
    progress = ProgressArtifact(artifact_key("relabel", "progress"), f"relabeling {cfg.watch}")
    result = run_relabel(cfg, on_progress=progress)
    create_markdown_artifact(markdown=relabel_markdown(result), key=artifact_key("relabel", "summary"),
                             description=f"what the relabel run did in {cfg.labels_root}")
    label = result["label"] or {}
    rows = [{"language": lang, "hours_labeled": s["hours_labeled"], "rows_kept": s["rows_kept"],
             "rows_rejected": s["rows_rejected"],
             "rejected_by_reason": ", ".join(f"{k} {n}" for k, n in s["rejected_by_reason"].items())}
            for lang, s in (label.get("summary") or {}).items()]
    if rows:
        create_table_artifact(table=rows, key=artifact_key("relabel", "languages"),
                              description="this relabel run per language")
    get_run_logger().info("relabel: %d seen, %d new, %d relabeled, %d unchanged", result["files_seen"],
                          result["new"], result["relabeled"], result["unchanged"])
    return result
