"""`make ablations`: the recipe's levers switched one at a time (`pipeline.report.ablation.ABLATIONS`), each a branch
of the finished recipe run that reruns as its own mlpl-recipe flow; the table goes into the results page after
every ablation, so an interrupted study shows what it has and a rerun picks up where it stopped."""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.artifacts import ProgressArtifact
from flows.recipe import recipe_flow
from pipeline.config import RecipeConfig, deep_merge
from pipeline.layout import RunLayout
from pipeline.report.ablation import (
    ABLATION_STUDENT,
    ABLATIONS,
    Ablation,
    ablation_figures,
    ablation_markdown,
    ablation_named,
)
from pipeline.report.report import replace_section, student_variants
from storage.files import atomic_write_text, copy_tree, exists, join, read_json, read_text, remove_tree, write_json

log = logging.getLogger("mlpl.ablate")


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
        if not variant.startswith(ABLATION_STUDENT):
            remove_tree(layout.student(variant).url)
            remove_tree(layout.eval(f"student/{variant}"))
    remove_tree(join(branch, "report"))
    write_json(marker, {"base": base_run, "ablation": ablation.name, "overrides": ablation.overrides,
                        "fresh": list(ablation.fresh), "finished": False})


@flow(name="mlpl-ablations", log_prints=True)
def ablations_flow(cfg: RecipeConfig, out_dir: str, names: list[str] | None = None, results: str | None = None,
                   command: str = "mlpl ablate") -> dict[str, Any]:
    """Run each ablation (`names`; None: all) off the finished recipe run `cfg.run_dir` into `<out_dir>/<name>` and
    tabulate every finished one against the recipe (`<out_dir>/ablations.json`, the results page's "Ablations"
    section, an artifact); a rerun trains only what a killed run left unfinished.

    Raises:
        FileNotFoundError: the recipe run has not finished (run it first, e.g. `make reproduce`).
    """
    chosen = ablation_named(names)
    base = ablation_figures(cfg.run_dir, cfg.reference_manifest)
    low = min(base["student_cer_by_language"], default=None, key=lambda lang: _labeled_rows(cfg, lang))
    progress = ProgressArtifact("ablations", f"{len(chosen)} ablations off {cfg.run_dir}")

    def publish() -> str:
        rows = [(a, _finished_figures(join(out_dir, a.name))) for a in ABLATIONS]
        write_json(join(out_dir, "ablations.json"), {"base": base, "ablations": {
            a.name: {"lever": a.lever, "change": a.change, "overrides": a.overrides} | f for a, f in rows if f}})
        table = ablation_markdown(base, rows, low, command)
        if results is not None:
            page = read_text(results) if exists(results) else "# Results\n"
            atomic_write_text(results, replace_section(page, "Ablations", table))
        return table

    for i, ablation in enumerate(chosen):
        progress(i, len(chosen), f"{ablation.name}: {ablation.change}")
        branch = join(out_dir, ablation.name)
        prepare_branch(cfg.run_dir, branch, ablation)
        fields = deep_merge(cfg.model_dump(mode="json"), ablation.overrides)
        log.info("ablation %s (%d/%d): %s", ablation.name, i + 1, len(chosen), ablation.change)
        recipe_flow(RecipeConfig(**(fields | {"run_dir": branch, "student_modes": [ABLATION_STUDENT]})))
        marker = join(branch, "ablation.json")
        write_json(marker, read_json(marker) | {"finished": True,
                                                 "figures": ablation_figures(branch, cfg.reference_manifest)})
        publish()
    progress(len(chosen), len(chosen), "done")
    table = publish()
    create_markdown_artifact(key="ablations", markdown=table, description="the recipe's levers, one run each")
    return read_json(join(out_dir, "ablations.json")) | {"markdown": table}


def _finished_figures(branch: str) -> dict[str, Any] | None:
    """A finished ablation's figures (None while it has not finished: a half-run branch still holds the recipe's
    copied results, which must not pass for the ablation's)."""
    marker = join(branch, "ablation.json")
    record = read_json(marker) if exists(marker) else {}
    return record.get("figures") if record.get("finished") else None


def _labeled_rows(cfg: RecipeConfig, language: str) -> float:
    """The language's labeled rows (the low-resource language has the fewest)."""
    from pipeline.data.rows import read_utterances

    utts, _ = read_utterances(cfg.labeled_manifest, require_text=True, languages=None, language=language)
    return float(len(utts))
