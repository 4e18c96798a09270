"""Does more PL audio pay? (the regime of the paper's Table 3: far more pseudo-labeled than labeled audio), and the
levers of the from-scratch student, branched off a finished recipe run (`make reproduce`).

Every variant is the recipe's from-scratch student (base size), followed by its labeled-only fine-tune (the one of
the two with the lower dev CER is the variant's model), with one thing changed:
- PL audio: only the first `ratio` × (a high-resource language's labeled hours) of each language's PLs (the rows
  of the lowest ids, so the shares nest); the recipe's own student reads all of them (the corpus's ratio);
- the levers: the PL share of updates, twice the student's own budget (against a control trained as long), and
  greedy PLs instead of LM-fused ones (the same teachers relabel the corpus greedy).
Each is compared with the recipe run's base and the same-compute control of its path, on test and out of domain.
The base's budget is shown as the stopping rule chose it: the config at half the budget, the budget, the
control's twice the budget and, when that doubling still gains 2 % or more, the config at four times the budget
(the rule's next step).

Teachers, PL corpus, base and control are the recipe run's and never retrained here; the study's runs go to
`out_dir` (a run directory of students, its greedy PL corpus, its longer control), its record to
`out_dir/datasize.json` after every variant, so a killed study resumes where it stopped.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RecipeConfig, StudentConfig, recipe_preset
from pipeline.corpus.build import read_card
from pipeline.engine.evaluate import has_rows, run_evaluate
from pipeline.engine.stage_cache import StageResult
from pipeline.layout import RunLayout, StudentVariant, teachers_for_run
from pipeline.report.report import (
    SCRATCH_TARGETS,
    build_report,
    convergence,
    hidden_references,
    long_short_target,
    margin_target,
    mean_over,
    orderings_markdown,
    pl_quality,
    student_models,
)
from pipeline.stages.label import run_label
from pipeline.stages.student import run_student
from pipeline.stages.supervised import run_supervised
from pipeline.studies.common import labeled_hours, write_section
from storage.files import (
    copy_tree,
    exists,
    join,
    read_json,
    write_json,
)
from storage.pl import load_pseudo_labels

log = logging.getLogger("mlpl.datasize")

SECTION = "Does more PL audio pay?"
PLOT = "results_datasize.png"


@dataclass(frozen=True)
class Variant:
    """One from-scratch student of the study: its name, what it changes, its student config fields, its PL corpus
    ("recipe" or "greedy"), the PL ratio it reads (None: every PL) and the recipe's student it changes (the one at
    the teacher's size, or the larger one)."""

    name: str
    what: str
    fields: dict[str, Any] = field(default_factory=dict)
    labels: str = "recipe"
    ratio: float | None = None
    mode: str = "from_scratch"


