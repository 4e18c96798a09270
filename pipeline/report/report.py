"""Per-language tables across the recipe's stages (paper Table 1 layout: multilingual → fine-tune → slimIPL)
and the run report (`mlpl report`: paper Tables 2-3 layout, Markdown + JSON + a PNG of dev CER per stage)."""

from __future__ import annotations

import io
import math
import posixpath
from typing import Any

from pipeline.layout import RunLayout, StudentVariant, variants_of
from pipeline.stages.registry import stage_specs
from storage.files import (
    atomic_write_bytes,
    atomic_write_text,
    exists,
    join,
    list_files,
    read_bytes,
    read_json,
    read_text,
    write_json,
)


def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pl_quality_markdown(summary: dict[str, Any]) -> str:
    """PL quality of a slimIPL run at its start and end, whole-utterance vs cropped labeling."""
    ev = summary.get("extra", {}).get("pl_eval", {})
    lines = [
        f"### PL quality, slimIPL {summary.get('extra', {}).get('language', '')}",
        "",
        "| when | labeling | PL CER % | empty PLs % | blank ratio | PL chars/s | confidence |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for when in ("start", "end"):
        for how in ("whole", "crop"):
            st = ev.get(when, {}).get(how)
            if st:
                lines.append(
                    f"| {when} | {how} | {_f(st.get('pl_cer'))} | {_f(100 * st['empty_share'])} | "
                    f"{_f(st['blank_ratio'], 3)} | {_f(st['chars_per_s'], 2)} | {_f(st['confidence'], 3)} |"
                )
    return "\n".join(lines) + "\n"


def recipe_table(supervised: dict[str, dict[str, float]], per_language: dict[str, dict[str, Any]],
                 roles: dict[str, str] | None = None) -> str:
    """Test CER % per stage (rows) and language (columns), as in the paper's Table 1, with slimIPL's relative
    change over fine-tuning and the PL CER on the unlabeled clips at the start and end of slimIPL.

    `supervised` is the multilingual model's `score()` table; `per_language[lang]` holds the test tables
    ("finetune", "slimipl": score() results) and the slimIPL summary ("slimipl_summary").
    """
    roles = roles or {}
    langs = sorted(k for k in supervised if k not in ("all", "macro"))

    def cer(lang: str, stage: str) -> float | None:
        table = supervised if stage == "supervised" else (per_language.get(lang, {}).get(stage) or {})
        return table.get(lang, {}).get("cer")

    def relative(lang: str) -> str:
        ft, sl = cer(lang, "finetune"), cer(lang, "slimipl")
        return f"{100 * (sl - ft) / ft:+.1f} %" if ft and sl is not None else "—"

    def pl_cer(lang: str) -> str:
        ev = (per_language.get(lang, {}).get("slimipl_summary") or {}).get("extra", {}).get("pl_eval", {})
        start, end = ev.get("start", {}).get("whole", {}), ev.get("end", {}).get("whole", {})
        return f"{_f(start.get('pl_cer'))} → {_f(end.get('pl_cer'))}" if start or end else "—"

    header = "| test CER % | " + " | ".join(f"{lang} ({roles[lang]})" if lang in roles else lang for lang in langs)
    rows = [
        header + " |",
        "|---|" + "---:|" * len(langs),
        "| multilingual | " + " | ".join(_f(cer(lang, "supervised")) for lang in langs) + " |",
        "| ↪ fine-tuned on the language | " + " | ".join(_f(cer(lang, "finetune")) for lang in langs) + " |",
        "| ↪ slimIPL | " + " | ".join(_f(cer(lang, "slimipl")) for lang in langs) + " |",
        "| slimIPL vs fine-tuned | " + " | ".join(relative(lang) for lang in langs) + " |",
        "| PL CER % on unlabeled clips, start → end | " + " | ".join(pl_cer(lang) for lang in langs) + " |",
    ]
    return "\n".join(rows) + "\n"


# --- the run report (paper Tables 2-3 layout) -------------------------------------------------------------

# Rows in the order of the paper's tables; per-language stages take each language's own model.
REPORT_STAGES = [
    ("supervised", "supervised multilingual"),
    ("finetune", "↪ per-language fine-tune"),
    ("slimipl", "↪ per-language slimIPL"),
]


def serving_stages() -> list[tuple[str, str]]:
    """(folder, row title) of every stage that declares report rows: the serving-size models (pruned, quantized)."""
    return [(spec.kind, spec.report_title) for spec in stage_specs() if spec.report_title]


def _read_json(url: str) -> Any | None:
    try:
        return read_json(url)
    except FileNotFoundError:
        return None


# The students in the words of the paper's Table 3, in its row order.
STUDENT_TITLES = {
    "finetune": "all PLs, fine-tune (from stage 1)",
    "from_scratch": "all PLs, from scratch, base size",
    "from_scratch_large": "all PLs, from scratch, large",
}


def _student_title(variant: StudentVariant) -> str:
    if variant.labeled_ft:
        return "↪ fine-tuned on labeled data only"
    title = STUDENT_TITLES.get(variant.mode, f"student {variant.mode}")
    return title if variant.round == 1 else f"round {variant.round}: {title}"


def student_variants(run_dir: str) -> list[StudentVariant]:
    """The run's students in the paper's row order: each mode, then its labeled-only fine-tune; others after; later
    rounds after round 1."""
    known = list(STUDENT_TITLES)

    def order(v: StudentVariant) -> tuple:
        return v.round, known.index(v.mode) if v.mode in known else len(known), v.mode, v.labeled_ft

    return sorted(variants_of(RunLayout(run_dir).finished("student"), known).values(), key=order)


def _test_sets(layout: RunLayout) -> list[str]:
    """The extra test sets the run scored its models on (named folders under the supervised model's eval)."""
    return sorted(url.rsplit("/", 2)[-2] for url in list_files(layout.eval("supervised"), "*/metrics.json"))


def build_report(run_dir: str) -> dict[str, Any]:
    """Test CER per stage and language from a run directory, with the averages of the paper's tables.

    Rows: the supervised multilingual base, the same-compute controls (`control/<updates>`), per-language fine-tune,
    per-language slimIPL, each student (and its labeled-only fine-tune), serving-size models. Columns: CER averaged
    over all languages and over those with unlabeled audio (the languages that got a slimIPL stage), CER per
    language, LID accuracy averaged over languages, PL CER on the unlabeled clips (start → end of slimIPL) where
    hidden references were given; each row also has its updates and dev CER (result.json) and its CER on every extra
    test set (`ood`). An average is left empty when a language of its set has no figure for that row, so every
    average is the mean of its row's columns.
    """
    layout = RunLayout(run_dir)
    sup_url = join(layout.eval("supervised"), "metrics.json")
    sup = _read_json(sup_url)
    if sup is None:
        raise FileNotFoundError(f"no supervised test metrics in {sup_url}; run the supervised stage with a test "
                                "manifest first")
    languages = sorted(k for k in sup["metrics"] if k not in ("all", "macro"))
    with_unlabeled = sorted(layout.finished("slimipl"))
    test_sets = _test_sets(layout)
    rows = []

    def figures(metrics_of) -> dict[str, Any]:
        cer, lid = {}, {}
        for lang in languages:
            metrics = metrics_of(lang)
            if metrics and lang in metrics:
                cer[lang], lid[lang] = metrics[lang]["cer"], metrics[lang]["lid_acc"]
        return {"cer": cer, "lid_acc": lid, "cer_all": mean_over(cer, languages),
                "cer_unlabeled": mean_over(cer, with_unlabeled), "lid_acc_mean": mean_over(lid, languages)}

    def add_row(stage: str, title: str, kind: str, metrics_of, results: list[str], pl: dict | None = None,
                **more: Any) -> None:
        trained = [_read_json(url) or {} for url in results]
        rows.append({"stage": stage, "title": title, "kind": kind, "pl_cer": pl or {},
                     "updates": max((r.get("step", 0) for r in trained), default=None),
                     "dev_cer": (trained[0].get("best") or {}).get("metric") if len(trained) == 1 else None,
                     "ood": {t: figures(lambda lang, t=t: metrics_of(lang, t)) for t in test_sets}}
                    | figures(lambda lang: metrics_of(lang, None)) | more)

    def eval_metrics(name: str, test_set: str | None = None, at: RunLayout = layout) -> dict:
        return (_read_json(join(at.eval(name, test_set), "metrics.json")) or {}).get("metrics", {})

    add_row("supervised", "supervised multilingual (the base)", "base",
            lambda lang, t: eval_metrics("supervised", t), [layout.supervised.result])
    for updates, control in sorted(layout.controls().items()):
        add_row(f"control/{updates}", f"supervised, same compute ({updates} updates, labeled only)", "control",
                lambda lang, t, c=control: eval_metrics("supervised", t, c), [control.supervised.result])
    for stage, title in REPORT_STAGES[1:]:
        dirs = layout.finished(stage)
        pl = {}
        for lang in dirs if stage == "slimipl" else ():
            ev = ((_read_json(dirs[lang].result) or {}).get("extra", {}).get("pl_eval", {}))
            start, end = ev.get("start", {}).get("whole", {}), ev.get("end", {}).get("whole", {})
            if start.get("pl_cer") is not None or end.get("pl_cer") is not None:
                pl[lang] = [start.get("pl_cer"), end.get("pl_cer")]
        if dirs:
            add_row(stage, title, "teacher",
                    lambda lang, t, st=stage, d=dirs: eval_metrics(f"{st}/{lang}", t) if lang in d else None,
                    [d.result for d in dirs.values()], pl)
    for variant in student_variants(run_dir):
        add_row(f"student/{variant.folder}", _student_title(variant), "student",
                lambda lang, t, v=variant.folder: eval_metrics(f"student/{v}", t),
                [layout.student(variant.folder).result])
    for stage, title in serving_stages():  # the small serving models made from a finished model (issue 20)
        for name, stage_dir in sorted(layout.finished(stage).items()):
            packed = _read_json(join(stage_dir.url, "packed.json")) or {}
            add_row(f"{stage}/{name}", f"{title} {name}", "serving",
                    lambda lang, t, n=f"{stage}/{name}": eval_metrics(n, t), [stage_dir.result],
                    serving_bytes=packed.get("packed_bytes"), float32_bytes=packed.get("float32_weights_bytes"),
                    serving_checkpoint=packed.get("packed_checkpoint"))
    return {"run_dir": run_dir, "languages": languages, "with_unlabeled": with_unlabeled, "test_sets": test_sets,
            "rows": rows}


def serving_markdown(report: dict[str, Any]) -> str:
    """The serving-size rows (pruned, quantized): size on disk of the checkpoint that serves against the float32
    weights it came from, and the average test CER; empty when the run has none."""
    rows = [r for r in report["rows"] if r.get("serving_bytes")]
    if not rows:
        return ""
    lines = ["| serving model | checkpoint on disk | float32 weights | smaller | avg CER (all) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["float32_bytes"] / r["serving_bytes"] if r.get("float32_bytes") else None
        lines.append(f"| {r['title']} | {r['serving_bytes'] / 1e6:.2f} MB | "
                     f"{_f(r['float32_bytes'] / 1e6 if r.get('float32_bytes') else None, 2)} MB | "
                     f"{_f(ratio)}× | {_f(r['cer_all'])} |")
    return "\n".join(lines) + "\n"


def mean_over(values: dict[str, float], over: list[str]) -> float | None:
    """The mean of `values` over the languages `over`; None when one of them has no figure (or there are none)."""
    if not over or any(values.get(lang) is None for lang in over):
        return None
    return sum(values[lang] for lang in over) / len(over)


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table (rows: stages; columns: averages, languages, LID, PL CER), the base's
    convergence check, and the out-of-domain table when the run has extra test sets."""
    langs, unl = report["languages"], report["with_unlabeled"]
    lines = [
        "| model | updates | avg CER (all) | avg CER (with unlabeled) | " + " | ".join(
            f"{lang}{'*' if lang in unl else ''}" for lang in langs) + " | LID acc % | PL CER % start → end |",
        "|---|---:|---:|---:|" + "---:|" * len(langs) + "---:|---|",
    ]
    for r in report["rows"]:
        pl = ", ".join(f"{lang} {_f(a)} → {_f(b)}" for lang, (a, b) in r["pl_cer"].items()) or "—"
        updates = r["updates"] if r["updates"] and r["kind"] in ("base", "control", "student") else "—"
        lines.append(f"| {r['title']} | {updates} | {_f(r['cer_all'])} | {_f(r['cer_unlabeled'])} | "
                     + " | ".join(_f(r["cer"].get(lang)) for lang in langs)
                     + f" | {_f(r['lid_acc_mean'])} | {pl} |")
    lines.append(f"\nTest CER %. \\* languages with unlabeled audio ({', '.join(unl) or 'none'}). An average is "
                 "empty when one of its languages has no model at that stage. Updates: the stage's own.")
    check = convergence(report)
    if check is not None:
        lines.append(f"\n{check['detail']}")
    text = "\n".join(lines) + "\n"
    if report.get("test_sets"):
        text += f"\nOut of domain (never trained or tuned on):\n\n{ood_markdown(report)}"
    serving = serving_markdown(report)
    return text + (f"\nServing sizes (pruned and quantized models):\n\n{serving}" if serving else "")


def ood_markdown(report: dict[str, Any]) -> str:
    """Each model's CER on every extra test set (averaged over the languages with unlabeled audio) and its change
    against the supervised base (the paper's LibriSpeech table)."""
    sets, base = report["test_sets"], next(r for r in report["rows"] if r["kind"] == "base")
    lines = ["| model | " + " | ".join(f"{t}: avg CER | vs base" for t in sets) + " |",
             "|---|" + "---:|---:|" * len(sets)]
    for r in report["rows"]:
        cells = []
        for t in sets:
            value, ref = r["ood"][t]["cer_unlabeled"], base["ood"][t]["cer_unlabeled"]
            cells += [_f(value), f"{100 * (value - ref) / ref:+.1f} %" if value is not None and ref else "—"]
        lines.append(f"| {r['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nCER % averaged over {', '.join(report['with_unlabeled'])}.\n"


def convergence(report: dict[str, Any]) -> dict[str, Any] | None:
    """The base's "×2 updates" check: its avg dev CER against the same config trained at least twice as long (the
    shortest such same-compute control); converged when that improves it by less than 2 % relative. None when the
    run has no such control."""
    base = next(r for r in report["rows"] if r["kind"] == "base")
    longer = [r for r in report["rows"] if r["kind"] == "control" and base["updates"]
              and r["updates"] >= 2 * base["updates"] and r["dev_cer"] is not None]
    if base["dev_cer"] is None or not longer:
        return None
    ctl = min(longer, key=lambda r: r["updates"])
    gain = 100 * (base["dev_cer"] - ctl["dev_cer"]) / base["dev_cer"]
    holds = gain < 2.0
    return {"student": "supervised", "check": "the base is converged: ×2 updates improve its avg dev CER < 2 %",
            "holds": holds, "gain": gain,
            "detail": f"Convergence check: the base ({base['updates']} updates) has avg dev CER "
                      f"{base['dev_cer']:.2f}; the same config trained {ctl['updates']} updates "
                      f"({ctl['updates'] / base['updates']:.2f}×) has {ctl['dev_cer']:.2f} ({-gain:+.1f} %): "
                      + ("converged (< 2 % better)." if holds else "**not converged** (≥ 2 % better).")}


def dev_curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Validation CER (macro over the stage's dev languages) against updates, per stage and language."""
    layout = RunLayout(run_dir)
    dirs = {}
    for stage, _ in REPORT_STAGES:
        for lang, d in sorted(layout.finished(stage).items(), key=lambda kv: kv[0] or ""):
            dirs[stage if lang is None else f"{stage}/{lang}"] = d
    for variant in student_variants(run_dir):
        dirs[f"student/{variant.folder}"] = layout.student(variant.folder)
    curves = {}
    for name, d in dirs.items():
        evals = _read_json(d.file("dev_evals.json")) or []
        points = [(e["step"], e["metrics"]["macro"]["cer"]) for e in evals if "macro" in e.get("metrics", {})]
        if points:
            curves[name] = points
    return curves


def plot_dev_curves(curves: dict[str, list[tuple[int, float]]], title: str = "") -> bytes:
    """A PNG of validation CER against updates, one curve per stage (like the paper's Figs. 7-8)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("updates in the stage")
    ax.set_ylabel("dev CER %")
    ax.set_title(title or "validation CER per stage")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    buf = io.BytesIO()
    # The curve names ride in a PNG text chunk, so a reader (or a test) can tell what was drawn.
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Description": "curves: " + ", ".join(curves)})
    plt.close(fig)
    return buf.getvalue()


def write_report(run_dir: str) -> dict[str, Any]:
    """Build the report and write `<run>/report/report.{md,json}` and `dev_cer.png`; returns the report with
    its Markdown, the PNG's URL and its bytes."""
    report = build_report(run_dir)
    markdown = report_markdown(report)
    curves = dev_curves(run_dir)
    out = RunLayout(run_dir).report
    write_json(join(out, "report.json"), report | {"dev_curves": curves})
    atomic_write_text(join(out, "report.md"), markdown)
    png, image = join(out, "dev_cer.png"), plot_dev_curves(curves, f"validation CER per stage — {run_dir}")
    atomic_write_bytes(png, image)
    return report | {"markdown": markdown, "plot": png, "plot_png": image, "dev_curves": curves}


def write_recipe_record(run_dir: str, record: dict[str, Any]) -> str:
    """`<run>/report/recipe_run.json`: what a recipe run did (stages, wall times, labels); returns its URL."""
    url = join(RunLayout(run_dir).report, "recipe_run.json")
    write_json(url, record)
    return url


# --- the results page of `make reproduce` -----------------------------------------------------------------


def student_models(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each student's model, by the student's folder: the student or its labeled-only fine-tune, whichever has the
    lower avg dev CER (the choice a user makes without looking at test figures)."""
    rows = {r["stage"].removeprefix("student/"): r for r in report["rows"]
            if r["kind"] == "student" and r["cer_all"] is not None}
    chains: dict[str, list[dict[str, Any]]] = {}
    for folder, variant in variants_of(rows, list(STUDENT_TITLES)).items():
        chains.setdefault(variant.student.folder, []).append(rows[folder])
    return {student: min(rs, key=lambda r: math.inf if r["dev_cer"] is None else r["dev_cer"])
            for student, rs in chains.items()}


def same_compute_control(report: dict[str, Any]) -> dict[str, Any] | None:
    """The report's same-compute control row (the longest, where a study added others), or None."""
    controls = [r for r in report["rows"] if r["kind"] == "control"]
    return max(controls, key=lambda r: r["updates"] or 0) if controls else None


def fair_baseline(report: dict[str, Any]) -> dict[str, Any] | None:
    """The better (lower avg test CER over the languages with unlabeled audio) of the supervised base and the
    same-compute control: what a student must beat for self-training to have paid; None without figures."""
    base = next((r for r in report["rows"] if r["kind"] == "base"), None)
    rows = [r for r in (base, same_compute_control(report)) if r is not None and r["cer_unlabeled"] is not None]
    return min(rows, key=lambda r: r["cer_unlabeled"]) if rows else None


def _below(name: str, check: str, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    """Whether row b's avg CER over the languages with unlabeled audio is below row a's."""
    x, y = (None if r is None else r["cer_unlabeled"] for r in (a, b))
    if x is None or y is None:
        return {"student": name, "check": check, "holds": None, "detail": "no figures"}
    return {"student": name, "check": check, "holds": y < x, "detail": f"avg CER {x:.1f} → {y:.1f} "
                                                                         f"({100 * (y - x) / x:+.1f} %)"}


def orderings(report: dict[str, Any], roles: dict[str, str]) -> list[dict[str, Any]]:
    """The paper's orderings (Table 3: base > all PLs fine-tune > from scratch > from scratch large, in CER over the
    languages with unlabeled audio) on a report's student models (`student_models`), each student against the base
    and the same-compute control, and whether a low-resource language gains the most."""
    rows = {r["stage"]: r for r in report["rows"]}
    base, unl, models = rows.get("supervised"), report["with_unlabeled"], student_models(report)
    control = same_compute_control(report)
    out = []
    chain = [("supervised", base), *((m, models.get(m)) for m in ("finetune", "from_scratch", "from_scratch_large"))]
    present = [(name, r) for name, r in chain if r is not None]
    for (a_name, a), (b_name, b) in zip(present, present[1:], strict=False):
        lower = "the base" if a_name == "supervised" else _student_title(StudentVariant(a_name))
        out.append(_below(b["stage"], f"Table 3: {_student_title(StudentVariant(b_name))} below {lower}", a, b))
    low = [lang for lang in unl if roles.get(lang) == "low"]
    for r in models.values():
        out.append(_below(r["stage"], "below the supervised base", base, r))
        if control is not None:
            out.append(_below(r["stage"], f"below the same-compute control ({control['updates']} updates)", control,
                              r))
        gains = {lang: 100 * (base["cer"][lang] - r["cer"][lang]) / base["cer"][lang]
                 for lang in unl if lang in r["cer"] and base["cer"].get(lang)}
        holds = max(gains, key=gains.get) in low if gains and low and len(unl) > len(low) else None
        out.append({"student": r["stage"], "check": "the low-resource language gains the most", "holds": holds,
                    "detail": ", ".join(f"{lang}{' (low)' if lang in low else ''} {g:+.1f} %"
                                        for lang, g in sorted(gains.items(), key=lambda kv: -kv[1]))
                    or "no figures"})
    return out


# The paper's headline (Table 3) as targets against the better of the base and the same-compute control: the
# from-scratch students this much below it (relative, avg test CER over the languages with unlabeled audio).
SCRATCH_TARGETS = {"from_scratch": 0.10, "from_scratch_large": 0.20}


def recipe_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Whether self-training paid, on a report, always against the better of the base and the same-compute control
    (`fair_baseline`): the base converged (`convergence`), the best student (by dev CER) below that baseline and no
    language's best student worse than the base, the from-scratch students `SCRATCH_TARGETS` below it, out of
    domain every student at or below the base with long clips gaining at least as much as short ones, and slimIPL
    at or below its fine-tune per language (on all languages but one)."""
    rows = {r["stage"]: r for r in report["rows"]}
    base, ft, slim, models = rows.get("supervised"), rows.get("finetune"), rows.get("slimipl"), student_models(report)
    fair = fair_baseline(report)
    if base is None or not models or fair is None:  # no language self-trained: nothing to pay for
        return []
    out = [c for c in [convergence(report)] if c is not None]
    best = min(models.values(), key=lambda r: math.inf if r["dev_cer"] is None else r["dev_cer"])
    out.append(_below(best["stage"], f"best student below the better of base and control ({fair['title']})", fair,
                      best))
    for name, share in SCRATCH_TARGETS.items():
        if name in models and models[name]["cer_unlabeled"] is not None:
            out.append(margin_target(models[name]["stage"], share, fair["cer_unlabeled"], "base and control",
                                     models[name]["cer_unlabeled"]))
    worse = {lang: (base["cer"][lang], c) for lang, c in best["cer"].items()
             if base["cer"].get(lang) is not None and c > base["cer"][lang]}
    out.append({"student": best["stage"], "check": "no language's best student worse than the base",
                "holds": not worse, "detail": ", ".join(f"{k} {a:.1f} → {b:.1f}" for k, (a, b) in worse.items())
                or "every language at or below"})
    out += _ood_targets(report, base, models)
    if ft is not None and slim is not None and slim["cer"]:
        better = [lang for lang, c in slim["cer"].items() if ft["cer"].get(lang) is not None and c <= ft["cer"][lang]]
        out.append({"student": "slimipl", "check": "slimIPL at or below its fine-tune, per language",
                    "holds": len(better) >= max(1, len(slim["cer"]) - 1),
                    "detail": f"{len(better)} of {len(slim['cer'])}: "
                              + ", ".join(f"{k} {ft['cer'][k]:.1f} → {c:.1f}" for k, c in slim["cer"].items())})
    return out


def _ood_targets(report: dict[str, Any], base: dict[str, Any],
                 models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Out of domain, per student model: at or below the base on every test set, and (with ood_short and ood_long)
    the long clips gaining at least as much as the short ones (relative CER change against the base)."""
    out = []
    for r in models.values():
        sets = {t: (base["ood"][t]["cer_unlabeled"], r["ood"][t]["cer_unlabeled"]) for t in report["test_sets"]}
        sets = {t: v for t, v in sets.items() if None not in v}
        if not sets:
            continue
        out.append({"student": r["stage"], "check": "out of domain at or below the base",
                    "holds": all(b <= a for a, b in sets.values()),
                    "detail": ", ".join(f"{t} {a:.1f} → {b:.1f}" for t, (a, b) in sets.items())})
        if {"ood_short", "ood_long"} <= set(sets):
            out.append(long_short_target(r["stage"], sets["ood_long"], sets["ood_short"]))
    return out


def margin_target(student: str, share: float, fair: float, fair_title: str, cer: float) -> dict[str, Any]:
    """Whether a model's avg CER is at least `share` (relative) below `fair`, the better of the base and a control
    (`fair_title` names the two)."""
    gain = (fair - cer) / fair
    return {"student": student, "check": f"≥ {100 * share:.0f} % below the better of {fair_title}",
            "holds": gain >= share, "detail": f"avg CER {fair:.1f} → {cer:.1f} ({-100 * gain:+.1f} %)"}


def long_short_target(student: str, long: tuple[float, float], short: tuple[float, float]) -> dict[str, Any]:
    """Whether the long out-of-domain clips gain at least as much as the short ones: each a (base, model) avg CER
    pair, the gain relative to the base."""
    gl, gs = (100 * (base - model) / base for base, model in (long, short))
    return {"student": student, "check": "out of domain, long clips gain at least as much as short",
            "holds": gl >= gs, "detail": f"long {gl:+.1f} %, short {gs:+.1f} %"}


def orderings_markdown(checks: list[dict[str, Any]], what: str = "paper's ordering") -> str:
    """The ordering checks (or targets: `what`) as a table: holds / fails / not measurable, with the numbers."""
    word = {True: "holds", False: "**fails**", None: "not measurable"}
    lines = [f"| model | {what} | here | numbers |", "|---|---|---|---|"]
    lines += [f"| {c['student']} | {c['check']} | {word[c['holds']]} | {c['detail']} |" for c in checks]
    return "\n".join(lines) + "\n"


def hidden_references(reference_manifest: str) -> dict[str, str]:
    """id → true transcript of the unlabeled clips (the corpus' hidden reference: measurement only)."""
    from storage.manifest import read_manifest

    return {r["id"]: r["text"] for r in read_manifest(reference_manifest)[0]}


def pl_quality(table: Any, references: dict[str, str]) -> dict[str, dict[str, float]]:
    """PL CER/WER (percent) per language of a PL table's rows (`load_pseudo_labels`) against true transcripts."""
    from pipeline.engine.evaluate import score

    rows = [{"language": lang, "reference": references[i], "hypothesis": text, "lid_pred": lang}
            for i, lang, text in zip(table["id"], table["language"], table["text"], strict=True) if i in references]
    return {k: v for k, v in score(rows).items() if k not in ("all", "macro")}


def labels_quality_markdown(run_dir: str, reference_manifest: str | None) -> str:
    """Per language: the labeling decoder and its dev figures (`<run>/lm/<lang>/tuning-*.json` of the labeling
    teacher), and the PL CER/WER of `<run>/labels` against the hidden transcripts beside slimIPL's greedy PL CER
    of the same clips at the end of its stage."""
    from storage.pl import load_pseudo_labels

    layout = RunLayout(run_dir)
    if reference_manifest is None or not exists(layout.labels):
        return "No hidden transcripts or no PL corpus: PL quality not measured.\n"
    df = load_pseudo_labels(layout.labels)
    quality = pl_quality(df, hidden_references(reference_manifest))
    lines = ["| language | decoder | dev CER greedy → LM | PL CER: slimIPL greedy (end) → labels | PL WER |",
             "|---|---|---|---|---:|"]
    pairs: list[tuple[float | None, float | None]] = []
    for lang in sorted(set(df["language"])):
        decoder = sorted(set(df[df["language"] == lang]["decode"]))[0].split(" #")[0]
        tunings = [read_json(u) for u in list_files(join(run_dir, "lm", lang), "tuning-*.json")]
        tuned = [t for t in tunings if t["teacher"] == layout.teacher(lang)]
        dev = f"{tuned[0]['greedy']['cer']:.1f} → {tuned[0]['chosen_dev']['cer']:.1f}" if tuned else "—"
        end = (_read_json(layout.slimipl(lang).result) or {}).get("extra", {}).get("pl_eval", {}).get("end", {})
        greedy = end.get("whole", {}).get("pl_cer")
        cer = quality.get(lang, {}).get("cer")
        ratio = f" ({cer / greedy:.2f}×)" if greedy and cer is not None else ""
        lines.append(f"| {lang} | {decoder} | {dev} | {_f(greedy)} → {_f(cer)}{ratio} | "
                     f"{_f(quality.get(lang, {}).get('wer'))} |")
        pairs.append((greedy, cer))
    pairs = [(g, c) for g, c in pairs if g and c is not None]
    if pairs:
        g, c = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        lines.append(f"| mean | | | {g:.1f} → {c:.1f} ({c / g:.2f}×) | |")
    return "\n".join(lines) + "\n"


# The results page's sections that studies write into it on their own (`replace_section`); a new recipe page keeps
# them.
STUDY_SECTIONS = ("Does more PL audio pay?", "Ablations", "Capacity study", "Serving-size students",
                  "Serving-size students: the final student")


def labeled_share_line(share: dict[str, Any] | None) -> str:
    """The results page's sentence on the labeled data budget (`labeled_fraction`); empty when every row trains."""
    if not share:
        return ""
    kept = ", ".join(f"{lang} {c['kept']} of {c['of']}" for lang, c in share["languages"].items())
    return (f" Labeled data budget: the first {share['fraction']:.3g} of each language's labeled clips ({kept}), "
            "every stage, LM and control trained on them.")


def write_results(path: str, out: dict[str, Any], *, wall_s: float, command: str, machine: str,
                  roles: dict[str, str], reference_manifest: str | None = None) -> str:
    """The results page of a recipe run (table, plot beside it, orderings, targets, PL quality, wall times,
    command); returns it."""
    report = out["report"]
    built = build_report(out["run_dir"])
    checks = orderings(built, roles)
    plot_name = posixpath.basename(path).rsplit(".", 1)[0] + "_dev_cer.png"
    atomic_write_bytes(join(posixpath.dirname(path) or ".", plot_name), read_bytes(report["plot"]))
    walls = "\n".join(f"| {name} | {s:.0f} |" for name, s in out["wall_s"].items())
    stages = out.get("stages", {})
    reused = {name: st.get("stage_wall_s", 0.0) for name, st in stages.items() if st.get("cached")}
    if reused:  # a rerun's wall time is the lookups of what it reused: say what those stages cost when trained
        walls += (f"\n\nReused from an earlier run of the same config (the stage cache): {', '.join(reused)}; "
                  f"training them took {sum(reused.values()) / 60:.1f} min then.")
    if stages:  # what each stage cost whichever run trained it: the whole recipe's time on a clean run
        trained = "\n".join(f"| {name} | {st.get('stage_wall_s', 0.0):.0f} | {'yes' if st.get('cached') else ''} |"
                            for name, st in stages.items())
        total = sum(st.get("stage_wall_s", 0.0) for st in stages.values())
        walls += (f"\n\nTraining time of every stage as the stage cache recorded it (summed over resumes, "
                  f"whichever run trained it):\n\n| stage | train s | reused here |\n|---|---:|---|\n{trained}\n"
                  f"| **total** | {total:.0f} ({total / 3600:.2f} h) | |")
    text = (
        f"# Results: the whole recipe on the `{out.get('corpus', {}).get('name', 'bench')}` corpus\n\n"
        f"Command: `{command}` — {wall_s / 60:.1f} min on {machine}, 2 cores"
        f"{f' (+ {sum(reused.values()) / 60:.1f} min of reused stages, below)' if reused else ''}. "
        f"Run directory `{out['run_dir']}`.{labeled_share_line(out.get('labeled_share'))}\n\n"
        f"## Test CER (paper Tables 2-3 layout)\n\n{report['markdown']}\n"
        f"## Do the paper's orderings hold?\n\n{orderings_markdown(checks)}\n"
        f"## Did self-training pay?\n\nEvery target is measured against the better of the converged base and the "
        f"same-compute control (stage 1's config trained on labeled data alone for the best student's whole path)."
        f"\n\n{orderings_markdown(recipe_targets(built), 'target')}\n"
        f"## Pseudo-labels of the unlabeled audio\n\n{labels_quality_markdown(out['run_dir'], reference_manifest)}\n"
        f"## Validation CER per stage\n\n![validation CER per stage]({plot_name})\n\n"
        f"## Wall time per stage\n\n| stage | wall s |\n|---|---:|\n{walls}\n"
    )
    if exists(path):  # the studies (`mlpl ablate`, `capacity`, `serving`) write their sections separately: keep them
        old = read_text(path)
        for title in STUDY_SECTIONS:
            kept = section(old, title)
            if kept is not None:
                text = replace_section(text, title, kept)
    atomic_write_text(path, text)
    return text


def _section_span(page: str, title: str) -> tuple[int, int, int] | None:
    """Where `page`'s `## <title>` section starts, where its body starts and where it ends (the next `## ` or
    the page's end), or None."""
    head = f"## {title}\n"
    start = page.find(head)
    if start < 0:
        return None
    end = page.find("\n## ", start + len(head))
    return start, start + len(head), len(page) if end < 0 else end


def replace_section(page: str, title: str, body: str) -> str:
    """`page` with the body of its `## <title>` section replaced by `body` (appended at the end when absent)."""
    body = body.strip("\n") + "\n"
    span = _section_span(page, title)
    if span is None:
        return page.rstrip("\n") + f"\n\n## {title}\n\n{body}"
    _, body_start, end = span
    return page[:body_start] + f"\n{body}" + page[end:]


def section(page: str, title: str) -> str | None:
    """The body of `page`'s `## <title>` section (without the blank lines around it), or None."""
    span = _section_span(page, title)
    return None if span is None else page[span[1]:span[2]].strip("\n") + "\n"
