"""Labeling on a Dask cluster (prefect-dask): the same PL table as one process, work spread over worker
processes that load the teacher once, and a worker SIGKILLed mid-unit leaves no duplicate and no gap."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

import flows.label as flows_label
from flows.label import label_task_runner, run_label_flow, task_plan
from pipeline.config import label_tiny
from pipeline.data.rows import Utterance
from pipeline.stages.label_decode import LabelPlan, Teacher, WorkUnit
from storage.pl import load_pseudo_labels

EXACT = ["id", "language", "text", "num_tokens", "lid_pred", "shard", "key"]


def _cfg(corpus: str, teacher: str):
    # One clip per unit: 10 units, enough for both workers to take several and for a kill to land mid-run.
    return label_tiny(f"{corpus}/manifests/unlabeled.jsonl", {lang: teacher for lang in ("es", "el", "sl")},
                      unit_max_utterances=1)


def _table(root: str) -> pd.DataFrame:
    df = load_pseudo_labels(root)
    df["language"] = df["language"].astype(str)
    return df.sort_values("id").reset_index(drop=True)


def _assert_same_table(root: str, reference: str) -> None:
    got, want = _table(root), _table(reference)
    assert got["id"].is_unique and len(got) == len(want) == 10
    pd.testing.assert_frame_equal(got[EXACT], want[EXACT])
    # The reference ran with all cores, the workers with one thread each: sums differ in the last bits only.
    assert np.allclose(got["confidence"], want["confidence"], rtol=1e-4, atol=1e-5)


def _assert_units_committed_once(root: str) -> None:
    base = Path(root)
    assert len(list((base / "catalog/units").glob("*.json"))) == 10
    assert len(list((base / "pl").rglob("part-*.parquet"))) == 10
    assert len(list((base / "shards").glob("pl-*.tar"))) == 10
    assert not [p for p in base.rglob("*") if ".tmp-" in p.name]  # the killed attempt's temp files are gone


# --- fast: runner choice and what travels to a worker --------------------------------------------------------


def test_the_task_runner_is_one_thread_a_running_cluster_or_a_local_one():
    from prefect_dask import DaskTaskRunner

    assert isinstance(label_task_runner(), ThreadPoolTaskRunner)
    remote = label_task_runner(dask_address="tcp://10.0.0.5:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    local = label_task_runner(dask_workers=3)
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs == {"n_workers": 3, "processes": True, "threads_per_worker": 1}
    with pytest.raises(ValueError, match="not both"):
        label_task_runner(dask_address="tcp://10.0.0.5:8786", dask_workers=2)
    with pytest.raises(ValueError, match="at least 1"):
        label_task_runner(dask_workers=0)


def test_a_local_cluster_shares_the_cores_among_its_workers(monkeypatch):
    seen = {}

    class FakeFlow:
        def with_options(self, task_runner):
            seen["runner"] = task_runner
            return lambda cfg, root: seen.update(cfg=cfg) or {}

    monkeypatch.setattr(flows_label, "label_flow", FakeFlow())
    monkeypatch.setattr(flows_label, "_cpu_count", lambda: 8)
    cfg = label_tiny("u.jsonl", {"sl": "t.pt"})
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # a server: none is started
        run_label_flow(cfg, "labels", dask_workers=2)
        assert seen["cfg"].num_threads == 4 and seen["runner"].cluster_kwargs["n_workers"] == 2
        run_label_flow(cfg.model_copy(update={"num_threads": 1}), "labels", dask_workers=2)
        assert seen["cfg"].num_threads == 1  # an explicit setting wins
        run_label_flow(cfg, "labels", dask_address="tcp://10.0.0.5:8786")
        assert seen["cfg"].num_threads is None  # a remote worker's cores are its own business
        run_label_flow(cfg, "labels")
        assert isinstance(seen["runner"], ThreadPoolTaskRunner) and seen["cfg"].num_threads is None


def test_without_a_prefect_server_the_workers_share_the_flow_process_temporary_one(monkeypatch):
    import prefect.server.api.server as server_module

    class FakeServer:  # stands in for the per-process temporary server (starting a real one takes ~20 s)
        started = 0
        api_url = "http://127.0.0.1:8123/api"

        def start(self):
            FakeServer.started += 1

    class FakeFlow:
        def with_options(self, task_runner):
            return lambda cfg, root: {"api": PREFECT_API_URL.value()}

    monkeypatch.setattr(server_module, "SubprocessASGIServer", FakeServer)
    monkeypatch.setattr(flows_label, "label_flow", FakeFlow())
    cfg = label_tiny("u.jsonl", {"sl": "t.pt"})
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        # The serialized flow context carries this URL to every worker: their task runs land beside the flow run.
        assert run_label_flow(cfg, "labels", dask_workers=2) == {"api": "http://127.0.0.1:8123/api"}
        assert run_label_flow(cfg, "labels", dask_address="tcp://127.0.0.1:8786")["api"] == FakeServer.api_url
        assert FakeServer.started == 2 and PREFECT_API_URL.value() is None
        assert run_label_flow(cfg, "labels") == {"api": None}  # one process: Prefect's own ephemeral handling
        with pytest.raises(ValueError, match="PREFECT_API_URL"):  # workers elsewhere cannot reach 127.0.0.1
            run_label_flow(cfg, "labels", dask_address="tcp://10.0.0.5:8786")
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect.internal:4200/api"}):
        assert run_label_flow(cfg, "labels", dask_address="tcp://10.0.0.5:8786")["api"].startswith("http://prefect")
    assert FakeServer.started == 2


def test_the_plan_sent_with_each_unit_is_small_whatever_the_corpus_size():
    cfg = label_tiny("s3://bucket/u.jsonl", {"sl": "s3://bucket/t.pt"})
    teacher = Teacher("sl", "s3://bucket/t.pt", "ab" * 32, "slimipl/sl@400")

    def plan(n_units: int) -> LabelPlan:
        units = [WorkUnit("sl", i, tuple(Utterance(f"u{i}-{j}", f"s3://bucket/a/{i}-{j}.flac", 5.0, "sl")
                                         for j in range(100)), f"{i:064x}") for i in range(n_units)]
        return LabelPlan(cfg, "s3://bucket/labels", "cd" * 32, {"sl": teacher}, {"sl": "0" * 16}, "fp32", units)

    small, big = plan(1), plan(1000)
    assert len(pickle.dumps(big)) > 5_000_000  # what each of 1000 tasks would carry with the unit list
    sent = pickle.dumps(task_plan(big))
    assert len(sent) < 5_000 and len(sent) == len(pickle.dumps(task_plan(small)))
    back = pickle.loads(sent)
    assert back.units == [] and back.unit_keys(big.units[7]) == big.unit_keys(big.units[7])
    assert big.units and len(big.units) == 1000  # the flow's own plan keeps its units


# --- slow: real clusters ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect server for this module's flow runs (as the recipe flow test uses)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_process_root(prefect_server, smoke_corpus, teacher, tmp_path_factory) -> str:
    """The smoke corpus' unlabeled clips labeled by the flow on its default runner (one thread, this process)."""
    root = str(tmp_path_factory.mktemp("labels-one-process"))
    out = run_label_flow(_cfg(smoke_corpus, teacher), root)
    assert out["units_labeled"] == 10 and list(out["workers"]) == [f"{os.uname().nodename}:{os.getpid()}"]
    return root


