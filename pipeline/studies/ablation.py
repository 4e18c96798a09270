"""Ablations of the recipe (issue 16): each lever switched against the recipe as it ships, one run each. Every
ablation is a branch of the finished recipe run (a copy of its folder), so the stage cache reuses every stage
the lever does not touch and only the rest trains again. One table says what each lever is worth: the final
student's test CER, the low-resource language's, slimIPL's and the pseudo-labels' quality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.layout import RunLayout, variants_of
from pipeline.report.report import (
    STUDENT_TITLES,
    _f,
    build_report,
    hidden_references,
    pl_quality,
    section,
    student_variants,
)
from pipeline.studies.common import write_section
from storage.files import copy_tree, exists, join, read_json, read_text, remove_tree, write_json

ABLATION_STUDENT = "finetune"  # the ablations train the recipe's best student only (half the student time)


@dataclass(frozen=True)
class Ablation:
    """One lever switched: its folder name, what it is, the change, the recipe fields that make it, and the stage
    folders its branch trains afresh (a lever a finished stage cannot take on by resuming, e.g. top-N averaging,
    which needs the dev-scored checkpoints kept while training)."""

    name: str
    lever: str
    change: str
    overrides: dict[str, Any] = field(default_factory=dict)
    fresh: tuple[str, ...] = ()


# In the order they run (most telling first): a run cut short still answers the main questions.
ABLATIONS: tuple[Ablation, ...] = (
    Ablation("greedy_pls", "LM-fused labeling", "char 6-gram LM, beam 50/8 → greedy CTC", {"labeling_lm": None}),
    Ablation("slimipl_lambda4", "slimIPL anchoring", "λ 1 → 4 PL batches per labeled batch",
             {"slimipl": {"unlabeled_ratio": 4}}),
    Ablation("natural_pl_share", "student's PL share", "35 % of batches → natural (audio seconds)",
             {"student_pl_share": None}),
    Ablation("averaged_teachers", "averaged teachers", "best.pt → top-3 average where not worse on dev",
             {"teacher_average_top_n": 3}, fresh=("finetune", "slimipl")),
    Ablation("rounds2", "rounds", "1 → 2 (round 1's student relabels the corpus, a student trains again)",
             {"rounds": 2}),
    Ablation("audit_threshold", "dev-audit PL threshold", "none → per-language confidence where dev CER ≤ 30 %",
             {"pl_max_dev_cer": 30.0}),
    Ablation("temperature_mix", "language mixing", "natural → temperature α 0.5 (supervised stage and student)",
             {"language_mix": {"kind": "temperature", "alpha": 0.5}}),
)


def ablation_named(names: list[str] | None) -> list[Ablation]:
    """The ablations to run, in their order (`names`: a subset; None: all).

    Raises:
        ValueError: for a name that is not an ablation.
    """
    known = {a.name: a for a in ABLATIONS}
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; known: {', '.join(known)}")
    return [a for a in ABLATIONS if names is None or a.name in names]


def final_student(report: dict[str, Any]) -> dict[str, Any] | None:
    """The report row of the student a run ends with (the model the serving stages shrink): the first mode's last
    round's, after its labeled-only fine-tune when there is one."""
    students = {r["stage"].removeprefix("student/"): r for r in report["rows"] if r["stage"].startswith("student/")}
    if not students:
        return None
    variants = variants_of(students, list(STUDENT_TITLES))
    mode = variants[next(iter(students))].mode
    return [r for folder, r in students.items() if variants[folder].mode == mode][-1]


def _labels_of(run_dir: str, stage: str) -> str:
    """The PL corpus a student trained on: round k's for `student/<mode>-round<k>`, else the run's."""
    layout = RunLayout(run_dir)
    folder = stage.removeprefix("student/")
    round_ = variants_of([folder], list(STUDENT_TITLES))[folder].round
    return layout.round_labels(round_) if round_ > 1 else layout.labels


