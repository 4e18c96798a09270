"""What the Dask labeling path costs per unit of work (`make bench`, issue 18): the same short clips labeled as K
and 2K one-clip units on a local cluster of worker processes. The difference of the two runs cancels every fixed
cost (Prefect server, cluster start, each worker loading the teacher); what is left per unit, beyond the unit's
own labeling work as its worker timed it, is the scheduler's and Prefect's bookkeeping: submitting the task,
shipping the plan, the task run's state changes, collecting the result.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.config import LabelConfig, label_tiny
from pipeline.layout import split_manifest
from storage.files import join
from storage.manifest import read_manifest, write_manifest
from storage.pl import LabelStore

# Runs `cfg` into a labels root on a cluster of `workers` processes (flows.label.run_label_flow with dask_workers).
ClusterLabel = Callable[[LabelConfig, str], Any]


@contextmanager
def _quiet_cluster_shutdown() -> Iterator[None]:
    """Dask's scheduler logs a traceback for each worker connection a closing local cluster cuts; harmless, and
    it would bury the figures."""
    quiet = [logging.getLogger(name) for name in ("distributed", "tornado")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def _timed_run(label_on_cluster: ClusterLabel, cfg: LabelConfig, root: str) -> dict[str, float]:
    """One cluster run: its wall time, and the units' own labeling time summed over their catalog records."""
    t0 = time.perf_counter()
    label_on_cluster(cfg, root)
    wall = time.perf_counter() - t0
    records = LabelStore(root).records()
    return {"wall_s": wall, "units": len(records), "unit_work_s": sum(r["wall_s"] for r in records),
            "audio_s": sum(r["audio_s"] for r in records)}


def run_dask_overhead_bench(corpus_dir: str, teacher_url: str, label_on_cluster: ClusterLabel, *, workers: int,
                            units: int = 30) -> dict[str, Any]:
    """Label the first `units` and `2 × units` labeled clips (2-6 s, read as unlabeled audio), one clip per unit,
    on the cluster, after an untimed warm-up run (the first run pays imports and caches that later ones do not,
    which would not cancel); per-unit overhead = (Δwall × workers − Δunit work) / Δunits, fixed cost = what the
    K-unit run took beyond its units' work and their overhead, spread over the workers."""
    rows, _ = read_manifest(split_manifest(corpus_dir, "labeled"))
    if len(rows) < 2 * units:
        raise ValueError(f"the Dask bench needs {2 * units} labeled clips, the corpus has {len(rows)}")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp, _quiet_cluster_shutdown():
        for n, timed in ((workers, False), (units, True), (2 * units, True)):
            manifest = join(tmp, f"clips-{n}.jsonl")
            write_manifest(manifest, rows[:n])
            languages = sorted({r["language"] for r in rows[:n]})
            cfg = label_tiny(manifest, {lang: teacher_url for lang in languages}, unit_max_utterances=1,
                             num_threads=1)
            run = _timed_run(label_on_cluster, cfg, join(tmp, f"labels-{n}-{'timed' if timed else 'warm-up'}"))
            if timed:
                runs[n] = run
    small, big = runs[units], runs[2 * units]
    extra_units = big["units"] - small["units"]
    per_unit = (workers * (big["wall_s"] - small["wall_s"]) - (big["unit_work_s"] - small["unit_work_s"])) / extra_units
    fixed = small["wall_s"] - (small["unit_work_s"] + small["units"] * per_unit) / workers
    return {"workers": workers, "runs": runs, "overhead_per_unit_s": per_unit, "fixed_s": fixed,
            "unit_work_per_unit_s": (big["unit_work_s"] - small["unit_work_s"]) / extra_units}


def format_dask_overhead_bench(b: dict[str, Any]) -> str:
    """Markdown of `run_dask_overhead_bench`."""
    lines = [f"Dask labeling path, local cluster of {b['workers']} worker processes × 1 thread, one short clip per "
             "unit", "", "| units | wall s | units' own work s (summed) | audio s |", "|---:|---:|---:|---:|"]
    for n, r in b["runs"].items():
        lines.append(f"| {n} | {r['wall_s']:.1f} | {r['unit_work_s']:.1f} | {r['audio_s']:.0f} |")
    lines += ["", f"per unit: {1000 * b['overhead_per_unit_s']:.0f} ms of scheduler + Prefect bookkeeping (a unit's "
              f"own work here: {1000 * b['unit_work_per_unit_s']:.0f} ms); fixed: {b['fixed_s']:.1f} s a run (server, "
              "cluster start, teacher loads)"]
    return "\n".join(lines)