@dataclass
class DataSizeStudy:
    """Where the study reads the corpus and the finished recipe run, and keeps its own runs."""

    corpus_dir: str
    run_dir: str
    out_dir: str
    recipe: str = "bench"
    ratios: tuple[float, ...] = (1.0, 3.0, 10.0)
    overrides: dict[str, Any] = field(default_factory=dict)  # fields of the recipe form the run was made with

    def config(self) -> RecipeConfig:
        """The recipe run's config (its students' budgets, presets and manifests)."""
        return recipe_preset(self.recipe, self.corpus_dir, self.run_dir, **self.overrides)

    def reference_hours(self) -> float:
        """Labeled hours of a high-resource language (their mean): the unit of a PL ratio."""
        hours = labeled_hours(self.config().training_labeled_manifest)
        roles = {lang: v["role"] for lang, v in read_card(self.corpus_dir)["languages"].items()}
        high = [h for lang, h in hours.items() if roles.get(lang) == "high"] or list(hours.values())
        return sum(high) / len(high)

    def variants(self, levers: bool = False) -> list[Variant]:
        """The data sizes, or the levers (`make datasize` and `make levers`; on 2 cores each part takes at most
        about 2 h, the larger student with twice its budget the longest)."""
        if not levers:
            return [Variant(f"pl{r:g}x".replace(".", "p"),  # a folder name: 0.5 → pl0p5x
                            f"{r:g}× a high-resource language's labeled hours of PL audio per language",
                            {"pl_max_hours_per_language": r * self.reference_hours()}, ratio=r) for r in self.ratios]
        cfg = self.config()

        def doubled(mode: str) -> tuple[str, dict[str, Any]]:  # a student's own budget (and eval cadence) ×2
            own = cfg.student_config(mode)
            return (f"own budget {own.max_updates} → {2 * own.max_updates} updates",
                    {"max_updates": 2 * own.max_updates, "eval_every": 2 * own.eval_every})

        large_what, large_fields = doubled("from_scratch_large")
        return [
            Variant("pl-natural", f"PL share of updates {cfg.student_pl_share} → natural (each source's share of "
                                  "audio seconds, the paper's pooling)", {"source_weights": None}),
            Variant("budget2x", *doubled("from_scratch")),
            Variant("greedy-pls", "PLs by greedy CTC instead of LM-fused beam search (same teachers)",
                    labels="greedy"),
            # The paper's larger student (doubled width) under-trains at the teacher's budget more than the one at
            # its size does: measured at the budget that made that one pay.
            Variant("large-budget2x", f"the larger student (doubled width), {large_what}", large_fields,
                    mode="from_scratch_large"),
        ]

    def test_sets(self) -> dict[str, str]:
        """The test sets every model is scored on: test, and the extra ones the corpus has."""
        cfg = self.config()
        return {"test": cfg.test_manifest} | {k: v for k, v in cfg.extra_test_manifests.items() if has_rows(v)}


def scored(study: DataSizeStudy, at: RunLayout, stage: str, result: StageResult) -> dict[str, Any]:
    """A trained stage's record: updates, dev CER and test / out-of-domain CER per language of its best model."""
    cer = {}
    for name, manifest in study.test_sets().items():
        metrics = run_evaluate(result.best_checkpoint, manifest, at.eval(stage, None if name == "test" else name))
        cer[name] = {lang: m["cer"] for lang, m in metrics["metrics"].items() if lang not in ("all", "macro")}
    return {"stage": stage, "updates": result.step, "dev_cer": result.best["metric"], "cer": cer}


def greedy_labels(study: DataSizeStudy) -> str:
    """The corpus labeled greedy by the recipe run's teachers, into the study's own PL corpus (resumable)."""
    root = join(study.out_dir, "labels-greedy")
    cfg = study.config().label_config(teachers_for_run(study.run_dir))
    run_label(cfg.model_copy(update={"decoders": {}}), root)
    return root


def student_configs(study: DataSizeStudy, variant: Variant, labels_root: str) -> tuple[StudentConfig, StudentConfig]:
    """A variant's student (the recipe's from-scratch one it names, changed) and its labeled-only fine-tune."""
    cfg = study.config()
    student = StudentConfig(**cfg.student_config(variant.mode).model_dump() | variant.fields | {
        "variant": variant.name, "labels_root": labels_root,
        "init_checkpoint": RunLayout(study.run_dir).supervised.best})
    best = RunLayout(study.out_dir).student(variant.name).best
    ft = cfg.labeled_finetune_config(variant.mode, best).model_copy(
        update={"variant": StudentVariant(variant.name, labeled_ft=True).folder})
    return student, ft


def run_variant(study: DataSizeStudy, variant: Variant) -> dict[str, Any]:
    """Train (or reuse) a variant's student and its labeled-only fine-tune, score both; the variant's record."""
    labels = greedy_labels(study) if variant.labels == "greedy" else RunLayout(study.run_dir).labels
    out = RunLayout(study.out_dir)
    chain = []
    for stage_cfg in student_configs(study, variant, labels):
        log.info("data-size study: %s (%s)", stage_cfg.stage_name(), variant.what)
        result = run_student(stage_cfg, study.out_dir)
        chain.append(scored(study, out, stage_cfg.stage_name(), result)
                     | {"pl_audio_s": result.extra["sources"]["pl"]["audio_s"]})
    base = study.config().supervised_config().max_updates
    return {"name": variant.name, "what": variant.what, "ratio": variant.ratio, "labels": labels,
            "pl_audio_s": chain[0]["pl_audio_s"], "path": base + sum(c["updates"] for c in chain), "chain": chain,
            "model": min(chain, key=lambda c: math.inf if c["dev_cer"] is None else c["dev_cer"])}


