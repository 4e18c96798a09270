"""The run report as a Prefect task: Markdown table and PNG plot written under `<run>/report/` and published as
artifacts (keys stable per run layout, so the Artifacts page shows their history)."""

from __future__ import annotations

import base64

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.report.report import write_report


@task(cache_policy=NO_CACHE, task_run_name="report")
def report_task(run_dir: str) -> dict:
    """Write the report files and publish the table and the dev-CER plot (embedded PNG) as artifacts."""
    report = write_report(run_dir)
    create_markdown_artifact(markdown=report["markdown"], key="recipe-report",
                             description=f"test CER per stage and language, {run_dir}")
    png = base64.b64encode(report["plot_png"]).decode()
    create_markdown_artifact(markdown=f"![validation CER per stage](data:image/png;base64,{png})",
                             key="recipe-dev-cer-plot", description="validation CER against updates per stage")
    return {k: report[k] for k in ("markdown", "plot", "rows", "languages", "with_unlabeled", "test_sets")}
