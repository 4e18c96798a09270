"""Ablations (`mlpl ablate`): each lever switched on a branch of a finished recipe run; the stages the lever does not
touch are reused, those it must retrain are trained afresh, the original run is left alone, and the table lands in
the results page's Ablations section without disturbing the rest of the page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from pipeline.config import recipe_demo
from pipeline.report.report import replace_section, section
from pipeline.studies.ablation import (
    ABLATIONS,
    ablation_markdown,
    ablation_named,
    final_student,
    finished_figures,
    prepare_branch,
)


def test_a_results_page_section_is_replaced_in_place_or_appended():
    page = "# R\n\n## Table\n\nrows\n\n## Ablations\n\nold\n\n## Plot\n\n![p](p.png)\n"
    new = replace_section(page, "Ablations", "new table\n")
    assert new == "# R\n\n## Table\n\nrows\n\n## Ablations\n\nnew table\n\n## Plot\n\n![p](p.png)\n"
    assert section(new, "Ablations") == "new table\n" and section(new, "Plot") == "![p](p.png)\n"
    assert replace_section(new, "Ablations", section(new, "Ablations")) == new
    assert section(page, "Missing") is None
    appended = replace_section("# R\n\n## Table\n\nrows\n", "Ablations", "t\n")
    assert appended.endswith("## Table\n\nrows\n\n## Ablations\n\nt\n")


def test_ablations_are_named_in_their_order_and_an_unknown_name_is_refused():
    assert [a.name for a in ablation_named(None)] == [a.name for a in ABLATIONS]
    assert [a.name for a in ablation_named(["rounds2", "greedy_pls"])] == ["greedy_pls", "rounds2"]
    with pytest.raises(ValueError, match="unknown ablation.*nope"):
        ablation_named(["nope"])


def test_the_table_compares_each_ablation_with_the_recipe_and_says_which_did_not_run():
    base = {"run_dir": "runs/bench", "student_cer": 40.0, "student_cer_by_language": {"sl": 50.0},
            "slimipl_cer": 38.0, "pl_cer": 25.0, "pl_wer": 60.0}
    worse = base | {"student_cer": 42.0, "pl_cer": 35.0, "pl_wer": 99.0}
    md = ablation_markdown(base, [(ABLATIONS[0], worse), (ABLATIONS[1], None)], "sl", "make ablations")
    lines = md.splitlines()
    assert "| **recipe** (`runs/bench`) | as it ships | 40.0 | — | 50.0 | 38.0 | 25.0 | 60.0 |" in md
    assert any(line.startswith("| LM-fused labeling (`greedy_pls`)") and "| 42.0 | +5.0 % | 50.0 | 38.0 | 35.0 | 99.0 |"
               in line for line in lines)
    assert any("`slimipl_lambda4`" in line and "not run yet" in line for line in lines)
    assert "`make ablations`" in md


def test_rows_measured_earlier_are_kept_beside_the_recipe_run_they_compare_with():
    base = {"run_dir": "runs/bench", "student_cer": 40.0, "student_cer_by_language": {"sl": 50.0},
            "slimipl_cer": 38.0, "pl_cer": 25.0, "pl_wer": 60.0}
    earlier = ablation_markdown(base, [(ABLATIONS[0], base | {"student_cer": 42.0}), (ABLATIONS[1], None)], "sl",
                                "make ablations")
    kept = next(line for line in earlier.splitlines() if "`greedy_pls`" in line)
    # a fresh clone reran the same recipe run and only slimipl_lambda4: greedy_pls's earlier row stays as it was
    now = ablation_markdown(base, [(ABLATIONS[0], None), (ABLATIONS[1], base | {"student_cer": 44.0})], "sl",
                            "make ablations", earlier=earlier)
    assert kept in now.splitlines() and "| 44.0 | +10.0 % |" in now and "not run yet" not in now and "†" not in now
    # another run of the recipe (run-to-run noise: 39.0): greedy_pls stays, marked †, beside the run it compares with
    other = ablation_markdown(base | {"student_cer": 39.0}, [(ABLATIONS[0], None), (ABLATIONS[1], None)], "sl",
                              "make ablations", earlier=now)
    lines = other.splitlines()
    assert "| **recipe** (`runs/bench`) | as it ships | 39.0 | — | 50.0 | 38.0 | 25.0 | 60.0 |" in lines
    assert "| **recipe, earlier run** † (`runs/bench`) | as it ships | 40.0 | — | 50.0 | 38.0 | 25.0 | 60.0 |" in lines
    assert kept.replace("`) |", "`) † |") in lines and "| 42.0 | +5.0 % |" in other
    assert any("`slimipl_lambda4`) † |" in line and "| 44.0 | +10.0 % |" in line for line in lines)
    assert lines[-1].startswith("† Branched off an earlier run")
    # published again from the same run: the same table; a third run drops the rows two runs old
    assert ablation_markdown(base | {"student_cer": 39.0}, [(ABLATIONS[0], None), (ABLATIONS[1], None)], "sl",
                             "make ablations", earlier=other) == other
    third = ablation_markdown(base | {"student_cer": 38.0}, [(ABLATIONS[0], None), (ABLATIONS[1], None)], "sl",
                              "make ablations", earlier=other)
    assert "†" not in third and third.count("not run yet") == 2


def test_the_final_student_is_the_last_rounds_after_its_labeled_only_fine_tune():
    rows = [{"stage": s} for s in ("supervised", "slimipl", "student/finetune", "student/finetune-labeled-ft",
                                   "student/finetune-round2", "student/from_scratch_large-round2-labeled-ft")]
    assert final_student({"rows": rows})["stage"] == "student/finetune-round2"  # the first mode's, as serving's
    assert final_student({"rows": rows[:2]}) is None


def test_ablate_without_a_finished_recipe_run_says_to_run_it_first(smoke_corpus, tmp_path, capsys):
    rc = main(["ablate", "--corpus-dir", smoke_corpus, "--run-dir", str(tmp_path / "none"), "--recipe", "demo"])
    assert rc == 2 and "run it first" in capsys.readouterr().err


def _snapshot(run: Path, names: list[str]) -> dict[str, str]:
    return {n: (run / n).read_text() for n in names}


def test_a_branch_is_the_run_without_the_stages_its_lever_retrains_and_the_students_it_does_not_train(tmp_path):
    run = tmp_path / "run"
    for name in ("supervised", "finetune/sl", "slimipl/sl", "student/finetune", "student/from_scratch",
                 "student/from_scratch-labeled-ft"):
        (run / name).mkdir(parents=True)
        (run / name / "result.json").write_text("{}")
        (run / "eval" / name).mkdir(parents=True)
    (run / "report").mkdir()
    averaged = next(a for a in ABLATIONS if a.name == "averaged_teachers")
    prepare_branch(str(run), str(tmp_path / "branch"), averaged)
    branch = tmp_path / "branch"
    kept = sorted(str(p.relative_to(branch)) for p in branch.rglob("result.json"))
    assert kept == ["student/finetune/result.json", "supervised/result.json"]
    assert not (branch / "eval/finetune").exists() and not (branch / "eval/student/from_scratch").exists()
    assert (branch / "eval/student/finetune").exists() and not (branch / "report").exists()
    assert json.loads((branch / "ablation.json").read_text())["finished"] is False
    assert finished_figures(str(branch)) is None  # prepared, not finished: never passes for the ablation's figures
    assert (run / "finetune/sl/result.json").exists()  # the recipe run itself is untouched
    (run / "supervised/result.json").write_text('{"changed": 1}')
    prepare_branch(str(run), str(branch), averaged)  # prepared once: a rerun does not copy again
    assert (branch / "supervised/result.json").read_text() == "{}"


@pytest.mark.slow
def test_an_ablation_branch_reruns_only_what_its_lever_touches(smoke_corpus, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.ablate import ablations_flow
    from flows.recipe import recipe_flow

    quick = {"max_updates": 6, "eval_every": 3, "save_every": 3, "log_every": 3,
             "optim": {"name": "adamw", "lr": 1e-3, "warmup_updates": 1, "schedule": "constant"}}
    slim = quick | {"pl_cache_size": 2, "unlabeled_ratio": 1, "cropping_warmup_updates": 2,
                    "collapse": {"max_empty_share": 1.0, "max_blank_ratio": 1.0, "min_chars_per_s": 0.0},
                    "pl_eval_max_utterances": 2}
    run = tmp_path / "run"
    cfg = recipe_demo(smoke_corpus, str(run), supervised={"max_updates": 20, "eval_every": 10}, finetune=quick,
                      slimipl=slim, student=quick, labeling_filter={"min_tokens": 0},
                      student_pl_filter={"min_tokens": 0}, self_train_languages=["sl"], labeling_lm=None)
    page = tmp_path / "results.md"
    page.write_text("# Results\n\n## Test CER\n\nthe recipe's table\n")
    kept = ["supervised/result.json", "slimipl/sl/result.json", "student/finetune/result.json"]
    with prefect_test_harness(server_startup_timeout=300):
        recipe_flow(cfg)
        before = _snapshot(run, kept)
        record = ablations_flow(cfg, str(tmp_path / "abl"), ["natural_pl_share"], str(page))
        share = tmp_path / "abl/natural_pl_share"
        assert _snapshot(run, kept) == before  # the recipe run itself is untouched
        # The PL share only touches the student: every earlier stage is the recipe's, reused.
        assert _snapshot(share, kept[:2]) == _snapshot(run, kept[:2])
        assert (share / kept[2]).read_text() != before[kept[2]]
        student = json.loads((share / kept[2]).read_text())
        assert student["extra"]["sources"]["pl"]["rows_read"] > 0 and not student["cached"]
        # A rerun reads the finished ablation back instead of training it again.
        again = _snapshot(share, kept)
        ablations_flow(cfg, str(tmp_path / "abl"), ["natural_pl_share"], str(page))
        assert _snapshot(share, kept) == again
    stored = json.loads((tmp_path / "abl/ablations.json").read_text())
    assert set(stored["ablations"]) == {"natural_pl_share"} and finished_figures(str(share)) is not None
    figures = record["ablations"]["natural_pl_share"]
    assert figures["student"] == "student/finetune" and 0 <= figures["student_cer"]
    assert figures["pl_cer"] >= 0 and figures["overrides"] == {"student_pl_share": None}
    text = page.read_text()
    assert text.startswith("# Results\n\n## Test CER\n\nthe recipe's table\n\n## Ablations\n")
    assert "`natural_pl_share`" in text and "**recipe**" in text and "not run yet" in text
