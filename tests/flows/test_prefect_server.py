"""Operators' path end to end: a real `prefect server` on 127.0.0.1, `mlpl serve`, deployments triggered through
the API; stage caching across runs; the relabel deployment. Every process started here is stopped by its PID.

With MLPL_SCREENSHOT=<png> set (make screenshot), headless Chromium also photographs the completed recipe run
in the Prefect UI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import RecipeConfig, corpus_data
from tests.helpers.servers import all_artifacts, free_port, stop, wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _recipe(smoke: str, run: Path, **fields) -> dict:
    """The tiny preset on the smoke corpus with budgets of a few updates (PLs of any length kept)."""
    lenient = {"max_empty_share": 1, "max_blank_ratio": 1, "min_chars_per_s": 0}
    cfg = corpus_data(smoke, str(run)) | dict(
        preset="tiny", self_train_languages=["sl"], student_modes=["finetune"],
        supervised_updates=4, finetune_updates=2, slimipl_updates=4, pl_cache_size=2, student_updates=3,
        supervised={"optim": {"warmup_updates": 1}, "eval_every": 4},
        finetune={"optim": {"warmup_updates": 1}},
        student={"optim": {"warmup_updates": 1}}, labeling_filter={"min_tokens": 0},
        student_pl_filter={"min_tokens": 0},
        slimipl={"optim": {"warmup_updates": 1}, "cropping_warmup_updates": 1, "unlabeled_ratio": 1,
                 "collapse": lenient, "pl_eval_max_utterances": 1},
        labeled_finetune={"max_updates": 2, "optim": {"warmup_updates": 1}},
    )
    return RecipeConfig(**(cfg | fields)).model_dump(mode="json")


@pytest.mark.slow
def test_deployments_on_a_real_server_cache_stages_and_relabel(smoke_corpus, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_API_URL": api,
                        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                        "PREFECT_UI_API_URL": api}
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                       str(port)], env=env, stdout=server_log.open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        wait_for("prefect server", lambda: urllib.request.urlopen(f"{api}/health", timeout=5).status == 200, 180,
              procs[0], server_log)
        procs.append(subprocess.Popen([str(BIN / "mlpl"), "serve"], env=env, cwd=ROOT, stdout=serve_log.open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            wait_for("mlpl serve", lambda: client.read_deployment_by_name("mlpl-relabel/mlpl"), 180, procs[1],
                  serve_log)  # the last one it registers
            deployment = client.read_deployment_by_name("mlpl-recipe/mlpl")
            _check_schemas(client)
            run = tmp_path / "run"
            good = _recipe(smoke_corpus, run)
            for bad in ({"pl_cache_size": -1}, {"preset": "huge"}, {"student_modes": ["teacherless"]},
                        {"student_pl_filter": {"min_confidence": 1.5}}, {"student_pl_share": 2.0}):
                with pytest.raises(Exception, match="(?i)validation|422|409"):
                    client.create_flow_run_from_deployment(deployment.id, parameters={"cfg": good | bad})
            assert client.read_flow_runs() == []  # refused before any run existed

            first = _run(client, deployment.id, good, serve_log)
            record = json.loads((run / "report/recipe_run.json").read_text())
            assert not any(s["cached"] for s in record["stages"].values())
            # the same-compute control walks the student's whole path: 4 (base) + 3 (student) + 2 (labeled fine-tune)
            assert set(record["stages"]) == {"supervised", "finetune/sl", "slimipl/sl", "student/finetune",
                                             "student/finetune-labeled-ft", "control/9"}
            artifacts = {a.key: a for a in all_artifacts(client) if a.key}
            assert {"supervised-test-metrics", "finetune-sl-test-metrics", "slimipl-sl-pl-quality", "label-summary",
                    "student-finetune-test-metrics", "recipe-report", "recipe-dev-cer-plot",
                    "recipe-summary"} <= set(artifacts)
            assert str(run / "student/finetune/checkpoints/best.pt") in artifacts["recipe-summary"].data
            table = json.loads(artifacts["supervised-test-metrics"].data)
            metrics = json.loads((run / "eval/supervised/metrics.json").read_text())["metrics"]
            assert {r["language"]: r["cer"] for r in table} == {k: round(v["cer"], 2) for k, v in metrics.items()}
            names = {r.name for r in client.read_task_runs()}
            assert {"recipe-run-supervised", "recipe-run-finetune-sl", "recipe-run-slimipl-sl",
                    "recipe-run-student-finetune"} <= names
            stamps = {p: p.stat().st_mtime_ns for p in run.rglob("best.pt")}

            _run(client, deployment.id, good, serve_log)  # the same inputs again: nothing trains
            again = json.loads((run / "report/recipe_run.json").read_text())
            assert all(s["cached"] for s in again["stages"].values()) and again["labels"]["units_labeled"] == 0
            assert {p: p.stat().st_mtime_ns for p in run.rglob("best.pt")} == stamps

            student = good["student"] | {"lid_weight": 0.5}  # only the student's config changes
            _run(client, deployment.id, good | {"student": student}, serve_log)
            third = json.loads((run / "report/recipe_run.json").read_text())
            assert {k for k, s in third["stages"].items() if not s["cached"]} == {
                "student/finetune", "student/finetune-labeled-ft"}
            assert json.loads((run / "student/finetune/config.json").read_text())["lid_weight"] == 0.5
            changed = {p.relative_to(run).parts[:2] for p in run.rglob("best.pt") if p.stat().st_mtime_ns != stamps[p]}
            assert changed == {("student", "finetune"), ("student", "finetune-labeled-ft")}
            assert third["wall_s"]["report"] > 0  # the report reran on the new student's numbers

            # One step alone from the same form: sl's slimIPL, unchanged, is reused; a per-language step without
            # its language fails with the fix, before anything runs.
            step = client.read_deployment_by_name("mlpl-stage/mlpl")
            _run(client, step.id, good, serve_log, stage="slimipl", language="sl")
            assert "recipe-run-slimipl-sl" in {r.name for r in client.read_flow_runs()}
            bad = client.create_flow_run_from_deployment(step.id, parameters={"cfg": good, "stage": "finetune"})
            state = wait_for("flow run", lambda: (s := client.read_flow_run(bad.id).state) and s.is_final() and s, 300,
                          log=serve_log)
            assert state.is_failed() and "give language" in state.message, state.message

            if os.environ.get("MLPL_SCREENSHOT"):
                _screenshot(f"http://127.0.0.1:{port}/runs/flow-run/{first}?tab=Artifacts",
                            Path(os.environ["MLPL_SCREENSHOT"]))

            _relabel(client, smoke_corpus, run, tmp_path, serve_log)
    finally:
        for proc in reversed(procs):
            stop(proc)
    assert all(p.poll() is not None for p in procs)


def _check_schemas(client) -> None:
    """Every deployment's parameter schema documents every field (nested models included)."""
    for name in ("mlpl-recipe", "mlpl-stage", "mlpl-report", "mlpl-relabel"):
        schema = client.read_deployment_by_name(f"{name}/mlpl").parameter_openapi_schema
        models = [schema, *schema.get("definitions", {}).values()]
        undocumented = [(name, m.get("title"), field) for m in models for field, prop in m.get("properties", {}).items()
                        if not prop.get("description")]
        assert not undocumented, undocumented
    relabel = client.read_deployment_by_name("mlpl-relabel/mlpl")
    assert relabel.global_concurrency_limit.limit == 1


