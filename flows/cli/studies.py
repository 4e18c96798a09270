"""`mlpl ablate`, `capacity`, `datasize`, `serving`, `bench`: the studies about the recipe (pipeline.studies)."""

from __future__ import annotations

import argparse
import sys
import time

from flows.cli.common import (
    Subparsers,
    progress_bar,
    recipe_arguments,
    recipe_config,
    results_arguments,
)


def _study_corpus(p: argparse.ArgumentParser, *, corpus: str = "bench", out: str | None = None) -> None:
    """--corpus and --corpus-dir of a study that builds its corpus when missing, and --out for its runs."""
    p.add_argument("--corpus", default=corpus, help=f"corpus preset to build when missing (default: {corpus})")
    p.add_argument("--corpus-dir", default=f"data/{corpus}")
    if out is not None:
        p.add_argument("--out", default=out, help="where the study's runs go")


def _published(text: str, results: str | None, section: str) -> int:
    """Print a study's section and where it went; the command's exit status (0)."""
    print(text)
    if results:
        print(f"results → {results} ({section})")
    return 0


def add_ablate(sub: Subparsers) -> None:
    """`mlpl ablate`: its arguments."""
    ab = sub.add_parser("ablate", help="switch each lever of a finished recipe run, one run each (branches of it), "
                        "and tabulate what each is worth")
    recipe_arguments(ab, corpus="bench", corpus_dir="data/bench", run_dir="runs/bench")
    ab.add_argument("--recipe", default="bench", help="the recipe preset the run was made with (default: bench)")
    ab.add_argument("--config", default=None, help="the RecipeConfig JSON the run was made with, instead")
    ab.add_argument("--out", default=None, help="where the branches go (default: <run-dir>-ablations)")
    ab.add_argument("--only", action="append", metavar="NAME", help="run only these ablations (repeatable)")
    results_arguments(ab, "the table (its Ablations section)")
    ab.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    """Run the ablations off a finished recipe run as the Prefect flow mlpl-ablations and print the table."""
    from pipeline.report.report import build_report

    cfg = recipe_config(args)
    out_dir = args.out or cfg.run_dir.rstrip("/") + "-ablations"
    try:
        build_report(cfg.run_dir)  # before any Prefect start-up: the ablations branch off a finished run
    except FileNotFoundError as err:
        print(f"error: {err}; the ablations branch off a finished recipe run: run it first (make reproduce)",
              file=sys.stderr)
        return 2
    from flows.ablate import ablations_flow  # Prefect only once there is something to run

    record = ablations_flow(cfg, out_dir, args.only, args.results, args.results_command or "mlpl ablate")
    return _published(record["markdown"], args.results, "Ablations")


def add_capacity(sub: Subparsers) -> None:
    """`mlpl capacity`: its arguments."""
    cp = sub.add_parser("capacity", help="Li et al. 2021's capacity study: depth vs width, transformer vs Conformer, "
                        "language conditioning, one model per language vs one multilingual model (equal train time)")
    _study_corpus(cp, out="runs/bench-capacity")
    cp.add_argument("--reference-updates", type=int, default=1000,
                    help="the budget: the tiny preset's training time for this many updates (default: 1000)")
    cp.add_argument("--only", action="append", metavar="NAME", help="run only these settings (repeatable)")
    results_arguments(cp, "the tables (its Capacity study section)")
    cp.set_defaults(func=cmd_capacity)


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
    return _published(publish_capacity(study, args.results, args.results_command or "mlpl capacity", cpu_name()),
                      args.results, "Capacity study")