def ablation_figures(run_dir: str, reference_manifest: str | None) -> dict[str, Any]:
    """What one run gives for the ablation table: final student (avg and per-language test CER), slimIPL's avg
    test CER, and the mean PL CER/WER over languages of the labels that student trained on.

    Raises:
        FileNotFoundError: the run has no supervised test metrics (it did not finish).
    """
    from storage.pl import load_pseudo_labels

    report = build_report(run_dir)
    rows = {r["stage"]: r for r in report["rows"]}
    student = final_student(report)
    figures: dict[str, Any] = {
        "run_dir": run_dir, "languages": report["languages"],
        "supervised_cer": rows["supervised"]["cer_all"],
        "slimipl_cer": rows.get("slimipl", {}).get("cer_unlabeled"),
        "student": None if student is None else student["stage"],
        "student_cer": None if student is None else student["cer_all"],
        "student_cer_by_language": {} if student is None else student["cer"],
    }
    labels = _labels_of(run_dir, student["stage"]) if student else None
    if reference_manifest and labels and exists(labels):
        quality = pl_quality(load_pseudo_labels(labels), hidden_references(reference_manifest))
        if quality:
            figures["pl_cer"] = sum(q["cer"] for q in quality.values()) / len(quality)
            figures["pl_wer"] = sum(q["wer"] for q in quality.values()) / len(quality)
    return figures


def _delta(value: float | None, base: float | None) -> str:
    if value is None or base is None or not base:
        return "—"
    return f"{100.0 * (value - base) / base:+.1f} %"


EARLIER = " †"  # marks a row measured against an earlier run of the recipe (the † recipe row)


def _row_prefix(ablation: Ablation) -> str:
    return f"| {ablation.lever} (`{ablation.name}`) |"


def _earlier_rows(earlier: str | None, recipe_row: str) -> tuple[str | None, dict[str, str]]:
    """From the table a results page held: the recipe row its kept rows compare with (None: this run's) and those
    rows by ablation name, marked †. Rows of this run's recipe are kept as they are; when the page's recipe row is
    another run's, its rows are kept marked † beside that row; rows two runs old are dropped."""
    old = [line for line in (earlier or "").splitlines() if line.startswith("| ") and "not run yet" not in line]
    old_recipe = next((line for line in old if line.startswith("| **recipe** ")), None)
    old_earlier = next((line for line in old if line.startswith("| **recipe, earlier run**")), None)
    rows, plain = {}, {}  # every ablation row by name; those measured against the page's own recipe row
    for line in old:
        first = line.split(" | ", 1)[0]  # "| lever (`name`)" with EARLIER after it on a † row
        if line.startswith("| **") or "(`" not in first:
            continue
        name = first.split("(`", 1)[1].split("`)", 1)[0]
        rows[name] = line
        if EARLIER not in first:
            plain[name] = line
    if old_recipe == recipe_row:
        return old_earlier, rows
    if old_recipe is None:
        return None, {}
    dagger = {name: line.replace("`) |", f"`){EARLIER} |", 1) for name, line in plain.items()}
    return old_recipe.replace("| **recipe** ", f"| **recipe, earlier run**{EARLIER} ", 1), dagger


def ablation_markdown(base: dict[str, Any], rows: list[tuple[Ablation, dict[str, Any] | None]],
                      low_resource: str | None, command: str, earlier: str | None = None) -> str:
    """The ablation table: the recipe's row, then one per ablation, with the command. An ablation not finished in
    this study keeps its row from `earlier` (the table this page held): as it is when that table's recipe row is
    this one, marked † beside that table's recipe row when it came from another run of the recipe (a fresh clone
    reruns only what is missing, and says which rows compare with which run); else the row says it has not run."""
    low = f" {low_resource}" if low_resource else ""
    lines = [f"Each row switches one lever of the recipe and reruns what it touches, from a copy of the finished "
             f"recipe run (`{base['run_dir']}`); students: `{ABLATION_STUDENT}` only. Command: `{command}` (an "
             "interrupted run resumes; finished ablations are read back, not retrained, from the study's folder "
             "or from this table).", "",
             f"| ablation | change | final student avg CER | vs recipe | student{low} CER | slimIPL avg CER | "
             "PL CER | PL WER |", "|---|---|---:|---:|---:|---:|---:|---:|"]

    def cells(f: dict[str, Any]) -> str:
        by_lang = f.get("student_cer_by_language", {})
        delta = "—" if f is base else _delta(f.get("student_cer"), base.get("student_cer"))
        return (f"{_f(f.get('student_cer'))} | {delta} | "
                f"{_f(by_lang.get(low_resource)) if low_resource else '—'} | {_f(f.get('slimipl_cer'))} | "
                f"{_f(f.get('pl_cer'))} | {_f(f.get('pl_wer'))} |")

    recipe_row = f"| **recipe** (`{base['run_dir']}`) | as it ships | {cells(base)}"
    earlier_recipe, kept = _earlier_rows(earlier, recipe_row)
    lines.append(recipe_row)
    if earlier_recipe is not None and any(EARLIER in line for line in kept.values()):
        lines.append(earlier_recipe)
    for ablation, figures in rows:
        if figures is not None:
            lines.append(f"{_row_prefix(ablation)} {ablation.change} | {cells(figures)}")
        elif ablation.name in kept:
            lines.append(kept[ablation.name])
        else:
            lines.append(f"{_row_prefix(ablation)} {ablation.change} | not run yet |||||| ")
    lines += ["", "Test CER %; PL CER/WER: mean over languages of the labels the final student trained on, against "
              "the hidden transcripts. Each row changes the recipe's setting to the one named; a row worse than the "
              "recipe's says the recipe's setting pays, a row better says the recipe should take the row's. One run "
              "each: differences under ≈ 1 % are within run-to-run noise."]
    if any(EARLIER in line for line in lines):
        lines.append(f"{EARLIER.strip()} Branched off an earlier run of the same recipe (its row †, which run-to-run "
                     "noise puts apart from this run's); their \"vs recipe\" compares with that row.")
    return "\n".join(lines) + "\n"


