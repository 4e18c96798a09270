"""Per-language tables across the recipe's stages (paper Table 1 layout: multilingual → fine-tune → slimIPL)
and the run report (`mlpl report`: paper Tables 2-3 layout, Markdown + JSON + a PNG of dev CER per stage)."""

from __future__ import annotations

import io
import math
from typing import Any

from storage.files import atomic_write_bytes, atomic_write_text, exists, join, list_files, read_json, write_json


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


def _read_json(url: str) -> Any | None:
    try:
        return read_json(url)
    except FileNotFoundError:
        return None


def _stage_dirs(run_dir: str, stage: str) -> dict[str | None, str]:
    """{None: dir} for a pooled stage, {lang: dir} for a per-language one; only stages that ran."""
    if exists(join(run_dir, stage, "result.json")):
        return {None: join(run_dir, stage)}
    out = {}
    for url in list_files(join(run_dir, stage), "*/result.json"):
        lang_dir = url.rsplit("/", 1)[0]
        out[lang_dir.rsplit("/", 1)[1]] = lang_dir
    return out


def build_report(run_dir: str) -> dict[str, Any]:
    """Test CER per stage and language from a run directory, with the averages of the paper's tables.

    Columns: CER averaged over all languages and over those with unlabeled audio (the languages that got a
    slimIPL stage), CER per language, LID accuracy averaged over languages, PL CER on the unlabeled clips
    (start → end of slimIPL) where hidden references were given. An average is left empty when a language
    of its set has no figure for that row, so every average is the mean of its row's columns.
    """
    sup = _read_json(join(run_dir, "eval", "supervised", "metrics.json"))
    if sup is None:
        raise FileNotFoundError(f"no supervised test metrics in {run_dir}/eval/supervised/metrics.json; "
                                "run the supervised stage with a test manifest first")
    languages = sorted(k for k in sup["metrics"] if k not in ("all", "macro"))
    with_unlabeled = sorted(_stage_dirs(run_dir, "slimipl"))
    rows = []
    for stage, title in REPORT_STAGES:
        dirs = _stage_dirs(run_dir, stage)
        if not dirs:
            continue
        cer, lid, pl = {}, {}, {}
        for lang in languages:
            if None in dirs:
                metrics = sup["metrics"] if stage == "supervised" else (
                    _read_json(join(run_dir, "eval", stage, "metrics.json")) or {}).get("metrics", {})
            elif lang in dirs:
                metrics = (_read_json(join(run_dir, "eval", stage, lang, "metrics.json")) or {}).get("metrics", {})
            else:
                continue
            if lang in metrics:
                cer[lang], lid[lang] = metrics[lang]["cer"], metrics[lang]["lid_acc"]
            if stage == "slimipl" and lang in dirs:
                ev = ((_read_json(join(dirs[lang], "result.json")) or {}).get("extra", {}).get("pl_eval", {}))
                start, end = ev.get("start", {}).get("whole", {}), ev.get("end", {}).get("whole", {})
                if start.get("pl_cer") is not None or end.get("pl_cer") is not None:
                    pl[lang] = [start.get("pl_cer"), end.get("pl_cer")]
        rows.append({
            "stage": stage, "title": title, "cer": cer, "lid_acc": lid, "pl_cer": pl,
            "cer_all": _mean(cer, languages), "cer_unlabeled": _mean(cer, with_unlabeled),
            "lid_acc_mean": _mean(lid, languages),
        })
    return {"run_dir": run_dir, "languages": languages, "with_unlabeled": with_unlabeled, "rows": rows}


def _mean(values: dict[str, float], over: list[str]) -> float | None:
    if not over or any(values.get(lang) is None for lang in over):
        return None
    return sum(values[lang] for lang in over) / len(over)


def report_markdown(report: dict[str, Any]) -> str:
    """The report as one Markdown table (rows: stages; columns: averages, languages, LID, PL CER)."""
    langs, unl = report["languages"], report["with_unlabeled"]
    lines = [
        "| model | avg CER (all) | avg CER (with unlabeled) | " + " | ".join(
            f"{lang}{'*' if lang in unl else ''}" for lang in langs) + " | LID acc % | PL CER % start → end |",
        "|---|---:|---:|" + "---:|" * len(langs) + "---:|---|",
    ]
    for r in report["rows"]:
        pl = ", ".join(f"{lang} {_f(a)} → {_f(b)}" for lang, (a, b) in r["pl_cer"].items()) or "—"
        lines.append(f"| {r['title']} | {_f(r['cer_all'])} | {_f(r['cer_unlabeled'])} | "
                     + " | ".join(_f(r["cer"].get(lang)) for lang in langs)
                     + f" | {_f(r['lid_acc_mean'])} | {pl} |")
    lines.append(f"\nTest CER %. \\* languages with unlabeled audio ({', '.join(unl) or 'none'}). An average is "
                 "empty when one of its languages has no model at that stage.")
    return "\n".join(lines) + "\n"


def dev_curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Validation CER (macro over the stage's dev languages) against updates, per stage and language."""
    curves = {}
    for stage, _ in REPORT_STAGES:
        for lang, d in sorted(_stage_dirs(run_dir, stage).items(), key=lambda kv: kv[0] or ""):
            evals = _read_json(join(d, "dev_evals.json")) or []
            points = [(e["step"], e["metrics"]["macro"]["cer"]) for e in evals if "macro" in e.get("metrics", {})]
            if points:
                curves[stage if lang is None else f"{stage}/{lang}"] = points
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
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_report(run_dir: str) -> dict[str, Any]:
    """Build the report and write `<run>/report/report.{md,json}` and `dev_cer.png`; returns the report with
    its Markdown and the PNG's URL."""
    report = build_report(run_dir)
    markdown = report_markdown(report)
    curves = dev_curves(run_dir)
    out = join(run_dir, "report")
    write_json(join(out, "report.json"), report | {"dev_curves": curves})
    atomic_write_text(join(out, "report.md"), markdown)
    png = join(out, "dev_cer.png")
    atomic_write_bytes(png, plot_dev_curves(curves, f"validation CER per stage — {run_dir}"))
    return report | {"markdown": markdown, "plot": png, "dev_curves": curves}
