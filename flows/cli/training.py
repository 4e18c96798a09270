"""`mlpl train`, `finetune`, `slimipl`, `student` (one `StageCommand` table), a command for every other stage a
module of pipeline/stages/ declares (`prune`, `quantize`: flags from its config), and `mlpl evaluate`. Each trains
its stage's config (preset + flags) with progress bars, resumable."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flows.cli.common import Subparsers, progress_bar, stage_config

Flags = Callable[[argparse.ArgumentParser], None]
ConfigArgs = Callable[[argparse.Namespace], tuple[tuple[Any, ...], dict[str, Any]]]


@dataclass(frozen=True)
class StageCommand:
    """The hand-written flags of one of the recipe's first four stages: how its flags become its preset's
    arguments and fields, its own flags, and what it prints after the dev table (from the config and the result).
    Its name, help and preset kind are its stage's (`pipeline.stages.registry`)."""

    name: str
    config_args: ConfigArgs
    flags: Flags
    summary: Callable[[Any, Any], str] | None = None


def train_stage(cfg, args: argparse.Namespace):
    """Run a training stage with progress bars; print its dev table, rate and best checkpoint; return its result."""
    from pipeline.engine.evaluate import format_table
    from pipeline.stages.registry import run_stage

    with progress_bar() as update:
        result = run_stage(cfg, args.run_dir, resume=args.resume, on_progress=update)
    if result.dev_metrics:
        print(format_table(result.dev_metrics, f"{cfg.stage_name()} dev at update {result.step}"))
    print(f"{result.train_audio_s_per_s} audio-s/s over {result.train_wall_s} s (stage {result.stage_wall_s} s); "
          f"best: {result.best_checkpoint}")
    return result


def run_stage_command(args: argparse.Namespace) -> int:
    """Every training command: the stage's config from its preset and the flags, trained, then its summary."""
    spec, cmd = args.stage_spec, args.stage_command
    if cmd is None:  # flags from the config: the preset with the fields given
        preset_args = ()
        fields = {name: getattr(args, name) for name in declared_flags(spec.config) if getattr(args, name) is not None}
    else:
        preset_args, fields = cmd.config_args(args)
    cfg = stage_config(spec.kind, args, *preset_args, **fields)
    result = train_stage(cfg, args)
    summary = cmd.summary if cmd is not None else spec.summary
    if summary is not None:
        print(summary(cfg, result))
    return 0


def stage_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every training stage: preset, update budget, threads, overrides, resume."""
    p.add_argument("--preset", default="tiny", help="tiny (CPU) | paper (default: tiny)")
    p.add_argument("--max-updates", type=int, default=None, help="number of updates")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. optim.lr=0.001")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the stage's checkpoints/last.pt when present (default: on)")


def language_stage_arguments(p: argparse.ArgumentParser, *, init: str) -> None:
    """A per-language stage's data flags (its language, manifests, run directory, starting checkpoint)."""
    p.add_argument("--language", required=True, help="language code, e.g. sl")
    p.add_argument("--train", required=True, help="labeled manifest (only the language's rows are used)")
    p.add_argument("--dev", default=None, help="dev manifest (only the language's rows are used)")
    p.add_argument("--run-dir", required=True, help="run directory (any fsspec URL)")
    p.add_argument("--init", default=None, help=f"starting checkpoint (default: {init})")


def _manifests(p: argparse.ArgumentParser, *, run_dir: str = "run directory (any fsspec URL)",
               train: str = "labeled manifest (every language)", dev: str = "dev manifest") -> None:
    """--train, --dev and --run-dir."""
    p.add_argument("--train", required=True, help=train)
    p.add_argument("--dev", default=None, help=dev)
    p.add_argument("--run-dir", required=True, help=run_dir)


# --- stage 1: supervised multilingual training ----------------------------------------------------------------------
def _train_flags(p: argparse.ArgumentParser) -> None:
    _manifests(p, train="labeled manifest (JSONL or Parquet, any fsspec URL)",
               dev="dev manifest for periodic validation")
    p.add_argument("--model", default=None, help="model preset override: tiny | base | large")


