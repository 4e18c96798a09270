"""The whole recipe as one Prefect flow, `mlpl-recipe` (a thin layer over pipeline/; docs/architecture.md, "Recipe").

supervised → per language with unlabeled audio: fine-tune → slimIPL (the per-language subflow a task runner
would fan out; on 2 cores the languages run one after another) → labeling of every unlabeled row by its
language's best model → student(s) on labeled + PL data (→ labeled-only fine-tune) → report. Every stage is
scored on the test set. What passes between stages are small records (URIs, metrics, wall times); each
stage reads its inputs from the run directory.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.artifacts import stage_run_name
from flows.label import label_flow
from flows.report import report_task
from flows.selftrain import language_flow
from flows.student import student_flow
from flows.supervised import supervised_flow
from pipeline.config import RecipeConfig
from pipeline.data import read_utterances
from pipeline.label import default_teachers
from pipeline.modeling import load_trained
from storage.files import join, write_json


def languages_with_unlabeled(cfg: RecipeConfig, known: list[str]) -> list[str]:
    """The languages that get fine-tune + slimIPL: configured, else those with valid unlabeled rows."""
    if cfg.self_train_languages is not None:
        return list(cfg.self_train_languages)
    utts, _ = read_utterances(cfg.unlabeled_manifest, require_text=False, languages=known)
    return sorted({u.language for u in utts})


def _stage(summary: dict, test: dict | None) -> dict:
    """The small record a stage hands on: checkpoint URI, updates, wall time, test metrics."""
    return {"checkpoint": summary["best_checkpoint"], "step": summary["step"], "stage_wall_s": summary["stage_wall_s"],
            "train_audio_s_per_s": summary["train_audio_s_per_s"], "precision": summary["precision"],
            "test": (test or {}).get("metrics"), "cached": summary.get("cached", False)}


@flow(name="mlpl-recipe", log_prints=True, flow_run_name=stage_run_name(""))
def recipe_flow(cfg: RecipeConfig) -> dict:
    """Run every stage of the recipe on one config; a rerun resumes each stage where it stopped and reuses
    each finished stage whose config and inputs are unchanged.

    Args:
        cfg: the recipe config: data manifests, stage presets (paper or tiny), budgets and overrides.
    """
    logger = get_run_logger()
    run, test = cfg.run_dir, cfg.test_manifest
    stages: dict[str, dict] = {}
    walls: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        walls[name] = round(time.perf_counter() - t0, 1)
        logger.info("%s finished in %.0f s", name, walls[name])
        return out

    sup = timed("supervised", supervised_flow, cfg.supervised_config(), run, test)
    stages["supervised"] = _stage(sup["training"], sup.get("test"))
    languages = load_trained(sup["training"]["best_checkpoint"]).languages
    for lang in languages_with_unlabeled(cfg, languages):
        out = timed(f"finetune+slimipl {lang}", language_flow, cfg.finetune_config(lang), cfg.slimipl_config(lang),
                    run, test)
        stages[f"finetune/{lang}"] = _stage(out["finetune"]["training"], out["finetune"].get("test"))
        stages[f"slimipl/{lang}"] = _stage(out["slimipl"]["training"], out["slimipl"].get("test"))
    labels = timed("labeling", label_flow, cfg.label_config(default_teachers(run, languages)), join(run, "labels"))
    for mode in cfg.student_modes:
        st_cfg = cfg.student_config(mode)
        out = timed(f"student {st_cfg.stage_name()}", student_flow, st_cfg, run, test)
        stages[f"student/{st_cfg.stage_name()}"] = _stage(out["training"], out.get("test"))
        if cfg.student_labeled_finetune:
            ft_cfg = cfg.labeled_finetune_config(mode, out["training"]["best_checkpoint"])
            out = timed(f"student {ft_cfg.stage_name()}", student_flow, ft_cfg, run, test)
            stages[f"student/{ft_cfg.stage_name()}"] = _stage(out["training"], out.get("test"))
    report = timed("report", report_task, run)
    result = {"run_dir": run, "stages": stages, "wall_s": walls, "report": report,
              "labels": {k: labels[k] for k in ("root", "summary", "units_labeled", "units_skipped", "wall_s")}}
    write_json(join(run, "report", "recipe_run.json"), result)
    create_markdown_artifact(markdown=summary_markdown(result), key="recipe-summary",
                             description=f"checkpoints, shards and wall times of {run}")
    return result


def summary_markdown(result: dict) -> str:
    """Where a recipe run's outputs are: each stage's checkpoint URI, whether it was reused, its wall time."""
    lines = [f"### Recipe run `{result['run_dir']}`", "", "| stage | checkpoint | updates | reused | wall s |",
             "|---|---|---:|---|---:|"]
    for name, st in result["stages"].items():
        lines.append(f"| {name} | `{st['checkpoint']}` | {st['step']} | {'yes' if st['cached'] else 'no'} | "
                     f"{st['stage_wall_s']:.0f} |")
    labels = result["labels"]
    lines += ["", f"Pseudo-labels: `{labels['root']}` (table `pl/`, WebDataset shards `shards/pl-<lang>-*.tar`); "
              f"{labels['units_labeled']} units labeled now, {labels['units_skipped']} reused.",
              "Flow wall time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["wall_s"].items())]
    return "\n".join(lines) + "\n"
