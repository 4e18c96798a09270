"""End to end through the real CLI and the Prefect flow on the smoke corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from tests.helpers.servers import all_artifacts


def test_every_command_has_help():
    for args in (["--help"], ["corpus", "build", "--help"], ["train", "--help"], ["finetune", "--help"],
                 ["slimipl", "--help"], ["evaluate", "--help"], ["demo", "--help"], ["bench", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: mlpl" in proc.stdout


def test_bad_arguments_exit_nonzero_with_one_line_reason(tmp_path, capsys):
    assert main(["train", "--train", str(tmp_path / "missing.jsonl"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlpl: error:") and "missing.jsonl" in err[0]
    assert main(["train", "--train", "t.jsonl", "--run-dir", "r", "--set", "model.d_model=143"]) == 2
    assert "divisible" in capsys.readouterr().err
    assert main(["corpus", "build", "--preset", "galactic", "--out", str(tmp_path)]) == 2
    assert "smoke" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--train" in proc.stderr


def test_train_and_evaluate_via_cli(smoke_corpus, teacher, tmp_path, capsys):
    m = Path(smoke_corpus) / "manifests"
    run = tmp_path / "run"
    assert main(["train", "--train", str(m / "labeled.jsonl"), "--dev", str(m / "dev.jsonl"), "--run-dir",
                 str(run), "--max-updates", "6", "--set", "optim.warmup_updates=2", "--set", "eval_every=6"]) == 0
    out = capsys.readouterr().out
    assert "| language |" in out and "audio-s/s" in out
    ckpt = run / "supervised/checkpoints/best.pt"
    assert ckpt.exists()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(m / "test.jsonl"),
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert set(metrics["metrics"]) >= {"es", "el", "sl", "all"}
    hyps = (tmp_path / "eval/hypotheses.jsonl").read_text().splitlines()
    assert len(hyps) == metrics["utterances"] > 0
    # The fast path through every training stage: fine-tune, then slimIPL, on sl.
    common = ["--language", "sl", "--train", str(m / "labeled.jsonl"), "--run-dir", str(run), "--max-updates", "4",
              "--set", "optim.warmup_updates=1", "--set", "save_every=2"]
    assert main(["finetune", *common, "--dev", str(m / "dev.jsonl"), "--set", "eval_every=4"]) == 0
    assert "sl dev at update 4" in capsys.readouterr().out
    lenient = ["collapse.max_empty_share=1", "collapse.max_blank_ratio=1", "collapse.min_chars_per_s=0",
               "pl_cache_size=2", "unlabeled_ratio=1", "cropping_warmup_updates=2", "pl_eval_max_utterances=1"]
    assert main(["slimipl", *common, "--unlabeled", str(m / "unlabeled.jsonl"), "--reference",
                 str(Path(smoke_corpus) / "hidden/unlabeled_reference.jsonl"),
                 *[x for kv in lenient for x in ("--set", kv)]]) == 0
    out = capsys.readouterr().out
    assert "PL quality" in out and "cache refreshes" in out
    result = json.loads((run / "slimipl/sl/result.json").read_text())
    assert result["step"] == 4 and result["extra"]["refreshes"] >= 2
    assert result["extra"]["pl_updates"] + result["extra"]["labeled_updates"] == 4
    assert main(["slimipl", *common, "--unlabeled", str(m / "unlabeled.jsonl"), "--set", "pl_cache_size=0"]) == 2
    assert "pl_cache_size" in capsys.readouterr().err
    # ...then labeling with each language's best model; a student whose filter no PL passes (629 tokens) says what to do
    # (rather than training on labeled data alone); with a trained teacher's labels it trains on labeled + PL data.
    assert main(["label", "--manifest", str(m / "unlabeled.jsonl"), "--run-dir", str(run)]) == 0
    assert "units labeled" in capsys.readouterr().out
    assert main(["student", "--train", str(m / "labeled.jsonl"), "--run-dir", str(run),
                 "--set", "pl_filter.min_tokens=629"]) == 2
    assert "no pseudo-labels" in capsys.readouterr().err
    assert main(["label", "--manifest", str(m / "unlabeled.jsonl"), "--out", str(run / "labels"),
                 *[x for lang in ("es", "el", "sl") for x in ("--teacher", f"{lang}={teacher}")]]) == 0
    capsys.readouterr()
    student = ["--train", str(m / "labeled.jsonl"), "--run-dir", str(run), "--max-updates", "6",
               "--set", "optim.warmup_updates=1", "--set", "save_every=3"]
    assert main(["student", "--mode", "finetune", *student, "--dev", str(m / "dev.jsonl")]) == 0
    assert "student/finetune dev at update 6" in capsys.readouterr().out
    result = json.loads((run / "student/finetune/result.json").read_text())
    assert result["extra"]["sources"]["pl"]["rows_read"] > 0 and result["extra"]["init_checkpoint"].endswith(
        "supervised/checkpoints/best.pt")
    assert main(["student", "--mode", "finetune", "--labeled-only", "--init",
                 str(run / "student/finetune/checkpoints/best.pt"), *student]) == 0
    assert "'pl': 0" in capsys.readouterr().out and (run / "student/finetune-labeled-ft/result.json").exists()
    assert main(["student", "--mode", "finetune", *student, "--set", "source_weights={\"web\": 1}"]) == 2
    assert "unknown source" in capsys.readouterr().err


def test_the_recipe_and_demo_commands_build_the_corpus_then_run_the_recipe_on_it(tmp_path, monkeypatch):
    """The CLI's path into demo_flow (the stages themselves run in the slow test below)."""
    import flows.cli.recipe
    import flows.demo

    seen = {}
    monkeypatch.setattr(flows.demo, "demo_flow", flows.demo.demo_flow.fn)  # the flow's body, without a server
    monkeypatch.setattr(flows.demo, "build_corpus_task", lambda *a, **k: seen.setdefault("corpus", a) and {})
    monkeypatch.setattr(flows.demo, "recipe_flow", lambda cfg: seen.setdefault("cfg", cfg) and {"stages": {}})
    monkeypatch.setattr(flows.cli.recipe, "print_recipe", lambda *a: None)
    corpus, run = str(tmp_path / "corpus"), str(tmp_path / "run")
    for command in (["recipe", "--recipe", "bench", "--set", "rounds=2"], ["demo"]):
        seen.clear()
        assert main([*command, "--corpus", "smoke", "--corpus-dir", corpus, "--run-dir", run]) == 0
        cfg = seen["cfg"]
        assert seen["corpus"][:2] == ("smoke", corpus) and cfg.run_dir == run
        assert cfg.labeled_manifest == str(Path(corpus) / "manifests" / "labeled.jsonl")
        assert cfg.rounds == (2 if command[0] == "recipe" else 1)  # --set reaches the recipe


