"""`mlpl corpus build`, `mlpl import`, `mlpl export`: corpora in, the PL corpus out."""

from __future__ import annotations

import argparse
import json
import time

from flows.cli.common import (
    Subparsers,
    progress_bar,
)


def add_corpus_build(sub: Subparsers) -> None:
    """`mlpl corpus build`: its arguments."""
    corpus = sub.add_parser("corpus", help="synthetic multilingual corpus").add_subparsers(dest="action", required=True)
    b = corpus.add_parser("build", help="build a corpus preset (smoke, demo, bench) with espeak-ng")
    b.add_argument("--preset", default="demo", help="smoke | demo | bench (default: demo)")
    b.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    b.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    b.add_argument("--text-dir", default=None, help="folder with <lang>.txt sentence files instead of Debian text")
    b.add_argument("--cache-dir", default=None, help="download/text cache (default: $MLPL_CACHE_DIR or ~/.cache/mlpl)")
    b.set_defaults(func=cmd_corpus_build)


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


def add_import(sub: Subparsers) -> None:
    """`mlpl import`: its arguments."""
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


def add_export(sub: Subparsers) -> None:
    """`mlpl export`: its arguments."""
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


def cmd_export(args: argparse.Namespace) -> int:
    """Export the PL corpus (read-time filters applied) as a NeMo tarred dataset, a lhotse CutSet or an HF dataset."""
    from pipeline.corpus.exporting import PLQuery, export_pseudo_labels

    query = PLQuery(languages=args.languages.split(",") if args.languages else None,
                    min_confidence=args.min_confidence, teacher=args.teacher, min_tokens=args.min_tokens,
                    max_tokens=args.max_tokens, lid_agreement=args.lid_agreement)
    with progress_bar(single=True) as update:
        summary = export_pseudo_labels(args.format, args.labels, args.out, query=query, shar=args.shar,
                                       on_progress=update)
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2, default=str))
    print(f"→ {args.out} ({len(summary.get('files', []))} files; export.json says what was written)")
    return 0


COMMANDS = (add_corpus_build, add_import, add_export)
