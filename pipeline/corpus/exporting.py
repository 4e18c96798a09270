"""`mlpl export <format> LABELS_ROOT --out DIR`: the pseudo-label corpus in another toolkit's layout, streamed.

The read-time filters of `load_pseudo_labels` (languages, confidence, teacher, token counts, LID agreement) pick
the rows, as a student's data loader would; then each PL shard holding a picked row is read once, in order, and
its samples go one at a time to the format's writer (`storage/exporters/`), so memory holds the table of picked
rows and one clip, never the corpus' audio. `export.json` (rows, hours, per-language counts, files, wall time) is
written last: a folder without it is an unfinished export.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pandas as pd

from storage.exporters import ExportWriter
from storage.files import join, write_json
from storage.pl import PLQuery, iter_shard_samples, load_pseudo_labels

log = logging.getLogger("mlpl.export")

ProgressFn = Callable[[int, int, str], None]

FORMATS = ("nemo", "lhotse", "hf")
SUMMARY = "export.json"


def _writer(fmt: str, out_dir: str, *, total_rows: int, shar: bool, max_rows_per_file: int) -> ExportWriter:
    """The format's writer (imported on use: lhotse and datasets are heavy)."""
    if fmt == "nemo":
        from storage.exporters.nemo import NemoTarredWriter

        return NemoTarredWriter(out_dir)
    if fmt == "lhotse":
        from storage.exporters.lhotse_cuts import LhotseCutsWriter

        return LhotseCutsWriter(out_dir, shar=shar)
    from storage.exporters.huggingface import HuggingFaceParquetWriter

    return HuggingFaceParquetWriter(out_dir, total_rows=total_rows, max_rows_per_file=max_rows_per_file)


def export_pseudo_labels(
    fmt: str,
    root: str,
    out_dir: str,
    *,
    query: PLQuery | None = None,
    shar: bool = False,
    max_rows_per_file: int = 10_000,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Export the PL rows of a labels root that `query` selects (all by default) to `out_dir` in `fmt`; return
    the summary.

    `shar` (lhotse only) also writes a Lhotse Shar folder; `max_rows_per_file` caps the rows of one Parquet file
    (hf). `on_progress(done, total, description)` is called as rows are written.

    Raises:
        ValueError: for an unknown format, `shar` with a format other than lhotse, or when no row passes the
            filters.
        RuntimeError: when a picked row's sample is missing from its PL shard (a damaged labels root).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    if shar and fmt != "lhotse":
        raise ValueError(f"shar=True writes a Lhotse Shar folder: it goes with format 'lhotse', not {fmt!r}")
    query = query or PLQuery()
    filters = query.given()
    started = time.monotonic()
    table = load_pseudo_labels(root, query)
    if table.empty:
        raise ValueError(_nothing_selected(root, filters))
    total = len(table)
    writer = _writer(fmt, out_dir, total_rows=total, shar=shar, max_rows_per_file=max_rows_per_file)
    rows: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    done = 0
    shards = 0
    try:
        for shard, group in table.groupby("shard", sort=True):  # each shard read once, in order
            shards += 1
            picked = {r["key"]: _native(r) for r in group.to_dict("records")}
            for key, flac, _ in iter_shard_samples(root, shard, list(picked)):
                row = picked.pop(key, None)
                if row is None:  # a key the tar holds twice: its first copy was exported
                    continue
                writer.write(row, flac)
                done += 1
                rows[row["language"]] += 1
                seconds[row["language"]] += row.get("duration_s") or 0.0
                if on_progress is not None and (done % 100 == 0 or done == total):
                    on_progress(done, total, f"{fmt}: {done}/{total} rows written")
            if picked:
                raise RuntimeError(f"{len(picked)} PL row(s) have no sample in {join(root, shard)} (e.g. key "
                                   f"{next(iter(picked))!r}): the labels root is damaged; relabel those ids")
        written = writer.commit()
    except BaseException:
        writer.abort()
        raise
    summary = {
        "format": fmt, "root": root, "out_dir": out_dir, "filters": filters,
        **({"shar": True} if shar else {}),
        "rows": done, "hours": round(sum(seconds.values()) / 3600, 4),
        "languages": {lang: {"rows": n, "hours": round(seconds[lang] / 3600, 4)} for lang, n in sorted(rows.items())},
        "shards_read": shards,
        **written,
        "wall_s": round(time.monotonic() - started, 2),
    }
    write_json(join(out_dir, SUMMARY), summary)
    log.info("exported %d PL rows (%.2f h; %s) from %s as %s to %s", done, summary["hours"],
             ", ".join(f"{k} {v['rows']}" for k, v in summary["languages"].items()), root, fmt, out_dir)
    return summary


def _nothing_selected(root: str, filters: dict[str, Any]) -> str:
    """One line: which filters left nothing, or that the root holds no labels at all."""
    if not filters:
        return f"no PL rows under {root}: it holds no committed pseudo-labels (run `mlpl label` into it first)"
    held = len(load_pseudo_labels(root, columns=["id"]))
    said = ", ".join(f"{k}={v!r}" for k, v in filters.items())
    if not held:
        return f"no PL rows under {root}: it holds no committed pseudo-labels (filters {said})"
    return f"no PL rows under {root} pass the filters {said} (the root holds {held} rows): loosen them"


def _native(row: dict[str, Any]) -> dict[str, Any]:
    """A DataFrame record with nulls as None and numpy scalars as Python values (JSON and Arrow take them)."""
    out = {}
    for k, v in row.items():
        if v is None or (not isinstance(v, str | bytes) and pd.isna(v)):
            v = None
        elif hasattr(v, "item") and not isinstance(v, pd.Timestamp):
            v = v.item()
        out[k] = v
    return out


__all__ = ["FORMATS", "PLQuery", "export_pseudo_labels"]  # PLQuery: the filter a caller above storage builds