def control(study: DataSizeStudy, updates: int) -> dict[str, Any]:
    """The same-compute control for a path, trained in the study folder; a copy of the recipe run's when it has one
    (the stage cache reuses the copy when its config matches, and never retrains the recipe run's own)."""
    at, recipe = RunLayout(study.out_dir).control(updates), RunLayout(study.run_dir).controls().get(updates)
    if recipe is not None and not exists(at.run_dir):
        copy_tree(recipe.run_dir, at.run_dir)
    result = run_supervised(study.config().control_config(updates), at.run_dir)
    return scored(study, at, "supervised", result)


def half_base(study: DataSizeStudy) -> dict[str, Any]:
    """The base's config at half its budget: the step of the doubling before the budget the rule chose."""
    sup = study.config().supervised_config()
    half = max(1, sup.max_updates // 2)
    cfg = sup.model_copy(update={"max_updates": half, "eval_every": max(1, sup.eval_every // 2)})
    at = RunLayout(join(study.out_dir, "base-half"))
    return scored(study, at, "supervised", run_supervised(cfg, at.run_dir))


def pl_quality_ratio(study: DataSizeStudy) -> dict[str, dict[str, float]]:
    """PL CER per language of the recipe's LM-fused labels and of the study's greedy ones (same teachers, clips)."""
    cfg, greedy = study.config(), join(study.out_dir, "labels-greedy")
    if cfg.reference_manifest is None or not exists(greedy):
        return {}
    refs = hidden_references(cfg.reference_manifest)
    lm = pl_quality(load_pseudo_labels(RunLayout(study.run_dir).labels), refs)
    gr = pl_quality(load_pseudo_labels(greedy), refs)
    return {lang: {"lm": lm[lang]["cer"], "greedy": gr[lang]["cer"]} for lang in sorted(lm) if lang in gr}


def run_datasize_study(study: DataSizeStudy, levers: bool = False, only: list[str] | None = None,
                       on_saved: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train (or reuse) the data sizes with the half-budget base, or the levers, then the controls of paths the
    recipe run lacks (every variant first: a control as long as a doubled budget takes hours); save the record
    after each part, call `on_saved` (the CLI publishes the results section there) and return it."""
    url = join(study.out_dir, "datasize.json")
    record: dict[str, Any] = read_json(url) if exists(url) else {"variants": {}, "controls": {}}
    walls = record.setdefault("wall_s", {})

    def save() -> None:
        write_json(url, record)
        if on_saved is not None:
            on_saved()

    def timed(name: str, fn, *args) -> Any:
        # A part reused from an earlier run of the study keeps the time it took when it trained.
        t0 = time.perf_counter()
        out = fn(*args)
        walls[name] = max(walls.get(name, 0.0), round(time.perf_counter() - t0, 1))
        return out

    if not levers:
        record["half_base"] = timed("base at N/2", half_base, study)
        save()
    chosen = [v for v in study.variants(levers) if not only or v.name in only]
    for variant in chosen:
        record["variants"][variant.name] = timed(variant.name, run_variant, study, variant)
        save()
    for path in dict.fromkeys(record["variants"][v.name]["path"] for v in chosen):
        if str(path) not in record["controls"]:
            record["controls"][str(path)] = timed(f"control {path}", control, study, path)
            save()
    if not levers:
        check = convergence(build_report(study.run_dir))
        if check is not None and not check["holds"]:  # the rule's next doubling: the base's config at 4 N
            n4 = 4 * study.config().supervised_config().max_updates
            record["controls"][str(n4)] = timed("base at 4N", control, study, n4)
            save()
    record["pl_quality"] = pl_quality_ratio(study)
    save()
    return record


# --- the results page section ------------------------------------------------------------------------------------


def _vs(value: float | None, ref: float | None) -> str:
    return f"{100 * (value - ref) / ref:+.1f} %" if value is not None and ref else "—"


def _cells(cer: dict[str, dict[str, float]], langs: list[str], sets: list[str]) -> dict[str, float | None]:
    return {t: mean_over(cer.get(t, {}), langs) for t in sets}


def study_rows(study: DataSizeStudy, record: dict[str, Any]) -> dict[str, Any]:
    """Every model the section shows, with its avg CER over the languages with unlabeled audio per test set: the
    recipe run's base, its controls and its from-scratch student, the study's controls and variants."""
    report = build_report(study.run_dir)
    # the languages with unlabeled audio (the slimIPL ones), else every language (a run without slimIPL)
    langs, sets = report["with_unlabeled"] or report["languages"], ["test", *report["test_sets"]]

    def of_report(r: dict[str, Any]) -> dict[str, float | None]:
        return {"test": mean_over(r["cer"], langs)} | {t: mean_over(r["ood"][t]["cer"], langs)
                                                       for t in report["test_sets"]}

    controls = {r["updates"]: of_report(r) for r in report["rows"] if r["kind"] == "control"}
    controls |= {int(u): _cells(c["cer"], langs, sets) for u, c in record["controls"].items()}
    base = next(r for r in report["rows"] if r["kind"] == "base")
    recipe = student_models(report).get("from_scratch")
    variants = {name: {"cells": _cells(v["model"]["cer"], langs, sets)} | v for name, v in record["variants"].items()}
    return {"languages": langs, "sets": sets, "base": base, "base_cells": of_report(base), "controls": controls,
            "recipe": recipe, "recipe_cells": None if recipe is None else of_report(recipe), "variants": variants,
            "report": report}


def _convergence_lines(rows: dict[str, Any], record: dict[str, Any]) -> list[str]:
    base, half = rows["base"], record.get("half_base")
    n = base["updates"]
    lines = ["| budget | updates | avg dev CER | vs the step before |", "|---|---:|---:|---:|"]
    steps = [("N/2 (this study)", half["updates"], half["dev_cer"])] if half else []
    steps.append(("N (the base)", n, base["dev_cer"]))
    # the doublings past N: the recipe run's controls, then the study's own (the base's config at 4 N)
    longer = {r["updates"]: (f"{r['updates'] / n:.2f} N (the recipe's control)", r["dev_cer"])
              for r in rows["report"]["rows"] if r["kind"] == "control" and r["updates"] >= 2 * n}
    for u, c in record.get("controls", {}).items():
        if int(u) % n == 0 and (int(u) // n) & (int(u) // n - 1) == 0:  # a doubling of N; a lever's control is not
            longer.setdefault(int(u), (f"{int(u) / n:.2f} N (this study)", c["dev_cer"]))
    steps += [(what, u, cer) for u, (what, cer) in sorted(longer.items())]
    for i, (what, updates, cer) in enumerate(steps):
        shown = "—" if cer is None else f"{cer:.2f}"
        lines.append(f"| {what} | {updates} | {shown} | {_vs(cer, steps[i - 1][2]) if i else '—'} |")
    lines += ["", "Stopping rule: the base trains N updates, the smallest budget of a doubling sequence whose doubling "
              "improves the avg dev CER by less than 2 % relative (cosine schedule to the budget each time). "
              + _rule_verdict(steps)]
    return lines


def _rule_verdict(steps: list[tuple[str, int, float | None]]) -> str:
    """Which budget the stopping rule picks from the doublings measured, or how far the last one still gains."""
    # (updates, doubled updates, % the doubling improves the dev CER) for each measured doubling
    doublings = [(a[1], b[1], 100 * (a[2] - b[2]) / a[2]) for a, b in zip(steps, steps[1:], strict=False)
                 if a[2] is not None and b[2] is not None and b[1] == 2 * a[1]]
    for n, _, gain in doublings:
        if gain < 2.0:
            how = f"gains {gain:.1f} %" if gain >= 0 else f"makes it {-gain:.1f} % worse"
            return f"The rule picks {n} updates: doubling it {how}."
    if not doublings:
        return "No doubling of the base's budget measured: the rule is not checked."
    n, doubled, gain = doublings[-1]
    return (f"**Not converged at any budget measured**: the last doubling ({n} → {doubled} updates) still gains "
            f"{gain:.1f} %.")


def datasize_markdown(study: DataSizeStudy, record: dict[str, Any], command: str, machine: str) -> tuple[str, bytes]:
    """The section's Markdown and its plot (avg test CER against PL audio, base and control as lines)."""
    rows = study_rows(study, record)
    sets, base_cells = rows["sets"], rows["base_cells"]
    path = rows["report"]["rows"][0]["updates"]
    header = "| model | PL audio per language | whole path (updates) | " + " | ".join(
        f"{t}: avg CER | vs base | vs its control" for t in sets) + " |"
    walls = ", ".join(f"{k} {v / 60:.1f} min" for k, v in record.get("wall_s", {}).items())
    lines = [f"Commands: `make datasize` (the data sizes and the base at N/2) and `make levers` (the levers); this "
             f"section last written by `{command}` on {machine}, 2 cores. Branched off `{study.run_dir}` (its base, "
             f"teachers, PLs and control); every student is the recipe's from-scratch one at the teacher's size "
             f"(large-budget2x: its larger one), followed by its labeled-only fine-tune (the one with the lower dev "
             f"CER reports). CER % averaged over {', '.join(rows['languages'])}. Wall time of each part: "
             f"{walls or '—'}.", "",
             "### The base's budget", "",
             *_convergence_lines(rows, record), "", "### PL audio: 0× to the corpus's all", "", header,
             "|---|---:|---:|" + "---:|---:|---:|" * len(sets)]

    def row(title: str, pl: str, updates: int | None, cells: dict[str, float | None], own: bool = False) -> str:
        ctl = {} if own else rows["controls"].get(updates) or {}  # a control is not compared with itself
        return (f"| {title} | {pl} | {updates or '—'} | " + " | ".join(
            f"{cells[t]:.1f} | {_vs(cells[t], base_cells[t])} | {_vs(cells[t], ctl.get(t))}" if cells[t] is not None
            else "— | — | —" for t in sets) + " |")

    lines.append(row("supervised base (labeled only)", "0×", path, base_cells))
    for updates, cells in sorted(rows["controls"].items()):
        lines.append(row(f"same-compute control ({updates} updates, labeled only)", "0×", updates, cells, own=True))
    # The PL audio a student read per language, as a multiple of a high-resource language's labeled hours.
    per_language = 3600 * study.reference_hours() * len(rows["languages"])
    points = []
    for v in rows["variants"].values():
        if v["ratio"] is not None:
            points.append((v["pl_audio_s"] / per_language, v["cells"]["test"]))
            lines.append(row(f"from scratch, {v['name']}", f"{points[-1][0]:.1f}×", v["path"], v["cells"]))
    if rows["recipe"] is not None:
        stage = "student/" + StudentVariant("from_scratch").folder  # the recipe's student (not its labeled-only ft)
        read = read_json(join(study.run_dir, stage, "result.json"))["extra"]["sources"]["pl"]["audio_s"]
        points.append((read / per_language, rows["recipe_cells"]["test"]))
        lines.append(row(f"from scratch, all PLs (the recipe's {rows['recipe']['stage']})", f"{points[-1][0]:.1f}×",
                         study.config().path_updates("from_scratch"), rows["recipe_cells"]))
    lines += ["", f"![avg test CER against PL audio]({PLOT})", "", _grows(points), "", "### Levers", ""]
    levers = [v for v in rows["variants"].values() if v["ratio"] is None]
    if levers:
        lines += [header.replace("PL audio per language", "change"), "|---|---|---:|" + "---:|---:|---:|" * len(sets),
                  *(row(v["name"], v["what"], v["path"], v["cells"]) for v in levers), "",
                  "The recipe's targets on each lever's model (what `Did self-training pay?` checks on the recipe's "
                  "own students), against the better of the base and the lever's own same-compute control:", "",
                  orderings_markdown(lever_targets(rows, study.variants(levers=True)), "target").rstrip()]
    else:
        lines.append("Not measured yet: `make levers` trains them.")
    lines += ["", *_pl_lines(record.get("pl_quality") or {})]
    control_cells = rows["controls"].get(study.config().path_updates("from_scratch"), {})
    return "\n".join(lines) + "\n", _plot(points, base_cells["test"], control_cells.get("test"))


def lever_targets(rows: dict[str, Any], variants: list[Variant]) -> list[dict[str, Any]]:
    """The recipe's targets (`SCRATCH_TARGETS`, out of domain) on each lever's model: its margin below the better of
    the base and the control of its own path (avg test CER), and out of domain the long clips gaining at least as
    much as the short ones against the base."""
    modes, base, out = {v.name: v.mode for v in variants}, rows["base_cells"], []
    for v in rows["variants"].values():
        if v["ratio"] is not None or base.get("test") is None or v["cells"].get("test") is None:
            continue
        ctl = (rows["controls"].get(v["path"]) or {}).get("test")
        fair, fair_name = min((r for r in ((base["test"], "base"), (ctl, f"control {v['path']}")) if r[0] is not None),
                              key=lambda r: r[0])
        share = SCRATCH_TARGETS[modes.get(v["name"], "from_scratch")]
        out.append(margin_target(v["name"], share, fair, f"base and its control ({fair_name})", v["cells"]["test"]))
        long, short = ((base.get(t), v["cells"].get(t)) for t in ("ood_long", "ood_short"))
        if all(b and m is not None for b, m in (long, short)):
            out.append(long_short_target(v["name"], long, short))
    return out


def _grows(points: list[tuple[float, float | None]]) -> str:
    pts = sorted((r, c) for r, c in points if c is not None)
    if len(pts) < 2:
        return "Too few data sizes measured to say whether the gain grows with data."
    grows = all(b[1] < a[1] for a, b in zip(pts, pts[1:], strict=False))
    trend = " → ".join(f"{c:.1f} ({r:.1f}×)" for r, c in pts)
    return (f"Avg test CER with more PL audio: {trend}: "
            + ("**the gain grows with data** at every step." if grows else "the gain does **not** grow at every step."))


def _pl_lines(quality: dict[str, dict[str, float]]) -> list[str]:
    if not quality:
        return []
    lines = ["PL CER of the corpus (hidden transcripts), same teachers: LM-fused labels against greedy ones.", "",
             "| language | greedy | LM-fused | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {lang} | {q['greedy']:.1f} | {q['lm']:.1f} | {q['lm'] / q['greedy']:.2f}× |"
              for lang, q in quality.items()]
    g = sum(q["greedy"] for q in quality.values()) / len(quality)
    m = sum(q["lm"] for q in quality.values()) / len(quality)
    return lines + [f"| mean | {g:.1f} | {m:.1f} | {m / g:.2f}× |", ""]


def _plot(points: list[tuple[float, float | None]], base: float | None, ctl: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    pts = sorted((r, c) for r, c in points if c is not None)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="from-scratch student")
    for value, label, style in ((base, "supervised base", "--"), (ctl, "same-compute control", ":")):
        if value is not None:
            ax.axhline(value, linestyle=style, color="grey", label=label)
    ax.set_xlabel("PL audio per language (× a high-resource language's labeled hours)")
    ax.set_ylabel("avg test CER %")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def publish_datasize(study: DataSizeStudy, results: str | None, command: str, machine: str) -> str:
    """The section from the study's record, written into the results page (its plot beside it)."""
    url = join(study.out_dir, "datasize.json")
    record = read_json(url) if exists(url) else {"variants": {}, "controls": {}}
    text, png = datasize_markdown(study, record, command, machine)
    return write_section(results, SECTION, text, {PLOT: png})
