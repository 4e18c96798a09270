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
    assert "| supervised multilingual | 28.0 | 32.0 | 28.0 | 24.0 | 32.0 |" in md
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
    assert "| ↪ pruned pathways-imp | 29.0 |" in md
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
    assert [r["stage"] for r in rows] == ["supervised", "finetune", "slimipl", "student/from_scratch",
                                          "student/from_scratch-labeled-ft", "student/finetune"]
    assert [r["title"] for r in rows[3:]] == ["student, from scratch", "↪ + labeled-only fine-tune",
                                              "student, fine-tuned from stage 1"]
    for r in rows[3:]:  # students are scored on every language: both averages are means of their columns
        assert r["cer_all"] == pytest.approx(sum(r["cer"].values()) / 3)
        assert r["cer_unlabeled"] == r["cer"]["sl"]
        assert r["lid_acc_mean"] == pytest.approx(sum(r["lid_acc"].values()) / 3)
    md = report_markdown(report)
    assert "| student, from scratch | 27.3 | 27.0 | 30.0 | 25.0 | 27.0 |" in md
    out = write_report(str(run))
    image = Image.open(io.BytesIO(Path(out["plot"]).read_bytes()))
    drawn = image.text["Description"].removeprefix("curves: ").split(", ")
    assert drawn == list(out["dev_curves"]) == ["supervised", "finetune/es", "finetune/sl", "slimipl/sl",
                                                "student/from_scratch", "student/from_scratch-labeled-ft",
                                                "student/finetune"]
    # The paper's orderings, checked per student: below base on sl; with one language, no "gains the most".
    checks = orderings(report, {"de": "high", "es": "high", "sl": "low"})
    below = [c for c in checks if c["check"].startswith("student below base")]
    assert [c["holds"] for c in below] == [True, True, True] and "32.0 → 27.0" in below[0]["detail"]
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
    assert checks["student below base on the languages with unlabeled audio"]["holds"] is True  # 28 → 24


def _row(stage: str, cer: dict[str, float]) -> dict:
    return {"stage": stage, "cer": cer, "cer_all": sum(cer.values()) / len(cer)}


def test_the_self_training_targets_are_read_off_the_report_with_their_numbers():
    from pipeline.report.report import recipe_targets

    rows = [_row("supervised", {"de": 50.0, "sl": 60.0}), _row("finetune", {"sl": 38.0}),
            _row("slimipl", {"sl": 37.5}), _row("student/finetune", {"de": 45.0, "sl": 46.0}),
            _row("student/finetune-labeled-ft", {"de": 51.0, "sl": 39.0})]
    checks = {c["check"]: c for c in recipe_targets({"rows": rows}, min_gain=0.15)}
    best = checks["best student's avg CER ≥ 15 % below supervised"]
    assert best["student"] == "student/finetune-labeled-ft" and best["holds"] is True  # 55 → 45: -18.2 %
    assert best["detail"].endswith("(-18.2 %)")
    worse = checks["no language's student worse than its supervised model"]
    assert worse["holds"] is False and worse["detail"] == "de 50.0 → 51.0"
    assert checks["best student at or below the per-language fine-tunes"]["holds"] is False  # sl 39 > 38
    assert checks["slimIPL at or below its fine-tune, per language"]["holds"] is True
    assert not recipe_targets({"rows": rows}, min_gain=0.20)[0]["holds"]


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
    assert text.endswith("## Ablations\n\n| ablation | ... |\n\n## Capacity study\n\n### a. depth\n\ncap\n\n"
                         "## Serving-size students\n\nserve\n") and "old page" not in text
    assert (tmp_path / "docs/results_dev_cer.png").read_bytes()[:4] == b"\x89PNG"