@pytest.mark.slow
def test_a_local_dask_cluster_labels_exactly_what_one_process_labels(one_process_root, smoke_corpus, teacher,
                                                                     tmp_path):
    root = str(tmp_path / "labels")
    out = run_label_flow(_cfg(smoke_corpus, teacher), root, dask_workers=2)
    _assert_same_table(root, one_process_root)
    _assert_units_committed_once(root)
    workers = out["workers"]
    pids = {int(w.rsplit(":", 1)[1]) for w in workers}
    assert len(pids) == 2 and os.getpid() not in pids  # both worker processes labeled, the flow process none
    assert sum(w["units"] for w in workers.values()) == out["units_labeled"] == 10
    assert {w["threads"] for w in workers.values()} == {max(1, flows_label._cpu_count() // 2)}
    # The workers reported their task runs to the flow's own server: the UI shows all 10 units under the run.
    assert _unit_task_runs_of_latest_flow_run() == {f"label-{u}": "COMPLETED" for u in (
        "el-000000", "el-000001", "es-000000", "es-000001", *(f"sl-{i:06d}" for i in range(6)))}


def _unit_task_runs_of_latest_flow_run() -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        deadline = time.monotonic() + 30
        while True:  # task states arrive as events: give the last ones a moment
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            got = {r.name: r.state_type.value for r in runs}
            if set(got.values()) == {"COMPLETED"} and len(got) == 10 or time.monotonic() > deadline:
                return got
            time.sleep(0.5)


def _cluster_state():
    """Per worker: teachers loaded by this process and its torch threads."""
    import torch

    from pipeline.stages.label_decode import teacher_model

    return teacher_model.cache_info().misses, torch.get_num_threads()


def _open_temp_shards(pid: int, root: str) -> list[str]:
    """Temp shard files a process holds open: it is inside `label_unit`, between opening and committing."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # the process is gone
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(os.path.realpath(root)) and ".tar.tmp-" in target:
            out.append(target)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the half-written shard through /proc")
def test_a_worker_killed_mid_unit_leaves_the_complete_table_without_duplicates(one_process_root, smoke_corpus,
                                                                               teacher, tmp_path):
    from distributed import Client, LocalCluster

    root = str(tmp_path / "labels")
    killed: dict = {}
    done = threading.Event()

    def kill_one_mid_unit(pids: list[int]) -> None:
        # Freeze a worker, look at what it holds open, and kill it only while it holds a half-written shard of a
        # unit (after the run's first commit): the kill then lands mid-unit for certain, not "probably".
        units = Path(root, "catalog/units")
        while not done.is_set():
            if units.is_dir() and any(units.glob("*.json")):
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGSTOP)
                    except ProcessLookupError:
                        continue
                    try:
                        held = _open_temp_shards(pid, root)
                        if held:
                            killed.update(pid=pid, held=held, committed=len(list(units.glob("*.json"))))
                            os.kill(pid, signal.SIGKILL)
                            return
                    finally:
                        if not killed:  # never leave a worker frozen, whatever happened here
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGCONT)
            time.sleep(0.02)

    cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None)
    try:
        with Client(cluster) as client:
            pids = list(client.run(os.getpid).values())
            watcher = threading.Thread(target=kill_one_mid_unit, args=(pids,), daemon=True)
            watcher.start()
            try:
                out = run_label_flow(_cfg(smoke_corpus, teacher), root, dask_address=cluster.scheduler_address)
            finally:
                done.set()
                watcher.join()
            client.wait_for_workers(2, timeout=120)  # the nanny's replacement for the killed worker
            state = client.run(_cluster_state)
    finally:
        cluster.close()
    assert killed, "the kill never landed inside a unit"
    assert 1 <= killed["committed"] < 10 and len(killed["held"]) == 1
    assert not os.path.exists(killed["held"][0])  # its unit was redone elsewhere, the temp file removed
    assert out["units_labeled"] == 10 and out["units_skipped"] == 0
    assert sum(w["units"] for w in out["workers"].values()) == 10
    _assert_same_table(root, one_process_root)
    _assert_units_committed_once(root)
    # The survivor and the nanny's replacement each loaded the teacher once for all their units, with 1 thread.
    assert len(state) == 2 and max(misses for misses, _ in state.values()) == 1
    assert {threads for _, threads in state.values()} == {1}


def test_the_dask_bench_finds_the_per_unit_cost_a_runner_adds_beyond_the_units_work(smoke_corpus, teacher):
    """`make bench`'s Dask figure: K and 2K units through a runner that adds 0.3 s of bookkeeping per unit (a
    stand-in for the cluster, one process) give 0.3 s per unit plus what labeling itself spends outside units."""
    from pipeline.stages.label import run_label
    from pipeline.studies.dask_bench import format_dask_overhead_bench, run_dask_overhead_bench
    from storage.manifest import read_manifest

    def runner(cfg, root):
        run_label(cfg, root)
        time.sleep(0.3 * len(read_manifest(cfg.manifest)[0]))

    b = run_dask_overhead_bench(smoke_corpus, teacher, runner, workers=1, units=3)
    assert [r["units"] for r in b["runs"].values()] == [3, 6]
    # ± 0.1 s: what labeling spends outside units (planning, the catalog) is not quite the same in the two runs
    assert abs(b["overhead_per_unit_s"] - 0.3) < 0.1 and b["unit_work_per_unit_s"] > 0
    assert "per unit: " in format_dask_overhead_bench(b)
    with pytest.raises(ValueError, match="needs 2000 labeled clips"):
        run_dask_overhead_bench(smoke_corpus, teacher, runner, workers=1, units=1000)