def add_datasize(sub: Subparsers) -> None:
    """`mlpl datasize`: its arguments."""
    ds = sub.add_parser("datasize", help="does more PL audio pay? from-scratch students at 1x, 3x, ... a high-resource "
                        "language's labeled hours of PLs and the student's levers, against the base and its "
                        "same-compute control (branches off a finished recipe run)")
    ds.add_argument("--corpus-dir", default="data/bench")
    ds.add_argument("--run-dir", default="runs/bench", help="the finished recipe run (make reproduce)")
    ds.add_argument("--recipe", default="bench", choices=["demo", "bench"], help="that run's recipe preset")
    ds.add_argument("--out", default="runs/bench-datasize", help="where the study's runs go")
    ds.add_argument("--ratio", type=float, action="append", metavar="R",
                    help="a PL amount to train at, in high-resource labeled hours (repeatable; default 1, 3 and 10)")
    ds.add_argument("--levers", action="store_true",
                    help="the from-scratch student's levers instead (natural PL share, twice the budget against a "
                         "control as long, greedy PLs, the larger student with twice its budget)")
    ds.add_argument("--only", action="append", metavar="NAME", help="run only these variants (repeatable)")
    results_arguments(ds, "the section")
    ds.set_defaults(func=cmd_datasize)


def cmd_datasize(args: argparse.Namespace) -> int:
    """Does more PL audio pay? From-scratch students at several PL amounts and the student's levers, branched off a
    finished recipe run; the tables and plot go into the results page."""
    from pipeline.engine.device import cpu_name
    from pipeline.report.report import build_report
    from pipeline.studies.datasize import SECTION, DataSizeStudy, publish_datasize, run_datasize_study

    study = DataSizeStudy(args.corpus_dir, args.run_dir, args.out, recipe=args.recipe,
                          ratios=tuple(args.ratio or (1.0, 3.0, 10.0)))
    command = args.results_command or "mlpl datasize"
    try:
        build_report(args.run_dir)  # the study branches off a finished recipe run

        def publish() -> None:  # after each part: a study of many hours shows what it has measured so far
            if args.results:
                publish_datasize(study, args.results, command, cpu_name())

        run_datasize_study(study, args.levers, args.only, on_saved=publish)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}; the study branches off a finished recipe run: run it first (make reproduce)",
              file=sys.stderr)
        return 2
    return _published(publish_datasize(study, args.results, command, cpu_name()), args.results, SECTION)


def add_serving(sub: Subparsers) -> None:
    """`mlpl serving`: its arguments."""
    sv = sub.add_parser("serving", help="serving-size students: dense vs language-agnostic vs pathways pruning "
                        "(IMP, LTH) at one sparsity, float vs 8/4/2/1-bit weights; per-language test CER and size")
    _study_corpus(sv, out="runs/bench-serving")
    sv.add_argument("--init", default=None,
                    help="the model to shrink (default: the tiny supervised preset, 1000 updates, trained there)")
    sv.add_argument("--sparsity", type=float, default=0.706, help="pruning sparsity (default: the paper's 0.706)")
    sv.add_argument("--updates", type=int, default=None, help="updates per variant (default: the presets' 300)")
    sv.add_argument("--round-updates", type=int, default=None, help="updates per IMP/LTH round (default: preset's)")
    results_arguments(sv, "the tables (its --section)")
    sv.add_argument("--section", default="Serving-size students",
                    choices=["Serving-size students", "Serving-size students: the final student"],
                    help="the results page's section (default: Serving-size students)")
    sv.set_defaults(func=cmd_serving)


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
    text = publish_serving(study, args.results, args.results_command or "mlpl serving", cpu_name(), args.section)
    return _published(text, args.results, args.section)


