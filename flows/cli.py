"""The `mlpl` command line: corpus building, training, evaluation and the demo flow.

Every command has `--help`; long work draws a rich progress bar; bad arguments or unusable input end
with a non-zero exit and a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import ValidationError

log = logging.getLogger("mlpl.cli")


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


def _config(kind: str, args: argparse.Namespace, *preset_args: Any, **fields: Any):
    """A stage config from its preset (`--preset`) with the preset's arguments and fields, `--max-updates` (a
    shorter run keeps a proportionate warmup), `--threads` and every `--set key=value` applied."""
    from pipeline.config import deep_merge, parse_assignments, preset

    if getattr(args, "max_updates", None) is not None:  # labeling has no update budget
        fields["max_updates"] = args.max_updates
    cfg = preset(kind, args.preset, *preset_args, **fields)
    sets = list(args.set or []) + ([f"num_threads={args.threads}"] if args.threads is not None else [])
    return type(cfg)(**deep_merge(cfg.model_dump(mode="json"), parse_assignments(sets)))


def _train(cfg, args: argparse.Namespace):
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


def cmd_corpus_build(args: argparse.Namespace) -> int:
    """Build a synthetic multilingual corpus."""
    from pipeline.corpus.build import build_corpus, card_summary, corpus_preset

    cfg = corpus_preset(args.preset)
    if args.seed is not None:
        cfg = cfg.model_copy(update={"seed": args.seed})
    t0 = time.perf_counter()
    with progress_bar(single=True) as update:
        card = build_corpus(cfg, args.out, text_dir=args.text_dir, cache_dir=args.cache_dir, on_progress=update)
    print(f"corpus built in {time.perf_counter() - t0:.1f} s → {args.out} (card: {args.out}/corpus_card.md)")
    print(card_summary(card))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Import a corpus in another layout (Common Voice, VoxPopuli, lhotse, NeMo, Hugging Face) as mlpl manifests."""
    from pipeline.corpus.importing import import_corpus, rejects_manifest

    options = {k: v for k, v in (("split", args.split), ("language", args.language), ("tars", args.tars),
                                 ("text_column", args.text_column), ("language_column", args.language_column))
               if v is not None}
    languages = args.languages.split(",") if args.languages else None
    with progress_bar(single=True) as update:
        summary = import_corpus(args.format, args.src, args.out, languages=languages, probe=args.probe,
                                options=options, on_progress=update)
    for split, langs in summary["splits"].items():
        per = ", ".join(f"{lang} {v['clips']} ({v['hours']:.2f} h)" for lang, v in langs.items())
        print(f"{split:9s} {per}")
    rejects = summary["rejects"]
    print(f"rejects   {rejects['total']}" + (f" → {rejects_manifest(args.out)}: " + ", ".join(
        f"{k} {v}" for k, v in rejects["by_reason"].items()) if rejects["total"] else ""))
    if summary["skipped_languages"]:
        print(f"skipped (not in --languages): {summary['skipped_languages']}")
    print(f"→ {args.out}/manifests/ ({summary['wall_s']:.1f} s); train on it: mlpl recipe --corpus-dir {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export the PL corpus (read-time filters applied) as a NeMo tarred dataset, a lhotse CutSet or an HF dataset."""
    from pipeline.corpus.exporting import export_pseudo_labels

    with progress_bar(single=True) as update:
        summary = export_pseudo_labels(
            args.format, args.labels, args.out, languages=args.languages.split(",") if args.languages else None,
            min_confidence=args.min_confidence, teacher=args.teacher, min_tokens=args.min_tokens,
            max_tokens=args.max_tokens, lid_agreement=args.lid_agreement, shar=args.shar, on_progress=update)
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2, default=str))
    print(f"→ {args.out} ({len(summary.get('files', []))} files; export.json says what was written)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Supervised multilingual CTC + LID training (stage 1), resumable."""
    from pipeline.config import preset

    model = {"model": preset("model", args.model)} if args.model else {}
    _train(_config("supervised", args, args.train, args.dev, **model), args)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a checkpoint on a manifest."""
    from pipeline.engine.evaluate import run_evaluate

    with progress_bar() as update:
        result = run_evaluate(args.checkpoint, args.manifest, args.out, bf16=not args.fp32, on_progress=update)
    print(result["markdown"])
    print(f"{result['utterances']} utterances, {result['rejects']} rejects → {args.out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Per-language fine-tuning of the multilingual checkpoint (stage 2), resumable."""
    _train(_config("finetune", args, args.language, args.train, args.dev, init_checkpoint=args.init), args)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantization-aware training of a finished model and its packed serving checkpoint, resumable."""
    cfg = _config("quantize", args, args.init, args.train, args.dev, bits=args.bits, block=args.block)
    result = _train(cfg, args)
    extra = result.extra
    print(f"packed {cfg.bits}-bit checkpoint: {extra['packed_checkpoint']} ({extra['packed_bytes'] / 1e6:.2f} MB; "
          f"float32 weights {extra['float32_weights_bytes'] / 1e6:.2f} MB)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Structured pruning (language-agnostic or per-language pathways) of a finished model, resumable."""
    cfg = _config("prune", args, args.init, args.train, args.dev, method=args.method, mask_search=args.mask_search,
                  sparsity=args.sparsity)
    result = _train(cfg, args)
    extra = result.extra
    print(f"sparsity {extra['sparsity']}; sparse checkpoint: {extra['packed_checkpoint']} "
          f"({extra['packed_bytes'] / 1e6:.2f} MB; dense float32 weights "
          f"{extra['float32_weights_bytes'] / 1e6:.2f} MB)")
    return 0


def cmd_slimipl(args: argparse.Namespace) -> int:
    """slimIPL self-training on one language (stage 3), resumable."""
    from pipeline.report.report import pl_quality_markdown

    cfg = _config("slimipl", args, args.language, args.train, args.unlabeled, args.dev, init_checkpoint=args.init,
                  reference_manifest=args.reference)
    result = _train(cfg, args)
    print(pl_quality_markdown(result.summary()))
    extra = result.extra
    print(f"{extra['pl_updates']} PL and {extra['labeled_updates']} labeled updates, {extra['refreshes']} cache "
          "refreshes")
    return 0


def _teacher_args(items: list[str] | None) -> dict[str, str]:
    """--teacher LANG=CHECKPOINT flags as a mapping."""
    teachers = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--teacher {item!r}: expected LANG=CHECKPOINT, "
                             "e.g. sl=runs/demo/slimipl/sl/checkpoints/best.pt")
        lang, url = item.split("=", 1)
        teachers[lang.strip().lower()] = url
    return teachers


