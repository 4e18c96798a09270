"""`make demo` as one Prefect flow on the embedded default (local Prefect, local files): build the demo corpus,
then run the whole recipe (`mlpl-recipe`) on it with the budgets of `recipe_demo` (≤ 15 min on 2 CPU cores)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import ProgressArtifact
from flows.recipe import recipe_flow
from pipeline.config import recipe_preset
from pipeline.corpus.build import build_corpus, corpus_preset


@task(cache_policy=NO_CACHE, retries=1)
def build_corpus_task(preset: str, out_dir: str, seed: int = 0, text_dir: str | None = None) -> dict:
    """Synthesize the multilingual mini corpus (clips already on disk are kept)."""
    progress = ProgressArtifact("corpus-build", f"building the {preset} corpus")
    cfg = corpus_preset(preset).model_copy(update={"seed": seed})
    return build_corpus(cfg, out_dir, text_dir=text_dir, on_progress=progress)


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
    cfg = recipe_preset(recipe, corpus_dir, run_dir, **({"seed": seed} | (overrides or {})))
    return recipe_flow(cfg) | {"corpus": card}
