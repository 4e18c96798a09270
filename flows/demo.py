"""`make demo` as one Prefect flow on the embedded default (local Prefect, local files): build the demo corpus,
then run the whole recipe (`mlpl-recipe`) on it with the budgets of `recipe_demo` (≤ 15 min on 2 CPU cores)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.recipe import recipe_flow
from flows.supervised import build_corpus_task
from pipeline.config import RECIPE_PRESETS


@flow(name="mlpl-demo", log_prints=True)
def demo_flow(
    corpus_dir: str = "data/demo",
    run_dir: str = "runs/demo",
    corpus: str = "demo",
    seed: int = 0,
    text_dir: str | None = None,
    recipe: str = "demo",
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Build the corpus, then run the recipe on it (`overrides`: fields of the recipe config)."""
    card = build_corpus_task(corpus, corpus_dir, seed, text_dir)
    cfg = RECIPE_PRESETS[recipe](corpus_dir, run_dir, **({"seed": seed} | (overrides or {})))
    return recipe_flow(cfg) | {"corpus": card}