def _label_config(args: argparse.Namespace):
    from pipeline.layout import teachers_for_run

    teachers = teachers_for_run(args.run_dir) if args.run_dir else {}
    teachers |= _teacher_args(args.teacher)
    if not teachers:
        raise ValueError("no teachers: pass --run-dir (each language's best model there) or --teacher LANG=CHECKPOINT")
    return _config("label", args, args.manifest, teachers)


def cmd_label(args: argparse.Namespace) -> int:
    """Corpus-wide pseudo-labeling into a Parquet table + WebDataset shards (resumable, idempotent)."""
    from pipeline.layout import RunLayout
    from pipeline.stages.label import run_label
    from pipeline.stages.label_summary import open_with_pandas, summary_markdown

    cfg = _label_config(args)
    out = args.out or (RunLayout(args.run_dir).labels if args.run_dir else None)
    if out is None:
        raise ValueError("--out is required without --run-dir")
    if args.flow or args.dask_workers or args.dask_address:  # a Dask cluster is a task runner of the flow
        from flows.label import run_label_flow

        result = run_label_flow(cfg, out, dask_address=args.dask_address, dask_workers=args.dask_workers)
        summary, labeled, skipped = result["summary"], result["units_labeled"], result["units_skipped"]
    else:
        with progress_bar() as update:
            res = run_label(cfg, out, on_progress=update)
        summary, labeled, skipped = res.summary, res.units_labeled, res.units_skipped
    print(summary_markdown(summary))
    print(f"{labeled} units labeled, {skipped} already committed → {out}")
    print(open_with_pandas(out))
    return 0


def _recipe_config(args: argparse.Namespace):
    from pipeline.config import RecipeConfig, deep_merge, parse_assignments, read_form, recipe_preset

    if args.config:
        base = read_form(args.config)
    else:
        base = recipe_preset(args.recipe, args.corpus_dir, args.run_dir, seed=args.seed).model_dump(mode="json")
    return RecipeConfig(**deep_merge(base, parse_assignments(list(args.set or []))))