def _run(client, deployment_id, cfg: dict, log: Path, timeout_s: float = 900, **params) -> str:
    run = client.create_flow_run_from_deployment(deployment_id, parameters={"cfg": cfg} | params)
    state = wait_for("flow run", lambda: (s := client.read_flow_run(run.id).state) and s.is_final() and s, timeout_s,
                  log=log)
    assert state.is_completed(), f"{state.type}: {state.message}\n{log.read_text()[-4000:]}"
    return str(run.id)


def _relabel(client, smoke: str, run: Path, tmp_path: Path, log: Path) -> None:
    """The relabel deployment: exactly the new files gain rows; a second run changes nothing."""
    from storage.pl import load_pseudo_labels

    watch = tmp_path / "incoming" / "sl"
    watch.mkdir(parents=True)
    clips = sorted((Path(smoke) / "audio/unlabeled/sl").glob("*.flac"))[:2]
    for c in clips:
        shutil.copy(c, watch / f"new-{c.name}")
    root = run / "labels"
    before = set(load_pseudo_labels(str(root))["id"])
    deployment = client.read_deployment_by_name("mlpl-relabel/mlpl")
    cfg = {"watch": str(watch.parent), "labels_root": str(root), "run_dir": str(run), "preset": "tiny",
           "unknown_language": "reject", "label": {"filters": {"min_tokens": 0}}}
    _run(client, deployment.id, cfg, log)
    after = set(load_pseudo_labels(str(root))["id"])
    assert after - before == {f"sl/new-{c.name}" for c in clips} and before <= after
    _run(client, deployment.id, cfg, log)
    assert set(load_pseudo_labels(str(root))["id"]) == after
    summaries = [a for a in all_artifacts(client) if a.key == "relabel-summary"]
    assert len(summaries) == 2 and "| 2 | 2 | 0" in summaries[0].data + summaries[1].data


def _screenshot(url: str, out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "MLPL_SCREENSHOT needs Debian's chromium (apt-get install chromium)"
    out.parent.mkdir(parents=True, exist_ok=True)
    profile = out.parent / ".chromium-profile"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1600,1000",
                    "--virtual-time-budget=20000", f"--screenshot={out}", url], check=True, timeout=120,
                   capture_output=True)
    shutil.rmtree(profile, ignore_errors=True)
    assert out.stat().st_size > 10_000
