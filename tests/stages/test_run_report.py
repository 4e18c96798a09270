"""The run report: paper Tables 2-3 layout from a run directory, averages, PL CER, and the dev-CER plot."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from flows.cli import main
from pipeline.report.report import build_report, dev_curves, report_markdown, write_report


def _metrics(cers: dict[str, float]) -> dict:
    per = {lang: {"n": 10.0, "cer": c, "wer": 2 * c, "lid_acc": 90.0 + i} for i, (lang, c) in enumerate(cers.items())}
    return {"metrics": per | {"macro": {"cer": sum(cers.values()) / len(cers), "wer": 0.0, "lid_acc": 0.0}}}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _dev(steps: list[int], cer: float) -> list[dict]:
    return [{"step": s, "metrics": {"macro": {"cer": cer - i, "wer": 0, "lid_acc": 0}}} for i, s in enumerate(steps)]


@pytest.fixture
def run(tmp_path) -> Path:
    """A run where es and sl got fine-tunes, and only sl (the language with unlabeled audio) slimIPL."""
    r = tmp_path / "run"
    _write(r / "supervised/result.json", {"stage": "supervised"})
    _write(r / "supervised/dev_evals.json", _dev([500, 1000, 1500], 50.0))
    _write(r / "eval/supervised/metrics.json", _metrics({"de": 28.0, "es": 24.0, "sl": 32.0}))
    for lang, cer in (("es", 23.0), ("sl", 29.0)):
        _write(r / f"finetune/{lang}/result.json", {"stage": f"finetune/{lang}"})
        _write(r / f"finetune/{lang}/dev_evals.json", _dev([100, 200], cer + 2))
        _write(r / f"eval/finetune/{lang}/metrics.json", _metrics({lang: cer}))
    pl_eval = {"start": {"whole": {"pl_cer": 30.4}}, "end": {"whole": {"pl_cer": 28.6}}}
    _write(r / "slimipl/sl/result.json", {"stage": "slimipl/sl", "extra": {"pl_eval": pl_eval}})
    _write(r / "slimipl/sl/dev_evals.json", _dev([100, 200, 300], 30.0))
    _write(r / "eval/slimipl/sl/metrics.json", _metrics({"sl": 28.0}))
    return r


def test_rows_are_stages_and_every_average_is_the_mean_of_its_columns(run):
    report = build_report(str(run))
    assert report["languages"] == ["de", "es", "sl"] and report["with_unlabeled"] == ["sl"]
    rows = {r["stage"]: r for r in report["rows"]}
    assert list(rows) == ["supervised", "finetune", "slimipl"]
    sup, ft, sl = rows["supervised"], rows["finetune"], rows["slimipl"]
    assert sup["cer_all"] == pytest.approx((28.0 + 24.0 + 32.0) / 3) and sup["cer_unlabeled"] == 32.0
    assert sup["lid_acc_mean"] == pytest.approx(sum(sup["lid_acc"].values()) / 3)
    assert ft["cer"] == {"es": 23.0, "sl": 29.0} and ft["cer_all"] is None and ft["cer_unlabeled"] == 29.0
    assert sl["cer_unlabeled"] == 28.0 and sl["pl_cer"] == {"sl": [30.4, 28.6]}
    for r in report["rows"]:  # every average is exactly the mean of the columns it covers
        for key, over in (("cer_all", report["languages"]), ("cer_unlabeled", report["with_unlabeled"])):
            if r[key] is not None:
                assert r[key] == pytest.approx(sum(r["cer"][lang] for lang in over) / len(over))
    md = report_markdown(report)
    assert "| supervised multilingual (the base) | — | 28.0 | 32.0 | 28.0 | 24.0 | 32.0 |" in md
    assert "sl 30.4 → 28.6" in md and "| de | es | sl* |" in md


def test_pruned_and_quantized_models_are_rows_with_their_size_on_disk(run):
    for stage, cer, packed in (("prune/pathways-imp", 30.0, 1_500_000), ("quantize/1bit", 31.0, 1_000_000)):
        _write(run / f"{stage}/result.json", {"stage": stage})
        _write(run / f"{stage}/packed.json", {"packed_bytes": packed, "float32_weights_bytes": 4_800_000,
                                              "packed_checkpoint": f"{stage}/checkpoints/packed.pt"})
        _write(run / f"eval/{stage}/metrics.json", _metrics({"de": cer, "es": cer - 6, "sl": cer + 3}))
    rows = {r["stage"]: r for r in build_report(str(run))["rows"]}
    pruned, quantized = rows["prune/pathways-imp"], rows["quantize/1bit"]
    assert pruned["cer"] == {"de": 30.0, "es": 24.0, "sl": 33.0} and pruned["serving_bytes"] == 1_500_000
    assert quantized["float32_bytes"] == 4_800_000 and quantized["cer_all"] == pytest.approx(31.0 - 1)
    md = report_markdown(build_report(str(run)))
    assert "| ↪ pruned pathways-imp | — | 29.0 |" in md
    assert "| ↪ quantized 1bit | 1.00 MB | 4.80 MB | 4.8× | 30.0 |" in md


def test_the_plot_is_a_valid_png_with_one_curve_per_stage(run):
    from PIL import Image

    out = write_report(str(run))
    assert set(out["dev_curves"]) == {"supervised", "finetune/es", "finetune/sl", "slimipl/sl"}
    assert dev_curves(str(run))["supervised"] == [(500, 50.0), (1000, 49.0), (1500, 48.0)]
    png = Path(out["plot"]).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    image.verify()
    assert image.size[0] > 300 and image.size[1] > 200
    assert json.loads((run / "report/report.json").read_text())["rows"][0]["stage"] == "supervised"


def test_report_cli_prints_the_table_and_says_what_is_missing(run, tmp_path, capsys):
    assert main(["report", "--run-dir", str(run)]) == 0
    assert "↪ per-language slimIPL" in capsys.readouterr().out
    assert (run / "report/report.md").exists() and (run / "report/dev_cer.png").exists()
    assert main(["report", "--run-dir", str(tmp_path / "empty")]) == 2
    assert "no supervised test metrics" in capsys.readouterr().err


def test_student_rows_follow_the_paper_order_and_the_plot_names_one_curve_per_stage(run):
    from PIL import Image

    from pipeline.report.report import orderings

    for variant, cers in (("finetune", {"de": 29.0, "es": 23.5, "sl": 26.0}),
                          ("from_scratch", {"de": 30.0, "es": 25.0, "sl": 27.0}),
                          ("from_scratch-labeled-ft", {"de": 27.0, "es": 24.0, "sl": 25.0})):
        _write(run / f"student/{variant}/result.json", {"stage": f"student/{variant}"})
        _write(run / f"student/{variant}/dev_evals.json", _dev([50, 100], 30.0))
        _write(run / f"eval/student/{variant}/metrics.json", _metrics(cers))
    report = build_report(str(run))
    rows = report["rows"]
    assert [r["stage"] for r in rows] == ["supervised", "finetune", "slimipl", "student/finetune",
                                          "student/from_scratch", "student/from_scratch-labeled-ft"]
    assert [r["title"] for r in rows[3:]] == ["all PLs, fine-tune (from stage 1)", "all PLs, from scratch, base size",
                                              "↪ fine-tuned on labeled data only"]
    for r in rows[3:]:  # students are scored on every language: both averages are means of their columns
        assert r["cer_all"] == pytest.approx(sum(r["cer"].values()) / 3)
        assert r["cer_unlabeled"] == r["cer"]["sl"]
        assert r["lid_acc_mean"] == pytest.approx(sum(r["lid_acc"].values()) / 3)
    md = report_markdown(report)
    assert "| all PLs, from scratch, base size | — | 27.3 | 27.0 | 30.0 | 25.0 | 27.0 |" in md
    out = write_report(str(run))
    image = Image.open(io.BytesIO(Path(out["plot"]).read_bytes()))
    drawn = image.text["Description"].removeprefix("curves: ").split(", ")
    assert drawn == list(out["dev_curves"]) == ["supervised", "finetune/es", "finetune/sl", "slimipl/sl",
                                                "student/finetune", "student/from_scratch",
                                                "student/from_scratch-labeled-ft"]
    # The paper's orderings on each student's model (the student or its labeled-only fine-tune, whichever has the
    # lower dev CER: here neither has one, so the first); with one language, no "gains the most".
    checks = orderings(report, {"de": "high", "es": "high", "sl": "low"})
    below = [c for c in checks if c["check"] == "below the supervised base"]
    assert [c["holds"] for c in below] == [True, True] and "32.0 → 26.0" in below[0]["detail"]
    table3 = [c for c in checks if c["check"].startswith("Table 3")]
    assert [(c["check"], c["holds"]) for c in table3] == [
        ("Table 3: all PLs, fine-tune (from stage 1) below the base", True),
        ("Table 3: all PLs, from scratch, base size below all PLs, fine-tune (from stage 1)", False)]
    assert {c["holds"] for c in checks if "gains the most" in c["check"]} == {None}


def test_the_low_resource_ordering_is_checked_across_languages_with_unlabeled_audio(run):
    from pipeline.report.report import orderings

    _write(run / "slimipl/es/result.json", {"stage": "slimipl/es"})
    _write(run / "eval/slimipl/es/metrics.json", _metrics({"es": 22.0}))
    _write(run / "student/finetune/result.json", {"stage": "student/finetune"})
    _write(run / "eval/student/finetune/metrics.json", _metrics({"de": 28.0, "es": 18.0, "sl": 30.0}))
    checks = {c["check"]: c for c in orderings(build_report(str(run)), {"es": "high", "sl": "low", "de": "high"})}
    gain = checks["the low-resource language gains the most"]
    assert gain["holds"] is False and gain["detail"].startswith("es +25.0 %, sl (low) +6.2 %")
    assert checks["below the supervised base"]["holds"] is True  # 32 → 30


def _student(run: Path, variant: str, cers: dict[str, float], dev_cer: float, ood: dict[str, dict] | None = None):
    _write(run / f"student/{variant}/result.json", {"stage": f"student/{variant}", "step": 100,
                                                   "best": {"metric": dev_cer, "step": 100}})
    _write(run / f"eval/student/{variant}/metrics.json", _metrics(cers))
    for test_set, c in (ood or {}).items():
        _write(run / f"eval/student/{variant}/{test_set}/metrics.json", _metrics(c))


def test_the_targets_compare_with_the_better_of_the_converged_base_and_the_same_compute_control(run):
    from pipeline.report.report import convergence, fair_baseline, recipe_targets, student_models

    ood = {"ood_short": {"de": 60.0, "es": 50.0, "sl": 70.0}, "ood_long": {"de": 80.0, "es": 70.0, "sl": 90.0}}
    _write(run / "supervised/result.json", {"stage": "supervised", "step": 1000, "best": {"metric": 40.0}})
    for test_set, c in ood.items():
        _write(run / f"eval/supervised/{test_set}/metrics.json", _metrics(c))
    # The control: the base's config on labeled data for 2000 updates (the students' path), 1.5 % better on dev.
    control = run / "control/2000"
    _write(control / "supervised/result.json", {"stage": "supervised", "step": 2000, "best": {"metric": 39.4}})
    _write(control / "eval/supervised/metrics.json", _metrics({"de": 27.0, "es": 23.0, "sl": 30.0}))
    for test_set, c in ood.items():
        _write(control / f"eval/supervised/{test_set}/metrics.json", _metrics({k: v - 1 for k, v in c.items()}))
    _student(run, "from_scratch", {"de": 24.0, "es": 20.0, "sl": 26.0}, 35.0,
             {"ood_short": {"de": 55.0, "es": 45.0, "sl": 66.0}, "ood_long": {"de": 60.0, "es": 50.0, "sl": 63.0}})
    _student(run, "from_scratch-labeled-ft", {"de": 23.0, "es": 19.0, "sl": 28.0}, 36.0)  # worse on dev: not chosen
    _student(run, "from_scratch_large", {"de": 22.0, "es": 18.0, "sl": 25.0}, 34.0,
             {"ood_short": {"de": 55.0, "es": 45.0, "sl": 71.0}, "ood_long": {"de": 60.0, "es": 50.0, "sl": 80.0}})
    report = build_report(str(run))
    rows = {r["stage"]: r for r in report["rows"]}
    assert list(rows)[:2] == ["supervised", "control/2000"] and report["test_sets"] == ["ood_long", "ood_short"]
    assert rows["control/2000"]["title"] == "supervised, same compute (2000 updates, labeled only)"
    assert rows["control/2000"]["ood"]["ood_long"]["cer_unlabeled"] == 89.0
    assert fair_baseline(report)["stage"] == "control/2000"  # sl 30 < 32
    assert {k: r["stage"] for k, r in student_models(report).items()} == {
        "from_scratch": "student/from_scratch", "from_scratch_large": "student/from_scratch_large"}
    check = convergence(report)
    assert check["holds"] is True and check["gain"] == pytest.approx(1.5)
    assert "the same config trained 2000 updates (2.00×) has 39.40 (-1.5 %): converged" in check["detail"]
    checks = {(c["student"], c["check"]): c for c in recipe_targets(report)}
    scratch = checks[("student/from_scratch", "≥ 10 % below the better of base and control")]
    assert scratch["holds"] is True and scratch["detail"] == "avg CER 30.0 → 26.0 (-13.3 %)"
    large = checks[("student/from_scratch_large", "≥ 20 % below the better of base and control")]
    assert large["holds"] is False and large["detail"] == "avg CER 30.0 → 25.0 (-16.7 %)"
    best = checks[("student/from_scratch_large", "best student below the better of base and control "
                                                 "(supervised, same compute (2000 updates, labeled only))")]
    assert best["holds"] is True
    # Out of domain: the base is at 70 (short) and 90 (long) for sl.
    assert checks[("student/from_scratch", "out of domain at or below the base")]["holds"] is True
    long = checks[("student/from_scratch", "out of domain, long clips gain at least as much as short")]
    assert long["holds"] is True and long["detail"] == "long +30.0 %, short +5.7 %"
    assert checks[("student/from_scratch_large", "out of domain at or below the base")]["holds"] is False  # 71 > 70
    assert checks[("slimipl", "slimIPL at or below its fine-tune, per language")]["holds"] is True
    md = report_markdown(report)
    assert "Convergence check: the base (1000 updates) has avg dev CER 40.00" in md
    assert "| all PLs, from scratch, base size | 63.0 | -30.0 % | 66.0 | -5.7 % |" in md  # ood_long, then ood_short
    # A control shorter than twice the base checks nothing.
    _write(control / "supervised/result.json", {"stage": "supervised", "step": 1500, "best": {"metric": 39.4}})
    assert convergence(build_report(str(run))) is None


def test_the_results_page_says_what_a_rerun_reused_and_keeps_the_studies_written_into_it(run, tmp_path):
    from pipeline.report.report import write_results

    out = {"run_dir": str(run), "report": write_report(str(run)), "wall_s": {"supervised": 1.0, "student": 300.0},
           "stages": {"supervised": {"cached": True, "stage_wall_s": 600.0}, "student": {"cached": False}}}
    page = tmp_path / "docs/results.md"
    page.parent.mkdir()
    page.write_text("# old page\n\n## Ablations\n\n| ablation | ... |\n\n## Wall time per stage\n\nold\n\n"
                    "## Capacity study\n\n### a. depth\n\ncap\n\n## Serving-size students\n\nserve\n")
    text = write_results(str(page), out, wall_s=301.0, command="make reproduce", machine="cpu", roles={})
    assert "— 5.0 min on cpu, 2 cores (+ 10.0 min of reused stages, below)." in text
    assert "Reused from an earlier run of the same config (the stage cache): supervised; training them took " \
           "10.0 min then." in text
    assert "| supervised | 600 | yes |\n| student | 0 |  |\n| **total** | 600 (0.17 h) | |" in text
    assert text.endswith("## Ablations\n\n| ablation | ... |\n\n## Capacity study\n\n### a. depth\n\ncap\n\n"
                         "## Serving-size students\n\nserve\n") and "old page" not in text
    assert (tmp_path / "docs/results_dev_cer.png").read_bytes()[:4] == b"\x89PNG"
    assert "Labeled data budget" not in text  # every labeled clip trained
    share = {"fraction": 1 / 3, "languages": {"es": {"kept": 50, "of": 150}, "sl": {"kept": 10, "of": 30}}}
    text = write_results(str(page), out | {"labeled_share": share}, wall_s=301.0, command="make reproduce",
                         machine="cpu", roles={})
    assert ("Labeled data budget: the first 0.333 of each language's labeled clips (es 50 of 150, sl 10 of 30), "
            "every stage, LM and control trained on them.") in text