def cmd_recipe(args: argparse.Namespace) -> int:
    """Run the whole recipe as the Prefect flow mlpl-recipe (building the corpus first unless --config)."""
    t0 = time.perf_counter()
    from pipeline.layout import is_imported

    cfg = _recipe_config(args)
    if args.config or is_imported(args.corpus_dir):  # nothing to build: a form, or a corpus `mlpl import` wrote
        from flows.recipe import recipe_flow

        out = recipe_flow(cfg)
    else:
        from flows.demo import demo_flow

        overrides = cfg.model_dump(mode="json", exclude={"run_dir", "corpus_dir"})  # demo_flow's own arguments
        out = demo_flow(corpus_dir=args.corpus_dir, run_dir=args.run_dir, corpus=args.corpus, seed=args.seed,
                        text_dir=args.text_dir, recipe=args.recipe, overrides=overrides)
    wall = time.perf_counter() - t0
    print_recipe(out, cfg.run_dir, wall)
    if args.results:
        from pipeline.engine.device import cpu_name
        from pipeline.report.report import write_results

        roles = {lang: v.get("role", "") for lang, v in out.get("corpus", {}).get("languages", {}).items()}
        write_results(args.results, out, wall_s=wall, command=args.results_command or "mlpl recipe",
                      machine=cpu_name(), roles=roles, reference_manifest=cfg.reference_manifest)
        print(f"results → {args.results}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """Run the ablations off a finished recipe run as the Prefect flow mlpl-ablations and print the table."""
    from pipeline.report.report import build_report

    cfg = _recipe_config(args)
    out_dir = args.out or cfg.run_dir.rstrip("/") + "-ablations"
    try:
        build_report(cfg.run_dir)  # before any Prefect start-up: the ablations branch off a finished run
    except FileNotFoundError as err:
        print(f"error: {err}; the ablations branch off a finished recipe run: run it first (make reproduce)",
              file=sys.stderr)
        return 2
    from flows.ablate import ablations_flow  # Prefect only once there is something to run

    record = ablations_flow(cfg, out_dir, args.only, args.results, args.results_command or "mlpl ablate")
    print(record["markdown"])
    if args.results:
        print(f"results → {args.results} (Ablations)")
    return 0


def print_recipe(out: dict[str, Any], run_dir: str, wall_s: float) -> None:
    """The report table, each stage's wall time and where everything is."""
    from pipeline.report.report import build_report, orderings_markdown, recipe_targets
    from pipeline.stages.label_summary import open_with_pandas, summary_markdown

    print("\n### Report (paper Tables 2-3 layout)\n")
    print(out["report"]["markdown"])
    targets = recipe_targets(build_report(run_dir))
    if targets:
        print("### Did self-training pay? (against the better of the base and the same-compute control)\n")
        print(orderings_markdown(targets, "target"))
        paid = next(t for t in targets if t["check"].startswith("best student below the better of"))
        verdict = {True: "paid", False: "did **not** pay", None: "cannot be judged (no figures)"}[paid["holds"]]
        print(f"Self-training {verdict}: {paid['student']} against the better of the base and the same-compute "
              f"control, on the languages with unlabeled audio: {paid['detail']}.\n")
    print("### Wall time per stage (training, dev evaluation and test scoring)\n")
    print("| stage | wall s |\n|---|---:|")
    for name, seconds in out["wall_s"].items():
        print(f"| {name} | {seconds:.0f} |")
    for name, st in out["stages"].items():
        print(f"{name:>32}: {st['step']} updates, {st['train_audio_s_per_s']} audio-s/s training ({st['precision']})")
    labels = out["labels"]
    print("\n### Pseudo-labels of the unlabeled audio\n")
    print(summary_markdown(labels["summary"]))
    print(f"recipe finished in {wall_s:.0f} s")
    print(f"checkpoints: {run_dir}/{{supervised,finetune/<lang>,slimipl/<lang>,student/<variant>,"
          "control/<updates>/supervised}/checkpoints/best.pt")
    print(f"report:      {run_dir}/report/{{report.md,report.json,dev_cer.png,recipe_run.json}}, "
          f"{run_dir}/eval/<stage>/metrics.md")
    print(f"PL corpus:   {labels['root']} (pl/ table, shards/, rejects/, catalog/); open it with pandas:")
    print(open_with_pandas(labels["root"]))


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo corpus and run the whole recipe on it as a Prefect flow; print the report."""
    args.config, args.recipe, args.results, args.results_command = None, "demo", None, None
    return cmd_recipe(args)


def cmd_student(args: argparse.Namespace) -> int:
    """Train a student on labeled + pseudo-labeled data (stage 5), resumable."""
    cfg = _config("student", args, args.mode, args.train, args.dev, init_checkpoint=args.init, labels_root=args.labels,
                  labeled_only=args.labeled_only)
    extra = _train(cfg, args).extra
    print(f"updates by source {extra['updates_by_source']} (weights {extra['weights']})")
    return 0


def cmd_relabel(args: argparse.Namespace) -> int:
    """Label what arrived in a watched folder (new files, changed files, older teachers) into a labels root."""
    from pipeline.config import RelabelConfig, deep_merge, parse_assignments, read_form
    from pipeline.stages.relabel import relabel_markdown, run_relabel

    base = read_form(args.config) if args.config else {}
    given = {"watch": args.watch, "labels_root": args.labels, "run_dir": args.run_dir,
             "language_from": args.language_from, "preset": args.preset}
    base |= {k: v for k, v in given.items() if v is not None}
    if args.teacher:
        base["teachers"] = _teacher_args(args.teacher)
    cfg = RelabelConfig(**deep_merge(base, parse_assignments(list(args.set or []))))
    if args.flow:
        from flows.relabel import relabel_flow

        result = relabel_flow(cfg)
    else:
        with progress_bar() as update:
            result = run_relabel(cfg, on_progress=update)
    print(relabel_markdown(result))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a deployment of every flow against the configured Prefect API (PREFECT_API_URL) until interrupted."""
    import os

    from pipeline.config import read_form, recipe_preset

    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError("PREFECT_API_URL is not set: start a server (make server) and export PREFECT_API_URL="
                         "http://127.0.0.1:<port>/api (4200 unless PREFECT_PORT says otherwise), or use make serve")
    from flows.deploy import serve_all

    recipe = None
    if args.recipe_config:
        recipe = read_form(args.recipe_config)
    elif args.recipe:
        recipe = recipe_preset(args.recipe, args.corpus_dir, args.run_dir).model_dump(mode="json")
    relabel = read_form(args.relabel_config) if args.relabel_config else None
    serve_all(relabel=relabel, relabel_cron=args.relabel_cron, recipe=recipe, device_slots=args.device_slots,
              limit=args.limit)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write and print a run's report: test CER per stage and language, averages, LID, PL CER, dev-CER plot."""
    from pipeline.report.report import write_report

    report = write_report(args.run_dir)
    print(report["markdown"])
    print(f"→ {args.run_dir}/report/report.{{md,json}}, plot {report['plot']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure throughput on the demo corpus (built first if missing): training, decoding and labeling."""
    import tempfile

    from pipeline.studies.bench import (
        format_figures,
        format_label_bench,
        format_label_profile,
        format_lm_label_bench,
        label_profile,
        label_teacher,
        run_bench,
        run_label_bench,
        run_lm_label_bench,
    )
    from pipeline.studies.common import ensure_corpus

    with progress_bar(single=True) as update:
        ensure_corpus(args.corpus, args.corpus_dir, on_progress=update)
    from pipeline.studies.import_bench import format_import_bench, run_import_bench

    print(format_figures(run_bench(args.corpus_dir, updates=args.updates)))
    print()
    print(format_import_bench(run_import_bench()))
    if args.skip_labeling:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        teacher, note = label_teacher(args.corpus_dir, args.teacher, args.default_teacher, tmp)
        print(f"\n{note}\n")
        print(format_label_bench(run_label_bench(args.corpus_dir, teacher, scales=args.scales)))
        print()
        print(format_label_profile(label_profile(args.corpus_dir, teacher)))
        print()
        print(format_lm_label_bench(run_lm_label_bench(args.corpus_dir, teacher)))
        if args.dask_units:
            from functools import partial

            from flows.label import run_label_flow
            from pipeline.studies.dask_bench import format_dask_overhead_bench, run_dask_overhead_bench

            on_cluster = partial(run_label_flow, dask_workers=2)
            print()
            print(format_dask_overhead_bench(run_dask_overhead_bench(args.corpus_dir, teacher, on_cluster, workers=2,
                                                                     units=args.dask_units)))
    return 0


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny (CPU) | paper (default: tiny)")
    p.add_argument("--max-updates", type=int, default=None, help="number of updates")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. optim.lr=0.001")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the stage's checkpoints/last.pt when present (default: on)")


def _language_stage_arguments(p: argparse.ArgumentParser, *, init: str) -> None:
    p.add_argument("--language", required=True, help="language code, e.g. sl")
    p.add_argument("--train", required=True, help="labeled manifest (only the language's rows are used)")
    p.add_argument("--dev", default=None, help="dev manifest (only the language's rows are used)")
    p.add_argument("--run-dir", required=True, help="run directory (any fsspec URL)")
    p.add_argument("--init", default=None, help=f"starting checkpoint (default: {init})")
    _stage_arguments(p)


def cmd_serving(args: argparse.Namespace) -> int:
    """The serving-size study on the bench corpus (built first if missing): pruning and quantization tables."""
    from pipeline.engine.device import cpu_name
    from pipeline.studies.common import ensure_corpus
    from pipeline.studies.serving import ServingStudy, publish_serving, run_serving_study

    ensure_corpus(args.corpus, args.corpus_dir)
    study = ServingStudy(args.corpus_dir, args.out, init_checkpoint=args.init, sparsity=args.sparsity,
                         updates=args.updates, round_updates=args.round_updates)
    try:
        run_serving_study(study)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(publish_serving(study, args.results, args.results_command or "mlpl serving", cpu_name(), args.section))
    if args.results:
        print(f"results → {args.results} ({args.section})")
    return 0


def cmd_datasize(args: argparse.Namespace) -> int:
    """Does more PL audio pay? From-scratch students at several PL amounts and the student's levers, branched off a
    finished recipe run; the tables and plot go into the results page."""
    from pipeline.engine.device import cpu_name
    from pipeline.report.report import build_report
    from pipeline.studies.datasize import SECTION, DataSizeStudy, publish_datasize, run_datasize_study

    study = DataSizeStudy(args.corpus_dir, args.run_dir, args.out, recipe=args.recipe,
                          ratios=tuple(args.ratio or (1.0, 3.0)))
    try:
        build_report(args.run_dir)  # the study branches off a finished recipe run
        run_datasize_study(study, args.levers, args.only)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}; the study branches off a finished recipe run: run it first (make reproduce)",
              file=sys.stderr)
        return 2
    print(publish_datasize(study, args.results, args.results_command or "mlpl datasize", cpu_name()))
    if args.results:
        print(f"results → {args.results} ({SECTION})")
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    """Li et al.'s capacity study on the bench corpus (built first if missing): four tables, equal training time."""
    from pipeline.engine.device import cpu_name
    from pipeline.studies.capacity import CapacityStudy, publish_capacity, rebalance, run_capacity_study
    from pipeline.studies.common import ensure_corpus

    ensure_corpus(args.corpus, args.corpus_dir)
    study = CapacityStudy(args.corpus_dir, args.out, reference_updates=args.reference_updates)
    try:
        run_capacity_study(study, args.only)
        if args.only is None:
            rebalance(study)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(publish_capacity(study, args.results, args.results_command or "mlpl capacity", cpu_name()))
    if args.results:
        print(f"results → {args.results} (Capacity study)")
    return 0