def _train_config(a: argparse.Namespace) -> tuple[tuple[Any, ...], dict[str, Any]]:
    from pipeline.config import preset

    return (a.train, a.dev), {"model": preset("model", a.model)} if a.model else {}


TRAIN = StageCommand("train", _train_config, _train_flags)

# --- stages 2 and 3: per-language fine-tuning and slimIPL -----------------------------------------------------------
FINETUNE = StageCommand(
    "finetune", lambda a: ((a.language, a.train, a.dev), {"init_checkpoint": a.init}),
    lambda p: language_stage_arguments(p, init="<run-dir>/supervised/checkpoints/best.pt"))


def _slimipl_flags(p: argparse.ArgumentParser) -> None:
    language_stage_arguments(p, init="<run-dir>/finetune/<language>/checkpoints/best.pt")
    p.add_argument("--unlabeled", required=True, help="unlabeled manifest (only the language's rows are used)")
    p.add_argument("--reference", default=None,
                   help="hidden true transcripts of the unlabeled clips, to log PL CER (never used for training)")


def _slimipl_summary(cfg: Any, result: Any) -> str:
    from pipeline.report.report import pl_quality_markdown

    extra = result.extra
    return (f"{pl_quality_markdown(result.summary())}\n{extra['pl_updates']} PL and {extra['labeled_updates']} "
            f"labeled updates, {extra['refreshes']} cache refreshes")


SLIMIPL = StageCommand(
    "slimipl", lambda a: ((a.language, a.train, a.unlabeled, a.dev),
               {"init_checkpoint": a.init, "reference_manifest": a.reference}),
    _slimipl_flags, _slimipl_summary)


# --- stage 5: the student -------------------------------------------------------------------------------------------
def _student_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="from_scratch", choices=["from_scratch", "finetune"],
                   help="from_scratch: new model on the init checkpoint's vocabulary; finetune: its weights")
    _manifests(p)
    p.add_argument("--labels", default=None, help="PL corpus root (default: <run-dir>/labels)")
    p.add_argument("--init", default=None, help="init checkpoint (default: <run-dir>/supervised/checkpoints/best.pt)")
    p.add_argument("--labeled-only", action="store_true", help="no PL source: fine-tune on labeled data only")


STUDENT = StageCommand(
    "student", lambda a: ((a.mode, a.train, a.dev), {"init_checkpoint": a.init, "labels_root": a.labels,
                                          "labeled_only": a.labeled_only}),
    _student_flags,
    lambda cfg, r: f"updates by source {r.extra['updates_by_source']} (weights {r.extra['weights']})")


# --- every other stage: flags from its config (pipeline.stages.registry) -------------------------------------------
FLAG_NAMES = {"init_checkpoint": "--init", "train_manifest": "--train", "dev_manifest": "--dev"}


def _flag_kind(field: Any) -> tuple[type, tuple | None] | None:
    """A field's flag type and choices (a Literal's), when it is one scalar (optionally None); else None."""
    kinds = [a for a in typing.get_args(field.annotation) if a is not type(None)] if typing.get_origin(
        field.annotation) in (typing.Union, types.UnionType) else [field.annotation]
    if len(kinds) != 1:
        return None
    if typing.get_origin(kinds[0]) is typing.Literal:
        choices = typing.get_args(kinds[0])
        return type(choices[0]), choices
    return (kinds[0], None) if kinds[0] in (str, int, float, bool) else None


def declared_flags(config: Any) -> dict[str, tuple[type, tuple | None]]:
    """The fields of a declared stage's config that become flags: its own scalars (not those every stage has)."""
    from pipeline.config import TrainingConfig

    return {name: kind for name, field in config.model_fields.items()
            if name not in TrainingConfig.model_fields and (kind := _flag_kind(field)) is not None}


