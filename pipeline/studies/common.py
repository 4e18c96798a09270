"""What every study shares: the corpus it needs, a measurement in a fresh
process, labeled hours per language, and its section of the results page."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from pipeline.corpus.build import build_corpus, corpus_preset
from pipeline.data.rows import ProgressFn
from pipeline.layout import split_manifest
from pipeline.report.report import replace_section
from storage.files import atomic_write_bytes, atomic_write_text, exists, join, read_text
from storage.manifest import read_manifest


def mark(ok: bool) -> str:
    """A target's verdict in a results table: met, or missed in bold."""
    return "met" if ok else "**missed**"


def child_json(script: str, *args: str) -> dict[str, Any]:
    """Run a Python script in a fresh process (its own peak RSS) and return the JSON of its last output line."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_corpus(preset: str, corpus_dir: str, on_progress: ProgressFn | None = None) -> None:
    """Build the corpus preset into `corpus_dir` unless a corpus is there already (whichever preset it was)."""
    if not exists(split_manifest(corpus_dir, "labeled")):
        build_corpus(corpus_preset(preset), corpus_dir, on_progress=on_progress)


def labeled_hours(manifest_url: str) -> dict[str, float]:
    """Audio per language of a manifest, in hours."""
    rows, _ = read_manifest(manifest_url)
    hours: dict[str, float] = {}
    for r in rows:
        hours[r["language"]] = hours.get(r["language"], 0.0) + float(r.get("duration_s") or 0.0) / 3600
    return hours


def write_section(results: str | None, title: str, text: str, figures: dict[str, bytes] | None = None) -> str:
    """Put a study's `## title` section into the results page (created when missing), its figures (PNG files by
    name) beside the page; returns the text."""
    if results is None:
        return text
    folder = results.rsplit("/", 1)[0] if "/" in results else "."
    for name, png in (figures or {}).items():
        atomic_write_bytes(join(folder, name), png)
    page = read_text(results) if exists(results) else "# Results\n"
    atomic_write_text(results, replace_section(page, title, text))
    return text