def _recipe_arguments(p: argparse.ArgumentParser, *, corpus: str, corpus_dir: str, run_dir: str) -> None:
    p.add_argument("--corpus", default=corpus, help=f"corpus preset to build (default: {corpus})")
    p.add_argument("--corpus-dir", default=corpus_dir)
    p.add_argument("--run-dir", default=run_dir)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-dir", default=None, help="folder with <lang>.txt sentence files instead of Debian text")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="recipe config override, e.g. student.max_updates=500 or student_modes='[\"finetune\"]'")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    p = argparse.ArgumentParser(prog="mlpl", description="Multilingual pseudo-labeling pipeline (slimIPL recipe).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    corpus = sub.add_parser("corpus", help="synthetic multilingual corpus").add_subparsers(dest="action", required=True)
    b = corpus.add_parser("build", help="build a corpus preset (smoke, demo, bench) with espeak-ng")
    b.add_argument("--preset", default="demo", help="smoke | demo | bench (default: demo)")
    b.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    b.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    b.add_argument("--text-dir", default=None, help="folder with <lang>.txt sentence files instead of Debian text")
    b.add_argument("--cache-dir", default=None, help="download/text cache (default: $MLPL_CACHE_DIR or ~/.cache/mlpl)")
    b.set_defaults(func=cmd_corpus_build)

    from pipeline.corpus.importing import FORMATS

    im = sub.add_parser("import", help="a corpus in another layout as mlpl manifests (labeled/dev/test/unlabeled)")
    im.add_argument("format", choices=FORMATS)
    im.add_argument("src", help="the source: a folder, manifest or Parquet dataset (any fsspec URL)")
    im.add_argument("--out", required=True, help="corpus folder to write (manifests/<split>.jsonl, import.json)")
    im.add_argument("--languages", default=None, help="comma-separated language codes to keep (default: all)")
    im.add_argument("--split", default=None, choices=("labeled", "dev", "test", "unlabeled"),
                    help="the split of every row (lhotse, nemo, hf; default: from the file names)")
    im.add_argument("--language", default=None, help="language of rows that name none (lhotse, nemo, hf)")
    im.add_argument("--tars", default=None, help="nemo-tarred: the tar files, e.g. 'audio_{0..7}.tar'")
    im.add_argument("--text-column", default=None, help="hf: the transcript column (default: sentence, text, …)")
    im.add_argument("--language-column", default=None, help="hf: the language column (default: language, locale)")
    im.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                    help="read every clip's audio header: missing/corrupt audio becomes a reject, durations are "
                         "measured (default: on)")
    im.set_defaults(func=cmd_import)

    ex = sub.add_parser("export", help="the PL corpus as a NeMo tarred dataset, a lhotse CutSet (+ Shar) or a "
                                       "Hugging Face Parquet dataset, with the read-time filters")
    ex.add_argument("format", choices=("nemo", "lhotse", "hf"))
    ex.add_argument("labels", help="the labels root (e.g. runs/demo/labels; any fsspec URL)")
    ex.add_argument("--out", required=True, help="folder to write")
    ex.add_argument("--languages", default=None, help="comma-separated language codes (default: all)")
    ex.add_argument("--min-confidence", type=float, default=None)
    ex.add_argument("--teacher", default=None, help="a teacher id, its <stage>@<step> or a sha256 prefix")
    ex.add_argument("--min-tokens", type=int, default=None)
    ex.add_argument("--max-tokens", type=int, default=None)
    ex.add_argument("--lid-agreement", action="store_true", help="only rows whose LID agrees with their language")
    ex.add_argument("--shar", action="store_true", help="lhotse: also a Lhotse Shar folder")
    ex.set_defaults(func=cmd_export)

    t = sub.add_parser("train", help="supervised multilingual CTC + LID training (resumes by default)")
    t.add_argument("--train", required=True, help="labeled manifest (JSONL or Parquet, any fsspec URL)")
    t.add_argument("--dev", default=None, help="dev manifest for periodic validation")
    t.add_argument("--run-dir", required=True, help="run directory (any fsspec URL)")
    t.add_argument("--model", default=None, help="model preset override: tiny | base | large")
    _stage_arguments(t)
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("finetune", help="fine-tune the multilingual model on one language (resumes by default)")
    _language_stage_arguments(f, init="<run-dir>/supervised/checkpoints/best.pt")
    f.set_defaults(func=cmd_finetune)

    sl = sub.add_parser("slimipl", help="slimIPL self-training on one language (resumes by default)")
    _language_stage_arguments(sl, init="<run-dir>/finetune/<language>/checkpoints/best.pt")
    sl.add_argument("--unlabeled", required=True, help="unlabeled manifest (only the language's rows are used)")
    sl.add_argument("--reference", default=None,
                    help="hidden true transcripts of the unlabeled clips, to log PL CER (never used for training)")
    sl.set_defaults(func=cmd_slimipl)

    q = sub.add_parser("quantize", help="quantization-aware training (1/2/4/8-bit encoder weights) of a finished "
                       "model, then a packed checkpoint for serving and labeling (resumes by default)")
    q.add_argument("--init", required=True, help="the float model to quantize, e.g. a student's best.pt")
    q.add_argument("--train", required=True, help="labeled manifest (every language)")
    q.add_argument("--dev", default=None, help="dev manifest")
    q.add_argument("--run-dir", required=True, help="run directory: the stage writes <run-dir>/quantize/<bits>bit")
    q.add_argument("--bits", type=int, default=1, choices=[1, 2, 4, 8], help="weight bits (default: 1)")
    q.add_argument("--block", type=int, default=64, help="input weights per scale (default: 64)")
    _stage_arguments(q)
    q.set_defaults(func=cmd_quantize)

    pr = sub.add_parser("prune", help="structured 8×1-block pruning of a finished model: one language-agnostic mask "
                        "or a pathway per language, then training under the masks (resumes by default)")
    pr.add_argument("--init", required=True, help="the dense float model to prune, e.g. a student's best.pt")
    pr.add_argument("--train", required=True, help="labeled manifest (every language)")
    pr.add_argument("--dev", default=None, help="dev manifest")
    pr.add_argument("--run-dir", required=True,
                    help="run directory: the stage writes <run-dir>/prune/<method>-<mask-search>")
    pr.add_argument("--method", default="pathways", choices=["agnostic", "pathways"],
                    help="one mask for all languages, or one per language (default: pathways)")
    pr.add_argument("--mask-search", default="imp", choices=["imp", "lth"],
                    help="iterative magnitude pruning, or with lottery-ticket rewinding (default: imp)")
    pr.add_argument("--sparsity", type=float, default=0.706, help="share of pruned weights (default: 0.706)")
    _stage_arguments(pr)
    pr.set_defaults(func=cmd_prune)

    e = sub.add_parser("evaluate", help="per-language CER/WER and LID accuracy of a checkpoint on a manifest")
    e.add_argument("--checkpoint", required=True, help="checkpoint (.pt) written by training")
    e.add_argument("--manifest", required=True, help="manifest to score")
    e.add_argument("--out", required=True, help="output folder for metrics.json/.md and hypotheses.jsonl")
    e.add_argument("--fp32", action="store_true", help="disable bf16 autocast")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="build the demo corpus and run the whole recipe as a Prefect flow")
    _recipe_arguments(d, corpus="demo", corpus_dir="data/demo", run_dir="runs/demo")
    d.set_defaults(func=cmd_demo)

    rc = sub.add_parser("recipe", help="the whole recipe (supervised → fine-tune → slimIPL → labeling → student → "
                        "report) as the Prefect flow mlpl-recipe")
    _recipe_arguments(rc, corpus="bench", corpus_dir="data/bench", run_dir="runs/bench")
    rc.add_argument("--recipe", default="bench", help="recipe preset: demo | bench (default: bench)")
    rc.add_argument("--config", default=None, help="RecipeConfig JSON for your own data (no corpus is built)")
    rc.add_argument("--results", default=None, help="also write a results page (table, plot, orderings) here")
    rc.add_argument("--results-command", default=None, help=argparse.SUPPRESS)  # the command the page quotes
    rc.set_defaults(func=cmd_recipe)

    ab = sub.add_parser("ablate", help="switch each lever of a finished recipe run, one run each (branches of it), "
                        "and tabulate what each is worth")
    _recipe_arguments(ab, corpus="bench", corpus_dir="data/bench", run_dir="runs/bench")
    ab.add_argument("--recipe", default="bench", help="the recipe preset the run was made with (default: bench)")
    ab.add_argument("--config", default=None, help="the RecipeConfig JSON the run was made with, instead")
    ab.add_argument("--out", default=None, help="where the branches go (default: <run-dir>-ablations)")
    ab.add_argument("--only", action="append", metavar="NAME", help="run only these ablations (repeatable)")
    ab.add_argument("--results", default=None, help="write the table into this results page's Ablations section")
    ab.add_argument("--results-command", default=None, help=argparse.SUPPRESS)
    ab.set_defaults(func=cmd_ablate)

    cp = sub.add_parser("capacity", help="Li et al. 2021's capacity study: depth vs width, transformer vs Conformer, "
                        "language conditioning, one model per language vs one multilingual model (equal train time)")
    cp.add_argument("--corpus", default="bench", help="corpus preset to build when missing (default: bench)")
    cp.add_argument("--corpus-dir", default="data/bench")
    cp.add_argument("--out", default="runs/bench-capacity", help="where the study's runs go")
    cp.add_argument("--reference-updates", type=int, default=1000,
                    help="the budget: the tiny preset's training time for this many updates (default: 1000)")
    cp.add_argument("--only", action="append", metavar="NAME", help="run only these settings (repeatable)")
    cp.add_argument("--results", default=None, help="write the tables into this results page's Capacity section")
    cp.add_argument("--results-command", default=None, help=argparse.SUPPRESS)
    cp.set_defaults(func=cmd_capacity)

    ds = sub.add_parser("datasize", help="does more PL audio pay? from-scratch students at 1x, 3x, ... a high-resource "
                        "language's labeled hours of PLs and the student's levers, against the base and its "
                        "same-compute control (branches off a finished recipe run)")
    ds.add_argument("--corpus-dir", default="data/bench")
    ds.add_argument("--run-dir", default="runs/bench", help="the finished recipe run (make reproduce)")
    ds.add_argument("--recipe", default="bench", choices=["demo", "bench"], help="that run's recipe preset")
    ds.add_argument("--out", default="runs/bench-datasize", help="where the study's runs go")
    ds.add_argument("--ratio", type=float, action="append", metavar="R",
                    help="a PL amount to train at, in high-resource labeled hours (repeatable; default 1 and 3)")
    ds.add_argument("--levers", action="store_true",
                    help="the from-scratch student's levers instead (natural PL share, twice the budget against a "
                         "control as long, greedy PLs)")
    ds.add_argument("--only", action="append", metavar="NAME", help="run only these variants (repeatable)")
    ds.add_argument("--results", default=None, help="write the section into this results page")
    ds.add_argument("--results-command", default=None, help=argparse.SUPPRESS)
    ds.set_defaults(func=cmd_datasize)

    sv = sub.add_parser("serving", help="serving-size students: dense vs language-agnostic vs pathways pruning "
                        "(IMP, LTH) at one sparsity, float vs 8/4/2/1-bit weights; per-language test CER and size")
    sv.add_argument("--corpus", default="bench", help="corpus preset to build when missing (default: bench)")
    sv.add_argument("--corpus-dir", default="data/bench")
    sv.add_argument("--out", default="runs/bench-serving", help="where the study's runs go")
    sv.add_argument("--init", default=None,
                    help="the model to shrink (default: the tiny supervised preset, 1000 updates, trained there)")
    sv.add_argument("--sparsity", type=float, default=0.706, help="pruning sparsity (default: the paper's 0.706)")
    sv.add_argument("--updates", type=int, default=None, help="updates per variant (default: the presets' 300)")
    sv.add_argument("--round-updates", type=int, default=None, help="updates per IMP/LTH round (default: preset's)")
    sv.add_argument("--results", default=None, help="write the tables into this results page's section")
    sv.add_argument("--section", default="Serving-size students",
                    choices=["Serving-size students", "Serving-size students: the final student"],
                    help="the results page's section (default: Serving-size students)")
    sv.add_argument("--results-command", default=None, help=argparse.SUPPRESS)
    sv.set_defaults(func=cmd_serving)

    st = sub.add_parser("student", help="train a student on labeled + pseudo-labeled data (resumes by default)")
    st.add_argument("--mode", default="from_scratch", choices=["from_scratch", "finetune"],
                    help="from_scratch: new model on the init checkpoint's vocabulary; finetune: its weights")
    st.add_argument("--train", required=True, help="labeled manifest (every language)")
    st.add_argument("--dev", default=None, help="dev manifest")
    st.add_argument("--run-dir", required=True, help="run directory (any fsspec URL)")
    st.add_argument("--labels", default=None, help="PL corpus root (default: <run-dir>/labels)")
    st.add_argument("--init", default=None, help="init checkpoint (default: <run-dir>/supervised/checkpoints/best.pt)")
    st.add_argument("--labeled-only", action="store_true", help="no PL source: fine-tune on labeled data only")
    _stage_arguments(st)
    st.set_defaults(func=cmd_student)

    lb = sub.add_parser("label", help="pseudo-label an unlabeled manifest into Parquet + WebDataset shards "
                        "(resumable: committed work units are skipped)")
    lb.add_argument("--manifest", required=True, help="unlabeled manifest (JSONL or Parquet, any fsspec URL)")
    lb.add_argument("--run-dir", default=None,
                    help="take each language's teacher from this run (slimipl, else finetune, else supervised)")
    lb.add_argument("--teacher", action="append", metavar="LANG=CHECKPOINT", help="teacher of one language "
                    "(repeatable; overrides --run-dir's)")
    lb.add_argument("--out", default=None, help="labels root (default: <run-dir>/labels)")
    lb.add_argument("--preset", default="tiny", help="tiny (CPU) | paper (default: tiny)")
    lb.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    lb.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="config override, e.g. filters.min_confidence=0.8")
    lb.add_argument("--flow", action="store_true", help="run as the Prefect flow mlpl-label (artifacts, task runs)")
    dask = lb.add_mutually_exclusive_group()
    dask.add_argument("--dask-workers", type=int, default=None, metavar="N",
                      help="label on a local Dask cluster of N worker processes, cores shared among them (runs the "
                      "flow)")
    dask.add_argument("--dask-address", default=None, metavar="URL",
                      help="label on a running Dask cluster, e.g. tcp://scheduler:8786 (runs the flow; workers need "
                      "mlpl installed and the manifest, audio, teachers and labels root at the same URLs)")
    lb.set_defaults(func=cmd_label)

    rl = sub.add_parser("relabel", help="label new or changed audio of a watched folder into a labels root "
                        "(what the nightly relabel deployment runs)")
    rl.add_argument("--watch", default=None, help="folder (any fsspec URL) that receives new audio")
    rl.add_argument("--labels", default=None, help="labels root to commit into")
    rl.add_argument("--run-dir", default=None, help="recipe run whose best models are the teachers")
    rl.add_argument("--teacher", action="append", metavar="LANG=CHECKPOINT", help="teacher of one language")
    rl.add_argument("--language-from", default=None, choices=["path", "manifest"],
                    help="path: <watch>/<lang>/...; manifest: *.jsonl in the folder (default: path)")
    rl.add_argument("--preset", default=None, choices=["tiny", "paper"], help="labeling preset (default: paper)")
    rl.add_argument("--config", default=None, help="RelabelConfig JSON (flags override it)")
    rl.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. label.bf16=false")
    rl.add_argument("--flow", action="store_true", help="run as the Prefect flow mlpl-relabel")
    rl.set_defaults(func=cmd_relabel)

    sv = sub.add_parser("serve", help="serve a Prefect deployment of every flow (recipe, one recipe step, report, "
                        "relabel) against PREFECT_API_URL")
    sv.add_argument("--recipe", default=None, choices=["demo", "bench"],
                    help="prefill the recipe and stage forms with this preset on --corpus-dir / --run-dir")
    sv.add_argument("--recipe-config", default=None, help="prefill them with this RecipeConfig JSON instead")
    sv.add_argument("--corpus-dir", default="data/demo")
    sv.add_argument("--run-dir", default="runs/demo")
    sv.add_argument("--relabel-config", default=None,
                    help="RelabelConfig JSON: the relabel deployment's defaults; its schedule is active only with it")
    sv.add_argument("--relabel-cron", default="0 2 * * *", help="relabel schedule (Cron; default nightly at 02:00)")
    sv.add_argument("--device-slots", type=int, default=1, help="training/labeling tasks at once (default 1)")
    sv.add_argument("--limit", type=int, default=None, help="flow runs at once (default: no limit)")
    sv.set_defaults(func=cmd_serve)

    rp = sub.add_parser("report", help="the run's table in the layout of the paper's Tables 2-3, and a dev-CER plot")
    rp.add_argument("--run-dir", required=True, help="run directory (any fsspec URL)")
    rp.set_defaults(func=cmd_report)

    bn = sub.add_parser("bench", help="throughput figures (front end, training fp32 vs bf16, decoding)")
    bn.add_argument("--corpus", default="demo", help="corpus preset to build when missing (default: demo)")
    bn.add_argument("--corpus-dir", default="data/demo")
    bn.add_argument("--updates", type=int, default=30, help="timed training updates per precision")
    bn.add_argument("--teacher", default=None, help="checkpoint to label with (default: --default-teacher if present, "
                    "else a model trained for 150 updates)")
    bn.add_argument("--default-teacher", default="runs/demo/slimipl/sl/checkpoints/best.pt", help=argparse.SUPPRESS)
    bn.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="corpus sizes for the memory/time figures")
    bn.add_argument("--skip-labeling", action="store_true", help="training and decoding figures only")
    bn.add_argument("--dask-units", type=int, default=30,
                    help="the Dask path's overhead per unit: K and 2K one-clip units on 2 workers (0: skip)")
    bn.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mlpl` console script."""
    from pipeline.engine.distributed import launcher_rank, shutdown

    args = build_parser().parse_args(argv)
    rank = launcher_rank()
    logging.basicConfig(
        # Under torchrun rank 0 reports; the other ranks say only what goes wrong, each line naming its rank.
        level=(logging.DEBUG if args.verbose else logging.INFO) if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0
        else f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (rank 0 prints the results)
    # Prefect's client logs every API request at INFO; keep the console for the pipeline's own lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        print(f"mlpl: error: invalid config: {msgs}", file=sys.stderr)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"mlpl: error: {err}", file=sys.stderr)
    except RuntimeError as err:  # e.g. the corpus text could not be fetched; -v shows the traceback
        if args.verbose:
            raise
        print(f"mlpl: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("mlpl: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 2


if __name__ == "__main__":
    sys.exit(main())