@pytest.mark.slow
def test_the_recipe_flow_runs_every_stage_under_prefect(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.demo import demo_flow

    quick = {"max_updates": 6, "eval_every": 6, "save_every": 6, "log_every": 3,
             "optim": {"name": "adamw", "lr": 1e-3, "warmup_updates": 1, "schedule": "constant"}}
    slim = quick | {"pl_cache_size": 2, "unlabeled_ratio": 1, "cropping_warmup_updates": 2,
                    "collapse": {"max_empty_share": 1.0, "max_blank_ratio": 1.0, "min_chars_per_s": 0.0},
                    "pl_eval_max_utterances": 2}
    overrides = {"supervised": {"max_updates": 30, "eval_every": 15}, "finetune": quick, "slimipl": slim,
                 "student": quick, "labeled_finetune": quick | {"max_updates": 3, "eval_every": 3},
                 "student_modes": ["finetune", "from_scratch", "from_scratch_large"], "student_labeled_finetune": True,
                 "rounds": 2,
                 "slimipl_lm": True,
                 # The final student shrunk two ways, scored and reported with its size on disk.
                 "serving_prune": ["pathways"], "serving_bits": [1],
                 "prune": quick | {"round_updates": 1, "sparsity": 0.5}, "quantize": quick,
                 # models of a few updates may label clips empty: keep every PL so that each round has some
                 "labeling_filter": {"min_tokens": 0}, "student_pl_filter": {"min_tokens": 0},
                 # A labeled data budget: every stage trains on half of each language's labeled clips.
                 "labeled_fraction": 0.5}
    with prefect_test_harness(server_startup_timeout=120):
        out = demo_flow(corpus_dir=str(tmp_path / "corpus"), run_dir=str(tmp_path / "run"), corpus="smoke",
                        overrides=overrides)
        with get_client(sync_client=True) as client:
            artifacts = {a.key: a for a in all_artifacts(client) if a.key}
            flows = {f.name for f in client.read_flows()}
    assert {"mlpl-demo", "mlpl-recipe", "mlpl-train", "mlpl-language", "mlpl-label"} <= flows
    # Ops see progress and the per-language tables of every stage in the UI.
    assert {"corpus-build", "supervised-training", "supervised-test-metrics", "supervised-dev-metrics",
            "finetune-sl-training", "finetune-sl-test-metrics", "slimipl-sl-training", "slimipl-sl-test-metrics",
            "slimipl-sl-pl-quality", "label-progress", "label-summary", "label-corpus", "student-finetune-training",
            "student-finetune-test-metrics", "student-from-scratch-labeled-ft-test-metrics", "recipe-report",
            "recipe-dev-cer-plot"} <= set(artifacts)
    assert artifacts["label-progress"].data == 100.0 and artifacts["student-finetune-training"].data == 100.0
    table = artifacts["supervised-test-metrics"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert {row["language"] for row in table} >= {"es", "el", "sl"}
    # Stages hand on small records: URIs, updates, wall times, metrics.
    stages = out["stages"]
    # The labeled budget: the run's share of the labeled clips is what every training stage read.
    assert out["labeled_share"]["languages"] == {"el": {"kept": 20, "of": 40}, "es": {"kept": 20, "of": 40},
                                                 "sl": {"kept": 6, "of": 12}}
    share = str(tmp_path / "run/manifests/labeled.jsonl")
    for name in ("supervised", "finetune/sl", "slimipl/sl", "student/from_scratch", "student/finetune-labeled-ft"):
        assert json.loads((tmp_path / "run" / name / "config.json").read_text())["train_manifest"] == share, name
    assert json.loads((tmp_path / "run/supervised/result.json").read_text())["num_train_utterances"] == 46
    students = [f"student/{mode}{r}{ft}" for r in ("", "-round2") for mode in ("finetune", "from_scratch",
                                                                              "from_scratch_large")
                for ft in ("", "-labeled-ft")]
    # The same-compute control walks the best student's path: 30 (base) + 6 + 3 (round 1's first student) + 6 + 3.
    assert list(stages) == ["supervised", "finetune/el", "slimipl/el", "finetune/es", "slimipl/es", "finetune/sl",
                            "slimipl/sl", *students, "control/48", "prune/pathways-imp", "quantize/1bit"]
    assert stages["control/48"]["step"] == 48 and (tmp_path / "run/control/48/supervised/checkpoints/best.pt").exists()
    assert stages["supervised"]["step"] == 30 and stages["student/finetune"]["step"] == 6
    assert stages["student/from_scratch-labeled-ft"]["step"] == 3
    for name, v in stages.items():  # per-language stages are scored on their language, the rest on all
        langs = {name.split("/")[1]} if name.startswith(("finetune/", "slimipl/")) else {"es", "el", "sl"}
        assert set(v["test"]) == langs | {"all", "macro"}, name
    assert set(out["wall_s"]) == {"supervised", "finetune+slimipl el", "finetune+slimipl es", "finetune+slimipl sl",
                                  "labeling", "labeling round 2", "supervised, same compute", "prune/pathways-imp",
                                  "quantize/1bit", "report"} | {f"student {s.split('/')[1]}" for s in students}
    # Every model is also scored out of domain (the corpus's short and long out-of-domain clips).
    for name in stages:
        run = tmp_path / ("run/control/48" if name.startswith("control/") else "run")
        where = "supervised" if name.startswith("control/") else name
        assert (run / "eval" / where / "ood_long" / "metrics.json").exists(), name
    assert json.loads((tmp_path / "run/report/recipe_run.json").read_text())["stages"] == stages
    # Every unlabeled clip is labeled by its language's slimIPL model, or is a reject with a reason.
    from storage.pl import load_pseudo_labels, load_rejects

    labels = out["labels"]
    pl, rejects = load_pseudo_labels(labels["root"]), load_rejects(labels["root"])
    assert len(pl) + len(rejects) == 10 and set(labels["summary"]) == {"es", "el", "sl"}
    assert set(pl["teacher"].str.split("@").str[0]) <= {"slimipl/es", "slimipl/el", "slimipl/sl"}
    # Labeling and (slimipl_lm) slimIPL decoded with each language's LM, tuned on dev (the decode column says so).
    assert pl["decode"].str.startswith("beam50/8 char-LM").all()
    assert json.loads((tmp_path / "run/slimipl/sl/config.json").read_text())["decoder"]["unit"] == "char"
    # Round 2: the first student of round 1 (after its labeled-only fine-tune) relabeled every row once into the
    # round's own corpus; its students read that corpus.
    teacher2 = stages["student/finetune-labeled-ft"]["checkpoint"]
    root2 = tmp_path / "run/rounds/2/labels"
    pl2, rejects2 = load_pseudo_labels(str(root2)), load_rejects(str(root2))
    assert len(pl2) + len(rejects2) == 10 and pl2["id"].is_unique
    assert set(pl2["teacher"].str.split("@").str[0]) == {"student/finetune-labeled-ft"}
    assert not set(pl2["id"]) & set(rejects2["id"])
    round2 = json.loads((tmp_path / "run/student/finetune-round2/result.json").read_text())
    assert round2["extra"]["sources"]["pl"]["rows_read"] == len(pl2) and teacher2.endswith("best.pt")
    # The student read the PL corpus; its labeled-only fine-tune did not.
    student = json.loads((tmp_path / "run/student/finetune/result.json").read_text())
    assert student["extra"]["sources"]["pl"]["rows_read"] == len(pl)
    # The run report: a row per stage and student, the plot as a file and artifact.
    assert [r["stage"] for r in out["report"]["rows"]][:8] == [
        "supervised", "control/48", "finetune", "slimipl", "student/finetune", "student/finetune-labeled-ft",
        "student/from_scratch", "student/from_scratch-labeled-ft"]
    assert out["report"]["with_unlabeled"] == ["el", "es", "sl"]
    assert out["report"]["test_sets"] == ["ood_long", "ood_short"] and "Out of domain" in out["report"]["markdown"]
    # The serving models start from the final student (the first mode's last model of the last round) and are rows
    # of the report with their size on disk.
    prune_cfg = json.loads((tmp_path / "run/prune/pathways-imp/config.json").read_text())
    assert prune_cfg["init_checkpoint"] == stages["student/finetune-round2-labeled-ft"]["checkpoint"]
    serving = {r["stage"]: r for r in out["report"]["rows"] if r.get("serving_bytes")}
    assert set(serving) == {"prune/pathways-imp", "quantize/1bit"}
    assert serving["quantize/1bit"]["serving_bytes"] < serving["quantize/1bit"]["float32_bytes"] / 3
    assert (tmp_path / "run/report/dev_cer.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in artifacts["recipe-dev-cer-plot"].data
    assert (tmp_path / "corpus/corpus_card.md").exists()


def test_bench_measures_every_figure_on_a_built_corpus(smoke_corpus, teacher, capsys):
    argv = ["bench", "--corpus-dir", smoke_corpus, "--updates", "3", "--teacher", teacher, "--scales", "1", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("decode FLAC + resample + log-mel", "train update, fp32", "greedy decode, fp32"):
        line = next(row for row in out.splitlines() if row.startswith(f"| {name} |"))
        assert float(line.split("|")[-2]) > 0  # audio-s/s
    # Labeling: fast path and naive loop side by side, with the GEMM peak, padding and scaling measured.
    figures = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in out.splitlines()
               if row.startswith("| ") and row.count("|") >= 4}
    assert figures["fast / naive"].endswith("×") and float(figures["fast / naive"][:-1]) > 0
    gemm = next(name for name in figures if name.startswith("GEMM peak, "))  # bf16 where native, else fp32
    assert "GFLOP/s" in figures[gemm]
    difference = float(figures["PL characters differing from the fp32 naive loop"].split()[0])
    if "fp32" in gemm:
        assert difference == 0.0  # same precision, same PLs
    else:  # bf16 autocast rounds some frames differently from the fp32 loop
        assert 0.0 <= difference < 5.0
    assert float(figures["padding waste (padded frames / all frames fed)"].split()[0]) < 50
    assert "1×" in figures and "2×" in figures


def test_a_failed_corpus_text_fetch_is_a_one_line_error(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # no apt-get on PATH, empty text cache
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "corpus", "build", "--preset", "smoke", "--out",
                           str(tmp_path / "c"), "--cache-dir", str(tmp_path / "cache")], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).parents[2])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("mlpl: error:") and "--text-dir" in lines[0]
