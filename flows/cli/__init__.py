"""The `mlpl` command line, one module per command group: data (corpus build, import, export), training (every
stage, evaluate), labeling (label, relabel), recipe (recipe, demo, report, serve) and studies (ablate, capacity,
datasize, serving, bench). Each command's flags sit beside its handler (`add_<command>` / `cmd_<command>`).

Every command has `--help`; long work draws a rich progress bar; bad arguments or unusable input end
with a non-zero exit and a one-line reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from flows.cli import data, labeling, recipe, studies, training

GROUPS = (data, training, labeling, recipe, studies)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every group's subcommands."""
    p = argparse.ArgumentParser(prog="mlpl", description="Multilingual pseudo-labeling pipeline (slimIPL recipe).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        for add in group.COMMANDS:
            add(sub)
    return p


def _logging(verbose: bool, rank: int) -> None:
    """Under torchrun rank 0 reports; the other ranks say only what goes wrong, each line naming its rank."""
    logging.basicConfig(
        level=(logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0
        else f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (rank 0 prints the results)
    # Prefect's client logs every API request at INFO; keep the console for the pipeline's own lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mlpl` console script."""
    from pipeline.engine.distributed import launcher_rank, shutdown

    args = build_parser().parse_args(argv)
    _logging(args.verbose, launcher_rank())
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
