"""The data-size study (`make datasize`, `make levers`) on a small finished run: students that read nested shares of
the PL corpus, the levers, the controls of their paths, and the results page's section."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.engine.evaluate import run_evaluate
from pipeline.layout import RunLayout
from pipeline.report.report import write_report
from pipeline.studies.datasize import PLOT, SECTION, DataSizeStudy, publish_datasize, run_datasize_study

QUICK = {"max_updates": 4, "eval_every": 4, "save_every": 4, "log_every": 2,
         "optim": {"name": "adamw", "lr": 1e-3, "warmup_updates": 1, "schedule": "constant"}}


@pytest.fixture(scope="module")
def finished_run(smoke_corpus, teacher, labeled_root, tmp_path_factory) -> tuple[str, dict]:
    """A recipe run reduced to what the study reads: its base (the smoke teacher, scored), its PL corpus and its
    report; the recipe form's budgets are a few updates."""
    run = tmp_path_factory.mktemp("finished")
    layout = RunLayout(str(run))
    (run / "supervised/checkpoints").mkdir(parents=True)
    shutil.copy(teacher, layout.supervised.best)
    (run / "supervised/result.json").write_text(json.dumps({"stage": "supervised", "step": 8,
                                                             "best": {"metric": 90.0, "step": 8}}))
    shutil.copytree(labeled_root, layout.labels)
    tests = {None: "test", "ood_short": "ood_short", "ood_long": "ood_long"}
    for name, split in tests.items():
        run_evaluate(layout.supervised.best, f"{smoke_corpus}/manifests/{split}.jsonl", layout.eval("supervised", name))
    write_report(str(run))
    overrides = {"supervised": QUICK | {"max_updates": 8}, "student_by_mode": {"from_scratch": QUICK},
                 "labeled_finetune": QUICK | {"max_updates": 2}, "student_pl_filter": {"min_tokens": 0}}
    return str(run), overrides


@pytest.mark.slow
def test_students_read_nested_pl_shares_and_each_path_gets_its_control(smoke_corpus, finished_run, tmp_path):
    run, overrides = finished_run
    study = DataSizeStudy(smoke_corpus, run, str(tmp_path / "study"), recipe="demo", ratios=(0.5, 2.0),
                          overrides=overrides)
    saved = []  # how many variants and controls the record on disk holds each time a part is saved

    def on_saved() -> None:
        on_disk = json.loads((tmp_path / "study/datasize.json").read_text())
        saved.append((len(on_disk["variants"]), len(on_disk["controls"])))

    record = run_datasize_study(study, on_saved=on_saved)
    # the base at N/2, then every variant before any control (a doubled budget's control takes hours), each saved
    assert saved[:4] == [(0, 0), (1, 0), (2, 0), (2, 1)], saved
    small, large = record["variants"]["pl0p5x"], record["variants"]["pl2x"]
    # Each reads at most its share of every language's PL hours, the smaller share inside the larger one.
    per_language_s = 3600 * study.reference_hours()
    assert 0 < small["pl_audio_s"] <= 0.5 * per_language_s * 3 and small["pl_audio_s"] < large["pl_audio_s"]
    assert [c["stage"] for c in small["chain"]] == ["student/pl0p5x", "student/pl0p5x-labeled-ft"]
    assert small["path"] == 8 + 4 + 2 and small["model"] in small["chain"]
    assert set(small["model"]["cer"]) == {"test", "ood_short", "ood_long"}
    # Its control: the base's config on labeled data for the whole path, trained in the study's folder.
    assert record["controls"]["14"]["updates"] == 14
    assert (tmp_path / "study/control/14/supervised/checkpoints/best.pt").exists()
    assert record["half_base"]["updates"] == 4
    # A rerun trains nothing again and gives the same record.
    again = run_datasize_study(study)
    assert again["variants"] == record["variants"] and again["controls"] == record["controls"]
    # The levers: greedy PLs relabel the corpus with the run's teachers into the study's own PL corpus.
    levers = run_datasize_study(study, levers=True, only=["greedy-pls"])
    greedy = levers["variants"]["greedy-pls"]
    assert greedy["labels"].endswith("labels-greedy") and greedy["path"] == 14
    assert set(levers["pl_quality"]) == {"es", "el", "sl"}
    page = tmp_path / "results.md"
    page.write_text("# Results\n\n## Test CER\n\ntable\n")
    text = publish_datasize(study, str(page), "make datasize", "cpu")
    written = page.read_text()
    assert f"## {SECTION}" in written and "## Test CER\n\ntable" in written and text.strip() in written
    assert (tmp_path / PLOT).read_bytes()[:4] == b"\x89PNG"
    assert "| from scratch, pl0p5x |" in text and "| greedy-pls |" in text and "N/2 (this study)" in text
    assert "PL CER of the corpus" in text and "| same-compute control (14 updates, labeled only) |" in text
    assert "| greedy-pls | ≥ 10 % below the better of base and its control (" in text  # the levers' targets


