"""`make ablations`: the recipe's levers switched one at a time (`pipeline.studies.ablation.ABLATIONS`), each a branch
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
from pipeline.data.rows import read_utterances
from pipeline.studies.ablation import (
    ABLATION_STUDENT,
    ablation_figures,
    ablation_named,
    branch_dir,
    finish_branch,
    prepare_branch,
    publish_study,
    study_record,
)

log = logging.getLogger("mlpl.ablate")


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
    for i, ablation in enumerate(chosen):
        progress(i, len(chosen), f"{ablation.name}: {ablation.change}")
        branch = branch_dir(out_dir, ablation)
        prepare_branch(cfg.run_dir, branch, ablation)
        fields = deep_merge(cfg.model_dump(mode="json"), ablation.overrides)
        log.info("ablation %s (%d/%d): %s", ablation.name, i + 1, len(chosen), ablation.change)
        recipe_flow(RecipeConfig(**(fields | {"run_dir": branch, "student_modes": [ABLATION_STUDENT]})))
        finish_branch(branch, cfg.reference_manifest)
        publish_study(out_dir, base, low, command, results)
    progress(len(chosen), len(chosen), "done")
    table = publish_study(out_dir, base, low, command, results)
    create_markdown_artifact(key="ablations", markdown=table, description="the recipe's levers, one run each")
    return study_record(out_dir) | {"markdown": table}


def _labeled_rows(cfg: RecipeConfig, language: str) -> float:
    """The language's labeled rows (the low-resource language has the fewest)."""
    utts, _ = read_utterances(cfg.labeled_manifest, require_text=True, languages=None, language=language)
    return float(len(utts))
