"""The whole recipe as one Prefect flow, `mlpl-recipe` (a thin layer over pipeline/; docs/architecture.md, "Recipe").

supervised → per language with unlabeled audio: fine-tune → slimIPL (the per-language subflow a task runner
would fan out; on 2 cores the languages run one after another) → labeling of every unlabeled row by its
language's best model → student(s) on labeled + PL data (→ labeled-only fine-tune) → the same-compute control
(stage 1's config on labeled data alone for the best student's whole path) → optional serving-size models of the
final student (pruned, quantized) → report. Every stage is
scored on the test set. What passes between stages are small records (URIs, metrics, wall times); each
stage reads its inputs from the run directory.

Each step of the chain is a function of the recipe form, so the `mlpl-stage` deployment runs the same steps one
at a time (`RECIPE_STEPS`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.artifacts import stage_run_name
from flows.label import label_flow
from flows.report import report_task
from flows.train import train_flow
from pipeline.config import RecipeConfig, TrainingConfig
from pipeline.config.decoding import BeamDecoderConfig
from pipeline.data.rows import read_utterances, write_labeled_share
from pipeline.layout import RunLayout, teachers_for_run
from pipeline.report.report import write_recipe_record
from pipeline.stages.control import best_student
from pipeline.stages.lm import labeling_decoders


def scored(cfg: RecipeConfig, stage: TrainingConfig, run_dir: str | None = None, name: str | None = None) -> dict:
    """One stage trained (`train_flow`) and scored on the recipe's test sets, in the run (or another run directory,
    its artifacts called `name`)."""
    return train_flow(stage, run_dir or cfg.run_dir, cfg.test_manifest, cfg.extra_test_manifests, name)


def supervised_step(cfg: RecipeConfig) -> dict:
    """Stage 1: supervised multilingual training, scored on every language."""
    return scored(cfg, cfg.supervised_config())


def slimipl_step(cfg: RecipeConfig, language: str) -> dict:
    """Stage 3 for one language (needs its fine-tuned model); with `slimipl_lm`, the language's LM is built and
    tuned on dev with the fine-tuned model first, and PL refreshes decode with it."""
    decoder = None
    if cfg.slimipl_lm:
        teacher = RunLayout(cfg.run_dir).finetune(language).teacher().url
        found = decoders_task(cfg, {language: teacher})["decoders"].get(language)
        decoder = None if found is None else BeamDecoderConfig(**found)
    return scored(cfg, cfg.slimipl_config(language, decoder))


@flow(name="mlpl-language", log_prints=True, flow_run_name="selftrain-{language}")
def language_flow(cfg: RecipeConfig, language: str) -> dict:
    """The per-language sub-pipeline: fine-tune the multilingual model, then slimIPL from the fine-tuned one."""
    return {"finetune": scored(cfg, cfg.finetune_config(language)),
            "slimipl": slimipl_step(cfg, language)}


def language_step(cfg: RecipeConfig, language: str) -> dict:
    """Stages 2-3 for one language: fine-tune, then slimIPL (needs the run's supervised checkpoint)."""
    return language_flow(cfg, language)


@task(cache_policy=NO_CACHE, task_run_name="lm-and-decoders")
def decoders_task(cfg: RecipeConfig, teachers: dict[str, str]) -> dict:
    """With `labeling_lm`: each labeled language's LM built and its beam search tuned on dev with its teacher;
    the dev figures (greedy vs LM-fused) published as the `decoder-tuning` artifact."""
    decoders, records = labeling_decoders(cfg, teachers, cfg.label_config(teachers).batch)
    lines = ["| language | LM | dev clips | greedy CER / WER | LM-fused CER / WER | decoder |",
             "|---|---|---:|---|---|---|"]
    for lang, r in records.items():
        dev = r.get("dev") or {}
        figures = [f"{d['cer']:.1f} / {d['wer']:.1f}" if d else "—" for d in (dev.get("greedy"), dev.get("beam"))]
        lines.append(f"| {lang} | {r['lm']['unit']} {r['lm']['order']}-gram, {r['lm']['sentences']} sentences | "
                     f"{dev.get('clips', '—')} | {figures[0]} | {figures[1]} | {r['decoder']} |")
    create_markdown_artifact(markdown="\n".join(lines) + "\n", key="decoder-tuning",
                             description=f"labeling LMs and decoders of {cfg.run_dir}")
    return {"decoders": {k: v.model_dump(mode="json") for k, v in decoders.items()}, "records": records}


def label_step(cfg: RecipeConfig, round_: int = 1, teachers: dict[str, str] | None = None) -> dict:
    """Step 4: the unlabeled manifest labeled by each language's best model of the run (or the given teachers: a
    later round's) into the round's PL corpus, with LM-fused beam search where the form asks for it (the LMs built
    and tuned for these teachers first)."""
    teachers = teachers or teachers_for_run(cfg.run_dir)
    decoders = {}
    if cfg.labeling_lm is not None:
        decoders = {k: BeamDecoderConfig(**v) for k, v in decoders_task(cfg, teachers)["decoders"].items()}
    return label_flow(cfg.label_config(teachers, decoders), RunLayout(cfg.run_dir).round_labels(round_))


def _untimed(name: str, fn: Callable, *args):
    return fn(*args)


def student_step(cfg: RecipeConfig, mode: str, labeled_finetune: bool, timed: Callable = _untimed,
                 round_: int = 1) -> dict:
    """Stage 5: one student of a round (and, with `labeled_finetune`, its labeled-only fine-tune after it);
    `timed(name, fn, *args)` runs each training flow (the recipe times them)."""
    st = cfg.student_config(mode, round_, RunLayout(cfg.run_dir).round_labels(round_))
    out = {"student": timed(f"student {st.variant_name()}", scored, cfg, st)}
    if labeled_finetune:
        ft = cfg.labeled_finetune_config(mode, out["student"]["training"]["best_checkpoint"], round_)
        out["labeled_finetune"] = timed(f"student {ft.variant_name()}", scored, cfg, ft)
    return out


def control_step(cfg: RecipeConfig) -> dict:
    """The same-compute control (needs the students): stage 1's config on labeled data alone for the best student's
    whole path, in `<run>/control/<updates>/`, scored like every model."""
    stage, updates = best_student(cfg)
    get_run_logger().info("same-compute control: %d updates, the path of %s", updates, stage)
    return scored(cfg, cfg.control_config(updates), RunLayout(cfg.run_dir).control(updates).run_dir,
                  f"control-{updates}")


def serving_step(cfg: RecipeConfig, timed: Callable = _untimed) -> dict:
    """After the students: the final student pruned (`serving_prune`) and quantized (`serving_bits`), each scored
    on the test set; their packed checkpoints label through the one decode path like any model."""
    final = RunLayout(cfg.run_dir).stage(cfg.final_student_stage()).best
    return {c.stage_name(): timed(c.stage_name(), scored, cfg, c) for c in cfg.serving_configs(final)}


# The steps an operator can run alone from a recipe form (`mlpl-stage`), each given (cfg, language, student mode,
# labeled-only fine-tune or not).
RECIPE_STEPS: dict[str, Callable[[RecipeConfig, str | None, str, bool], dict]] = {
    "supervised": lambda cfg, language, mode, labeled_ft: supervised_step(cfg),
    "finetune": lambda cfg, language, mode, labeled_ft: scored(cfg, cfg.finetune_config(language)),
    "slimipl": lambda cfg, language, mode, labeled_ft: slimipl_step(cfg, language),
    "label": lambda cfg, language, mode, labeled_ft: label_step(cfg),
    "student": lambda cfg, language, mode, labeled_ft: student_step(cfg, mode, labeled_ft),
    "control": lambda cfg, language, mode, labeled_ft: control_step(cfg),
    "serving": lambda cfg, language, mode, labeled_ft: serving_step(cfg),
}
StepName = Literal[tuple(RECIPE_STEPS)]  # the form's dropdown: exactly the keys of RECIPE_STEPS
PER_LANGUAGE_STEPS = ("finetune", "slimipl")


def languages_with_unlabeled(cfg: RecipeConfig, known: list[str]) -> list[str]:
    """The languages that get fine-tune + slimIPL: configured, else those with valid unlabeled rows."""
    if cfg.self_train_languages is not None:
        return list(cfg.self_train_languages)
    utts, _ = read_utterances(cfg.unlabeled_manifest, require_text=False, languages=known)
    return sorted({u.language for u in utts})


def _stage(out: dict) -> dict:
    """The small record a stage hands on: checkpoint URI, updates, wall time, test metrics."""
    summary = out["training"]
    return {"checkpoint": summary["best_checkpoint"], "step": summary["step"], "stage_wall_s": summary["stage_wall_s"],
            "train_audio_s_per_s": summary["train_audio_s_per_s"], "precision": summary["precision"],
            "test": (out.get("test") or {}).get("metrics"), "cached": summary.get("cached", False)}


@flow(name="mlpl-recipe", log_prints=True, flow_run_name=stage_run_name())
def recipe_flow(cfg: RecipeConfig) -> dict:
    """Run every stage of the recipe on one config; a rerun resumes each stage where it stopped and reuses
    each finished stage whose config and inputs are unchanged.

    Args:
        cfg: the recipe config: data manifests, stage presets (paper or tiny), budgets and overrides.
    """
    with RunLayout(cfg.run_dir).recipe_lock(cfg.run_dir_wait_s):
        return _recipe(cfg)


def _recipe(cfg: RecipeConfig) -> dict:
    """The recipe's stages in order, under the run folder's lock."""
    logger = get_run_logger()
    stages: dict[str, dict] = {}
    walls: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        walls[name] = round(time.perf_counter() - t0, 1)
        logger.info("%s finished in %.0f s", name, walls[name])
        return out

    share = None
    if cfg.labeled_fraction < 1.0:
        share = write_labeled_share(cfg.labeled_manifest, cfg.training_labeled_manifest, cfg.labeled_fraction)
        logger.info("labeled data budget %g: %s", cfg.labeled_fraction,
                    ", ".join(f"{lang} {c['kept']} of {c['of']} rows" for lang, c in share["languages"].items()))
    stages["supervised"] = _stage(timed("supervised", supervised_step, cfg))
    for lang in languages_with_unlabeled(cfg, RunLayout(cfg.run_dir).languages()):
        out = timed(f"finetune+slimipl {lang}", language_step, cfg, lang)
        stages[f"finetune/{lang}"], stages[f"slimipl/{lang}"] = _stage(out["finetune"]), _stage(out["slimipl"])
    labels = timed("labeling", label_step, cfg)
    teacher = None  # the model that labels the next round: the last model of this round's first student
    for round_ in range(1, cfg.rounds + 1):
        if round_ > 1:  # the student is multilingual: it labels every language of the run
            langs = RunLayout(cfg.run_dir).languages()
            timed(f"labeling round {round_}", label_step, cfg, round_, {lang: teacher for lang in langs})
        for i, mode in enumerate(cfg.student_modes):
            chain = list(student_step(cfg, mode, cfg.student_labeled_finetune, timed, round_).values())
            for out in chain:
                stages[out["training"]["stage"]] = _stage(out)
            if i == 0:
                teacher = _stage(chain[-1])["checkpoint"]
    if cfg.same_compute_control and cfg.student_modes:
        out = timed("supervised, same compute", control_step, cfg)
        stages[f"control/{out['training']['step']}"] = _stage(out)
    for name, out in serving_step(cfg, timed).items():
        stages[name] = _stage(out)
    report = timed("report", report_task, cfg.run_dir)
    result = {"run_dir": cfg.run_dir, "stages": stages, "wall_s": walls, "report": report,
              "labels": {k: labels[k] for k in ("root", "summary", "units_labeled", "units_skipped", "wall_s")},
              "labeled_share": share}
    write_recipe_record(cfg.run_dir, result)
    create_markdown_artifact(markdown=summary_markdown(result), key="recipe-summary",
                             description=f"checkpoints, shards and wall times of {cfg.run_dir}")
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
