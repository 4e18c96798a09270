"""Prefect flow for corpus-wide pseudo-label generation (recipe step 4), a thin layer over pipeline/stages/label.py.

Work units fan out over the flow's task runner, which is just a parameter: one thread by default (on 2 cores one
labeling process already uses both), or a Dask cluster through prefect-dask (`run_label_flow(...,
dask_workers=N)` starts a local one, `dask_address="tcp://host:8786"` uses a running one). Any other Prefect
task runner, e.g. prefect-ray's `RayTaskRunner`, plugs in the same way: `label_flow.with_options(task_runner=...)`.

Each unit task is retried once and is idempotent: a committed unit is skipped, a half-done one is redone
under the same file names, so a worker killed mid-unit (Dask reruns its task elsewhere) leaves no duplicate.
A worker process loads each teacher once (`pipeline.stages.label_decode.teacher_model` caches per process) and labels
many units; the tasks carry the plan without its unit list, so what travels per task stays small.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.artifacts import DEVICE_TAG, ProgressArtifact, artifact_key
from pipeline.config import LabelConfig
from pipeline.stages.label import finish, label_unit, plan_labeling
from pipeline.stages.label_decode import LabelPlan, WorkUnit
from pipeline.stages.label_summary import audit_columns, open_with_pandas, summary_markdown


@task(cache_policy=NO_CACHE, retries=1, tags=[DEVICE_TAG], task_run_name="label-{unit.name}")
def label_unit_task(plan: LabelPlan, unit: WorkUnit) -> dict:
    """Label and commit one work unit (skipped when already committed with the same keys)."""
    return label_unit(plan, unit)


# On a cluster the workers are the devices (one unit at a time each), so the unit tasks must not queue on the
# one-device tag limit that `mlpl serve` sets for this machine.
@task(cache_policy=NO_CACHE, retries=1, task_run_name="label-{unit.name}")
def label_unit_cluster_task(plan: LabelPlan, unit: WorkUnit) -> dict:
    """Label and commit one work unit on a cluster worker (no device tag)."""
    return label_unit(plan, unit)


def task_plan(plan: LabelPlan) -> LabelPlan:
    """The plan as each unit task gets it: without the unit list (a task needs only its own unit), so the
    pickled size does not grow with the corpus."""
    return replace(plan, units=[])


@flow(name="mlpl-label", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def label_flow(cfg: LabelConfig, root: str) -> dict:
    """Label an unlabeled manifest with each language's teacher into a PL table + shards under `root`."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    plan = plan_labeling(cfg, root)
    total = sum(u.audio_s for u in plan.units)
    progress = ProgressArtifact(artifact_key("label", "progress"), f"labeling {cfg.manifest}")
    ctx = FlowRunContext.get()
    local = ctx is None or isinstance(ctx.task_runner, ThreadPoolTaskRunner)
    logger.info("%d work units, %.0f s of audio, %s %s, on %s", len(plan.units), total, cfg.engine, plan.precision,
                "this machine" if local else type(ctx.task_runner).__name__)
    unit_task = label_unit_task if local else label_unit_cluster_task
    futures = unit_task.map(unmapped(task_plan(plan)), plan.units)
    records, done = [], 0.0
    for fut in as_completed(futures):
        rec = fut.result()
        records.append(rec)
        done += rec["audio_s"] or 0.0
        progress(int(done), int(total), f"{len(records)}/{len(plan.units)} units")
        rate = rec["audio_s"] / rec["wall_s"] if rec["wall_s"] and not rec["skipped"] else None
        logger.info("unit %s %s on %s: %d kept, %d rejected%s", rec["name"], "skipped" if rec["skipped"] else
                    "labeled", rec["worker"], rec["rows"], rec["rejects"], f", {rate:.0f} audio-s/s" if rate else "")
    records.sort(key=lambda r: (r["language"], r["unit"]))
    result = finish(plan, records, time.perf_counter() - t0)
    # One flat row per language; the dev audit (expected PL quality) as columns, its buckets in `label-corpus`.
    rows = [{"language": lang} | {k: v for k, v in s.items() if k not in ("rejected_by_reason", "dev_audit")}
            | {"rejected_by_reason": ", ".join(f"{k} {n}" for k, n in s["rejected_by_reason"].items())}
            | audit_columns(s) for lang, s in result.summary.items()]
    create_table_artifact(table=rows, key=artifact_key("label", "summary"),
                          description=f"pseudo-labels per language under {root}"
                                      + (" and their expected quality from the dev audit" if plan.audit else ""))
    create_markdown_artifact(
        markdown=f"### Pseudo-labels under `{root}`\n\n{summary_markdown(result.summary)}\n"
                 f"{result.units_labeled} units labeled, {result.units_skipped} already committed.\n\n"
                 + open_with_pandas(root),
        key=artifact_key("label", "corpus"), description="pseudo-label corpus: summary and how to open it")
    # Per worker process ("host:pid"): units labeled and torch threads, i.e. how the work spread.
    workers: dict[str, dict[str, int]] = {}
    for r in records:
        if not r["skipped"]:
            w = workers.setdefault(r["worker"], {"units": 0, "threads": r["threads"]})
            w["units"] += 1
    return result.as_dict() | {"workers": dict(sorted(workers.items()))}


def label_task_runner(dask_address: str | None = None, dask_workers: int | None = None) -> TaskRunner:
    """The labeling task runner: a running Dask cluster, a local one of `dask_workers` processes, or one thread."""
    if dask_address and dask_workers:
        raise ValueError("give either dask_address (a running cluster) or dask_workers (a local one), not both")
    if dask_workers is not None and dask_workers < 1:
        raise ValueError(f"dask_workers must be at least 1, got {dask_workers}")
    if not dask_address and not dask_workers:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner  # imported only when asked for: distributed is a heavy import

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    # One unit at a time per process (torch threads within it); processes, since the GIL serializes decoding
    # glue and the per-process teacher cache is what makes a worker cheap after its first unit.
    return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "processes": True, "threads_per_worker": 1})


def _cpu_count() -> int:
    # The cores this process may use (a container or taskset may allow fewer than the machine has).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _api_for_workers(dask_address: str | None) -> Iterator[None]:
    """Make worker processes report task runs to this flow's Prefect API.

    Without PREFECT_API_URL each process would start its own temporary server, so the workers' task runs would
    land elsewhere than their flow run; the flow process's temporary server is shared instead (on 127.0.0.1,
    which only workers on this machine reach: a cluster elsewhere needs a real server).
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    if dask_address:
        host = urlsplit(dask_address if "://" in dask_address else f"tcp://{dask_address}").hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"labeling on the Dask cluster at {dask_address} needs PREFECT_API_URL set to a Prefect "
                             "server its workers can reach (e.g. `make server`); without it only this machine "
                             "could see their task runs")
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one this process's flow runs use (one per process)
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def run_label_flow(cfg: LabelConfig, root: str, *, dask_address: str | None = None,
                   dask_workers: int | None = None) -> dict[str, Any]:
    """Run `label_flow` on the chosen task runner (see `label_task_runner`)."""
    runner = label_task_runner(dask_address, dask_workers)
    if dask_workers and cfg.num_threads is None:
        # A local cluster shares this machine's cores among its workers instead of each grabbing all of them.
        cfg = cfg.model_copy(update={"num_threads": max(1, _cpu_count() // dask_workers)})
    if isinstance(runner, ThreadPoolTaskRunner):
        return label_flow.with_options(task_runner=runner)(cfg, root)
    with _api_for_workers(dask_address):
        return label_flow.with_options(task_runner=runner)(cfg, root)