def config_flags(p: argparse.ArgumentParser, config: Any) -> None:
    """A stage's flags made from its config's own scalar fields (--init, --train, --dev for the usual three, Literal
    fields as choices; the rest through --set); unset flags keep the preset's."""
    for name, (kind, choices) in declared_flags(config).items():
        field = config.model_fields[name]
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        how = {"action": argparse.BooleanOptionalAction} if kind is bool else {
            "type": kind, "choices": choices, "metavar": None if choices else flag[2:].upper().replace("-", "_")}
        p.add_argument(flag, dest=name, required=field.is_required(), **how,
                       help=(field.description or name).replace("%", "%%")
                       + ("" if field.is_required() else " (unset: the preset's)"))


# --- scoring --------------------------------------------------------------------------------------------------------
def add_evaluate(sub: Subparsers) -> None:
    """`mlpl evaluate`: its arguments."""
    e = sub.add_parser("evaluate", help="per-language CER/WER and LID accuracy of a checkpoint on a manifest")
    e.add_argument("--checkpoint", required=True, help="checkpoint (.pt) written by training")
    e.add_argument("--manifest", required=True, help="manifest to score")
    e.add_argument("--out", required=True, help="output folder for metrics.json/.md and hypotheses.jsonl")
    e.add_argument("--fp32", action="store_true", help="disable bf16 autocast")
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a checkpoint on a manifest."""
    from pipeline.engine.evaluate import run_evaluate

    with progress_bar() as update:
        result = run_evaluate(args.checkpoint, args.manifest, args.out, bf16=not args.fp32, on_progress=update)
    print(result["markdown"])
    print(f"{result['utterances']} utterances, {result['rejects']} rejects → {args.out}")
    return 0


# --- taking the model out -------------------------------------------------------------------------------------------
def add_export_model(sub: Subparsers) -> None:
    """`mlpl export-model`: its arguments."""
    e = sub.add_parser("export-model", help="a finished checkpoint as ONNX (fp32 + int8), tokens.txt and metadata "
                                            "for onnxruntime and sherpa-onnx")
    e.add_argument("--checkpoint", required=True, help="a stage's best.pt, a student's, or a serving checkpoint")
    e.add_argument("--out", required=True, help="output folder (any fsspec URL)")
    e.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="also write model.int8.onnx (ONNX Runtime dynamic quantization; default: on)")
    e.set_defaults(func=cmd_export_model)


def cmd_export_model(args: argparse.Namespace) -> int:
    """Export a checkpoint to ONNX."""
    from pipeline.engine.onnx_export import export_model

    meta = export_model(args.checkpoint, args.out, int8=args.int8)
    sizes = ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in meta["bytes"].items())
    print(f"{args.checkpoint} → {args.out}: {sizes}; tokens.txt ({meta['vocab_size']} symbols, blank "
          f"{meta['blank_id']}), metadata.json; languages {', '.join(meta['languages'])}")
    return 0


# The recipe's first four stages keep hand-written flags (positional preset arguments, model presets, PL sources).
HAND_WRITTEN = {c.name: c for c in (TRAIN, FINETUNE, SLIMIPL, STUDENT)}


def add_stages(sub: Subparsers) -> None:
    """A command for every stage a module of pipeline/stages/ declares: its own flags (hand-written, or made from
    its config), then those of every stage (--preset, --max-updates, --set, …)."""
    from pipeline.stages.registry import stage_specs

    first = list(HAND_WRITTEN)  # the recipe's order, then the others by name
    for spec in sorted(stage_specs(), key=lambda s: (first.index(s.command) if s.command in first else len(first))):
        p = sub.add_parser(spec.command, help=spec.help)
        cmd = HAND_WRITTEN.get(spec.command)
        if cmd is not None:
            cmd.flags(p)
        else:
            config_flags(p, spec.config)
            p.add_argument("--run-dir", required=True, help=f"run directory (the stage writes <run-dir>/{spec.kind}/)")
        stage_arguments(p)
        p.set_defaults(func=run_stage_command, stage_spec=spec, stage_command=cmd)


COMMANDS = (add_stages, add_evaluate, add_export_model)