def test_the_stopping_rule_picks_the_first_budget_whose_doubling_gains_under_two_percent():
    from pipeline.studies.datasize import _convergence_lines

    report = {"rows": [{"kind": "base", "updates": 4000, "dev_cer": 22.36},
                       {"kind": "control", "updates": 8000, "dev_cer": 20.52}]}
    rows = {"base": report["rows"][0], "report": report}
    half = {"half_base": {"updates": 2000, "dev_cer": 25.05}}
    # Every doubling measured still gains ≥ 2 %: the page says so, with the last one's gain.
    text = "\n".join(_convergence_lines(rows, half))
    assert "| 2.00 N (the recipe's control) | 8000 | 20.52 | -8.2 % |" in text
    assert "**Not converged at any budget measured**: the last doubling (4000 → 8000 updates) still gains 8.2 %." \
           in text
    # The study's 4 N run gains 1.5 % over 2 N: the rule picks 2 N (8000), not the base's N.
    # A lever's control (a path of 11950 updates) is not a doubling of N and stays out of the sequence.
    record = half | {"controls": {"16000": {"updates": 16000, "dev_cer": 20.21},
                                  "11950": {"updates": 11950, "dev_cer": 19.0}}}
    text = "\n".join(_convergence_lines(rows, record))
    assert "| 4.00 N (this study) | 16000 | 20.21 | -1.5 % |" in text and "11950" not in text
    assert "The rule picks 8000 updates: doubling it gains 1.5 %." in text
    # A doubling that makes the dev CER worse (the longer run overfits) stops the sequence there too.
    worse = {"rows": [report["rows"][0], {"kind": "control", "updates": 8000, "dev_cer": 23.28}]}
    text = "\n".join(_convergence_lines({"base": report["rows"][0], "report": worse}, half))
    assert "The rule picks 4000 updates: doubling it makes it 4.1 % worse." in text
    # Without a doubling there is nothing to check.
    text = "\n".join(_convergence_lines({"base": report["rows"][0], "report": {"rows": report["rows"][:1]}}, {}))
    assert "No doubling of the base's budget measured" in text


def test_the_larger_students_lever_doubles_its_own_budget_and_keeps_its_width(smoke_corpus, tmp_path):
    from pipeline.studies.datasize import student_configs

    # The two students' own budgets differ, so each lever doubles its own.
    study = DataSizeStudy(smoke_corpus, str(tmp_path / "run"), str(tmp_path / "study"), recipe="demo",
                          overrides={"student_by_mode": {"from_scratch_large": {"max_updates": 6}}})
    cfg, levers = study.config(), {v.name: v for v in study.variants(levers=True)}
    at_size, large = cfg.student_config("from_scratch"), cfg.student_config("from_scratch_large")
    assert large.max_updates == 6 != at_size.max_updates
    student, ft = student_configs(study, levers["large-budget2x"], "labels")
    # The recipe's larger student (doubled width), with twice its own budget, then its labeled-only fine-tune.
    assert student.model == large.model != at_size.model
    assert student.max_updates == 2 * large.max_updates and ft.labeled_only
    assert (student.stage_name(), ft.stage_name()) == ("student/large-budget2x", "student/large-budget2x-labeled-ft")
    # budget2x is the student at the teacher's size with the same doubled budget.
    same_size, _ = student_configs(study, levers["budget2x"], "labels")
    assert same_size.model == at_size.model and same_size.max_updates == 2 * at_size.max_updates


def test_each_lever_is_held_to_its_students_target_against_the_better_of_base_and_its_own_control(smoke_corpus,
                                                                                                 tmp_path):
    from pipeline.studies.datasize import lever_targets

    study = DataSizeStudy(smoke_corpus, str(tmp_path / "run"), str(tmp_path / "study"), recipe="demo")
    cells = lambda test, long, short: {"test": test, "ood_long": long, "ood_short": short}  # noqa: E731
    rows = {"base_cells": cells(34.6, 36.0, 38.1),
            "controls": {11950: cells(30.0, 33.0, 35.0), 8000: cells(35.7, 36.3, 38.6)},
            "variants": {
                # the larger student: 20 % asked; its path's control (35.7) is worse than the base, so against 34.6
                "large-budget2x": {"name": "large-budget2x", "ratio": None, "path": 8000,
                                   "cells": cells(27.5, 28.0, 30.0)},
                # the one at the teacher's size: 10 % asked, against its control (30.0, better than the base)
                "budget2x": {"name": "budget2x", "ratio": None, "path": 11950, "cells": cells(27.5, 29.0, 30.0)},
                "pl1x": {"name": "pl1x", "ratio": 1.0, "path": 8000, "cells": cells(20.0, 20.0, 20.0)}}}
    checks = {(c["student"], c["check"].split(" (")[0].split(",")[0]): c
              for c in lever_targets(rows, study.variants(levers=True))}
    assert {name for name, _ in checks} == {"large-budget2x", "budget2x"}  # a data size is not a lever
    large = checks["large-budget2x", "≥ 20 % below the better of base and its control"]
    assert large["holds"] and large["detail"] == "avg CER 34.6 → 27.5 (-20.5 %)" and "(base)" in large["check"]
    size = checks["budget2x", "≥ 10 % below the better of base and its control"]
    assert not size["holds"] and size["detail"] == "avg CER 30.0 → 27.5 (-8.3 %)" and "control 11950" in size["check"]
    # out of domain against the base: long 36.0 → 28.0 (-22.2 %) beats short 38.1 → 30.0 (-21.3 %); 29.0 does not
    assert checks["large-budget2x", "out of domain"]["holds"]
    assert not checks["budget2x", "out of domain"]["holds"]
