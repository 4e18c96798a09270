"""`mlpl label` and `mlpl relabel`: the PL corpus, once or as new audio arrives."""

from __future__ import annotations

import argparse

from flows.cli.common import (
    Subparsers,
    progress_bar,
    stage_config,
    teacher_args,
)


def label_config(args: argparse.Namespace):
    """The labeling config: the run's teachers and --teacher flags, the preset and overrides."""
    from pipeline.layout import teachers_for_run

    teachers = teachers_for_run(args.run_dir) if args.run_dir else {}
    teachers |= teacher_args(args.teacher)
    if not teachers:
        raise ValueError("no teachers: pass --run-dir (each language's best model there) or --teacher LANG=CHECKPOINT")
    sets = [f"engine={args.engine}"] if args.engine else []
    sets += [f"onnx_precision={args.onnx_precision}"] if args.onnx_precision else []
    args.set = sets + list(args.set or [])  # --set wins over the flags
    return stage_config("label", args, args.manifest, teachers)


def engine_arguments(p: argparse.ArgumentParser) -> None:
    """--engine and --onnx-precision: what runs the teachers."""
    p.add_argument("--engine", default=None, choices=["torch", "onnxruntime"],
                   help="what runs the teachers: torch, or ONNX Runtime on the CPU (default: the preset's, torch)")
    p.add_argument("--onnx-precision", default=None, choices=["fp32", "int8"],
                   help="the ONNX Runtime engine's weights: int8 (dynamic quantization, default) or fp32")


def add_label(sub: Subparsers) -> None:
    """`mlpl label`: its arguments."""
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
    engine_arguments(lb)
    lb.add_argument("--flow", action="store_true", help="run as the Prefect flow mlpl-label (artifacts, task runs)")
    dask = lb.add_mutually_exclusive_group()
    dask.add_argument("--dask-workers", type=int, default=None, metavar="N",
                      help="label on a local Dask cluster of N worker processes, cores shared among them (runs the "
                      "flow)")
    dask.add_argument("--dask-address", default=None, metavar="URL",
                      help="label on a running Dask cluster, e.g. tcp://scheduler:8786 (runs the flow; workers need "
                      "mlpl installed and the manifest, audio, teachers and labels root at the same URLs)")
    lb.set_defaults(func=cmd_label)


def cmd_label(args: argparse.Namespace) -> int:
    """Corpus-wide pseudo-labeling into a Parquet table + WebDataset shards (resumable, idempotent)."""
    from pipeline.layout import RunLayout
    from pipeline.stages.label import run_label
    from pipeline.stages.label_summary import open_with_pandas, summary_markdown

    cfg = label_config(args)
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


def add_relabel(sub: Subparsers) -> None:
    """`mlpl relabel`: its arguments."""
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
    engine_arguments(rl)
    rl.add_argument("--flow", action="store_true", help="run as the Prefect flow mlpl-relabel")
    rl.set_defaults(func=cmd_relabel)


def cmd_relabel(args: argparse.Namespace) -> int:
    """Label what arrived in a watched folder (new files, changed files, older teachers) into a labels root."""
    from pipeline.config import RelabelConfig, deep_merge, parse_assignments, read_form
    from pipeline.stages.relabel import relabel_markdown, run_relabel

    base = read_form(args.config) if args.config else {}
    given = {"watch": args.watch, "labels_root": args.labels, "run_dir": args.run_dir,
             "language_from": args.language_from, "preset": args.preset}
    base |= {k: v for k, v in given.items() if v is not None}
    if args.teacher:
        base["teachers"] = teacher_args(args.teacher)
    if args.engine:
        base["labeling_engine"] = args.engine
    if args.onnx_precision:
        base.setdefault("label", {})["onnx_precision"] = args.onnx_precision
    cfg = RelabelConfig(**deep_merge(base, parse_assignments(list(args.set or []))))
    if args.flow:
        from flows.relabel import relabel_flow

        result = relabel_flow(cfg)
    else:
        with progress_bar() as update:
            result = run_relabel(cfg, on_progress=update)
    print(relabel_markdown(result))
    return 0


COMMANDS = (add_label, add_relabel)
