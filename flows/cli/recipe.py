"""`mlpl recipe`, `mlpl demo`, `mlpl report`, `mlpl serve`: the whole recipe, its report, its deployments."""

from __future__ import annotations

import argparse
import time
from typing import Any

from flows.cli.common import (
    Subparsers,
    recipe_arguments,
    recipe_config,
    results_arguments,
)


def add_recipe(sub: Subparsers) -> None:
    """`mlpl recipe`: its arguments."""
    rc = sub.add_parser("recipe", help="the whole recipe (supervised → fine-tune → slimIPL → labeling → student → "
                        "report) as the Prefect flow mlpl-recipe")
    recipe_arguments(rc, corpus="bench", corpus_dir="data/bench", run_dir="runs/bench")
    rc.add_argument("--recipe", default="bench", help="recipe preset: demo | bench (default: bench)")
    rc.add_argument("--config", default=None, help="RecipeConfig JSON for your own data (no corpus is built)")
    results_arguments(rc, "the run's table, plot, orderings and targets")
    rc.set_defaults(func=cmd_recipe)


def cmd_recipe(args: argparse.Namespace) -> int:
    """Run the whole recipe as the Prefect flow mlpl-recipe (building the corpus first unless --config)."""
    t0 = time.perf_counter()
    from pipeline.layout import is_imported

    cfg = recipe_config(args)
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


def add_demo(sub: Subparsers) -> None:
    """`mlpl demo`: its arguments."""
    d = sub.add_parser("demo", help="build the demo corpus and run the whole recipe as a Prefect flow")
    recipe_arguments(d, corpus="demo", corpus_dir="data/demo", run_dir="runs/demo")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo corpus and run the whole recipe on it as a Prefect flow; print the report."""
    args.config, args.recipe, args.results, args.results_command = None, "demo", None, None
    return cmd_recipe(args)


def add_report(sub: Subparsers) -> None:
    """`mlpl report`: its arguments."""
    rp = sub.add_parser("report", help="the run's table in the layout of the paper's Tables 2-3, and a dev-CER plot")
    rp.add_argument("--run-dir", required=True, help="run directory (any fsspec URL)")
    rp.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Write and print a run's report: test CER per stage and language, averages, LID, PL CER, dev-CER plot."""
    from pipeline.report.report import write_report

    report = write_report(args.run_dir)
    print(report["markdown"])
    print(f"→ {args.run_dir}/report/report.{{md,json}}, plot {report['plot']}")
    return 0


def add_serve(sub: Subparsers) -> None:
    """`mlpl serve`: its arguments."""
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


COMMANDS = (add_recipe, add_demo, add_report, add_serve)