def add_bench(sub: Subparsers) -> None:
    """`mlpl bench`: its arguments."""
    bn = sub.add_parser("bench", help="throughput figures (front end, training fp32 vs bf16, decoding)")
    _study_corpus(bn, corpus="demo")
    bn.add_argument("--updates", type=int, default=30, help="timed training updates per precision")
    bn.add_argument("--teacher", default=None, help="checkpoint to label with (default: --default-teacher if present, "
                    "else a model trained for 150 updates)")
    bn.add_argument("--default-teacher", default="runs/demo/slimipl/sl/checkpoints/best.pt", help=argparse.SUPPRESS)
    bn.add_argument("--export", default=None, help="checkpoint to export and transcribe the test split with "
                    "(default: make demo's student if present, else the labeling teacher)")
    bn.add_argument("--default-export", default="runs/demo/student/finetune/checkpoints/best.pt",
                    help=argparse.SUPPRESS)
    bn.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="corpus sizes for the memory/time figures")
    bn.add_argument("--skip-labeling", action="store_true", help="training and decoding figures only")
    bn.add_argument("--engines-only", action="store_true",
                    help="only the labeling engines side by side (torch, ONNX Runtime fp32 and int8) and the exported "
                    "model's test CER through ONNX Runtime and sherpa-onnx")
    bn.add_argument("--dask-units", type=int, default=30,
                    help="the Dask path's overhead per unit: K and 2K one-clip units on 2 workers (0: skip)")
    bn.set_defaults(func=cmd_bench)


def _print_engine_figures(args: argparse.Namespace, teacher: str) -> None:
    """The labeling engines side by side, then the exported model's test CER (issue 32's figures)."""
    from pipeline.studies.engine_bench import (
        export_checkpoint,
        format_attention_bound,
        format_engine_bench,
        format_export_bench,
        run_attention_bound,
        run_engine_bench,
        run_export_bench,
    )

    print(format_engine_bench(run_engine_bench(args.corpus_dir, teacher)))
    print()
    print(format_attention_bound(run_attention_bound(teacher)))
    print()
    print(format_export_bench(run_export_bench(args.corpus_dir, export_checkpoint(args.export, args.default_export,
                                                                                  teacher))))
    print()


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

    if args.engines_only:
        with tempfile.TemporaryDirectory() as tmp:
            teacher, note = label_teacher(args.corpus_dir, args.teacher, args.default_teacher, tmp)
            print(f"{note}\n")
            _print_engine_figures(args, teacher)
        return 0
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
        _print_engine_figures(args, teacher)
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


def add_faults(sub: Subparsers) -> None:
    """`mlpl faults`: its arguments."""
    fa = sub.add_parser("faults", help="inject the faults an operator meets (full disk, killed relabel, ...) at "
                        "random points, rerun, and compare with an uninterrupted run")
    _study_corpus(fa, corpus="smoke", out="runs/faults")
    fa.add_argument("--trials", type=int, default=3, help="faults per kind, at random points (default: 3)")
    fa.add_argument("--seed", type=int, default=0)
    fa.add_argument("--only", nargs="+", default=None, help="run these trials only (names as in the table's log)")
    fa.add_argument("--teacher", default=None, help="checkpoint to label with (default: one trained for 150 "
                    "updates into --out, once)")
    fa.add_argument("--results", default=None, help="Markdown page to put the table in, as its 'Fault trials' section")
    fa.add_argument("--results-command", default=None, help="the command the page names")
    fa.set_defaults(func=cmd_faults)


def cmd_faults(args: argparse.Namespace) -> int:
    """Run the fault trials and print (and publish) their table; exit 1 when one did not recover."""
    from pipeline.engine.device import cpu_name
    from pipeline.studies.common import ensure_corpus, write_section
    from pipeline.studies.faults import fault_teacher, format_faults, results_json, run_faults

    t0 = time.perf_counter()
    with progress_bar(single=True) as update:
        ensure_corpus(args.corpus, args.corpus_dir, on_progress=update)
    teacher = args.teacher or fault_teacher(args.corpus_dir, args.out)
    results = run_faults(args.corpus_dir, teacher, args.out, trials=args.trials, seed=args.seed, only=args.only)
    print(results_json(results), file=sys.stderr)
    text = format_faults(results, cpu_name(), args.results_command or "mlpl faults", time.perf_counter() - t0)
    write_section(args.results, "Fault trials", text)
    _published(text, args.results, "Fault trials")
    return 0 if all(r.recovered for r in results) else 1


COMMANDS = (add_ablate, add_capacity, add_datasize, add_serving, add_bench, add_faults)