def branch_dir(out_dir: str, ablation: Ablation) -> str:
    """An ablation's run folder under the study's folder."""
    return join(out_dir, ablation.name)


def prepare_branch(base_run: str, branch: str, ablation: Ablation) -> None:
    """The ablation's run folder: a copy of the finished recipe run without the stages it must train afresh and
    without the students it does not train; `ablation.json` marks it prepared (a killed preparation is redone)."""
    marker = join(branch, "ablation.json")
    if exists(marker):
        return
    copy_tree(base_run, branch)
    layout = RunLayout(branch)
    for name in ablation.fresh:
        remove_tree(join(branch, name))
        remove_tree(layout.eval(name))
    for variant in student_variants(branch):
        if variant.mode != ABLATION_STUDENT:
            remove_tree(layout.student(variant.folder).url)
            remove_tree(layout.eval(f"student/{variant.folder}"))
    remove_tree(join(branch, "report"))
    write_json(marker, {"base": base_run, "ablation": ablation.name, "overrides": ablation.overrides,
                        "fresh": list(ablation.fresh), "finished": False})


def finish_branch(branch: str, reference_manifest: str | None) -> dict[str, Any]:
    """Mark a branch whose recipe run finished, with its figures (`ablation_figures`); returns them."""
    marker = join(branch, "ablation.json")
    figures = ablation_figures(branch, reference_manifest)
    write_json(marker, read_json(marker) | {"finished": True, "figures": figures})
    return figures


def finished_figures(branch: str) -> dict[str, Any] | None:
    """A finished ablation's figures (None while it has not finished: a half-run branch still holds the recipe's
    copied results, which must not pass for the ablation's)."""
    marker = join(branch, "ablation.json")
    record = read_json(marker) if exists(marker) else {}
    return record.get("figures") if record.get("finished") else None


def publish_study(out_dir: str, base: dict[str, Any], low_resource: str | None, command: str,
                  results: str | None) -> str:
    """Every finished ablation against the recipe: `<out_dir>/ablations.json`, and the table (returned) written
    into the results page's Ablations section when `results` is given."""
    rows = [(a, finished_figures(branch_dir(out_dir, a))) for a in ABLATIONS]
    write_json(join(out_dir, "ablations.json"), {"base": base, "ablations": {
        a.name: {"lever": a.lever, "change": a.change, "overrides": a.overrides} | f for a, f in rows if f}})
    page = read_text(results) if results is not None and exists(results) else "# Results\n"
    table = ablation_markdown(base, rows, low_resource, command, earlier=section(page, "Ablations"))
    return write_section(results, "Ablations", table)


def study_record(out_dir: str) -> dict[str, Any]:
    """`<out_dir>/ablations.json`: the recipe's figures and every finished ablation's."""
    return read_json(join(out_dir, "ablations.json"))
