"""What the command groups share: progress bars, a stage's config from its preset and flags, --teacher flags, and
the flags and config of the commands that run or read a recipe.

Handlers import the pipeline when they run, not when the parser is built: `mlpl --help` and a bad flag answer at
once instead of after the ≈ 4 s that torch and Prefect take to import."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Subparsers = Any  # argparse's _SubParsersAction (private): what `add_subparsers` returns


@contextmanager
def progress_bar(single: bool = False) -> Iterator[Callable[[int, int, str], None]]:
    """Rich progress bars driven by pipeline `on_progress(done, total, desc)` callbacks.

    One bar per phase (the description's first word: "decode", "train"), or one bar for everything.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.engine.distributed import launcher_rank

    if launcher_rank() > 0:  # under torchrun, rank 0 shows the bars
        yield lambda done, total, desc: None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        transient=False,
    ) as progress:
        tasks: dict[str, Any] = {}

        def update(done: int, total: int, desc: str) -> None:
            name = "all" if single else desc.split(" ")[0]
            if name not in tasks:  # a total of 0: not known ahead (a streamed source)
                tasks[name] = progress.add_task(desc, total=total or None)
            progress.update(tasks[name], completed=done, total=total or None, description=desc)

        yield update


def stage_config(kind: str, args: argparse.Namespace, *preset_args: Any, **fields: Any):
    """A stage config from its preset (`--preset`) with the preset's arguments and fields, `--max-updates` (a
    shorter run keeps a proportionate warmup), `--threads` and every `--set key=value` applied."""
    from pipeline.config import deep_merge, parse_assignments, preset

    if getattr(args, "max_updates", None) is not None:  # labeling has no update budget
        fields["max_updates"] = args.max_updates
    cfg = preset(kind, args.preset, *preset_args, **fields)
    sets = list(args.set or []) + ([f"num_threads={args.threads}"] if args.threads is not None else [])
    return type(cfg)(**deep_merge(cfg.model_dump(mode="json"), parse_assignments(sets)))


def teacher_args(items: list[str] | None) -> dict[str, str]:
    """--teacher LANG=CHECKPOINT flags as a mapping."""
    teachers = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--teacher {item!r}: expected LANG=CHECKPOINT, "
                             "e.g. sl=runs/demo/slimipl/sl/checkpoints/best.pt")
        lang, url = item.split("=", 1)
        teachers[lang.strip().lower()] = url
    return teachers


def recipe_arguments(p: argparse.ArgumentParser, *, corpus: str, corpus_dir: str, run_dir: str) -> None:
    p.add_argument("--corpus", default=corpus, help=f"corpus preset to build (default: {corpus})")
    p.add_argument("--corpus-dir", default=corpus_dir)
    p.add_argument("--run-dir", default=run_dir)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-dir", default=None, help="folder with <lang>.txt sentence files instead of Debian text")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="recipe config override, e.g. student.max_updates=500 or student_modes='[\"finetune\"]'")


def recipe_config(args: argparse.Namespace):
    from pipeline.config import RecipeConfig, deep_merge, parse_assignments, read_form, recipe_preset

    if args.config:
        base = read_form(args.config)
    else:
        base = recipe_preset(args.recipe, args.corpus_dir, args.run_dir, seed=args.seed).model_dump(mode="json")
    return RecipeConfig(**deep_merge(base, parse_assignments(list(args.set or []))))


def results_arguments(p: argparse.ArgumentParser, where: str) -> None:
    """--results (the page a command writes its part of) and the command the page quotes (hidden)."""
    p.add_argument("--results", default=None, help=f"write {where} into this results page")
    p.add_argument("--results-command", default=None, help=argparse.SUPPRESS)
