"""The demo recipe as one Prefect flow on the embedded default (local Prefect, local files).

corpus → supervised multilingual model → per language with unlabeled audio: fine-tune → slimIPL → test
scoring of every stage → one per-language table (Markdown file and artifact) → the unlabeled audio
pseudo-labeled by each language's best model into `<run>/labels` (Parquet table + WebDataset shards).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.label import label_flow
from flows.report import report_task
from flows.selftrain import language_flow
from flows.supervised import build_corpus_task, supervised_flow
from pipeline.config import finetune_tiny, label_tiny, slimipl_tiny, supervised_tiny
from pipeline.label import default_teachers
from pipeline.report import recipe_table
from storage.files import atomic_write_text, join


@flow(name="mlpl-demo", log_prints=True)
def demo_flow(
    corpus_dir: str = "data/demo",
    run_dir: str = "runs/demo",
    corpus: str = "demo",
    seed: int = 0,
    max_updates: int | None = None,
    text_dir: str | None = None,
    finetune_overrides: dict[str, Any] | None = None,
    slimipl_overrides: dict[str, Any] | None = None,
) -> dict:
    """Build the corpus, train the multilingual model, fine-tune + slimIPL each language with unlabeled audio."""
    logger = get_run_logger()
    card = build_corpus_task(corpus, corpus_dir, seed, text_dir)
    m = join(corpus_dir, "manifests")
    labeled, dev, test, unlabeled = (join(m, f"{s}.jsonl") for s in ("labeled", "dev", "test", "unlabeled"))
    overrides = {"max_updates": max_updates} if max_updates else {}
    sup = supervised_flow(supervised_tiny(labeled, dev, seed=seed, **overrides), run_dir, test_manifest=test)
    with_unlabeled = [lang for lang, v in card["splits"]["unlabeled"].items() if v["clips"] > 0]
    for lang in card["languages"]:
        if lang not in with_unlabeled:
            logger.info("%s has no unlabeled audio: no fine-tune or slimIPL (its multilingual model stays its "
                        "teacher)", lang)
    per_language: dict[str, dict] = {}
    for lang in with_unlabeled:
        ft = finetune_tiny(lang, labeled, dev, seed=seed, **(finetune_overrides or {}))
        sl = slimipl_tiny(lang, labeled, unlabeled, dev, seed=seed,
                          reference_manifest=join(corpus_dir, "hidden", "unlabeled_reference.jsonl"),
                          **(slimipl_overrides or {}))
        out = language_flow(ft, sl, run_dir, test)
        per_language[lang] = {
            "finetune": out["finetune"]["test"]["metrics"],
            "slimipl": out["slimipl"]["test"]["metrics"],
            "finetune_summary": out["finetune"]["training"],
            "slimipl_summary": out["slimipl"]["training"],
        }
    roles = {lang: info["role"] for lang, info in card["languages"].items()}
    table = recipe_table(sup["test"]["metrics"], per_language, roles)
    atomic_write_text(join(run_dir, "report", "recipe.md"), "### Test CER per stage\n\n" + table)
    create_markdown_artifact(markdown=table, key="demo-recipe-table", description="test CER per language and stage")
    teachers = default_teachers(run_dir, list(card["languages"]))
    labels = label_flow(label_tiny(unlabeled, teachers), join(run_dir, "labels"))
    report = report_task(run_dir)
    return {"supervised": sup, "languages": per_language, "table": table, "corpus": card, "labels": labels,
            "report": report}
